"""The agent on a dual-stack node, in simulated time: one engine per IP family, fed the same
objects; each family syncs, fails and is retried on its own, under one ``/healthz``.

The kernels are the fake one (iptsync.testing), one per family, as iptables and ip6tables
are two kernels to the agent. Node ``node1``; the Service ``default/dual`` has cluster IPs
10.96.0.20 and fd00:96::20 and one endpoint slice per family. Times are seconds after the
agent started (:data:`START`); timings: min sync period 1 s, health timeout 5 s.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest

from iptsync.agent.health import HealthState
from iptsync.agent.loop import Agent, Timing
from iptsync.core import names
from iptsync.core.model import IPFamily
from iptsync.core.policy import Settings
from iptsync.engine.families import FamilyEngines
from iptsync.engine.reconciler import Engine
from iptsync.testing import FakeClock, FakeNetfilter

from .test_loop import ScriptedSource

START = 1000.0
SETTINGS = Settings(node_name="node1", cluster_cidrs=(
    ipaddress.ip_network("10.0.0.0/14"), ipaddress.ip_network("fd00:10:244::/56")))
SVC = names.svc_chain("default/dual:http", "tcp")


def dual_service() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": "dual"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"],
                     "ipFamilies": ["IPv4", "IPv6"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}


def dual_slice(family: str, *addresses: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": f"dual-{family.lower()}",
                         "labels": {"kubernetes.io/service-name": "dual"}},
            "addressType": family, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}


class DualStack:
    """An agent for node1 with an IPv4 and an IPv6 fake kernel, in simulated time."""

    def __init__(self) -> None:
        self.clock = FakeClock(START)
        self.kernels = {family: FakeNetfilter() for family in IPFamily}
        self.engines = FamilyEngines(Engine(self.kernels[family], SETTINGS.for_family(family))
                                     for family in IPFamily)
        self.source = ScriptedSource([dual_service(), dual_slice("IPv4", "10.0.1.20"),
                                      dual_slice("IPv6", "fd00:10:244:1::20")])
        self.health = HealthState(5.0, clock=self.clock.time)
        self.agent = Agent(self.engines, [self.source], clock=self.clock, health=self.health,
                           timing=Timing(min_sync_period=1.0, sync_period=600.0,
                                         canary_interval=600.0))

    def run_until(self, seconds: float) -> None:
        self.clock.call_at(START + seconds, self.agent.stop)
        self.agent.run()

    def endpoints(self, family: IPFamily) -> list[str]:
        """The DNAT targets the family's kernel holds for default/dual."""
        nat = self.kernels[family].save(["nat"])["nat"].chains
        return sorted(rule.split("--to-destination ")[1] for chain, rules in nat.items()
                      if chain.startswith("KUBE-SEP-") for rule in rules
                      if "--to-destination" in rule)

    def metric(self, name: str, **labels: str) -> float:
        return self.agent.metrics.registry.get_sample_value(name, labels) or 0.0


def test_each_family_gets_its_half_of_a_dual_stack_service() -> None:
    """The first sync writes the IPv4 half into the IPv4 kernel and the IPv6 half into the
    IPv6 kernel; /healthz is healthy in both; the metrics carry each family's label."""
    node = DualStack()
    node.run_until(2.0)
    assert (["10.0.1.20:8080"], ["[fd00:10:244:1::20]:8080"]) == (
        node.endpoints(IPFamily.IPV4), node.endpoints(IPFamily.IPV6))
    assert {"IPv4": True, "IPv6": True} == {
        family: status["healthy"] for family, status in node.health.body()["status"].items()}
    assert (1.0, 1.0) == tuple(node.metric("iptsync_syncs_total", kind="full",
                                           result="success", ip_family=family.value)
                               for family in IPFamily)
    assert all(node.metric("kubeproxy_sync_proxy_rules_iptables_total", table="nat",
                           ip_family=family.value) > 0 for family in IPFamily)


