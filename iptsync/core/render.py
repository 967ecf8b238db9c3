"""Render the desired ruleset: cluster state + settings -> kube-proxy's filter and nat chains.

Pure. Every rule has kube-proxy's shape, argument order and comment, so a node migrating from
kube-proxy (iptables mode) sees the same chains. :func:`render_service_port` builds what one
service port contributes (its own chains plus its rules in the top-level chains);
:func:`base_ruleset` and :func:`chain_tails` give the rules around them. The engine
(:mod:`iptsync.engine.reconciler`) caches the pieces per service and assembles the
ruleset from them.
What the rules decide (which endpoints, REJECT or DROP, what is masqueraded) comes from
:mod:`iptsync.core.policy`; this module says it in kube-proxy's rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from iptsync.core import names
from iptsync.core.model import Endpoint, IPFamily, ServicePort
from iptsync.core.policy import (
    PortTargets,
    Settings,
    categorize_endpoints,
    internal_masquerade,
    port_targets,
)
from iptsync.core.ruleset import (
    Jump,
    Rule,
    Ruleset,
    quote,
    saved_address,
    saved_comment,
    saved_host,
    saved_probability,
    saved_recent,
)

# The loopback range kube-proxy keeps NodePorts off: IPv4's when localhost NodePorts are off,
# IPv6's always.
LOOPBACK = {IPFamily.IPV4: ipaddress.ip_network("127.0.0.0/8"),
            IPFamily.IPV6: ipaddress.ip_network("::1/128")}
NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


@dataclass
class PortRules:
    """What one service port contributes: its own nat chains and its top-level rules.

    With ``spell``, ``saved`` holds, rule by rule, how iptables-save prints each rule of the
    chains (as :func:`iptsync.core.ruleset.canonical` spells it) where the renderer spells it
    itself, else None: the endpoint chains and the SVC chains' jumps and masquerade rule,
    nine rules in ten at scale, so a restart compares them with the kernel without
    canonicalising them. Without it (nothing to compare with: ``dump``, a first sync into an
    empty kernel) no spelling is built: it costs a quarter of the render.

    ``lines`` holds, the same way, the restore line (``-A CHAIN args``) of the rules the
    renderer writes out itself, the endpoint chains' and the SVC chains' jumps (two rules in
    three at scale), so they are not joined and quoted argument by argument again; the
    others are None. tests/render/test_saved_spelling.py holds each equal to the joined
    arguments.
    """

    spell: bool = True

    chains: dict[str, list[Rule]] = field(default_factory=dict)  # nat SVC/SVL/EXT/FW/SEP
    top: list[tuple[str, Rule]] = field(default_factory=list)  # (table, rule) in shared chains
    no_local_internal: bool = False
    no_local_external: bool = False
    saved: dict[str, list[str | None]] = field(default_factory=dict)
    lines: dict[str, list[str | None]] = field(default_factory=dict)

    def add_top(self, table: str, chain: str, *args: str) -> None:
        self.top.append((table, Rule(chain, tuple(args))))

    def add(self, chain: str, *args: str, saved: str | None = None,
            line: str | None = None) -> None:
        self.chains.setdefault(chain, []).append(Rule(chain, args))
        self.lines.setdefault(chain, []).append(line)
        if self.spell:
            self.saved.setdefault(chain, []).append(saved)

    def chain(self, chain: str) -> None:
        """Declare ``chain``, maybe empty."""
        self.chains.setdefault(chain, [])
        self.lines.setdefault(chain, [])
        if self.spell:
            self.saved.setdefault(chain, [])


def probability(n: int) -> str:
    """kube-proxy's probability for the rule choosing among ``n`` remaining endpoints."""
    return f"{1.0 / n:0.10f}"


