"""The golden scenarios' files and settings, shared by the render, ruleset and tracer tests.

Each ``NAME.yaml`` holds a scenario's objects, ``NAME.rules`` its expected restore text, and
``NAME.warnings`` (when the scenario has objects that are not programmed) the exact warnings
its objects must produce, one a line. ``upstream-*`` scenarios reproduce cases of kube-proxy's
``pkg/proxy/iptables/proxier_test.go`` under its test proxier's settings; those whose case
checks packets rather than rule text also have ``NAME.flows``, the case's packets and what
kube-proxy expects for each (read by ``tests/tracer/test_upstream_flows.py``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

from iptsync.core.model import IPNetwork
from iptsync.core.policy import Settings

SCENARIOS = Path(__file__).parent / "scenarios"
# Scenarios that wait for another part of issue #15: their expected files are kube-proxy's,
# and the golden test expects them to fail until that part is merged.
SCENARIO_NAMES = sorted(p.stem for p in SCENARIOS.glob("*.yaml"))

BASE = Settings(
    node_name="node1",
    cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
    node_ips=(ipaddress.ip_address("10.100.0.2"),),
)
# kube-proxy's NewFakeProxier: node test-node, pod CIDR 10.0.0.0/8, 192.168.0.2 (the node IP),
# 192.168.1.2 and 192.168.99.11 on eth0 and 127.0.0.1 on lo, iptables without --random-fully.
UPSTREAM = replace(
    BASE, node_name="test-node", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),),
    node_ips=tuple(ipaddress.ip_address(ip) for ip in (
        "192.168.0.2", "192.168.1.2", "192.168.99.11", "127.0.0.1")),
    random_fully=False)


def _networks(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Per scenario: the flags its case sets (kube-proxy's test sets them on the proxier).
OVERRIDES: dict[str, dict[str, Any]] = {
    "flags": {
        "masquerade_all": True, "localhost_nodeports": False,
        "nodeport_addresses": (ipaddress.ip_network("10.100.0.0/24"),
                               ipaddress.ip_network("127.0.0.0/8")),
        "node_ips": (ipaddress.ip_address("10.100.0.2"), ipaddress.ip_address("127.0.0.1"))},
    "upstream-drop-invalid-rule-tcp-liberal-true": {"conntrack_tcp_be_liberal": True},
    "upstream-masquerade-rule-random-fully-true": {"random_fully": True},
    "upstream-sync-proxy-rules-large-cluster-mode": {"masquerade_all": True},
    "upstream-sync-proxy-rules-large-cluster-mode-full-resync": {"masquerade_all": True},
    "upstream-node-ports-ipv4-localhost-nodeports-disabled": {"localhost_nodeports": False},
    "upstream-node-ports-ipv4-localhost-nodeports-disabled-localhost-in-nodeport-addresses": {
        "localhost_nodeports": False, "nodeport_addresses": _networks("192.168.0.0/24",
                                                                      "127.0.0.1/32")},
    "upstream-node-ports-ipv4-localhost-nodeports-enabled-multiple-nodeport-addresses": {
        "localhost_nodeports": False,
        "nodeport_addresses": _networks("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64")},
    "upstream-health-check-node-port": {"nodeport_addresses": _networks("127.0.0.0/8")},
    # No LocalTrafficDetector: kube-proxy's no-op detector is iptsync without --cluster-cidr.
    "upstream-internal-external-masquerade-no-local-traffic-detector": {"cluster_cidrs": ()},
    "upstream-internal-external-masquerade-masquerade-all": {"masquerade_all": True},
    "upstream-internal-external-masquerade-masquerade-all-no-local-traffic-detector": {
        "masquerade_all": True, "cluster_cidrs": ()},
}


def scenario_settings(name: str) -> Settings:
    """The settings scenario ``name`` is rendered with."""
    base = UPSTREAM if name.startswith("upstream-") else BASE
    return replace(base, **OVERRIDES.get(name, {}))


def expected_warnings(name: str) -> list[str]:
    """The warnings scenario ``name`` must produce (none without a .warnings file)."""
    path = SCENARIOS / f"{name}.warnings"
    return path.read_text().splitlines() if path.exists() else []
