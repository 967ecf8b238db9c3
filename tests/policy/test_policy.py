"""Policy decisions on their own: endpoint categorisation, entry-point targets, per-origin choices.

Conventions: this node is ``node1`` in zone ``a`` with address 10.100.0.2; pods are in
10.0.0.0/14; the service's cluster IP is 10.96.0.10, port 80, NodePort 30080. The golden
files (tests/render) and the tracer comparison (tests/explain) check the same decisions
through the rules; these tests pin each decision directly.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from iptsync.core.model import (
    ZONE_LABEL,
    Endpoint,
    IPFamily,
    NodeInfo,
    Protocol,
    ServicePort,
    ServicePortName,
    object_key,
)
from iptsync.core.policy import (
    Settings,
    categorize_endpoints,
    entry_decisions,
    internal_masquerade,
    port_targets,
)
from iptsync.core.render import render_service_port
from iptsync.core.state import ClusterState

NODE = "node1"
ZONE = "a"
SETTINGS = Settings(node_name=NODE, cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))
CLUSTER_IP = ipaddress.ip_address("10.96.0.10")
PORT = ServicePort(ServicePortName("default", "web", "http"), Protocol.TCP, IPFamily.IPV4,
                   CLUSTER_IP, 80)
NODE_PORT = replace(PORT, node_port=30080)
ETP_LOCAL = replace(NODE_PORT, external_policy_local=True)
ITP_LOCAL = replace(PORT, internal_policy_local=True)


def endpoint(ip: str, node: str = NODE, *, ready: bool = True, serving: bool = True,
             terminating: bool = False, hints: frozenset[str] = frozenset()) -> Endpoint:
    return Endpoint(ipaddress.ip_address(ip), 8080, node_name=node, zone_hints=hints,
                    ready=ready, serving=serving, terminating=terminating)


def keys(endpoints: tuple[Endpoint, ...]) -> list[str]:
    return [ep.key for ep in endpoints]


# --- categorisation --------------------------------------------------------------------------

def test_ready_endpoints_serve_and_unready_ones_do_not() -> None:
    """Cluster-wide, only ready endpoints serve while any is ready."""
    eps = [endpoint("10.0.1.1"), endpoint("10.0.2.1", "node2", ready=False),
           endpoint("10.0.2.2", "node2", ready=False, terminating=True)]
    sets = categorize_endpoints(PORT, eps, NODE, ZONE)
    assert (["10.0.1.1:8080"], ["10.0.1.1:8080"], True) == (
        keys(sets.cluster), keys(sets.reachable), sets.has_any)


def test_terminating_fallback_uses_serving_terminating_endpoints_only() -> None:
    """With none ready, serving terminating endpoints serve; a non-serving one never does."""
    eps = [endpoint("10.0.1.1", ready=False, terminating=True),
           endpoint("10.0.2.1", "node2", ready=False, serving=False, terminating=True)]
    sets = categorize_endpoints(PORT, eps, NODE, ZONE)
    assert (["10.0.1.1:8080"], True) == (keys(sets.cluster), sets.has_any)


def test_local_fallback_is_decided_apart_from_the_cluster_one() -> None:
    """Under externalTrafficPolicy=Local, this node's terminating endpoint serves local
    traffic while another node's ready one serves cluster traffic; both get a SEP chain."""
    eps = [endpoint("10.0.1.1", ready=False, terminating=True), endpoint("10.0.2.1", "node2")]
    sets = categorize_endpoints(ETP_LOCAL, eps, NODE, ZONE)
    assert (["10.0.2.1:8080"], ["10.0.1.1:8080"], ["10.0.1.1:8080", "10.0.2.1:8080"]) == (
        keys(sets.cluster), keys(sets.local), keys(sets.reachable))


