"""Kubernetes objects as kube-proxy sees them: validated, immutable service ports and endpoints.

Input is a manifest dict (camelCase, as ``kubectl get -o json|yaml`` prints it) or an object of
the official ``kubernetes`` client (converted by duck typing, so this module imports nothing of
it). Output is frozen dataclasses holding exactly the fields kube-proxy's iptables mode uses.

Invalid input never raises out of this module: a parser returns ``None`` plus a list of
:class:`Problem`, each naming the object (``Kind namespace/name``) and the field. An object with
a bad field is skipped whole; a bad endpoint address drops only that endpoint.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_AFFINITY_TIMEOUT = 10800  # kube-proxy's default for sessionAffinity ClientIP
MAX_AFFINITY_TIMEOUT = 86400
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
# The cluster autoscaler's taint on a node it is about to delete (KEP-3836: the proxy's
# /healthz fails while it is there, so load balancers drain the node first).
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
# Objects carrying either label are left to another proxy: kube-proxy lists Services and
# EndpointSlices with "!<label>" for both (the EndpointSlice controller puts the headless
# label on the slices of headless Services).
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
NOT_OURS_LABELS = (HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL)
PROXY_LABEL_SELECTOR = ",".join(f"!{label}" for label in NOT_OURS_LABELS)


class IPFamily(enum.Enum):
    """An address family; kept explicit everywhere so IPv6 can follow IPv4."""

    IPV4 = "IPv4"
    IPV6 = "IPv6"

    @staticmethod
    def of(address: IPAddress | IPNetwork) -> IPFamily:
        return IPFamily.IPV4 if address.version == 4 else IPFamily.IPV6


class Protocol(enum.Enum):
    """Service protocols kube-proxy programs."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def lower(self) -> str:
        return self.value.lower()


@dataclass(frozen=True, slots=True)
class Problem:
    """Why (part of) an object was rejected: the object, the field, and what is wrong."""

    kind: str
    ref: str  # "namespace/name"
    field: str
    message: str
    dropped: str = "object"  # what was skipped: the whole "object" or one "endpoint"

    def __str__(self) -> str:
        what = f"skipping {self.kind} {self.ref}" if self.dropped == "object" else (
            f"{self.kind} {self.ref}: dropping {self.dropped}"
        )
        return f"{what}: {self.field}: {self.message}"


class InvalidField(Exception):
    """Raised inside a parser to reject the object; never escapes this module."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """kube-proxy's key for a service port: ``namespace/name:port`` (``namespace/name``)."""

    namespace: str
    name: str
    port: str = ""

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base

    @property
    def service(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service, with every field the iptables proxier reads."""

    name: ServicePortName
    protocol: Protocol
    family: IPFamily
    cluster_ip: IPAddress
    port: int
    node_port: int = 0
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ips: tuple[IPAddress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    external_policy_local: bool = False
    internal_policy_local: bool = False
    affinity_timeout: int | None = None  # seconds when sessionAffinity is ClientIP
    health_check_node_port: int = 0

    @property
    def externally_accessible(self) -> bool:
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        # Even with externalTrafficPolicy=Local, pod and node traffic to external
        # destinations is short-circuited to the cluster-wide endpoints.
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (
            self.external_policy_local and self.externally_accessible
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint address of a service port, with its conditions and topology."""

    ip: IPAddress
    port: int
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] = frozenset()
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_hints: frozenset[str] = frozenset()  # hints.forNodes (trafficDistribution PreferSameNode)
    # The address as text, and ``ip:port``, kube-proxy's endpoint string (brackets for
    # IPv6): computed once, because rendering uses them for sorting, hashing and comments.
    address: str = field(default="", compare=False, repr=False)
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.address:
            object.__setattr__(self, "address", str(self.ip))
        host = f"[{self.address}]" if self.ip.version == 6 else self.address
        object.__setattr__(self, "key", f"{host}:{self.port}")


def endpoint_of(ip: IPAddress, port: int, *, node_name: str | None, zone: str | None,
                ready: bool, serving: bool, terminating: bool, address: str,
                zone_hints: frozenset[str] = frozenset(),
                node_hints: frozenset[str] = frozenset()) -> Endpoint:
    """``Endpoint(...)`` for an ``address`` that is ``str(ip)``, without the frozen
    dataclass's generated ``__init__``, which sets each field through a call of its own: four
    times faster, for the 100,000 endpoints of a large node, read and then merged per port.
    tests/model checks that it builds what ``Endpoint(...)`` builds."""
    endpoint = _new_object(Endpoint)
    _SET_IP(endpoint, ip)
    _SET_PORT(endpoint, port)
    _SET_NODE_NAME(endpoint, node_name)
    _SET_ZONE(endpoint, zone)
    _SET_ZONE_HINTS(endpoint, zone_hints)
    _SET_READY(endpoint, ready)
    _SET_SERVING(endpoint, serving)
    _SET_TERMINATING(endpoint, terminating)
    _SET_NODE_HINTS(endpoint, node_hints)
    _SET_ADDRESS(endpoint, address)
    _SET_KEY(endpoint, f"[{address}]:{port}" if ip.version == 6 else f"{address}:{port}")
    return endpoint


