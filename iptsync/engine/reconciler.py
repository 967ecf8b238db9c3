"""The node's proxier: cluster state, rules rendered per service, and syncs that cost the change.

:class:`Engine` keeps what each service renders to (its own nat chains as restore lines, and
its rules in the shared top-level chains, each with its sort key) and re-renders a service
only when it or its endpoints change. That cache is the one place the desired ruleset is
assembled (:meth:`Engine.desired`): ``iptsync dump``, ``diff``, ``trace`` and ``explain`` ask
an engine without a kernel for it (:mod:`iptsync.engine.desired`). Between full syncs it writes only
what changed (:func:`iptsync.core.plan.partial_plan`): the changed services' own chains, and
single rules deleted from or inserted at the head of the top-level chains.

After any series of incremental syncs the kernel holds exactly what a full sync writes, up to
the order of the services' rules within a top-level chain.

Whether the kernel still holds what the engine believes is checked by the full sync, which
reads the live tables and compares every chain (one digest per chain), repairs what differs,
and reports chains that differ although nothing changed them on our side: drift. A failed
apply (or a failure planning) makes the next sync a full one.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import operator
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from iptsync.core import names
from iptsync.core.flows import flow_targets
from iptsync.core.model import (
    EndpointSliceInfo,
    IPAddress,
    IPFamily,
    NodeInfo,
    Problem,
    ServiceInfo,
    object_key,
    parse_object,
)
from iptsync.core.names import SERVICE_RULE_CHAINS
from iptsync.core.plan import (
    DEFAULT_STAGE_LINES,
    NO_STAGING,
    ChainContent,
    DesiredTables,
    Plan,
    RenderedService,
    ServiceChange,
    TableBuilder,
    TablePlan,
    TopChain,
    TopChains,
    TopRule,
    chain_digest,
    make_plan,
    partial_plan,
    plan_table,
)
from iptsync.core.policy import Settings, local_detection_note
from iptsync.core.render import (
    PortRules,
    base_ruleset,
    chain_tails,
    render_service_port,
)
from iptsync.core.ruleset import Jump, Rule, SavedTable, canonical, join_args, ordered_tables
from iptsync.core.state import ClusterState, ServiceKey
from iptsync.engine import rendercache
from iptsync.engine.apply import STREAM_FULL, apply_plan, failed_restore
from iptsync.engine.progress import PROGRESS_INTERVAL, Progress
from iptsync.engine.rendercache import RenderCache, Reusable, Snapshot, TopDigests
from iptsync.kernel.port import FlowCleaner, NetfilterPort, RestoreError
from iptsync.kernel.watch import WHOLE_TABLE, ChangeWatch
from iptsync.options import with_node

log = logging.getLogger(__name__)
T = TypeVar("T")


def render_service(service: ServiceInfo, state: ClusterState, settings: Settings,
                   large_cluster: bool, *, compared: bool = True) -> RenderedService:
    """One service's chains and top-level rules. With ``compared`` (an engine with a kernel),
    the chains the renderer spelled as iptables-save prints them get their digest now, for
    the full syncs that compare them with the kernel; ``dump`` and the other commands that
    only render skip that."""
    zone = state.node_zone
    chains: dict[str, ChainContent] = {}
    top: list[TopRule] = []
    endpoints = no_local_internal = no_local_external = 0
    for index, port in enumerate(service.ports):
        eps = state.endpoints(port)
        endpoints += len(eps)
        piece: PortRules = render_service_port(port, eps, settings, zone,
                                               large_cluster=large_cluster, spell=compared)
        no_local_internal += piece.no_local_internal
        no_local_external += piece.no_local_external
        for chain, rules in piece.chains.items():
            chains[chain] = ChainContent(_restore_lines(chain, rules, piece.lines.get(chain)),
                                         family=settings.family,
                                         digest=_saved_digest(rules, piece.saved.get(chain),
                                                              settings.family)
                                         if compared else None)
        for seq, (table, rule) in enumerate(piece.top):
            top.append(TopRule((service.namespace, service.name, index, seq), table,
                               rule.chain, join_args(rule.args)))
    return RenderedService(chains, tuple(top), endpoints, no_local_internal, no_local_external)


def _restore_lines(chain: str, rules: list[Rule],
                   written: list[str | None] | None) -> tuple[str, ...]:
    """The chain's restore lines: those the renderer wrote out (``written``, see
    :class:`PortRules`), the other rules' arguments joined here."""
    if written is None or len(written) != len(rules):
        return tuple(f"-A {chain} {join_args(rule.args)}" for rule in rules)
    if None not in written:
        return tuple(written)  # type: ignore[arg-type]  # (None is not in it)
    return tuple(f"-A {chain} {join_args(rule.args)}" if line is None else line
                 for rule, line in zip(rules, written, strict=True))


def _saved_digest(rules: list[Rule], saved: list[str | None] | None,
                  family: IPFamily) -> int | None:
    """The digest of a chain the renderer spelled as iptables-save prints it (rules it did
    not spell are canonicalised here); None when it spelled none of them."""
    if not saved or len(saved) != len(rules) or all(text is None for text in saved):
        return None
    return chain_digest([canonical(rule.args, family) if text is None else text
                         for rule, text in zip(rules, saved, strict=True)])


