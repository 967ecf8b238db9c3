"""The cluster as this node's proxier knows it: services, merged EndpointSlices, this node.

Objects go in through :meth:`ClusterState.upsert` and :meth:`ClusterState.delete`, which
return the services whose rules may have changed (the dirty set that incremental syncs use).
Endpoints of a service port are the union of its slices, deduplicated by ``ip:port`` and
sorted by that string, as kube-proxy orders them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

from iptsync.core.model import (
    Endpoint,
    EndpointSliceInfo,
    IPFamily,
    NodeInfo,
    Parsed,
    Protocol,
    ServiceInfo,
    ServicePort,
    ServicePortName,
    endpoint_of,
)

ServiceKey = tuple[str, str]
PortKey = tuple[ServicePortName, Protocol, IPFamily]


class ClusterState:
    """Services, EndpointSlices and this node's Node object, indexed for rendering."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name
        self.node: NodeInfo | None = None
        self._services: dict[ServiceKey, ServiceInfo] = {}
        self._slices: dict[tuple[str, str], EndpointSliceInfo] = {}
        self._slices_of: defaultdict[ServiceKey, set[tuple[str, str]]] = defaultdict(set)
        self._endpoints_cache: dict[ServiceKey, dict[PortKey, tuple[Endpoint, ...]]] = {}

    @classmethod
    def from_parsed(cls, node_name: str, parsed: Iterable[Parsed]) -> ClusterState:
        state = cls(node_name)
        for item in parsed:
            if item.value is not None:
                state.upsert(item.value)
        return state

    # --- updates ---------------------------------------------------------------------------

    def upsert(self, obj: ServiceInfo | EndpointSliceInfo | NodeInfo) -> set[ServiceKey]:
        """Add or replace an object; returns the services whose rules may change."""
        if isinstance(obj, ServiceInfo):
            if self._services.get(obj.key) == obj:
                return set()
            self._services[obj.key] = obj
            return {obj.key}
        if isinstance(obj, EndpointSliceInfo):
            old = self._slices.get(obj.key)
            if old == obj:
                return set()
            dirty = self._drop_slice(old) if old is not None else set()
            self._slices[obj.key] = obj
            service = (obj.namespace, obj.service)
            self._slices_of[service].add(obj.key)
            self._endpoints_cache.pop(service, None)
            return dirty | {service}
        if obj.name != self.node_name or obj == self.node:
            return set()
        old_zone = self.node_zone
        self.node = obj
        # Topology hints depend on this node's zone: every service may change.
        return set(self._services) if obj.zone != old_zone else set()

    def delete_node(self) -> set[ServiceKey]:
        """Forget this node's Node object; like a change of it, a change of zone concerns
        every service."""
        old_zone, self.node = self.node_zone, None
        return set(self._services) if old_zone is not None else set()

    def delete_service(self, key: ServiceKey) -> set[ServiceKey]:
        return {key} if self._services.pop(key, None) is not None else set()

    def delete_slice(self, key: tuple[str, str]) -> set[ServiceKey]:
        old = self._slices.pop(key, None)
        return self._drop_slice(old) if old is not None else set()

    def _drop_slice(self, old: EndpointSliceInfo) -> set[ServiceKey]:
        service = (old.namespace, old.service)
        self._slices_of[service].discard(old.key)
        if not self._slices_of[service]:
            del self._slices_of[service]
        self._endpoints_cache.pop(service, None)
        return {service}

    # --- queries ---------------------------------------------------------------------------

    @property
    def node_zone(self) -> str | None:
        """This node's zone (its ``topology.kubernetes.io/zone`` label), for topology hints."""
        return self.node.zone if self.node else None

    @property
    def services(self) -> dict[ServiceKey, ServiceInfo]:
        return self._services

    def slice_keys(self) -> list[tuple[str, str]]:
        return list(self._slices)

    def service_ports(self) -> Iterator[ServicePort]:
        """Every service port, in ``namespace/name:port`` order."""
        for key in sorted(self._services):
            yield from self._services[key].ports

    def endpoints(self, port: ServicePort) -> tuple[Endpoint, ...]:
        """The merged endpoints of one service port (all conditions; the renderer filters)."""
        by_port = self._endpoints_cache.get(port.name.service)
        if by_port is None:
            by_port = self._merge_slices(port.name.service)
            self._endpoints_cache[port.name.service] = by_port
        return by_port.get((port.name, port.protocol, port.family), ())

    def slices_of(self, service: ServiceKey) -> list[EndpointSliceInfo]:
        return [self._slices[key] for key in sorted(self._slices_of.get(service, ()))]

    def _merge_slices(self, service: ServiceKey) -> dict[PortKey, tuple[Endpoint, ...]]:
        merged: dict[PortKey, dict[str, Endpoint]] = defaultdict(dict)
        namespace, name = service
        for info in self.slices_of(service):
            if info.family is None:
                continue
            for slice_port in info.ports:
                bucket = merged[(ServicePortName(namespace, name, slice_port.name),
                                 slice_port.protocol, info.family)]
                for endpoint in info.endpoints:
                    candidate = with_port(endpoint, slice_port.port)
                    existing = bucket.get(candidate.key)
                    # The same address may appear in two slices while a pod moves between
                    # them; prefer the copy that can take traffic.
                    if existing is None or (candidate.ready and not existing.ready):
                        bucket[candidate.key] = candidate
        return {
            key: tuple(bucket[k] for k in sorted(bucket)) for key, bucket in merged.items()
        }


def with_port(endpoint: Endpoint, port: int) -> Endpoint:
    """``dataclasses.replace(endpoint, port=port)``, without its per-call introspection."""
    return endpoint_of(endpoint.ip, port, node_name=endpoint.node_name, zone=endpoint.zone,
                       ready=endpoint.ready, serving=endpoint.serving,
                       terminating=endpoint.terminating, address=endpoint.address,
                       zone_hints=endpoint.zone_hints, node_hints=endpoint.node_hints)


def is_local(endpoint: Endpoint, node_name: str) -> bool:
    """True when the endpoint runs on this node (by its nodeName)."""
    return endpoint.node_name is not None and endpoint.node_name == node_name
