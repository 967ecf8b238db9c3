"""The dual-stack agent end to end: the real kubernetes client watching the fake API server
over HTTP, one engine per IP family writing into one namespace node with iptables and
ip6tables, on both backends.

The agent runs for node1 in a thread of the test process (its HTTP client on the host's
loopback, where the fake API server listens); its rules go into the test's namespace. The
Service ``default/dual`` has cluster IPs 10.96.0.20 and fd00:96::20.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import urllib.request
from typing import Any

from apiserver import FakeApiServer, manifest

from iptsync.agent.health import HealthServer, HealthState, MetricsServer
from iptsync.agent.loop import Agent, Timing
from iptsync.agent.metrics import Metrics
from iptsync.core import names
from iptsync.core.model import IPFamily
from iptsync.core.policy import Settings
from iptsync.engine.families import FamilyEngines
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter
from iptsync.sources.api import ApiSettings, ApiSource

from .waiting import eventually

SETTINGS = Settings(node_name="node1", cluster_cidrs=(
    ipaddress.ip_network("10.0.0.0/14"), ipaddress.ip_network("fd00:10:244::/56")))
SVC = names.svc_chain("default/dual:http", "tcp")


def dual_slice(family: str, address: str) -> dict[str, Any]:
    return manifest("EndpointSlice", f"dual-{family.lower()}", "default", metadata={
        "labels": {"kubernetes.io/service-name": "dual"}}, addressType=family,
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
        endpoints=[{"addresses": [address], "nodeName": "node1",
                    "conditions": {"ready": True}}])


def get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
        return resp.status, resp.read().decode()


def test_dual_stack_service_is_programmed_in_both_families_and_removed(
        netfilter: Netfilter, apiserver: FakeApiServer) -> None:
    """A dual-stack Service created in the API gets its IPv4 rules from iptables and its IPv6
    rules from ip6tables; /healthz reports both families and the metrics label each sync with
    its family; deleting the Service removes both halves."""
    kernels = {IPFamily.IPV4: netfilter,
               IPFamily.IPV6: Netfilter(netfilter.backend, netfilter.netns,
                                        family=IPFamily.IPV6)}
    apiserver.create(manifest("Node", "node1", status={"addresses": [
        {"type": "InternalIP", "address": "10.100.0.2"},
        {"type": "InternalIP", "address": "fd00:100::2"}]}))
    client = apiserver.api_client()
    client.configuration.retries = 0
    source = ApiSource("node1", api_client=client, settings=ApiSettings(
        min_watch_timeout=5, request_timeout=2.0, backoff_initial=0.05, backoff_max=0.5))
    engines = FamilyEngines(Engine(kernels[family], SETTINGS.for_family(family))
                            for family in IPFamily)
    metrics, health = Metrics(), HealthState(2.0, families=["IPv4", "IPv6"])
    servers = [HealthServer(("127.0.0.1", 0), health),
               MetricsServer(("127.0.0.1", 0), metrics.registry, health)]
    agent = Agent(engines, [source], metrics=metrics, health=health,
                  timing=Timing(min_sync_period=0.2, sync_period=1.0, canary_interval=0.3))
    thread = threading.Thread(target=agent.run, name="agent", daemon=True)
    thread.start()

    def chains(family: IPFamily) -> dict[str, list[str]]:
        return kernels[family].save(["nat"])["nat"].chains

    try:
        eventually(lambda: all(e.synced_once for e in engines.engines.values()))
        apiserver.create(manifest("Service", "dual", "default", spec={
            "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"],
            "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}))
        apiserver.create(dual_slice("IPv4", "10.0.1.20"))
        apiserver.create(dual_slice("IPv6", "fd00:10:244:1::20"))
        eventually(lambda: SVC in chains(IPFamily.IPV4) and SVC in chains(IPFamily.IPV6))
        eventually(lambda: any("--to-destination [fd00:10:244:1::20]:8080" in rule
                               for rules in chains(IPFamily.IPV6).values() for rule in rules))
        assert [] == [rule for rules in chains(IPFamily.IPV4).values() for rule in rules
                      if "fd00" in rule]

        status, body = get(servers[0].port, "/healthz")
        assert (200, {"IPv4": True, "IPv6": True}) == (status, {
            family: s["healthy"] for family, s in json.loads(body)["status"].items()})
        text = get(servers[1].port, "/metrics")[1]
        for family in ("IPv4", "IPv6"):
            assert f'kubeproxy_sync_proxy_rules_last_timestamp_seconds{{ip_family="{family}"}}' \
                in text
            assert f'kubeproxy_sync_proxy_rules_iptables_total{{ip_family="{family}",' \
                'table="nat"}' in text

        apiserver.delete("Service", "default", "dual")
        eventually(lambda: SVC not in chains(IPFamily.IPV4) and SVC not in chains(
            IPFamily.IPV6))
    finally:
        agent.stop()
        thread.join(timeout=10)
        for server in servers:
            server.close()
        client.close()
    assert not thread.is_alive()