def render_service_port(port: ServicePort, endpoints: Sequence[Endpoint], settings: Settings,
                        zone: str | None = None, *, large_cluster: bool = False,
                        spell: bool = True) -> PortRules:
    """Render one service port, following kube-proxy's syncProxyRules step by step (with
    ``spell``, also as iptables-save prints its rules: see :class:`PortRules`)."""
    out = PortRules(spell=spell)
    proto = port.protocol.lower
    spn = str(port.name)
    port_hash = names.port_hash(spn, proto)  # one sha256 for the four chains
    svc, svl = names.SVC_PREFIX + port_hash, names.SVL_PREFIX + port_hash
    ext, fw = names.EXT_PREFIX + port_hash, names.FW_PREFIX + port_hash
    sets = categorize_endpoints(port, endpoints, settings.node_name, zone)
    targets = port_targets(port, sets, settings)
    internal_chain = svl if port.internal_policy_local else svc
    internal_target = targets.internal_block or ""
    external_target = targets.external_block or ""
    out.no_local_internal = internal_target == "DROP"
    out.no_local_external = external_target == "DROP"
    match = ("-m", proto, "-p", proto)
    cluster_ip_match = (*match, "-d", str(port.cluster_ip), "--dport", str(port.port))

    # Traffic to the cluster IP.
    if targets.has_internal:
        out.add_top("nat", names.KUBE_SERVICES, "-m", "comment", "--comment",
                    f"{spn} cluster IP", *cluster_ip_match, "-j", internal_chain)
    else:
        out.add_top("filter", names.KUBE_SERVICES, "-m", "comment", "--comment",
                    _blocked_comment(spn, internal_target), *cluster_ip_match,
                    "-j", internal_target)
    blocked = ("-m", "comment", "--comment", _blocked_comment(spn, external_target))
    _external_entry_rules(out, port, spn, match, targets, ext=ext, fw=fw, blocked=blocked,
                          verdict=external_target)

    if targets.has_internal:
        _internal_masquerade(out, spn, internal_chain, cluster_ip_match, settings)
    if targets.uses_ext:
        _ext_chain(out, port, spn, settings, ext=ext, svc=svc, svl=svl,
                   has_external=targets.has_external)
    if targets.uses_fw:
        _fw_chain(out, port, spn, fw, ext, admits_node=targets.fw_admits_node)

    seps = {ep.key: names.sep_chain(spn, proto, ep.key) for ep in sets.reachable}
    if sets.cluster and port.uses_cluster_endpoints:
        _endpoint_dispatch(out, port, svc, sets.cluster, seps, large_cluster=large_cluster)
    if sets.local and port.uses_local_endpoints:
        _endpoint_dispatch(out, port, svl, sets.local, seps, large_cluster=large_cluster)
    _endpoint_chains(out, port, sets.reachable, seps, large_cluster)
    return out


