"""Real packets through rendered rules: a two-node dual-stack namespace cluster, on both
backends, each behaviour over IPv4 and over IPv6 (the ``fam`` fixture).

Conventions (the seed documents' address plan, and its IPv6 twin; :class:`Family`):
  nodes 10.100.0.2 / fd00:100::2 (node1) and 10.100.0.3 / fd00:100::3 (node2); external
  client 10.100.0.100 / fd00:100::100
  pods 10.0.0.0/14 and fd00:10:244::/56: node1 10.0.1.0/24 and fd00:10:244:1::/64, node2
  10.0.2.0/24 and fd00:10:244:2::/64; services 10.96.0.0/12 and fd00:10:96::/112
  external and load-balancer IPs from 198.51.100.0/24 / 2001:db8:198::/64 and
  203.0.113.0/24 / 2001:db8:203::/64, routed by the client via node1.
Pods run echo servers (TCP and UDP 8080, both families) that answer with their name and the
source address they saw, so each test checks which endpoints answered and whether the client's
address was kept or masqueraded. iptsync runs inside each node namespace as `iptsync run --once`.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iptsync.lab.topology import Cluster, ClusterSpec, PodSpec, Reply, cleanup_stale

pytestmark = pytest.mark.netns

CLUSTER_CIDRS = "10.0.0.0/14,fd00:10:244::/56"
CLIENT = "10.100.0.100"
NODE_IPS = {"node1": "10.100.0.2", "node2": "10.100.0.3"}
NODE_IPS6 = {"node1": "fd00:100::2", "node2": "fd00:100::3"}
PODS = {  # name: (node, ip, ip6)
    "server1": ("node1", "10.0.1.2", "fd00:10:244:1::2"),
    "client1": ("node1", "10.0.1.3", "fd00:10:244:1::3"),
    "web-a": ("node1", "10.0.1.10", "fd00:10:244:1::10"),
    "server2": ("node2", "10.0.2.2", "fd00:10:244:2::2"),
    "web-b": ("node2", "10.0.2.10", "fd00:10:244:2::10"),
}
REJECT_BOUND6 = 2.5
"""Seconds within which a connection to an IPv6 service without endpoints must be refused.
Linux reports the ICMPv6 port unreachable of the REJECT rule to connect() only at the first
SYN retransmission, about 1 s after the SYN (IPv4: at once)."""


class Family:
    """One IP family's addresses in the lab; ``n`` in :meth:`svc`, :meth:`lb` and :meth:`ext`
    is written the same in both (10.96.0.53 and fd00:10:96::53)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.v6 = name == "IPv6"

    def __repr__(self) -> str:
        return self.name

    @property
    def client(self) -> str:
        return "fd00:100::100" if self.v6 else CLIENT

    @property
    def node_ips(self) -> dict[str, str]:
        return NODE_IPS6 if self.v6 else NODE_IPS

    def node(self, name: str) -> str:
        return self.node_ips[name]

    def pod(self, name: str) -> str:
        return PODS[name][2 if self.v6 else 1]

    def svc(self, n: int) -> str:
        return f"fd00:10:96::{n}" if self.v6 else f"10.96.0.{n}"

    def ext(self, n: int) -> str:
        return f"2001:db8:198::{n}" if self.v6 else f"198.51.100.{n}"

    def lb(self, n: int) -> str:
        return f"2001:db8:203::{n}" if self.v6 else f"203.0.113.{n}"

    def only(self, ip: str) -> str:
        """``ip`` as a one-address range."""
        return str(ipaddress.ip_network(ip))

    @property
    def elsewhere(self) -> str:
        """A source range the lab's client is not in."""
        return "2001:db8:192::/64" if self.v6 else "192.0.2.0/24"


