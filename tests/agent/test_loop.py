"""The agent's loop in simulated time: when it syncs, what kind of sync, and what it repairs.

The loop runs on :class:`iptsync.testing.FakeClock`: waiting advances the time to the next
scheduled event (a watch event, someone damaging the rules, the end of the test) instead of
sleeping, so a minute of the agent's life takes milliseconds plus the syncs themselves. Each
test runs on the fake kernel and on the real one on both backends (the ``kernel`` fixture).

Conventions as in tests/engine (engine.world): node ``node1``, pods in 10.0.0.0/14, services
``s0``..``s4``. Timings: min sync period 1 s; sync period and canary interval as each test
needs. Times below are seconds after the agent started (:data:`START`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import pytest
from engine.world import SETTINGS, World, assert_holds_full_sync, endpoint_slice, service

from iptsync.agent.loop import Agent, Timing
from iptsync.core import names
from iptsync.engine.reconciler import Engine, EngineReport
from iptsync.kernel.port import NetfilterPort
from iptsync.sources.base import KINDS, Change, Kind, Sink, Snapshot, SourceStatus
from iptsync.testing import FakeClock, FakeNetfilter

START = 1000.0


class ScriptedSource:
    """Lists ``objects`` (of the ``kinds`` given) when started; later the test sends watch
    events through :meth:`upsert`."""

    def __init__(self, objects: Iterable[dict[str, Any]], kinds: Iterable[Kind] = KINDS) -> None:
        self.objects = list(objects)
        self.kinds = tuple(kinds)
        self.status = SourceStatus(connected=True)
        self.sink: Sink | None = None

    def start(self, sink: Sink) -> None:
        self.sink = sink
        for kind in self.kinds:
            sink(Snapshot(kind, tuple(o for o in self.objects if o["kind"] == kind)))

    def stop(self) -> None:
        pass

    def upsert(self, obj: dict[str, Any]) -> None:
        assert self.sink is not None
        self.sink(Change(obj["kind"], "upsert", obj))


class TimedEngine(Engine):
    """The engine, noting each sync attempt: (seconds after START, full or partial, ok)."""

    def __init__(self, kernel: NetfilterPort, clock: FakeClock) -> None:
        super().__init__(kernel, SETTINGS)
        self.fake_clock = clock
        self.attempts: list[tuple[float, str, bool]] = []

    def sync(self, *, full: bool = False) -> EngineReport:
        kind = "full" if full or self.needs_full else "partial"
        when = round(self.fake_clock.now - START, 3)
        try:
            report = super().sync(full=full)
        except Exception:
            self.attempts.append((when, kind, False))
            raise
        self.attempts.append((when, kind, True))
        return report


class Loop:
    """An agent for node1 over ``kernel``, with two services listed, in simulated time."""

    def __init__(self, kernel: NetfilterPort, *, sync_period: float = 600.0,
                 canary_interval: float = 600.0, kinds: Iterable[Kind] = KINDS) -> None:
        self.kernel = kernel
        self.clock = FakeClock(START)
        self.world = World()
        self.engine = TimedEngine(kernel, self.clock)
        for index in range(2):
            self.world.apply(self.engine, service(index, "NodePort", False, 1))
            self.world.apply(self.engine, endpoint_slice(index, [(0, True, False)]))
        self.engine = TimedEngine(kernel, self.clock)  # the objects come from the source
        self.source = ScriptedSource(self.world.objects.values(), kinds)
        self.agent = Agent(self.engine, [self.source], clock=self.clock,
                           timing=Timing(min_sync_period=1.0, sync_period=sync_period,
                                         canary_interval=canary_interval))

    def at(self, seconds: float, action: Any) -> None:
        self.clock.call_at(START + seconds, action)

    def change(self, seconds: float, obj: dict[str, Any]) -> None:
        """A watch event at ``seconds``."""
        def send() -> None:
            self.world.objects[(obj["kind"], obj["metadata"]["name"])] = obj
            self.source.upsert(obj)
        self.at(seconds, send)

    def run_until(self, seconds: float) -> None:
        self.at(seconds, self.agent.stop)
        self.agent.run()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """``name``'s value with ``labels`` (this IPv4 node's family unless said otherwise)."""
        wanted = {"ip_family": "IPv4", **(labels or {})}
        return self.agent.metrics.registry.get_sample_value(name, wanted) or 0.0

    def assert_converged(self) -> None:
        assert_holds_full_sync(list(self.world.objects.values()), self.kernel)


def test_nothing_is_written_before_every_kind_is_listed(kernel: NetfilterPort) -> None:
    """With Services and Nodes listed but EndpointSlices not yet, the agent leaves the kernel
    alone, however long it waits; it waits for messages a second at a time, not spinning."""
    loop = Loop(kernel, sync_period=5.0, canary_interval=1.0, kinds=("Service", "Node"))
    loop.agent.run(iterations=30)
    assert 29.0 == loop.clock.now - START  # the first turn takes the lists, queued at start
    assert [] == loop.engine.attempts
    assert not kernel.chain_exists("nat", names.KUBE_SERVICES)


def test_first_sync_is_full_and_immediate(kernel: NetfilterPort) -> None:
    """Once every kind is listed the agent syncs in full at once, and then not again while
    nothing changes before the sync period."""
    loop = Loop(kernel, sync_period=60.0, canary_interval=5.0)
    loop.run_until(50.0)
    assert [(0.0, "full", True)] == loop.engine.attempts
    loop.assert_converged()


def test_first_full_sync_is_logged_also_when_nothing_needed_changing(
        kernel: NetfilterPort, caplog: pytest.LogCaptureFixture) -> None:
    """The agent says at INFO when its first full sync is done, with counts and duration:
    after writing the rules, and after a restart that found every rule in place."""
    caplog.set_level(logging.INFO, logger="iptsync")
    said = []
    for _start in ("first", "restart"):
        Loop(kernel).run_until(1.0)
        said += [r for r in caplog.records if r.getMessage().startswith("first full sync")]
        caplog.clear()
    [first, restart] = said
    assert {logging.INFO} == {first.levelno, restart.levelno}
    pattern = (r"first full sync done in [\d.]+s: 2 services \(2 rendered\), filter \d+, "
               r"nat \d+ rules; (.*); stale flows cleared: 0; .*total=[\d.]+ms")
    [first_changes] = re.fullmatch(pattern, first.getMessage()).groups()  # type: ignore[union-attr]
    [restart_changes] = re.fullmatch(pattern, restart.getMessage()).groups()  # type: ignore[union-attr]
    assert "chains written" in first_changes
    assert "nothing needed changing" == restart_changes


def test_a_change_after_quiet_is_synced_at_once_and_a_burst_is_coalesced(
        kernel: NetfilterPort) -> None:
    """A change after a quiet period is written at once (partially); the changes that follow
    within the min sync period are written together when it has passed."""
    loop = Loop(kernel)
    loop.change(10.0, endpoint_slice(0, [(0, True, False), (1, True, False)]))
    loop.change(10.2, endpoint_slice(1, [(2, True, False)]))
    loop.change(10.4, service(2, "ClusterIP", False, 1))
    loop.change(10.6, endpoint_slice(2, [(0, True, False)]))
    loop.run_until(20.0)
    assert [(0.0, "full", True), (10.0, "partial", True),
            (11.0, "partial", True)] == loop.engine.attempts
    loop.assert_converged()


def test_full_sync_every_sync_period(kernel: NetfilterPort) -> None:
    """Without any change the agent still compares everything once per sync period."""
    loop = Loop(kernel, sync_period=30.0)
    loop.run_until(95.0)
    assert [(0.0, "full", True), (30.0, "full", True), (60.0, "full", True),
            (90.0, "full", True)] == loop.engine.attempts


def test_missing_canary_brings_a_full_sync_at_the_next_check(kernel: NetfilterPort) -> None:
    """Someone flushing the nat table (canary chain gone) gets every rule back at the next
    canary check, long before the sync period; the metric counts it."""
    loop = Loop(kernel, canary_interval=5.0)

    def flush_nat() -> None:
        kernel.run("-t", "nat", "-F")
        kernel.run("-t", "nat", "-X")
    loop.at(12.0, flush_nat)
    loop.run_until(30.0)
    assert [(0.0, "full", True), (15.0, "full", True)] == loop.engine.attempts
    assert 1 == loop.metric("iptsync_canary_missing_total")
    loop.assert_converged()


def test_failed_sync_is_retried_in_full_after_the_retry_delay(
        kernel: NetfilterPort, caplog: pytest.LogCaptureFixture) -> None:
    """A partial sync the kernel rejects (a rule it deletes is gone) is retried one retry
    delay later as a full sync, which converges; the failure is counted and logged."""
    loop = Loop(kernel)
    loop.at(9.0, lambda: kernel.run("-t", "nat", "-F", names.KUBE_SERVICES))
    loop.change(10.0, endpoint_slice(0, []))  # its cluster IP rule goes: the -D fails
    loop.run_until(20.0)
    assert [(0.0, "full", True), (10.0, "partial", False),
            (11.0, "full", True)] == loop.engine.attempts
    assert 1 == loop.metric("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total")
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
               and r.name == "iptsync.agent.loop"]
    assert error.startswith("partial sync failed, the previous rules are in place; retrying "
                            "in full in 1.0s")
    loop.assert_converged()


def test_drift_is_repaired_by_the_periodic_full_sync_and_counted(
        kernel: NetfilterPort) -> None:
    """A rule removed from one of our chains behind the agent's back is put back by the next
    periodic full sync, which counts drift in its table."""
    loop = Loop(kernel, sync_period=30.0)
    svc = names.svc_chain("default/s1:p0", "tcp")
    loop.at(5.0, lambda: kernel.run("-t", "nat", "-D", svc, "2"))
    loop.run_until(40.0)
    assert [(0.0, "full", True), (30.0, "full", True)] == loop.engine.attempts
    assert 1 == loop.metric("iptsync_drift_repairs_total", {"table": "nat"})
    loop.assert_converged()


def test_injected_failure_is_retried_and_converges() -> None:
    """A batch the (fake) kernel rejects at its nat table leaves the agent retrying in full
    one retry delay later; the retry converges."""
    kernel = FakeNetfilter()
    loop = Loop(kernel)
    loop.at(9.0, lambda: kernel.fail_restore(table="nat"))
    loop.change(10.0, endpoint_slice(0, [(3, True, False)]))
    loop.run_until(20.0)
    assert [(0.0, "full", True), (10.0, "partial", False),
            (11.0, "full", True)] == loop.engine.attempts
    loop.assert_converged()


def test_node_eligibility_follows_the_node_object() -> None:
    """Without any Node object the node counts as eligible; the autoscaler's taint makes it
    ineligible, its removal eligible again, and the Node's deletion ineligible."""
    loop = Loop(FakeNetfilter())
    seen: list[tuple[float, bool]] = []

    def record() -> None:
        seen.append((loop.clock.now - START, loop.agent.health.node_eligible))

    def node(*taints: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": SETTINGS.node_name},
                "spec": {"taints": [{"key": key, "effect": "NoSchedule"} for key in taints]}}

    def delete() -> None:
        assert loop.source.sink is not None
        loop.source.sink(Change("Node", "delete", node()))

    for seconds, action in ((1.0, record), (3.0, record), (4.0, record), (5.0, record)):
        loop.at(seconds, action)
    loop.change(2.0, node("ToBeDeletedByClusterAutoscaler"))
    loop.change(3.5, node("example.com/other"))
    loop.at(4.5, delete)
    loop.run_until(6.0)
    assert [(1.0, True), (3.0, False), (4.0, True), (5.0, False)] == seen
