"""Which conntrack flows are stale: pure decisions for conntrack cleanup, as kube-proxy makes them.

A UDP "connection" (DNS, statsd, QUIC) stays pinned to the endpoint conntrack chose for it for
as long as packets keep flowing, even after that endpoint is gone. After each successful sync,
kube-proxy (``pkg/proxy/conntrack/cleanup.go``) deletes the UDP entries of its IP family that go
to a service destination (cluster IP, external IP or load-balancer IP with the service port, or
any address with a NodePort) and whose reply source is not the IP of one of that service port's
*serving* endpoints; iptsync deletes exactly those.

What is kept, and why (kube-proxy's reasoning, so that UDP behaves as TCP does):

- flows to any endpoint that still serves, wherever it is used: terminating-but-serving
  endpoints, endpoints outside this node's topology zone, endpoints on other nodes that an
  externalTrafficPolicy=Local service does not send to from here. Deleting those breaks DNS
  and QUIC during rollouts while the endpoint would have answered;
- every flow of a service port that has no serving endpoint at all: nothing better exists;
- TCP and SCTP flows: their endpoints end them (RST, ABORT) when they go away.

Endpoints are compared by IP, not ``ip:port``, as kube-proxy does. A flow that was never DNATed
(created before the service had endpoints) answers from the service IP itself and is deleted.

:func:`flow_targets` says where each destination may lead, :func:`stale` judges one flow,
:func:`flow_queries` says which kernel-side filters find the candidates;
:mod:`iptsync.kernel.conntrack` reads and deletes the kernel's entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from iptsync.core.model import IPFamily, Protocol, ServicePort
from iptsync.core.policy import Settings
from iptsync.core.state import ClusterState, ServiceKey

UDP = 17  # IANA protocol number (socket.IPPROTO_UDP), as conntrack reports it
# Above this many destination ports one kernel-side filter by protocol replaces the per-port
# filters: the kernel walks its whole table once per filter (about 30 ms of CPU per 100,000
# entries here), while reading one flow into Python costs 15 to 25 us (docs/performance.md).
QUERY_LIMIT = 32


@dataclass(frozen=True)
class Flow:
    """The parts of a conntrack entry that matter: original destination, reply source."""

    proto: int
    orig_dst: str
    orig_dport: int
    reply_src: str
    reply_sport: int


@dataclass(frozen=True)
class FlowTargets:
    """Where one IP family's UDP service traffic may lead: the IPs of the serving endpoints.

    ``partial``: only the services a partial sync changed (see :func:`flow_queries`).
    """

    family: IPFamily
    services: Mapping[tuple[str, int], frozenset[str]] = field(default_factory=dict)
    node_ports: Mapping[int, frozenset[str]] = field(default_factory=dict)
    partial: bool = False

    def __bool__(self) -> bool:
        return bool(self.services or self.node_ports)


@dataclass(frozen=True)
class FlowQuery:
    """One kernel-side filter: flows of ``proto`` to ``address`` and ``port`` in the original
    direction (None: any); with ``dnat`` True only DNATed flows, with False only flows neither
    DNATed nor answered."""

    proto: int
    address: str | None = None
    port: int | None = None
    dnat: bool | None = None


def flow_targets(state: ClusterState, settings: Settings,
                 services: Iterable[ServiceKey] | None = None) -> FlowTargets:
    """Every UDP service destination of ``settings.family`` -> its serving endpoints' IPs.

    With ``services``, only those services' destinations (what a partial sync changed).
    """
    if services is None:
        ports: Iterable[ServicePort] = state.service_ports()
    else:
        ports = [port for key in sorted(services) if key in state.services
                 for port in state.services[key].ports]
    by_address: dict[tuple[str, int], frozenset[str]] = {}
    by_node_port: dict[int, frozenset[str]] = {}
    for port in ports:
        if port.protocol is not Protocol.UDP or port.family is not settings.family:
            continue
        serving = frozenset(str(ep.ip) for ep in state.endpoints(port) if ep.serving)
        if not serving:
            continue  # nothing better to send the flows to: kube-proxy keeps them
        for address in (port.cluster_ip, *port.external_ips, *port.load_balancer_ips):
            by_address[(str(address), port.port)] = serving
        if port.node_port:
            by_node_port[port.node_port] = serving
    return FlowTargets(settings.family, by_address, by_node_port, partial=services is not None)


def stale(flow: Flow, targets: FlowTargets) -> bool:
    """True when the flow goes to a service destination but not to one of its serving
    endpoints (a flow never DNATed answers from the destination itself: stale too)."""
    if flow.proto != UDP:
        return False
    serving = targets.services.get((flow.orig_dst, flow.orig_dport))
    if serving is not None and flow.reply_src not in serving:
        return True
    serving = targets.node_ports.get(flow.orig_dport)
    return serving is not None and flow.reply_src not in serving


def flow_queries(targets: FlowTargets, *, by_address: bool = True,
                 limit: int = QUERY_LIMIT) -> list[FlowQuery]:
    """The kernel-side filters that return the flows :func:`stale` may condemn (and more).

    A destination port with one address is asked for by address and port (when
    ``by_address``). A port with several addresses, a NodePort (any address) or, without
    ``by_address``, any port is asked for by port alone: in a full sync all its flows, in a
    partial one only the DNATed flows and those nobody answered, two small sets where the
    port's unrelated traffic (DNS to servers outside the cluster) is neither; a flow that
    was never DNATed yet was answered is left to the next full sync. Past ``limit`` ports,
    the same by protocol alone.
    """
    addresses: dict[int, set[str | None]] = {}
    for address, port in targets.services:
        addresses.setdefault(port, set()).add(address)
    for port in targets.node_ports:
        addresses.setdefault(port, set()).add(None)  # a NodePort: any address
    if len(addresses) > limit:
        return _unnamed(targets, None)
    queries = []
    for port, on_port in sorted(addresses.items(), key=lambda item: item[0]):
        only = next(iter(on_port))
        if by_address and len(on_port) == 1 and only is not None:
            queries.append(FlowQuery(UDP, only, port))
        else:
            queries += _unnamed(targets, port)
    return queries


def _unnamed(targets: FlowTargets, port: int | None) -> list[FlowQuery]:
    if not targets.partial:
        return [FlowQuery(UDP, None, port)]
    return [FlowQuery(UDP, None, port, dnat=True), FlowQuery(UDP, None, port, dnat=False)]
