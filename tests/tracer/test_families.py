"""The tracer in both IP families: the same questions, asked of IPv4 and of IPv6 rules.

The dual-stack objects of ``dual-stack.yaml`` (address plan at its top) are rendered for node1
by one engine per family, as ``iptsync run`` programs them (``Settings.for_family``), and each
test traces the same connection in each family through that family's rules. Every test runs
once per family with the same calls: the tracer's API does not change with the family, only
the addresses do (``[ip]:port`` for IPv6).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from iptsync.cli import main
from iptsync.core.model import IPAddress, IPFamily, host_port
from iptsync.core.policy import Settings
from iptsync.engine.desired import desired_from_objects
from iptsync.inspection.trace import (
    Tables,
    TraceError,
    TraceResult,
    default_origin,
    from_desired,
    make_packet,
    render_text,
    result_json,
    trace,
)
from iptsync.sources.files import load_objects
from tracer.outcomes import chains, shares

OBJECTS = Path(__file__).parent / "dual-stack.yaml"
SETTINGS = Settings(node_name="node1",
                    cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),
                                   ipaddress.ip_network("fd00:10:244::/56")))


@dataclass(frozen=True)
class Plan:
    """One family's addresses in ``dual-stack.yaml``."""

    node: str  # node1, this node
    pod: str  # a pod on node1, not an endpoint
    client: str  # outside the cluster CIDR and the source ranges
    ranged: str  # outside the cluster, inside loadBalancerSourceRanges
    service: str  # cluster IPs: the template with {host}
    lb: str  # the load balancer's ingress IP
    pods: str  # endpoint addresses: the template with {node} (1 or 2) and {host}

    def cluster_ip(self, host: int, port: int) -> str:
        return host_port(ipaddress.ip_address(self.service.format(host=host)), port)

    def endpoint(self, node: int, host: int, port: int = 8080) -> str:
        return host_port(ipaddress.ip_address(self.pods.format(node=node, host=host)), port)


PLANS = {
    IPFamily.IPV4: Plan(node="10.100.0.2", pod="10.0.1.3", client="10.100.0.100",
                        ranged="203.0.113.5", service="10.96.0.{host}", lb="198.51.100.20",
                        pods="10.0.{node}.{host}"),
    IPFamily.IPV6: Plan(node="fd00:100::2", pod="fd00:10:244:1::3", client="fd00:100::100",
                        ranged="2001:db8:1::5", service="fd00:96::{host}",
                        lb="2001:db8:20::20", pods="fd00:10:244:{node}::{host}"),
}
FAMILIES = pytest.mark.parametrize("family", list(IPFamily), ids=[f.value for f in IPFamily])


@cache
def rules(family: IPFamily) -> tuple[Tables, tuple[IPAddress, ...]]:
    """node1's rendered rules of ``family`` and its addresses of that family."""
    loaded = load_objects([OBJECTS])
    desired = desired_from_objects(loaded.objects, SETTINGS.for_family(family))
    assert [] == [*loaded.problems, *desired.problems]
    return from_desired(desired.tables), desired.settings.node_ips


def run(family: IPFamily, src: str, dst: str, origin: str, proto: str = "tcp") -> TraceResult:
    tables, node_ips = rules(family)
    return trace(tables, make_packet(src, dst, proto), origin=origin, node_ips=node_ips)


def node_port(plan: Plan, port: int) -> str:
    return host_port(ipaddress.ip_address(plan.node), port)


@FAMILIES
def test_cluster_ip_spreads_evenly_and_probabilities_add_to_one(family: IPFamily) -> None:
    """Pod -> cluster IP with three endpoints: 1/3 each, summing to 1, the pod's address kept."""
    plan = PLANS[family]
    result = run(family, plan.pod, plan.cluster_ip(10, 80), "pod")
    assert "DNAT" == result.verdict
    assert {plan.endpoint(1, 10): 0.333333, plan.endpoint(2, 10): 0.333333,
            plan.endpoint(2, 11): 0.333333} == shares(result)
    assert 1.0 == pytest.approx(sum(o.probability for o in result.outcomes), abs=1e-9)
    assert result.masquerade is False
    assert [] == list(result.warnings)


@FAMILIES
def test_node_port_on_the_node_address_is_masqueraded(family: IPFamily) -> None:
    """Outside -> NodePort on node1's address of the family: every endpoint, masqueraded,
    through KUBE-NODEPORTS (the addrtype LOCAL rule knows the node's address)."""
    plan = PLANS[family]
    result = run(family, plan.client, node_port(plan, 30080), "external")
    assert {plan.endpoint(1, 10), plan.endpoint(2, 10), plan.endpoint(2, 11)} == set(
        result.endpoints)
    assert result.masquerade is True
    assert ["PREROUTING", "KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXT"] == chains(result)[:4]


@FAMILIES
def test_node_port_on_another_address_is_not_a_node_port(family: IPFamily) -> None:
    """The NodePort on an address that is not node1's is left alone (forwarded, no DNAT)."""
    plan = PLANS[family]
    other = plan.client  # not a node address
    result = run(family, plan.ranged, host_port(ipaddress.ip_address(other), 30080), "external")
    assert ("ACCEPT", {}) == (result.verdict, result.endpoints)


