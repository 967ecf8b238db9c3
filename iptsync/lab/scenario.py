"""The lab's scenario, read from ``examples/lab``: nodes, pods, services and their network.

Why: the addresses the lab builds, sends requests to and expects answers from are the ones in
the manifests iptsync syncs, so they are read from those files rather than declared a second
time in Python. ``examples/lab`` holds Kubernetes manifests (Services, EndpointSlices, Nodes
with their addresses and pod CIDRs, Pods with their node, IPs, labels and ports) and one
``LabNetwork`` document for what is not a Kubernetes object: the node networks, the external
client and its routes, the cluster CIDRs, the pod that sends the in-cluster requests and the
service whose dump the report shows. The lab is dual-stack: where Kubernetes has a list with
one entry per IP family (a Service's clusterIPs, a Node's podCIDRs, a Pod's podIPs), the lab
reads one IPv4 and one IPv6 entry, and so do the LabNetwork's lists. iptsync reads only the
Services, EndpointSlices and Nodes and passes over the other kinds, so
``iptsync dump --objects examples/lab`` works unchanged.

A pod backs the service whose selector its labels match, as in Kubernetes. A scenario that does
not fit raises :class:`LabError` naming the object and the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import iptsync
from iptsync.lab.topology import ClusterSpec, LabError, NodeSpec, PodSpec
from iptsync.sources.files import read_paths

LAB_KIND = "LabNetwork"
"""Kind of the document holding what is not a Kubernetes object."""
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
"""Service types in the order the report lists services (then in file order)."""


@dataclass(frozen=True)
class LabPod:
    """A pod of the lab: where it runs, its echo server's ports, the service it backs if any."""

    name: str
    node: str
    ip: str
    service: str | None
    tcp_ports: tuple[int, ...]
    udp_ports: tuple[int, ...]
    ip6: str | None = None


@dataclass(frozen=True)
class LabService:
    """A Service of the manifests, as the report describes it (its first port; its cluster
    IP and load-balancer IP of each IP family it has)."""

    namespace: str
    name: str
    kind: str
    selector: Mapping[str, str]
    cluster_ip: str | None
    port: int | None
    target_port: int | str | None
    node_port: int | None
    lb_ip: str | None
    external_name: str | None
    cluster_ip6: str | None = None
    lb_ip6: str | None = None

    @property
    def ref(self) -> str:
        """``namespace/name``, as rule comments spell it."""
        return f"{self.namespace}/{self.name}"

    @property
    def families(self) -> tuple[str, ...]:
        """``IPv4``, ``IPv6`` or both: the families the Service has a cluster IP of."""
        return tuple(family for family, ip in (("IPv4", self.cluster_ip),
                                               ("IPv6", self.cluster_ip6)) if ip is not None)

    def cluster_ip_of(self, family: str) -> str | None:
        return self.cluster_ip6 if family == "IPv6" else self.cluster_ip

    def lb_ip_of(self, family: str) -> str | None:
        return self.lb_ip6 if family == "IPv6" else self.lb_ip


@dataclass(frozen=True)
class ClientRoute:
    """A route of the external client: ``to`` (e.g. the load-balancer range) via a node."""

    to: str
    via: str