def _external_entry_rules(out: PortRules, port: ServicePort, spn: str, match: tuple[str, ...],
                          targets: PortTargets, *, ext: str, fw: str, blocked: tuple[str, ...],
                          verdict: str) -> None:
    """The top-level rules for traffic from outside: to external IPs, load-balancer IPs and
    the node port, each to the EXT (or FW) chain, or to ``verdict`` (commented ``blocked``)
    when it has nowhere to go; and to the health check node port, always accepted."""
    has_endpoints, has_external = targets.has_endpoints, targets.has_external
    for ip in port.external_ips:
        dest = (*match, "-d", str(ip), "--dport", str(port.port))
        if has_endpoints:
            out.add_top("nat", names.KUBE_SERVICES, "-m", "comment", "--comment",
                        f"{spn} external IP", *dest, "-j", ext)
        if not has_external:
            out.add_top("filter", names.KUBE_EXTERNAL_SERVICES, *blocked, *dest,
                        "-j", verdict)

    lb_chain = fw if targets.uses_fw else ext
    for ip in port.load_balancer_ips:
        dest = (*match, "-d", str(ip), "--dport", str(port.port))
        if has_endpoints:
            out.add_top("nat", names.KUBE_SERVICES, "-m", "comment", "--comment",
                        f"{spn} loadbalancer IP", *dest, "-j", lb_chain)
        if targets.uses_fw:
            out.add_top("filter", names.KUBE_PROXY_FIREWALL, "-m", "comment", "--comment",
                        f"{spn} traffic not accepted by {fw}", *dest, "-j", "DROP")
    if not has_external:
        for ip in port.load_balancer_ips:
            out.add_top("filter", names.KUBE_EXTERNAL_SERVICES, *blocked, *match,
                        "-d", str(ip), "--dport", str(port.port), "-j", verdict)

    # Nodeports are not subject to loadBalancerSourceRanges.
    if port.node_port:
        if has_endpoints:
            out.add_top("nat", names.KUBE_NODEPORTS, "-m", "comment", "--comment", spn,
                        *match, "--dport", str(port.node_port), "-j", ext)
        if not has_external:
            out.add_top("filter", names.KUBE_EXTERNAL_SERVICES, *blocked,
                        "-m", "addrtype", "--dst-type", "LOCAL", *match,
                        "--dport", str(port.node_port), "-j", verdict)
    if port.health_check_node_port:
        out.add_top("filter", names.KUBE_NODEPORTS, "-m", "comment", "--comment",
                    f"{spn} health check node port", "-m", "tcp", "-p", "tcp", "--dport",
                    str(port.health_check_node_port), "-j", "ACCEPT")


def _internal_masquerade(out: PortRules, spn: str, chain: str, cluster_ip_match: tuple[str, ...],
                         settings: Settings) -> None:
    """The masquerade mark at the head of the internal (SVC or SVL) chain, when the settings
    ask for one (:func:`iptsync.core.policy.internal_masquerade`)."""
    masq_args = ("-m", "comment", "--comment", f"{spn} cluster IP", *cluster_ip_match)
    detector = settings.local_detector
    saved_tail = saved_destination = saved = None
    if out.spell:
        # cluster_ip_match is (-m PROTO -p PROTO -d IP --dport PORT).
        proto, destination, dport = cluster_ip_match[1], cluster_ip_match[5], cluster_ip_match[7]
        saved_tail = (f"-p {proto} {saved_comment(f'{spn} cluster IP')} -m {proto} "
                      f"--dport {dport} -j {names.KUBE_MARK_MASQ}")
        saved_destination = f"-d {saved_host(destination, settings.family)}"
    if internal_masquerade(settings) == "all":
        out.add(chain, *masq_args, "-j", names.KUBE_MARK_MASQ,
                saved=f"{saved_destination} {saved_tail}" if out.spell else None)
    elif detector is not None:
        # Traffic to the service IP from elsewhere than this node's pods (e.g. via a static
        # route to a node) may bounce to another node, so it is masqueraded.
        if out.spell:  # iptables-save prints -s before -d, and -i after it
            saved = (f"! -s {saved_address(detector.value)} {saved_destination} {saved_tail}"
                     if detector.option == "-s" else
                     f"{saved_destination} ! -i {detector.value} {saved_tail}")
        out.add(chain, *masq_args, *detector.if_not_local, "-j", names.KUBE_MARK_MASQ,
                saved=saved)