_new_object = object.__new__
# Each field's slot, set directly.
(_SET_IP, _SET_PORT, _SET_NODE_NAME, _SET_ZONE, _SET_ZONE_HINTS, _SET_READY, _SET_SERVING,
 _SET_TERMINATING, _SET_NODE_HINTS, _SET_ADDRESS, _SET_KEY) = (
    getattr(Endpoint, name).__set__
    for name in ("ip", "port", "node_name", "zone", "zone_hints", "ready", "serving",
                 "terminating", "node_hints", "address", "key"))


def host_port(ip: IPAddress, port: int) -> str:
    """``ip:port`` as kube-proxy writes it (Go's ``net.JoinHostPort``): ``[ip]:port`` for IPv6."""
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class SlicePort:
    """A port of an EndpointSlice; ``name`` matches the service port's name."""

    name: str
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    """An EndpointSlice reduced to what the proxier needs."""

    namespace: str
    name: str
    service: str
    family: IPFamily | None  # None for FQDN slices, which kube-proxy ignores
    ports: tuple[SlicePort, ...]
    endpoints: tuple[Endpoint, ...]  # port 0: the slice's ports apply to each
    trigger_time: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The fields of this node's Node object the proxier uses."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[IPAddress, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()  # spec.podCIDRs (at most one per family)
    deleting: bool = False  # metadata.deletionTimestamp is set
    taints: frozenset[str] = frozenset()  # the keys of spec.taints

    @property
    def zone(self) -> str | None:
        return self.labels.get(ZONE_LABEL) or None

    @property
    def draining(self) -> str | None:
        """Why load balancers should stop sending this node new connections (KEP-3836: being
        deleted, or tainted by the cluster autoscaler, any effect), or None."""
        if self.deleting:
            return "it is being deleted (metadata.deletionTimestamp is set)"
        if TO_BE_DELETED_TAINT in self.taints:
            return f"it has the {TO_BE_DELETED_TAINT} taint"
        return None


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A parsed Service: its ports (empty for headless, ExternalName and other families)."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    skipped_reason: str | None = None  # set when the Service is valid but gets no rules

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a parser returns: the value (None when the object was rejected) and problems."""

    value: ServiceInfo | EndpointSliceInfo | NodeInfo | None
    problems: tuple[Problem, ...] = ()


def to_manifest(obj: Any) -> Any:
    """Return ``obj`` as a camelCase manifest, converting ``kubernetes`` client models.

    Client models carry ``openapi_types`` and ``attribute_map`` (python name -> JSON name).
    Plain manifests (dicts from YAML or JSON) pass through untouched: copying them costs.
    """
    return _from_client_model(obj) if _is_client_model(obj) else obj


def _is_client_model(obj: Any) -> bool:
    return hasattr(obj, "openapi_types") and hasattr(obj, "attribute_map")


def _from_client_model(value: Any) -> Any:
    if _is_client_model(value):
        return {value.attribute_map[attr]: _from_client_model(getattr(value, attr))
                for attr in value.openapi_types if getattr(value, attr) is not None}
    if isinstance(value, Mapping):
        return {key: _from_client_model(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_from_client_model(item) for item in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def object_key(manifest: Mapping[str, Any]) -> tuple[str, str]:
    """``(namespace, name)`` of a manifest as the model keys it, tolerant of missing metadata.

    A namespaced object without a namespace is in ``default`` (as the API server puts it);
    a Node is cluster-scoped: its namespace is ``""``. A missing name is ``""``.
    """
    meta = manifest.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    namespace = "" if manifest.get("kind") == "Node" else str(meta.get("namespace") or "default")
    return (namespace, str(meta.get("name") or ""))


def object_ref(manifest: Mapping[str, Any]) -> str:
    """``namespace/name`` of a manifest, safe to log (a Node reads ``default/name``).

    A hostile name must not forge log lines either: control characters are escaped and
    overlong names cut (the name is invalid then, and the message says why).
    """
    namespace, name = object_key(manifest)
    return f"{printable(namespace or 'default')}/{printable(name or '<unnamed>')}"


def other_proxy_label(manifest: Mapping[str, Any]) -> str | None:
    """``label=value`` when kube-proxy's label selector leaves a Service or EndpointSlice out
    (:data:`PROXY_LABEL_SELECTOR`: another proxy programs it, or it belongs to a headless
    Service), else None."""
    meta = manifest.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    if not isinstance(labels, Mapping):
        return None
    for label in NOT_OURS_LABELS:
        if label in labels:
            return f"{label}={printable(labels[label])}"
    return None


def printable(value: object, limit: int = 100) -> str:
    """``value`` as text fit for one log line: escaped when unusual, cut when long."""
    text = value if isinstance(value, str) else repr(value)
    if not (text.isascii() and text.isprintable()):
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def parse_object(obj: Any) -> Parsed:
    """Parse a Service, EndpointSlice or Node manifest (or client object) by its kind."""
    manifest = to_manifest(obj)
    if not isinstance(manifest, Mapping):
        return Parsed(None, (Problem("object", "<unknown>", "", "not a mapping"),))
    kind = manifest.get("kind")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        return Parsed(None)
    return parser(manifest)


def parse_service(manifest: Mapping[str, Any]) -> Parsed:
    """Parse a Service; headless, ExternalName and IPv6 services yield no ports.

    What is valid but not programmed (IPv6 until dual-stack lands) comes back as problems
    beside the value, so it is reported without being treated as a bad update.
    """
    ref = object_ref(manifest)
    problems: list[Problem] = []
    try:
        info = _service(manifest, ref, problems)
    except InvalidField as err:
        return Parsed(None, (Problem("Service", ref, err.path, err.message),))
    return Parsed(info, tuple(problems))


def parse_endpoint_slice(manifest: Mapping[str, Any]) -> Parsed:
    """Parse an EndpointSlice; a bad endpoint address drops only that endpoint."""
    ref = object_ref(manifest)
    problems: list[Problem] = []
    try:
        info = _endpoint_slice(manifest, ref, problems)
    except InvalidField as err:
        problems.append(Problem("EndpointSlice", ref, err.path, err.message))
        return Parsed(None, tuple(problems))
    return Parsed(info, tuple(problems))


def parse_node(manifest: Mapping[str, Any]) -> Parsed:
    """Parse a Node: name, labels (zone), status addresses, and whether it is draining."""
    ref = object_ref(manifest)
    try:
        meta = _mapping(manifest, "metadata", required=True)
        name = _dns_subdomain(_string(meta, "name", "metadata.name", required=True),
                              "metadata.name")
        labels = _string_map(meta, "labels", "metadata.labels")
        status = _mapping(manifest, "status")
        addresses: list[IPAddress] = []
        for i, item in enumerate(_list(status, "addresses", "status.addresses")):
            entry = _as_mapping(item, f"status.addresses[{i}]")
            if entry.get("type") in ("InternalIP", "ExternalIP"):
                addresses.append(_ip(entry.get("address"), f"status.addresses[{i}].address"))
        deleting = bool(_string(meta, "deletionTimestamp", "metadata.deletionTimestamp"))
        spec = _mapping(manifest, "spec")
        pod_cidrs = tuple(_cidr(text, f"spec.podCIDRs[{i}]")
                          for i, text in enumerate(_list(spec, "podCIDRs", "spec.podCIDRs")))
        if not pod_cidrs and spec.get("podCIDR"):
            pod_cidrs = (_cidr(spec.get("podCIDR"), "spec.podCIDR"),)
        taints = frozenset(
            _string(_as_mapping(item, f"spec.taints[{i}]"), "key", f"spec.taints[{i}].key",
                    required=True)
            for i, item in enumerate(_list(spec, "taints", "spec.taints")))
        return Parsed(NodeInfo(name=name, labels=labels, addresses=tuple(addresses),
                               pod_cidrs=pod_cidrs, deleting=deleting, taints=taints))
    except InvalidField as err:
        return Parsed(None, (Problem("Node", ref, err.path, err.message),))


_PARSERS = {
    "Service": parse_service,
    "EndpointSlice": parse_endpoint_slice,
    "Node": parse_node,
}


def _service(manifest: Mapping[str, Any], ref: str, problems: list[Problem]) -> ServiceInfo:
    meta = _mapping(manifest, "metadata", required=True)
    # Since Kubernetes 1.34 (RelaxedServiceNameValidation) a Service name may start with a
    # digit: a DNS-1123 label, no longer a DNS-1035 one. Accept what any API server accepts.
    name = _dns_label(_string(meta, "name", "metadata.name", required=True), "metadata.name")
    namespace = _namespace(meta)
    annotations = _string_map(meta, "annotations", "metadata.annotations")
    spec = _mapping(manifest, "spec", "spec", required=True)
    svc_type = _string(spec, "type", "spec.type") or "ClusterIP"
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise InvalidField("spec.type", f"unknown service type {svc_type!r}")
    if svc_type == "ExternalName":
        return ServiceInfo(namespace, name, (), "ExternalName services get no rules")
    cluster_ip_text = _string(spec, "clusterIP", "spec.clusterIP")
    if cluster_ip_text == "None":
        return ServiceInfo(namespace, name, (), "headless services get no rules")
    if not cluster_ip_text:
        raise InvalidField("spec.clusterIP", "missing: the service has no cluster IP allocated")
    cluster_ips = _cluster_ips(spec, _ip(cluster_ip_text, "spec.clusterIP"))
    families = tuple(IPFamily.of(ip) for ip in cluster_ips)
    addresses = _ByFamily("Service", ref, families, problems)
    external_ips, lb_ips, source_ranges = _entry_addresses(manifest, spec, annotations,
                                                           svc_type, addresses)
    external_policy = _policy(spec, "externalTrafficPolicy")
    internal_policy = _policy(spec, "internalTrafficPolicy")
    external_local = external_policy == "Local" and svc_type in ("NodePort", "LoadBalancer")
    affinity = _affinity_timeout(spec)
    health_check_node_port = 0
    if svc_type == "LoadBalancer" and external_local:
        health_check_node_port = _port(spec.get("healthCheckNodePort"),
                                       "spec.healthCheckNodePort", allow_zero=True)

    entries = list(_port_entries(spec))
    # One ServicePort per family and port, as kube-proxy's per-family proxiers each see it:
    # the cluster IP, external IPs, load-balancer IPs and source ranges of that family.
    ports = tuple(ServicePort(
        name=ServicePortName(namespace, name, port_name),
        protocol=protocol,
        family=family,
        cluster_ip=cluster_ip,
        port=number,
        node_port=node_port,
        external_ips=tuple(ip for ip in external_ips if IPFamily.of(ip) is family),
        load_balancer_ips=tuple(ip for ip in lb_ips if IPFamily.of(ip) is family),
        load_balancer_source_ranges=_family_ranges(source_ranges, family),
        external_policy_local=external_local,
        internal_policy_local=internal_policy == "Local",
        affinity_timeout=affinity,
        health_check_node_port=health_check_node_port,
    ) for family, cluster_ip in zip(families, cluster_ips, strict=True)
        for port_name, protocol, number, node_port in entries)
    return ServiceInfo(namespace, name, ports)


def _cluster_ips(spec: Mapping[str, Any], primary: IPAddress) -> tuple[IPAddress, ...]:
    """The Service's cluster IPs, one per family, in ``spec.ipFamilies`` order.

    ``spec.clusterIPs`` (when set) starts with ``spec.clusterIP`` and holds at most one address
    of each family; ``spec.ipFamilies`` (when set) names their families in the same order, as
    the API server writes them. Anything else is refused, naming the field.
    """
    texts = _list(spec, "clusterIPs", "spec.clusterIPs")
    ips = [_ip(text, f"spec.clusterIPs[{i}]") for i, text in enumerate(texts)] or [primary]
    if ips[0] != primary:
        raise InvalidField("spec.clusterIPs[0]",
                           f"{ips[0]} differs from spec.clusterIP {primary}")
    if len(ips) > 2 or (len(ips) == 2 and ips[0].version == ips[1].version):
        raise InvalidField("spec.clusterIPs",
                           "must hold one address, or one IPv4 and one IPv6 address")
    policy = _string(spec, "ipFamilyPolicy", "spec.ipFamilyPolicy")
    if policy not in ("", "SingleStack", "PreferDualStack", "RequireDualStack"):
        raise InvalidField("spec.ipFamilyPolicy", f"must be SingleStack, PreferDualStack or "
                                                  f"RequireDualStack, not '{printable(policy)}'")
    if policy == "SingleStack" and len(ips) > 1:
        raise InvalidField("spec.clusterIPs", "two addresses with ipFamilyPolicy SingleStack")
    for i, text in enumerate(_list(spec, "ipFamilies", "spec.ipFamilies")):
        path = f"spec.ipFamilies[{i}]"
        if text not in ("IPv4", "IPv6"):
            raise InvalidField(path, f"must be IPv4 or IPv6, not '{printable(text)}'")
        if i < len(ips) and IPFamily.of(ips[i]).value != text:
            raise InvalidField(path, f"{text} does not match the cluster IP {ips[i]} "
                                     f"(spec.clusterIPs[{i}])")
    return tuple(ips)


def _family_ranges(ranges: tuple[IPNetwork, ...], family: IPFamily) -> tuple[IPNetwork, ...]:
    """One family's source ranges; a zero-length range allows everyone, like no ranges."""
    own = tuple(net for net in ranges if IPFamily.of(net) is family)
    return () if any(net.prefixlen == 0 for net in own) else own


