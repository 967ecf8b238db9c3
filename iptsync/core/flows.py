"""Which conntrack flows are stale: pure decisions for conntrack cleanup.

A UDP "connection" (DNS, statsd) stays pinned to the endpoint conntrack chose for it for as
long as packets keep flowing, even after that endpoint is gone. After each successful sync,
entries to a service destination (cluster IP, external IP, load-balancer IP, or a NodePort
on a node address) are deleted when their reply source is not one of that service's current
endpoints, or when they were never DNATed (created while the service had no endpoints).
:func:`flow_targets` says where each destination may lead, :func:`stale` judges one flow;
:mod:`iptsync.kernel.conntrack` reads and deletes the kernel's entries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from iptsync.core.model import Protocol, ServicePort
from iptsync.core.policy import Settings, categorize_endpoints
from iptsync.core.state import ClusterState, ServiceKey

# IP protocol numbers (IANA; socket.IPPROTO_UDP and _SCTP), as conntrack reports them.
IPPROTO = {Protocol.UDP: 17, Protocol.SCTP: 132}
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
