"""Golden tests: each scenario's rendered rules equal hand-checked iptables-restore text.

Rules within a chain are compared in order. Within the shared top-level chains kube-proxy's
order between services is not defined, so those are compared sorted, except that the NodePort
jump must stay the last rule of nat KUBE-SERVICES. A scenario is rendered by the engine of each
IP family it has expected rules for (``NAME.rules``: IPv4, ``NAME.v6.rules``: IPv6), with the
node's settings for that family (:meth:`iptsync.core.policy.Settings.for_family`). Set
IPTSYNC_REGEN_GOLDEN=1 to rewrite the expected files after a deliberate change, then review the
diff by hand. The ``upstream-*`` files are kube-proxy's expectations (docs/comparison.md) and
are never rewritten: a difference there is a bug in iptsync, or a deliberate and documented
departure edited in by hand.
"""

from __future__ import annotations

import copy
import ipaddress
import os
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iptsync.core import names
from iptsync.core.model import IPFamily
from iptsync.core.policy import Settings
from iptsync.core.render import NODEPORTS_COMMENT
from iptsync.core.ruleset import split_args
from iptsync.engine.desired import desired_from_objects
from iptsync.sources.files import load_objects

from .golden import (
    FAMILY_SCENARIOS,
    SCENARIOS,
    expected_rules,
    expected_warnings,
    scenario_settings,
)

UNORDERED = {names.KUBE_SERVICES, names.KUBE_NODEPORTS, names.KUBE_EXTERNAL_SERVICES,
             names.KUBE_PROXY_FIREWALL}


def render_objects(objects: list[Any], settings: Settings, warnings: list[str]) -> str:
    desired = desired_from_objects(objects, settings)
    assert warnings == [str(p) for p in desired.problems]
    return desired.payload()


def render_scenario(name: str, family: IPFamily = IPFamily.IPV4) -> str:
    loaded = load_objects([SCENARIOS / f"{name}.yaml"])
    warnings = expected_warnings(name)
    assert warnings[:len(loaded.problems)] == [str(p) for p in loaded.problems]
    return render_objects(loaded.objects, scenario_settings(name, family),
                          warnings[len(loaded.problems):])


def layout(text: str) -> dict[str, Any]:
    """Tables -> declared chains, per-chain rule lines, and inserted jumps."""
    tables: dict[str, Any] = {}
    current: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], {"chains": set(), "rules": {}, "jumps": []})
        elif line.startswith(":"):
            current["chains"].add(line[1:].split()[0])
        elif line.startswith("-A "):
            chain = split_args(line)[1]
            current["rules"].setdefault(chain, []).append(line)
        elif line.startswith("-I "):
            current["jumps"].append(line)
    for table in tables.values():
        for chain, rules in table["rules"].items():
            if chain in UNORDERED:
                last = rules[-1] if NODEPORTS_COMMENT in rules[-1] else None
                table["rules"][chain] = (sorted(r for r in rules if r != last), last)
    return tables


@pytest.mark.parametrize(("name", "family"), FAMILY_SCENARIOS,
                         ids=[f"{n}-{f.value}" for n, f in FAMILY_SCENARIOS])
def test_rendered_rules_match_golden_file(name: str, family: IPFamily) -> None:
    """The family's renderer output for the scenario equals the hand-checked expected rules."""
    actual = render_scenario(name, family)
    expected_file = expected_rules(name, family)
    if os.environ.get("IPTSYNC_REGEN_GOLDEN") == "1" and not name.startswith("upstream-"):
        expected_file.write_text(actual)
    assert layout(expected_file.read_text()) == layout(actual)


@pytest.mark.parametrize(("name", "family"), [("upstream-overall", IPFamily.IPV4),
                                              ("upstream-nodeports-ipv6", IPFamily.IPV6)])
def test_nodeport_jump_is_last_rule_of_nat_services(name: str, family: IPFamily) -> None:
    """kube-proxy's rule: the KUBE-NODEPORTS jump must be the last rule in KUBE-SERVICES."""
    text = render_scenario(name, family)
    services = [line for line in text.splitlines() if line.startswith("-A KUBE-SERVICES ")
                and "addrtype --dst-type LOCAL" in line and "-j KUBE-NODEPORTS" in line]
    nat = text.split("*nat", 1)[1]
    last = [line for line in nat.splitlines() if line.startswith("-A KUBE-SERVICES ")][-1]
    assert services == [last]


# --- a dual-stack Service's IPv4 half is an IPv4-only Service ---------------------------------