def _ext_chain(out: PortRules, port: ServicePort, spn: str, settings: Settings, *, ext: str,
               svc: str, svl: str, has_external: bool) -> None:
    """The EXT chain: masquerade (all of it, or under externalTrafficPolicy=Local only the
    node's own and pods' traffic, which goes cluster-wide), then the policy's chain."""
    out.chain(ext)
    mark_masq = names.KUBE_MARK_MASQ
    if not port.external_policy_local:
        out.add(ext, "-m", "comment", "--comment",
                f"masquerade traffic for {spn} external destinations", "-j", mark_masq)
    else:
        detector = settings.local_detector
        if detector is not None:
            # Pod -> external destination behaves as if it went out to the load balancer
            # and came back: subject to neither traffic policy.
            out.add(ext, "-m", "comment", "--comment",
                    f"pod traffic for {spn} external destinations", *detector.if_local,
                    "-j", svc)
        # The node's own traffic gets a local source address: masquerade and route it
        # to the cluster-wide endpoints.
        out.add(ext, "-m", "comment", "--comment",
                f"masquerade LOCAL traffic for {spn} external destinations",
                "-m", "addrtype", "--src-type", "LOCAL", "-j", mark_masq)
        out.add(ext, "-m", "comment", "--comment",
                f"route LOCAL traffic for {spn} external destinations",
                "-m", "addrtype", "--src-type", "LOCAL", "-j", svc)
    if has_external:
        out.add(ext, "-j", svl if port.external_policy_local else svc)


def _fw_chain(out: PortRules, port: ServicePort, spn: str, fw: str, ext: str, *,
              admits_node: bool) -> None:
    """The FW chain: loadBalancerSourceRanges (and the load-balancer IPs themselves when the
    node is in a range) go on to EXT; KUBE-PROXY-FIREWALL drops the rest."""
    out.chain(fw)
    comment = ("-m", "comment", "--comment", f"{spn} loadbalancer IP")
    for cidr in port.load_balancer_source_ranges:
        out.add(fw, *comment, "-s", str(cidr), "-j", ext)
    if admits_node:
        # A VIP routed locally loops back with the VIP as its source address.
        for ip in port.load_balancer_ips:
            out.add(fw, *comment, "-s", str(ip), "-j", ext)
    # A packet that falls off the end was not DNATed; KUBE-PROXY-FIREWALL drops it.
    out.add(fw, "-m", "comment", "--comment",
            f"other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL")


def _blocked_comment(spn: str, verdict: str) -> str:
    if not verdict:
        return ""
    return f"{spn} has no endpoints" if verdict == "REJECT" else f"{spn} has no local endpoints"


def _comment(text: str, large_cluster: bool) -> tuple[str, ...]:
    # Per-endpoint comments can be 40% of a large ruleset; kube-proxy drops them there.
    return () if large_cluster else ("-m", "comment", "--comment", text)


def _endpoint_dispatch(out: PortRules, port: ServicePort, chain: str,
                       endpoints: Sequence[Endpoint], seps: dict[str, str], *,
                       large_cluster: bool) -> None:
    spn = str(port.name)
    out.chain(chain)
    if port.affinity_timeout is not None:
        check = f"--rcheck --seconds {port.affinity_timeout} --reap"
        for ep in endpoints:
            sep = seps[ep.key]
            comment = _comment(f"{spn} -> {ep.key}", large_cluster)
            out.add(chain, *comment, "-m", "recent", "--name", sep, "--rcheck", "--seconds",
                    str(port.affinity_timeout), "--reap", "-j", sep,
                    saved=f"{_saved_comment(comment)}"
                          f"{saved_recent(check, sep, port.family)} -j {sep}"
                    if out.spell else None,
                    line=f"-A {chain} {_restore_comment(comment)}-m recent --name {sep} "
                         f"{check} -j {sep}")
    count = len(endpoints)
    for i, ep in enumerate(endpoints):
        sep = seps[ep.key]
        # Each rule takes 1/(remaining) of what reaches it; the last one takes the rest.
        comment = _comment(f"{spn} -> {ep.key}", large_cluster)
        if i < count - 1:
            chance = probability(count - i)
            out.add(chain, *comment, "-m", "statistic", "--mode", "random", "--probability",
                    chance, "-j", sep,
                    saved=f"{_saved_comment(comment)}-m statistic --mode random "
                          f"--probability {saved_probability(chance)} -j {sep}"
                    if out.spell else None,
                    line=f"-A {chain} {_restore_comment(comment)}-m statistic --mode random "
                         f"--probability {chance} -j {sep}")
        else:
            out.add(chain, *comment, "-j", sep,
                    saved=f"{_saved_comment(comment)}-j {sep}" if out.spell else None,
                    line=f"-A {chain} {_restore_comment(comment)}-j {sep}")