@dataclass
class EngineReport:
    """One sync: what was planned, how long each phase took, what drifted."""

    plan: Plan
    full: bool
    phases: dict[str, float] = field(default_factory=dict)
    services_rendered: int = 0
    drifted: list[str] = field(default_factory=list)  # "table/chain" changed behind our back
    stale_flows: int = 0

    def line(self) -> str:
        kind = "full" if self.full else "partial"
        return f"{kind} sync: {self.services_rendered} services rendered; {self.outcome()}"

    def outcome(self, unchanged: str = "no changes") -> str:
        """What the sync changed (``unchanged`` when nothing), drift, flows and timings."""
        timings = " ".join(f"{name}={secs * 1000:.1f}ms" for name, secs in self.phases.items())
        drift = f"; drift repaired in {len(self.drifted)} chains" if self.drifted else ""
        return (f"{unchanged if self.plan.empty else self.plan.summary()}{drift}; "
                f"stale flows cleared: {self.stale_flows}; {timings}")


class Engine:
    """Everything one node's proxier knows; :meth:`sync` brings the kernel in line with it.

    Feed it manifests with :meth:`upsert`, :meth:`delete` and :meth:`replace_kind`; each
    marks the services whose rules may change. Not thread-safe: the agent calls it from one
    thread. The kernel comes in through its ports (:mod:`iptsync.kernel.port`): ``netfilter``
    (None: an engine that only renders) and ``flows``, which clears stale conntrack entries
    after each sync (None: no cleanup).
    """

    def __init__(self, netfilter: NetfilterPort | None, settings: Settings, *,
                 interface_ips: Iterable[IPAddress] = (), flows: FlowCleaner | None = None,
                 stage_lines: int = DEFAULT_STAGE_LINES, stream_full: bool | None = None,
                 progress_interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 watch: ChangeWatch | None = None,
                 render_cache: RenderCache | None = None) -> None:
        self.netfilter = netfilter
        # Tells, cheaply, whether other programs changed our rules (iptsync.kernel.watch);
        # None: only a full compare can tell.
        self.watch = watch
        self.base_settings = settings
        self.interface_ips = tuple(interface_ips)
        self.settings = with_node(settings, None, self.interface_ips)
        self.state = ClusterState(settings.node_name)
        self.flows = flows
        self.stage_lines = stage_lines
        # Full syncs streamed while rendering (see _stream_full): by default as suits the
        # backend (iptsync.engine.apply.STREAM_FULL).
        if stream_full is None:
            stream_full = netfilter is not None and STREAM_FULL[netfilter.backend]
        self.stream_full = stream_full
        self.progress_interval = progress_interval  # seconds between progress lines
        self.clock = clock
        self.problems: dict[tuple[str, str, str], Problem] = {}
        self._rendered: dict[ServiceKey, RenderedService] = {}
        self._dirty: set[ServiceKey] = set()
        self._endpoint_total = 0
        self._large = False
        self._jumps: list[Jump] | None = None  # from settings; None: skeleton to build
        self._detection_note = ""  # what was last said about local traffic detection
        self._top: TopChains = {}
        self.needs_full = True  # the kernel may not hold what the cache says
        self.synced_once = False
        # The live tables, being read for a full sync.
        self._ahead: InThread[dict[str, SavedTable]] | None = None
        # Services rendered ahead of their sync (render_ahead): key -> (large-cluster mode,
        # rendering), used when the key is still due and the mode the same; a change to a
        # service drops its entry.
        # The third item says whether the rendering was a kept one.
        self._rendering: InThread[dict[ServiceKey, tuple[bool, RenderedService, bool]]] | None = (
            None)
        self._prerendered: dict[ServiceKey, tuple[bool, RenderedService, bool]] = {}
        # Called once a sync has rendered and sent its rules, while iptables-restore works
        # (iptsync.engine.families.in_turn: the next family renders then).
        self.when_rendered: Callable[[], None] | None = None
        # Whether the chains rendered now will be compared with the kernel's (see
        # render_service): not when the engine has no kernel, nor in a first sync that found
        # none of our chains in the kernel (nothing to compare them with).
        self._compared = netfilter is not None
        # Renderings kept by the process before this one (iptsync.engine.rendercache): read
        # at the first render, reused while their inputs are the same, dropped after the
        # first sync.
        self.render_cache = render_cache
        self._kept: Reusable | None = None
        self._kept_header = ""
        self._kept_top: TopDigests = {}
        self._kept_checked: dict[ServiceKey, RenderedService | None] = {}  # key -> match
        # What each rendering was made from (service, slices, zone, large-cluster mode): a
        # rendering is written for the next process only while these are still the inputs.
        self._rendered_from: dict[ServiceKey, tuple[ServiceInfo, tuple[EndpointSliceInfo, ...],
                                                    str | None, bool]] = {}
        # Renderings made or dropped (not taken as kept) so far, and as many as last written.
        self._render_count = self._written_count = 0

    # --- input ---------------------------------------------------------------------------

    def upsert(self, manifest: Mapping[str, Any]) -> set[ServiceKey]:
        """Add or replace one object. An invalid update keeps the last valid version."""
        parsed = parse_object(manifest)
        note_problems(self.problems, manifest, parsed.problems)
        return set() if parsed.value is None else self.add(parsed.value)

    def add(self, value: ServiceInfo | EndpointSliceInfo | NodeInfo) -> set[ServiceKey]:
        """Add or replace one object already parsed (:func:`iptsync.core.model.parse_object`)."""
        self._wait_render_ahead()
        if isinstance(value, NodeInfo):
            return self._set_node(value)
        family = self.settings.family
        if isinstance(value, EndpointSliceInfo):
            if value.family is not None and value.family is not family:
                return set()  # the other family's engine programs it
        elif any(port.family is not family for port in value.ports):
            value = replace(value, ports=tuple(p for p in value.ports if p.family is family))
        dirty = self.state.upsert(value)
        self._mark_dirty(dirty)
        return dirty

    def delete(self, manifest: Mapping[str, Any]) -> set[ServiceKey]:
        self._wait_render_ahead()
        kind = str(manifest.get("kind") or "")
        namespace, name = object_key(manifest)
        self.problems.pop((kind, namespace, name), None)
        dirty: set[ServiceKey] = set()
        if kind == "Service":
            dirty = self.state.delete_service((namespace, name))
        elif kind == "EndpointSlice":
            dirty = self.state.delete_slice((namespace, name))
        elif kind == "Node" and self.state.node is not None and name == self.state.node.name:
            dirty = self.state.delete_node() | self._settings_changed()
        self._mark_dirty(dirty)
        return dirty

    def replace_kind(self, kind: str, manifests: Iterable[Mapping[str, Any]]) -> set[ServiceKey]:
        """Make the objects of ``kind`` exactly ``manifests`` (a list or relist)."""
        with bulk():
            return self._replace_kind(kind, list(manifests))

    def _replace_kind(self, kind: str, manifests: list[Mapping[str, Any]]) -> set[ServiceKey]:
        keep = {object_key(m) for m in manifests}
        dirty: set[ServiceKey] = set()
        for namespace, name in self.known(kind) - keep:
            dirty |= self.delete(stub(kind, namespace, name))
        for manifest in manifests:
            dirty |= self.upsert(manifest)
        return dirty

    def known(self, kind: str) -> set[tuple[str, str]]:
        """``(namespace, name)`` of the objects of ``kind`` this engine holds."""
        if kind == "Service":
            return set(self.state.services)
        if kind == "EndpointSlice":
            return set(self.state.slice_keys())
        node = self.state.node
        return {("", node.name)} if node is not None else set()

    def _set_node(self, node: NodeInfo) -> set[ServiceKey]:
        if node.name != self.state.node_name:
            return set()
        old = self.state.node
        dirty = self.state.upsert(node)
        if old is None or (old.addresses, old.pod_cidrs) != (node.addresses, node.pod_cidrs):
            dirty |= self._settings_changed()
        self._mark_dirty(dirty)
        return dirty

    def _mark_dirty(self, dirty: set[ServiceKey]) -> None:
        """Due for rendering; what was rendered ahead for them no longer holds."""
        self._dirty |= dirty
        for key in dirty:
            self._prerendered.pop(key, None)
            self._kept_checked.pop(key, None)

    def _settings_changed(self) -> set[ServiceKey]:
        settings = with_node(self.base_settings, self.state.node, self.interface_ips)
        if settings == self.settings:
            return set()
        self.settings = settings
        self._jumps = None
        self._rendered.clear()
        self._rendered_from.clear()
        self._prerendered.clear()
        self._endpoint_total = 0
        self._top.clear()
        self.needs_full = True
        return set(self.state.services)

    @property
    def pending(self) -> bool:
        """Some service's rules may have changed since they were last rendered."""
        return bool(self._dirty)

    # --- rendering -----------------------------------------------------------------------

    def _skeleton(self) -> list[Jump]:
        """Build the top-level chains for the current settings (once); returns the jumps."""
        if self._jumps is None:
            base = base_ruleset(self.settings)
            tails = chain_tails(self.settings)
            self._top = {(table, chain): TopChain(list(rules), tails.get((table, chain), []),
                                                  self.settings.family)
                         for table, chains in base.tables.items()
                         for chain, rules in chains.items()}
            self._jumps = list(base.jumps)
            for rendered in self._rendered.values():
                for rule in rendered.top:
                    self._top[(rule.table, rule.chain)].insert(rule)
        return self._jumps

    def _note_local_detection(self) -> None:
        """Say at the first sync how this family's pod traffic is told apart, and again when
        it changes (a NodeCIDR node given its pod CIDR): a missing input is a warning, a mode
        other than the default worth an INFO line. Commands that only render (``dump``,
        ``explain`` of every family) do not log it; ``explain`` notes it per port."""
        note = local_detection_note(self.settings)
        if note != self._detection_note:
            detector = self.settings.local_detector
            level = (logging.WARNING if detector is None else
                     logging.DEBUG if detector.mode == "ClusterCIDR" else logging.INFO)
            log.log(level, "%s", note)
            self._detection_note = note

    def _render_dirty(self) -> list[ServiceChange]:
        """Re-render the changed services; returns (before, after) for each."""
        dirty = self._take_dirty()
        reuse = self._kept_mode() == self._large
        return [self._render_one(key, reuse) for key in sorted(dirty)]

    def _kept_mode(self) -> bool | None:
        """The large-cluster mode the kept renderings were rendered in, if for this node's
        settings and zone as they are now; None: nothing to reuse (none kept, or after the
        first sync). The file is read at the first call."""
        if self.render_cache is None or self.synced_once or self._kept == {}:
            return None
        try:
            headers = {rendercache.header(self.settings, self.state.node_zone, large): large
                       for large in (False, True)}
        except Exception:  # (the renderer's sources unreadable: never in a sync's way)
            log.exception("render cache: cannot tell what the kept renderings are for")
            self._kept = {}
            return None
        if self._kept is None:
            with bulk():  # (hundreds of thousands of objects, none of them cyclic)
                self._kept_header, self._kept, self._kept_top = self.render_cache.load(
                    headers, self.settings.family)
        return headers.get(self._kept_header) if self._kept else None

    def _kept_rendering(self, key: ServiceKey, service: ServiceInfo) -> RenderedService | None:
        """The kept rendering of ``key`` if its inputs are the ones it has now (asked only
        while :meth:`_kept_mode` is not None; the answer holds until ``key`` changes)."""
        if key in self._kept_checked:
            return self._kept_checked[key]
        entry = self._kept.get(key) if self._kept else None
        found = (entry[1] if entry is not None and entry[0] == rendercache.fingerprint(
            service, self.state.slices_of(key)) else None)
        self._kept_checked[key] = found
        return found

    def _render_or_reuse(self, key: ServiceKey, service: ServiceInfo, settings: Settings,
                         large: bool, *, compared: bool,
                         reuse: bool) -> tuple[RenderedService, bool]:
        """:func:`render_service`, or (``reuse``) the kept rendering of the same inputs; says
        which."""
        kept = self._kept_rendering(key, service) if reuse else None
        if kept is not None:
            return kept, True
        return render_service(service, self.state, settings, large, compared=compared), False

    def renderings(self) -> Snapshot | None:
        """The renderings to keep for the next process (see
        :mod:`iptsync.engine.rendercache`), taken now. None when there is no file to keep
        them in, it holds them already, or some service's rendering is not of its current
        inputs (a change not rendered yet, a failed render): the file is written whole or
        left as it is, never with services missing."""
        if self.render_cache is None or self._render_count == self._written_count:
            return None
        state, zone, large = self.state, self.state.node_zone, self._large
        services = []
        for key, service in state.services.items():
            made, rendered = self._rendered_from.get(key), self._rendered.get(key)
            if made is None or rendered is None:
                return None
            slices = state.slices_of(key)
            if (made[0] is not service or made[2:] != (zone, large)
                    or len(made[1]) != len(slices)
                    or not all(map(operator.is_, made[1], slices))):
                return None
            services.append((service, slices, rendered))
        self._skeleton()
        return Snapshot(rendercache.header(self.settings, zone, large), services,
                        {key: top.content() for key, top in self._top.items()},
                        self._render_count)

    def keep_renderings(self) -> None:
        """Write :meth:`renderings` now (nothing when there is nothing new)."""
        snapshot = self.renderings()
        if snapshot is not None:
            self.write_renderings(snapshot)

    def write_renderings(self, snapshot: Snapshot) -> None:
        """Write ``snapshot`` (also from another thread: it only reads what it holds)."""
        if self.render_cache is not None and self.render_cache.save(snapshot):
            self._written_count = max(self._written_count, snapshot.count)

    def render_ahead(self) -> None:
        """Render the due services now, in a thread, for the next sync to use.

        A node with two families syncs them in turn: while one family's sync waits for
        iptables-restore (its own process, on another core), the other family's services
        render here, and its sync starts with them ready. The thread only reads the engine;
        every method that changes it, or renders, waits for the thread first. What changes
        before the sync is rendered again then.
        """
        if self._rendering is None and self._dirty:
            if self.needs_full:
                self.read_ahead()  # the full sync's read, started now: it tells whether to spell
            self._compared = compared = self._will_compare()
            state, settings = self.state, self.settings
            services = [(key, state.services[key]) for key in sorted(self._dirty)
                        if key in state.services]
            large = self._endpoints_after(set(self._dirty)) > settings.large_cluster_endpoints
            def render() -> dict[ServiceKey, tuple[bool, RenderedService, bool]]:
                reuse = self._kept_mode() == large  # read here, in the thread, on a restart
                with bulk():
                    return {key: (large, *self._render_or_reuse(key, service, settings, large,
                                                                compared=compared,
                                                                reuse=reuse))
                            for key, service in services}

            self._rendering = InThread(render, "iptsync-render-ahead")

    def _wait_render_ahead(self) -> None:
        """Wait for a render ahead and keep what it rendered. Should it have failed, the
        services are rendered again when due (they still are): said, never raised here,
        where an object being fed in would be lost with the error."""
        rendering, self._rendering = self._rendering, None
        if rendering is None:
            return
        try:
            self._prerendered.update(rendering.result())
        except Exception:
            log.exception("rendering ahead failed; the services are rendered at their sync")

    def _endpoints_after(self, dirty: set[ServiceKey]) -> int:
        """The endpoints of every service once ``dirty`` is rendered (for kube-proxy's
        large-cluster mode)."""
        kept = self._kept_mode() is not None
        return self._endpoint_total + sum(self._endpoint_count(key, kept=kept)
                                          - self._rendered_count(key) for key in dirty)

    def _will_compare(self) -> bool:
        """Whether what renders now will be compared with the kernel's rules (see
        :func:`render_service`): always after our first sync, or with renderings to keep for
        the next process; else, when the live tables being read hold our chains (a
        restart). A read of an empty kernel is over in milliseconds; one still running after
        0.1 s is of a loaded kernel."""
        if self.netfilter is None:
            return False
        if self.synced_once or self.render_cache is not None:
            # Kept renderings carry their digests, for the next process to compare.
            return True
        if self._ahead is None:
            return self._compared  # as the last read said (a streamed sync reads first)
        tables = self._ahead.peek(0.1)
        if tables is None:
            return True
        nat = tables.get("nat")
        return nat is not None and names.KUBE_SERVICES in nat.chains

    def _take_dirty(self) -> set[ServiceKey]:
        """The services to render now (all of them when the large-cluster mode flips)."""
        self._wait_render_ahead()
        self._compared = self._will_compare()
        self._skeleton()
        dirty, self._dirty = self._dirty, set()
        # Decide kube-proxy's large-cluster mode before rendering anything: rendering a first
        # sync in the wrong mode and again in the right one doubled its render time.
        total = self._endpoints_after(dirty)
        large = total > self.settings.large_cluster_endpoints
        if large != self._large:
            # kube-proxy drops per-endpoint comments above the threshold: every chain changes.
            log.info("%d endpoints: %s large-cluster mode", total,
                     "entering" if large else "leaving")
            self._large = large
            dirty |= set(self._rendered)
        return dirty

    def _endpoint_count(self, key: ServiceKey, *, kept: bool = False) -> int:
        """``key``'s endpoints (``kept``: as its kept rendering counted them, if it matches,
        which saves merging its slices before anything needs them)."""
        service = self.state.services.get(key)
        if service is None:
            return 0
        rendered = self._kept_rendering(key, service) if kept else None
        if rendered is not None:
            return rendered.endpoints
        return sum(len(self.state.endpoints(port)) for port in service.ports)

    def _rendered_count(self, key: ServiceKey) -> int:
        rendered = self._rendered.get(key)
        return rendered.endpoints if rendered else 0

    def _render_one(self, key: ServiceKey, reuse: bool) -> ServiceChange:
        service = self.state.services.get(key)
        old = self._rendered.get(key)
        ahead = self._prerendered.pop(key, None)
        new: RenderedService | None = None
        if service is not None:
            new, reused = (ahead[1:] if ahead and ahead[0] == self._large else
                           self._render_or_reuse(key, service, self.settings, self._large,
                                                 compared=self._compared, reuse=reuse))
            self._render_count += not reused
            # Its current inputs (a rendering made ahead is dropped when they change).
            self._rendered_from[key] = (service, tuple(self.state.slices_of(key)),
                                        self.state.node_zone, self._large)
        self._endpoint_total += (new.endpoints if new else 0) - (old.endpoints if old else 0)
        if new is None:
            self._render_count += self._rendered.pop(key, None) is not None
            self._rendered_from.pop(key, None)
        else:
            self._rendered[key] = new
        return (old, new)

    def desired(self) -> DesiredTables:
        """The whole desired ruleset as the planner reads it (after rendering what changed).

        Pending changes are folded into the cache here, so the next sync can no longer write
        them as a partial one: it compares everything instead.
        """
        changes = self._render_dirty()
        if changes:
            self.needs_full = True
        self._apply_to_top(changes)
        return self._desired_tables()

    def _apply_to_top(self, changes: Iterable[ServiceChange]) -> None:
        for old, new in changes:
            for rule in old.top if old else ():
                self._top[(rule.table, rule.chain)].remove(rule)
            for rule in new.top if new else ():
                self._top[(rule.table, rule.chain)].insert(rule)

    def _top_chains(self, table: str) -> dict[str, ChainContent]:
        return {chain: content for (name, chain), content in self._top_contents().items()
                if name == table}

    def _top_contents(self) -> dict[tuple[str, str], ChainContent]:
        """The top-level chains; before the first sync, with the digests the process before
        kept for the same lines (the renderer does not spell these chains' rules)."""
        reuse = bool(self._kept_top) and self._kept_mode() is not None
        contents = {}
        for key, top in self._top.items():
            content = contents[key] = top.content()
            kept = self._kept_top.get(key) if reuse else None
            if kept is not None and kept[0] == rendercache.lines_key(content):
                content.give_digest(kept[1])
        return contents

    def _desired_tables(self) -> DesiredTables:
        jumps = self._skeleton()
        tables: dict[str, dict[str, ChainContent]] = {}
        for (table, chain), content in self._top_contents().items():
            tables.setdefault(table, {})[chain] = content
        nat = tables.setdefault("nat", {})
        for key in sorted(self._rendered):
            nat.update(self._rendered[key].chains)
        return DesiredTables({t: tables[t] for t in ordered_tables(tables)}, jumps,
                             self.settings.family)

    def rule_counts(self) -> dict[str, int]:
        """Rules iptsync owns per table, as last rendered (kube-proxy's iptables_total)."""
        counts: dict[str, int] = {}
        for (table, _chain), top in self._top.items():
            counts[table] = counts.get(table, 0) + len(top.head) + len(top.rules) + len(top.tail)
        counts["nat"] = counts.get("nat", 0) + sum(
            len(content.lines) for rendered in self._rendered.values()
            for content in rendered.chains.values())
        return counts

    def no_local_endpoints(self) -> dict[str, int]:
        """Service ports whose Local traffic policy leaves this node without an endpoint, by
        traffic policy (kube-proxy's ``sync_proxy_rules_no_local_endpoints_total``)."""
        rendered = self._rendered.values()
        return {"internal": sum(r.no_local_internal for r in rendered),
                "external": sum(r.no_local_external for r in rendered)}

    # --- syncing -------------------------------------------------------------------------

    def sync(self, *, full: bool = False) -> EngineReport:
        """Apply what changed (or, with ``full`` or after a failure, compare everything).

        Raises :class:`iptsync.engine.apply.SyncError` when the kernel refused the batch; the
        previous rules are then still in place and the next sync is a full one.
        """
        if self.netfilter is None:
            raise RuntimeError("this engine has no netfilter to sync")
        self._note_local_detection()
        phases: dict[str, float] = {}
        started = self.clock()
        progress = Progress(self.progress_interval, self.clock, started)
        dirty = set(self._dirty)
        known_good = self.synced_once and not self.needs_full
        full = full or self.needs_full
        try:
            self.needs_full = True  # until the kernel is known to hold the new rules
            if full:
                self.read_ahead()  # iptables-save runs while the changed services render
            if full and self.stream_full:
                with bulk():
                    report = self._stream_full(phases, progress, known_good=known_good)
            else:
                with bulk():
                    changes = self._render_dirty()
                    phases["render"] = self.clock() - started
                    mark = self.clock()
                    if full:
                        report = self._plan_full(changes, phases, known_good=known_good)
                    else:
                        report = EngineReport(partial_plan(changes, self._top, self._read_chain,
                                                           stage_lines=self.stage_lines,
                                                           family=self.settings.family),
                                              False, phases)
                        phases["plan"] = self.clock() - mark
                report.services_rendered = len(changes)
                mark = self.clock()
                self._rendered_all()
                apply_plan(self.netfilter, report.plan, progress)
                phases["apply"] = self.clock() - mark
        except Exception:
            self._dirty |= dirty
            self.needs_full = True
            raise
        finally:
            self._drop_ahead()
        self.needs_full = False
        self.synced_once = True
        self._kept, self._kept_top = {}, {}  # what the first sync did not use serves no more
        self._kept_checked.clear()
        if self.watch is not None:
            self.watch.mark()
        if self.flows is not None:
            mark = self.clock()
            report.stale_flows = self.flows(
                flow_targets(self.state, self.settings, None if full else dirty))
            phases["conntrack"] = self.clock() - mark
        phases["total"] = self.clock() - started
        return report

    def _rendered_all(self) -> None:
        if self.when_rendered is not None:
            self.when_rendered()

    def read_ahead(self) -> None:
        """Start reading the live tables for the next full sync, in a thread.

        iptables-save runs in its own process, on another core, while this one goes on
        loading and rendering: a restart (``run --once`` on a node holding every rule)
        starts it before feeding the manifests, so reading costs little more than the
        longer of the two. The sync that follows compares with what was read; the kernel
        state it stands for is the one at the start of the read, as for any read.
        """
        if self.netfilter is not None and self._ahead is None:
            self._ahead = InThread(self.netfilter.save, "iptsync-read-ahead")

    def _live_tables(self) -> dict[str, SavedTable]:
        """The tables read ahead (or now, when no read was started)."""
        assert self.netfilter is not None
        ahead, self._ahead = self._ahead, None
        return ahead.result() if ahead is not None else self.netfilter.save()

    def _drop_ahead(self) -> None:
        """A read not used by the sync it was started for is stale for the next: wait for
        it (its iptables-save must not outlive the sync) and forget it."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.wait()

    def check(self) -> EngineReport | None:
        """Ask the change watch whether other programs changed our rules; repair if so.

        Costs one netlink read (nft) or one getsockopt (legacy) when nothing changed: the
        quiet path of an idle node. Chains named by the watch are read and repaired alone;
        changes that cannot be told chain by chain (a legacy table, lost notifications, a
        table or our canary chain gone) get a full compare. Returns None when nothing was
        looked at (no watch, or a full sync is owed anyway).
        """
        if self.watch is None or not self.synced_once or self.needs_full:
            return None
        changes = self.watch.changes()
        if not changes.any:
            return None
        if changes.unknown or any(chain in (WHOLE_TABLE, names.KUBE_PROXY_CANARY)
                                  for _, chain in changes.chains):
            log.warning("rules changed outside iptsync (%s); comparing everything",
                        changes.describe())
            return self.sync(full=True)
        log.info("rules changed outside iptsync in %s; repairing", changes.describe())
        return self.repair(changes.chains)

    def repair(self, chains: Collection[tuple[str, str]]) -> EngineReport:
        """Bring ``chains`` (table, chain) back to what the last sync wrote, reading only them.

        Our chains are rewritten if they differ (or recreated if gone), stale ones of ours
        deleted, and our jumps reinserted into built-in chains that lost them; other rules of
        built-in chains are left alone. Any failure leaves a full sync owed.
        """
        assert self.netfilter is not None
        started = self.clock()
        phases: dict[str, float] = {}
        desired = self._desired_tables()
        tables: list[TablePlan] = []
        try:
            self.needs_full = True  # until the repair is known to be in place
            for table in ordered_tables({table: {} for table, _ in chains}):
                wanted = {chain for name, chain in chains if name == table}
                live = SavedTable(table, {chain: rules for chain in sorted(wanted)
                                          if (rules := self._read_live(table, chain)) is not None})
                own = desired.tables.get(table, {})
                builder = TableBuilder(table, live)
                builder.add_chains({chain: own[chain] for chain in sorted(wanted) if chain in own})
                plan = builder.finish([j for j in desired.jumps
                                       if j.table == table and j.chain in wanted])
                if not plan.empty:
                    tables.append(plan)
            phases["read"] = self.clock() - started
            report = EngineReport(Plan(tables, self.stage_lines), False, phases)
            mark = self.clock()
            apply_plan(self.netfilter, report.plan, Progress(self.progress_interval, self.clock,
                                                             started))
            phases["apply"] = self.clock() - mark
        except Exception:
            self.needs_full = True
            raise
        self.needs_full = False
        if self.watch is not None:
            self.watch.mark()
        report.drifted = _drift(report.plan, ())
        phases["total"] = self.clock() - started
        return report

    def _read_live(self, table: str, chain: str) -> list[str] | None:
        """One live chain's rules, or None when the chain does not exist."""
        assert self.netfilter is not None
        if not self.netfilter.chain_exists(table, chain):
            return None
        return self._read_chain(table, chain)

    def _read_chain(self, table: str, chain: str) -> list[str]:
        """One live chain's rules, canonical (``-S`` reads that chain only)."""
        assert self.netfilter is not None
        prefix = f"-A {chain} "
        return [line[len(prefix):] for line in
                self.netfilter.run("-t", table, "-S", chain).splitlines()
                if line.startswith(prefix)]

    def _plan_full(self, changes: list[ServiceChange], phases: dict[str, float], *,
                   known_good: bool) -> EngineReport:
        assert self.netfilter is not None
        self._apply_to_top(changes)
        desired = self._desired_tables()
        mark = self.clock()
        live = self._live_tables()
        phases["read"] = self.clock() - mark
        mark = self.clock()
        plan = make_plan(desired, live, stage_lines=self.stage_lines)
        phases["plan"] = self.clock() - mark
        report = EngineReport(plan, True, phases)
        if known_good:
            report.drifted = _drift(plan, changes)
        return report

    def _stream_full(self, phases: dict[str, float], progress: Progress, *,
                     known_good: bool) -> EngineReport:
        """A full sync applied as one batch, streamed to iptables-restore while rendering.

        For backends that take a first sync in one batch (legacy), iptables-restore parses
        the first services' chains while the rest are still being rendered, instead of
        waiting for the whole payload. nat comes first: the fixed top-level chains (service
        chains jump to KUBE-MARK-MASQ), each service's chains as it is rendered, then the
        top-level chains that hold the services' rules, stale chains and jumps. filter, whose
        chains depend on every service, follows. Tables commit in that order, so a failure in
        filter undoes nat.
        """
        assert self.netfilter is not None
        mark = self.clock()
        live = self._live_tables()
        phases["read"] = self.clock() - mark
        started = self.clock()
        live_nat = live.get("nat")
        self._compared = self.synced_once or self.render_cache is not None or (
            live_nat is not None and names.KUBE_SERVICES in live_nat.chains)
        jumps = self._skeleton()
        self._kept_mode()  # the kept renderings, read before the first chains are compared
        changes: list[ServiceChange] = []
        with self.netfilter.restore_stream() as stream:
            family = self.settings.family
            nat = TableBuilder("nat", live.get("nat") or SavedTable("nat"), stream.write,
                               family=family)
            top = self._top_chains("nat")
            nat.add_chains({chain: content for chain, content in top.items()
                            if chain not in SERVICE_RULE_CHAINS["nat"]})
            rendering = self._stream_services(nat, progress, changes)
            top = self._top_chains("nat")
            nat.add_chains({chain: top[chain] for chain in SERVICE_RULE_CHAINS["nat"]
                            if chain in top})
            tables = [nat.finish(jumps)]
            wanted = DesiredTables({"filter": self._top_chains("filter")}, jumps, family)
            tables.append(plan_table("filter", wanted, live.get("filter") or SavedTable("filter")))
            plan = Plan([t for t in tables if not t.empty], NO_STAGING)  # all sent already
            if not tables[1].empty:
                stream.write(tables[1].lines())
            self._rendered_all()
            try:
                stream.close()
            except RestoreError as err:
                raise failed_restore(self.netfilter, plan, err) from err
        phases["render"] = rendering
        phases["apply"] = self.clock() - started - rendering
        report = EngineReport(plan, True, phases, services_rendered=len(changes))
        if known_good:
            report.drifted = _drift(plan, changes)
        return report

    def _stream_services(self, nat: TableBuilder, progress: Progress,
                         changes: list[ServiceChange]) -> float:
        """Every service's chains into ``nat`` in key order, the due ones rendered on the way
        (their changes appended to ``changes``); returns the seconds spent rendering."""
        rendering = 0.0
        done: set[ServiceKey] = set()  # rendered into changes
        dirty = self._take_dirty()
        reuse = self._kept_mode() == self._large
        keys = sorted(dirty | self._rendered.keys())
        try:
            for index, key in enumerate(keys):
                progress.report("full sync in progress: %d of %d services sent to "
                                "iptables-restore, %d chains written", index, len(keys),
                                len(nat.plan.written))
                if key in dirty:
                    mark = self.clock()
                    changes.append(self._render_one(key, reuse))
                    done.add(key)
                    rendering += self.clock() - mark
                rendered = self._rendered.get(key)
                if rendered is not None:
                    nat.add_chains(rendered.chains)
        finally:
            # Also when writing fails half way (the xtables lock, a dead iptables-restore):
            # the top-level chains take the services rendered so far, or their old rules
            # would stay in the cache for good, and the others stay due for rendering.
            self._apply_to_top(changes)
            self._dirty |= dirty - done
        return rendering


