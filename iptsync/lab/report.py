"""Present a :class:`~iptsync.lab.measure.LabResult`: the text report, the JSON, the --keep hint.

Why: what the lab measured and how a person reads it change for different reasons. The text
report goes section by section (topology, traffic, the dump and the live comparison, checks);
``iptsync lab --json`` prints the same result as data; the hint tells how to look around while
``--keep`` holds the namespaces up. Nothing here touches the namespaces.
"""

from __future__ import annotations

import sys
from typing import Any

from iptsync.lab.checks import format_counts
from iptsync.lab.echo import join_host_port, split_host_port
from iptsync.lab.measure import LabResult
from iptsync.lab.readback import DumpExcerpt, save_command
from iptsync.lab.scenario import LabService, Scenario
from iptsync.lab.traffic import Probe

BAR_WIDTH = 40


def _bar(count: int, total: int) -> str:
    filled = round(BAR_WIDTH * count / total) if total else 0
    return "#" * filled + " " * (BAR_WIDTH - filled)


def _pod_line(scenario: Scenario, name: str, count: int, total: int, family: str) -> str:
    pod = scenario.pod(name)
    ip, node = ((pod.ip6 if family == "IPv6" else pod.ip) or "-", pod.node) if pod else ("?", "?")
    share = f"{100 * count / total:3.0f}%" if total else "  -%"
    note = "  <- no answer" if count == 0 else ""
    return (f"    {name:<16}{ip:<{_ip_width(family)}}{node:<7}{count:>4}  "
            f"{_bar(count, total)} {share}{note}")


def _ip_width(family: str) -> int:
    """Column width for the pods' addresses of ``family`` (fd00:10:244:1::10 is 17 long)."""
    return 19 if family == "IPv6" else 11


def _sources_line(scenario: Scenario, p: Probe) -> str:
    if not p.seen_as:
        return "    no answer, so no source address seen"
    seen = ", ".join(f"{ip} ({scenario.describe_ip(ip)})"
                     + (f" x{n}" if len(p.seen_as) > 1 else "")
                     for ip, n in sorted(p.seen_as.items(), key=lambda kv: -kv[1]))
    if set(p.seen_as) == {p.source_ip}:
        verdict = "the source address was kept"
    elif set(p.seen_as) <= set(scenario.node_ips_of(p.family).values()):
        verdict = "masqueraded to a node address"
    else:
        verdict = "neither kept nor a node address"
    return f"    the pods saw the source {seen}: {verdict}"


def _probe_block(scenario: Scenario, p: Probe, heading: str) -> list[str]:
    lines = [f"  {heading}: {p.sent} requests, {p.ok_count} answered"]
    names = list(p.expected) + [n for n in p.unexpected if n not in p.expected]
    lines += [_pod_line(scenario, name, p.answered.get(name, 0), p.sent, p.family)
              for name in names]
    if p.errors:
        lines.append(f"    failed requests: {format_counts(p.errors)}")
    lines.append(_sources_line(scenario, p))
    return lines


def _title(text: str) -> list[str]:
    return ["", f"== {text} =="]


def _service_line(s: LabService) -> list[str]:
    """The service's line, and a second one for the IPv6 half of a dual-stack service."""
    if s.kind == "ExternalName":
        return [f"    {s.name:<16}{s.kind:<14}{'-> ' + str(s.external_name):<18}"
                "DNS alias only: no rules expected"]
    stack = "dual-stack" if len(s.families) > 1 else f"{s.families[0]} only" if s.families else ""
    lines = []
    for index, family in enumerate(s.families):
        ports = f"port {s.port} -> {s.target_port}"
        if s.node_port:
            ports += f", NodePort {s.node_port}"
        if (lb_ip := s.lb_ip_of(family)) is not None:
            ports += f", LB IP {lb_ip}"
        name, kind = (s.name, s.kind) if index == 0 else ("", "")
        note = f"  ({stack})" if index == 0 else ""
        lines.append(f"    {name:<16}{kind:<14}{s.cluster_ip_of(family) or '':<18}{ports}{note}")
    return lines