@dataclass(frozen=True)
class Scenario:
    """Everything the lab builds and expects, as read from the manifests directory."""

    manifests: Path
    nodes: tuple[NodeSpec, ...]
    pods: tuple[LabPod, ...]
    services: tuple[LabService, ...]
    node_cidr: str
    gateway_ip: str
    cluster_cidr: str
    client_ip: str
    node_cidr6: str
    gateway_ip6: str
    cluster_cidr6: str
    client_ip6: str
    client_routes: tuple[ClientRoute, ...]
    client_pod: LabPod
    """The pod that sends the in-cluster requests."""
    dump_node: str
    dump_service: LabService
    """The service whose ``iptsync dump`` the report shows and compares with the node."""
    external_name: LabService
    """The ExternalName service, for which no node may hold a rule."""

    @property
    def node_ips(self) -> dict[str, str]:
        """Node name -> node IP."""
        return {node.name: node.ip for node in self.nodes}

    @property
    def node_ips6(self) -> dict[str, str]:
        """Node name -> node IPv6 address (for the dual-stack nodes)."""
        return {node.name: node.ip6 for node in self.nodes if node.ip6 is not None}

    def node_ips_of(self, family: str) -> dict[str, str]:
        return self.node_ips6 if family == "IPv6" else self.node_ips

    @property
    def cluster_cidrs(self) -> str:
        """Both cluster CIDRs as ``--cluster-cidr`` takes them: ``IPv4CIDR,IPv6CIDR``."""
        return f"{self.cluster_cidr},{self.cluster_cidr6}"

    def pods_of(self, service: str) -> tuple[str, ...]:
        """Names of the pods behind ``service``, in the manifests' order."""
        return tuple(pod.name for pod in self.pods if pod.service == service)

    def pod(self, name: str) -> LabPod | None:
        """The pod called ``name``, if there is one."""
        return next((pod for pod in self.pods if pod.name == name), None)

    def describe_ip(self, ip: str) -> str:
        """Who an address belongs to in the lab: ``pod client1``, ``node1``, ``the client``."""
        for pod in self.pods:
            if ip in (pod.ip, pod.ip6):
                return f"pod {pod.name}"
        for node in self.nodes:
            if ip in (node.ip, node.ip6):
                return node.name
        return "the external client" if ip in (self.client_ip, self.client_ip6) else "unknown"

    def route_via(self, ip: str) -> str:
        """The node the external client sends ``ip`` through (``?`` when no route covers it)."""
        addr = ipaddress.ip_address(ip)
        return next((route.via for route in self.client_routes
                     if addr in ipaddress.ip_network(route.to)), "?")

    def cluster_spec(self) -> ClusterSpec:
        """The namespaces to build: these nodes, and every pod with its echo server's ports."""
        return ClusterSpec(
            nodes=self.nodes,
            pods=tuple(PodSpec(pod.name, pod.node, pod.ip, pod.tcp_ports, pod.udp_ports, pod.ip6)
                       for pod in self.pods),
            node_cidr=self.node_cidr, gateway_ip=self.gateway_ip, client_ip=self.client_ip,
            cluster_cidr=self.cluster_cidr, node_cidr6=self.node_cidr6,
            gateway_ip6=self.gateway_ip6, client_ip6=self.client_ip6,
            cluster_cidr6=self.cluster_cidr6,
        )


def manifests_dir() -> Path:
    """``examples/lab`` of the source tree iptsync is imported from."""
    path = Path(iptsync.__file__).resolve().parent.parent / "examples" / "lab"
    if not path.is_dir():
        raise LabError(f"the lab's manifests are missing: {path} (run from a source checkout)")
    return path


# ----------------------------------------------------------------------------- reading fields

_T = TypeVar("_T")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class _Fields:
    """Typed access to one manifest's fields (``spec.ports[0].port``); a missing or mistyped
    field raises :class:`LabError` naming the file, the object and the field."""

    def __init__(self, where: Path | str, obj: Mapping[str, Any]) -> None:
        self.obj = obj
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
        ref = f"{namespace}/{name}" if namespace else str(name)
        self.label = f"{where}: {obj.get('kind')} {ref}"

    def error(self, path: str, message: str) -> LabError:
        return LabError(f"{self.label}: {path}: {message}")

    def get(self, path: str, required: bool = True) -> Any:
        value: Any = self.obj
        for key, index in _PATH_PART.findall(path):
            if key:
                value = value.get(key) if isinstance(value, Mapping) else None
            else:
                value = value[int(index)] if isinstance(value, list) and int(index) < len(
                    value) else None
        if value is None and required:
            raise self.error(path, "missing")
        return value

    def text(self, path: str) -> str:
        value = self.get(path)
        if not isinstance(value, str):
            raise self.error(path, f"must be a string, not {value!r}")
        return value

    def optional_text(self, path: str) -> str | None:
        return None if self.get(path, required=False) is None else self.text(path)

    def number(self, path: str) -> int:
        value = self.get(path)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"must be a number, not {value!r}")
        return value

    def optional_number(self, path: str) -> int | None:
        return None if self.get(path, required=False) is None else self.number(path)

    def ip(self, path: str) -> str:
        """An address of either family, in its canonical spelling."""
        try:
            return str(ipaddress.ip_address(self.text(path)))
        except ValueError:
            raise self.error(path, f"not an IP address: {self.get(path)!r}") from None

    def cidr(self, path: str) -> str:
        """A network of either family, in its canonical spelling."""
        try:
            return str(ipaddress.ip_network(self.text(path)))
        except ValueError:
            raise self.error(path, f"not an IP network: {self.get(path)!r}") from None

    def optional_per_family(self, path: str, read: Callable[[str], str]
                            ) -> tuple[str | None, str | None]:
        """The list at ``path``: at most one entry of each family, in either order (each read
        with ``read``, which names the entry in its errors) -> (IPv4, IPv6)."""
        entries = [read(f"{path}[{i}]") for i in range(self.count(path))]
        v4 = [e for e in entries if ":" not in e]
        v6 = [e for e in entries if ":" in e]
        if len(v4) > 1 or len(v6) > 1:
            raise self.error(path, f"holds more than one address of a family: {entries}")
        return (v4[0] if v4 else None), (v6[0] if v6 else None)

    def per_family(self, path: str, read: Callable[[str], str]) -> tuple[str, str]:
        """The list at ``path``: exactly one entry of each family -> (IPv4, IPv6)."""
        v4, v6 = self.optional_per_family(path, read)
        if v4 is None or v6 is None:
            raise self.error(path, "needs one IPv4 and one IPv6 entry")
        return v4, v6

    def count(self, path: str) -> int:
        """How many entries the list at ``path`` has (0 when it is missing)."""
        value = self.get(path, required=False)
        if value is None:
            return 0
        if not isinstance(value, list):
            raise self.error(path, "must be a list")
        return len(value)

    def labels(self, path: str) -> dict[str, str]:
        value = self.get(path, required=False) or {}
        if not isinstance(value, Mapping):
            raise self.error(path, "must be a mapping")
        return {str(k): str(v) for k, v in value.items()}


