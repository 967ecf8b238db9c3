"""Policy: what kube-proxy's rules decide for a service port on a node, apart from the rules.

Why a module of its own: three readers need the same decisions. :mod:`iptsync.core.render` turns
them into rules, :mod:`iptsync.inspection.explain` reports them to a person, and
:mod:`iptsync.core.flows` picks the conntrack flows to endpoints they no longer choose. Kept
here once, an explanation cannot disagree with the rules and a flow cleanup cannot keep what the
rules dropped. What is decided:

- the node and the flags that shape everything (:class:`Settings`);
- which endpoints serve (:func:`categorize_endpoints`: ready ones, the terminating fallback,
  topology hints, the Local traffic policies);
- where each entry point leads (:func:`port_targets`: DNAT, REJECT with no endpoints, DROP
  with no local endpoint, the load-balancer firewall);
- for each entry point and each kind of client (:data:`Origin`: a pod, the node itself,
  outside), which endpoints get the connection, whether it is masqueraded, and why
  (:func:`entry_decisions`).

Pure: service ports, endpoints and settings in, frozen decisions out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

from iptsync.core import names
from iptsync.core.model import (
    Endpoint,
    IPAddress,
    IPFamily,
    IPNetwork,
    ServicePort,
    host_port,
)
from iptsync.core.state import is_local

# Where a new connection comes from, as the rules can tell: a pod (inside --cluster-cidr),
# the node itself (locally generated), or anything else.
Origin = Literal["pod", "node", "external"]
ORIGINS: tuple[Origin, ...] = ("pod", "node", "external")
# What becomes of a new connection: DNATed to an endpoint, REJECTed, DROPped, or ACCEPTed
# untouched (not handled by the service rules).
Verdict = Literal["DNAT", "ACCEPT", "DROP", "REJECT"]
EntryKind = Literal["cluster-ip", "external-ip", "load-balancer-ip", "node-port"]
# Which endpoint hints narrow the cluster endpoints: none, node hints (trafficDistribution
# PreferSameNode) or zone hints (PreferSameZone / PreferClose, topology-aware routing).
Topology = Literal["", "node", "zone"]


@dataclass(frozen=True)
class Settings:
    """The node and the flags that shape one IP family's rules (kube-proxy's names in comments).

    A dual-stack node has one per family (:meth:`for_family`): kube-proxy's flags take values
    of both families, and each family's proxier sees only its own.
    """

    node_name: str  # --hostname-override
    cluster_cidrs: tuple[IPNetwork, ...] = ()  # --cluster-cidr; empty: no local detection
    masquerade_all: bool = False  # --masquerade-all
    masquerade_bit: int = 14  # --iptables-masquerade-bit
    nodeport_addresses: tuple[IPNetwork, ...] = ()  # --nodeport-addresses; empty: all
    nodeport_primary: bool = False  # --nodeport-addresses primary (options.with_node fills in)
    node_ips: tuple[IPAddress, ...] = ()  # this node's addresses (first = primary node IP)
    localhost_nodeports: bool = True  # --iptables-localhost-nodeports
    random_fully: bool = True  # MASQUERADE --random-fully (iptables >= 1.6.2)
    conntrack_tcp_be_liberal: bool = False  # nf_conntrack_tcp_be_liberal: no INVALID drop
    large_cluster_endpoints: int = 1000  # above this many endpoints, drop per-endpoint comments
    family: IPFamily = IPFamily.IPV4  # the family these rules are for (iptables or ip6tables)
    detect_local_mode: str = "ClusterCIDR"  # --detect-local-mode
    bridge_interface: str = ""  # --pod-bridge-interface (detect-local-mode BridgeInterface)
    interface_name_prefix: str = ""  # --pod-interface-name-prefix (InterfaceNamePrefix)

    def for_family(self, family: IPFamily) -> Settings:
        """This node's settings for ``family``: node addresses and NodePort CIDRs of that
        family only (none given: every address of it, as kube-proxy reads an empty list)."""
        return replace(
            self, family=family,
            node_ips=tuple(ip for ip in self.node_ips if IPFamily.of(ip) is family),
            nodeport_addresses=tuple(c for c in self.nodeport_addresses
                                     if IPFamily.of(c) is family))

    @property
    def masquerade_mark(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"

    @property
    def local_cidr(self) -> IPNetwork | None:
        """This family's cluster CIDR, used to tell pod traffic from off-cluster traffic."""
        return next((c for c in self.cluster_cidrs if IPFamily.of(c) is self.family), None)

    @property
    def nodeports_on_localhost(self) -> bool:
        """kube-proxy turns localhost NodePorts off when --nodeport-addresses excludes 127/8,
        and never has them on IPv6 (there is no route_localnet for ::1)."""
        if not self.localhost_nodeports or self.family is IPFamily.IPV6:
            return False
        loopback = ipaddress.ip_address("127.0.0.1")
        return not self.nodeport_addresses or any(
            loopback in cidr for cidr in self.nodeport_addresses)