def test_zone_hints_narrow_cluster_endpoints_when_every_ready_one_has_hints() -> None:
    """Hints naming this node's zone narrow the cluster endpoints; one unhinted ready
    endpoint, or a node without a zone, turns hints off."""
    hinted = [endpoint("10.0.1.1", hints=frozenset({"a"})),
              endpoint("10.0.2.1", "node2", hints=frozenset({"b"}))]
    narrowed = categorize_endpoints(PORT, hinted, NODE, ZONE)
    unhinted = categorize_endpoints(PORT, [*hinted, endpoint("10.0.3.1", "node3")], NODE, ZONE)
    zoneless = categorize_endpoints(PORT, hinted, NODE, None)
    assert ((["10.0.1.1:8080"], "zone"), (3, ""), (2, "")) == (
        (keys(narrowed.cluster), narrowed.topology), (len(unhinted.cluster), unhinted.topology),
        (len(zoneless.cluster), zoneless.topology))


def test_node_hints_narrow_cluster_endpoints_to_this_node_before_zone_hints() -> None:
    """PreferSameNode: node hints naming this node win over zone hints; with no endpoint
    hinted for this node, or one ready endpoint without node hints, zone hints apply."""
    def hinted(ip: str, node: str, zone: str) -> Endpoint:
        return replace(endpoint(ip, node, hints=frozenset({zone})),
                       node_hints=frozenset({node}))

    eps = [hinted("10.0.1.1", NODE, "a"), hinted("10.0.1.2", "node3", "a"),
           hinted("10.0.2.1", "node2", "b")]
    same_node = categorize_endpoints(PORT, eps, NODE, ZONE)
    elsewhere = categorize_endpoints(PORT, eps[1:], NODE, ZONE)
    partial = categorize_endpoints(PORT, [*eps, endpoint("10.0.1.3", hints=frozenset({"a"}))],
                                   NODE, ZONE)
    assert ((["10.0.1.1:8080"], "node"), (["10.0.1.2:8080"], "zone"),
            (["10.0.1.1:8080", "10.0.1.2:8080", "10.0.1.3:8080"], "zone")) == (
        (keys(same_node.cluster), same_node.topology),
        (keys(elsewhere.cluster), elsewhere.topology),
        (keys(partial.cluster), partial.topology))


def test_internal_local_port_without_external_access_uses_local_endpoints_only() -> None:
    """internalTrafficPolicy=Local on a ClusterIP port: no cluster pool, this node's only."""
    eps = [endpoint("10.0.1.1"), endpoint("10.0.2.1", "node2")]
    sets = categorize_endpoints(ITP_LOCAL, eps, NODE, ZONE)
    assert ([], ["10.0.1.1:8080"], ["10.0.1.1:8080"]) == (
        keys(sets.cluster), keys(sets.local), keys(sets.reachable))


# --- where entry points lead -----------------------------------------------------------------

def test_no_endpoints_rejects_and_no_local_endpoint_drops() -> None:
    """No usable endpoint anywhere: REJECT at every entry; none on this node under a Local
    policy: DROP for that policy's traffic only."""
    elsewhere = [endpoint("10.0.2.1", "node2")]
    none = port_targets(ETP_LOCAL, categorize_endpoints(ETP_LOCAL, [], NODE, ZONE), SETTINGS)
    etp = port_targets(ETP_LOCAL, categorize_endpoints(ETP_LOCAL, elsewhere, NODE, ZONE),
                       SETTINGS)
    itp = port_targets(ITP_LOCAL, categorize_endpoints(ITP_LOCAL, elsewhere, NODE, ZONE),
                       SETTINGS)
    assert (("REJECT", "REJECT"), (None, "DROP"), ("DROP", None)) == (
        (none.internal_block, none.external_block), (etp.internal_block, etp.external_block),
        (itp.internal_block, itp.external_block))


def test_render_writes_the_block_policy_decided() -> None:
    """The renderer's DROP for a Local policy without local endpoints is policy's decision."""
    elsewhere = [endpoint("10.0.2.1", "node2")]
    rules = render_service_port(ETP_LOCAL, elsewhere, SETTINGS, ZONE)
    dropped = [rule.args[-1] for table, rule in rules.top
               if table == "filter" and "--dport" in rule.args
               and rule.args[rule.args.index("--dport") + 1] == "30080"]
    targets = port_targets(ETP_LOCAL, categorize_endpoints(ETP_LOCAL, elsewhere, NODE, ZONE),
                           SETTINGS)
    assert ([targets.external_block], True) == (dropped, rules.no_local_external)


