"""Which conntrack flows are stale: kube-proxy's reconciler (pkg/proxy/conntrack/cleanup.go),
decided without a kernel. Flows to any serving endpoint are kept, wherever this node would
send new traffic; flows to endpoints that no longer serve at all are deleted.
"""

from __future__ import annotations

from typing import Any

import pytest

from conntrack.objects import (
    CLUSTER_IP,
    EXTERNAL_IP,
    NODE_PORT,
    PORT,
    TARGET_PORT,
    dns_service,
    dns_slice,
    endpoint,
    node,
    pod_ip,
    settings,
)
from iptsync.core.flows import UDP, Flow, FlowQuery, FlowTargets, flow_queries, flow_targets, stale
from iptsync.core.model import IPFamily
from iptsync.engine.reconciler import Engine
from iptsync.testing import FakeConntrack, FakeNetfilter

FAMILIES = pytest.mark.parametrize("family", list(IPFamily), ids=lambda f: f.value)


def targets(family: IPFamily, *objects: dict[str, Any]) -> FlowTargets:
    engine = Engine(None, settings(family))
    for obj in objects:
        engine.upsert(obj)
    return flow_targets(engine.state, engine.settings)


def to_cluster_ip(family: IPFamily, reply_src: str) -> Flow:
    return Flow(UDP, CLUSTER_IP[family], PORT, reply_src, TARGET_PORT)


@FAMILIES
def test_a_flow_to_a_terminating_but_serving_endpoint_is_kept(family: IPFamily) -> None:
    """A terminating endpoint that still serves keeps its flows, even while ready endpoints
    take every new connection; one that stopped serving loses them."""
    found = targets(family, dns_service(family), dns_slice(
        family, endpoint(family, 1), endpoint(family, 2, ready=False, serving=True,
                                              terminating=True),
        endpoint(family, 3, ready=False, serving=False, terminating=True)))
    assert [False, False, True] == [stale(to_cluster_ip(family, pod_ip(family, i)), found)
                                    for i in (1, 2, 3)]


@FAMILIES
def test_flows_to_endpoints_this_node_does_not_choose_are_kept(family: IPFamily) -> None:
    """Endpoints outside this node's zone (topology hints) and, under
    externalTrafficPolicy=Local, on other nodes still serve: their flows are kept."""
    found = targets(family, node("a"), dns_service(family, external_policy="Local"), dns_slice(
        family, endpoint(family, 1, hints=("a",)),
        endpoint(family, 2, node="node2", hints=("b",))))
    for address in (CLUSTER_IP[family], EXTERNAL_IP[family]):
        flow = Flow(UDP, address, PORT, pod_ip(family, 2), TARGET_PORT)
        assert False is stale(flow, found)


@FAMILIES
def test_flows_to_every_destination_of_a_removed_endpoint_are_stale(family: IPFamily) -> None:
    """Flows to the cluster IP, an external IP and the NodePort on any address are stale
    when their reply source is not a serving endpoint; endpoints compare by IP only."""
    found = targets(family, dns_service(family), dns_slice(family, endpoint(family, 1)))
    gone = pod_ip(family, 9)
    assert [True, True, True, True] == [stale(flow, found) for flow in (
        Flow(UDP, CLUSTER_IP[family], PORT, gone, TARGET_PORT),
        Flow(UDP, EXTERNAL_IP[family], PORT, gone, TARGET_PORT),
        Flow(UDP, pod_ip(family, 200), NODE_PORT, gone, TARGET_PORT),
        Flow(UDP, CLUSTER_IP[family], PORT, CLUSTER_IP[family], PORT))]  # never DNATed
    assert False is stale(Flow(UDP, CLUSTER_IP[family], PORT, pod_ip(family, 1), 9999), found)


@FAMILIES
def test_a_service_without_serving_endpoints_keeps_its_flows(family: IPFamily) -> None:
    """With no serving endpoint there is nothing better to send a flow to: nothing is
    examined (kube-proxy skips such a service)."""
    found = targets(family, dns_service(family), dns_slice(
        family, endpoint(family, 1, ready=False, serving=False, terminating=True)))
    assert FlowTargets(family) == found
    assert False is bool(found)