# --- which endpoints serve -------------------------------------------------------------------

@dataclass(frozen=True)
class EndpointSets:
    """kube-proxy's categorisation of a service port's endpoints for this node."""

    cluster: tuple[Endpoint, ...]  # used with Cluster traffic policy
    local: tuple[Endpoint, ...]  # used with Local traffic policy
    reachable: tuple[Endpoint, ...]  # every endpoint that gets a SEP chain
    has_any: bool  # usable endpoints exist anywhere in the cluster
    topology: Topology  # how cluster endpoints were narrowed by hints ("": not at all)


def categorize_endpoints(port: ServicePort, endpoints: Sequence[Endpoint], node_name: str,
                         zone: str | None) -> EndpointSets:
    """Pick cluster, local and reachable endpoints as kube-proxy does.

    Ready endpoints are used; when none are, serving-and-terminating ones are (separately for
    cluster and local). Hints narrow the cluster endpoints (:func:`topology_mode`).
    """
    cluster: tuple[Endpoint, ...] = ()
    has_any = False
    topology: Topology = ""
    if port.uses_cluster_endpoints:
        topology = topology_mode(endpoints, node_name, zone)
        if topology == "node":
            cluster = tuple(ep for ep in endpoints if ep.ready and node_name in ep.node_hints)
        elif topology == "zone":
            cluster = tuple(ep for ep in endpoints if ep.ready and zone in ep.zone_hints)
        else:
            cluster = tuple(ep for ep in endpoints if ep.ready)
        if not cluster:
            # Best effort to keep connections alive: topology is ignored here.
            cluster = tuple(ep for ep in endpoints if serving_terminating(ep))
        has_any = bool(cluster)
    if not port.uses_local_endpoints:
        return EndpointSets(cluster, (), cluster, has_any, topology)

    local_ready = any(ep.ready and is_local(ep, node_name) for ep in endpoints)
    local_terminating = any(
        not ep.ready and serving_terminating(ep) and is_local(ep, node_name)
        for ep in endpoints)
    has_any = has_any or any(ep.ready or serving_terminating(ep) for ep in endpoints)
    local: tuple[Endpoint, ...] = ()
    if local_ready:
        local = tuple(ep for ep in endpoints if ep.ready and is_local(ep, node_name))
    elif local_terminating:
        local = tuple(ep for ep in endpoints
                      if serving_terminating(ep) and is_local(ep, node_name))
    if not port.uses_cluster_endpoints:
        return EndpointSets((), local, local, has_any, topology)
    if not topology and not (local and not local_ready):
        # cluster holds every ready endpoint, a superset of the ready local ones.
        return EndpointSets(cluster, local, cluster, has_any, topology)
    merged = {ep.key: ep for ep in cluster} | {ep.key: ep for ep in local}
    return EndpointSets(cluster, local, tuple(merged[k] for k in sorted(merged)), has_any,
                        topology)


def topology_mode(endpoints: Sequence[Endpoint], node_name: str, zone: str | None) -> Topology:
    """Which hints kube-proxy follows for these endpoints on this node.

    Node hints (``hints.forNodes``, set for trafficDistribution PreferSameNode) when every
    ready endpoint has some and one names this node; else zone hints when every ready endpoint
    has some and one names this node's zone; else none (every ready endpoint).
    """
    ready = [ep for ep in endpoints if ep.ready]
    if not ready:
        return ""
    if all(ep.node_hints for ep in ready) and any(node_name in ep.node_hints for ep in ready):
        return "node"
    if zone and all(ep.zone_hints for ep in ready) and any(zone in ep.zone_hints
                                                           for ep in ready):
        return "zone"
    return ""


def serving_terminating(ep: Endpoint) -> bool:
    """The terminating fallback: such an endpoint is used only when none is ready."""
    return ep.serving and ep.terminating


# --- where each entry point leads ------------------------------------------------------------