FAMILIES = (Family("IPv4"), Family("IPv6"))


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def fam(request: pytest.FixtureRequest) -> Family:
    """Each test's IP family: the services, slices and requests are all of it."""
    return request.param  # type: ignore[no-any-return]


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
                    "--cluster-cidr", CLUSTER_CIDRS]
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
    spec = ClusterSpec(pods=tuple(PodSpec(name, node, ip, ip6=ip6)
                                  for name, (node, ip, ip6) in PODS.items()))
    workdir = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as env, Cluster(spec) as cluster:
        # The lab's namespaces are this module's alone, so its syncs take an xtables lock of
        # their own: other programs' legacy restores elsewhere on the machine hold the host's
        # /run/xtables.lock for seconds and would time these syncs out.
        env.setenv("XTABLES_LOCKFILE", str(workdir / "xtables.lock"))
        for fam in FAMILIES:
            cluster.route_from_client(f"{fam.ext(0)}/{112 if fam.v6 else 24}", via_node="node1")
            cluster.route_from_client(f"{fam.lb(0)}/{112 if fam.v6 else 24}", via_node="node1")
            cluster.route_from_client(f"{fam.svc(0)}/{112 if fam.v6 else 12}", via_node="node1")
        yield Lab(cluster, request.param, workdir)


def service(name: str, *cluster_ips: str, port: int = 80, proto: str = "TCP",
            node_port: int | None = None, status: dict[str, Any] | None = None,
            **spec: Any) -> dict[str, Any]:
    """A Service of the family of its cluster IP, or dual-stack given one of each family."""
    port_spec: dict[str, Any] = {"name": "p", "port": port, "protocol": proto,
                                 "targetPort": 8080}
    if node_port:
        port_spec["nodePort"] = node_port
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips]
    if len(cluster_ips) > 1:
        spec |= {"clusterIPs": list(cluster_ips), "ipFamilies": families,
                 "ipFamilyPolicy": "RequireDualStack"}
    elif families == ["IPv6"]:
        spec["ipFamilies"] = families
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "test"},
            "spec": {"clusterIP": cluster_ips[0], "ports": [port_spec], **spec},
            "status": status or {}}


def endpoints(fam: Family, service_name: str, *pods: str, proto: str = "TCP",
              conditions: dict[str, bool] | None = None,
              zones: dict[str, str] | None = None) -> dict[str, Any]:
    """An EndpointSlice of ``fam``; ``zones`` maps a pod to the zone it is hinted for."""
    items = []
    for pod in pods:
        item: dict[str, Any] = {"addresses": [fam.pod(pod)], "nodeName": PODS[pod][0],
                                "conditions": conditions or {"ready": True}}
        if zones:
            item["hints"] = {"forZones": [{"name": zones[pod]}]}
        items.append(item)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-{fam.name.lower()}", "namespace": "test",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": fam.name,
            "ports": [{"name": "p", "port": 8080, "protocol": proto}],
            "endpoints": items}


def node(name: str, zone: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IPS[name]},
                                     {"type": "InternalIP", "address": NODE_IPS6[name]}]}}


def servers(replies: list[Reply]) -> Counter[str]:
    assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]
    return Counter(r.server for r in replies if r.server)


def errors(replies: list[Reply]) -> set[str | None]:
    return {r.error for r in replies}


def test_cluster_ip_spreads_over_endpoints_and_keeps_pod_source(lab: Lab, fam: Family) -> None:
    """Pod -> ClusterIP reaches every endpoint (about evenly) and the server sees the pod."""
    lab.sync(service("web", fam.svc(10)), endpoints(fam, "web", "server1", "server2", "web-b"))
    replies = lab.ask("pod:client1", fam.svc(10), 80, count=90)
    spread = servers(replies)
    assert {"server1", "server2", "web-b"} == set(spread)
    assert min(spread.values()) >= 10  # 1/3 each; fewer than 10 of 90 is p < 1e-4
    assert {fam.pod("client1")} == {r.seen_as_ip for r in replies}


def test_cluster_ip_from_the_node_itself(lab: Lab, fam: Family) -> None:
    """Host-network processes (nat OUTPUT) reach the service too."""
    lab.sync(service("web", fam.svc(10)), endpoints(fam, "web", "server2"))
    assert {"server2": 3} == servers(lab.ask("node1", fam.svc(10), 80, count=3))


def test_hairpin_is_masqueraded(lab: Lab, fam: Family) -> None:
    """A pod reaching itself through its service sees a masqueraded source, not its own IP."""
    lab.sync(service("self", fam.svc(11)), endpoints(fam, "self", "server1"))
    replies = lab.ask("pod:server1", fam.svc(11), 80, count=2)
    assert {"server1": 2} == servers(replies)
    assert fam.pod("server1") not in {r.seen_as_ip for r in replies}


