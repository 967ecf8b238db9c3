"""Clear UDP and SCTP conntrack entries that point at endpoints which no longer serve.

A UDP "connection" (DNS, statsd) stays pinned to the endpoint conntrack chose for it for as
long as packets keep flowing, even after that endpoint is gone. After each successful sync,
entries to a service destination (cluster IP, external IP, load-balancer IP, or a NodePort
on a node address) are deleted when their reply source is not one of that service's current
endpoints, or when they were never DNATed (created while the service had no endpoints). The
decision is pure (:func:`stale`); :func:`clear_stale_flows` is the pyroute2 adapter.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from iptsync.model import Protocol, ServicePort
from iptsync.policy import Settings, categorize_endpoints
from iptsync.state import ClusterState, ServiceKey

log = logging.getLogger(__name__)

IPPROTO = {Protocol.UDP: socket.IPPROTO_UDP, Protocol.SCTP: socket.IPPROTO_SCTP}
Destination = tuple[int, str, int]  # (ip protocol number, address, port)


@dataclass(frozen=True)
class Flow:
    """The parts of a conntrack entry that matter: original destination, reply source."""

    proto: int
    orig_dst: str
    orig_dport: int
    reply_src: str
    reply_sport: int


def flow_targets(state: ClusterState, settings: Settings,
                 services: Iterable[ServiceKey] | None = None,
                 ) -> dict[Destination, frozenset[str]]:
    """Every UDP/SCTP service destination -> the ``ip:port`` endpoints it may be DNATed to.

    With ``services``, only those services' destinations (what a partial sync changed).
    """
    zone = state.node_zone
    node_addresses = [str(ip) for ip in settings.node_ips if ip.version == 4]
    if settings.nodeports_on_localhost:
        node_addresses.append("127.0.0.1")
    targets: dict[Destination, frozenset[str]] = {}
    if services is None:
        ports: Iterable[ServicePort] = state.service_ports()
    else:
        ports = [port for key in sorted(services) if key in state.services
                 for port in state.services[key].ports]
    for port in ports:
        proto = IPPROTO.get(port.protocol)
        if proto is None:
            continue
        sets = categorize_endpoints(port, state.endpoints(port), settings.node_name, zone)
        endpoints = frozenset(ep.key for ep in sets.reachable)
        addresses = [str(port.cluster_ip), *map(str, port.external_ips),
                     *map(str, port.load_balancer_ips)]
        for address in addresses:
            targets[(proto, address, port.port)] = endpoints
        if port.node_port:
            for address in node_addresses:
                targets[(proto, address, port.node_port)] = endpoints
    return targets


def stale(flow: Flow, targets: dict[Destination, frozenset[str]]) -> bool:
    """True when the flow goes to a service destination but not to one of its endpoints."""
    endpoints = targets.get((flow.proto, flow.orig_dst, flow.orig_dport))
    if endpoints is None:
        return False
    if (flow.reply_src, flow.reply_sport) == (flow.orig_dst, flow.orig_dport):
        return True  # never DNATed: it would keep bypassing the new rules
    return f"{flow.reply_src}:{flow.reply_sport}" not in endpoints


def clear_stale_flows(targets: dict[Destination, frozenset[str]]) -> int:
    """Delete stale entries from this network namespace's conntrack table; returns the count."""
    if not targets:
        return 0
    from pyroute2 import Conntrack  # noqa: PLC0415  (netlink socket only when needed)

    deleted = 0
    ct = Conntrack()
    try:
        protos = {dest[0] for dest in targets}
        # Collect first: pyroute2's dump generator breaks if the socket is used meanwhile.
        doomed = [(entry, flow) for entry, flow in _flows(ct, protos) if stale(flow, targets)]
        for entry, flow in doomed:
            ct.delete(entry)
            deleted += 1
            log.info("deleted stale conntrack entry %s:%d -> %s:%d", flow.orig_dst,
                     flow.orig_dport, flow.reply_src, flow.reply_sport)
    finally:
        ct.close()
    return deleted


def _flows(ct: object, protos: set[int]) -> Iterator[tuple[object, Flow]]:
    entries: Iterable[object] = ct.dump_entries()  # type: ignore[attr-defined]
    for entry in entries:
        orig, reply = entry.tuple_orig, entry.tuple_reply  # type: ignore[attr-defined]
        if orig.proto not in protos or orig.daddr is None or reply.saddr is None:
            continue
        yield entry, Flow(orig.proto, orig.daddr, orig.dport or 0, reply.saddr,
                          reply.sport or 0)