def _port_entries(spec: Mapping[str, Any]) -> Iterator[tuple[str, Protocol, int, int]]:
    """Each of ``spec.ports`` as (name, protocol, port, nodePort), checked in that order; a
    name repeated for one protocol is invalid, as are no ports at all."""
    raw_ports = _list(spec, "ports", "spec.ports")
    if not raw_ports:
        raise InvalidField("spec.ports", "missing: a service with a cluster IP needs ports")
    seen: set[tuple[str, Protocol]] = set()
    for i, raw in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        port_spec = _as_mapping(raw, path)
        port_name = _port_name(port_spec, path)
        protocol = _protocol(port_spec.get("protocol"), f"{path}.protocol")
        if (port_name, protocol) in seen:
            raise InvalidField(f"{path}.name", f"duplicate port name {port_name!r}")
        seen.add((port_name, protocol))
        yield (port_name, protocol, _port(port_spec.get("port"), f"{path}.port"),
               _port(port_spec.get("nodePort"), f"{path}.nodePort", allow_zero=True))


@dataclass(frozen=True, slots=True)
class _ByFamily:
    """Sorts a Service's addresses by family: those of a family the Service has a cluster IP
    of are kept; the others are reported (kube-proxy drops them too) and dropped."""

    kind: str
    ref: str
    families: tuple[IPFamily, ...]
    problems: list[Problem]

    def keep(self, address: IPAddress | IPNetwork, path: str) -> bool:
        family = IPFamily.of(address)
        if family in self.families:
            return True
        what = "range" if isinstance(address, IPNetwork) else "address"
        self.problems.append(Problem(
            self.kind, self.ref, path,
            f"{address}: the Service has no {family.value} cluster IP (spec.ipFamilies), so "
            f"its {family.value} addresses are not programmed",
            dropped=f"{family.value} {what}"))
        return False