def render_header(result: LabResult) -> list[str]:
    """The topology: nodes, client, pods, services, and how the sync on each node went."""
    scenario = result.scenario
    routes = ", ".join(f"{route.to} via {route.via}" for route in scenario.client_routes)
    echo_ports = sorted({port for pod in scenario.pods for port in pod.tcp_ports})
    lines = [
        "iptsync lab: a two-node dual-stack Kubernetes-like cluster made of network namespaces",
        f"  backend {result.backend}, namespaces {result.prefix}*, manifests {result.manifests}",
        *_title("Topology"),
        "  nodes",
    ]
    for n in scenario.nodes:
        lines.append(f"    {n.name:<16}{n.ip:<15}pod CIDR {n.pod_cidr}")
        if n.ip6 is not None:
            lines.append(f"    {'':<16}{n.ip6:<15}pod CIDR {n.pod_cidr6}")
    lines += ["  client (outside the cluster)",
              f"    {'client':<16}{scenario.client_ip:<15}routes {routes}",
              f"    {'':<16}{scenario.client_ip6}",
              f"  pods (echo servers on TCP {', '.join(map(str, echo_ports))} answering with "
              "their name)"]
    for pod in scenario.pods:
        role = pod.service or "sends the in-cluster requests"
        lines.append(f"    {pod.name:<16}{pod.ip:<11}{pod.ip6 or '-':<19}{pod.node:<7}{role}")
    lines.append("  services")
    lines += [line for s in scenario.services for line in _service_line(s)]
    lines.append("  iptsync run --once on each node")
    for s in result.syncs:
        parts = [part.strip() for part in s.detail.split("; ") if part.strip()]
        lines.append(f"    {s.node:<16}{'ok' if s.ok else 'FAILED'} in {s.seconds:.1f} s"
                     + (f": {parts[0]}" if parts else ""))
        lines += [f"{'':<22}{part}" for part in parts[1:]]
    return lines


def render_traffic(result: LabResult) -> list[str]:
    """The three traffic sections: ClusterIP spread, NodePort on every node, load balancer."""
    scenario = result.scenario
    lines = _title("Connections spreading over pods")
    for p in result.probes_in("cluster-ip"):
        lines += _probe_block(scenario, p, f"{scenario.describe_ip(p.source_ip)} "
                                           f"({p.source_ip}) -> {p.service} {p.target}")
    lines += _title("NodePort from outside on every node")
    for p in result.probes_in("nodeport"):
        lines += _probe_block(scenario, p, f"client {p.source_ip} -> "
                                           f"{scenario.describe_ip(p.ip)} {p.target} "
                                           f"({p.service})")
    lines += _title("Load-balancer IP from outside")
    for p in result.probes_in("load-balancer"):
        lines += _probe_block(scenario, p, f"client {p.source_ip} -> {p.target} ({p.service}; "
                                           f"routed via {scenario.route_via(p.ip)})")
    return lines


def _chain_notes(scenario: Scenario, dump: DumpExcerpt) -> list[str]:
    notes: list[str] = []
    pods_by_ip = {ip: pod.name for pod in scenario.pods for ip in (pod.ip, pod.ip6) if ip}
    for chain, rules in dump.chains.items():
        if chain.startswith("KUBE-SVC-"):
            notes.append(f"    {chain}  picks one pod at random, each equally likely")
        elif chain.startswith("KUBE-EXT-"):
            notes.append(f"    {chain}  NodePort/LB traffic: mark for masquerade, "
                         "then the KUBE-SVC chain")
        elif chain.startswith("KUBE-SEP-"):
            dest = next((r.args[r.args.index("--to-destination") + 1] for r in rules
                         if "--to-destination" in r.args[:-1]), "?")
            pod = pods_by_ip.get(split_host_port(dest)[0], "?")
            notes.append(f"    {chain}  DNAT to {dest} ({pod})")
    return notes


def render_dump(result: LabResult) -> list[str]:
    """The dump excerpt for one service in each of its families, a key to its chains, and
    the live comparison."""
    lines = _title(f"What `iptsync dump` prints for {result.scenario.dump_service.name}")
    for dump, live in zip(result.dumps, result.lives, strict=True):
        lines += [f"  $ {dump.command}",
                  f"  ({dump.family} nat table, only the rules of {dump.service})"]
        lines += [f"  {line}" for line in dump.lines]
        lines.append("  reading it:")
        lines += _chain_notes(result.scenario, dump)
        if live.error is not None:
            verdict = f"could not be read: {live.error}"
        elif live.matches:
            verdict = "the same rules"
        else:
            verdict = f"DIFFERENT in {', '.join(live.differing)}"
        lines.append(f"  {live.node}'s live rules ({live.command} in its namespace): {verdict}")
    return lines


def render_checks(result: LabResult) -> list[str]:
    """Every check with PASS/FAIL, then the summary line."""
    lines = _title("Checks")
    for check in result.checks:
        lines.append(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}")
        if not check.passed:
            lines.append(f"        {check.detail}")
    lines.append("")
    lines.append(summary_line(result))
    return lines


