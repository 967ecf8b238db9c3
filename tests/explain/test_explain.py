"""`iptsync explain`: per node, entry point and client, which endpoints get traffic, and why not.

The cases are the services of ``objects.CASES`` (address plan in ``objects.py``); node1 is
this node (zone-a), node2 runs the other endpoints (zone-b).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from iptsync.cli import main
from iptsync.core import names
from iptsync.core.policy import Decision, Excluded
from iptsync.inspection.explain import (
    ExplainError,
    ServiceExplanation,
    ServiceRef,
    explanation_json,
    parse_service_ref,
    render_text,
)

from .objects import CASES, SETTINGS, endpoint_slice, explain_objects, service

ROOT = Path(__file__).resolve().parents[2]


def explain_case(case: str) -> ServiceExplanation:
    return explain_objects(case, *CASES[case])


def outcomes(explanation: ServiceExplanation, kind: str,
             node: str | None = "node1") -> dict[str, Decision]:
    """The outcomes at one entry point on one node, keyed by client ("external 1.2.3.0/24")."""
    view = next(v for v in explanation.ports[0].views if node in [r.name for r in v.roles])
    entry = next(e for e in view.entries if e.kind == kind)
    return {" ".join(filter(None, (o.origin, o.sources))): o for o in entry.decisions}


def shares(outcome: Decision) -> dict[str, float]:
    return {endpoint: round(p, 6) for endpoint, p in outcome.probabilities.items()}


def test_cluster_ip_splits_equally_and_keeps_pod_sources() -> None:
    """ClusterIP: 1/n to each ready endpoint; pods keep their address, others masqueraded."""
    at = outcomes(explain_case("basic"), "cluster-ip")
    assert {"pod", "node", "external"} == set(at)
    assert {"10.0.1.2:8080": 0.5, "10.0.2.2:8080": 0.5} == shares(at["pod"])
    assert ("DNAT", False) == (at["pod"].verdict, at["pod"].masquerade)
    assert (True, True) == (at["node"].masquerade, at["external"].masquerade)
    assert names.svc_chain("default/basic", "tcp") == at["pod"].chain
    assert () == at["pod"].excluded


def test_cluster_policy_gives_every_node_the_same_answer() -> None:
    """With Cluster policies and no hints, this node, node2 and any other node share a view."""
    views = explain_case("basic").ports[0].views
    assert [["node1", "node2", None]] == [[r.name for r in v.roles] for v in views]
    assert [True, False, False] == [r.this_node for r in views[0].roles]
    assert ("10.0.1.2:8080",) == views[0].roles[0].local_ready


def test_not_ready_endpoint_is_left_out_with_its_reason() -> None:
    """A not-ready endpoint gets nothing, and the explanation says it is not ready."""
    at = outcomes(explain_case("not-ready"), "cluster-ip")
    assert {"10.0.1.2:8080": 1.0} == shares(at["pod"])
    assert (Excluded("10.0.2.2:8080", "node2", "not-ready", "not ready"),) == at["pod"].excluded


def test_etp_local_sends_outside_traffic_to_this_nodes_endpoints_only() -> None:
    """ETP=Local: outside clients reach only local endpoints, unmasqueraded, via SVL."""
    explanation = explain_case("etp-local")
    on_node1 = outcomes(explanation, "load-balancer-ip")
    outside = on_node1["external"]
    assert ({"10.0.1.2:8080": 1.0}, False) == (shares(outside), outside.masquerade)
    assert names.svl_chain("default/etp-local", "tcp") == outside.chain
    assert [("10.0.2.2:8080", "not-local"), ("10.0.2.3:8080", "not-local")] == [
        (x.endpoint, x.reason) for x in outside.excluded]
    assert ("runs on node2, not on this node (externalTrafficPolicy=Local)"
            == outside.excluded[0].detail)
    on_node2 = outcomes(explanation, "node-port", "node2")["external"]
    assert {"10.0.2.2:8080": 0.5, "10.0.2.3:8080": 0.5} == shares(on_node2)


def test_etp_local_exempts_pods_and_the_node() -> None:
    """ETP=Local: pods reach every endpoint unmasqueraded; the node's own traffic is masqueraded."""
    at = outcomes(explain_case("etp-local"), "node-port")
    everyone = {"10.0.1.2:8080": 1 / 3, "10.0.2.2:8080": 1 / 3, "10.0.2.3:8080": 1 / 3}
    assert {k: round(v, 6) for k, v in everyone.items()} == shares(at["pod"])
    assert (False, True) == (at["pod"].masquerade, at["node"].masquerade)
    assert shares(at["pod"]) == shares(at["node"])


