"""kube-proxy's packet-flow expectations (its proxier_test.go) traced through iptsync's rules.

Many of kube-proxy's iptables tests do not compare rule text: they trace packets through the
rules with a small tracer and check where each one ends. Each ``upstream-*`` golden scenario
with a ``NAME.flows`` file holds such a case's packets and kube-proxy's answers. Here every
packet is traced through the scenario's rendered rules (the golden settings) with iptsync's
tracer, entering where such a packet enters (from the node for one of its addresses, from a
pod for kube-proxy's pod range 10.0.0.0/8, from outside otherwise), and the result is put as
kube-proxy's tracer puts it: the endpoints reached in rule order, or DROP, REJECT, ACCEPT (a
rule accepted it), or ``-`` when no service rule matched; and whether any path masquerades.
"""

from __future__ import annotations

import ipaddress
from functools import cache

import pytest
from render.golden import SCENARIOS, expected_warnings, scenario_settings

from iptsync.engine.desired import desired_from_objects
from iptsync.inspection.trace import (
    Tables,
    TraceResult,
    default_origin,
    from_desired,
    make_packet,
    trace,
)
from iptsync.sources.files import load_objects

# kube-proxy's test conventions: pods are in 10.0.0.0/8, whatever the proxier's local detector.
POD_CIDR = ipaddress.ip_network("10.0.0.0/8")
FLOWS = sorted(p.stem for p in SCENARIOS.glob("*.flows"))

Flow = tuple[str, str, str, str, str, str]  # name, source, protocol, destination, output, masq


def read_flows(name: str) -> list[Flow]:
    """The packets of ``NAME.flows`` and kube-proxy's answers, one per line."""
    flows = []
    for line in (SCENARIOS / f"{name}.flows").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            fields = [field.strip() for field in line.split("|")]
            assert 6 == len(fields), line
            flows.append((fields[0], fields[1], fields[2], fields[3], fields[4], fields[5]))
    return flows


@cache
def rules(name: str) -> Tables:
    """The scenario's rules as the golden test renders them."""
    loaded = load_objects([SCENARIOS / f"{name}.yaml"])
    desired = desired_from_objects(loaded.objects, scenario_settings(name))
    assert expected_warnings(name) == [str(p) for p in loaded.problems + desired.problems]
    return from_desired(desired.tables)


def kube_proxy_answer(result: TraceResult) -> tuple[str, str]:
    """A trace put as kube-proxy's tracer reports it: (output, masquerade)."""
    endpoints = list(dict.fromkeys(o.endpoint for o in result.outcomes if o.endpoint))
    masq = "masq" if any(o.masquerade for o in result.outcomes) else "-"
    if endpoints:
        return ", ".join(endpoints), masq
    verdicts = {o.verdict for o in result.outcomes}
    if verdicts in ({"DROP"}, {"REJECT"}):
        return verdicts.pop(), masq
    accepted = any(step.index is not None and step.rule.endswith("-j ACCEPT")
                   for o in result.outcomes for step in o.path)
    return ("ACCEPT" if accepted else "-"), masq


@pytest.mark.parametrize("name", FLOWS)
def test_packets_end_where_kube_proxy_expects(name: str) -> None:
    """Each packet of the kube-proxy case ends, masqueraded or not, as kube-proxy's test expects."""
    settings = scenario_settings(name)
    expected, actual = [], []
    for flow_name, source, protocol, destination, output, masq in read_flows(name):
        packet = make_packet(source, destination, protocol)
        origin = default_origin(packet.src, (POD_CIDR,), settings.node_ips)
        result = trace(rules(name), packet, origin=origin, node_ips=settings.node_ips)
        expected.append((flow_name, output, masq))
        actual.append((flow_name, *kube_proxy_answer(result)))
    assert expected == actual


def test_every_flows_file_has_its_scenario() -> None:
    """A .flows file without the scenario it traces would never be checked."""
    assert [] == [name for name in FLOWS if not (SCENARIOS / f"{name}.yaml").exists()]