# ----------------------------------------------------------------------------- the objects


def _node(fields: _Fields) -> NodeSpec:
    internal = [fields.ip(f"status.addresses[{i}].address")
                for i in range(fields.count("status.addresses"))
                if fields.get(f"status.addresses[{i}].type", required=False) == "InternalIP"]
    v4 = [ip for ip in internal if ":" not in ip]
    v6 = [ip for ip in internal if ":" in ip]
    if len(v4) != 1 or len(v6) > 1:
        raise fields.error("status.addresses",
                           "needs one IPv4 InternalIP address and at most one IPv6 one")
    if fields.count("spec.podCIDRs"):
        pod_cidr, pod_cidr6 = fields.optional_per_family("spec.podCIDRs", fields.cidr)
        if pod_cidr is None:
            raise fields.error("spec.podCIDRs", "needs an IPv4 pod CIDR")
    else:
        pod_cidr, pod_cidr6 = fields.cidr("spec.podCIDR"), None
    ip6 = v6[0] if v6 else None
    if (ip6 is None) != (pod_cidr6 is None):
        raise fields.error("spec.podCIDRs", "a node with an IPv6 InternalIP address needs an "
                           "IPv6 pod CIDR, and one without needs none")
    return NodeSpec(fields.text("metadata.name"), v4[0], pod_cidr, ip6, pod_cidr6)


def _service(fields: _Fields) -> LabService:
    kind = fields.optional_text("spec.type") or "ClusterIP"
    if kind not in SERVICE_TYPES:
        raise fields.error("spec.type", f"unknown service type {kind!r}")
    external = kind == "ExternalName"
    headless = fields.get("spec.clusterIP", required=False) == "None"  # no address to probe
    has_port = fields.count("spec.ports") > 0
    target = fields.get("spec.ports[0].targetPort", required=False)
    cluster_ips: tuple[str | None, str | None] = (None, None)
    if not (external or headless):
        cluster_ips = (fields.optional_per_family("spec.clusterIPs", fields.ip)
                       if fields.count("spec.clusterIPs") else
                       _by_family(fields.ip("spec.clusterIP")))
    lb_ips = fields.optional_per_family(
        "status.loadBalancer.ingress",
        lambda path: fields.ip(f"{path}.ip"))
    return LabService(
        namespace=fields.optional_text("metadata.namespace") or "default",
        name=fields.text("metadata.name"),
        kind=kind,
        selector=fields.labels("spec.selector"),
        cluster_ip=cluster_ips[0],
        port=fields.number("spec.ports[0].port") if has_port else None,
        target_port=target if isinstance(target, int | str) else None,
        node_port=fields.optional_number("spec.ports[0].nodePort"),
        lb_ip=lb_ips[0],
        external_name=fields.text("spec.externalName") if external else None,
        cluster_ip6=cluster_ips[1],
        lb_ip6=lb_ips[1],
    )


def _by_family(ip: str) -> tuple[str | None, str | None]:
    return (None, ip) if ":" in ip else (ip, None)


def _container_ports(fields: _Fields, protocol: str) -> tuple[int, ...]:
    ports: list[int] = []
    for c in range(fields.count("spec.containers")):
        for p in range(fields.count(f"spec.containers[{c}].ports")):
            path = f"spec.containers[{c}].ports[{p}]"
            if (fields.optional_text(f"{path}.protocol") or "TCP") == protocol:
                ports.append(fields.number(f"{path}.containerPort"))
    return tuple(ports)