@FAMILIES
def test_etp_local_without_a_local_endpoint_drops(family: IPFamily) -> None:
    """ETP=Local, the only endpoint on node2: outside traffic to node1's NodePort is dropped."""
    plan = PLANS[family]
    result = run(family, plan.client, node_port(plan, 30081), "external")
    assert "DROP" == result.verdict
    last = result.most_likely.path[-1]
    assert ("filter", "KUBE-EXTERNAL-SERVICES", "default/local-remote:http has no local "
            "endpoints") == (last.table, last.chain, last.comment)


@FAMILIES
def test_etp_local_with_a_local_endpoint_keeps_the_client_address(family: IPFamily) -> None:
    """ETP=Local with an endpoint on node1: only that one, and the client's address is kept."""
    plan = PLANS[family]
    result = run(family, plan.client, node_port(plan, 30082), "external")
    assert {plan.endpoint(1, 30): 1.0} == shares(result)
    assert result.masquerade is False
    assert "KUBE-SVL" in chains(result)


@FAMILIES
@pytest.mark.parametrize("entry", ["cluster-ip", "node-port"])
def test_no_endpoints_rejects(family: IPFamily, entry: str) -> None:
    """No endpoints: the cluster IP and the NodePort are rejected in filter (icmp6 on IPv6)."""
    plan = PLANS[family]
    src, dst, origin = ((plan.pod, plan.cluster_ip(13, 80), "pod") if entry == "cluster-ip"
                        else (plan.client, node_port(plan, 30083), "external"))
    result = run(family, src, dst, origin)
    assert "REJECT" == result.verdict
    last = result.most_likely.path[-1]
    assert ("filter", "default/empty:http has no endpoints") == (last.table, last.comment)


@FAMILIES
def test_load_balancer_source_ranges_allow_and_deny(family: IPFamily) -> None:
    """The LB IP of the family: a source inside that family's range is DNATed, another is
    dropped by KUBE-PROXY-FIREWALL."""
    plan = PLANS[family]
    lb = host_port(ipaddress.ip_address(plan.lb), 443)
    allowed = run(family, plan.ranged, lb, "external")
    assert {plan.endpoint(1, 40, 8443): 0.5, plan.endpoint(2, 40, 8443): 0.5} == shares(allowed)
    assert allowed.masquerade is True
    denied = run(family, plan.client, lb, "external")
    assert "DROP" == denied.verdict
    assert ["KUBE-SERVICES", "KUBE-FW", "FORWARD", "FORWARD", "KUBE-PROXY-FIREWALL"] == (
        chains(denied)[1:])


@FAMILIES
def test_session_affinity_first_packet_is_spread_and_recorded(family: IPFamily) -> None:
    """ClientIP affinity: no recent entry yet, so the random choice decides; --set records."""
    plan = PLANS[family]
    result = run(family, plan.pod, plan.cluster_ip(14, 443), "pod")
    assert {plan.endpoint(1, 40, 8443): 0.5, plan.endpoint(2, 40, 8443): 0.5} == shares(result)
    for outcome in result.outcomes:
        taken = [step.rule for step in outcome.path]
        assert not any("--rcheck" in rule for rule in taken)
        assert any("--set" in rule and "DNAT" in rule for rule in taken)


@FAMILIES
def test_hairpin_is_masqueraded_on_that_outcome_only(family: IPFamily) -> None:
    """An endpoint reaching itself through its service is masqueraded; the others are not."""
    plan = PLANS[family]
    result = run(family, plan.pods.format(node=1, host=10), plan.cluster_ip(10, 80), "pod")
    assert {plan.endpoint(1, 10): True, plan.endpoint(2, 10): False,
            plan.endpoint(2, 11): False} == {o.endpoint: o.masquerade for o in result.outcomes}


def test_ipv6_only_service_is_in_the_ipv6_rules_only() -> None:
    """An IPv6-only Service: its cluster IP spreads over its endpoints in the IPv6 rules."""
    result = run(IPFamily.IPV6, "fd00:10:244:1::3", "[fd00:96::20]:53", "pod", "udp")
    assert {"[fd00:10:244:1::50]:5353": 0.5, "[fd00:10:244:2::50]:5353": 0.5} == shares(result)
    tables, _ = rules(IPFamily.IPV4)
    assert not any("fd00:96::20" in rule.text for chain in tables.chains["nat"].values()
                   for rule in chain)


def test_node_port_is_not_open_on_ipv6_loopback() -> None:
    """kube-proxy opens no NodePort on ::1 (no route_localnet for IPv6): the node's own
    connection to [::1]:NODEPORT is not DNATed, where 127.0.0.1:NODEPORT is."""
    v6 = run(IPFamily.IPV6, "::1", "[::1]:30080", "node")
    assert ("ACCEPT", {}) == (v6.verdict, v6.endpoints)
    v4 = run(IPFamily.IPV4, "127.0.0.1", "127.0.0.1:30080", "node")
    assert ("DNAT", 3) == (v4.verdict, len(v4.endpoints))


