"""The tracer on the renderer's golden scenarios: the answers a person debugging a service wants.

Each scenario of ``tests/render/scenarios/`` is rendered for node1 (10.100.0.2, cluster CIDR
10.0.0.0/14) exactly as the golden tests do, then packets are traced through those rules.
"""

from __future__ import annotations

import ipaddress
from functools import cache

import pytest
from render.golden import SCENARIO_NAMES, SCENARIOS, expected_warnings

from iptsync.core.model import IPAddress
from iptsync.core.policy import Settings
from iptsync.engine.desired import desired_from_objects
from iptsync.inspection.trace import Tables, TraceResult, from_desired, make_packet, trace
from iptsync.sources.files import load_objects
from tracer.outcomes import chains, shares

SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))
NODE = "10.100.0.2"
CLIENT = "10.100.0.100"  # outside the cluster CIDR
POD = "10.0.1.3"


@cache
def rules(scenario: str) -> tuple[Tables, tuple[IPAddress, ...]]:
    """The scenario's rendered rules for node1, and node1's addresses."""
    loaded = load_objects([SCENARIOS / f"{scenario}.yaml"])
    desired = desired_from_objects(loaded.objects, SETTINGS)
    assert expected_warnings(scenario) == [str(p) for p in loaded.problems + desired.problems]
    return from_desired(desired.tables), desired.settings.node_ips


def run(scenario: str, src: str, dst: str, origin: str, proto: str = "tcp") -> TraceResult:
    tables, node_ips = rules(scenario)
    return trace(tables, make_packet(src, dst, proto), origin=origin, node_ips=node_ips)


def test_cluster_ip_from_a_pod_spreads_evenly_without_masquerade() -> None:
    """Pod -> ClusterIP with two endpoints: each gets 1/2 and the pod's address is kept."""
    result = run("clusterip-two-endpoints", POD, "10.96.0.10:80", "pod")
    assert "DNAT" == result.verdict
    assert {"10.0.1.2:8080": 0.5, "10.0.2.2:8080": 0.5} == shares(result)
    assert result.masquerade is False
    assert [] == list(result.warnings)


def test_cluster_ip_from_outside_the_cluster_cidr_is_masqueraded() -> None:
    """A client outside the cluster CIDR routed to the ClusterIP is masqueraded (! -s CIDR)."""
    result = run("clusterip-two-endpoints", CLIENT, "10.96.0.10:80", "external")
    assert {"10.0.1.2:8080": 0.5, "10.0.2.2:8080": 0.5} == shares(result)
    assert result.masquerade is True
    assert "KUBE-MARK-MASQ" in chains(result)


def test_cluster_ip_from_the_node_is_masqueraded() -> None:
    """The node's own connection to a ClusterIP crosses nat OUTPUT and is masqueraded."""
    result = run("clusterip-two-endpoints", NODE, "10.96.0.10:80", "node")
    assert ("OUTPUT", 0.5) == (result.most_likely.path[0].chain, shares(result)["10.0.1.2:8080"])
    assert result.masquerade is True


def test_wrong_port_of_a_cluster_ip_is_not_translated() -> None:
    """A port the service does not expose is not DNATed: the packet goes on unchanged."""
    result = run("clusterip-two-endpoints", POD, "10.96.0.10:81", "pod")
    assert ("ACCEPT", {}) == (result.verdict, result.endpoints)


def test_nodeport_from_outside_reaches_every_endpoint_masqueraded() -> None:
    """External -> NodePort (TCP and UDP): 1/3 each of three endpoints, all masqueraded."""
    for proto in ("tcp", "udp"):
        result = run("nodeport-tcp-udp", CLIENT, f"{NODE}:30053", "external", proto)
        assert {"10.0.1.10:5353": 0.333333, "10.0.1.5:5353": 0.333333,
                "10.0.2.5:5353": 0.333333} == shares(result)
        assert result.masquerade is True
        assert ["PREROUTING", "KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXT"] == chains(result)[:4]


def test_localhost_nodeport_from_the_node() -> None:
    """127.0.0.1:NODEPORT from the node reaches the endpoints, masqueraded."""
    result = run("nodeport-tcp-udp", "127.0.0.1", "127.0.0.1:30053", "node")
    assert 3 == len(result.endpoints)
    assert result.masquerade is True


def test_etp_local_with_a_local_endpoint_keeps_the_client_address() -> None:
    """ETP=Local on a node with a local endpoint: only that endpoint, no masquerade."""
    for dst in (f"{NODE}:30080", "198.51.100.30:80"):
        result = run("etp-local-with-local", CLIENT, dst, "external")
        assert {"10.0.1.30:8080": 1.0} == shares(result)
        assert result.masquerade is False
        assert "KUBE-SVL" in chains(result)


