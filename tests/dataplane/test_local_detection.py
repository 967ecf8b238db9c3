"""Masquerade under each local traffic detection mode, with real packets, on both backends.

Conventions: the lab's two nodes (node1 10.100.0.2, node2 10.100.0.3; pods in 10.0.0.0/14,
node1's in 10.0.1.0/24, node2's in 10.0.2.0/24). node1's pods sit behind routed veths, which
the lab names ``vp<N>``; node2's pods are moved behind the bridge ``cbr0``. The outside client
10.100.0.100 sends 10.96.1.0/24 via node1 and 10.96.2.0/24 via node2, and also owns
10.0.9.100: inside the cluster CIDR, in no node's pod CIDR, on no pod interface. Each mode's
rules are synced by an engine run in the node's namespace; a ClusterIP service's echo server
on the same node reports the source address it saw.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from iptsync.core.policy import Settings
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.port import Backend
from iptsync.lab import netns
from iptsync.lab.topology import Cluster, ClusterSpec, PodSpec, cleanup_stale

pytestmark = pytest.mark.netns

CLIENT = "10.100.0.100"
NODE_IPS = {"node1": "10.100.0.2", "node2": "10.100.0.3"}
POD_CIDRS = {"node1": "10.0.1.0/24", "node2": "10.0.2.0/24"}
PODS = {"server1": ("node1", "10.0.1.2"), "client1": ("node1", "10.0.1.3"),
        "server2": ("node2", "10.0.2.2"), "client2": ("node2", "10.0.2.3")}
SERVICE_IPS = {"node1": "10.96.1.10", "node2": "10.96.2.10"}
IN_CLUSTER_CIDR = "10.0.9.100"  # the outside client's second address




@dataclass
class DetectLab:
    """The cluster, and the backend whose rules each test syncs into it."""

    cluster: Cluster
    backend: Backend

    def sync(self, node: str, server: str, *, pod_cidr: bool = True,
             etp_local_node_port: int | None = None, **settings: Any) -> None:
        """Sync ``node``'s rules under ``settings`` for one service whose endpoint is the
        echo server ``server``: a ClusterIP one, or with ``etp_local_node_port`` a NodePort
        one with externalTrafficPolicy Local. The Node has its pod CIDR if ``pod_cidr``."""
        engine = Engine(Netfilter(self.backend, netns=self.cluster.ns(node)), Settings(
            node_name=node, cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
            node_ips=(ipaddress.ip_address(NODE_IPS[node]),), **settings))
        port: dict[str, Any] = {"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}
        spec: dict[str, Any] = {"clusterIP": SERVICE_IPS[node], "ports": [port]}
        if etp_local_node_port:
            port["nodePort"] = etp_local_node_port
            spec.update(type="NodePort", externalTrafficPolicy="Local")
        engine.upsert({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                       "spec": {"podCIDRs": [POD_CIDRS[node]]} if pod_cidr else {}})
        engine.upsert({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "web", "namespace": "test"}, "spec": spec})
        engine.upsert({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"name": "web-1", "namespace": "test",
                                    "labels": {"kubernetes.io/service-name": "web"}},
                       "addressType": "IPv4",
                       "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
                       "endpoints": [{"addresses": [PODS[server][1]], "nodeName": PODS[server][0],
                                      "conditions": {"ready": True}}]})
        engine.sync()

    def seen(self, node: str) -> dict[str, set[str | None]]:
        """The source addresses the service's server saw, per client: a pod on ``node``,
        the outside client, and the outside client's address inside the cluster CIDR."""
        client = "pod:client1" if node == "node1" else "pod:client2"
        asks = {"pod": (client, None), "outside": ("client", None),
                "in-cluster-cidr": ("client", IN_CLUSTER_CIDR)}
        out = {}
        for name, (source, src_ip) in asks.items():
            replies = self.cluster.ask(source, "tcp", SERVICE_IPS[node], 80, count=2,
                                       src_ip=src_ip)
            assert all(r.ok for r in replies), [r.error for r in replies]
            out[name] = {r.seen_as_ip for r in replies}
        return out