def _pod(fields: _Fields, services: Sequence[LabService], nodes: Sequence[NodeSpec]) -> LabPod:
    namespace = fields.optional_text("metadata.namespace") or "default"
    labels = fields.labels("metadata.labels")
    backs = [s.name for s in services if s.namespace == namespace and s.selector
             and all(labels.get(key) == value for key, value in s.selector.items())]
    if len(backs) > 1:
        raise fields.error("metadata.labels", f"match the selectors of {', '.join(backs)}; "
                           "the lab's report gives each pod one service")
    node = _node_name(fields, "spec.nodeName", nodes)
    spec = next(n for n in nodes if n.name == node)
    if fields.count("status.podIPs"):
        path = "status.podIPs"
        ip, ip6 = fields.optional_per_family(path, lambda entry: fields.ip(f"{entry}.ip"))
        if ip is None:
            raise fields.error(path, "needs an IPv4 address")
    else:
        path, ip, ip6 = "status.podIP", fields.ip("status.podIP"), None
    for addr, pod_cidr in ((ip, spec.pod_cidr), (ip6, spec.pod_cidr6)):
        if addr is None:
            continue
        if pod_cidr is None:
            raise fields.error(path, f"{addr}: {node} has no IPv6 pod CIDR")
        if ipaddress.ip_address(addr) not in ipaddress.ip_network(pod_cidr):
            raise fields.error(path, f"{addr} is not in {node}'s pod CIDR {pod_cidr}")
    return LabPod(
        name=fields.text("metadata.name"), node=node, ip=ip,
        service=backs[0] if backs else None,
        tcp_ports=_container_ports(fields, "TCP"), udp_ports=_container_ports(fields, "UDP"),
        ip6=ip6,
    )


def _node_name(fields: _Fields, path: str, nodes: Sequence[NodeSpec]) -> str:
    name = fields.text(path)
    if name not in {node.name for node in nodes}:
        raise fields.error(path, f"no Node {name!r} in the manifests")
    return name


def _one(found: Sequence[_T], what: str, where: Path) -> _T:
    if len(found) != 1:
        raise LabError(f"{where}: the lab needs exactly one {what}, found {len(found)}")
    return found[0]


def load_scenario(manifests: Path) -> Scenario:
    """Read the scenario from the manifests directory (``examples/lab``)."""
    reading = read_paths([manifests])
    if reading.errors:
        raise LabError("; ".join(str(error) for error in reading.errors.values()))
    by_kind: dict[str, list[_Fields]] = {}
    for path, located in reading.ordered():
        for obj, line, _ in located:
            where = path if line is None else f"{path}:{line}"
            by_kind.setdefault(str(obj.get("kind")), []).append(_Fields(where, obj))
    services = sorted((_service(f) for f in by_kind.get("Service", [])),
                      key=lambda s: SERVICE_TYPES.index(s.kind))
    nodes = tuple(_node(f) for f in by_kind.get("Node", []))
    pods = tuple(_pod(f, services, nodes) for f in by_kind.get("Pod", []))
    lab = _one(by_kind.get(LAB_KIND, []), f"{LAB_KIND} document", manifests)
    client_pod = lab.text("spec.inClusterClient")
    dump_service = lab.text("spec.dump.service")
    routes = tuple(
        ClientRoute(lab.cidr(f"spec.externalClient.routes[{i}].to"),
                    _node_name(lab, f"spec.externalClient.routes[{i}].via", nodes))
        for i in range(lab.count("spec.externalClient.routes")))
    node_cidrs = lab.per_family("spec.nodeNetworks", lab.cidr)
    gateways = lab.per_family("spec.gateways", lab.ip)
    cluster_cidrs = lab.per_family("spec.clusterCIDRs", lab.cidr)
    client_ips = lab.per_family("spec.externalClient.ips", lab.ip)
    return Scenario(
        manifests=manifests,
        nodes=nodes,
        pods=pods,
        services=tuple(services),
        node_cidr=node_cidrs[0],
        gateway_ip=gateways[0],
        cluster_cidr=cluster_cidrs[0],
        client_ip=client_ips[0],
        node_cidr6=node_cidrs[1],
        gateway_ip6=gateways[1],
        cluster_cidr6=cluster_cidrs[1],
        client_ip6=client_ips[1],
        client_routes=routes,
        client_pod=_one([p for p in pods if p.name == client_pod],
                        f"Pod {client_pod} (spec.inClusterClient)", manifests),
        dump_node=_node_name(lab, "spec.dump.node", nodes),
        dump_service=_one([s for s in services if s.ref == dump_service],
                          f"Service {dump_service} (spec.dump.service)", manifests),
        external_name=_one([s for s in services if s.kind == "ExternalName"],
                           "ExternalName Service", manifests),
    )
