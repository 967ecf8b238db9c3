"""The golden scenarios' files and settings, shared by the render, ruleset and tracer tests.

Each ``NAME.yaml`` holds a scenario's objects and ``NAME.warnings`` (when the scenario has
objects that are not programmed) the exact warnings its objects must produce, one a line. The
expected restore text is kept per IP family: ``NAME.rules`` for the IPv4 engine (iptables),
``NAME.v6.rules`` for the IPv6 engine (ip6tables). A dual-stack scenario has both; an
IPv6-only one only the second. ``upstream-*`` scenarios reproduce cases of kube-proxy's
``pkg/proxy/iptables/proxier_test.go`` under its test proxier's settings; those whose case
checks packets rather than rule text also have ``NAME.flows``, the case's packets and what
kube-proxy expects for each (read by ``tests/tracer/test_upstream_flows.py``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

from iptsync.core.model import IPFamily, IPNetwork
from iptsync.core.policy import Settings

SCENARIOS = Path(__file__).parent / "scenarios"
RULES_SUFFIX = {IPFamily.IPV4: ".rules", IPFamily.IPV6: ".v6.rules"}


def expected_rules(name: str, family: IPFamily) -> Path:
    """The file holding scenario ``name``'s expected rules for ``family``."""
    return SCENARIOS / f"{name}{RULES_SUFFIX[family]}"


def _families(name: str) -> list[IPFamily]:
    return [family for family in IPFamily if expected_rules(name, family).exists()]


ALL_SCENARIOS = sorted(p.stem for p in SCENARIOS.glob("*.yaml"))
# The scenarios with IPv4 rules: what the IPv4-only tests (roundtrip, tracer) run.
SCENARIO_NAMES = [name for name in ALL_SCENARIOS if IPFamily.IPV4 in _families(name)]
# Every (scenario, family) with expected rules.
FAMILY_SCENARIOS = [(name, family) for name in ALL_SCENARIOS for family in _families(name)]


ip, net = ipaddress.ip_address, ipaddress.ip_network
# The node every scenario is rendered on, unless OVERRIDES says otherwise: a dual-stack node,
# each family's engine sees its own half (Settings.for_family).
BASE = Settings(
    node_name="node1",
    cluster_cidrs=(net("10.0.0.0/14"), net("fd00:10::/56")),
    node_ips=(ip("10.100.0.2"), ip("fd00:100::2")),
)
# kube-proxy's NewFakeProxier: node test-node, pod CIDR 10.0.0.0/8, 192.168.0.2 (the node IP),
# 192.168.1.2 and 192.168.99.11 on eth0 and 127.0.0.1 on lo, iptables without --random-fully;
# its IPv6 proxier's node: 2001:db8::1 and 2001:db8:1::2.
UPSTREAM = replace(
    BASE, node_name="test-node", cluster_cidrs=(net("10.0.0.0/8"),),
    node_ips=tuple(ip(a) for a in ("192.168.0.2", "192.168.1.2", "192.168.99.11", "127.0.0.1",
                                   "2001:db8::1", "2001:db8:1::2")),
    random_fully=False)


def _networks(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(net(cidr) for cidr in cidrs)


# Per scenario: the flags its case sets (kube-proxy's test sets them on the proxier).
OVERRIDES: dict[str, dict[str, Any]] = {
    "flags": {
        "masquerade_all": True, "localhost_nodeports": False,
        "nodeport_addresses": _networks("10.100.0.0/24", "127.0.0.0/8"),
        "node_ips": (ip("10.100.0.2"), ip("127.0.0.1"))},
    "ipv6-flags": {
        "masquerade_all": True, "cluster_cidrs": _networks("10.0.0.0/14"),
        "nodeport_addresses": _networks("10.100.0.0/24", "fd00:100::/64", "::1/128"),
        "node_ips": (ip("10.100.0.2"), ip("fd00:100::2"), ip("fd00:200::2"), ip("::1"))},
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
    "upstream-localhost-nodeports-ipv6": {"cluster_cidrs": ()},
    "upstream-nodeports-ipv6": {"cluster_cidrs": _networks("fd00:10::/64")},
    "upstream-nodeports-ipv6-addresses": {
        "cluster_cidrs": _networks("fd00:10::/64"),
        "nodeport_addresses": _networks("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64",
                                        "2001:db8:1::2/128")},
}


def scenario_settings(name: str, family: IPFamily = IPFamily.IPV4) -> Settings:
    """The node's settings for scenario ``name``, as ``family``'s engine sees them."""
    base = UPSTREAM if name.startswith("upstream-") else BASE
    return replace(base, **OVERRIDES.get(name, {})).for_family(family)


def expected_warnings(name: str) -> list[str]:
    """The warnings scenario ``name`` must produce (none without a .warnings file)."""
    path = SCENARIOS / f"{name}.warnings"
    return path.read_text().splitlines() if path.exists() else []