def note_problems(problems: dict[tuple[str, str, str], Problem],
                  manifest: Mapping[str, Any], found: Iterable[Problem]) -> None:
    """Keep the first of an object's ``found`` problems in ``problems`` (keyed by kind,
    namespace and name; dropped when it has none) and log them all when they changed."""
    ident = (str(manifest.get("kind") or ""), *object_key(manifest))
    found = tuple(found)
    if not found:
        problems.pop(ident, None)
        return
    if problems.get(ident) != found[0]:
        for problem in found:
            log.warning("%s", problem)
    problems[ident] = found[0]


def stub(kind: str, namespace: str, name: str) -> dict[str, Any]:
    """The least manifest that names an object to delete."""
    return {"kind": kind, "metadata": {"namespace": namespace or None, "name": name}}


class InThread(Generic[T]):
    """``work()`` running in a thread of its own; :meth:`result` waits for it and returns
    what it returned, or raises what it raised. The engine's read ahead (iptables-save) and
    render ahead run this way."""

    def __init__(self, work: Callable[[], T], name: str) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], T]) -> None:
        try:
            self._value = work()
        except BaseException as err:  # handed to the thread that asks, raised there
            self._error = err

    def wait(self) -> None:
        self._thread.join()

    def peek(self, timeout: float) -> T | None:
        """The value, if ready within ``timeout`` seconds; else (or on failure) None."""
        self._thread.join(timeout)
        if self._thread.is_alive() or self._error is not None:
            return None
        return self._value

    def result(self) -> T:
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