@FAMILIES
def test_only_udp_flows_of_the_engines_family_are_examined(family: IPFamily) -> None:
    """TCP and SCTP services end their own connections: never examined; the other family's
    ports belong to the other family's engine."""
    other = IPFamily.IPV6 if family is IPFamily.IPV4 else IPFamily.IPV4
    for protocol in ("TCP", "SCTP"):
        assert FlowTargets(family) == targets(
            family, dns_service(family, protocol=protocol),
            dns_slice(family, endpoint(family, 1), protocol=protocol))
    assert FlowTargets(family) == targets(family, dns_service(other),
                                          dns_slice(other, endpoint(other, 1)))
    assert False is stale(Flow(6, CLUSTER_IP[family], PORT, pod_ip(family, 9), TARGET_PORT),
                          targets(family, dns_service(family), dns_slice(family,
                                                                         endpoint(family, 1))))


@FAMILIES
def test_the_targets_name_each_destination_with_the_serving_ips(family: IPFamily) -> None:
    """Cluster IP and external IP with the service port, and the NodePort, each lead to
    the IPs of the serving endpoints."""
    serving = frozenset({pod_ip(family, 1), pod_ip(family, 2)})
    expected = FlowTargets(family, {(CLUSTER_IP[family], PORT): serving,
                                    (EXTERNAL_IP[family], PORT): serving},
                           {NODE_PORT: serving})
    assert expected == targets(family, dns_service(family), dns_slice(
        family, endpoint(family, 1),
        endpoint(family, 2, ready=False, serving=True, terminating=True)))


def test_kernel_queries_name_one_address_per_port_else_the_port_alone() -> None:
    """A port with one destination address is asked for by address and port; a port with
    several, a NodePort, or an IPv6 port (by_address=False) by port alone; past the limit,
    every UDP flow at once."""
    ips = frozenset({"10.0.1.1"})
    found = FlowTargets(IPFamily.IPV4, {("10.96.0.10", 53): ips, ("10.96.0.11", 123): ips,
                                        ("198.51.100.1", 123): ips}, {30053: ips})
    assert [FlowQuery(UDP, "10.96.0.10", 53), FlowQuery(UDP, None, 123),
            FlowQuery(UDP, None, 30053)] == flow_queries(found)
    assert [FlowQuery(UDP, None, 53), FlowQuery(UDP, None, 123),
            FlowQuery(UDP, None, 30053)] == flow_queries(found, by_address=False)
    assert [FlowQuery(UDP)] == flow_queries(found, limit=2)


def test_a_partial_sync_asks_by_port_only_for_dnated_and_unanswered_flows() -> None:
    """Where a partial sync cannot name the address, it asks for the port's DNATed flows
    and for those nobody answered, not for the port's other traffic; past the limit, the
    same for every UDP flow."""
    ips = frozenset({"fd00:1::1"})
    found = FlowTargets(IPFamily.IPV6, {("fd00:96::10", 53): ips}, {30053: ips}, partial=True)
    assert [FlowQuery(UDP, None, 53, dnat=True), FlowQuery(UDP, None, 53, dnat=False),
            FlowQuery(UDP, None, 30053, dnat=True), FlowQuery(UDP, None, 30053, dnat=False),
            ] == flow_queries(found, by_address=False)
    assert [FlowQuery(UDP, dnat=True), FlowQuery(UDP, dnat=False)] == flow_queries(
        found, by_address=False, limit=1)
    engine = Engine(None, settings(IPFamily.IPV4))
    assert (False, True) == (flow_targets(engine.state, engine.settings).partial,
                             flow_targets(engine.state, engine.settings, set()).partial)


def test_an_ipv6_engine_hands_its_cleaner_ipv6_targets_only() -> None:
    """A dual-stack service's IPv6 engine asks its cleaner about IPv6 destinations only, and
    the flow to the removed IPv6 endpoint is the one deleted."""
    family = IPFamily.IPV6
    gone = Flow(UDP, CLUSTER_IP[family], PORT, pod_ip(family, 9), TARGET_PORT)
    kept = Flow(UDP, CLUSTER_IP[family], PORT, pod_ip(family, 1), TARGET_PORT)
    cleaner = FakeConntrack([gone, kept])
    engine = Engine(FakeNetfilter(), settings(family), flows=cleaner)
    service = dns_service(family)
    service["spec"] |= {"clusterIPs": [CLUSTER_IP[family], "10.96.0.10"],
                        "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack"}
    for obj in (service, dns_slice(family, endpoint(family, 1)),
                dns_slice(IPFamily.IPV4, endpoint(IPFamily.IPV4, 1))):
        engine.upsert(obj)
    assert 1 == engine.sync().stale_flows
    assert [kept] == cleaner.flows
    assert (family, {CLUSTER_IP[family], EXTERNAL_IP[family]}) == (
        cleaner.calls[-1].family, {address for address, _ in cleaner.calls[-1].services})