def test_etp_local_from_a_pod_uses_every_endpoint() -> None:
    """ETP=Local does not apply to pods: they reach the cluster-wide endpoints (EXT -> SVC)."""
    result = run("etp-local-with-local", POD, f"{NODE}:30080", "pod")
    assert {"10.0.1.30:8080": 0.5, "10.0.2.30:8080": 0.5} == shares(result)
    assert result.masquerade is False


def test_etp_local_without_a_local_endpoint_drops() -> None:
    """ETP=Local on a node without local endpoints: external traffic is dropped in filter."""
    result = run("etp-local-without-local", CLIENT, f"{NODE}:30080", "external")
    assert "DROP" == result.verdict
    last = result.most_likely.path[-1]
    assert ("filter", "KUBE-EXTERNAL-SERVICES", "edge/ingress:http has no local endpoints") == (
        last.table, last.chain, last.comment)
    assert "DROP" == run("etp-local-without-local", CLIENT, "198.51.100.30:80",
                         "external").verdict


def test_load_balancer_source_ranges_allow_and_drop() -> None:
    """An LB IP with source ranges: an allowed source is DNATed, another dropped by the
    KUBE-PROXY-FIREWALL rule."""
    allowed = run("loadbalancer-ranges-affinity", "203.0.113.5", "198.51.100.20:443", "external")
    assert {"10.0.1.20:8443": 0.5, "10.0.2.20:8443": 0.5} == shares(allowed)
    assert allowed.masquerade is True
    denied = run("loadbalancer-ranges-affinity", "192.0.2.9", "198.51.100.20:443", "external")
    assert "DROP" == denied.verdict
    assert ["KUBE-SERVICES", "KUBE-FW", "FORWARD", "FORWARD", "KUBE-PROXY-FIREWALL"] == (
        chains(denied)[1:])
    # NodePorts are not subject to the source ranges.
    assert 2 == len(run("loadbalancer-ranges-affinity", "192.0.2.9", f"{NODE}:31443",
                        "external").endpoints)


def test_session_affinity_first_packet_is_spread_and_recorded() -> None:
    """ClientIP affinity: no recent entry yet, so the random choice decides; --set records."""
    result = run("loadbalancer-ranges-affinity", POD, "10.96.0.30:443", "pod")
    assert {"10.0.1.20:8443": 0.5, "10.0.2.20:8443": 0.5} == shares(result)
    for outcome in result.outcomes:
        rules_taken = [step.rule for step in outcome.path]
        assert not any("--rcheck" in rule for rule in rules_taken)
        assert any("--set" in rule and "DNAT" in rule for rule in rules_taken)


@pytest.mark.parametrize(("src", "dst", "origin"), [
    (POD, "10.96.0.50:80", "pod"), (CLIENT, "198.51.100.50:80", "external"),
    (CLIENT, "198.51.100.51:80", "external"), (CLIENT, f"{NODE}:30050", "external"),
    (NODE, "10.96.0.50:80", "node")])
def test_service_without_endpoints_rejects(src: str, dst: str, origin: str) -> None:
    """No endpoints: ClusterIP, external IP, LB IP and NodePort are all rejected in filter."""
    result = run("no-endpoints", src, dst, origin)
    assert "REJECT" == result.verdict
    last = result.most_likely.path[-1]
    assert ("filter", "default/empty:p has no endpoints") == (last.table, last.comment)


def test_internal_traffic_policy_local() -> None:
    """ITP=Local: only the node's own endpoint; a service without one here is dropped."""
    local = run("itp-local", POD, "10.96.0.70:9100", "pod")
    assert {"10.0.1.70:9100": 1.0} == shares(local)
    assert "KUBE-SVL" in chains(local)
    remote = run("itp-local", POD, "10.96.0.71:9100", "pod")
    assert "DROP" == remote.verdict
    assert "monitoring/remote-agent:metrics has no local endpoints" == (
        remote.most_likely.path[-1].comment)


def test_hairpin_is_masqueraded_on_that_outcome_only() -> None:
    """A pod reaching itself through its service is masqueraded; the other endpoint is not."""
    result = run("clusterip-two-endpoints", "10.0.1.2", "10.96.0.10:80", "pod")
    by_endpoint = {o.endpoint: o.masquerade for o in result.outcomes}
    assert {"10.0.1.2:8080": True, "10.0.2.2:8080": False} == by_endpoint
    assert result.masquerade is None


@pytest.mark.parametrize("scenario", [name for name in SCENARIO_NAMES
                                      if name != "flags" and not name.startswith("upstream-")])
def test_probabilities_add_up_to_one(scenario: str) -> None:
    """Whatever the scenario, a pod's traffic to 10.96.0.10:80 ends with total probability 1."""
    result = run(scenario, POD, "10.96.0.10:80", "pod")
    assert 1.0 == pytest.approx(sum(o.probability for o in result.outcomes), abs=1e-9)