def test_etp_local_without_local_endpoint_drops_outside_traffic() -> None:
    """ETP=Local on a node with no endpoint: outside clients are dropped; node2 serves them."""
    explanation = explain_case("etp-local-remote")
    on_node1 = outcomes(explanation, "node-port")
    assert ("DROP", "DNAT", "DNAT") == (on_node1["external"].verdict,
                                        on_node1["pod"].verdict, on_node1["node"].verdict)
    assert "externalTrafficPolicy=Local and no endpoint on this node" in (
        on_node1["external"].reason)
    assert (Excluded("10.0.2.2:8080", "node2", "not-local",
                     "runs on node2, not on this node (externalTrafficPolicy=Local)"),) == (
        on_node1["external"].excluded)
    on_node2 = outcomes(explanation, "node-port", "node2")["external"]
    assert ("DNAT", {"10.0.2.2:8080": 1.0}) == (on_node2.verdict, shares(on_node2))


def test_etp_local_roles_name_local_ready_endpoints() -> None:
    """ETP=Local: nodes differ, so each has its own view, labelled with its local endpoints."""
    views = explain_case("etp-local-remote").ports[0].views
    assert [[("node1", ()), (None, ())], [("node2", ("10.0.2.2:8080",))]] == [
        [(r.name, r.local_ready) for r in v.roles] for v in views]


def test_itp_local_uses_only_local_endpoints_for_the_cluster_ip() -> None:
    """ITP=Local: the cluster IP leads to this node's endpoints only; others are not local."""
    at = outcomes(explain_case("itp-local"), "cluster-ip")
    assert {"10.0.1.2:8080": 1.0} == shares(at["pod"])
    assert names.svl_chain("default/itp-local", "tcp") == at["pod"].chain
    assert (Excluded("10.0.2.2:8080", "node2", "not-local",
                     "runs on node2, not on this node (internalTrafficPolicy=Local)"),) == (
        at["pod"].excluded)


def test_itp_local_without_local_endpoint_drops_cluster_ip_traffic() -> None:
    """ITP=Local on a node without endpoints: every client's cluster IP traffic is dropped."""
    explanation = explain_case("itp-local-remote")
    assert {"DROP"} == {o.verdict for o in outcomes(explanation, "cluster-ip").values()}
    assert "DNAT" == outcomes(explanation, "cluster-ip", "node2")["pod"].verdict


def test_terminating_fallback_when_no_endpoint_is_ready() -> None:
    """No ready endpoint: serving terminating ones take traffic; the others say why not."""
    pod = outcomes(explain_case("terminating"), "cluster-ip")["pod"]
    assert ({"10.0.1.2:8080": 1.0}, True) == (shares(pod), pod.fallback)
    assert "terminating fallback" in pod.reason
    assert [("10.0.2.2:8080", "not-serving"), ("10.0.2.3:8080", "not-ready")] == [
        (x.endpoint, x.reason) for x in pod.excluded]


def test_terminating_endpoint_is_unused_while_ready_ones_exist() -> None:
    """A serving terminating endpoint is left out while a ready one exists: no fallback."""
    pod = outcomes(explain_case("terminating-with-ready"), "cluster-ip")["pod"]
    assert ({"10.0.2.2:8080": 1.0}, False) == (shares(pod), pod.fallback)
    assert (Excluded("10.0.1.2:8080", "node1", "terminating",
                     "terminating; no fallback to it: ready endpoints exist"),) == pod.excluded


def test_topology_hints_keep_traffic_in_the_nodes_zone() -> None:
    """Hints: node1 (zone-a) uses the zone-a endpoint, node2 (zone-b) the zone-b ones."""
    explanation = explain_case("topology")
    pod = outcomes(explanation, "cluster-ip")["pod"]
    assert {"10.0.1.2:8080": 1.0} == shares(pod)
    assert (Excluded("10.0.2.2:8080", "node2", "other-zone",
                     "topology hints for zone zone-b, this node is in zone zone-a")
            == pod.excluded[0])
    on_node2 = outcomes(explanation, "node-port", "node2")["external"]
    assert {"10.0.2.2:8080": 0.5, "10.0.2.3:8080": 0.5} == shares(on_node2)