def _entry_addresses(manifest: Mapping[str, Any], spec: Mapping[str, Any],
                     annotations: Mapping[str, str], svc_type: str, addresses: _ByFamily,
                     ) -> tuple[tuple[IPAddress, ...], tuple[IPAddress, ...],
                                tuple[IPNetwork, ...]]:
    """The Service's external IPs, and for a LoadBalancer its ingress IPs and source ranges
    (the field, else the annotation); the other family's are reported and dropped."""
    external_ips = tuple(
        ip for i, text in enumerate(_list(spec, "externalIPs", "spec.externalIPs"))
        if addresses.keep(ip := _ip(text, f"spec.externalIPs[{i}]"), f"spec.externalIPs[{i}]")
    )
    if svc_type != "LoadBalancer":
        return external_ips, (), ()
    return (external_ips, _load_balancer_ips(manifest, addresses),
            _source_ranges(spec, annotations, addresses))


def _load_balancer_ips(manifest: Mapping[str, Any],
                       addresses: _ByFamily) -> tuple[IPAddress, ...]:
    status = _mapping(manifest, "status")
    load_balancer = _mapping(status, "loadBalancer", "status.loadBalancer")
    ips: list[IPAddress] = []
    for i, raw in enumerate(_list(load_balancer, "ingress", "status.loadBalancer.ingress")):
        path = f"status.loadBalancer.ingress[{i}]"
        ingress = _as_mapping(raw, path)
        if not ingress.get("ip"):
            continue  # hostname-only ingress: nothing to capture
        if ingress.get("ipMode") == "Proxy":
            continue  # the load balancer proxies; traffic arrives for the node, not the VIP
        ip = _ip(ingress.get("ip"), f"{path}.ip")
        if addresses.keep(ip, f"{path}.ip"):
            ips.append(ip)
    return tuple(ips)