@dataclass(frozen=True)
class PortTargets:
    """Where one service port's traffic can go on this node: kube-proxy's per-port decisions."""

    has_endpoints: bool  # false: every entry point REJECTs
    has_internal: bool  # false: cluster IP traffic is REJECTed or (ITP=Local) DROPped
    has_external: bool  # false: external traffic is REJECTed or (ETP=Local) DROPped
    uses_ext: bool  # NodePort, external and load-balancer IPs lead to the EXT chain
    uses_fw: bool  # load-balancer IPs lead to the FW chain (loadBalancerSourceRanges)
    fw_admits_node: bool  # the node's primary IP is inside loadBalancerSourceRanges

    @property
    def internal_block(self) -> Verdict | None:
        """REJECT (no endpoints) or DROP (none on this node under internalTrafficPolicy=Local)
        for traffic to the cluster IP; None when it is DNATed."""
        if not self.has_endpoints:
            return "REJECT"
        return None if self.has_internal else "DROP"

    @property
    def external_block(self) -> Verdict | None:
        """The same for external destinations (externalTrafficPolicy=Local)."""
        if not self.has_endpoints:
            return "REJECT"
        return None if self.has_external else "DROP"


def port_targets(port: ServicePort, sets: EndpointSets, settings: Settings) -> PortTargets:
    has_endpoints = sets.has_any
    node_ip = settings.node_ips[0] if settings.node_ips else None
    return PortTargets(
        has_endpoints=has_endpoints,
        has_internal=has_endpoints and (not port.internal_policy_local or bool(sets.local)),
        has_external=has_endpoints and (not port.external_policy_local or bool(sets.local)),
        uses_ext=has_endpoints and port.externally_accessible,
        uses_fw=has_endpoints and bool(port.load_balancer_ips) and bool(
            port.load_balancer_source_ranges),
        fw_admits_node=node_ip is not None and any(
            node_ip in cidr for cidr in port.load_balancer_source_ranges),
    )


InternalMasquerade = Literal["all", "off-cluster", "none"]


def internal_masquerade(settings: Settings) -> InternalMasquerade:
    """Which traffic to a cluster IP is masqueraded: all of it (--masquerade-all), what
    comes from outside --cluster-cidr (the node's own address included), or none (without
    --cluster-cidr pods cannot be told from other clients)."""
    if settings.masquerade_all:
        return "all"
    return "none" if settings.local_cidr is None else "off-cluster"


# --- per entry point and origin --------------------------------------------------------------

@dataclass(frozen=True)
class Excluded:
    """An endpoint that gets none of this traffic, and why."""

    endpoint: str  # ip:port
    node: str | None
    reason: str  # not-ready | terminating | not-serving | not-local | other-zone
    detail: str


@dataclass(frozen=True)
class Decision:
    """What the rules do with new connections from one origin to one entry point, and why."""

    origin: Origin
    verdict: Verdict
    reason: str
    sources: str = ""  # which addresses of that origin, when it matters (source ranges)
    endpoints: tuple[str, ...] = ()  # each gets 1/n of the connections
    chain: str | None = None  # the chain that picks the endpoint (KUBE-SVC-/KUBE-SVL-)
    masquerade: bool = False
    fallback: bool = False  # the endpoints are terminating ones: none is ready
    excluded: tuple[Excluded, ...] = ()

    @property
    def probabilities(self) -> dict[str, float]:
        return {endpoint: 1.0 / len(self.endpoints) for endpoint in self.endpoints}


@dataclass(frozen=True)
class Entry:
    """An entry point of a service port and the decision for each origin."""

    kind: EntryKind
    address: str  # ip:port ([ip]:port for IPv6), or :nodePort on the node's addresses
    decisions: tuple[Decision, ...]


def entry_decisions(port: ServicePort, endpoints: Sequence[Endpoint], settings: Settings,
                    zone: str | None) -> tuple[Entry, ...]:
    """Every entry point of ``port`` on the node ``settings`` names (in ``zone``): the
    decision for each origin, the endpoints it uses, and why the others are left out."""
    return _PortDecisions(port, endpoints, settings, zone).entries()


@dataclass(frozen=True)
class _Pool:
    """The endpoints one chain (SVC: cluster-wide, SVL: this node's) spreads traffic over."""

    chain: str
    endpoints: tuple[Endpoint, ...]
    local: bool
    policy: str  # the traffic policy field, for the not-local reason