def test_topology_hints_are_ignored_on_a_node_without_zone() -> None:
    """A node with no zone label uses every ready endpoint, and a note says why."""
    anywhere = outcomes(explain_case("topology"), "cluster-ip", None)["pod"]
    assert 3 == len(anywhere.endpoints)
    unzoned = explain_objects("topology", *CASES["topology"],
                              settings=replace(SETTINGS, node_name="node3"))
    assert 3 == len(outcomes(unzoned, "cluster-ip", "node3")["pod"].endpoints)
    assert ("endpoints carry topology hints, but node node3 has no zone label "
            "(topology.kubernetes.io/zone): the hints are not used there",) == (
        unzoned.ports[0].notes)


def test_no_endpoints_rejects_at_every_entry_point() -> None:
    """No endpoints: REJECT everywhere, except the node's own traffic to a foreign address."""
    explanation = explain_case("no-endpoints")
    assert {"REJECT"} == {o.verdict for o in outcomes(explanation, "cluster-ip").values()}
    assert {"REJECT"} == {o.verdict for o in outcomes(explanation, "node-port").values()}
    lb = outcomes(explanation, "load-balancer-ip")
    assert ("REJECT", "REJECT", "ACCEPT") == (lb["pod"].verdict, lb["external"].verdict,
                                              lb["node"].verdict)
    assert "connection refused" in lb["pod"].reason


def test_source_ranges_admit_listed_clients_and_drop_the_rest() -> None:
    """loadBalancerSourceRanges: listed sources are DNATed, others (pods too) DROPped."""
    lb = outcomes(explain_case("source-ranges"), "load-balancer-ip")
    assert ["pod", "node", "external 192.0.2.0/24", "external other addresses"] == list(lb)
    assert ("DNAT", {"10.0.1.2:8080": 1.0}) == (lb["external 192.0.2.0/24"].verdict,
                                                 shares(lb["external 192.0.2.0/24"]))
    dropped = lb["external other addresses"]
    assert "DROP" == dropped.verdict
    assert "KUBE-PROXY-FIREWALL" in dropped.reason
    assert ("DROP", "DROP") == (lb["pod"].verdict, lb["node"].verdict)
    assert "10.100.0.2 is outside loadBalancerSourceRanges" in lb["node"].reason


def test_source_ranges_do_not_apply_to_the_node_port() -> None:
    """The NodePort of a service with source ranges accepts every client, as in kube-proxy."""
    at = outcomes(explain_case("source-ranges"), "node-port")
    assert {"DNAT"} == {o.verdict for o in at.values()}


def test_external_ip_is_masqueraded_for_every_client() -> None:
    """ETP=Cluster: traffic to an external IP goes everywhere and is masqueraded."""
    at = outcomes(explain_case("external-ip"), "external-ip")
    assert {"198.51.100.8:80"} == {e.address for v in explain_case("external-ip").ports[0].views
                                   for e in v.entries if e.kind == "external-ip"}
    assert {True} == {o.masquerade for o in at.values()}
    assert {"10.0.1.2:8080": 0.5, "10.0.2.2:8080": 0.5} == shares(at["external"])


def test_a_port_is_chosen_by_name() -> None:
    """`ns/name:port` explains that port only; without a port, every port."""
    two = service("two", "10.96.0.30", port_name="http")
    two["spec"]["ports"].append({"name": "metrics", "port": 9090, "protocol": "TCP"})
    objects = (two, endpoint_slice("two", CASES["basic"][1]["endpoints"][0], port_name="metrics"))
    assert ["default/two:http", "default/two:metrics"] == [
        str(p.port.name) for p in explain_objects("two", *objects).ports]
    assert ["default/two:metrics"] == [
        str(p.port.name) for p in explain_objects("two", *objects, port="metrics").ports]
    with pytest.raises(ExplainError, match="no port named 'nope' \\(ports: 'http', 'metrics'\\)"):
        explain_objects("two", *objects, port="nope")


def test_an_unknown_service_is_an_error() -> None:
    """Naming a service that is not among the objects raises an error naming it."""
    with pytest.raises(ExplainError, match="no Service default/ghost"):
        explain_objects("ghost", *CASES["basic"])