def _endpoint_chains(out: PortRules, port: ServicePort, endpoints: Sequence[Endpoint],
                     seps: dict[str, str], large_cluster: bool) -> None:
    """Each endpoint's SEP chain (a large cluster has 100,000: what does not depend on the
    endpoint is built once)."""
    proto = port.protocol.lower
    comment = _comment(str(port.name), large_cluster)
    commented = _saved_comment(comment)
    restore_comment = _restore_comment(comment)
    dnat = ("-m", proto, "-p", proto, "-j", "DNAT", "--to-destination")
    for ep in endpoints:
        sep = seps[ep.key]
        affinity = ("-m", "recent", "--name", sep, "--set") if port.affinity_timeout else ()
        out.chains[sep] = [
            # Hairpin: a pod reaching itself through the service must be masqueraded.
            Rule(sep, (*comment, "-s", ep.address, "-j", names.KUBE_MARK_MASQ)),
            Rule(sep, (*comment, *affinity, *dnat, ep.key)),
        ]
        restore_affinity = f"-m recent --name {sep} --set " if affinity else ""
        out.lines[sep] = [
            f"-A {sep} {restore_comment}-s {ep.address} -j {names.KUBE_MARK_MASQ}",
            f"-A {sep} {restore_comment}{restore_affinity}-m {proto} -p {proto} -j DNAT "
            f"--to-destination {ep.key}",
        ]
        if out.spell:
            saved_affinity = (f"{saved_recent('--set', sep, port.family)} " if affinity
                              else "")
            out.saved[sep] = [
                f"-s {saved_host(ep.address, port.family)} {commented}"
                f"-j {names.KUBE_MARK_MASQ}",
                f"-p {proto} {commented}{saved_affinity}-m {proto} -j DNAT "
                f"--to-destination {ep.key}",
            ]


def _restore_comment(comment: tuple[str, ...]) -> str:
    """What :func:`_comment` gave, as a restore line holds it, with a space after it."""
    return f"-m comment --comment {quote(comment[-1])} " if comment else ""


def _saved_comment(comment: tuple[str, ...]) -> str:
    """What :func:`_comment` gave, as iptables-save prints it, with a space after it."""
    return f"{saved_comment(comment[-1])} " if comment else ""


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
    """The final rules of nat KUBE-SERVICES, sending local destinations to KUBE-NODEPORTS.

    NodePorts listen on every local address unless --nodeport-addresses names CIDRs of this
    family (a zero-length one, ``0.0.0.0/0`` or ``::/0``, still means every address); then
    only on this node's addresses inside them. Loopback addresses never serve IPv6
    NodePorts (there is no route_localnet for ::1) and serve IPv4 ones only with localhost
    NodePorts on.
    """
    comment = ("-m", "comment", "--comment", NODEPORTS_COMMENT)
    cidrs = [c for c in settings.nodeport_addresses if IPFamily.of(c) is settings.family]
    if not cidrs or any(c.prefixlen == 0 for c in cidrs):
        destination: tuple[str, ...] = ("-m", "addrtype", "--dst-type", "LOCAL")
        if settings.family is IPFamily.IPV6:
            destination += ("!", "-d", str(LOOPBACK[IPFamily.IPV6]))
        elif not settings.nodeports_on_localhost:
            destination += ("!", "-d", str(LOOPBACK[IPFamily.IPV4]))
        return [Rule(names.KUBE_SERVICES, (*comment, *destination, "-j", names.KUBE_NODEPORTS))]
    rules = []
    for ip in settings.node_ips:
        if IPFamily.of(ip) is not settings.family or not any(ip in cidr for cidr in cidrs):
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
