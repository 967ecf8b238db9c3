"""Incremental syncs: after any series of changes, the kernel holds exactly a full sync.

Every test runs against the fake kernel (no root) and the real one on both backends (the
``kernel`` fixture), with the same body.

Conventions: node ``node1`` (10.100.0.2), pods in 10.0.0.0/14, cluster IPs 10.96.0.x, one
LoadBalancer IP per service in 203.0.113.x. Services come from a small pool so that changes
hit the same services again and again (add, delete, scale, readiness, type, traffic policy,
ports). Each example starts from an empty namespace, syncs the first state in full, then
applies changes with partial syncs and compares every chain we own with what a fresh full
render of the final state gives: in order, except the services' rules within a top-level chain
(a partial sync inserts them at the chain's head; their order does not matter), whose fixed
head and tail (the NodePort jump) must still be in place.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.world import (
    POOL,
    SETTINGS,
    World,
    assert_holds_full_sync,
    endpoint_slice,
    owned,
    service,
)
from iptsync.core import names
from iptsync.core.flows import Flow
from iptsync.engine.reconciler import Engine
from iptsync.kernel.port import NetfilterPort
from iptsync.testing import FakeConntrack, FakeNetfilter

# Examples of the property per kernel: the fake takes milliseconds per example, the real
# kernel a second or so.
EXAMPLES = {True: 300, False: 25}

services = st.builds(service, st.integers(0, POOL - 1),
                     st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]), st.booleans(),
                     st.integers(1, 2))
slices = st.builds(endpoint_slice, st.integers(0, POOL - 1),
                   st.lists(st.tuples(st.integers(0, 6), st.booleans(), st.booleans()),
                            max_size=5, unique_by=lambda e: e[0]))
deletions = st.tuples(st.sampled_from(["Service", "EndpointSlice"]), st.integers(0, POOL - 1))
changes = st.one_of(services, slices, deletions)


def flush(netfilter: NetfilterPort) -> None:
    netfilter.restore("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
                      ":OUTPUT ACCEPT [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n"
                      ":INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
                      "COMMIT\n", noflush=False)


def synced(kernel: NetfilterPort, kind: str, count: int) -> tuple[World, Engine]:
    """``count`` services of ``kind`` (``s0`` on), one port and one ready endpoint each, synced
    in full."""
    world = World()
    engine = Engine(kernel, SETTINGS)
    for index in range(count):
        world.apply(engine, service(index, kind, False, 1))
        world.apply(engine, endpoint_slice(index, [(0, True, False)]))
    engine.sync()
    return world, engine


def test_partial_syncs_equal_a_full_sync(kernel: NetfilterPort) -> None:
    """Any series of partial syncs leaves the kernel holding what one full sync writes."""

    @settings(max_examples=EXAMPLES[isinstance(kernel, FakeNetfilter)], deadline=None)
    @given(initial=st.lists(changes, max_size=6),
           steps=st.lists(st.lists(changes, min_size=1, max_size=3), min_size=1, max_size=6))
    def partial_syncs_equal_a_full_sync(initial: list[Any], steps: list[list[Any]]) -> None:
        flush(kernel)
        world = World()
        engine = Engine(kernel, SETTINGS)
        for change in initial:
            world.apply(engine, change)
        assert engine.sync().full
        for step in steps:
            for change in step:
                world.apply(engine, change)
            report = engine.sync()
            assert not report.full
        assert_holds_full_sync(list(world.objects.values()), kernel)
        # And a full sync now finds nothing to repair.
        final = engine.sync(full=True)
        assert [] == final.drifted
        assert final.plan.empty

    partial_syncs_equal_a_full_sync()


def test_removed_rule_is_reported_as_drift_and_repaired(kernel: NetfilterPort) -> None:
    """A full sync names the chain someone else changed and puts our rules back."""
    world = World()
    engine = Engine(kernel, SETTINGS)
    world.apply(engine, service(1, "NodePort", False, 1))
    world.apply(engine, endpoint_slice(1, [(0, True, True), (1, True, False)]))
    engine.sync()
    svc = names.svc_chain("default/s1:p0", "tcp")
    kernel.run("-t", "nat", "-D", svc, "1")
    report = engine.sync(full=True)
    assert [f"nat/{svc}"] == report.drifted
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_partial_sync_of_an_endpoint_change_writes_only_that_service(
        kernel: NetfilterPort) -> None:
    """Scaling one service rewrites its own chains and no top-level chain."""
    world, engine = synced(kernel, "NodePort", 3)
    world.apply(engine, endpoint_slice(2, [(0, True, False), (1, True, False)]))
    report = engine.sync()
    [nat] = report.plan.tables
    assert {names.svc_chain("default/s2:p0", "tcp")} == set(nat.written) - set(nat.created)
    assert 0 == nat.top_rules
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_failed_partial_sync_is_followed_by_a_full_one(kernel: NetfilterPort) -> None:
    """When the kernel lost a rule the partial sync deletes, the batch fails and the next
    sync compares everything and converges."""
    world, engine = synced(kernel, "ClusterIP", 1)
    kernel.run("-t", "nat", "-F", names.KUBE_SERVICES)
    world.apply(engine, endpoint_slice(0, []))  # its cluster IP rule goes: -D fails
    with pytest.raises(Exception, match="iptables-restore failed"):
        engine.sync()
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_sync_never_touches_foreign_rules(kernel: NetfilterPort) -> None:
    """Rules of other programs in the same chains survive partial and full syncs."""
    kernel.run("-t", "nat", "-A", "PREROUTING", "-s", "192.0.2.1", "-j", "ACCEPT")
    world = World()
    engine = Engine(kernel, SETTINGS)
    world.apply(engine, service(0, "NodePort", True, 2))
    engine.sync()
    world.apply(engine, endpoint_slice(0, [(0, True, True)]))
    engine.sync()
    assert "-s 192.0.2.1/32 -j ACCEPT" in kernel.save()["nat"].chains["PREROUTING"]


def test_new_service_rules_go_to_the_head_and_the_nodeport_jump_stays_last(
        kernel: NetfilterPort) -> None:
    """A partial sync inserts a new service's top-level rules at position 1 (no positional
    lookup in a long chain); KUBE-SERVICES still ends with the NodePort jump, and the next full
    sync finds nothing to rewrite."""
    world, engine = synced(kernel, "NodePort", 2)
    world.apply(engine, service(4, "NodePort", False, 1))
    world.apply(engine, endpoint_slice(4, [(0, True, False)]))
    report = engine.sync()
    [nat] = report.plan.tables
    inserts = {tuple(line.split()[:3]) for line in nat.rule_lines if line.startswith("-I")}
    assert {("-I", names.KUBE_SERVICES, "1"), ("-I", names.KUBE_NODEPORTS, "1")} == inserts
    live = owned(kernel)["nat"][names.KUBE_SERVICES]
    assert "default/s4:p0 cluster IP" in live[0]
    assert live[-1].endswith(f"-j {names.KUBE_NODEPORTS}")
    assert engine.sync(full=True).plan.empty


STALE_SVC, STALE_SEP, PINNED_SEP = ("KUBE-SVC-STALESTALESTALE1", "KUBE-SEP-STALESTALESTALE2",
                                    "KUBE-SEP-PINNEDPINNEDPINN3")


def test_stale_service_chains_are_deleted_unless_a_foreign_rule_jumps_there(
        kernel: NetfilterPort) -> None:
    """A deleted service's chains go with the partial sync that deletes it; service chains
    left by someone else (a previous proxier) go with the next full sync, except one that a
    foreign rule still jumps to, which stays until that rule is gone."""
    world, engine = synced(kernel, "ClusterIP", 2)
    kernel.restore([
        "*nat", f":{STALE_SVC} - [0:0]", f":{STALE_SEP} - [0:0]", f":{PINNED_SEP} - [0:0]",
        ":MY-NAT - [0:0]", f"-A {STALE_SVC} -j {STALE_SEP}",
        f"-A {STALE_SEP} -p tcp -j DNAT --to-destination 10.0.9.9:80",
        f"-A MY-NAT -j {PINNED_SEP}", "COMMIT"])
    gone = names.svc_chain("default/s1:p0", "tcp")
    world.apply(engine, ("Service", 1))
    partial = engine.sync()
    [nat] = partial.plan.tables
    assert [gone] == [c for c in nat.deleted if c.startswith("KUBE-SVC-")]
    assert gone not in owned(kernel)["nat"]
    full = engine.sync(full=True)
    [nat] = full.plan.tables
    assert {STALE_SVC, STALE_SEP} == set(nat.deleted)
    chains = kernel.save()["nat"].chains
    assert (False, False, True) == (STALE_SVC in chains, STALE_SEP in chains,
                                    PINNED_SEP in chains)
    kernel.run("-t", "nat", "-F", "MY-NAT")  # once nothing jumps there, it goes too
    assert [PINNED_SEP] == engine.sync(full=True).plan.tables[0].deleted
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_stale_udp_flows_are_cleared_for_the_services_a_sync_changed(
        kernel: NetfilterPort) -> None:
    """After a partial sync, conntrack entries to a changed UDP service that no longer reach
    one of its endpoints are deleted, and only that service's destinations are examined; a
    full sync examines every service."""
    udp, cluster_ip = 17, "10.96.0.10"  # s0's port p1: UDP 81 -> 8081
    kept = Flow(udp, cluster_ip, 81, "10.0.0.2", 8081)
    doomed = Flow(udp, cluster_ip, 81, "10.0.0.1", 8081)
    elsewhere = Flow(udp, "10.96.0.11", 81, "10.0.1.1", 8081)  # s1, whose endpoints stay
    flows = FakeConntrack([kept, doomed, elsewhere])
    world = World()
    engine = Engine(kernel, SETTINGS, flows=flows)
    for index in range(2):
        world.apply(engine, service(index, "ClusterIP", False, 2))
    world.apply(engine, endpoint_slice(0, [(0, True, False), (1, True, False)]))
    world.apply(engine, endpoint_slice(1, [(0, True, False)]))
    first = engine.sync()
    assert (0, 3) == (first.stale_flows, len(flows.flows))
    world.apply(engine, endpoint_slice(0, [(1, True, False)]))
    partial = engine.sync()
    assert 1 == partial.stale_flows
    assert [kept, elsewhere] == flows.flows
    assert {(cluster_ip, 81): frozenset({"10.0.0.2"})} == flows.calls[-1].services
    full = engine.sync(full=True)
    assert (0, {cluster_ip, "10.96.0.11"}) == (
        full.stale_flows, {address for address, _port in flows.calls[-1].services})
    assert [kept, elsewhere] == flows.flows