def _source_ranges(spec: Mapping[str, Any], annotations: Mapping[str, str],
                   addresses: _ByFamily) -> tuple[IPNetwork, ...]:
    texts = [(f"spec.loadBalancerSourceRanges[{i}]", text) for i, text in
             enumerate(_list(spec, "loadBalancerSourceRanges", "spec.loadBalancerSourceRanges"))]
    if not texts and annotations.get(SOURCE_RANGES_ANNOTATION):
        path = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
        texts = [(path, part) for part in annotations[SOURCE_RANGES_ANNOTATION].split(",")]
    # Reported, not only dropped: with IPv6 ranges alone, IPv4 clients are not restricted.
    return tuple(net for path, text in texts if addresses.keep(net := _cidr(text, path), path))


def _policy(spec: Mapping[str, Any], key: str) -> str:
    value = _string(spec, key, f"spec.{key}") or "Cluster"
    if value not in ("Cluster", "Local"):
        raise InvalidField(f"spec.{key}", f"must be Cluster or Local, not {value!r}")
    return value


def _affinity_timeout(spec: Mapping[str, Any]) -> int | None:
    affinity = _string(spec, "sessionAffinity", "spec.sessionAffinity") or "None"
    if affinity == "None":
        return None
    if affinity != "ClientIP":
        raise InvalidField("spec.sessionAffinity", f"must be None or ClientIP, not {affinity!r}")
    config = _mapping(_mapping(spec, "sessionAffinityConfig", "spec.sessionAffinityConfig"),
                      "clientIP", "spec.sessionAffinityConfig.clientIP")
    path = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    raw = config.get("timeoutSeconds")
    if raw is None:
        return DEFAULT_AFFINITY_TIMEOUT
    timeout = _int(raw, path)
    if not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
        raise InvalidField(path, f"{timeout} is outside 1..{MAX_AFFINITY_TIMEOUT}")
    return timeout


