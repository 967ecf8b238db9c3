"""Render the desired ruleset: cluster state + settings -> kube-proxy's filter and nat chains.

Pure. Every rule has kube-proxy's shape, argument order and comment, so a node migrating from
kube-proxy (iptables mode) sees the same chains. :func:`render_service_port` builds what one
service port contributes (its own chains plus its rules in the top-level chains);
:func:`base_ruleset` and :func:`chain_tails` give the rules around them. The engine
(:mod:`iptsync.engine`) caches the pieces per service and assembles the ruleset from them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from iptsync import names
from iptsync.model import Endpoint, IPAddress, IPNetwork, ServicePort
from iptsync.ruleset import Jump, Rule, Ruleset
from iptsync.state import is_local

LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


@dataclass(frozen=True)
class Settings:
    """The node and the flags that shape the rules (kube-proxy's names in comments)."""

    node_name: str  # --hostname-override
    cluster_cidrs: tuple[IPNetwork, ...] = ()  # --cluster-cidr; empty: no local detection
    masquerade_all: bool = False  # --masquerade-all
    masquerade_bit: int = 14  # --iptables-masquerade-bit
    nodeport_addresses: tuple[IPNetwork, ...] = ()  # --nodeport-addresses; empty: all
    node_ips: tuple[IPAddress, ...] = ()  # this node's addresses (first = primary node IP)
    localhost_nodeports: bool = True  # --iptables-localhost-nodeports
    random_fully: bool = True  # MASQUERADE --random-fully (iptables >= 1.6.2)
    conntrack_tcp_be_liberal: bool = False  # nf_conntrack_tcp_be_liberal: no INVALID drop
    large_cluster_endpoints: int = 1000  # above this many endpoints, drop per-endpoint comments

    @property
    def masquerade_mark(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"

    @property
    def local_cidr(self) -> IPNetwork | None:
        """The IPv4 cluster CIDR used to tell pod traffic from off-cluster traffic."""
        return next((c for c in self.cluster_cidrs if c.version == 4), None)

    @property
    def nodeports_on_localhost(self) -> bool:
        """kube-proxy turns localhost NodePorts off when --nodeport-addresses excludes 127/8."""
        if not self.localhost_nodeports:
            return False
        loopback = ipaddress.ip_address("127.0.0.1")
        return not self.nodeport_addresses or any(
            loopback in cidr for cidr in self.nodeport_addresses)


@dataclass(frozen=True)
class EndpointSets:
    """kube-proxy's categorisation of a service port's endpoints for this node."""

    cluster: tuple[Endpoint, ...]  # used with Cluster traffic policy
    local: tuple[Endpoint, ...]  # used with Local traffic policy
    reachable: tuple[Endpoint, ...]  # every endpoint that gets a SEP chain
    has_any: bool  # usable endpoints exist anywhere in the cluster
    topology: bool  # cluster endpoints were narrowed by zone hints


@dataclass
class PortRules:
    """What one service port contributes: its own nat chains and its top-level rules."""

    chains: dict[str, list[Rule]] = field(default_factory=dict)  # nat SVC/SVL/EXT/FW/SEP
    top: list[tuple[str, Rule]] = field(default_factory=list)  # (table, rule) in shared chains
    no_local_internal: bool = False
    no_local_external: bool = False

    def add_top(self, table: str, chain: str, *args: str) -> None:
        self.top.append((table, Rule(chain, tuple(args))))

    def add(self, chain: str, *args: str) -> None:
        self.chains.setdefault(chain, []).append(Rule(chain, tuple(args)))


def categorize_endpoints(port: ServicePort, endpoints: Sequence[Endpoint], node_name: str,
                         zone: str | None) -> EndpointSets:
    """Pick cluster, local and reachable endpoints as kube-proxy does.

    Ready endpoints are used; when none are, serving-and-terminating ones are (separately for
    cluster and local). Zone hints narrow the cluster endpoints only when every ready endpoint
    has hints and one of them names this node's zone.
    """
    cluster: tuple[Endpoint, ...] = ()
    has_any = False
    topology = False
    if port.uses_cluster_endpoints:
        topology = _can_use_topology(endpoints, zone)
        cluster = tuple(ep for ep in endpoints
                        if ep.ready and (not topology or (zone in ep.zone_hints)))
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


def _can_use_topology(endpoints: Sequence[Endpoint], zone: str | None) -> bool:
    if not zone:
        return False
    ready = [ep for ep in endpoints if ep.ready]
    return bool(ready) and all(ep.zone_hints for ep in ready) and any(
        zone in ep.zone_hints for ep in ready)


def serving_terminating(ep: Endpoint) -> bool:
    """The terminating fallback: such an endpoint is used only when none is ready."""
    return ep.serving and ep.terminating


@dataclass(frozen=True)
class PortTargets:
    """Where one service port's traffic can go on this node: kube-proxy's per-port decisions.

    Shared by :func:`render_service_port` and ``iptsync explain``, so an explanation cannot
    disagree with the rules.
    """

    has_endpoints: bool  # false: every entry point REJECTs
    has_internal: bool  # false: cluster IP traffic is REJECTed or (ITP=Local) DROPped
    has_external: bool  # false: external traffic is REJECTed or (ETP=Local) DROPped
    uses_ext: bool  # NodePort, external and load-balancer IPs lead to the EXT chain
    uses_fw: bool  # load-balancer IPs lead to the FW chain (loadBalancerSourceRanges)
    fw_admits_node: bool  # the node's primary IP is inside loadBalancerSourceRanges


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


def probability(n: int) -> str:
    """kube-proxy's probability for the rule choosing among ``n`` remaining endpoints."""
    return f"{1.0 / n:0.10f}"


def render_service_port(port: ServicePort, endpoints: Sequence[Endpoint], settings: Settings,
                        zone: str | None = None, *, large_cluster: bool = False) -> PortRules:
    """Render one service port, following kube-proxy's syncProxyRules step by step."""
    out = PortRules()
    proto = port.protocol.lower
    spn = str(port.name)
    port_hash = names.port_hash(spn, proto)  # one sha256 for the four chains
    svc, svl = names.SVC_PREFIX + port_hash, names.SVL_PREFIX + port_hash
    ext, fw = names.EXT_PREFIX + port_hash, names.FW_PREFIX + port_hash
    sets = categorize_endpoints(port, endpoints, settings.node_name, zone)
    targets = port_targets(port, sets, settings)
    has_endpoints, has_internal = targets.has_endpoints, targets.has_internal
    has_external, uses_ext, uses_fw = targets.has_external, targets.uses_ext, targets.uses_fw
    internal_chain = svl if port.internal_policy_local else svc
    external_policy_chain = svl if port.external_policy_local else svc
    lb_chain = fw if uses_fw else ext

    internal_target = external_target = ""
    internal_comment = external_comment = ""
    if not has_endpoints:
        internal_target = external_target = "REJECT"
        internal_comment = external_comment = f"{spn} has no endpoints"
    else:
        if not has_internal:
            internal_target, internal_comment = "DROP", f"{spn} has no local endpoints"
            out.no_local_internal = True
        if not has_external:
            external_target, external_comment = "DROP", f"{spn} has no local endpoints"
            out.no_local_external = True

    match = ("-m", proto, "-p", proto)
    cluster_ip_match = (*match, "-d", str(port.cluster_ip), "--dport", str(port.port))
    mark_masq = names.KUBE_MARK_MASQ

    # Traffic to the cluster IP.
    if has_internal:
        out.add_top("nat", names.KUBE_SERVICES, "-m", "comment", "--comment",
                    f"{spn} cluster IP", *cluster_ip_match, "-j", internal_chain)
    else:
        out.add_top("filter", names.KUBE_SERVICES, "-m", "comment", "--comment",
                    internal_comment, *cluster_ip_match, "-j", internal_target)

    # Traffic to external IPs.
    for ip in port.external_ips:
        dest = (*match, "-d", str(ip), "--dport", str(port.port))
        if has_endpoints:
            out.add_top("nat", names.KUBE_SERVICES, "-m", "comment", "--comment",
                        f"{spn} external IP", *dest, "-j", ext)
        if not has_external:
            out.add_top("filter", names.KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment",
                        external_comment, *dest, "-j", external_target)

    # Traffic to load-balancer IPs.
    for ip in port.load_balancer_ips:
        dest = (*match, "-d", str(ip), "--dport", str(port.port))
        if has_endpoints:
            out.add_top("nat", names.KUBE_SERVICES, "-m", "comment", "--comment",
                        f"{spn} loadbalancer IP", *dest, "-j", lb_chain)
        if uses_fw:
            out.add_top("filter", names.KUBE_PROXY_FIREWALL, "-m", "comment", "--comment",
                        f"{spn} traffic not accepted by {fw}", *dest, "-j", "DROP")
    if not has_external:
        for ip in port.load_balancer_ips:
            out.add_top("filter", names.KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment",
                        external_comment, *match, "-d", str(ip), "--dport", str(port.port),
                        "-j", external_target)

    # Traffic to the node port (nodeports are not subject to loadBalancerSourceRanges).
    if port.node_port:
        if has_endpoints:
            out.add_top("nat", names.KUBE_NODEPORTS, "-m", "comment", "--comment", spn,
                        *match, "--dport", str(port.node_port), "-j", ext)
        if not has_external:
            out.add_top("filter", names.KUBE_EXTERNAL_SERVICES, "-m", "comment", "--comment",
                        external_comment, "-m", "addrtype", "--dst-type", "LOCAL", *match,
                        "--dport", str(port.node_port), "-j", external_target)

    # Health check node port: always accepted, local endpoints or not.
    if port.health_check_node_port:
        out.add_top("filter", names.KUBE_NODEPORTS, "-m", "comment", "--comment",
                    f"{spn} health check node port", "-m", "tcp", "-p", "tcp", "--dport",
                    str(port.health_check_node_port), "-j", "ACCEPT")

    local_cidr = settings.local_cidr
    if has_internal:
        masq_args = ("-m", "comment", "--comment", f"{spn} cluster IP", *cluster_ip_match)
        if settings.masquerade_all:
            out.add(internal_chain, *masq_args, "-j", mark_masq)
        elif local_cidr is not None:
            # Off-cluster traffic to the service IP (e.g. via a static route to a node) may
            # bounce to another node, so it is masqueraded.
            out.add(internal_chain, *masq_args, "!", "-s", str(local_cidr), "-j", mark_masq)

    if uses_ext:
        out.chains.setdefault(ext, [])
        if not port.external_policy_local:
            out.add(ext, "-m", "comment", "--comment",
                    f"masquerade traffic for {spn} external destinations", "-j", mark_masq)
        else:
            if local_cidr is not None:
                # Pod -> external destination behaves as if it went out to the load balancer
                # and came back: subject to neither traffic policy.
                out.add(ext, "-m", "comment", "--comment",
                        f"pod traffic for {spn} external destinations",
                        "-s", str(local_cidr), "-j", svc)
            # The node's own traffic gets a local source address: masquerade and route it
            # to the cluster-wide endpoints.
            out.add(ext, "-m", "comment", "--comment",
                    f"masquerade LOCAL traffic for {spn} external destinations",
                    "-m", "addrtype", "--src-type", "LOCAL", "-j", mark_masq)
            out.add(ext, "-m", "comment", "--comment",
                    f"route LOCAL traffic for {spn} external destinations",
                    "-m", "addrtype", "--src-type", "LOCAL", "-j", svc)
        if has_external:
            out.add(ext, "-j", external_policy_chain)

    if uses_fw:
        out.chains.setdefault(fw, [])
        comment = ("-m", "comment", "--comment", f"{spn} loadbalancer IP")
        for cidr in port.load_balancer_source_ranges:
            out.add(fw, *comment, "-s", str(cidr), "-j", ext)
        if targets.fw_admits_node:
            # A VIP routed locally loops back with the VIP as its source address.
            for ip in port.load_balancer_ips:
                out.add(fw, *comment, "-s", str(ip), "-j", ext)
        # A packet that falls off the end was not DNATed; KUBE-PROXY-FIREWALL drops it.
        out.add(fw, "-m", "comment", "--comment",
                f"other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL")

    seps = {ep.key: names.sep_chain(spn, proto, ep.key) for ep in sets.reachable}
    if sets.cluster and port.uses_cluster_endpoints:
        _endpoint_dispatch(out, port, svc, sets.cluster, seps, large_cluster=large_cluster)
    if sets.local and port.uses_local_endpoints:
        _endpoint_dispatch(out, port, svl, sets.local, seps, large_cluster=large_cluster)
    _endpoint_chains(out, port, sets.reachable, seps, large_cluster)
    return out


def _comment(text: str, large_cluster: bool) -> tuple[str, ...]:
    # Per-endpoint comments can be 40% of a large ruleset; kube-proxy drops them there.
    return () if large_cluster else ("-m", "comment", "--comment", text)


def _endpoint_dispatch(out: PortRules, port: ServicePort, chain: str,
                       endpoints: Sequence[Endpoint], seps: dict[str, str], *,
                       large_cluster: bool) -> None:
    spn = str(port.name)
    out.chains.setdefault(chain, [])
    if port.affinity_timeout is not None:
        for ep in endpoints:
            sep = seps[ep.key]
            out.add(chain, *_comment(f"{spn} -> {ep.key}", large_cluster),
                    "-m", "recent", "--name", sep, "--rcheck", "--seconds",
                    str(port.affinity_timeout), "--reap", "-j", sep)
    count = len(endpoints)
    for i, ep in enumerate(endpoints):
        sep = seps[ep.key]
        # Each rule takes 1/(remaining) of what reaches it; the last one takes the rest.
        chance = ("-m", "statistic", "--mode", "random", "--probability",
                  probability(count - i)) if i < count - 1 else ()
        out.add(chain, *_comment(f"{spn} -> {ep.key}", large_cluster), *chance, "-j", sep)


def _endpoint_chains(out: PortRules, port: ServicePort, endpoints: Sequence[Endpoint],
                     seps: dict[str, str], large_cluster: bool) -> None:
    """Each endpoint's SEP chain (a large cluster has 100,000: what does not depend on the
    endpoint is built once)."""
    proto = port.protocol.lower
    comment = _comment(str(port.name), large_cluster)
    dnat = ("-m", proto, "-p", proto, "-j", "DNAT", "--to-destination")
    for ep in endpoints:
        sep = seps[ep.key]
        affinity = ("-m", "recent", "--name", sep, "--set") if port.affinity_timeout else ()
        out.chains[sep] = [
            # Hairpin: a pod reaching itself through the service must be masqueraded.
            Rule(sep, (*comment, "-s", ep.address, "-j", names.KUBE_MARK_MASQ)),
            Rule(sep, (*comment, *affinity, *dnat, ep.key)),
        ]


# --- the whole ruleset -----------------------------------------------------------------------

def jump_rules(settings: Settings) -> list[Jump]:
    """Jumps from built-in chains, in the order kube-proxy leaves them at each chain's top."""
    new = ("-m", "conntrack", "--ctstate", "NEW")

    def jump(table: str, chain: str, target: str, comment: str | None,
             extra: tuple[str, ...] = ()) -> Jump:
        commented = ("-m", "comment", "--comment", comment) if comment else ()
        return Jump(table, chain, (*extra, *commented, "-j", target))

    jumps = []
    if settings.nodeports_on_localhost:
        jumps += [jump("filter", "INPUT", names.KUBE_FIREWALL, None),
                  jump("filter", "OUTPUT", names.KUBE_FIREWALL, None)]
    firewall = "kubernetes load balancer firewall"
    portals = "kubernetes service portals"
    external = "kubernetes externally-visible service portals"
    jumps += [
        jump("filter", "INPUT", names.KUBE_PROXY_FIREWALL, firewall, new),
        jump("filter", "INPUT", names.KUBE_NODEPORTS, "kubernetes health check service ports"),
        jump("filter", "INPUT", names.KUBE_EXTERNAL_SERVICES, external, new),
        jump("filter", "FORWARD", names.KUBE_PROXY_FIREWALL, firewall, new),
        jump("filter", "FORWARD", names.KUBE_FORWARD, "kubernetes forwarding rules"),
        jump("filter", "FORWARD", names.KUBE_SERVICES, portals, new),
        jump("filter", "FORWARD", names.KUBE_EXTERNAL_SERVICES, external, new),
        jump("filter", "OUTPUT", names.KUBE_PROXY_FIREWALL, firewall, new),
        jump("filter", "OUTPUT", names.KUBE_SERVICES, portals, new),
        jump("nat", "PREROUTING", names.KUBE_SERVICES, portals),
        jump("nat", "OUTPUT", names.KUBE_SERVICES, portals),
        jump("nat", "POSTROUTING", names.KUBE_POSTROUTING, "kubernetes postrouting rules"),
    ]
    return jumps


def base_ruleset(settings: Settings) -> Ruleset:
    """The top-level chains and the rules that do not depend on any service."""
    rs = Ruleset()
    for table, chains in names.TOP_LEVEL_CHAINS.items():
        for chain in chains:
            rs.chain(table, chain)
    mark = settings.masquerade_mark
    rs.add("nat", names.KUBE_POSTROUTING, "-m", "mark", "!", "--mark", f"{mark}/{mark}",
           "-j", "RETURN")
    # Clear the mark so a packet that traverses the stack again is not masqueraded twice.
    rs.add("nat", names.KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", mark)
    masquerade = ("-j", "MASQUERADE", "--random-fully") if settings.random_fully else (
        "-j", "MASQUERADE")
    rs.add("nat", names.KUBE_POSTROUTING, "-m", "comment", "--comment",
           "kubernetes service traffic requiring SNAT", *masquerade)
    rs.add("nat", names.KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", mark)
    if settings.nodeports_on_localhost:
        # route_localnet=1 opens 127/8 to the network (CVE-2020-8558); only locally
        # originated or DNATed traffic may reach it. kubelet keeps an identical rule.
        rs.add("filter", names.KUBE_FIREWALL, "-m", "comment", "--comment",
               "block incoming localnet connections", "-d", "127.0.0.0/8", "!", "-s",
               "127.0.0.0/8", "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT",
               "-j", "DROP")
    rs.jumps = jump_rules(settings)
    return rs


def nodeports_jumps(settings: Settings) -> list[Rule]:
    """The final rules of nat KUBE-SERVICES, sending local destinations to KUBE-NODEPORTS."""
    comment = ("-m", "comment", "--comment", NODEPORTS_COMMENT)
    if not settings.nodeport_addresses:
        destination: tuple[str, ...] = ("-m", "addrtype", "--dst-type", "LOCAL")
        if not settings.nodeports_on_localhost:
            destination += ("!", "-d", str(LOOPBACK_V4))
        return [Rule(names.KUBE_SERVICES, (*comment, *destination, "-j", names.KUBE_NODEPORTS))]
    rules = []
    for ip in settings.node_ips:
        if ip.version != 4 or not any(ip in cidr for cidr in settings.nodeport_addresses):
            continue
        if ip.is_loopback and not settings.nodeports_on_localhost:
            continue
        rules.append(Rule(names.KUBE_SERVICES,
                          (*comment, "-d", str(ip), "-j", names.KUBE_NODEPORTS)))
    return rules


def forward_rules(settings: Settings) -> list[Rule]:
    mark = settings.masquerade_mark
    rules = []
    if not settings.conntrack_tcp_be_liberal:
        # Out-of-window packets marked INVALID would otherwise reset connections (#74839).
        rules.append(Rule(names.KUBE_FORWARD, ("-m", "conntrack", "--ctstate", "INVALID",
                                               "-j", "DROP")))
    rules.append(Rule(names.KUBE_FORWARD, (
        "-m", "comment", "--comment", "kubernetes forwarding rules", "-m", "mark", "--mark",
        f"{mark}/{mark}", "-j", "ACCEPT")))
    rules.append(Rule(names.KUBE_FORWARD, (
        "-m", "comment", "--comment", "kubernetes forwarding conntrack rule", "-m", "conntrack",
        "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")))
    return rules


def chain_tails(settings: Settings) -> dict[tuple[str, str], list[Rule]]:
    """Rules that end a top-level chain, after every service's: (table, chain) -> rules."""
    return {("nat", names.KUBE_SERVICES): nodeports_jumps(settings),
            ("filter", names.KUBE_FORWARD): forward_rules(settings)}
