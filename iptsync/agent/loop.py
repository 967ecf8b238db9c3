"""The node agent: sources in, coalesced syncs out, health and metrics alongside.

One thread owns the :class:`~iptsync.engine.reconciler.Engine`. Sources run in their own threads and
put messages on a queue; the loop drains it, and decides when to sync:

- nothing is touched until every source has delivered its first complete list;
- the first sync, and every sync after a failed one, is full; so is one every
  ``sync_period``, and one as soon as the canary chain is found missing (tables flushed);
- otherwise changes are coalesced: a change after a quiet period is applied at once, later
  ones at most every ``min_sync_period``, and only the changed services are written;
- a failed sync is retried after ``min_sync_period`` (at least a second), in full.

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from iptsync.agent.health import HealthState, ServiceHealth, ServiceHealthServers
from iptsync.agent.metrics import Metrics
from iptsync.core import names
from iptsync.core.model import trigger_time
from iptsync.core.ruleset import RulesetError
from iptsync.core.state import ClusterState, is_local
from iptsync.engine.apply import SyncError
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


class Agent:
    """Runs the sync loop for one node until :meth:`stop`."""

    def __init__(self, engine: Engine, sources: Iterable[Source], *, timing: Timing,
                 metrics: Metrics | None = None, health: HealthState | None = None,
                 service_health: ServiceHealthServers | None = None,
                 clock: Clock | None = None) -> None:
        self.engine = engine
        self.sources = list(sources)
        self.timing = timing
        self.metrics = metrics or Metrics()
        self.health = health or HealthState(2 * timing.sync_period)
        self._node_known = False  # a Node object was seen (its disappearance then counts)
        self.service_health = service_health
        self.clock = clock or SystemClock()
        self.queue: queue.Queue[Message] = queue.Queue()
        self._stop = threading.Event()
        self._listed: set[str] = set()
        self._changed_since: float | None = None  # first change not yet synced
        self._last_sync = float("-inf")  # last sync attempt (monotonic)
        self._last_full = float("-inf")
        self._last_canary = self.clock.monotonic()
        self._last_check = self._last_canary
        self._failed = False
        self._read_errors = 0  # sources' read_errors already counted in the metrics
        self._pending = {"Service": 0, "EndpointSlice": 0}
        self._triggers: list[datetime] = []  # EndpointSlice change times awaiting a sync
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
            log.info("stopped; the rules stay in place")

    def _turn(self) -> None:
        self._wait_for_messages(self._next_deadline() - self.clock.monotonic())
        self._publish_source_status()
        if not self.ready:
            return
        now = self.clock.monotonic()
        full = self._failed or now - self._last_full >= self._full_period
        if self.engine.watch is not None:
            if now - self._last_check >= self.timing.check_interval and not full:
                self._last_check = now
                self._check()
                now = self.clock.monotonic()
        elif now - self._last_canary >= self.timing.canary_interval:
            self._last_canary = now
            try:
                if self.engine.synced_once and not self._canary_present():
                    full = True
            except NetfilterError as err:
                # Another program holds the xtables lock (or iptables failed): the rules
                # cannot be checked now, nor written; a failed sync, retried in full.
                self._last_sync = now
                self._failed_sync("full", err, "the canary check failed")
                return
        due = self._changed_since is not None and (
            now - self._last_sync >= self.timing.min_sync_period)
        if self._failed and now - self._last_sync < self.timing.retry_after:
            return
        if full or due or not self.engine.synced_once:
            self._sync(full=full or not self.engine.synced_once)

    @property
    def _full_period(self) -> float:
        return (self.timing.full_sync_period if self.engine.watch is not None
                else self.timing.sync_period)

    def _check(self) -> None:
        """The quiet path: ask the change watch; repair what other programs changed."""
        started = self.clock.monotonic()
        try:
            report = self.engine.check()
        except (SyncError, NetfilterError, RulesetError) as err:
            self._last_sync = started
            self._failed_sync("full", err, "repairing changes made outside iptsync failed")
            return
        if report is None:
            return
        self._last_sync = started
        if report.full:
            self._last_full = started
        self.metrics.outside_changes.labels("full" if report.full else "chains").inc()
        self._record(report)

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
        deadlines = [self._last_full + self._full_period,
                     self._last_check + self.timing.check_interval
                     if self.engine.watch is not None
                     else self._last_canary + self.timing.canary_interval]
        if self._failed:
            deadlines.append(self._last_sync + self.timing.retry_after)
        elif self._changed_since is not None:
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
        self.health.queued()
        self.queue.put(message)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Snapshot):
            dirty = self.engine.replace_kind(message.kind, message.objects)
            if message.kind not in self._listed:
                self._listed.add(message.kind)
                log.info("listed %d %s objects", len(message.objects), message.kind)
        elif message.action == "delete":
            dirty = self.engine.delete(message.obj)
        else:
            dirty = self.engine.upsert(message.obj)
        if isinstance(message, Change) and message.kind == "EndpointSlice":
            self._note_trigger(message.obj)
        if message.kind == "Node":
            self._follow_node()
        if dirty:
            kind = message.kind if message.kind in self._pending else "Service"
            self._pending[kind] += len(dirty)
            (self.metrics.endpoint_changes if kind == "EndpointSlice"
             else self.metrics.service_changes).inc(len(dirty))
            self._queued()
        self._update_pending_metrics()
        self.metrics.invalid_objects.clear()
        for kind in KINDS:
            count = sum(1 for ident in self.engine.problems if ident[0] == kind)
            self.metrics.invalid_objects.labels(kind).set(count)

    def _follow_node(self) -> None:
        """Tell /healthz whether this node is draining. Before any Node object arrived the
        node counts as eligible (kube-proxy's start); once one was seen, its deletion makes
        the node ineligible."""
        node = self.engine.state.node
        if node is not None or self._node_known:
            self.health.node_changed(node)
        self._node_known = node is not None

    def _note_trigger(self, obj: Mapping[str, object]) -> None:
        stamp = trigger_time(obj)
        if stamp is not None:
            self._triggers.append(stamp)

    def _queued(self) -> None:
        if self._changed_since is None:
            self._changed_since = self.clock.monotonic()
        self.health.queued()
        self.metrics.last_queued.set(self.clock.time())

    def _update_pending_metrics(self) -> None:
        self.metrics.service_changes_pending.set(self._pending["Service"])
        self.metrics.endpoint_changes_pending.set(self._pending["EndpointSlice"])

    # --- syncing -------------------------------------------------------------------------

    def _canary_present(self) -> bool:
        netfilter = self.engine.netfilter
        if netfilter is None:
            return True
        for table in ("nat", "filter"):
            if not netfilter.chain_exists(table, names.KUBE_PROXY_CANARY):
                log.warning("canary chain %s missing from the %s table: tables were flushed; "
                            "running a full sync", names.KUBE_PROXY_CANARY, table)
                self.metrics.canary_missing.inc()
                return False
        return True

    def _sync(self, *, full: bool) -> None:
        self._last_sync = self.clock.monotonic()
        if full:
            self._last_full = self._last_sync
        kind = "full" if full or self.engine.needs_full else "partial"
        first = not self.engine.synced_once
        try:
            report = self.engine.sync(full=full)
        except (SyncError, NetfilterError, RulesetError) as err:
            # RulesetError: a live table that cannot be read, or a rule the writer refuses
            # to write; like a rejected batch, it must not end the agent.
            (self.metrics.restore_failures if kind == "full"
             else self.metrics.partial_restore_failures).inc()
            self._failed_sync(kind, err, f"{kind} sync failed")
            return
        self._failed = False
        self._changed_since = None
        self._pending = {"Service": 0, "EndpointSlice": 0}
        self._update_pending_metrics()
        self.health.updated()
        self._record(report, first=first)
        if self.service_health is not None:
            self.service_health.update(health_check_ports(self.engine.state,
                                                          self.engine.settings.node_name))

    def _failed_sync(self, kind: str, err: SyncError | NetfilterError | RulesetError,
                     what: str) -> None:
        """Count and log a sync that did not happen; the next one, in full, is due after
        ``retry_after``. A failing sync owes an update: /healthz turns 503 when the
        failures last longer than its timeout."""
        self._failed = True
        self.health.queued()
        self.metrics.syncs.labels(kind, "failure").inc()
        undo_failed = err.undo_failed if isinstance(err, SyncError) else ()
        for table in undo_failed:
            self.metrics.undo_failures.labels(table).inc()
        state = (f"the {', '.join(undo_failed)} table keeps part of the failed batch"
                 if undo_failed else "the previous rules are in place")
        log.error("%s, %s; retrying in full in %.1fs: %s", what, state,
                  self.timing.retry_after, err)

    def _record(self, report: EngineReport, *, first: bool = False) -> None:
        m = self.metrics
        total = report.phases.get("total", 0.0)
        kind = "full" if report.full else "partial"
        m.sync_duration.observe(total)
        (m.full_sync_duration if report.full else m.partial_sync_duration).observe(total)
        m.syncs.labels(kind, "success").inc()
        m.last_sync.set(self.clock.time())
        for phase, seconds in report.phases.items():
            if phase != "total":
                m.phase_duration.labels(phase).observe(seconds)
        for table, count in self.engine.rule_counts().items():
            m.rules.labels(table).set(count)
        written = {t.table: t.rules_added for t in report.plan.tables}
        for table in ("filter", "nat"):
            m.rules_last.labels(table).set(written.get(table, 0))
        for policy, count in self.engine.no_local_endpoints().items():
            m.no_local_endpoints.labels(policy).set(count)
        now = datetime.fromtimestamp(self.clock.time(), UTC)
        for stamp in self._triggers:
            m.network_programming.observe(max(0.0, (now - stamp).total_seconds()))
        self._triggers.clear()
        for chain in report.drifted:
            table = chain.split("/", 1)[0]
            m.drift.labels(table).inc()
            log.warning("drift: %s was changed outside iptsync; repaired", chain)
        if first:
            # One line, said also when the node already held every rule (a restart): the
            # operator waiting for the agent to come up learns that it has.
            counts = self.engine.rule_counts()
            log.info("first full sync done in %.2fs: %d services (%d rendered), %s rules; %s",
                     total, len(self.engine.state.services), report.services_rendered,
                     ", ".join(f"{table} {counts[table]}" for table in sorted(counts)),
                     report.outcome("nothing needed changing"))
        else:
            level = logging.INFO if not report.plan.empty or report.drifted else logging.DEBUG
            log.log(level, "%s", report.line())
        self.reports = [*self.reports[-9:], report]


def health_check_ports(state: ClusterState, node_name: str) -> dict[int, ServiceHealth]:
    """Health check node port -> its service and local ready endpoint count."""
    owners: dict[int, tuple[str, str]] = {}
    local: dict[int, set[str]] = {}
    for port in state.service_ports():
        if not port.health_check_node_port or not port.external_policy_local:
            continue
        owners[port.health_check_node_port] = port.name.service
        local.setdefault(port.health_check_node_port, set()).update(
            ep.address for ep in state.endpoints(port) if ep.ready and is_local(ep, node_name))
    return {hc: ServiceHealth(*owners[hc], len(local[hc])) for hc in owners}