@pytest.mark.parametrize(("src", "dst", "message"), [
    ("10.0.1.3", "[fd00:96::10]:80", "--src 10.0.1.3 is an IPv4 address but --dst "
     "[fd00:96::10]:80 is IPv6"),
    ("fd00:10:244:1::3", "10.96.0.10:80", "--src fd00:10:244:1::3 is an IPv6 address but "
     "--dst 10.96.0.10:80 is IPv4"),
    ("fd00::5", "fd00::1", "--dst 'fd00::1': an IPv6 destination needs brackets and a port"),
    ("fd00::5", "fd00::1:80", "--dst 'fd00::1:80': an IPv6 destination needs brackets"),
    ("fd00::5", "[fd00::1]", "--dst '[fd00::1]': expected [IPv6]:PORT"),
    ("fd00::5", "[fd00::1]:http", "--dst '[fd00::1]:http': 'http' is not a port"),
    ("fd00::5", "[fd00::zz]:80", "--dst '[fd00::zz]:80': 'fd00::zz' is not an IP address"),
])
def test_bad_ipv6_packets_are_refused_naming_the_flag(src: str, dst: str, message: str) -> None:
    """A bare IPv6 destination, missing port, or mixed families: an error naming the flags."""
    with pytest.raises(TraceError) as err:
        make_packet(src, dst)
    assert message in str(err.value)


@pytest.mark.parametrize(("src", "expected"), [
    ("fd00:100::2", "node"), ("::1", "node"), ("127.0.0.1", "node"),
    ("fd00:10:244:1::3", "pod"), ("fd00:100::100", "external")])
def test_default_origin_in_both_families(src: str, expected: str) -> None:
    """A node or loopback address is the node itself, the IPv6 cluster CIDR pods, the rest
    outside; the cluster CIDR of the other family changes nothing."""
    assert expected == default_origin(ipaddress.ip_address(src), SETTINGS.cluster_cidrs,
                                      (ipaddress.ip_address("fd00:100::2"),))


def test_ipv6_text_and_json_print_bracketed_endpoints() -> None:
    """Text and JSON forms write [ip]:port, ::1 as the local loopback, and the family."""
    result = run(IPFamily.IPV6, "fd00:100::100", "[fd00:100::2]:30080", "external")
    text = render_text(result)
    assert "packet:     tcp fd00:100::100 -> [fd00:100::2]:30080, a new connection from " \
           "outside the node" == text.splitlines()[0]
    assert "node IPs:   fd00:100::2; ::1/128 is local too" == text.splitlines()[1]
    assert "DNAT to [fd00:10:244:2::10]:8080   masquerade: yes" in text
    data = result_json(result)
    assert ("IPv6", "fd00:100::2", 30080) == (
        data["packet"]["family"], data["packet"]["dst"], data["packet"]["dport"])
    assert {"[fd00:10:244:1::10]:8080", "[fd00:10:244:2::10]:8080",
            "[fd00:10:244:2::11]:8080"} == set(data["endpoints"])


OBJECTS_FLAGS = ("--objects", str(OBJECTS), "--hostname-override", "node1",
                 "--cluster-cidr", "10.0.0.0/14,fd00:10:244::/56")


def test_cli_traces_ipv6_rules_for_an_ipv6_destination() -> None:
    """`trace --objects --dst [ip]:port` renders and walks the IPv6 rules, node1's IPv6
    address from its Node object, the origin guessed from the IPv6 cluster CIDR."""
    out = CliRunner().invoke(main, ["trace", *OBJECTS_FLAGS, "--src", "fd00:10:244:1::3",
                                    "--dst", "[fd00:96::10]:80", "--json"])
    assert 0 == out.exit_code, out.output
    data = json.loads(out.output)
    assert ("IPv6", "pod", ["fd00:100::2"]) == (
        data["packet"]["family"], data["packet"]["from"], data["node_ips"])
    assert {"[fd00:10:244:1::10]:8080", "[fd00:10:244:2::10]:8080",
            "[fd00:10:244:2::11]:8080"} == set(data["endpoints"])
    v4 = CliRunner().invoke(main, ["trace", *OBJECTS_FLAGS, "--src", "10.100.0.100",
                                   "--dst", "10.100.0.2:30080", "--json"])
    assert ("IPv4", ["10.100.0.2"], True) == (
        json.loads(v4.output)["packet"]["family"], json.loads(v4.output)["node_ips"],
        json.loads(v4.output)["masquerade"])


@pytest.mark.parametrize(("src", "dst", "message"), [
    ("fd00::5", "fd00:96::10", "--dst 'fd00:96::10': an IPv6 destination needs brackets"),
    ("10.0.1.3", "[fd00:96::10]:80", "--src 10.0.1.3 is an IPv4 address but --dst"),
])
def test_cli_refuses_a_bare_ipv6_destination_and_mixed_families(src: str, dst: str,
                                                                 message: str) -> None:
    """A usage error (exit 2) naming the flag, before any rule is read."""
    out = CliRunner().invoke(main, ["trace", *OBJECTS_FLAGS, "--src", src, "--dst", dst])
    assert (2, True) == (out.exit_code, message in out.output), out.output
