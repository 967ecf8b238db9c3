"""Explain one service: on each node, where traffic to each of its entry points goes, and why.

Why: ``iptsync trace`` answers for one packet; a person debugging a service wants the whole
picture at once. For every entry point of a service port (cluster IP, each external IP, each
load-balancer IP, the NodePort), for every kind of client (a pod, the node itself, outside),
and for every kind of node (this one, each node that runs endpoints, a node that runs none),
this module says which endpoints receive the traffic and with what probability (kube-proxy's
statistic rules split it equally: 1/n each), whether it is masqueraded, or that it is
rejected or dropped, and for every endpoint left out, why: not ready, terminating (and
whether the terminating fallback applies), on another node under a Local traffic policy,
hinted for another zone, or the client is outside ``loadBalancerSourceRanges``.

The decisions come from the renderer itself: :func:`iptsync.render.categorize_endpoints`
picks the endpoints of each pool and :func:`iptsync.render.port_targets` says where each
entry point leads, as they do for the rules. What this module adds is the reading of the
per-client rules that follow (the EXT and FW chains, the masquerade rules), and the reasons.
``tests/explain`` checks every answer for this node against the tracer run on the rendered
rules, so the two cannot drift apart.

Pure: cluster state + settings in, a structured explanation out; text and JSON renderings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Literal

from iptsync import names
from iptsync.model import Endpoint, IPAddress, IPNetwork, ServicePort
from iptsync.render import (
    EndpointSets,
    PortTargets,
    Settings,
    categorize_endpoints,
    port_targets,
    serving_terminating,
)
from iptsync.state import ClusterState, is_local

Source = Literal["pod", "node", "external"]
SOURCES: tuple[Source, ...] = ("pod", "node", "external")
SOURCE_LABELS = {"pod": "pods", "node": "the node", "external": "outside"}
ENTRY_LABELS = {"cluster-ip": "cluster IP", "external-ip": "external IP",
                "load-balancer-ip": "load-balancer IP", "node-port": "NodePort"}
_REF = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)/([a-z0-9]([-a-z0-9.]*[a-z0-9])?)"
                  r"(?::([-a-zA-Z0-9]+))?$")


class ExplainError(ValueError):
    """A service reference that names nothing among the objects."""


@dataclass(frozen=True)
class ServiceRef:
    """``namespace/name[:port]``: a service, and optionally one of its ports by name."""

    namespace: str
    name: str
    port: str | None = None


def parse_service_ref(text: str) -> ServiceRef:
    match = _REF.match(text.strip())
    if match is None:
        raise ExplainError(f"{text!r} is not namespace/name[:port], e.g. default/web:http")
    return ServiceRef(match.group(1), match.group(3), match.group(5))


# --- the explanation -------------------------------------------------------------------------

@dataclass(frozen=True)
class Excluded:
    """An endpoint that gets none of this traffic, and why."""

    endpoint: str  # ip:port
    node: str | None
    reason: str  # not-ready | terminating | not-serving | not-local | other-zone
    detail: str


@dataclass(frozen=True)
class Outcome:
    """What happens to new connections from one kind of client to one entry point."""

    source: Source
    verdict: str  # DNAT, REJECT, DROP, or ACCEPT (not handled by service rules)
    reason: str
    sources: str = ""  # which addresses of that kind, when it matters (source ranges)
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
    """An entry point of the service port and the outcome for each kind of client."""

    kind: str  # cluster-ip | external-ip | load-balancer-ip | node-port
    address: str  # ip:port, or :nodePort on the node's addresses
    outcomes: tuple[Outcome, ...]


@dataclass(frozen=True)
class NodeRole:
    """A node as the rules see it: its name, zone and ready local endpoints."""

    name: str | None  # None: any node that runs no endpoint of the port
    this_node: bool  # the node named by --hostname-override
    zone: str | None
    local_ready: tuple[str, ...]


@dataclass(frozen=True)
class NodeView:
    """Nodes on which traffic goes the same way, and where it goes."""

    roles: tuple[NodeRole, ...]
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class PortExplanation:
    port: ServicePort
    endpoints: tuple[Endpoint, ...]
    views: tuple[NodeView, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class ServiceExplanation:
    namespace: str
    name: str
    node_name: str
    ports: tuple[PortExplanation, ...]
    skipped_reason: str | None = None  # headless or ExternalName: no rules at all


def explain(state: ClusterState, settings: Settings, ref: ServiceRef) -> ServiceExplanation:
    """Explain every port of the service (or the one ``ref`` names) for every node role."""
    service = state.services.get((ref.namespace, ref.name))
    if service is None:
        raise ExplainError(f"no Service {ref.namespace}/{ref.name} among the objects")
    ports = [p for p in service.ports if ref.port is None or p.name.port == ref.port]
    if ref.port is not None and not ports:
        known = ", ".join(repr(p.name.port) for p in service.ports) or "none"
        raise ExplainError(f"Service {ref.namespace}/{ref.name} has no port named "
                           f"{ref.port!r} (ports: {known})")
    zone = state.node.zone if state.node else None
    return ServiceExplanation(
        ref.namespace, ref.name, settings.node_name,
        tuple(explain_port(p, state.endpoints(p), settings, zone) for p in ports),
        service.skipped_reason)


def explain_port(port: ServicePort, endpoints: Sequence[Endpoint], settings: Settings,
                 zone: str | None) -> PortExplanation:
    """One service port on this node (``settings``, ``zone``) and on the other node roles."""
    views: list[NodeView] = []
    for role in node_roles(endpoints, settings.node_name, zone):
        # Other nodes' addresses are not known here: their FW chains admit no node address.
        role_settings = settings if role.this_node else replace(
            settings, node_name=role.name or "", node_ips=())
        entries = _Port(port, endpoints, role_settings, role).entries()
        same = next((i for i, view in enumerate(views) if view.entries == entries), None)
        if same is None:
            views.append(NodeView((role,), entries))
        else:
            views[same] = NodeView((*views[same].roles, role), entries)
    return PortExplanation(port, tuple(endpoints), tuple(views),
                           _notes(port, endpoints, settings, zone))


def node_roles(endpoints: Sequence[Endpoint], node_name: str,
               zone: str | None) -> list[NodeRole]:
    """This node, each other node running an endpoint, and any node running none."""
    def ready_on(host: str) -> tuple[str, ...]:
        return tuple(ep.key for ep in endpoints if ep.ready and is_local(ep, host))

    hosts = sorted({ep.node_name for ep in endpoints if ep.node_name})
    roles = [NodeRole(node_name, True, zone, ready_on(node_name))]
    for host in hosts:
        if host != node_name:
            # An endpoint's zone is its node's zone.
            host_zone = next((ep.zone for ep in endpoints if ep.node_name == host and ep.zone),
                             None)
            roles.append(NodeRole(host, False, host_zone, ready_on(host)))
    roles.append(NodeRole(None, False, None, ()))
    return roles


def _notes(port: ServicePort, endpoints: Sequence[Endpoint], settings: Settings,
           zone: str | None) -> tuple[str, ...]:
    notes = []
    if port.affinity_timeout is not None:
        notes.append(f"sessionAffinity ClientIP ({port.affinity_timeout}s): a client's first "
                     "connection picks as shown, its later ones go to the same endpoint")
    if port.health_check_node_port:
        notes.append(f"healthCheckNodePort {port.health_check_node_port} is always accepted; "
                     "it tells the load balancer which nodes have local endpoints")
    if settings.local_cidr is None:
        notes.append("no --cluster-cidr: pods cannot be told from other clients, so nothing "
                     "sent to the cluster IP is masqueraded and pods are not exempt from "
                     "externalTrafficPolicy=Local")
    if port.node_port and settings.nodeport_addresses:
        cidrs = ", ".join(map(str, settings.nodeport_addresses))
        notes.append(f"NodePorts are open only on node addresses inside {cidrs}")
    hinted = [ep for ep in endpoints if ep.ready and ep.zone_hints]
    if hinted and not zone:
        notes.append(f"endpoints carry topology hints, but node {settings.node_name} has no "
                     "zone label (topology.kubernetes.io/zone): the hints are not used there")
    return tuple(notes)


@dataclass(frozen=True)
class _Pool:
    """The endpoints one chain (SVC: cluster-wide, SVL: this node's) spreads traffic over."""

    chain: str
    endpoints: tuple[Endpoint, ...]
    local: bool
    policy: str  # the traffic policy field, for the not-local reason


class _Port:
    """One service port on one node role: the entries and their outcomes."""

    def __init__(self, port: ServicePort, endpoints: Sequence[Endpoint], settings: Settings,
                 role: NodeRole) -> None:
        self.port = port
        self.endpoints = endpoints
        self.settings = settings
        self.role = role
        self.sets: EndpointSets = categorize_endpoints(port, endpoints, role.name or "",
                                                       role.zone)
        self.targets: PortTargets = port_targets(port, self.sets, settings)
        spn, proto = str(port.name), port.protocol.lower
        self.svc = names.svc_chain(spn, proto)
        self.svl = names.svl_chain(spn, proto)
        self.fw = names.fw_chain(spn, proto)

    def entries(self) -> tuple[Entry, ...]:
        port = self.port
        entries = [Entry("cluster-ip", f"{port.cluster_ip}:{port.port}", self._cluster_ip())]
        entries += [Entry("external-ip", f"{ip}:{port.port}", self._external(ip, fw=False))
                    for ip in port.external_ips]
        entries += [Entry("load-balancer-ip", f"{ip}:{port.port}",
                          self._external(ip, fw=self.targets.uses_fw))
                    for ip in port.load_balancer_ips]
        if port.node_port:
            node_port = self._external(None, fw=False)
            entries.append(Entry("node-port", f":{port.node_port}", node_port))
        return tuple(entries)

    # --- pools and outcomes --------------------------------------------------------------

    def _cluster_pool(self) -> _Pool:
        return _Pool(self.svc, self.sets.cluster, False, "")

    def _local_pool(self, policy: str) -> _Pool:
        return _Pool(self.svl, self.sets.local, True, policy)

    def _dnat(self, source: Source, pool: _Pool, masquerade: tuple[bool, str], *,
              why: str = "", sources: str = "") -> Outcome:
        fallback = any(not ep.ready for ep in pool.endpoints)
        if fallback:
            picked = ("serving terminating endpoints " + ("on this node" if pool.local else
                      "cluster-wide") + " (terminating fallback: none is ready)")
        elif pool.local:
            picked = "the ready endpoints on this node"
        elif self.sets.topology:
            picked = f"the ready endpoints hinted for zone {self.role.zone} (topology hints)"
        else:
            picked = "every ready endpoint in the cluster"
        if pool.local:
            picked += f" ({pool.policy}=Local)"
        reason = f"{why}: {picked}" if why else picked
        return Outcome(source, "DNAT", f"{reason}; {masquerade[1]}", sources,
                       tuple(ep.key for ep in pool.endpoints), pool.chain, masquerade[0],
                       fallback, self._excluded(pool))

    def _excluded(self, pool: _Pool | None) -> tuple[Excluded, ...]:
        used = {ep.key for ep in pool.endpoints} if pool else set()
        return tuple(self._why_excluded(ep, pool) for ep in self.endpoints
                     if ep.key not in used)

    def _why_excluded(self, ep: Endpoint, pool: _Pool | None) -> Excluded:
        if pool is not None and pool.local and not is_local(ep, self.role.name or ""):
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
                        f"topology hints for zone {hints}, this node is in zone "
                        f"{self.role.zone}")

    def _reject(self, source: Source) -> Outcome:
        return Outcome(source, "REJECT", "no endpoint is ready or terminating-and-serving: "
                       "REJECT (connection refused)", excluded=self._excluded(None))

    def _drop_no_local(self, source: Source, policy: str, sources: str = "") -> Outcome:
        return Outcome(source, "DROP", f"{policy}=Local and no endpoint on this node: DROP "
                       "(the client times out)", sources,
                       excluded=self._excluded(self._local_pool(policy)))

    # --- entry points ----------------------------------------------------------------------

    def _cluster_ip(self) -> tuple[Outcome, ...]:
        if not self.targets.has_endpoints:
            return tuple(self._reject(source) for source in SOURCES)
        if not self.targets.has_internal:
            return tuple(self._drop_no_local(source, "internalTrafficPolicy")
                         for source in SOURCES)
        local = self.port.internal_policy_local
        pool = self._local_pool("internalTrafficPolicy") if local else self._cluster_pool()
        return tuple(self._dnat(source, pool, self._cluster_ip_masquerade(source))
                     for source in SOURCES)

    def _cluster_ip_masquerade(self, source: Source) -> tuple[bool, str]:
        # The internal chain's first rule: everything with --masquerade-all, otherwise
        # whatever comes from outside the cluster CIDR (the node's own address included).
        if self.settings.masquerade_all:
            return True, "masqueraded (--masquerade-all)"
        if self.settings.local_cidr is None:
            return False, "source kept (no --cluster-cidr: nothing is masqueraded)"
        if source == "pod":
            return False, "source kept (a pod address, inside --cluster-cidr)"
        return True, "masqueraded (the source is outside --cluster-cidr)"

    def _external(self, ip: IPAddress | None, *, fw: bool) -> tuple[Outcome, ...]:
        if not self.targets.has_endpoints:
            return tuple(self._reject_external(source, ip) for source in SOURCES)
        if not fw:
            return tuple(self._ext_chain(source) for source in SOURCES)
        return tuple(outcome for source in SOURCES for outcome in self._firewall(source))

    def _reject_external(self, source: Source, ip: IPAddress | None) -> Outcome:
        # The REJECT rules for external destinations sit in filter KUBE-EXTERNAL-SERVICES,
        # which INPUT and FORWARD jump to but OUTPUT does not: the node's own connection to
        # an external or load-balancer IP that is not its own leaves untouched.
        if source == "node" and ip is not None and ip not in self.settings.node_ips:
            return Outcome(source, "ACCEPT", "the service has no endpoints; the node's own "
                           "traffic to this address is not handled and leaves unchanged",
                           excluded=self._excluded(None))
        return self._reject(source)

    def _ext_chain(self, source: Source, sources: str = "") -> Outcome:
        port, cidr = self.port, self.settings.local_cidr
        if not port.external_policy_local:
            return self._dnat(source, self._cluster_pool(), (
                True, "masqueraded (externalTrafficPolicy=Cluster masquerades external "
                "destinations)"), sources=sources)
        if source == "pod" and cidr is not None:
            return self._dnat(source, self._cluster_pool(), (False, "source kept"),
                              sources=sources, why="pods are exempt from externalTrafficPolicy")
        if source == "node":
            return self._dnat(source, self._cluster_pool(), (
                True, "masqueraded (the node's own traffic)"), sources=sources,
                why="the node itself is exempt from externalTrafficPolicy")
        if self.targets.has_external:
            return self._dnat(source, self._local_pool("externalTrafficPolicy"), (
                False, "source kept (the point of externalTrafficPolicy=Local)"),
                sources=sources)
        return self._drop_no_local(source, "externalTrafficPolicy", sources)

    def _firewall(self, source: Source) -> tuple[Outcome, ...]:
        ranges = self.port.load_balancer_source_ranges
        listed = ", ".join(map(str, ranges))
        cidr = self.settings.local_cidr
        if source == "external":
            return (self._ext_chain(source, listed),
                    self._fw_drop(source, "the source is outside", "other addresses"))
        if source == "pod":
            if cidr is not None and any(_inside(cidr, r) for r in ranges):
                return (self._ext_chain(source),)
            return (self._fw_drop(source, "pod addresses (--cluster-cidr) are not inside"),)
        if self.targets.fw_admits_node:
            return (self._ext_chain(source),)
        if self.settings.node_ips:
            return (self._fw_drop(source, f"the node's address {self.settings.node_ips[0]} "
                                  "is outside"),)
        return (self._fw_drop(source, "the node's address is not known here; if it is "
                              "outside"),)

    def _fw_drop(self, source: Source, why: str, sources: str = "") -> Outcome:
        ranges = ", ".join(map(str, self.port.load_balancer_source_ranges))
        return Outcome(source, "DROP", f"{why} loadBalancerSourceRanges ({ranges}): "
                       f"{self.fw} lets it through un-DNATed and KUBE-PROXY-FIREWALL drops it",
                       sources)