def _endpoint_slice(manifest: Mapping[str, Any], ref: str,
                    problems: list[Problem]) -> EndpointSliceInfo:
    meta = _mapping(manifest, "metadata", required=True)
    name = _dns_subdomain(_string(meta, "name", "metadata.name", required=True),
                          "metadata.name")
    namespace = _namespace(meta)
    labels = _string_map(meta, "labels", "metadata.labels")
    label_path = f"metadata.labels[{SERVICE_NAME_LABEL}]"
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        raise InvalidField(label_path, "missing")
    if len(service) > 63 or not _LABEL_VALUE.fullmatch(service):
        raise InvalidField(label_path, f"'{printable(service)}' is not a label value (at most "
                                       "63 characters of A-Z, a-z, 0-9, '-', '_' and '.', "
                                       "starting and ending with a letter or digit)")
    annotations = _string_map(meta, "annotations", "metadata.annotations")
    address_type = _string(manifest, "addressType", "addressType", required=True)
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise InvalidField("addressType",
                           f"must be IPv4, IPv6 or FQDN, not '{printable(address_type)}'")
    family = None if address_type == "FQDN" else IPFamily(address_type)
    if family is None:
        # Kept (so the state matches the API), but its endpoints reach no rule.
        problems.append(Problem("EndpointSlice", ref, "addressType",
                                "FQDN endpoints are never programmed (kube-proxy ignores them)"))

    ports: list[SlicePort] = []
    for i, raw in enumerate(_list(manifest, "ports", "ports")):
        path = f"ports[{i}]"
        port_spec = _as_mapping(raw, path)
        if port_spec.get("port") is None:
            # "All ports": kube-proxy cannot DNAT to that, so it ignores such a port.
            problems.append(Problem("EndpointSlice", ref, f"{path}.port",
                                    "no port number (all ports) is not programmed",
                                    dropped=f"port {i}"))
            continue
        ports.append(SlicePort(
            name=_port_name(port_spec, path),
            protocol=_protocol(port_spec.get("protocol"), f"{path}.protocol"),
            port=_port(port_spec.get("port"), f"{path}.port"),
        ))

    endpoints: list[Endpoint] = []
    for i, raw in enumerate(_list(manifest, "endpoints", "endpoints")):
        # The common endpoint first, without building its path (100,000 at 10k services).
        plain = (_plain_endpoint(raw, family)
                 if family is not None and type(raw) is dict else None)
        if plain is not None:
            endpoints.append(plain)
            continue
        path = f"endpoints[{i}]"
        try:
            endpoint = _endpoint(_as_mapping(raw, path), path, family)
        except InvalidField as err:
            problems.append(Problem("EndpointSlice", ref, err.path, err.message,
                                    dropped=f"endpoint {i}"))
            continue
        if endpoint is not None:
            endpoints.append(endpoint)
    trigger = annotations.get(TRIGGER_TIME_ANNOTATION)
    return EndpointSliceInfo(
        namespace=namespace, name=name, service=service, family=family, ports=tuple(ports),
        endpoints=tuple(endpoints), trigger_time=_timestamp(trigger) if trigger else None,
    )


_ENDPOINT_KEYS = frozenset({"addresses", "conditions", "nodeName", "zone", "targetRef",
                            "hostname", "deprecatedTopology"})
_CONDITION_KEYS = frozenset({"ready", "serving", "terminating"})


def _plain_endpoint(spec: Mapping[str, Any], family: IPFamily) -> Endpoint | None:
    """The common, well-formed endpoint, read without building error paths.

    Returns None for anything unusual (hints, odd types, an address of the other family or
    not in its canonical spelling), which then goes through the validating reader and gets
    its precise error message.
    """
    addresses = spec.get("addresses")
    conditions = spec.get("conditions")
    conditions = {} if conditions is None else conditions
    node = spec.get("nodeName")
    zone = spec.get("zone")
    if (not _ENDPOINT_KEYS.issuperset(spec)
            or type(addresses) is not list or not addresses or type(conditions) is not dict
            or not _CONDITION_KEYS.issuperset(conditions)
            or not (node is None or type(node) is str)
            or not (zone is None or type(zone) is str)):
        return None
    text = addresses[0]
    ip = _canonical_ip(text, family) if type(text) is str else None
    if ip is None:
        return None
    ready = conditions.get("ready")
    serving = conditions.get("serving")
    terminating = conditions.get("terminating")
    if ((ready is not None and type(ready) is not bool)
            or (serving is not None and type(serving) is not bool)
            or (terminating is not None and type(terminating) is not bool)):
        return None
    return endpoint_of(ip, 0, node_name=node or None, zone=zone or None,
                       ready=ready is not False, serving=serving is not False,
                       terminating=terminating is True, address=text)