class _PortDecisions:
    """One service port on one node: the entries and the decision for each origin."""

    def __init__(self, port: ServicePort, endpoints: Sequence[Endpoint], settings: Settings,
                 zone: str | None) -> None:
        self.port = port
        self.endpoints = endpoints
        self.settings = settings
        self.zone = zone
        self.sets = categorize_endpoints(port, endpoints, settings.node_name, zone)
        self.targets = port_targets(port, self.sets, settings)
        spn, proto = str(port.name), port.protocol.lower
        self.svc = names.svc_chain(spn, proto)
        self.svl = names.svl_chain(spn, proto)
        self.fw = names.fw_chain(spn, proto)

    def entries(self) -> tuple[Entry, ...]:
        port = self.port
        entries = [Entry("cluster-ip", host_port(port.cluster_ip, port.port), self._cluster_ip())]
        entries += [Entry("external-ip", host_port(ip, port.port), self._external(ip, fw=False))
                    for ip in port.external_ips]
        entries += [Entry("load-balancer-ip", host_port(ip, port.port),
                          self._external(ip, fw=self.targets.uses_fw))
                    for ip in port.load_balancer_ips]
        if port.node_port:
            node_port = self._external(None, fw=False)
            entries.append(Entry("node-port", f":{port.node_port}", node_port))
        return tuple(entries)

    # --- pools and decisions -------------------------------------------------------------

    def _cluster_pool(self) -> _Pool:
        return _Pool(self.svc, self.sets.cluster, False, "")

    def _local_pool(self, policy: str) -> _Pool:
        return _Pool(self.svl, self.sets.local, True, policy)

    def _dnat(self, origin: Origin, pool: _Pool, masquerade: tuple[bool, str], *,
              why: str = "", sources: str = "") -> Decision:
        fallback = any(not ep.ready for ep in pool.endpoints)
        if fallback:
            picked = ("serving terminating endpoints " + ("on this node" if pool.local else
                      "cluster-wide") + " (terminating fallback: none is ready)")
        elif pool.local:
            picked = "the ready endpoints on this node"
        elif self.sets.topology == "node":
            picked = "the ready endpoints hinted for this node (PreferSameNode hints)"
        elif self.sets.topology:
            picked = f"the ready endpoints hinted for zone {self.zone} (topology hints)"
        else:
            picked = "every ready endpoint in the cluster"
        if pool.local:
            picked += f" ({pool.policy}=Local)"
        reason = f"{why}: {picked}" if why else picked
        return Decision(origin, "DNAT", f"{reason}; {masquerade[1]}", sources,
                        tuple(ep.key for ep in pool.endpoints), pool.chain, masquerade[0],
                        fallback, self._excluded(pool))

    def _excluded(self, pool: _Pool | None) -> tuple[Excluded, ...]:
        used = {ep.key for ep in pool.endpoints} if pool else set()
        return tuple(self._why_excluded(ep, pool) for ep in self.endpoints
                     if ep.key not in used)

    def _why_excluded(self, ep: Endpoint, pool: _Pool | None) -> Excluded:
        if pool is not None and pool.local and not is_local(ep, self.settings.node_name):
            where = f"runs on {ep.node_name}" if ep.node_name else "has no nodeName"
            return Excluded(ep.key, ep.node_name, "not-local",
                            f"{where}, not on this node ({pool.policy}=Local)")
        if not ep.ready:
            if serving_terminating(ep):
                ready = "this node has ready endpoints" if pool and pool.local else (
                    "ready endpoints exist")
                return Excluded(ep.key, ep.node_name, "terminating",
                                f"terminating; no fallback to it: {ready}")
            if ep.terminating:
                return Excluded(ep.key, ep.node_name, "not-serving",
                                "terminating and no longer serving")
            return Excluded(ep.key, ep.node_name, "not-ready", "not ready")
        # categorize_endpoints leaves a ready endpoint out of a pool only for topology.
        hints = ", ".join(sorted(ep.zone_hints))
        return Excluded(ep.key, ep.node_name, "other-zone",
                        f"topology hints for zone {hints}, this node is in zone {self.zone}")

    def _reject(self, origin: Origin) -> Decision:
        return Decision(origin, "REJECT", "no endpoint is ready or terminating-and-serving: "
                        "REJECT (connection refused)", excluded=self._excluded(None))

    def _drop_no_local(self, origin: Origin, policy: str, sources: str = "") -> Decision:
        return Decision(origin, "DROP", f"{policy}=Local and no endpoint on this node: DROP "
                        "(the client times out)", sources,
                        excluded=self._excluded(self._local_pool(policy)))

    # --- entry points ----------------------------------------------------------------------

    def _cluster_ip(self) -> tuple[Decision, ...]:
        block = self.targets.internal_block
        if block == "REJECT":
            return tuple(self._reject(origin) for origin in ORIGINS)
        if block == "DROP":
            return tuple(self._drop_no_local(origin, "internalTrafficPolicy")
                         for origin in ORIGINS)
        local = self.port.internal_policy_local
        pool = self._local_pool("internalTrafficPolicy") if local else self._cluster_pool()
        return tuple(self._dnat(origin, pool, self._cluster_ip_masquerade(origin))
                     for origin in ORIGINS)

    def _cluster_ip_masquerade(self, origin: Origin) -> tuple[bool, str]:
        masquerade = internal_masquerade(self.settings)
        if masquerade == "all":
            return True, "masqueraded (--masquerade-all)"
        if masquerade == "none":
            return False, "source kept (no --cluster-cidr: nothing is masqueraded)"
        if origin == "pod":
            return False, "source kept (a pod address, inside --cluster-cidr)"
        return True, "masqueraded (the source is outside --cluster-cidr)"

    def _external(self, ip: IPAddress | None, *, fw: bool) -> tuple[Decision, ...]:
        if self.targets.external_block == "REJECT":
            return tuple(self._reject_external(origin, ip) for origin in ORIGINS)
        if not fw:
            return tuple(self._ext_chain(origin) for origin in ORIGINS)
        return tuple(decision for origin in ORIGINS for decision in self._firewall(origin))

    def _reject_external(self, origin: Origin, ip: IPAddress | None) -> Decision:
        # The REJECT rules for external destinations sit in filter KUBE-EXTERNAL-SERVICES,
        # which INPUT and FORWARD jump to but OUTPUT does not: the node's own connection to
        # an external or load-balancer IP that is not its own leaves untouched.
        if origin == "node" and ip is not None and ip not in self.settings.node_ips:
            return Decision(origin, "ACCEPT", "the service has no endpoints; the node's own "
                            "traffic to this address is not handled and leaves unchanged",
                            excluded=self._excluded(None))
        return self._reject(origin)

    def _ext_chain(self, origin: Origin, sources: str = "") -> Decision:
        port, cidr = self.port, self.settings.local_cidr
        if not port.external_policy_local:
            return self._dnat(origin, self._cluster_pool(), (
                True, "masqueraded (externalTrafficPolicy=Cluster masquerades external "
                "destinations)"), sources=sources)
        if origin == "pod" and cidr is not None:
            return self._dnat(origin, self._cluster_pool(), (False, "source kept"),
                              sources=sources, why="pods are exempt from externalTrafficPolicy")
        if origin == "node":
            return self._dnat(origin, self._cluster_pool(), (
                True, "masqueraded (the node's own traffic)"), sources=sources,
                why="the node itself is exempt from externalTrafficPolicy")
        if self.targets.external_block is None:
            return self._dnat(origin, self._local_pool("externalTrafficPolicy"), (
                False, "source kept (the point of externalTrafficPolicy=Local)"),
                sources=sources)
        return self._drop_no_local(origin, "externalTrafficPolicy", sources)

    def _firewall(self, origin: Origin) -> tuple[Decision, ...]:
        ranges = self.port.load_balancer_source_ranges
        listed = ", ".join(map(str, ranges))
        cidr = self.settings.local_cidr
        if origin == "external":
            return (self._ext_chain(origin, listed),
                    self._fw_drop(origin, "the source is outside", "other addresses"))
        if origin == "pod":
            if cidr is not None and any(_inside(cidr, r) for r in ranges):
                return (self._ext_chain(origin),)
            return (self._fw_drop(origin, "pod addresses (--cluster-cidr) are not inside"),)
        if self.targets.fw_admits_node:
            return (self._ext_chain(origin),)
        if self.settings.node_ips:
            return (self._fw_drop(origin, f"the node's address {self.settings.node_ips[0]} "
                                  "is outside"),)
        return (self._fw_drop(origin, "the node's address is not known here; if it is "
                              "outside"),)

    def _fw_drop(self, origin: Origin, why: str, sources: str = "") -> Decision:
        ranges = ", ".join(map(str, self.port.load_balancer_source_ranges))
        return Decision(origin, "DROP", f"{why} loadBalancerSourceRanges ({ranges}): "
                        f"{self.fw} lets it through un-DNATed and KUBE-PROXY-FIREWALL drops it",
                        sources)


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(inner, IPv4Network) and isinstance(outer, IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, IPv6Network) and isinstance(outer, IPv6Network):
        return inner.subnet_of(outer)
    return False
