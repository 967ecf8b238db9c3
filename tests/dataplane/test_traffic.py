"""Real packets through rendered rules: a two-node namespace cluster, on both backends.

Conventions (the seed documents' address plan):
  nodes 10.100.0.2 (node1) and 10.100.0.3 (node2); external client 10.100.0.100
  pods 10.0.0.0/14: node1 10.0.1.0/24, node2 10.0.2.0/24; services 10.96.0.0/12
  external and load-balancer IPs from 198.51.100.0/24 and 203.0.113.0/24, routed by the
  client via node1.
Pods run echo servers (TCP and UDP 8080) that answer with their name and the source address
they saw, so each test checks which endpoints answered and whether the client's address was
kept or masqueraded. iptsync runs inside each node namespace as `iptsync run --once`.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iptsync.lab.topology import Cluster, ClusterSpec, PodSpec, Reply, cleanup_stale

pytestmark = pytest.mark.netns

CLIENT = "10.100.0.100"
NODE_IPS = {"node1": "10.100.0.2", "node2": "10.100.0.3"}
PODS = {  # name: (node, ip)
    "server1": ("node1", "10.0.1.2"),
    "client1": ("node1", "10.0.1.3"),
    "web-a": ("node1", "10.0.1.10"),
    "server2": ("node2", "10.0.2.2"),
    "web-b": ("node2", "10.0.2.10"),
}


class Lab:
    """A cluster plus the means to sync manifests into every node with one backend."""

    def __init__(self, cluster: Cluster, backend: str, workdir: Path) -> None:
        self.cluster = cluster
        self.backend = backend
        self.workdir = workdir
        self.generation = 0

    def sync(self, *objects: dict[str, Any], conntrack_cleanup: bool = True,
             nodes: tuple[str, ...] = ("node1", "node2"), flags: tuple[str, ...] = ()) -> None:
        self.generation += 1
        path = self.workdir / f"objects-{self.generation}.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        for node in nodes:
            argv = [sys.executable, "-m", "iptsync.cli", "run", "--once", "--iptables-backend",
                    self.backend, "--objects", str(path), "--hostname-override", node,
                    "--cluster-cidr", "10.0.0.0/14"]
            if not conntrack_cleanup:
                argv.append("--no-conntrack-cleanup")
            argv.extend(flags)
            result = self.cluster.exec(node, argv, check=False)
            assert 0 == result.returncode, result.stderr

    def ask(self, source: str, ip: str, port: int, *, count: int = 1, proto: str = "tcp",
            timeout: float = 1.0, src_port: int | None = None) -> list[Reply]:
        return self.cluster.ask(source, proto, ip, port, count=count, timeout=timeout,
                                src_port=src_port)


@pytest.fixture(scope="module", params=["nft", "legacy"])
def lab(request: pytest.FixtureRequest, netns_available: None,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    cleanup_stale()
    spec = ClusterSpec(pods=tuple(PodSpec(name, node, ip) for name, (node, ip) in PODS.items()))
    with Cluster(spec) as cluster:
        cluster.route_from_client("198.51.100.0/24", via_node="node1")
        cluster.route_from_client("203.0.113.0/24", via_node="node1")
        cluster.route_from_client("10.96.0.0/12", via_node="node1")
        yield Lab(cluster, request.param, tmp_path_factory.mktemp(request.param))


def service(name: str, cluster_ip: str, *, port: int = 80, proto: str = "TCP",
            node_port: int | None = None, status: dict[str, Any] | None = None,
            **spec: Any) -> dict[str, Any]:
    port_spec: dict[str, Any] = {"name": "p", "port": port, "protocol": proto,
                                 "targetPort": 8080}
    if node_port:
        port_spec["nodePort"] = node_port
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "test"},
            "spec": {"clusterIP": cluster_ip, "ports": [port_spec], **spec},
            "status": status or {}}


def endpoints(service_name: str, *pods: str, proto: str = "TCP",
              conditions: dict[str, bool] | None = None,
              zones: dict[str, str] | None = None) -> dict[str, Any]:
    """An EndpointSlice; ``zones`` maps a pod to the zone it is hinted for."""
    items = []
    for pod in pods:
        item: dict[str, Any] = {"addresses": [PODS[pod][1]], "nodeName": PODS[pod][0],
                                "conditions": conditions or {"ready": True}}
        if zones:
            item["hints"] = {"forZones": [{"name": zones[pod]}]}
        items.append(item)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-1", "namespace": "test",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080, "protocol": proto}],
            "endpoints": items}


def node(name: str, zone: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IPS[name]}]}}


def servers(replies: list[Reply]) -> Counter[str]:
    assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]
    return Counter(r.server for r in replies if r.server)


def errors(replies: list[Reply]) -> set[str | None]:
    return {r.error for r in replies}


def test_cluster_ip_spreads_over_endpoints_and_keeps_pod_source(lab: Lab) -> None:
    """Pod -> ClusterIP reaches every endpoint (about evenly) and the server sees the pod."""
    lab.sync(service("web", "10.96.0.10"), endpoints("web", "server1", "server2", "web-b"))
    replies = lab.ask("pod:client1", "10.96.0.10", 80, count=90)
    spread = servers(replies)
    assert {"server1", "server2", "web-b"} == set(spread)
    assert min(spread.values()) >= 10  # 1/3 each; fewer than 10 of 90 is p < 1e-4
    assert {"10.0.1.3"} == {r.seen_as_ip for r in replies}


def test_cluster_ip_from_the_node_itself(lab: Lab) -> None:
    """Host-network processes (nat OUTPUT) reach the service too."""
    lab.sync(service("web", "10.96.0.10"), endpoints("web", "server2"))
    assert {"server2": 3} == servers(lab.ask("node1", "10.96.0.10", 80, count=3))


def test_hairpin_is_masqueraded(lab: Lab) -> None:
    """A pod reaching itself through its service sees a masqueraded source, not its own IP."""
    lab.sync(service("self", "10.96.0.11"), endpoints("self", "server1"))
    replies = lab.ask("pod:server1", "10.96.0.11", 80, count=2)
    assert {"server1": 2} == servers(replies)
    assert "10.0.1.2" not in {r.seen_as_ip for r in replies}


def test_nodeport_from_outside_on_every_node_is_masqueraded(lab: Lab) -> None:
    """The external client reaches the NodePort on both nodes; pods see a node address."""
    lab.sync(service("np", "10.96.0.12", type="NodePort", node_port=30200),
             endpoints("np", "server1", "server2"))
    for node_ip in NODE_IPS.values():
        replies = lab.ask("client", node_ip, 30200, count=40)
        assert {"server1", "server2"} == set(servers(replies))
        assert {r.seen_as_ip for r in replies} <= set(NODE_IPS.values())


def test_localhost_nodeport_works_from_the_node(lab: Lab) -> None:
    """127.0.0.1:NODEPORT on a node reaches the service (route_localnet and the guard rule)."""
    lab.sync(service("np", "10.96.0.12", type="NodePort", node_port=30200),
             endpoints("np", "server2"))
    assert {"server2": 2} == servers(lab.ask("node1", "127.0.0.1", 30200, count=2))


def test_external_traffic_policy_local_keeps_source_and_drops_without_local_endpoint(
        lab: Lab) -> None:
    """ETP=Local: node1 serves only its local pod with the client's own address; node2 drops."""
    lab.sync(service("local", "10.96.0.13", type="NodePort", node_port=30201,
                     externalTrafficPolicy="Local"),
             endpoints("local", "web-a"))
    replies = lab.ask("client", NODE_IPS["node1"], 30201, count=10)
    assert {"web-a": 10} == servers(replies)
    assert {CLIENT} == {r.seen_as_ip for r in replies}
    assert {"timeout"} == errors(lab.ask("client", NODE_IPS["node2"], 30201, count=2,
                                         timeout=0.5))
    # Pods still reach it through the node port of a node without local endpoints (EXT -> SVC).
    assert {"web-a": 3} == servers(lab.ask("pod:server2", NODE_IPS["node2"], 30201, count=3))