def test_nodeport_from_outside_on_every_node_is_masqueraded(lab: Lab, fam: Family) -> None:
    """The external client reaches the NodePort on both nodes' addresses of the family; pods
    see a node address."""
    lab.sync(service("np", fam.svc(12), type="NodePort", node_port=30200),
             endpoints(fam, "np", "server1", "server2"))
    for node_ip in fam.node_ips.values():
        replies = lab.ask("client", node_ip, 30200, count=40)
        assert {"server1", "server2"} == set(servers(replies))
        assert {r.seen_as_ip for r in replies} <= set(fam.node_ips.values())


def test_localhost_nodeport_works_from_the_node(lab: Lab) -> None:
    """127.0.0.1:NODEPORT on a node reaches the service (route_localnet and the guard rule);
    IPv4 only: kube-proxy has no localhost NodePorts on IPv6."""
    lab.sync(service("np", "10.96.0.12", type="NodePort", node_port=30200),
             endpoints(Family("IPv4"), "np", "server2"))
    assert {"server2": 2} == servers(lab.ask("node1", "127.0.0.1", 30200, count=2))


def test_external_traffic_policy_local_keeps_source_and_drops_without_local_endpoint(
        lab: Lab, fam: Family) -> None:
    """ETP=Local: node1 serves only its local pod with the client's own address; node2 drops."""
    lab.sync(service("local", fam.svc(13), type="NodePort", node_port=30201,
                     externalTrafficPolicy="Local"),
             endpoints(fam, "local", "web-a"))
    replies = lab.ask("client", fam.node("node1"), 30201, count=10)
    assert {"web-a": 10} == servers(replies)
    assert {fam.client} == {r.seen_as_ip for r in replies}
    assert {"timeout"} == errors(lab.ask("client", fam.node("node2"), 30201, count=2,
                                         timeout=0.5))
    # Pods still reach it through the node port of a node without local endpoints (EXT -> SVC).
    assert {"web-a": 3} == servers(lab.ask("pod:server2", fam.node("node2"), 30201, count=3))


def test_external_ip_is_reached_and_masqueraded(lab: Lab, fam: Family) -> None:
    """Traffic from outside to an external IP is DNATed to the pods and masqueraded."""
    lab.sync(service("ext", fam.svc(14), externalIPs=[fam.ext(10)]),
             endpoints(fam, "ext", "server2"))
    replies = lab.ask("client", fam.ext(10), 80, count=3)
    assert {"server2": 3} == servers(replies)
    assert fam.client not in {r.seen_as_ip for r in replies}


def test_load_balancer_source_ranges_allow_and_drop(lab: Lab, fam: Family) -> None:
    """An LB IP admits sources in loadBalancerSourceRanges and drops everything else."""
    allowed = service("lb-open", fam.svc(15), type="LoadBalancer", node_port=30202,
                      loadBalancerSourceRanges=[fam.only(fam.client)],
                      status={"loadBalancer": {"ingress": [{"ip": fam.lb(10)}]}})
    denied = service("lb-closed", fam.svc(16), type="LoadBalancer", node_port=30203,
                     loadBalancerSourceRanges=[fam.elsewhere],
                     status={"loadBalancer": {"ingress": [{"ip": fam.lb(11)}]}})
    lab.sync(allowed, endpoints(fam, "lb-open", "server1", "server2"), denied,
             endpoints(fam, "lb-closed", "server1"))
    assert {"server1", "server2"} == set(servers(lab.ask("client", fam.lb(10), 80, count=30)))
    assert {"timeout"} == errors(lab.ask("client", fam.lb(11), 80, count=2, timeout=0.5))
    # NodePorts are not subject to source ranges, as in kube-proxy.
    assert {"server1": 2} == servers(lab.ask("client", fam.node("node1"), 30203, count=2))


def test_service_without_endpoints_rejects(lab: Lab, fam: Family) -> None:
    """No endpoints: TCP and UDP to the cluster IP and TCP to the NodePort are refused, not
    left to time out (IPv6 TCP within REJECT_BOUND6 per connection)."""
    lab.sync(service("none", fam.svc(17), type="NodePort", node_port=30204),
             service("none-udp", fam.svc(18), proto="UDP"))
    timeout = REJECT_BOUND6 + 2 if fam.v6 else 1.0
    for source, ip, port, proto in (("pod:client1", fam.svc(17), 80, "tcp"),
                                    ("pod:client1", fam.svc(18), 80, "udp"),
                                    ("client", fam.node("node2"), 30204, "tcp")):
        started = time.monotonic()
        replies = lab.ask(source, ip, port, count=2, proto=proto, timeout=timeout)
        took = (time.monotonic() - started) / 2
        assert ({"refused"}, True) == (errors(replies), took < REJECT_BOUND6), (ip, proto, took)