def test_headless_service_says_it_gets_no_rules() -> None:
    """A headless service has no ports to explain; the reason is given instead."""
    headless = service("headless", "None")
    explanation = explain_objects("headless", headless)
    assert ((), "headless services get no rules") == (explanation.ports,
                                                      explanation.skipped_reason)
    assert "service default/headless: headless services get no rules\n" == render_text(
        explanation)


@pytest.mark.parametrize(("text", "expected"), [
    ("default/web", ServiceRef("default", "web")),
    ("kube-system/dns:dns-tcp", ServiceRef("kube-system", "dns", "dns-tcp")),
])
def test_service_references_parse(text: str, expected: ServiceRef) -> None:
    """namespace/name[:port] parses into its parts."""
    assert expected == parse_service_ref(text)


@pytest.mark.parametrize("text", ["web", "a/b/c", "default/web:", "/web"])
def test_bad_service_references_are_errors(text: str) -> None:
    """Anything but namespace/name[:port] is refused with an example of the form."""
    with pytest.raises(ExplainError, match="namespace/name\\[:port\\]"):
        parse_service_ref(text)


def test_json_holds_roles_entries_outcomes_and_exclusions() -> None:
    """The JSON form: ports -> nodes (roles, entries) -> outcomes with shares and reasons."""
    data = json.loads(json.dumps(explanation_json(explain_case("etp-local-remote"))))
    assert ["node", "ports", "service", "skipped"] == sorted(data)
    port = data["ports"][0]
    assert ["endpoints", "external_traffic_policy", "family", "internal_traffic_policy", "name",
            "nodes", "notes", "port", "port_name", "protocol"] == sorted(port)
    assert "IPv4" == port["family"]
    assert {"node": "node1", "this_node": True, "zone": "zone-a",
            "local_ready_endpoints": []} == port["nodes"][0]["roles"][0]
    entry = port["nodes"][0]["entries"][1]
    assert ("node-port", "IPv4", ":30401") == (entry["kind"], entry["family"], entry["address"])
    outside = entry["outcomes"][2]
    assert ["chain", "endpoints", "excluded", "from", "masquerade", "reason", "sources",
            "terminating_fallback", "verdict"] == sorted(outside)
    assert ("external", "DROP", {}) == (outside["from"], outside["verdict"],
                                        outside["endpoints"])
    assert [{"endpoint": "10.0.2.2:8080", "node": "node2", "reason": "not-local",
             "detail": "runs on node2, not on this node (externalTrafficPolicy=Local)"}] == (
        outside["excluded"])
    pod = entry["outcomes"][0]
    assert ({"10.0.2.2:8080": 1.0}, False) == (pod["endpoints"], pod["masquerade"])


def test_text_names_each_node_entry_client_and_exclusion() -> None:
    """The text form lists nodes, entry points, client groups, and each left-out endpoint."""
    text = render_text(explain_case("etp-local-remote"))
    # An IPv4-only Service's ports are not labelled with their family.
    assert ("default/etp-local-remote 80/TCP: externalTrafficPolicy=Local, "
            "internalTrafficPolicy=Cluster") == text.splitlines()[0]
    assert ("on node1 (this node, no local ready endpoint, zone zone-a); any other node "
            "(no endpoints there):") in text.splitlines()
    assert "  NodePort 30401 on the node's addresses" in text
    assert "    from outside: DROP" in text
    assert ("        not used: 10.0.2.2:8080: runs on node2, not on this node "
            "(externalTrafficPolicy=Local)") in text
    assert "on node2 (1 local ready endpoint, zone zone-b):" in text


def test_cli_explains_the_lab_service_as_text_and_json() -> None:
    """`iptsync explain` reads --objects, prints text, and --json prints the same as JSON."""
    args = ["explain", "default/deploy-svc", "--objects", str(ROOT / "examples" / "lab"),
            "--hostname-override", "node1", "--cluster-cidr", "10.0.0.0/14"]
    text = CliRunner().invoke(main, args)
    assert 0 == text.exit_code, text.output
    assert "load-balancer IP 203.0.113.10:80" in text.output
    as_json = CliRunner().invoke(main, [*args, "--json"])
    assert 0 == as_json.exit_code, as_json.output
    assert "default/deploy-svc" == json.loads(as_json.output)["service"]
    missing = CliRunner().invoke(main, [*args[:1], "default/ghost", *args[2:]])
    assert (1, True) == (missing.exit_code, "no Service default/ghost" in missing.output)