class _Bulk:
    lock = threading.Lock()
    depth = 0  # bulk() blocks open, in any thread
    collect = False  # whether the collector was on when the first of them opened


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """Build many objects without the cyclic collector rescanning the heap each time.

    At 10,000 services, rendering with the collector on took three times as long. Afterwards
    the surviving objects are frozen out of future collections: the render cache lives as
    long as its services, and its objects hold no cycles. The collector is process-wide: it
    stays off until the last block open in any thread (a render ahead) closes.
    """
    with _Bulk.lock:
        if _Bulk.depth == 0:
            _Bulk.collect = gc.isenabled()
            gc.disable()
        _Bulk.depth += 1
    try:
        yield
    finally:
        with _Bulk.lock:
            _Bulk.depth -= 1
            if _Bulk.depth == 0 and _Bulk.collect:
                gc.enable()
                gc.freeze()


def _drift(plan: Plan, changes: Iterable[ServiceChange]) -> list[str]:
    """What a full sync after a good one had to repair although nothing changed it here."""
    expected = _touched(changes)
    drifted = [f"{t.table}/{chain}" for t in plan.tables for chain in (*t.written, *t.deleted)
               if (t.table, chain) not in expected]
    return drifted + [f"{j.table}/{j.chain} -j {j.args[-1]}" for t in plan.tables
                      for j in t.jumps]


def _touched(changes: Iterable[ServiceChange]) -> set[tuple[str, str]]:
    """Chains that these changes rewrite (so a difference there is not drift)."""
    touched: set[tuple[str, str]] = set()
    for change in changes:
        for rendered in change:
            if rendered is not None:
                touched.update(("nat", chain) for chain in rendered.chains)
                touched.update((rule.table, rule.chain) for rule in rendered.top)
    return touched