def test_external_ip_is_reached_and_masqueraded(lab: Lab) -> None:
    """Traffic from outside to an external IP is DNATed to the pods and masqueraded."""
    lab.sync(service("ext", "10.96.0.14", externalIPs=["198.51.100.10"]),
             endpoints("ext", "server2"))
    replies = lab.ask("client", "198.51.100.10", 80, count=3)
    assert {"server2": 3} == servers(replies)
    assert CLIENT not in {r.seen_as_ip for r in replies}


def test_load_balancer_source_ranges_allow_and_drop(lab: Lab) -> None:
    """An LB IP admits sources in loadBalancerSourceRanges and drops everything else."""
    allowed = service("lb-open", "10.96.0.15", type="LoadBalancer", node_port=30202,
                      loadBalancerSourceRanges=["10.100.0.100/32"],
                      status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}})
    denied = service("lb-closed", "10.96.0.16", type="LoadBalancer", node_port=30203,
                     loadBalancerSourceRanges=["192.0.2.0/24"],
                     status={"loadBalancer": {"ingress": [{"ip": "203.0.113.11"}]}})
    lab.sync(allowed, endpoints("lb-open", "server1", "server2"), denied,
             endpoints("lb-closed", "server1"))
    assert {"server1", "server2"} == set(servers(lab.ask("client", "203.0.113.10", 80,
                                                         count=30)))
    assert {"timeout"} == errors(lab.ask("client", "203.0.113.11", 80, count=2, timeout=0.5))
    # NodePorts are not subject to source ranges, as in kube-proxy.
    assert {"server1": 2} == servers(lab.ask("client", NODE_IPS["node1"], 30203, count=2))