@pytest.fixture(scope="module", params=["nft", "legacy"])
def lab(request: pytest.FixtureRequest, netns_available: None,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[DetectLab]:
    cleanup_stale()
    spec = ClusterSpec(pods=tuple(PodSpec(name, node, ip) for name, (node, ip) in PODS.items()))
    workdir = tmp_path_factory.mktemp(f"detect-{request.param}")
    with pytest.MonkeyPatch.context() as env, Cluster(spec) as cluster:
        # These namespaces are this module's alone: an xtables lock of their own, as
        # test_traffic's (other programs' legacy restores hold the host's for seconds).
        env.setenv("XTABLES_LOCKFILE", str(workdir / "xtables.lock"))
        netns.ip(cluster.client_ns, "addr", "add", f"{IN_CLUSTER_CIDR}/32", "dev", "eth0")
        for node, service_ip in SERVICE_IPS.items():
            cluster.route_from_client(f"{service_ip}/32", node)
            netns.ip(cluster.ns(node), "route", "add", f"{IN_CLUSTER_CIDR}/32",
                     "via", cluster.client_ip, "dev", "eth0")
        bridge_pods(cluster, "node2", "cbr0")
        yield DetectLab(cluster, Backend(request.param))


def bridge_pods(cluster: Cluster, node: str, bridge: str) -> None:
    """Put ``node``'s pod veths into ``bridge``: their traffic then arrives on the bridge, and
    the bridge answers the pods' ARP for their gateway as the veths did."""
    ns = cluster.ns(node)
    netns.ip_batch(ns, [f"link add {bridge} type bridge", f"link set {bridge} up"])
    netns.set_sysctls(ns, {f"net.ipv4.conf.{bridge}.proxy_arp": 1,
                           f"net.ipv4.conf.{bridge}.rp_filter": 0,
                           f"net.ipv4.neigh.{bridge}.proxy_delay": 0})
    pods = [pod for pod in cluster.pods.values() if pod.node == node]
    netns.ip_batch(ns, [f"link set {pod.host_veth} master {bridge}" for pod in pods]
                   + [f"route replace {pod.ip}/32 dev {bridge}" for pod in pods])


MODES = {  # id: (node, settings, whether the Node has its pod CIDR)
    "cluster-cidr": ("node1", {}, True),
    "node-cidr": ("node1", {"detect_local_mode": "NodeCIDR"}, True),
    "interface-name-prefix": ("node1", {"detect_local_mode": "InterfaceNamePrefix",
                                        "interface_name_prefix": "vp"}, True),
    "bridge-interface": ("node2", {"detect_local_mode": "BridgeInterface",
                                   "bridge_interface": "cbr0"}, True),
    "node-cidr-without-pod-cidr": ("node1", {"detect_local_mode": "NodeCIDR"}, False),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_cluster_ip_masquerades_what_the_mode_does_not_call_a_pod(lab: DetectLab,
                                                                   mode: str) -> None:
    """A pod on the node keeps its source; the outside client is masqueraded to the node's
    address; its address inside the cluster CIDR is a pod only to ClusterCIDR; and with the
    mode's input missing (kube-proxy's no-op detector) nothing is masqueraded."""
    node, settings, pod_cidr = MODES[mode]
    lab.sync(node, "server1" if node == "node1" else "server2", pod_cidr=pod_cidr, **settings)
    pod_ip = PODS["client1" if node == "node1" else "client2"][1]
    masqueraded = {NODE_IPS[node]}
    expected = {
        "cluster-cidr": {"pod": {pod_ip}, "outside": masqueraded,
                         "in-cluster-cidr": {IN_CLUSTER_CIDR}},
        "node-cidr-without-pod-cidr": {"pod": {pod_ip}, "outside": {CLIENT},
                                       "in-cluster-cidr": {IN_CLUSTER_CIDR}},
    }.get(mode, {"pod": {pod_ip}, "outside": masqueraded, "in-cluster-cidr": masqueraded})
    assert expected == lab.seen(node)


@pytest.mark.parametrize("mode", ["interface-name-prefix", "node-cidr-without-pod-cidr"])
def test_pods_skip_etp_local_only_when_told_apart(lab: DetectLab, mode: str) -> None:
    """A pod on node1 connecting to node1's NodePort of an externalTrafficPolicy=Local
    service whose only endpoint is on node2 reaches it with its source kept when the mode
    tells pods apart (-i vp+); with the no-op detector it is an outside client of a node
    without a local endpoint, and is dropped."""
    node, settings, pod_cidr = MODES[mode]
    lab.sync(node, "server2", pod_cidr=pod_cidr, etp_local_node_port=30080, **settings)
    replies = lab.cluster.ask("pod:client1", "tcp", NODE_IPS["node1"], 30080, count=2,
                              timeout=0.5)
    expected = ({("server2", PODS["client1"][1])} if mode == "interface-name-prefix"
                else {(None, None)})
    assert expected == {(r.server, r.seen_as_ip) for r in replies}
