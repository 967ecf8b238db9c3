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

A dual-stack Service is explained once per IP family: each family's rules are separate
(iptables and ip6tables), with their own cluster IP, external and load-balancer IPs, source
ranges and endpoints (``[ip]:port`` for IPv6), so each family's ports are explained from that
family's state and settings.

The decisions are not derived here: :func:`iptsync.core.policy.entry_decisions` makes them, from
the same endpoint categorisation and entry-point targets the renderer turns into rules. What
this module adds is the set of node roles to ask about, the grouping of nodes and clients
that fare alike, the notes, and the text and JSON forms.
``tests/explain`` checks every answer for this node against the tracer run on the rendered
rules, so the two cannot drift apart.

Pure: cluster state + settings in, a structured explanation out; text and JSON renderings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from iptsync.core.model import Endpoint, IPFamily, ServicePort
from iptsync.core.policy import (
    Decision,
    Entry,
    Excluded,
    Settings,
    entry_decisions,
)
from iptsync.core.state import ClusterState, is_local

ORIGIN_LABELS = {"pod": "pods", "node": "the node", "external": "outside"}
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


def explain(families: Iterable[tuple[ClusterState, Settings]],
            ref: ServiceRef) -> ServiceExplanation:
    """Explain every port of the service (or the one ``ref`` names) for every node role, in
    each IP family given: a (state, settings) pair per family, as each family's engine has
    them (the settings' ``family`` picks the ports of that family)."""
    given = list(families)
    found = [(service, state, settings) for state, settings in given
             if (service := state.services.get((ref.namespace, ref.name))) is not None]
    if not found:
        raise ExplainError(f"no Service {ref.namespace}/{ref.name} among the objects")
    ports = [(port, state, settings) for service, state, settings in found
             for port in service.ports if port.family is settings.family]
    named = [item for item in ports if ref.port is None or item[0].name.port == ref.port]
    if ref.port is not None and not named:
        known = ", ".join(dict.fromkeys(repr(p.name.port) for p, _, _ in ports)) or "none"
        raise ExplainError(f"Service {ref.namespace}/{ref.name} has no port named "
                           f"{ref.port!r} (ports: {known})")
    addressed = {settings.family for _, settings in given if settings.node_ips}
    skipped = next((service.skipped_reason for service, _, _ in found
                    if service.skipped_reason), None)
    return ServiceExplanation(
        ref.namespace, ref.name, given[0][1].node_name,
        tuple(_with_family_note(explain_port(port, state.endpoints(port), settings,
                                             state.node_zone), settings, addressed)
              for port, state, settings in named),
        skipped)


def _with_family_note(explanation: PortExplanation, settings: Settings,
                      addressed: set[IPFamily]) -> PortExplanation:
    """Say so when this node is known by addresses of another family but none of this
    port's (the agent programs a family only on a node with an address of it)."""
    family = settings.family
    if family in addressed or not addressed:
        return explanation
    note = (f"no {family.value} address of node {settings.node_name} is known here (its Node "
            f"object's status.addresses, --node-ip): if it has none, iptsync there programs "
            f"no {family.value} rules and this port's {family.value} entry points do nothing "
            f"on it")
    return replace(explanation, notes=(*explanation.notes, note))


def explain_port(port: ServicePort, endpoints: Sequence[Endpoint], settings: Settings,
                 zone: str | None) -> PortExplanation:
    """One service port on this node (``settings``, ``zone``) and on the other node roles."""
    views: list[NodeView] = []
    for role in node_roles(endpoints, settings.node_name, zone):
        # Other nodes' addresses are not known here: their FW chains admit no node address.
        role_settings = settings if role.this_node else replace(
            settings, node_name=role.name or "", node_ips=())
        entries = entry_decisions(port, endpoints, role_settings, role.zone)
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


# --- text ------------------------------------------------------------------------------------