def test_service_without_endpoints_rejects(lab: Lab) -> None:
    """No endpoints: TCP and UDP to the cluster IP and TCP to the NodePort are refused."""
    lab.sync(service("none", "10.96.0.17", type="NodePort", node_port=30204),
             service("none-udp", "10.96.0.18", proto="UDP"))
    assert {"refused"} == errors(lab.ask("pod:client1", "10.96.0.17", 80, count=2))
    assert {"refused"} == errors(lab.ask("pod:client1", "10.96.0.18", 80, count=2, proto="udp"))
    assert {"refused"} == errors(lab.ask("client", NODE_IPS["node2"], 30204, count=2))


def test_session_affinity_pins_a_client_to_one_endpoint(lab: Lab) -> None:
    """sessionAffinity ClientIP: every request from one client goes to the same pod."""
    lab.sync(service("sticky", "10.96.0.19", sessionAffinity="ClientIP"),
             endpoints("sticky", "server1", "server2", "web-a", "web-b"))
    assert 1 == len(servers(lab.ask("pod:client1", "10.96.0.19", 80, count=20)))


def test_internal_traffic_policy_local_uses_node_local_endpoints(lab: Lab) -> None:
    """ITP=Local: each node sends cluster-IP traffic only to its own endpoints."""
    lab.sync(service("itp", "10.96.0.20", internalTrafficPolicy="Local"),
             endpoints("itp", "web-a", "web-b"))
    assert {"web-a": 10} == servers(lab.ask("pod:client1", "10.96.0.20", 80, count=10))
    assert {"web-b": 10} == servers(lab.ask("node2", "10.96.0.20", 80, count=10))


def test_off_cluster_traffic_to_cluster_ip_is_masqueraded(lab: Lab) -> None:
    """A client routing the service range via a node reaches it, masqueraded (! -s CIDR)."""
    lab.sync(service("web", "10.96.0.10"), endpoints("web", "server2"))
    replies = lab.ask("client", "10.96.0.10", 80, count=3)
    assert {"server2": 3} == servers(replies)
    assert {NODE_IPS["node1"]} == {r.seen_as_ip for r in replies}


def test_terminating_endpoints_serve_when_none_is_ready(lab: Lab) -> None:
    """Only serving-terminating endpoints left: they still get the traffic."""
    lab.sync(service("drain", "10.96.0.21"),
             endpoints("drain", "server2",
                       conditions={"ready": False, "serving": True, "terminating": True}))
    assert {"server2": 3} == servers(lab.ask("pod:client1", "10.96.0.21", 80, count=3))


def test_pinned_udp_flow_moves_to_the_new_endpoint(lab: Lab) -> None:
    """A UDP flow stays on its old endpoint until conntrack cleanup, then follows the service."""
    dns = service("dns", "10.96.0.53", port=53, proto="UDP")
    lab.sync(dns, endpoints("dns", "server1", proto="UDP"))

    def ask() -> list[Reply]:
        return lab.ask("pod:client1", "10.96.0.53", 53, proto="udp", src_port=40053)

    assert {"server1": 1} == servers(ask())
    moved = endpoints("dns", "server2", proto="UDP")
    lab.sync(dns, moved, conntrack_cleanup=False)
    assert {"server1": 1} == servers(ask())  # the conntrack entry still pins the old pod
    lab.sync(dns, moved)
    assert {"server2": 2} == servers(ask() + ask())


def test_topology_hints_keep_traffic_in_the_zone(lab: Lab) -> None:
    """With zone hints on every endpoint, each node uses only the endpoints for its zone."""
    lab.sync(node("node1", "zone-a"), node("node2", "zone-b"),
             service("zonal", "10.96.0.22"),
             endpoints("zonal", "web-a", "server1", "web-b",
                       zones={"web-a": "zone-a", "server1": "zone-a", "web-b": "zone-b"}))
    assert {"web-a", "server1"} == set(servers(lab.ask("pod:client1", "10.96.0.22", 80,
                                                       count=30)))
    assert {"web-b": 10} == servers(lab.ask("node2", "10.96.0.22", 80, count=10))


def test_masquerade_all_hides_pod_sources(lab: Lab) -> None:
    """--masquerade-all: even pod -> cluster IP traffic reaches the pod from a node address."""
    lab.sync(service("web", "10.96.0.10"), endpoints("web", "server2"),
             flags=("--masquerade-all",))
    replies = lab.ask("pod:client1", "10.96.0.10", 80, count=3)
    assert {"server2": 3} == servers(replies)
    assert {NODE_IPS["node1"]} == {r.seen_as_ip for r in replies}
