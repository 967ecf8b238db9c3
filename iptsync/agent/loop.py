"""The node agent: sources in, coalesced syncs out, health and metrics alongside.

One thread owns the engines: one :class:`~iptsync.engine.reconciler.Engine` per IP family the
node programs (:class:`~iptsync.engine.families.FamilyEngines`). Sources run in their own
threads and put messages on a queue; the loop drains it, hands each object to every family,
and decides when each family syncs:

- nothing is touched until every source has delivered its first complete list;
- the first sync, and every sync after a failed one, is full; so is one every
  ``sync_period``, and one as soon as the canary chain is found missing (tables flushed);
- otherwise changes are coalesced: a change after a quiet period is applied at once, later
  ones at most every ``min_sync_period``, and only the changed services are written;
- a failed sync is retried after ``min_sync_period`` (at least a second), in full; a family
  that fails is that family's failure: the other one keeps syncing, and the one ``/healthz``
  turns 503 once the failing family's changes have waited longer than its timeout.

The loop takes an explicit ``iterations`` hook for tests instead of being patched, and a
:class:`Clock` through which it reads the time and waits for messages: with
:class:`iptsync.testing.FakeClock`, tests run coalescing, periodic full syncs, canary checks
and retries in simulated time, without sleeping. Stopping (SIGTERM) leaves the rules in place:
nodes keep forwarding while the agent is replaced.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from iptsync.agent.health import HealthState, ServiceHealth, ServiceHealthServers
from iptsync.agent.metrics import Metrics
from iptsync.core import names
from iptsync.core.model import IPFamily, trigger_time
from iptsync.core.ruleset import RulesetError
from iptsync.core.state import ClusterState, is_local
from iptsync.engine.apply import SyncError
from iptsync.engine.families import FamilyEngines, in_turn
from iptsync.engine.reconciler import Engine, EngineReport
from iptsync.kernel.port import NetfilterError
from iptsync.sources.base import KINDS, Change, Message, Snapshot, Source

log = logging.getLogger("iptsync.agent.loop")

T = TypeVar("T")


class Clock(Protocol):
    """Time as the agent's loop sees it."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (deadlines, periods)."""

    def time(self) -> float:
        """Seconds since the epoch (the timestamps the metrics publish)."""

    def wait(self, messages: queue.Queue[T], timeout: float) -> T | None:
        """The next message, or None once ``timeout`` seconds passed without one."""


