"""Manifests for the explain tests, built in code so each test shows the case it is about.

Address plan (as in the other tests): node1 10.100.0.2 in zone-a (this node), node2
10.100.0.3 in zone-b, pods in 10.0.0.0/14 (endpoints on node1 in 10.0.1.0/24, on node2 in
10.0.2.0/24), an outside client 10.100.0.100, service IPs in 10.96.0.0/16, load-balancer IPs
in 203.0.113.0/24.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from iptsync.core.policy import Decision, Settings
from iptsync.engine.desired import desired_from_objects
from iptsync.inspection.explain import ServiceExplanation, ServiceRef, explain
from iptsync.inspection.trace import TraceResult

CLUSTER_CIDR = "10.0.0.0/14"
SETTINGS = Settings(node_name="node1",
                    cluster_cidrs=(ipaddress.ip_network(CLUSTER_CIDR),))
NODES = [
    {"apiVersion": "v1", "kind": "Node",
     "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
     "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
     "status": {"addresses": [{"type": "InternalIP", "address": address}]}}
    for name, address, zone, pod_cidr in (("node1", "10.100.0.2", "zone-a", "10.0.1.0/24"),
                                          ("node2", "10.100.0.3", "zone-b", "10.0.2.0/24"))
]


def service(name: str, cluster_ip: str, *, kind: str = "ClusterIP", node_port: int = 0,
            etp: str | None = None, itp: str | None = None, external_ips: tuple[str, ...] = (),
            lb_ip: str | None = None, ranges: tuple[str, ...] = (),
            port_name: str | None = None) -> dict[str, Any]:
    """A Service with one TCP port 80 -> 8080."""
    port: dict[str, Any] = {"port": 80, "targetPort": 8080, "protocol": "TCP"}
    if port_name:
        port["name"] = port_name
    if node_port:
        port["nodePort"] = node_port
    spec: dict[str, Any] = {"type": kind, "clusterIP": cluster_ip, "ports": [port]}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if itp:
        spec["internalTrafficPolicy"] = itp
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if ranges:
        spec["loadBalancerSourceRanges"] = list(ranges)
    manifest: dict[str, Any] = {"apiVersion": "v1", "kind": "Service",
                                "metadata": {"name": name, "namespace": "default"},
                                "spec": spec}
    if lb_ip:
        manifest["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    return manifest


def endpoint(ip: str, node: str, *, ready: bool = True, serving: bool | None = None,
             terminating: bool = False, zone: str | None = None,
             hints: tuple[str, ...] = ()) -> dict[str, Any]:
    conditions = {"ready": ready, "serving": ready if serving is None else serving,
                  "terminating": terminating}
    out: dict[str, Any] = {"addresses": [ip], "nodeName": node, "conditions": conditions}
    if zone:
        out["zone"] = zone
    if hints:
        out["hints"] = {"forZones": [{"name": z} for z in hints]}
    return out


def endpoint_slice(service_name: str, *endpoints: dict[str, Any],
                   port_name: str | None = None) -> dict[str, Any]:
    port: dict[str, Any] = {"port": 8080, "protocol": "TCP"}
    if port_name:
        port["name"] = port_name
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service_name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [port], "endpoints": list(endpoints)}


def explain_objects(name: str, *objects: dict[str, Any], port: str | None = None,
                    settings: Settings = SETTINGS) -> ServiceExplanation:
    """Explain default/NAME among the objects (and the two nodes) for node1."""
    desired = desired_from_objects([*NODES, *objects], settings)
    assert [] == desired.problems
    return explain([(desired.state, desired.settings)], ServiceRef("default", name, port))


def _n1(ip: str, **kwargs: Any) -> dict[str, Any]:
    return endpoint(ip, "node1", zone="zone-a", **kwargs)


def _n2(ip: str, **kwargs: Any) -> dict[str, Any]:
    return endpoint(ip, "node2", zone="zone-b", **kwargs)


# One service per case, named after it; tests/explain/test_against_tracer.py runs them all.
CASES: dict[str, list[dict[str, Any]]] = {
    "basic": [service("basic", "10.96.0.10"),
              endpoint_slice("basic", _n1("10.0.1.2"), _n2("10.0.2.2"))],
    "not-ready": [service("not-ready", "10.96.0.11"),
                  endpoint_slice("not-ready", _n1("10.0.1.2"), _n2("10.0.2.2", ready=False))],
    "etp-local": [
        service("etp-local", "10.96.0.12", kind="LoadBalancer", node_port=30400, etp="Local",
                lb_ip="203.0.113.30"),
        endpoint_slice("etp-local", _n1("10.0.1.2"), _n2("10.0.2.2"), _n2("10.0.2.3"))],
    "etp-local-remote": [
        service("etp-local-remote", "10.96.0.13", kind="NodePort", node_port=30401,
                etp="Local"),
        endpoint_slice("etp-local-remote", _n2("10.0.2.2"))],
    "itp-local": [service("itp-local", "10.96.0.14", itp="Local"),
                  endpoint_slice("itp-local", _n1("10.0.1.2"), _n2("10.0.2.2"))],
    "itp-local-remote": [service("itp-local-remote", "10.96.0.15", itp="Local"),
                         endpoint_slice("itp-local-remote", _n2("10.0.2.2"))],
    "terminating": [
        service("terminating", "10.96.0.16"),
        endpoint_slice("terminating", _n1("10.0.1.2", ready=False, serving=True,
                                          terminating=True),
                       _n2("10.0.2.2", ready=False, serving=False, terminating=True),
                       _n2("10.0.2.3", ready=False))],
    "terminating-with-ready": [
        service("terminating-with-ready", "10.96.0.17"),
        endpoint_slice("terminating-with-ready", _n1("10.0.1.2", ready=False, serving=True,
                                                     terminating=True), _n2("10.0.2.2"))],
    "topology": [
        service("topology", "10.96.0.18", kind="NodePort", node_port=30402),
        endpoint_slice("topology", _n1("10.0.1.2", hints=("zone-a",)),
                       _n2("10.0.2.2", hints=("zone-b",)), _n2("10.0.2.3", hints=("zone-b",)))],
    "no-endpoints": [service("no-endpoints", "10.96.0.19", kind="LoadBalancer",
                             node_port=30403, lb_ip="203.0.113.31",
                             external_ips=("198.51.100.7",))],
    "source-ranges": [
        service("source-ranges", "10.96.0.20", kind="LoadBalancer", node_port=30404,
                lb_ip="203.0.113.32", ranges=("192.0.2.0/24",)),
        endpoint_slice("source-ranges", _n1("10.0.1.2"))],
    "external-ip": [service("external-ip", "10.96.0.21", external_ips=("198.51.100.8",)),
                    endpoint_slice("external-ip", _n1("10.0.1.2"), _n2("10.0.2.2"))],
}


def assert_trace_agrees(outcome: Decision, result: TraceResult, where: str) -> None:
    """``explain``'s ``outcome`` and the tracer's ``result`` for the same packet agree: the
    verdict, each endpoint's share and, where the packet goes on, the masquerade."""
    assert outcome.verdict == result.verdict, where
    assert ({k: round(p, 6) for k, p in outcome.probabilities.items()}
            == {k: round(p, 6) for k, p in result.endpoints.items()}), where
    if outcome.verdict in ("DNAT", "ACCEPT"):
        assert outcome.masquerade == result.masquerade, where