def _canonical_ip(text: str, family: IPFamily) -> IPAddress | None:
    """``text`` as an address of ``family`` when it is spelled as ``str()`` of that address
    spells it (what the API server stores); None otherwise, for the validating reader.

    Several times faster than :mod:`ipaddress`'s parser and printer, which dominated
    loading 10,000 dual-stack services.
    """
    if family is IPFamily.IPV4:
        quad = _CANONICAL_QUAD.fullmatch(text)
        if quad is None:
            return None
        a, b, c, d = map(int, quad.groups())
        if a > 255 or b > 255 or c > 255 or d > 255:
            return None
        return ipaddress.IPv4Address(a << 24 | b << 16 | c << 8 | d)
    if _IPV6_TEXT.fullmatch(text) is None:
        return None
    head, double, tail = text.partition("::")
    left = head.split(":") if head else []
    right = tail.split(":") if tail else []
    zeros = 8 - len(left) - len(right)
    if (zeros < 0 if double else zeros != 0) or not all(0 < len(g) < 5 for g in left + right):
        return None
    hextets = [int(g, 16) for g in left] + [0] * zeros + [int(g, 16) for g in right]
    # IPv4-mapped addresses: Python 3.13's str() spells them with a dotted quad.
    if hextets[:6] == [0, 0, 0, 0, 0, 0xFFFF] or _ipv6_spelling(hextets) != text:
        return None
    value = 0
    for hextet in hextets:
        value = value << 16 | hextet
    return ipaddress.IPv6Address(value)


_IPV6_TEXT = re.compile(r"[0-9a-f:]{2,39}")


def _ipv6_spelling(hextets: list[int]) -> str:
    """RFC 5952, as ``str(IPv6Address)``: lowercase, no leading zeros, the first longest run
    of two or more zero groups as ``::``."""
    best = best_len = run_len = 0
    for i, hextet in enumerate(hextets):
        run_len = run_len + 1 if hextet == 0 else 0
        if run_len > best_len:
            best, best_len = i - run_len + 1, run_len
    groups = [f"{hextet:x}" for hextet in hextets]
    if best_len < 2:
        return ":".join(groups)
    return ":".join(groups[:best]) + "::" + ":".join(groups[best + best_len:])


def _endpoint(spec: Mapping[str, Any], path: str, family: IPFamily | None) -> Endpoint | None:
    if family is not None:
        plain = _plain_endpoint(spec, family)
        if plain is not None:
            return plain
    addresses = _list(spec, "addresses", f"{path}.addresses")
    if not addresses:
        raise InvalidField(f"{path}.addresses", "missing")
    if family is None:
        return None
    # kube-proxy uses only the first address of an endpoint.
    ip = _ip(addresses[0], f"{path}.addresses[0]")
    if IPFamily.of(ip) is not family:
        raise InvalidField(f"{path}.addresses[0]", f"{ip} is not an {family.value} address")
    conditions = _mapping(spec, "conditions", f"{path}.conditions")
    ready = _optional_bool(conditions, "ready", f"{path}.conditions.ready")
    serving = _optional_bool(conditions, "serving", f"{path}.conditions.serving")
    terminating = _optional_bool(conditions, "terminating", f"{path}.conditions.terminating")
    hints = _mapping(spec, "hints", f"{path}.hints")
    zones, nodes = (frozenset(
        _string(_as_mapping(item, f"{path}.hints.{key}[{i}]"), "name",
                f"{path}.hints.{key}[{i}].name", required=True)
        for i, item in enumerate(_list(hints, key, f"{path}.hints.{key}"))
    ) for key in ("forZones", "forNodes"))
    return Endpoint(
        ip=ip, port=0,
        node_name=_string(spec, "nodeName", f"{path}.nodeName") or None,
        zone=_string(spec, "zone", f"{path}.zone") or None,
        zone_hints=zones,
        node_hints=nodes,
        # kube-proxy's defaults: a missing condition means ready/serving, not terminating.
        ready=True if ready is None else ready,
        serving=True if serving is None else serving,
        terminating=bool(terminating),
    )


def trigger_time(manifest: Mapping[str, Any]) -> datetime | None:
    """An EndpointSlice manifest's last-change-trigger-time, if set and readable."""
    meta = manifest.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    stamp = annotations.get(TRIGGER_TIME_ANNOTATION) if isinstance(annotations, Mapping) else None
    return _timestamp(stamp) if isinstance(stamp, str) and stamp else None


