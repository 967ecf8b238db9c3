"""``iptsync trace --live`` against real packets: the tracer predicts what the kernel does.

For each case the lab's nodes hold the synced rules, ``iptsync trace --live --json`` runs
inside the namespace of the node the packet enters, and real requests then take the same
path. The tracer and the packets must agree: the endpoints with a non-zero probability are
exactly the pods that answered, ``masquerade`` is whether the pods saw another source than
the client, DROP shows as a timeout and REJECT as a refused connection.

All services are synced once per backend: node1 with the default flags, node2 with
``--masquerade-all``, so one sync covers every case (ETP=Local drops and REJECTs do not
depend on masquerading).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from .test_traffic import CLIENT, NODE_IPS, PODS, Lab, endpoints, errors, servers, service

pytestmark = pytest.mark.netns

POD_BY_ENDPOINT = {f"{ip}:8080": name for name, (_, ip) in PODS.items()}
OBJECTS = (
    service("web", "10.96.0.10"), endpoints("web", "server1", "server2", "web-b"),
    service("np", "10.96.0.12", type="NodePort", node_port=30200),
    endpoints("np", "server1", "server2"),
    service("local", "10.96.0.13", type="NodePort", node_port=30201,
            externalTrafficPolicy="Local"),
    endpoints("local", "web-a"),
    service("lb-open", "10.96.0.15", type="LoadBalancer", node_port=30202,
            loadBalancerSourceRanges=["10.100.0.100/32"],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}),
    endpoints("lb-open", "server1", "server2"),
    service("lb-closed", "10.96.0.16", type="LoadBalancer", node_port=30203,
            loadBalancerSourceRanges=["192.0.2.0/24"],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.11"}]}}),
    endpoints("lb-closed", "server1"),
    service("none", "10.96.0.17", type="NodePort", node_port=30204),
    service("solo", "10.96.0.23"), endpoints("solo", "server1"),
)


@dataclass(frozen=True)
class Case:
    """A connection: the node it enters, where it is sent from, and the expected verdict."""

    name: str
    node: str
    sender: str  # lab namespace key
    src: str
    dst: str
    port: int
    verdict: str
    count: int = 20


CASES = (
    Case("cluster-ip-spread", "node1", "pod:client1", "10.0.1.3", "10.96.0.10", 80, "DNAT", 30),
    Case("nodeport-from-outside", "node1", "client", CLIENT, NODE_IPS["node1"], 30200, "DNAT"),
    Case("etp-local-with-endpoint", "node1", "client", CLIENT, NODE_IPS["node1"], 30201,
         "DNAT", 5),
    Case("etp-local-without-endpoint", "node2", "client", CLIENT, NODE_IPS["node2"], 30201,
         "DROP", 2),
    Case("lb-source-allowed", "node1", "client", CLIENT, "203.0.113.10", 80, "DNAT"),
    Case("lb-source-denied", "node1", "client", CLIENT, "203.0.113.11", 80, "DROP", 2),
    Case("no-endpoints-cluster-ip", "node1", "pod:client1", "10.0.1.3", "10.96.0.17", 80,
         "REJECT", 2),
    Case("no-endpoints-nodeport", "node2", "client", CLIENT, NODE_IPS["node2"], 30204,
         "REJECT", 2),
    Case("masquerade-all", "node2", "pod:web-b", "10.0.2.10", "10.96.0.23", 80, "DNAT", 3),
)


@pytest.fixture(scope="module")
def synced(lab: Lab) -> Lab:
    """The lab with every case's services synced (node2 with --masquerade-all)."""
    lab.sync(*OBJECTS, nodes=("node1",))
    lab.sync(*OBJECTS, nodes=("node2",), flags=("--masquerade-all",))
    return lab


def traced(lab: Lab, case: Case) -> dict[str, Any]:
    """`iptsync trace --live --json` run inside the node namespace the packet enters."""
    argv = [sys.executable, "-m", "iptsync.cli", "trace", "--live", "--json",
            "--iptables-backend", lab.backend, "--cluster-cidr", "10.0.0.0/14",
            "--src", case.src, "--dst", f"{case.dst}:{case.port}"]
    result = lab.cluster.exec(case.node, argv, check=False)
    assert 0 == result.returncode, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_trace_agrees_with_real_packets(synced: Lab, case: Case) -> None:
    """The live trace's verdict, endpoints and masquerade match what real requests get."""
    trace = traced(synced, case)
    assert ("external" if case.sender == "client" else "pod") == trace["packet"]["from"]
    assert [] == trace["warnings"]
    assert case.verdict == trace["verdict"]
    replies = synced.ask(case.sender, case.dst, case.port, count=case.count,
                         timeout=0.5 if case.verdict == "DROP" else 1.0)
    if case.verdict == "DROP":
        assert {"timeout"} == errors(replies)
    elif case.verdict == "REJECT":
        assert {"refused"} == errors(replies)
    else:
        predicted = {POD_BY_ENDPOINT[ep] for ep, p in trace["endpoints"].items() if p > 0}
        assert predicted == set(servers(replies))
        assert trace["masquerade"] == any(r.seen_as_ip != case.src for r in replies)