def ipv4_only(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same objects as an IPv4-only cluster has them: each Service keeps its IPv4 cluster
    IP, external IPs, load-balancer IPs and source ranges (SingleStack IPv4); IPv6-only
    Services and IPv6 EndpointSlices are gone."""
    def v4(text: str) -> bool:
        return ipaddress.ip_network(text, strict=False).version == 4

    out = []
    for obj in copy.deepcopy(objects):
        if obj.get("kind") == "EndpointSlice" and obj.get("addressType") == "IPv6":
            continue
        spec = obj.get("spec", {})
        if obj.get("kind") == "Service" and spec.get("clusterIPs"):
            spec["clusterIPs"] = [a for a in spec["clusterIPs"] if v4(a)]
            if not spec["clusterIPs"]:
                continue
            spec["clusterIP"] = spec["clusterIPs"][0]
            spec["ipFamilies"], spec["ipFamilyPolicy"] = ["IPv4"], "SingleStack"
            for field in ("externalIPs", "loadBalancerSourceRanges"):
                if field in spec:
                    spec[field] = [a for a in spec[field] if v4(a)]
            ingress = obj.get("status", {}).get("loadBalancer", {}).get("ingress")
            if ingress:
                obj["status"]["loadBalancer"]["ingress"] = [
                    i for i in ingress if "ip" not in i or v4(i["ip"])]
        out.append(obj)
    return out


DUAL_STACK = sorted({n for n, f in FAMILY_SCENARIOS if f is IPFamily.IPV6}
                    & {n for n, f in FAMILY_SCENARIOS if f is IPFamily.IPV4})


@pytest.mark.parametrize("name", DUAL_STACK)
def test_dual_stack_ipv4_rules_equal_the_ipv4_only_service(name: str) -> None:
    """A dual-stack Service's IPv4 rules are exactly those of an IPv4-only Service with the
    same IPv4 fields (and its IPv4 endpoints)."""
    loaded = load_objects([SCENARIOS / f"{name}.yaml"])
    settings = scenario_settings(name, IPFamily.IPV4)
    single = ipv4_only(loaded.objects)
    assert single != loaded.objects  # the scenario has something to take away
    assert render_objects(single, settings, []) == render_scenario(name, IPFamily.IPV4)


@st.composite
def dual_stack_objects(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A dual-stack Service of any shape (either family first, each feature on or off) with
    endpoints of both families spread over this node and another."""
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    v6_first = draw(st.booleans())
    pair = ["10.96.0.10", "fd00:96::10"]
    spec: dict[str, Any] = {
        "type": kind, "clusterIP": pair[v6_first], "clusterIPs": pair[::-1] if v6_first else pair,
        "ipFamilies": ["IPv6", "IPv4"] if v6_first else ["IPv4", "IPv6"],
        "ipFamilyPolicy": "RequireDualStack",
        "externalIPs": draw(st.lists(st.sampled_from(["203.0.113.10", "2001:db8::10"]),
                                     unique=True)),
        "ports": [{"name": "p", "port": 80, **({"nodePort": 30080} if kind != "ClusterIP"
                                               else {})}]}
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
    if draw(st.booleans()):
        spec["internalTrafficPolicy"] = "Local"
    status: dict[str, Any] = {}
    if kind == "LoadBalancer":
        ingress = draw(st.lists(st.sampled_from(["198.51.100.10", "2001:db8:1::10"]), unique=True))
        status = {"loadBalancer": {"ingress": [{"ip": a} for a in ingress]}}
        spec["loadBalancerSourceRanges"] = draw(st.lists(st.sampled_from(
            ["203.0.113.0/25", "10.100.0.0/24", "2001:db8:ff::/64", "fd00:100::/64"]),
            unique=True))
        if draw(st.booleans()):
            spec["externalTrafficPolicy"], spec["healthCheckNodePort"] = "Local", 32000
    objects: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Service",
                                      "metadata": {"name": "svc", "namespace": "ns"},
                                      "spec": spec, "status": status}]
    for family, prefix in (("IPv4", "10.0.{}.{}"), ("IPv6", "fd00:10:0:{}::{}")):
        endpoints = [{"addresses": [prefix.format(node, i + 1)], "nodeName": f"node{node}",
                      "conditions": {"ready": ready, "serving": ready or serving,
                                     "terminating": not ready}}
                     for i, (node, ready, serving) in enumerate(draw(st.lists(
                         st.tuples(st.sampled_from([1, 2]), st.booleans(), st.booleans()),
                         max_size=3)))]
        objects.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": f"svc-{family.lower()}", "namespace": "ns",
                                     "labels": {"kubernetes.io/service-name": "svc"}},
                        "addressType": family, "ports": [{"name": "p", "port": 8080}],
                        "endpoints": endpoints})
    return objects


@settings(max_examples=200, deadline=None)
@given(dual_stack_objects())
def test_any_dual_stack_service_has_the_ipv4_only_rules(objects: list[dict[str, Any]]) -> None:
    """Whatever its shape, a dual-stack Service's IPv4 rules equal the IPv4-only Service's."""
    settings = scenario_settings("dual-stack", IPFamily.IPV4)
    assert render_objects(ipv4_only(objects), settings, []) == render_objects(
        objects, settings, [])


def test_localhost_nodeports_flag_changes_nothing_on_ipv6() -> None:
    """kube-proxy's TestDisableLocalhostNodePortsIPv6 expects the rules of
    TestEnableLocalhostNodePortsIPv6: --iptables-localhost-nodeports means nothing to IPv6."""
    name = "upstream-localhost-nodeports-ipv6"
    loaded = load_objects([SCENARIOS / f"{name}.yaml"])
    off = replace(scenario_settings(name, IPFamily.IPV6), localhost_nodeports=False)
    assert render_scenario(name, IPFamily.IPV6) == render_objects(loaded.objects, off, [])