def _timestamp(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


# --- names, checked as the API server checks them ---------------------------------------------
# Names end up in rule comments and chain hashes: whatever the API server would refuse is
# refused here too, so a name can never carry a quote, a blank or a newline into a rule.

_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = re.compile(_LABEL)
_DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")


def _dns_label(value: str, path: str) -> str:
    if len(value) > 63 or not _DNS1123_LABEL.fullmatch(value):
        raise InvalidField(path, f"'{printable(value)}' is not a DNS-1123 label (at most 63 "
                                 "characters of a-z, 0-9 and '-', starting and ending with a "
                                 "letter or digit)")
    return value


def _dns_subdomain(value: str, path: str) -> str:
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(value):
        raise InvalidField(path, f"'{printable(value)}' is not a DNS-1123 subdomain (at most "
                                 "253 characters: DNS-1123 labels joined by '.')")
    return value


def _namespace(meta: Mapping[str, Any]) -> str:
    namespace = _string(meta, "namespace", "metadata.namespace")
    return _dns_label(namespace, "metadata.namespace") if namespace else "default"


def _port_name(port_spec: Mapping[str, Any], path: str) -> str:
    # Service and EndpointSlice port names are DNS-1123 labels (only container port names
    # are the stricter IANA service names).
    name = _string(port_spec, "name", f"{path}.name")
    return _dns_label(name, f"{path}.name") if name else ""


# --- field readers: each raises InvalidField naming the path ---------------------------------

def _as_mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidField(path, f"must be an object, not {type(value).__name__}")
    return value


def _mapping(parent: Mapping[str, Any], key: str, path: str | None = None, *,
             required: bool = False) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        if required:
            raise InvalidField(path or key, "missing")
        return {}
    return _as_mapping(value, path or key)


def _list(parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise InvalidField(path, f"must be a list, not {type(value).__name__}")
    return list(value)


def _string(parent: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str:
    value = parent.get(key)
    if value is None or value == "":
        if required:
            raise InvalidField(path, "missing")
        return ""
    if not isinstance(value, str):
        raise InvalidField(path, f"must be a string, not {type(value).__name__}")
    return value


def _string_map(parent: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
    value = _mapping(parent, key, path)
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidField(f"{path}[{k}]", "keys and values must be strings")
        out[k] = v
    return out


def _optional_bool(parent: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidField(path, f"must be true or false, not {value!r}")
    return value


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(path, f"must be an integer, not {value!r}")
    return value


def _port(value: Any, path: str, *, allow_zero: bool = False) -> int:
    if value is None and allow_zero:
        return 0
    if value is None:
        raise InvalidField(path, "missing")
    port = _int(value, path)
    if port == 0 and allow_zero:
        return 0
    if not 1 <= port <= 65535:
        raise InvalidField(path, f"{port} is not a port number (1-65535)")
    return port


def _protocol(value: Any, path: str) -> Protocol:
    if value is None:
        return Protocol.TCP
    try:
        return Protocol(value)
    except ValueError:
        raise InvalidField(path, f"must be TCP, UDP or SCTP, not {value!r}") from None


# ASCII digits only: int() also reads other scripts' digits ("1\u0660" is 10).
_DOTTED_QUAD = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})", re.ASCII)
_CANONICAL_QUAD = re.compile(r"(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})\."
                             r"(0|[1-9]\d{0,2})", re.ASCII)  # no leading zeros: str(ip) == text


def _ip(value: Any, path: str) -> IPAddress:
    if not isinstance(value, str):
        raise InvalidField(path, f"must be an IP address string, not {value!r}")
    quad = _DOTTED_QUAD.fullmatch(value.strip())
    if quad is not None:
        # Also the fast path (5x faster than ipaddress's parser at 100k endpoints). Leading
        # zeros are decimal, as kube-proxy's ParseIPSloppy reads them: API servers before
        # 1.33's stricter validation stored such addresses, and they still come back.
        a, b, c, d = map(int, quad.groups())
        if a < 256 and b < 256 and c < 256 and d < 256:
            return ipaddress.IPv4Address(a << 24 | b << 16 | c << 8 | d)
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidField(path, f"{value!r} is not a valid IP address") from None


def _cidr(value: Any, path: str) -> IPNetwork:
    if not isinstance(value, str):
        raise InvalidField(path, f"must be a CIDR string, not {value!r}")
    address, slash, length = value.strip().partition("/")
    if slash and _DOTTED_QUAD.fullmatch(address):
        address = str(_ip(address, path))  # leading zeros are decimal, as in _ip
    try:
        # Like kube-proxy: surrounding blanks are tolerated and host bits are masked off.
        return ipaddress.ip_network(f"{address}{slash}{length}", strict=False)
    except (ValueError, InvalidField):
        raise InvalidField(path, f"{value!r} is not a valid CIDR") from None


def parse_all(objects: Iterable[Any]) -> tuple[list[Parsed], list[Problem]]:
    """Parse many objects; returns the accepted ones and every problem found."""
    accepted: list[Parsed] = []
    problems: list[Problem] = []
    for obj in objects:
        parsed = parse_object(obj)
        problems.extend(parsed.problems)
        if parsed.value is not None:
            accepted.append(parsed)
    return accepted, problems
