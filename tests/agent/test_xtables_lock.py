"""The agent's loop never hangs on the xtables lock: a held lock is a failed sync, retried.

iptables-legacy 1.8.9 without ``-w`` waits for a held xtables lock without limit; the
canary check and the chain reads of partial syncs list chains with ``iptables -S``. Another
program (the ``xtables_lock`` fixture: ``flock`` on a private lock file) holds the lock for
longer than the agent waits; the agent must give up within its bound, say so, keep turning
and converge once the lock is free. nft takes no xtables lock.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from engine.world import SETTINGS
from lockholder import HoldLock

from iptsync.agent.health import HealthState
from iptsync.agent.loop import Agent, Timing
from iptsync.core import names
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Backend, Netfilter, XtablesLockError
from iptsync.sources.base import Change, Sink, Snapshot, SourceStatus

from .test_loop import ScriptedSource
from .test_run_command import endpoint_slice, service
from .waiting import eventually

pytestmark = pytest.mark.netns

BOUND = 1  # seconds the agent waits for the lock (lock_wait_seconds)
HELD = 4  # seconds the other program holds it


@pytest.mark.parametrize("backend", list(Backend), ids=lambda b: b.value)
def test_canary_check_gives_up_on_a_held_lock_within_the_bound(
        netns: str, backend: Backend, xtables_lock: HoldLock) -> None:
    """Listing the canary chain while another program holds the lock raises XtablesLockError
    after lock_wait_seconds on legacy (it is not reported missing); nft answers at once."""
    netfilter = Netfilter(backend, netns, lock_wait_seconds=BOUND)
    netfilter.restore(f"*filter\n:{names.KUBE_PROXY_CANARY} - [0:0]\nCOMMIT\n")
    with xtables_lock(HELD):
        started = time.monotonic()
        if backend is Backend.LEGACY:
            with pytest.raises(XtablesLockError):
                netfilter.chain_exists("filter", names.KUBE_PROXY_CANARY)
        else:
            assert netfilter.chain_exists("filter", names.KUBE_PROXY_CANARY)
        took = time.monotonic() - started
    assert took < BOUND + 0.5


def test_agent_keeps_going_while_the_lock_is_held_and_converges_after(
        netns: str, xtables_lock: HoldLock, caplog: pytest.LogCaptureFixture) -> None:
    """With the lock held for longer than the agent waits, the canary check fails within the
    bound as a failed sync (logged, counted), the loop keeps turning, and a service added
    meanwhile is programmed once the lock is free."""
    netfilter = Netfilter(Backend.LEGACY, netns, lock_wait_seconds=BOUND)
    engine = Engine(netfilter, SETTINGS)
    source = ScriptedSource([service("web", "10.96.0.50"), endpoint_slice("web", "10.0.1.10")])
    agent = Agent(engine, [source], timing=Timing(min_sync_period=0.2, sync_period=600,
                                                  canary_interval=0.3))
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        eventually(lambda: engine.synced_once)
        with xtables_lock(HELD):
            held = time.monotonic()
            eventually(lambda: any(r.getMessage().startswith("the canary check failed")
                                   for r in caplog.records), timeout=BOUND + 1.5)
            failed_after = time.monotonic() - held
            agent.queue.put(Change("Service", "upsert", service("api", "10.96.0.60")))
            agent.queue.put(Change("EndpointSlice", "upsert",
                                   endpoint_slice("api", "10.0.1.11")))
            time.sleep(HELD - 1.5)
            assert thread.is_alive()
            assert agent.metrics.registry.get_sample_value(
                "iptsync_syncs_total",
                {"kind": "full", "result": "failure", "ip_family": "IPv4"}) >= 1
        api = names.svc_chain("default/api:http", "tcp")
        eventually(lambda: api in netfilter.save(["nat"])["nat"].chains, timeout=10)
    finally:
        agent.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert failed_after < 0.3 + BOUND + 1.0  # a canary interval, the bound, some slack
    record = next(r for r in caplog.records
                  if r.getMessage().startswith("the canary check failed"))
    assert logging.ERROR == record.levelno
    assert "xtables lock" in record.getMessage()
    assert 0 == (agent.metrics.registry.get_sample_value("iptsync_canary_missing_total",
                                                         {"ip_family": "IPv4"}) or 0)


class Feed:
    """A source that lists every kind at start and hands its sink to the test."""

    def __init__(self, *snapshots: Snapshot) -> None:
        self.snapshots = snapshots
        self.status = SourceStatus(connected=True)
        self.sink: Sink | None = None

    def start(self, sink: Sink) -> None:
        self.sink = sink
        for snapshot in self.snapshots:
            sink(snapshot)

    def stop(self) -> None:
        pass


def test_healthz_turns_unhealthy_while_the_loop_is_stuck(
        netns: str, xtables_lock: HoldLock) -> None:
    """A change that arrives while the loop is stuck in a sync (here: waiting up to 10 s for
    the xtables lock) turns /healthz unhealthy after its timeout, and healthy again once the
    change is synced (it used to stay healthy: the loop had not read the change yet)."""
    netfilter = Netfilter(Backend.LEGACY, netns, lock_wait_seconds=10)
    engine = Engine(netfilter, SETTINGS)
    source = Feed(Snapshot("Service", (service("web", "10.96.0.50"),)),
                  Snapshot("EndpointSlice", (endpoint_slice("web", "10.0.1.10"),)),
                  Snapshot("Node", ()))
    agent = Agent(engine, [source], timing=Timing(min_sync_period=0.2, sync_period=600,
                                                  canary_interval=0.3),
                  health=HealthState(timeout=1.0))
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        eventually(lambda: engine.synced_once and agent.health.healthy())
        with xtables_lock(HELD):
            time.sleep(0.5)  # the canary check is waiting for the lock by now
            assert source.sink is not None
            source.sink(Change("Service", "upsert", service("api", "10.96.0.60")))
            source.sink(Change("EndpointSlice", "upsert", endpoint_slice("api", "10.0.1.11")))
            eventually(lambda: not agent.health.healthy(), timeout=2.0)
        eventually(agent.health.healthy, timeout=10)
    finally:
        agent.stop()
        thread.join(timeout=30)
    assert names.svc_chain("default/api:http", "tcp") in netfilter.save(["nat"])["nat"].chains
    assert not thread.is_alive()
