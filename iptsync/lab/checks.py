"""The lab's expectations, each judged as a passed or failed :class:`Check`. Pure.

Why: the report and the exit status rest on these; keeping them apart from measuring and
presenting means a changed expectation is one place, and the verdicts can be read without the
namespaces. Every node applied the rules; every pod behind a service answered at each of its
addresses, in each IP family; pods saw the client pod's own address through a cluster IP and
a node address through a NodePort; the dumped service's rules are the node's, in iptables and
ip6tables; the ExternalName service left no rule anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from iptsync.lab.readback import (
    ExternalNameResult,
    LiveComparison,
    OtherFamilyResult,
    ReadBack,
)
from iptsync.lab.scenario import Scenario
from iptsync.lab.traffic import NodeSync, Probe


@dataclass(frozen=True)
class Check:
    """One expectation of the lab and whether it held."""

    name: str
    passed: bool
    detail: str


def format_counts(counts: Mapping[str, int]) -> str:
    """``a 3, b 1``: each key with its count, the largest first."""
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _probe_checks(scenario: Scenario, p: Probe) -> list[Check]:
    where = {"cluster-ip": f"ClusterIP {p.target} from {scenario.describe_ip(p.source_ip)}",
             "nodeport": f"NodePort {p.target} ({scenario.describe_ip(p.ip)}) from outside",
             "load-balancer": f"load-balancer IP {p.target} from outside"}[p.section]
    answered = f"{p.ok_count}/{p.sent} answered: {format_counts(p.answered) or 'none'}"
    if p.errors:
        answered += f"; failed: {format_counts(p.errors)}"
    if p.missing:
        answered += f"; silent: {', '.join(p.missing)}"
    checks: list[Check] = []
    if p.section == "load-balancer":
        checks.append(Check(f"{p.service}: {where} is reachable",
                            p.sent > 0 and p.ok_count == p.sent, answered))
    checks.append(Check(f"{p.service}: {where}, every pod answered",
                        p.every_pod_answered, answered))
    seen = format_counts(p.seen_as) or "nothing"
    if p.section == "cluster-ip":
        checks.append(Check(
            f"{p.service}: pods saw the client pod's own address {p.source_ip} (source kept)",
            bool(p.seen_as) and set(p.seen_as) == {p.source_ip}, f"seen: {seen}"))
    elif p.section == "nodeport":
        checks.append(Check(
            f"{p.service}: NodePort {p.target} source masqueraded to a node address",
            bool(p.seen_as) and set(p.seen_as) <= set(scenario.node_ips_of(p.family).values()),
            f"seen: {seen}"))
    return checks


def _live_check(scenario: Scenario, live: LiveComparison) -> Check:
    if live.error is not None:
        detail = live.error
    elif live.matches:
        detail = f"{len(live.compared)} chains identical"
    else:
        detail = f"differing: {', '.join(live.differing)}"
    return Check(f"{live.node} holds exactly what iptsync dump --ip-family {live.family} "
                 f"prints for {scenario.dump_service.name} ({live.command})",
                 live.error is None and live.matches, detail)


def _external_name_check(scenario: Scenario, external: ExternalNameResult) -> Check:
    name = scenario.external_name.name
    leftovers = {node: lines for node, lines in external.live_mentions.items() if lines}
    svc_on = [node for node, services in external.live_svc_chains.items()
              if external.service in services]
    chains = "; ".join(f"{node}: KUBE-SVC chains for {', '.join(services) or 'nothing'}"
                       for node, services in external.live_svc_chains.items())
    detail = external.error or (
        f"{chains}; rules naming {name}: "
        + (", ".join(f"{node} {len(lines)}" for node, lines in leftovers.items()) or "none"))
    return Check(
        f"ExternalName {name}: no KUBE-SVC chain and no rule on any node",
        external.error is None and not external.in_dump and not svc_on and not leftovers
        and len(external.live_svc_chains) == len(scenario.nodes),
        detail)


def _other_family_check(scenario: Scenario, result: OtherFamilyResult) -> Check:
    tool = "ip6tables" if result.family == "IPv6" else "iptables"
    found = {node: lines for node, lines in result.live_mentions.items() if lines}
    return Check(
        f"{result.service.partition('/')[2]} ({'IPv6' if result.family == 'IPv4' else 'IPv4'} "
        f"only): no rule in {tool} on any node",
        not found and len(result.live_mentions) == len(scenario.nodes),
        "; ".join(f"{node}: {len(lines)} rules, e.g. {lines[0]}" for node, lines in found.items())
        or f"{tool} of {len(result.live_mentions)} of {len(scenario.nodes)} nodes read")


def evaluate(scenario: Scenario, syncs: Sequence[NodeSync], probes: Sequence[Probe],
             rules: ReadBack) -> tuple[Check, ...]:
    """Every check, in the report's order: syncs, traffic, live rules, ExternalName, the
    single-stack services in the other family."""
    checks = [Check(f"{s.node}: iptsync run --once applied the rules", s.ok,
                    f"{s.detail} ({s.seconds:.1f} s)") for s in syncs]
    for p in probes:
        checks += _probe_checks(scenario, p)
    checks += [_live_check(scenario, live) for live in rules.lives]
    checks.append(_external_name_check(scenario, rules.external_name))
    checks += [_other_family_check(scenario, result) for result in rules.other_family]
    return tuple(checks)
