"""``iptsync trace --live`` against real packets: the tracer predicts what the kernel does.

For each case the lab's nodes hold the synced rules, ``iptsync trace --live --json`` runs
inside the namespace of the node the packet enters, and real requests then take the same
path. The tracer and the packets must agree: the endpoints with a non-zero probability are
exactly the pods that answered, ``masquerade`` is whether the pods saw another source than
the client, DROP shows as a timeout and REJECT as a refused connection.

All services are synced once per backend, in both IP families (each case runs over IPv4 and
over IPv6): node1 with the default flags, node2 with ``--masquerade-all``, so one sync covers
every case (ETP=Local drops and REJECTs do not depend on masquerading).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from iptsync.lab.echo import join_host_port

from .test_traffic import FAMILIES, PODS, Family, Lab, endpoints, errors, servers, service

pytestmark = pytest.mark.netns


def objects() -> tuple[dict[str, Any], ...]:
    """Every case's services, dual-stack, and their slices, one per family."""
    v4, v6 = FAMILIES

    def slices(service_name: str, *pods: str) -> list[dict[str, Any]]:
        return [endpoints(fam, service_name, *pods) for fam in FAMILIES]

    def lb(n: int, ranges: list[str]) -> dict[str, Any]:
        return {"loadBalancerSourceRanges": ranges, "status": {
            "loadBalancer": {"ingress": [{"ip": v4.lb(n)}, {"ip": v6.lb(n)}]}}}

    return (
        service("web", v4.svc(10), v6.svc(10)), *slices("web", "server1", "server2", "web-b"),
        service("np", v4.svc(12), v6.svc(12), type="NodePort", node_port=30200),
        *slices("np", "server1", "server2"),
        service("local", v4.svc(13), v6.svc(13), type="NodePort", node_port=30201,
                externalTrafficPolicy="Local"),
        *slices("local", "web-a"),
        service("lb-open", v4.svc(15), v6.svc(15), type="LoadBalancer", node_port=30202,
                **lb(10, [v4.only(v4.client), v6.only(v6.client)])),
        *slices("lb-open", "server1", "server2"),
        service("lb-closed", v4.svc(16), v6.svc(16), type="LoadBalancer", node_port=30203,
                **lb(11, [v4.elsewhere, v6.elsewhere])),
        *slices("lb-closed", "server1"),
        service("none", v4.svc(17), v6.svc(17), type="NodePort", node_port=30204),
        service("solo", v4.svc(23), v6.svc(23)), *slices("solo", "server1"),
    )


@dataclass(frozen=True)
class Case:
    """A connection: the node it enters, where it is sent from (a lab namespace key), where
    to (an address of the family) and the expected verdict."""

    name: str
    node: str
    sender: str
    dst: Callable[[Family], str]
    port: int
    verdict: str
    count: int = 20

    def src(self, fam: Family) -> str:
        return fam.client if self.sender == "client" else fam.pod(self.sender.removeprefix("pod:"))


CASES = (
    Case("cluster-ip-spread", "node1", "pod:client1", lambda f: f.svc(10), 80, "DNAT", 30),
    Case("nodeport-from-outside", "node1", "client", lambda f: f.node("node1"), 30200, "DNAT"),
    Case("etp-local-with-endpoint", "node1", "client", lambda f: f.node("node1"), 30201,
         "DNAT", 5),
    Case("etp-local-without-endpoint", "node2", "client", lambda f: f.node("node2"), 30201,
         "DROP", 2),
    Case("lb-source-allowed", "node1", "client", lambda f: f.lb(10), 80, "DNAT"),
    Case("lb-source-denied", "node1", "client", lambda f: f.lb(11), 80, "DROP", 2),
    Case("no-endpoints-cluster-ip", "node1", "pod:client1", lambda f: f.svc(17), 80,
         "REJECT", 2),
    Case("no-endpoints-nodeport", "node2", "client", lambda f: f.node("node2"), 30204,
         "REJECT", 2),
    Case("masquerade-all", "node2", "pod:web-b", lambda f: f.svc(23), 80, "DNAT", 3),
)
@pytest.fixture(scope="module")
def synced(lab: Lab) -> Lab:
    """The lab with every case's dual-stack services synced (node2 with --masquerade-all)."""
    lab.sync(*objects(), nodes=("node1",))
    lab.sync(*objects(), nodes=("node2",), flags=("--masquerade-all",))
    return lab


def traced(lab: Lab, case: Case, fam: Family) -> dict[str, Any]:
    """`iptsync trace --live --json` run inside the node namespace the packet enters."""
    argv = [sys.executable, "-m", "iptsync.cli", "trace", "--live", "--json",
            "--iptables-backend", lab.backend, "--cluster-cidr", "10.0.0.0/14,fd00:10:244::/56",
            "--src", case.src(fam), "--dst", join_host_port(case.dst(fam), case.port)]
    result = lab.cluster.exec(case.node, argv, check=False)
    assert 0 == result.returncode, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_trace_agrees_with_real_packets(synced: Lab, case: Case, fam: Family) -> None:
    """The live trace knows the node's address of the packet's family, and its verdict,
    endpoints and masquerade match what real requests get."""
    pod_by_endpoint = {join_host_port(fam.pod(name), 8080): name for name in PODS}
    trace = traced(synced, case, fam)
    assert ("external" if case.sender == "client" else "pod") == trace["packet"]["from"]
    assert fam.node(case.node) in trace["node_ips"]  # the node's own address of the family
    assert [] == trace["warnings"]
    assert case.verdict == trace["verdict"]
    replies = synced.ask(case.sender, case.dst(fam), case.port, count=case.count,
                         timeout=(0.5 if case.verdict == "DROP" else
                                  3.0 if case.verdict == "REJECT" else 1.0))
    if case.verdict == "DROP":
        assert {"timeout"} == errors(replies)
    elif case.verdict == "REJECT":
        assert {"refused"} == errors(replies)
    else:
        predicted = {pod_by_endpoint[ep] for ep, p in trace["endpoints"].items() if p > 0}
        assert predicted == set(servers(replies))
        assert trace["masquerade"] == any(r.seen_as_ip != case.src(fam) for r in replies)
