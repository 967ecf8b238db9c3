"""Full syncs streamed to iptables-restore while rendering (the legacy backend's default).

Conventions as in test_incremental: node ``node1``, pods in 10.0.0.0/14, services from a pool
of five. Both backends run both strategies, so the streamed batch is checked against the
kernel on nft too, and so does the fake kernel.
"""

from __future__ import annotations

import pytest
from lockholder import HoldLock

from engine.world import (
    SETTINGS,
    World,
    assert_holds_full_sync,
    endpoint_slice,
    owned,
    service,
)
from iptsync.core import names
from iptsync.core.plan import Plan, TablePlan
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter, XtablesLockError
from iptsync.kernel.port import Backend, NetfilterPort


def cluster(world: World, engine: Engine, count: int) -> None:
    for index in range(count):
        world.apply(engine, service(index, "LoadBalancer" if index % 2 else "NodePort",
                                    index == 3, 2))
        world.apply(engine, endpoint_slice(index, [(0, True, True), (1, True, False)]))


def test_streamed_full_syncs_write_what_a_planned_one_does(kernel: NetfilterPort) -> None:
    """A first sync, a full resync after changes (a service gone: its chains deleted) and a
    no-op resync, all streamed, leave the kernel as a full render says."""
    world = World()
    engine = Engine(kernel, SETTINGS, stream_full=True)
    cluster(world, engine, 4)
    first = engine.sync()
    assert first.full
    assert 4 == first.services_rendered
    assert_holds_full_sync(list(world.objects.values()), kernel)
    gone = names.svc_chain("default/s1:p0", "tcp")
    assert gone in owned(kernel)["nat"]
    world.apply(engine, ("Service", 1))
    world.apply(engine, endpoint_slice(2, []))  # its REJECT rules go to filter
    again = engine.sync(full=True)
    [nat, filt] = again.plan.tables
    assert ("nat", "filter") == (nat.table, filt.table)  # nat streams first
    assert gone in nat.deleted
    assert [] == again.drifted
    assert_holds_full_sync(list(world.objects.values()), kernel)
    assert gone not in owned(kernel)["nat"]
    assert engine.sync(full=True).plan.empty


@pytest.mark.netns
def test_streamed_sync_that_cannot_take_the_lock_changes_nothing(
        netns: str, xtables_lock: HoldLock) -> None:
    """A streamed batch that fails (here: the xtables lock, which only legacy takes, stays
    held) commits nothing; the next sync is full and converges."""
    netfilter = Netfilter(Backend.LEGACY, netns, lock_wait_seconds=1)
    world = World()
    engine = Engine(netfilter, SETTINGS, stream_full=True)
    cluster(world, engine, 2)
    engine.sync()
    before = owned(netfilter)
    world.apply(engine, endpoint_slice(0, []))
    with xtables_lock(3), pytest.raises(XtablesLockError):
        engine.sync(full=True)
    assert before == owned(netfilter)
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), netfilter)


def test_failure_after_a_streamed_nat_undoes_nat() -> None:
    """Streamed tables count the lines they sent: a failure in filter (after nat's COMMIT)
    undoes nat, a failure in nat undoes nothing."""
    nat, filt = TablePlan("nat", written=["A"]), TablePlan("filter", written=["B"])
    nat.streamed_lines = 100
    filt.chain_lines.append(":B - [0:0]")
    plan = Plan([nat, filt])
    assert [] == plan.committed_before(99)
    assert ["nat"] == [t.table for t in plan.committed_before(101)]


def test_streamed_sync_failing_mid_render_keeps_the_cache_whole(
        netns: str, xtables_lock: HoldLock) -> None:
    """A streamed full sync that fails while it still renders (its first 4,000-line chunk
    meets a held xtables lock) keeps the rendered services and the top-level chains in step:
    the next sync converges (s0, rendered before the failure, had lost its endpoints; its old
    KUBE-SERVICES rule used to stay in the cache and fail every later sync)."""
    netfilter = Netfilter(Backend.LEGACY, netns, lock_wait_seconds=1)
    world = World()
    engine = Engine(netfilter, SETTINGS, stream_full=True)
    count = 200
    cluster(world, engine, count)
    engine.sync()
    world.apply(engine, endpoint_slice(0, []))
    for index in range(1, count):  # every service changes: enough lines for a chunk
        world.apply(engine, endpoint_slice(index, [(ip, True, ip % 2 == 0)
                                                   for ip in range(2, 8)]))
    with xtables_lock(3), pytest.raises(XtablesLockError):
        engine.sync(full=True)
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), netfilter)