def test_cluster_ip_masquerade_follows_the_flags() -> None:
    """--masquerade-all masquerades all, --cluster-cidr what comes from outside it, and
    without a cluster CIDR nothing is masqueraded."""
    assert ("all", "off-cluster", "none") == (
        internal_masquerade(replace(SETTINGS, masquerade_all=True)),
        internal_masquerade(SETTINGS), internal_masquerade(replace(SETTINGS, cluster_cidrs=())))


# --- per entry point and origin --------------------------------------------------------------

def test_cluster_ip_keeps_pod_sources_and_masquerades_the_rest() -> None:
    """Cluster IP traffic from a pod keeps its source; from the node or outside it is
    masqueraded; every origin gets the same cluster-wide endpoints."""
    eps = [endpoint("10.0.1.1"), endpoint("10.0.2.1", "node2")]
    cluster_ip = entry_decisions(PORT, eps, SETTINGS, ZONE)[0]
    assert ("cluster-ip", [("pod", "DNAT", False), ("node", "DNAT", True),
                           ("external", "DNAT", True)]) == (
        cluster_ip.kind, [(d.origin, d.verdict, d.masquerade) for d in cluster_ip.decisions])


def test_external_local_policy_exempts_pods_and_the_node() -> None:
    """At a NodePort with externalTrafficPolicy=Local, pods and the node use every endpoint
    (the node masqueraded), outside clients only this node's, with their source kept."""
    eps = [endpoint("10.0.1.1"), endpoint("10.0.2.1", "node2")]
    node_port = entry_decisions(ETP_LOCAL, eps, SETTINGS, ZONE)[-1]
    assert ("node-port", [
        ("pod", ("10.0.1.1:8080", "10.0.2.1:8080"), False),
        ("node", ("10.0.1.1:8080", "10.0.2.1:8080"), True),
        ("external", ("10.0.1.1:8080",), False)]) == (
        node_port.kind, [(d.origin, d.endpoints, d.masquerade) for d in node_port.decisions])


def test_load_balancer_source_ranges_split_outside_clients() -> None:
    """Outside clients inside loadBalancerSourceRanges are DNATed, other addresses dropped;
    pods outside the ranges are dropped too."""
    port = replace(PORT, load_balancer_ips=(ipaddress.ip_address("192.0.2.10"),),
                   load_balancer_source_ranges=(ipaddress.ip_network("198.51.100.0/24"),))
    lb = entry_decisions(port, [endpoint("10.0.1.1")], SETTINGS, ZONE)[1]
    assert ("load-balancer-ip", [("pod", "", "DROP"), ("node", "", "DROP"),
                                 ("external", "198.51.100.0/24", "DNAT"),
                                 ("external", "other addresses", "DROP")]) == (
        lb.kind, [(d.origin, d.sources, d.verdict) for d in lb.decisions])


# --- one lookup each -------------------------------------------------------------------------

def test_node_zone_is_read_from_this_nodes_label() -> None:
    """No Node object: no zone; this node's zone label: that zone."""
    state = ClusterState(NODE)
    before = state.node_zone
    state.upsert(NodeInfo(NODE, {ZONE_LABEL: ZONE}))
    assert (None, ZONE) == (before, state.node_zone)


def test_object_key_puts_namespaced_objects_in_default_and_nodes_nowhere() -> None:
    """A Service without a namespace is in ``default``; a Node has none; no name is ""."""
    assert [("default", "web"), ("shop", "web"), ("", "node1"), ("default", "")] == [
        object_key({"kind": "Service", "metadata": {"name": "web"}}),
        object_key({"kind": "Service", "metadata": {"namespace": "shop", "name": "web"}}),
        object_key({"kind": "Node", "metadata": {"name": "node1", "namespace": "x"}}),
        object_key({"kind": "Service", "metadata": None})]