def test_session_affinity_pins_a_client_to_one_endpoint(lab: Lab, fam: Family) -> None:
    """sessionAffinity ClientIP: every request from one client goes to the same pod."""
    lab.sync(service("sticky", fam.svc(19), sessionAffinity="ClientIP"),
             endpoints(fam, "sticky", "server1", "server2", "web-a", "web-b"))
    assert 1 == len(servers(lab.ask("pod:client1", fam.svc(19), 80, count=20)))


def test_internal_traffic_policy_local_uses_node_local_endpoints(lab: Lab, fam: Family) -> None:
    """ITP=Local: each node sends cluster-IP traffic only to its own endpoints."""
    lab.sync(service("itp", fam.svc(20), internalTrafficPolicy="Local"),
             endpoints(fam, "itp", "web-a", "web-b"))
    assert {"web-a": 10} == servers(lab.ask("pod:client1", fam.svc(20), 80, count=10))
    assert {"web-b": 10} == servers(lab.ask("node2", fam.svc(20), 80, count=10))


def test_off_cluster_traffic_to_cluster_ip_is_masqueraded(lab: Lab, fam: Family) -> None:
    """A client routing the service range via a node reaches it, masqueraded (! -s CIDR)."""
    lab.sync(service("web", fam.svc(10)), endpoints(fam, "web", "server2"))
    replies = lab.ask("client", fam.svc(10), 80, count=3)
    assert {"server2": 3} == servers(replies)
    assert {fam.node("node1")} == {r.seen_as_ip for r in replies}


def test_terminating_endpoints_serve_when_none_is_ready(lab: Lab, fam: Family) -> None:
    """Only serving-terminating endpoints left: they still get the traffic."""
    lab.sync(service("drain", fam.svc(21)),
             endpoints(fam, "drain", "server2",
                       conditions={"ready": False, "serving": True, "terminating": True}))
    assert {"server2": 3} == servers(lab.ask("pod:client1", fam.svc(21), 80, count=3))


def test_pinned_udp_flow_moves_to_the_new_endpoint(lab: Lab, fam: Family) -> None:
    """A UDP flow stays on its old endpoint until conntrack cleanup, then follows the service."""
    dns = service("dns", fam.svc(53), port=53, proto="UDP")
    lab.sync(dns, endpoints(fam, "dns", "server1", proto="UDP"))

    def ask() -> list[Reply]:
        return lab.ask("pod:client1", fam.svc(53), 53, proto="udp", src_port=40053)

    assert {"server1": 1} == servers(ask())
    moved = endpoints(fam, "dns", "server2", proto="UDP")
    lab.sync(dns, moved, conntrack_cleanup=False)
    assert {"server1": 1} == servers(ask())  # the conntrack entry still pins the old pod
    lab.sync(dns, moved)
    assert {"server2": 2} == servers(ask() + ask())


def test_topology_hints_keep_traffic_in_the_zone(lab: Lab, fam: Family) -> None:
    """With zone hints on every endpoint, each node uses only the endpoints for its zone."""
    lab.sync(node("node1", "zone-a"), node("node2", "zone-b"),
             service("zonal", fam.svc(22)),
             endpoints(fam, "zonal", "web-a", "server1", "web-b",
                       zones={"web-a": "zone-a", "server1": "zone-a", "web-b": "zone-b"}))
    assert {"web-a", "server1"} == set(servers(lab.ask("pod:client1", fam.svc(22), 80,
                                                       count=30)))
    assert {"web-b": 10} == servers(lab.ask("node2", fam.svc(22), 80, count=10))


def test_masquerade_all_hides_pod_sources(lab: Lab, fam: Family) -> None:
    """--masquerade-all: even pod -> cluster IP traffic reaches the pod from a node address."""
    lab.sync(service("web", fam.svc(10)), endpoints(fam, "web", "server2"),
             flags=("--masquerade-all",))
    replies = lab.ask("pod:client1", fam.svc(10), 80, count=3)
    assert {"server2": 3} == servers(replies)
    assert {fam.node("node1")} == {r.seen_as_ip for r in replies}
