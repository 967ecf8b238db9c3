"""`iptsync explain` on dual-stack and IPv6-only Services: each family explained on its own.

The objects are the tracer's dual-stack set (``tests/tracer/dual-stack.yaml``, address plan at
its top), rendered for node1 by one engine per family as ``iptsync run`` programs them. For
this node, every answer in each family is checked against the tracer walking that family's
rendered rules, as ``test_against_tracer.py`` does for IPv4.
"""

from __future__ import annotations

import ipaddress
import json
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from iptsync.cli import main
from iptsync.core.model import IPFamily, host_port
from iptsync.core.policy import Decision, Settings
from iptsync.engine.desired import Desired, desired_from_objects
from iptsync.inspection.explain import (
    ExplainError,
    PortExplanation,
    ServiceExplanation,
    ServiceRef,
    explain,
    explanation_json,
    render_text,
)
from iptsync.inspection.trace import from_desired, make_packet, trace
from iptsync.sources.files import load_objects

from .objects import assert_trace_agrees

OBJECTS = Path(__file__).resolve().parents[1] / "tracer" / "dual-stack.yaml"
CLUSTER_CIDRS = "10.0.0.0/14,fd00:10:244::/56"
SETTINGS = Settings(node_name="node1",
                    cluster_cidrs=tuple(map(ipaddress.ip_network, CLUSTER_CIDRS.split(","))))
SERVICES = ("web", "local-remote", "local-here", "empty", "lb", "v6-only")
# Sources of each kind of client, per family (see the address plan).
POD = {IPFamily.IPV4: "10.3.255.250", IPFamily.IPV6: "fd00:10:244:ff::250"}
NODE = {IPFamily.IPV4: "10.100.0.2", IPFamily.IPV6: "fd00:100::2"}
OUTSIDE = {IPFamily.IPV4: "10.100.0.100", IPFamily.IPV6: "fd00:100::100"}


def rendered(settings: Settings = SETTINGS, *, with_node: bool = True) -> list[Desired]:
    """Each family's rendered rules and state for node1 (its Node object left out on
    request, so that only the flags' addresses are known)."""
    objects = [obj for obj in load_objects([OBJECTS]).objects
               if with_node or obj.get("kind") != "Node"]
    return [desired_from_objects(objects, settings.for_family(family)) for family in IPFamily]


@cache
def node1() -> list[Desired]:
    """Each family's rendered rules and state for node1, as ``rendered()`` gives them."""
    return rendered()


def explain_service(name: str, port: str | None = None) -> ServiceExplanation:
    return explain([(d.state, d.settings) for d in node1()], ServiceRef("default", name, port))


def this_node(port: PortExplanation) -> dict[str, dict[str, Decision]]:
    """This node's entries of one port: kind -> client -> decision."""
    view = next(v for v in port.views if v.roles[0].this_node)
    return {entry.kind: {" ".join(filter(None, (d.origin, d.sources))): d
                         for d in entry.decisions} for entry in view.entries}


def test_dual_stack_service_is_explained_once_per_family() -> None:
    """A dual-stack Service: one port per family, each with its own cluster IP and endpoints."""
    ports = explain_service("web").ports
    assert [(IPFamily.IPV4, "10.96.0.10:80"), (IPFamily.IPV6, "[fd00:96::10]:80")] == [
        (p.port.family, this_node_address(p, "cluster-ip")) for p in ports]
    v6 = this_node(ports[1])
    assert {"[fd00:10:244:1::10]:8080": 1 / 3, "[fd00:10:244:2::10]:8080": 1 / 3,
            "[fd00:10:244:2::11]:8080": 1 / 3} == v6["cluster-ip"]["pod"].probabilities
    assert (False, True) == (v6["cluster-ip"]["pod"].masquerade,
                             v6["node-port"]["external"].masquerade)
    assert {"10.0.1.10:8080", "10.0.2.10:8080", "10.0.2.11:8080"} == set(
        this_node(ports[0])["cluster-ip"]["pod"].endpoints)


def this_node_address(port: PortExplanation, kind: str) -> str:
    view = next(v for v in port.views if v.roles[0].this_node)
    return next(entry.address for entry in view.entries if entry.kind == kind)


def test_ipv6_only_service_has_its_ipv6_port_only() -> None:
    """An IPv6-only Service is explained in IPv6 alone (the IPv4 engine has no port of it)."""
    ports = explain_service("v6-only").ports
    assert [(IPFamily.IPV6, "[fd00:96::20]:53")] == [
        (p.port.family, this_node_address(p, "cluster-ip")) for p in ports]
    assert {"[fd00:10:244:1::50]:5353": 0.5, "[fd00:10:244:2::50]:5353": 0.5} == (
        this_node(ports[0])["cluster-ip"]["pod"].probabilities)


def test_source_ranges_are_split_by_family() -> None:
    """Each family's load-balancer IP admits that family's source range only."""
    ports = explain_service("lb").ports
    v4, v6 = (this_node(p)["load-balancer-ip"] for p in ports)
    assert ("DNAT", "DROP") == (v4["external 203.0.113.0/24"].verdict,
                                v4["external other addresses"].verdict)
    assert ("DNAT", "DROP") == (v6["external 2001:db8:1::/64"].verdict,
                                v6["external other addresses"].verdict)
    assert ["[2001:db8:20::20]:443"] == [this_node_address(ports[1], "load-balancer-ip")]


def test_etp_local_without_local_endpoint_drops_in_each_family() -> None:
    """ETP=Local with the endpoint on node2: outside traffic to node1's NodePort is dropped
    in both families, and the left-out endpoint is named in its family's spelling."""
    ports = explain_service("local-remote").ports
    dropped = [this_node(p)["node-port"]["external"] for p in ports]
    assert ["DROP", "DROP"] == [d.verdict for d in dropped]
    assert [["10.0.2.20:8080"], ["[fd00:10:244:2::20]:8080"]] == [
        [x.endpoint for x in d.excluded] for d in dropped]


