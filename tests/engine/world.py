"""The small cluster the engine tests build: objects, the kernel's view, the expectation.

Conventions: node ``node1`` (10.100.0.2), pods in 10.0.0.0/14, cluster IPs 10.96.0.x, one
LoadBalancer IP per service in 203.0.113.x; services ``s0``..``s4`` in ``default``. The kernel
is any :class:`iptsync.kernel.port.NetfilterPort`: the ``kernel`` fixture gives the fake and both
real backends.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from iptsync.core import names
from iptsync.core.plan import comparable
from iptsync.core.policy import Settings
from iptsync.engine.desired import desired_from_objects
from iptsync.engine.reconciler import Engine
from iptsync.kernel.port import NetfilterPort

SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))
POOL = 5  # services s0..s4


def service(index: int, kind: str, local: bool, ports: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": kind, "clusterIP": f"10.96.0.{index + 10}",
        "ports": [{"name": f"p{p}", "port": 80 + p, "protocol": "UDP" if p else "TCP",
                   "targetPort": 8080 + p, **({"nodePort": 30000 + 10 * index + p}
                                              if kind != "ClusterIP" else {})}
                  for p in range(ports)],
    }
    status: dict[str, Any] = {}
    if kind == "LoadBalancer":
        status = {"loadBalancer": {"ingress": [{"ip": f"203.0.113.{index + 10}"}]}}
    if local and kind != "ClusterIP":
        spec["externalTrafficPolicy"] = "Local"
        spec["healthCheckNodePort"] = 32000 + index
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": f"s{index}"}, "spec": spec,
            "status": status}


def endpoint_slice(index: int, endpoints: list[tuple[int, bool, bool]]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "default", "name": f"s{index}-x",
                     "labels": {"kubernetes.io/service-name": f"s{index}"}},
        "addressType": "IPv4",
        "ports": [{"name": f"p{p}", "port": 8080 + p, "protocol": "UDP" if p else "TCP"}
                  for p in range(2)],
        "endpoints": [{"addresses": [f"10.0.{index}.{ip + 1}"], "conditions": {"ready": ready},
                       "nodeName": "node1" if local else "node2"}
                      for ip, ready, local in endpoints],
    }


class World:
    """The objects as the API would hold them, keyed like the engine keys them."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}

    def apply(self, engine: Engine, change: Any) -> None:
        if isinstance(change, dict):
            self.objects[(change["kind"], change["metadata"]["name"])] = change
            engine.upsert(change)
        else:
            kind, index = change
            name = f"s{index}" if kind == "Service" else f"s{index}-x"
            gone = self.objects.pop((kind, name), None)
            if gone is not None:
                engine.delete(gone)


Tables = dict[str, dict[str, list[str]]]


def owned(netfilter: NetfilterPort) -> Tables:
    return {table: {chain: rules for chain, rules in saved.chains.items()
                    if names.is_owned_chain(table, chain) or chain == names.KUBE_FIREWALL}
            for table, saved in netfilter.save().items()}


def expected(objects: list[dict[str, Any]]) -> Tables:
    tables = desired_from_objects(objects, SETTINGS).tables.tables
    return {table: {chain: content.canonical_rules() for chain, content in chains.items()}
            for table, chains in tables.items()}


def assert_holds_full_sync(objects: list[dict[str, Any]], netfilter: NetfilterPort) -> None:
    """The kernel holds what a full sync of ``objects`` writes, services' order aside."""
    free = {(table, chain): content.free for table, chains in
            desired_from_objects(objects, SETTINGS).tables.tables.items()
            for chain, content in chains.items()}

    def services_sorted(tables: Tables) -> Tables:
        return {table: {chain: comparable(rules, free.get((table, chain)))
                        for chain, rules in chains.items()} for table, chains in tables.items()}

    assert services_sorted(expected(objects)) == services_sorted(owned(netfilter))