def test_a_failing_family_is_retried_alone_and_turns_healthz_stale(
        caplog: pytest.LogCaptureFixture) -> None:
    """While the IPv6 kernel rejects every batch, IPv4 is synced and keeps taking changes;
    IPv6 is retried in full every second, its failures counted under its own label; /healthz
    turns unhealthy once IPv6's first sync is owed for longer than the timeout, naming IPv6;
    when IPv6 accepts again, both hold every change and /healthz recovers."""
    node = DualStack()
    ipv6 = node.kernels[IPFamily.IPV6]
    for _ in range(100):
        ipv6.fail_restore(table="nat")
    seen: dict[float, tuple[Any, ...]] = {}

    def look(at: float) -> None:
        status = node.health.body()["status"]
        seen[at] = (node.endpoints(IPFamily.IPV4), node.endpoints(IPFamily.IPV6),
                    {family: s["healthy"] for family, s in status.items()})

    def at(seconds: float, action: Any) -> None:
        node.clock.call_at(START + seconds, action)

    at(3.5, lambda: node.source.upsert(dual_slice("IPv4", "10.0.1.20", "10.0.1.21")))
    at(4.9, lambda: look(4.9))
    at(6.5, lambda: look(6.5))
    at(6.6, ipv6.failures.clear)
    at(6.7, lambda: node.source.upsert(
        dual_slice("IPv6", "fd00:10:244:1::20", "fd00:10:244:1::21")))
    node.run_until(9.0)
    look(9.0)

    both_v4 = ["10.0.1.20:8080", "10.0.1.21:8080"]
    assert {4.9: (both_v4, [], {"IPv4": True, "IPv6": True}),
            6.5: (both_v4, [], {"IPv4": True, "IPv6": False}),
            9.0: (both_v4, ["[fd00:10:244:1::20]:8080", "[fd00:10:244:1::21]:8080"],
                  {"IPv4": True, "IPv6": True})} == seen
    assert (1.0, 1.0, 0.0) == (
        node.metric("iptsync_syncs_total", kind="full", result="success", ip_family="IPv4"),
        node.metric("iptsync_syncs_total", kind="partial", result="success", ip_family="IPv4"),
        node.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                    ip_family="IPv4"))
    assert (7.0, 1.0) == (  # at 0, 1, ... 6 s; then the retry at 7 s succeeds
        node.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                    ip_family="IPv6"),
        node.metric("iptsync_syncs_total", kind="full", result="success", ip_family="IPv6"))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert 7 == len(errors)
    assert all(e.startswith("IPv6: full sync failed, the previous rules are in place; "
                            "retrying in full in 1.0s") for e in errors)


def test_problems_are_reported_once_for_both_families(
        caplog: pytest.LogCaptureFixture) -> None:
    """An invalid object is parsed once: one warning and one problem, not one per family;
    listing without it drops the problem."""
    node = DualStack()
    bad = dual_service()
    bad["metadata"]["name"] = "bad"
    bad["spec"]["clusterIPs"] = ["10.96.0.30", "10.96.0.31"]
    node.source.objects.append(bad)
    node.run_until(1.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 == len([w for w in warnings if "default/bad" in w])
    assert [("Service", "default", "bad")] == list(node.engines.problems)
    assert 1.0 == node.metric("iptsync_invalid_objects", kind="Service")
    node.engines.replace_kind("Service", [dual_service()])
    assert {} == node.engines.problems


def test_a_slice_of_a_family_not_programmed_leaves_the_others_alone() -> None:
    """On an IPv4-only node an IPv6 EndpointSlice change costs IPv4 nothing: no sync, and no
    change owed, so /healthz stays healthy however long IPv4 has nothing to sync."""
    clock = FakeClock(START)
    engine = Engine(FakeNetfilter(), SETTINGS.for_family(IPFamily.IPV4))
    source = ScriptedSource([dual_service(), dual_slice("IPv4", "10.0.1.20")])
    health = HealthState(5.0, clock=clock.time)
    agent = Agent(engine, [source], clock=clock, health=health,
                  timing=Timing(min_sync_period=1.0, sync_period=600.0, canary_interval=600.0))
    for second in (2.0, 3.0):
        clock.call_at(START + second, lambda: source.upsert(
            dual_slice("IPv6", "fd00:10:244:1::20")))
    clock.call_at(START + 12.0, agent.stop)
    agent.run()
    assert (True, ["IPv4"]) == (health.healthy(), list(health.body()["status"]))
    assert 1.0 == (agent.metrics.registry.get_sample_value(
        "iptsync_syncs_total", {"kind": "full", "result": "success", "ip_family": "IPv4"}))
    assert [] == [report for report in agent.reports if not report.full]
