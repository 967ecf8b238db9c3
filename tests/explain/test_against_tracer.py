"""Every answer `explain` gives for this node agrees with the tracer run on the rendered rules.

explain reads the renderer's decisions; the tracer walks the rules themselves. For each case
of ``objects.CASES``, each entry point and each kind of client, a packet is traced through
node1's rendered rules and the verdict, the endpoints with their shares, and masquerading must
match what explain says.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from iptsync.core.policy import Decision
from iptsync.engine.desired import desired_from_objects
from iptsync.inspection.explain import ServiceRef, explain
from iptsync.inspection.trace import from_desired, make_packet, trace

from .objects import CASES, NODES, SETTINGS, assert_trace_agrees

NODE_IP = "10.100.0.2"
POD_IP = "10.0.1.250"  # inside the cluster CIDR and node1's pod CIDR, not an endpoint
# kube-proxy's detect-local modes (the pod arrives on cbr0 / a veth* interface), and its
# no-op detector (no cluster CIDR).
MODES = {
    "ClusterCIDR": {},
    "NodeCIDR": {"detect_local_mode": "NodeCIDR"},
    "BridgeInterface": {"detect_local_mode": "BridgeInterface", "bridge_interface": "cbr0"},
    "InterfaceNamePrefix": {"detect_local_mode": "InterfaceNamePrefix",
                            "interface_name_prefix": "veth"},
    "no-detector": {"cluster_cidrs": ()},
}
OUTSIDE_IP = "10.100.0.100"


def source_ip(outcome: Decision) -> str:
    """An address of the kind of client the outcome is about."""
    if outcome.origin == "pod":
        return POD_IP
    if outcome.origin == "node":
        return NODE_IP
    if outcome.sources and outcome.sources[0].isdigit():  # inside a source range
        return str(next(ipaddress.ip_network(outcome.sources.split(",")[0]).hosts()))
    return OUTSIDE_IP


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_explain_agrees_with_the_tracer_on_this_node(case: str, mode: str) -> None:
    """For each entry point and client, verdict, endpoint shares and masquerade match, under
    each way of telling pod traffic apart."""
    desired = desired_from_objects([*NODES, *CASES[case]], replace(SETTINGS, **MODES[mode]))
    explanation = explain([(desired.state, desired.settings)], ServiceRef("default", case))
    tables = from_desired(desired.tables)
    detector = desired.settings.local_detector
    view = next(v for v in explanation.ports[0].views if v.roles[0].this_node)
    checked = 0
    for entry in view.entries:
        dst = f"{NODE_IP}{entry.address}" if entry.kind == "node-port" else entry.address
        for outcome in entry.decisions:
            packet = make_packet(source_ip(outcome), dst)
            result = trace(tables, packet, origin=outcome.origin,
                           node_ips=desired.settings.node_ips,
                           pod_interface=detector.interface if detector else None)
            assert_trace_agrees(outcome, result,
                                f"{entry.kind} from {outcome.origin} {outcome.sources}")
            checked += 1
    assert checked >= 3
