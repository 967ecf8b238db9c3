"""Manifests for the conntrack tests: one UDP service of either IP family and its endpoints.

Conventions: node ``node1`` (10.100.0.2 / fd00:100::2) in zone ``a``; service ``dns`` in
``default``, cluster IP 10.96.0.10 / fd00:96::10, UDP 53 -> 5353, NodePort 30053, one
external IP 198.51.100.10 / 2001:db8:51::10; endpoints 10.0.1.x / fd00:1::x.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from iptsync.core.model import IPFamily
from iptsync.core.policy import Settings

NODE_IP = {IPFamily.IPV4: "10.100.0.2", IPFamily.IPV6: "fd00:100::2"}
CLUSTER_IP = {IPFamily.IPV4: "10.96.0.10", IPFamily.IPV6: "fd00:96::10"}
EXTERNAL_IP = {IPFamily.IPV4: "198.51.100.10", IPFamily.IPV6: "2001:db8:51::10"}
POD_CIDR = {IPFamily.IPV4: "10.0.0.0/16", IPFamily.IPV6: "fd00::/48"}
PORT, TARGET_PORT, NODE_PORT = 53, 5353, 30053


def pod_ip(family: IPFamily, index: int) -> str:
    """The address of endpoint ``index``: 10.0.1.<index> or fd00:1::<index>."""
    return f"10.0.1.{index}" if family is IPFamily.IPV4 else f"fd00:1::{index}"


def settings(family: IPFamily) -> Settings:
    """node1's settings for ``family``."""
    return Settings(node_name="node1", family=family,
                    cluster_cidrs=(ipaddress.ip_network(POD_CIDR[family]),),
                    node_ips=(ipaddress.ip_address(NODE_IP[family]),))


def dns_service(family: IPFamily, *, protocol: str = "UDP", kind: str = "NodePort",
                external_policy: str = "Cluster") -> dict[str, Any]:
    """The ``dns`` service, single-stack ``family``."""
    port: dict[str, Any] = {"name": "dns", "port": PORT, "protocol": protocol,
                            "targetPort": TARGET_PORT}
    if kind != "ClusterIP":
        port["nodePort"] = NODE_PORT
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "dns"},
            "spec": {"type": kind, "clusterIP": CLUSTER_IP[family],
                     "clusterIPs": [CLUSTER_IP[family]], "ipFamilies": [family.value],
                     "externalIPs": [EXTERNAL_IP[family]], "ports": [port],
                     **({"externalTrafficPolicy": external_policy} if kind != "ClusterIP"
                        else {})}}


def endpoint(family: IPFamily, index: int, *, ready: bool = True, serving: bool | None = None,
             terminating: bool = False, node: str = "node1", hints: tuple[str, ...] = ()
             ) -> dict[str, Any]:
    """Endpoint ``index`` with its conditions (serving defaults to ready)."""
    conditions = {"ready": ready, "serving": ready if serving is None else serving,
                  "terminating": terminating}
    extra: dict[str, Any] = {"hints": {"forZones": [{"name": z} for z in hints]}} if hints else {}
    return {"addresses": [pod_ip(family, index)], "conditions": conditions, "nodeName": node,
            "zone": "a" if node == "node1" else "b", **extra}


def dns_slice(family: IPFamily, *endpoints: dict[str, Any], protocol: str = "UDP"
              ) -> dict[str, Any]:
    """The ``dns`` service's EndpointSlice of ``family`` holding ``endpoints``."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": f"dns-{family.value.lower()}",
                         "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": family.value,
            "ports": [{"name": "dns", "port": TARGET_PORT, "protocol": protocol}],
            "endpoints": list(endpoints)}


def node(zone: str = "a") -> dict[str, Any]:
    """node1, in ``zone``, with an address of each family."""
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP[f]}
                                     for f in IPFamily]}}