def summary_line(result: LabResult) -> str:
    return f"lab: {result.passed} checks passed, {result.failed} failed"


def render_text(result: LabResult) -> str:
    """The whole human-readable report."""
    lines = (render_header(result) + render_traffic(result) + render_dump(result)
             + render_checks(result))
    return "\n".join(lines) + "\n"


def result_json(result: LabResult) -> dict[str, Any]:
    """The result as JSON-ready data (``iptsync lab --json``)."""
    scenario = result.scenario
    return {
        "backend": result.backend,
        "prefix": result.prefix,
        "requests": result.requests,
        "manifests": result.manifests,
        "namespaces": dict(result.namespaces),
        "topology": {
            "nodes": {n.name: {"ip": n.ip, "pod_cidr": n.pod_cidr, "ip6": n.ip6,
                               "pod_cidr6": n.pod_cidr6} for n in scenario.nodes},
            "client": scenario.client_ip,
            "client6": scenario.client_ip6,
            "pods": {p.name: {"ip": p.ip, "ip6": p.ip6, "node": p.node, "service": p.service}
                     for p in scenario.pods},
            "services": {s.name: {"families": list(s.families), "cluster_ip": s.cluster_ip,
                                  "cluster_ip6": s.cluster_ip6}
                         for s in scenario.services if s.kind != "ExternalName"},
        },
        "syncs": [{"node": s.node, "ok": s.ok, "seconds": round(s.seconds, 3),
                   "detail": s.detail} for s in result.syncs],
        "probes": [{"section": p.section, "family": p.family, "service": p.service,
                    "source": p.source,
                    "source_ip": p.source_ip, "target": p.target, "expected": list(p.expected),
                    "sent": p.sent, "answered": dict(p.answered), "errors": dict(p.errors),
                    "seen_as": dict(p.seen_as)} for p in result.probes],
        "dumps": [{"node": dump.node, "service": dump.service, "family": dump.family,
                   "command": dump.command, "lines": dump.lines,
                   "services_with_svc_chain": list(dump.services_with_svc_chain)}
                  for dump in result.dumps],
        "lives": [{"node": live.node, "family": live.family, "command": live.command,
                   "matches": live.matches, "compared": list(live.compared),
                   "differing": list(live.differing), "error": live.error}
                  for live in result.lives],
        "external_name": {
            "service": result.external_name.service,
            "in_dump": result.external_name.in_dump,
            "live_mentions": {k: list(v) for k, v in result.external_name.live_mentions.items()},
            "live_svc_chains": {k: list(v)
                                for k, v in result.external_name.live_svc_chains.items()},
            "error": result.external_name.error,
        },
        "other_family": [{"service": r.service, "family": r.family,
                          "live_mentions": {k: list(v) for k, v in r.live_mentions.items()}}
                         for r in result.other_family],
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail}
                   for c in result.checks],
        "passed": result.passed,
        "failed": result.failed,
    }


def keep_hint(result: LabResult) -> str:
    """How to look around the lab while ``--keep`` holds it up."""
    scenario, ns = result.scenario, result.namespaces
    node = ns.get(f"node:{scenario.dump_node}", "?")
    client_pod = ns.get(f"pod:{scenario.client_pod.name}", "?")
    echo = f"{sys.executable} -m iptsync.lab.echo ask --proto tcp"
    width = max(len(key) for key in ns) if ns else 0
    service = scenario.dump_service
    lines = [
        "",
        "The lab stays up until you press Enter (or Ctrl-C). From another shell, as root:",
        *(f"  ip netns exec {node} {save_command(result.backend, 'nat', family)}"
          for family in ("IPv4", "IPv6")),
        f"  ip netns exec {node} conntrack -L",
        f"  ip netns exec {node} conntrack -L -f ipv6",
        *(f"  ip netns exec {client_pod} {echo} --to {join_host_port(ip, service.port)} --count 5"
          for family in service.families
          if (ip := service.cluster_ip_of(family)) and service.port),
        *(f"  ip netns exec {ns.get('client', '?')} {echo} --to {join_host_port(ip, s.port)} "
          "--count 5"
          for s in scenario.services for family in s.families
          if (ip := s.lb_ip_of(family)) and s.port),
        "namespaces:",
        *(f"  {key:<{width}}  {name}" for key, name in ns.items()),
        "",
    ]
    return "\n".join(lines)