class SystemClock:
    """The real time; waiting blocks on the queue."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, messages: queue.Queue[T], timeout: float) -> T | None:
        try:
            return messages.get(timeout=timeout)
        except queue.Empty:
            return None


@dataclass(frozen=True)
class Timing:
    """How often the agent syncs (seconds)."""

    min_sync_period: float = 1.0
    sync_period: float = 30.0
    canary_interval: float = 5.0
    # With a change watch (iptsync.kernel.watch): how often it is asked (a netlink read or a
    # getsockopt), and how often everything is compared anyway, as kube-proxy's hourly
    # full sync. Without one, everything is compared every sync_period.
    check_interval: float = 1.0
    full_sync_period: float = 3600.0

    @property
    def retry_after(self) -> float:
        return max(self.min_sync_period, 1.0)


@dataclass
class FamilySync:
    """The loop's bookkeeping for one IP family's engine: each family syncs, fails and is
    retried on its own (kube-proxy runs one proxier per family)."""

    engine: Engine
    failed: bool = False
    last_attempt: float = float("-inf")  # monotonic
    last_full: float = float("-inf")
    last_check: float = float("-inf")  # the change watch last asked
    triggers: list[datetime] = field(default_factory=list)  # slice changes awaiting a sync
    keeping: threading.Thread | None = None  # writing the renderings for the next start


class Agent:
    """Runs the sync loop for one node until :meth:`stop`.

    ``engine`` is one :class:`Engine` (one IP family) or :class:`FamilyEngines` (each family
    the node programs, primary first): every family gets the same objects and its own syncs.
    """

    def __init__(self, engine: Engine | FamilyEngines, sources: Iterable[Source], *,
                 timing: Timing, metrics: Metrics | None = None,
                 health: HealthState | None = None,
                 service_health: ServiceHealthServers | None = None,
                 clock: Clock | None = None) -> None:
        self.engines = engine if isinstance(engine, FamilyEngines) else FamilyEngines([engine])
        self.families = {family: FamilySync(e) for family, e in self.engines.engines.items()}
        self.sources = list(sources)
        self.timing = timing
        self.metrics = metrics or Metrics()
        self.health = health or HealthState(2 * timing.sync_period)
        self.health.track(family.value for family in self.families)
        self._node_known = False  # a Node object was seen (its disappearance then counts)
        self.service_health = service_health
        self.clock = clock or SystemClock()
        self.queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._listed: set[str] = set()
        self._changed_since: float | None = None  # first change not yet synced
        self._last_sync = float("-inf")  # last sync attempt of any family (monotonic)
        self._last_canary = self.clock.monotonic()
        self._read_errors = 0  # sources' read_errors already counted in the metrics
        self._pending = {"Service": 0, "EndpointSlice": 0}
        self.reports: list[EngineReport] = []  # kept short; for tests and debugging

    # --- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    @property
    def ready(self) -> bool:
        """Every source has listed every kind."""
        return self._listed >= set(KINDS)

    def run(self, iterations: int | None = None) -> None:
        """Start the sources and loop until stopped (or ``iterations`` loop turns, in tests)."""
        for source in self.sources:
            source.start(self._receive)
        try:
            turns = 0
            while not self._stop.is_set() and (iterations is None or turns < iterations):
                turns += 1
                self._turn()
        finally:
            for source in self.sources:
                source.stop()
            if self.service_health is not None:
                self.service_health.close()
            self._keep_renderings_now()
            log.info("stopped; the rules stay in place")

    def _turn(self) -> None:
        self._wait_for_messages(self._next_deadline() - self.clock.monotonic())
        self._publish_source_status()
        if not self.ready:
            return
        now = self.clock.monotonic()
        missing: set[IPFamily] = set()
        if now - self._last_canary >= self.timing.canary_interval:
            self._last_canary = now
            missing = self._canary_missing(now)
        for family, sync in self.families.items():
            if (sync.engine.watch is not None and not sync.failed
                    and now - sync.last_check >= self.timing.check_interval
                    and now - sync.last_full < self._full_period(sync)):
                sync.last_check = now
                self._check(family)
        now = self.clock.monotonic()
        due = self._changed_since is not None and (
            now - self._last_sync >= self.timing.min_sync_period)
        wanted: dict[IPFamily, bool] = {}  # family -> full
        for family, sync in self.families.items():
            if sync.failed and now - sync.last_attempt < self.timing.retry_after:
                continue  # its retry is not due; the other family goes on
            full = (sync.failed or family in missing or not sync.engine.synced_once
                    or now - sync.last_full >= self._full_period(sync))
            if full or (due and sync.engine.pending):
                wanted[family] = full
        if wanted:
            self._sync(wanted)

    def _full_period(self, sync: FamilySync) -> float:
        return (self.timing.full_sync_period if sync.engine.watch is not None
                else self.timing.sync_period)

    def _check(self, family: IPFamily) -> None:
        """The quiet path: ask the family's change watch; repair what other programs
        changed."""
        sync = self.families[family]
        started = self.clock.monotonic()
        try:
            report = sync.engine.check()
        except (SyncError, NetfilterError, RulesetError) as err:
            sync.last_attempt = started
            self._failed_sync(family, "full", err,
                              "repairing changes made outside iptsync failed")
            return
        if report is None:
            return
        sync.last_attempt = started
        if report.full:
            sync.last_full = started
        self.metrics.outside_changes.labels("full" if report.full else "chains",
                                            family.value).inc()
        self._record(family, report)

    def _publish_source_status(self) -> None:
        connected = all(source.status.connected for source in self.sources)
        self.metrics.source_connected.set(1 if connected else 0)
        read_errors = sum(source.status.read_errors for source in self.sources)
        self.metrics.file_errors.inc(read_errors - self._read_errors)
        self._read_errors = read_errors
        now = time.monotonic()  # the sources' clock, not self.clock (tests may fake that)
        for source in self.sources:
            for kind, seconds in source.status.silence(now).items():
                self.metrics.watch_staleness.labels(kind).set(seconds)

    def _next_deadline(self) -> float:
        now = self.clock.monotonic()
        if not self.ready:
            # Nothing is due before every source has listed (the last full sync is still
            # at minus infinity): wait for messages instead of spinning.
            return now + 1.0
        deadlines = [self._last_canary + self.timing.canary_interval]
        for sync in self.families.values():
            deadlines.append(sync.last_full + self._full_period(sync))
            if sync.engine.watch is not None:
                deadlines.append(sync.last_check + self.timing.check_interval)
            if sync.failed:
                deadlines.append(sync.last_attempt + self.timing.retry_after)
            elif self._changed_since is not None and sync.engine.pending:
                deadlines.append(self._last_sync + self.timing.min_sync_period)
        return max(now, min(deadlines))

    def _wait_for_messages(self, timeout: float) -> None:
        # At most a second, so that stop() is noticed promptly.
        message = self.clock.wait(self.queue, max(0.0, min(timeout, 1.0)))
        if message is None:
            return
        self._handle(message)
        while True:  # drain what else is there: one sync for a burst of events
            try:
                self._handle(self.queue.get_nowait())
            except queue.Empty:
                return

    # --- input ---------------------------------------------------------------------------

    def _receive(self, message: Message) -> None:
        """A source's message, in the source's thread. The update it may need is owed from
        now (as kube-proxy's event handlers say), not from when the loop reads it: a loop
        stuck in a sync then turns /healthz 503 instead of hiding behind an unread queue."""
        for family in self._concerned(message):
            self.health.queued(family.value)
        self.queue.put(message)

    def _concerned(self, message: Message) -> list[IPFamily]:
        """The programmed families a message may change: an EndpointSlice event only its
        address type's (kube-proxy's meta-proxier hands it to that proxier alone), anything
        else every family."""
        if isinstance(message, Change) and message.kind == "EndpointSlice":
            kind = message.obj.get("addressType")
            return [f for f in self.families if f.value == kind or kind not in ("IPv4", "IPv6")]
        return list(self.families)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Snapshot):
            dirty = self.engines.replace_kind(message.kind, message.objects)
            if message.kind not in self._listed:
                self._listed.add(message.kind)
                log.info("listed %d %s objects", len(message.objects), message.kind)
        elif message.action == "delete":
            dirty = self.engines.delete(message.obj)
        else:
            dirty = self.engines.upsert(message.obj)
        concerned = self._concerned(message)
        if isinstance(message, Change) and message.kind == "EndpointSlice":
            self._note_trigger(message.obj, concerned)
        if message.kind == "Node":
            self._follow_node()
        if dirty:
            kind = message.kind if message.kind in self._pending else "Service"
            self._pending[kind] += len(dirty)
            (self.metrics.endpoint_changes if kind == "EndpointSlice"
             else self.metrics.service_changes).inc(len(dirty))
            self._queued(concerned)
        self._update_pending_metrics()
        self.metrics.invalid_objects.clear()
        for kind in KINDS:
            count = sum(1 for ident in self.engines.problems if ident[0] == kind)
            self.metrics.invalid_objects.labels(kind).set(count)

    def _follow_node(self) -> None:
        """Tell /healthz whether this node is draining. Before any Node object arrived the
        node counts as eligible (kube-proxy's start); once one was seen, its deletion makes
        the node ineligible."""
        node = self.engines.primary.state.node
        if node is not None or self._node_known:
            self.health.node_changed(node)
        self._node_known = node is not None

    def _note_trigger(self, obj: Mapping[str, object], families: list[IPFamily]) -> None:
        """A slice's change is programmed by its family's sync: its latency is measured
        there."""
        stamp = trigger_time(obj)
        if stamp is not None:
            for family in families:
                self.families[family].triggers.append(stamp)

    def _queued(self, families: list[IPFamily]) -> None:
        if self._changed_since is None:
            self._changed_since = self.clock.monotonic()
        for family in families:
            self.health.queued(family.value)
            self.metrics.last_queued.labels(family.value).set(self.clock.time())

    def _update_pending_metrics(self) -> None:
        self.metrics.service_changes_pending.set(self._pending["Service"])
        self.metrics.endpoint_changes_pending.set(self._pending["EndpointSlice"])

    # --- syncing -------------------------------------------------------------------------

    def _canary_missing(self, now: float) -> set[IPFamily]:
        """The families whose canary chain is gone (tables flushed): each needs a full sync.
        A family whose check failed is a failed sync, retried in full."""
        missing: set[IPFamily] = set()
        for family, sync in self.families.items():
            netfilter = sync.engine.netfilter
            if netfilter is None or not sync.engine.synced_once or sync.engine.watch is not None:
                continue  # (a change watch sees flushed tables without listing chains)
            try:
                for table in ("nat", "filter"):
                    if not netfilter.chain_exists(table, names.KUBE_PROXY_CANARY):
                        log.warning("%scanary chain %s missing from the %s table: tables were "
                                    "flushed; running a full sync", self.engines.tag(family),
                                    names.KUBE_PROXY_CANARY, table)
                        self.metrics.canary_missing.labels(family.value).inc()
                        missing.add(family)
                        break
            except NetfilterError as err:
                # Another program holds the xtables lock (or iptables failed): the rules
                # cannot be checked now, nor written; a failed sync, retried in full.
                sync.last_attempt = now
                self._failed_sync(family, "full", err, "the canary check failed")
        return missing

    def _sync(self, wanted: Mapping[IPFamily, bool]) -> None:
        """Sync each family in ``wanted`` (family -> full); a family that fails is retried
        on its own, after ``retry_after``, in full."""
        self._last_sync = self.clock.monotonic()
        self._changed_since = None
        self._pending = {"Service": 0, "EndpointSlice": 0}
        self._update_pending_metrics()
        for engine in in_turn([self.families[family].engine for family in wanted]):
            family = engine.settings.family
            self._sync_family(family, full=wanted[family])
        if self.service_health is not None:
            self.service_health.update(health_check_ports(self.engines))

    def _sync_family(self, family: IPFamily, *, full: bool) -> None:
        sync = self.families[family]
        sync.last_attempt = self._last_sync
        if full:
            sync.last_full = self._last_sync
        kind = "full" if full or sync.engine.needs_full else "partial"
        first = not sync.engine.synced_once
        try:
            report = sync.engine.sync(full=full)
        except (SyncError, NetfilterError, RulesetError) as err:
            # RulesetError: a live table that cannot be read, or a rule the writer refuses
            # to write; like a rejected batch, it must not end the agent.
            (self.metrics.restore_failures if kind == "full"
             else self.metrics.partial_restore_failures).labels(family.value).inc()
            self._failed_sync(family, kind, err, f"{kind} sync failed")
            return
        sync.failed = False
        self.health.updated(family.value)
        self._record(family, report, first=first)
        if report.full:
            self._keep_renderings(sync)

    def _keep_renderings(self, sync: FamilySync) -> None:
        """Write the engine's renderings for the next start, in a thread, after a full sync
        (the first one, then at most one per full-sync period: what changes in between is
        written when the agent stops). One write at a time."""
        if sync.keeping is not None and sync.keeping.is_alive():
            return
        snapshot = sync.engine.renderings()
        if snapshot is not None:
            sync.keeping = threading.Thread(target=sync.engine.write_renderings,
                                            args=(snapshot,), name="iptsync-keep-renderings",
                                            daemon=True)
            sync.keeping.start()

    def _keep_renderings_now(self) -> None:
        """At stop: wait for a write under way, then write what changed since."""
        for sync in self.families.values():
            if sync.keeping is not None:
                sync.keeping.join()
            try:
                sync.engine.keep_renderings()
            except Exception:  # never in the way of stopping
                log.exception("could not keep the renderings for the next start")

    def _failed_sync(self, family: IPFamily, kind: str,
                     err: SyncError | NetfilterError | RulesetError, what: str) -> None:
        """Count and log a sync that did not happen; the next one, in full, is due after
        ``retry_after``. A failing sync owes an update: /healthz turns 503 when the
        failures last longer than its timeout."""
        self.families[family].failed = True
        self.health.queued(family.value)
        self.metrics.syncs.labels(kind, "failure", family.value).inc()
        undo_failed = err.undo_failed if isinstance(err, SyncError) else ()
        for table in undo_failed:
            self.metrics.undo_failures.labels(table, family.value).inc()
        state = (f"the {', '.join(undo_failed)} table keeps part of the failed batch"
                 if undo_failed else "the previous rules are in place")
        log.error("%s%s, %s; retrying in full in %.1fs: %s", self.engines.tag(family), what, state,
                  self.timing.retry_after, err)

    def _record(self, family: IPFamily, report: EngineReport, *, first: bool = False) -> None:
        m, label, engine = self.metrics, family.value, self.families[family].engine
        total = report.phases.get("total", 0.0)
        kind = "full" if report.full else "partial"
        m.sync_duration.labels(label).observe(total)
        (m.full_sync_duration if report.full else m.partial_sync_duration).labels(
            label).observe(total)
        m.syncs.labels(kind, "success", label).inc()
        m.last_sync.labels(label).set(self.clock.time())
        for phase, seconds in report.phases.items():
            if phase != "total":
                m.phase_duration.labels(phase, label).observe(seconds)
        counts = engine.rule_counts()
        for table, count in counts.items():
            m.rules.labels(table, label).set(count)
        written = {t.table: t.rules_added for t in report.plan.tables}
        for table in ("filter", "nat"):
            m.rules_last.labels(table, label).set(written.get(table, 0))
        for policy, count in engine.no_local_endpoints().items():
            m.no_local_endpoints.labels(policy, label).set(count)
        now = datetime.fromtimestamp(self.clock.time(), UTC)
        triggers = self.families[family].triggers
        for stamp in triggers:
            m.network_programming.labels(label).observe(max(0.0, (now - stamp).total_seconds()))
        triggers.clear()
        tag = self.engines.tag(family)
        for chain in report.drifted:
            table = chain.split("/", 1)[0]
            m.drift.labels(table, label).inc()
            log.warning("%sdrift: %s was changed outside iptsync; repaired", tag, chain)
        if first:
            # One line, said also when the node already held every rule (a restart): the
            # operator waiting for the agent to come up learns that it has.
            log.info("%sfirst full sync done in %.2fs: %d services (%d rendered), %s rules; %s",
                     tag, total, len(engine.state.services), report.services_rendered,
                     ", ".join(f"{table} {counts[table]}" for table in sorted(counts)),
                     report.outcome("nothing needed changing"))
        else:
            level = logging.INFO if not report.plan.empty or report.drifted else logging.DEBUG
            log.log(level, "%s%s", tag, report.line())
        self.reports = [*self.reports[-9:], report]


def health_check_ports(engines: FamilyEngines) -> dict[int, ServiceHealth]:
    """Health check node port -> its service and local ready endpoint count. A dual-stack
    Service has one health check node port; its pods count once (the family that sees
    most of them: a pod's addresses of both families are one endpoint each)."""
    found: dict[int, ServiceHealth] = {}
    for engine in engines.engines.values():
        for port, health in _health_check_ports(engine.state,
                                                engine.settings.node_name).items():
            if port not in found or health.local_endpoints > found[port].local_endpoints:
                found[port] = health
    return found


def _health_check_ports(state: ClusterState, node_name: str) -> dict[int, ServiceHealth]:
    owners: dict[int, tuple[str, str]] = {}
    local: dict[int, set[str]] = {}
    for port in state.service_ports():
        if not port.health_check_node_port or not port.external_policy_local:
            continue
        owners[port.health_check_node_port] = port.name.service
        local.setdefault(port.health_check_node_port, set()).update(
            ep.address for ep in state.endpoints(port) if ep.ready and is_local(ep, node_name))
    return {hc: ServiceHealth(*owners[hc], len(local[hc])) for hc in owners}