def _inside(inner: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(inner, IPv4Network) and isinstance(outer, IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, IPv6Network) and isinstance(outer, IPv6Network):
        return inner.subnet_of(outer)
    return False


# --- text ------------------------------------------------------------------------------------

def render_text(explanation: ServiceExplanation) -> str:
    """The explanation for a person: per port, per group of nodes, per entry point."""
    head = f"service {explanation.namespace}/{explanation.name}"
    if explanation.skipped_reason:
        return f"{head}: {explanation.skipped_reason}\n"
    lines: list[str] = []
    for port_explanation in explanation.ports:
        if lines:
            lines.append("")
        lines.extend(_port_lines(port_explanation))
    return "\n".join(lines) + "\n"


def _port_lines(explanation: PortExplanation) -> list[str]:
    port = explanation.port
    etp = "Local" if port.external_policy_local else "Cluster"
    itp = "Local" if port.internal_policy_local else "Cluster"
    lines = [f"{port.name} {port.port}/{port.protocol.value}: "
             f"externalTrafficPolicy={etp}, internalTrafficPolicy={itp}"]
    lines.append(f"endpoints ({len(explanation.endpoints)}):" if explanation.endpoints
                 else "endpoints: none")
    lines.extend(f"  {ep.key:<22} {ep.node_name or '(no node)':<12} {_conditions(ep)}"
                 for ep in explanation.endpoints)
    lines.extend(f"note: {note}" for note in explanation.notes)
    for view in explanation.views:
        lines.append("")
        lines.append("on " + "; ".join(_role_label(role) for role in view.roles) + ":")
        for entry in view.entries:
            where = (f"{entry.address[1:]} on the node's addresses"
                     if entry.kind == "node-port" else entry.address)
            lines.append(f"  {ENTRY_LABELS[entry.kind]} {where}")
            lines.extend(_entry_lines(entry))
    return lines


def _conditions(ep: Endpoint) -> str:
    words = ["ready" if ep.ready else "not ready"]
    if ep.terminating:
        words.append("terminating, " + ("serving" if ep.serving else "not serving"))
    if ep.zone:
        words.append(f"zone {ep.zone}")
    if ep.zone_hints:
        words.append(f"hints: {', '.join(sorted(ep.zone_hints))}")
    return "; ".join(words)


def _role_label(role: NodeRole) -> str:
    if role.name is None:
        return "any other node (no endpoints there)"
    local = (f"{len(role.local_ready)} local ready endpoint"
             f"{'' if len(role.local_ready) == 1 else 's'}") if role.local_ready else (
        "no local ready endpoint")
    what = ["this node", local] if role.this_node else [local]
    if role.zone:
        what.append(f"zone {role.zone}")
    return f"{role.name} ({', '.join(what)})"


def _entry_lines(entry: Entry) -> list[str]:
    """Clients with the same outcome share a line; shared exclusions are listed once."""
    groups: list[tuple[list[str], Outcome]] = []
    for outcome in entry.outcomes:
        label = SOURCE_LABELS[outcome.source] + (f" ({outcome.sources})" if outcome.sources
                                                 else "")
        key = replace(outcome, source="pod", sources="")
        for labels, seen in groups:
            if replace(seen, source="pod", sources="") == key:
                labels.append(label)
                break
        else:
            groups.append(([label], outcome))
    excluded = {group[1].excluded for group in groups if group[1].excluded}
    shared = len(excluded) == 1 and all(group[1].excluded for group in groups)
    lines = []
    for labels, outcome in groups:
        lines.append(f"    from {', '.join(labels)}: {_summary(outcome)}")
        lines.append(f"        {outcome.reason}")
        if not shared:
            lines.extend(_excluded_lines(outcome.excluded, "        "))
    if shared:
        lines.extend(_excluded_lines(groups[0][1].excluded, "    "))
    return lines


def _summary(outcome: Outcome) -> str:
    if outcome.verdict != "DNAT":
        return outcome.verdict
    n = len(outcome.endpoints)
    share = "" if n == 1 else f" 1/{n} each"
    masq = "masqueraded" if outcome.masquerade else "source kept"
    return f"DNAT{share} to {', '.join(outcome.endpoints)} via {outcome.chain}, {masq}"


def _excluded_lines(excluded: tuple[Excluded, ...], indent: str) -> list[str]:
    return [f"{indent}not used: {item.endpoint}: {item.detail}" for item in excluded]


# --- JSON ------------------------------------------------------------------------------------

def explanation_json(explanation: ServiceExplanation) -> dict[str, Any]:
    """The machine-readable form (see docs/troubleshooting.md)."""
    return {
        "service": f"{explanation.namespace}/{explanation.name}",
        "node": explanation.node_name,
        "skipped": explanation.skipped_reason,
        "ports": [_port_json(p) for p in explanation.ports],
    }


def _port_json(explanation: PortExplanation) -> dict[str, Any]:
    port = explanation.port
    return {
        "name": str(port.name),
        "port_name": port.name.port,
        "protocol": port.protocol.value,
        "port": port.port,
        "external_traffic_policy": "Local" if port.external_policy_local else "Cluster",
        "internal_traffic_policy": "Local" if port.internal_policy_local else "Cluster",
        "endpoints": [{"endpoint": ep.key, "node": ep.node_name, "zone": ep.zone,
                       "zone_hints": sorted(ep.zone_hints), "ready": ep.ready,
                       "serving": ep.serving, "terminating": ep.terminating}
                      for ep in explanation.endpoints],
        "notes": list(explanation.notes),
        "nodes": [{"roles": [{"node": r.name, "this_node": r.this_node, "zone": r.zone,
                              "local_ready_endpoints": list(r.local_ready)}
                             for r in view.roles],
                   "entries": [_entry_json(entry) for entry in view.entries]}
                  for view in explanation.views],
    }


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {"kind": entry.kind, "address": entry.address,
            "outcomes": [{"from": o.source, "sources": o.sources or None,
                          "verdict": o.verdict, "endpoints": o.probabilities,
                          "chain": o.chain, "masquerade": o.masquerade,
                          "terminating_fallback": o.fallback, "reason": o.reason,
                          "excluded": [{"endpoint": x.endpoint, "node": x.node,
                                        "reason": x.reason, "detail": x.detail}
                                       for x in o.excluded]}
                         for o in entry.outcomes]}
