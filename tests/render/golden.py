"""The golden scenarios' files, shared by the render and ruleset tests.

Each ``NAME.yaml`` holds a scenario's objects and ``NAME.warnings`` (when the scenario has
objects that are not programmed) the exact warnings its objects must produce, one a line. The
expected restore text is kept per IP family: ``NAME.rules`` for the IPv4 engine (iptables),
``NAME.v6.rules`` for the IPv6 engine (ip6tables). A dual-stack scenario has both; an
IPv6-only one only the second.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import Any

from iptsync.core.model import IPFamily
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
# kube-proxy's unit tests' node (pkg/proxy/iptables/proxier_test.go): its IPv4 and IPv6
# addresses; no --random-fully (the fake iptables lacks it).
UPSTREAM_NODE = {
    "node_name": "test-node", "random_fully": False,
    "node_ips": (ip("192.168.0.2"), ip("192.168.1.2"), ip("192.168.99.11"),
                 ip("2001:db8::1"), ip("2001:db8:1::2"))}
OVERRIDES: dict[str, dict[str, Any]] = {
    "upstream-overall": {
        "node_name": "test-node", "cluster_cidrs": (net("10.0.0.0/8"),),
        "node_ips": (ip("192.168.0.2"),), "random_fully": False},
    "flags": {
        "masquerade_all": True, "localhost_nodeports": False,
        "nodeport_addresses": (net("10.100.0.0/24"), net("127.0.0.0/8")),
        "node_ips": (ip("10.100.0.2"), ip("127.0.0.1"))},
    "ipv6-flags": {
        "masquerade_all": True, "cluster_cidrs": (net("10.0.0.0/14"),),
        "nodeport_addresses": (net("10.100.0.0/24"), net("fd00:100::/64"), net("::1/128")),
        "node_ips": (ip("10.100.0.2"), ip("fd00:100::2"), ip("fd00:200::2"), ip("::1"))},
    "upstream-localhost-nodeports-ipv6": {**UPSTREAM_NODE, "cluster_cidrs": ()},
    "upstream-nodeports-ipv6": {**UPSTREAM_NODE, "cluster_cidrs": (net("fd00:10::/64"),)},
    "upstream-nodeports-ipv6-addresses": {
        **UPSTREAM_NODE, "cluster_cidrs": (net("fd00:10::/64"),),
        "nodeport_addresses": (net("192.168.0.0/24"), net("192.168.1.0/24"),
                               net("2001:db8::/64"), net("2001:db8:1::2/128"))},
}


def scenario_settings(name: str, family: IPFamily) -> Settings:
    """The node's settings for scenario ``name``, as ``family``'s engine sees them."""
    return replace(BASE, **OVERRIDES.get(name, {})).for_family(family)


def expected_warnings(name: str) -> list[str]:
    """The warnings scenario ``name`` must produce (none without a .warnings file)."""
    path = SCENARIOS / f"{name}.warnings"
    return path.read_text().splitlines() if path.exists() else []