def render_text(explanation: ServiceExplanation) -> str:
    """The explanation for a person: per port, per group of nodes, per entry point."""
    head = f"service {explanation.namespace}/{explanation.name}"
    if explanation.skipped_reason:
        return f"{head}: {explanation.skipped_reason}\n"
    # An IPv4-only Service reads as it always did; with IPv6 every port names its family.
    labelled = any(p.port.family is not IPFamily.IPV4 for p in explanation.ports)
    lines: list[str] = []
    for port_explanation in explanation.ports:
        if lines:
            lines.append("")
        lines.extend(_port_lines(port_explanation, labelled))
    return "\n".join(lines) + "\n"


def _port_lines(explanation: PortExplanation, labelled: bool) -> list[str]:
    port = explanation.port
    etp = "Local" if port.external_policy_local else "Cluster"
    itp = "Local" if port.internal_policy_local else "Cluster"
    of_family = f", {port.family.value}" if labelled else ""  # after the port's protocol
    family = f" {port.family.value}" if labelled else ""  # "the node's IPv6 addresses"
    lines = [f"{port.name} {port.port}/{port.protocol.value}{of_family}: "
             f"externalTrafficPolicy={etp}, internalTrafficPolicy={itp}"]
    lines.append(f"endpoints ({len(explanation.endpoints)}):" if explanation.endpoints
                 else "endpoints: none")
    width = max([22, *(len(ep.key) for ep in explanation.endpoints)])
    lines.extend(f"  {ep.key:<{width}} {ep.node_name or '(no node)':<12} {_conditions(ep)}"
                 for ep in explanation.endpoints)
    lines.extend(f"note: {note}" for note in explanation.notes)
    for view in explanation.views:
        lines.append("")
        lines.append("on " + "; ".join(_role_label(role) for role in view.roles) + ":")
        for entry in view.entries:
            where = (f"{entry.address[1:]} on the node's{family} addresses"
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
    """Clients with the same decision share a line; shared exclusions are listed once."""
    groups: list[tuple[list[str], Decision]] = []
    for decision in entry.decisions:
        label = ORIGIN_LABELS[decision.origin] + (f" ({decision.sources})"
                                                  if decision.sources else "")
        key = replace(decision, origin="pod", sources="")
        for labels, seen in groups:
            if replace(seen, origin="pod", sources="") == key:
                labels.append(label)
                break
        else:
            groups.append(([label], decision))
    excluded = {group[1].excluded for group in groups if group[1].excluded}
    shared = len(excluded) == 1 and all(group[1].excluded for group in groups)
    lines = []
    for labels, decision in groups:
        lines.append(f"    from {', '.join(labels)}: {_summary(decision)}")
        lines.append(f"        {decision.reason}")
        if not shared:
            lines.extend(_excluded_lines(decision.excluded, "        "))
    if shared:
        lines.extend(_excluded_lines(groups[0][1].excluded, "    "))
    return lines


def _summary(decision: Decision) -> str:
    if decision.verdict != "DNAT":
        return decision.verdict
    n = len(decision.endpoints)
    share = "" if n == 1 else f" 1/{n} each"
    masq = "masqueraded" if decision.masquerade else "source kept"
    return f"DNAT{share} to {', '.join(decision.endpoints)} via {decision.chain}, {masq}"


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
        "family": port.family.value,
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
                   "entries": [_entry_json(entry, port.family) for entry in view.entries]}
                  for view in explanation.views],
    }


def _entry_json(entry: Entry, family: IPFamily) -> dict[str, Any]:
    return {"kind": entry.kind, "family": family.value, "address": entry.address,
            "outcomes": [{"from": o.origin, "sources": o.sources or None,
                         "verdict": o.verdict, "endpoints": o.probabilities,
                         "chain": o.chain, "masquerade": o.masquerade,
                         "terminating_fallback": o.fallback, "reason": o.reason,
                         "excluded": [{"endpoint": x.endpoint, "node": x.node,
                                       "reason": x.reason, "detail": x.detail}
                                      for x in o.excluded]}
                        for o in entry.decisions]}