def test_a_port_name_missing_in_every_family_lists_the_ports_once() -> None:
    """An unknown port name is an error listing the Service's port names once, not per family."""
    with pytest.raises(ExplainError) as err:
        explain_service("web", "nope")
    assert "Service default/web has no port named 'nope' (ports: 'http')" == str(err.value)


def test_text_names_each_ports_family_and_brackets_ipv6() -> None:
    """The text form labels each port with its family and writes [ip]:port for IPv6."""
    lines = render_text(explain_service("web")).splitlines()
    assert ("default/web:http 80/TCP, IPv4: externalTrafficPolicy=Cluster, "
            "internalTrafficPolicy=Cluster") in lines
    assert ("default/web:http 80/TCP, IPv6: externalTrafficPolicy=Cluster, "
            "internalTrafficPolicy=Cluster") in lines
    assert "  [fd00:10:244:1::10]:8080 node1        ready" in lines
    assert "  cluster IP [fd00:96::10]:80" in lines
    assert "  NodePort 30080 on the node's IPv6 addresses" in lines
    assert any(line.startswith("    from pods: DNAT 1/3 each to [fd00:10:244:1::10]:8080, ")
               for line in lines)


def test_json_has_the_family_on_each_port_and_entry() -> None:
    """``--json``: ``family`` on every port and every entry point, [ip]:port for IPv6."""
    data = json.loads(json.dumps(explanation_json(explain_service("web"))))
    assert ["IPv4", "IPv6"] == [port["family"] for port in data["ports"]]
    v6 = data["ports"][1]
    entries = v6["nodes"][0]["entries"]
    assert [("cluster-ip", "IPv6", "[fd00:96::10]:80"), ("node-port", "IPv6", ":30080")] == [
        (e["kind"], e["family"], e["address"]) for e in entries]
    assert "[fd00:10:244:2::11]:8080" in entries[0]["outcomes"][0]["endpoints"]


def test_a_node_without_an_address_of_the_family_is_noted() -> None:
    """node1 known by an IPv4 address only: each IPv6 port says the node programs no IPv6."""
    settings = Settings(node_name="node1", cluster_cidrs=SETTINGS.cluster_cidrs,
                        node_ips=(ipaddress.ip_address("10.100.0.2"),))
    families = rendered(settings, with_node=False)
    ports = explain([(d.state, d.settings) for d in families],
                    ServiceRef("default", "web")).ports
    notes = {p.port.family: [n for n in p.notes if "IPv6 address" in n] for p in ports}
    assert {IPFamily.IPV4: [], IPFamily.IPV6: [
        "no IPv6 address of node node1 is known here (its Node object's status.addresses, "
        "--node-ip): if it has none, iptsync there programs no IPv6 rules and this port's IPv6 "
        "entry points do nothing on it"]} == notes


def source_ip(family: IPFamily, outcome: Decision) -> str:
    """An address of the kind of client the outcome is about."""
    if outcome.origin == "pod":
        return POD[family]
    if outcome.origin == "node":
        return NODE[family]
    if outcome.sources and outcome.sources != "other addresses":  # inside a source range
        return str(next(ipaddress.ip_network(outcome.sources.split(",")[0]).hosts()))
    return OUTSIDE[family]


@pytest.mark.parametrize("family", list(IPFamily), ids=[f.value for f in IPFamily])
@pytest.mark.parametrize("name", SERVICES)
def test_explain_agrees_with_the_tracer_in_each_family(family: IPFamily, name: str) -> None:
    """For each entry point and client, verdict, endpoint shares and masquerade match the
    tracer on the family's rendered rules."""
    desired = node1()[list(IPFamily).index(family)]
    explanation = explain([(desired.state, desired.settings)], ServiceRef("default", name))
    tables = from_desired(desired.tables)
    node_ip = ipaddress.ip_address(NODE[family])
    checked = 0
    for port in explanation.ports:
        view = next(v for v in port.views if v.roles[0].this_node)
        for entry in view.entries:
            dst = (host_port(node_ip, int(entry.address[1:])) if entry.kind == "node-port"
                   else entry.address)
            for outcome in entry.decisions:
                result = trace(tables, make_packet(source_ip(family, outcome), dst,
                                                   port.port.protocol.lower),
                               origin=outcome.origin, node_ips=desired.settings.node_ips)
                assert_trace_agrees(outcome, result,
                                    f"{entry.kind} {dst} from {outcome.origin} {outcome.sources}")
                checked += 1
    expected_empty = family is IPFamily.IPV4 and name == "v6-only"
    assert (checked == 0) == expected_empty


def test_cli_explains_a_dual_stack_service_in_both_families() -> None:
    """`iptsync explain` with a cluster CIDR per family prints each family's port."""
    args = ["explain", "default/web", "--objects", str(OBJECTS), "--hostname-override", "node1",
            "--cluster-cidr", CLUSTER_CIDRS]
    text = CliRunner().invoke(main, args)
    assert 0 == text.exit_code, text.output
    assert "  cluster IP [fd00:96::10]:80" in text.output.splitlines()
    as_json = CliRunner().invoke(main, [*args, "--json"])
    assert 0 == as_json.exit_code, as_json.output
    data = json.loads(as_json.output)
    assert (["IPv4", "IPv6"], []) == ([p["family"] for p in data["ports"]], data["problems"])
    v6_only = CliRunner().invoke(main, ["explain", "default/v6-only", *args[2:], "--json"])
    assert ["IPv6"] == [p["family"] for p in json.loads(v6_only.output)["ports"]]
