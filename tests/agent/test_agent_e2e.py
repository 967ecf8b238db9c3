"""The agent end to end: the real kubernetes client watching a fake API server over HTTP,
rules applied to a namespace node, and real connections through them, on both backends.

Conventions (the data-plane tests' address plan): node1 10.100.0.2, node2 10.100.0.3;
pods web-a 10.0.1.10 (node1), web-b 10.0.2.10 (node2), client1 10.0.1.3 (node1); services
in 10.96.0.0/12. The agent runs for node1 in a thread of the test process: its rules go into
node1's namespace (``ip netns exec``), its HTTP client stays on the host's loopback, where
the fake API server listens. Conntrack cleanup is off (it would act on the host's table).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from apiserver import FakeApiServer, manifest

from iptsync.agent.health import HealthServer, HealthState, MetricsServer, ServiceHealthServers
from iptsync.agent.loop import Agent, Timing
from iptsync.agent.metrics import Metrics
from iptsync.core import names
from iptsync.core.policy import Settings
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Backend, Netfilter
from iptsync.lab.topology import Cluster, ClusterSpec, PodSpec, cleanup_stale
from iptsync.sources.api import ApiSettings, ApiSource

from .waiting import eventually

pytestmark = pytest.mark.netns

PODS = {"web-a": ("node1", "10.0.1.10"), "web-b": ("node2", "10.0.2.10"),
        "client1": ("node1", "10.0.1.3")}
SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))
HEALTH_CHECK_PORT = 32123  # on the host's loopback only
CONVERGE = 10.0  # seconds within which a change must show in traffic (generous: CI load)


@pytest.fixture(scope="module", params=[Backend.NFT, Backend.LEGACY], ids=["nft", "legacy"])
def cluster(request: pytest.FixtureRequest,
            netns_available: None) -> Iterator[tuple[Cluster, Backend]]:
    cleanup_stale()
    spec = ClusterSpec(pods=tuple(PodSpec(name, node, ip) for name, (node, ip) in PODS.items()))
    with Cluster(spec) as built:
        yield built, request.param


class RunningAgent:
    """The agent for node1, its API server, and what a test looks at."""

    def __init__(self, cluster: Cluster, backend: Backend, server: FakeApiServer) -> None:
        self.cluster = cluster
        self.server = server
        self.netfilter = Netfilter(backend, netns=cluster.ns("node1"))
        self.netfilter.restore("*filter\nCOMMIT\n*nat\nCOMMIT\n", noflush=False)
        self.client = server.api_client()
        self.client.configuration.retries = 0  # as ApiSource sets on clients it builds
        self.source = ApiSource("node1", api_client=self.client, settings=ApiSettings(
            min_watch_timeout=5, request_timeout=2.0, backoff_initial=0.05, backoff_max=0.5))
        self.metrics = Metrics()
        self.health = HealthState(2.0)
        self.health_server = HealthServer(("127.0.0.1", 0), self.health, self.metrics)
        self.metrics_server = MetricsServer(("127.0.0.1", 0), self.metrics.registry, self.health)
        self.engine = Engine(self.netfilter, SETTINGS)
        self.agent = Agent(self.engine, [self.source],
                           timing=Timing(min_sync_period=0.2, sync_period=1.0,
                                         canary_interval=0.3),
                           metrics=self.metrics, health=self.health,
                           service_health=ServiceHealthServers("127.0.0.1", self.health.healthy))
        self.thread = threading.Thread(target=self.agent.run, name="agent", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the agent did not stop"
        self.health_server.close()
        self.metrics_server.close()
        self.client.close()

    def servers(self, ip: str, port: int, count: int = 12, source: str = "pod:client1",
                ) -> set[str | None]:
        replies = self.cluster.ask(source, "tcp", ip, port, count=count, timeout=0.5)
        return {r.server if r.ok else r.error for r in replies}

    def http(self, server: HealthServer | MetricsServer | int, path: str) -> tuple[int, str]:
        port = server if isinstance(server, int) else server.port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError:
            return 0, ""  # nothing listens

    def header(self, port: int, path: str, name: str) -> str | None:
        """One response header of a GET (whatever the status)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return resp.headers.get(name)
        except urllib.error.HTTPError as err:
            return err.headers.get(name)

    def metric(self, name: str) -> float:
        _status, text = self.http(self.metrics_server, "/metrics")
        values = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith(name + " ") or line.startswith(name + "{")]
        return sum(values)

    def nat(self) -> dict[str, list[str]]:
        return self.netfilter.save()["nat"].chains


def node1(**fields: Any) -> dict[str, Any]:
    return manifest("Node", "node1", status={
        "addresses": [{"type": "InternalIP", "address": "10.100.0.2"}]}, **fields)


@pytest.fixture
def running(cluster: tuple[Cluster, Backend]) -> Iterator[RunningAgent]:
    with FakeApiServer(bookmark_interval=0.5) as server:
        server.create(node1())
        agent = RunningAgent(*cluster, server)
        try:
            yield agent
        finally:
            agent.close()



def web_service(name: str = "web", cluster_ip: str = "10.96.0.50",
                labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return manifest("Service", name, "default", metadata={"labels": labels or {}}, spec={
        "clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                            "protocol": "TCP"}], **spec})


def web_slice(pods: list[str], name: str = "web", trigger: str | None = None) -> dict[str, Any]:
    annotations = {"endpoints.kubernetes.io/last-change-trigger-time": trigger} if trigger else {}
    return manifest("EndpointSlice", f"{name}-1", "default", metadata={
        "labels": {"kubernetes.io/service-name": name}, "annotations": annotations},
        addressType="IPv4", ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
        endpoints=[{"addresses": [PODS[p][1]], "nodeName": PODS[p][0],
                    "conditions": {"ready": True}} for p in pods])


def test_create_scale_and_delete_change_real_traffic(running: RunningAgent) -> None:
    """A Service created, scaled and deleted in the API reaches real connections in seconds."""
    eventually(lambda: running.agent.ready and running.engine.synced_once)
    started = time.monotonic()
    running.server.create(web_service())
    running.server.create(web_slice(["web-a", "web-b"]))
    assert {"web-a", "web-b"} == eventually(
        lambda: (s := running.servers("10.96.0.50", 80)) == {"web-a", "web-b"} and s)
    created_after = time.monotonic() - started

    running.server.update(web_slice(["web-b"]))
    assert {"web-b"} == eventually(lambda: (s := running.servers("10.96.0.50", 80)) == {"web-b"}
                                   and s)
    running.server.update(web_slice([]))  # no endpoints: REJECT
    assert {"refused"} == eventually(
        lambda: (s := running.servers("10.96.0.50", 80, count=2)) == {"refused"} and s)
    running.server.delete("Service", "default", "web")
    eventually(lambda: names.svc_chain("default/web:http", "tcp") not in running.nat()
               and "10.96.0.50" not in running.netfilter.save_text("nat"))
    assert created_after < CONVERGE
    assert running.metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") >= 2


def test_api_outage_changes_nothing_and_a_relist_converges(running: RunningAgent) -> None:
    """While the API is down the rules stay; after a 410 relist, deletes made meanwhile apply."""
    running.server.create(web_service())
    running.server.create(web_slice(["web-a"]))
    eventually(lambda: running.servers("10.96.0.50", 80) == {"web-a"})
    before = running.nat()

    running.server.stop()
    eventually(lambda: not running.source.status.connected)
    time.sleep(2.5)  # two sync periods: full syncs run, with nothing new to apply
    assert before == running.nat()
    assert {"web-a"} == running.servers("10.96.0.50", 80)
    assert 0 == running.metric("iptsync_source_connected")

    # What happened while the agent was away: the service is gone and history is compacted.
    running.server.delete("Service", "default", "web")
    running.server.delete("EndpointSlice", "default", "web-1")
    running.server.create(web_service("other", "10.96.0.51"))
    running.server.create(web_slice(["web-b"], name="other"))
    running.server.compact()
    running.server.start()
    assert {"web-b"} == eventually(
        lambda: (s := running.servers("10.96.0.51", 80)) == {"web-b"} and s)
    eventually(lambda: names.svc_chain("default/web:http", "tcp") not in running.nat())
    assert not {"web-a", "web-b"} & running.servers("10.96.0.50", 80, count=2)
    assert running.source.status.relists >= 1


@pytest.mark.parametrize("damage", [
    ("-t", "nat", "-X", names.KUBE_PROXY_CANARY),
    ("-t", "nat", "-F"),
], ids=["canary-deleted", "nat-flushed"])
def test_deleted_canary_or_flushed_nat_table_is_repaired(running: RunningAgent,
                                                         damage: tuple[str, ...]) -> None:
    """Someone deleting our canary or flushing nat gets the rules back within seconds."""
    # Only the canary may notice: no periodic full sync during this test.
    running.agent.timing = Timing(min_sync_period=0.2, sync_period=600.0, canary_interval=0.3)
    running.server.create(web_service())
    running.server.create(web_slice(["web-a", "web-b"]))
    eventually(lambda: running.servers("10.96.0.50", 80) == {"web-a", "web-b"})
    expected = running.nat()
    running.netfilter.run(*damage)
    if damage[-1] == "-F":
        running.netfilter.run("-t", "nat", "-X")
    eventually(lambda: running.nat() == expected)
    assert {"web-a", "web-b"} == running.servers("10.96.0.50", 80)
    assert running.metric("iptsync_canary_missing_total") >= 1


def test_changed_rule_is_counted_as_drift_and_repaired(running: RunningAgent) -> None:
    """A rule removed from one of our service chains is put back by the periodic full sync,
    and the drift metric names its table."""
    running.server.create(web_service())
    running.server.create(web_slice(["web-a", "web-b"]))
    eventually(lambda: running.servers("10.96.0.50", 80) == {"web-a", "web-b"})
    expected = running.nat()
    svc = names.svc_chain("default/web:http", "tcp")
    running.netfilter.run("-t", "nat", "-D", svc, "2")
    eventually(lambda: running.nat() == expected)
    assert running.metric('iptsync_drift_repairs_total{ip_family="IPv4",table="nat"}') >= 1


def test_health_metrics_and_health_check_node_port(running: RunningAgent) -> None:
    """/healthz turns 200 after the first sync; an ETP=Local service's health check port says
    whether this node has local endpoints; metrics carry kube-proxy's names."""
    eventually(lambda: running.engine.synced_once)
    status, body = running.http(running.health_server, "/healthz")
    assert 200 == status
    assert {"lastUpdated", "currentTime", "nodeEligible"} <= set(json.loads(body))
    trigger = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    running.server.create(web_service(type="LoadBalancer", externalTrafficPolicy="Local",
                                      healthCheckNodePort=HEALTH_CHECK_PORT,
                                      ports=[{"name": "http", "port": 80, "targetPort": 8080,
                                              "protocol": "TCP", "nodePort": 30080}]))
    running.server.create(web_slice(["web-b"], trigger=trigger))
    eventually(lambda: running.http(HEALTH_CHECK_PORT, "/")[0] == 503)
    status, body = running.http(HEALTH_CHECK_PORT, "/")
    assert {"service": {"namespace": "default", "name": "web"}, "localEndpoints": 0,
            "serviceProxyHealthy": True} == json.loads(body)
    assert "0" == running.header(HEALTH_CHECK_PORT, "/", "X-Load-Balancing-Endpoint-Weight")
    assert 1 == running.metric(
        'kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family="IPv4",traffic_policy="external"}')
    running.server.update(web_slice(["web-a", "web-b"]))
    eventually(lambda: running.http(HEALTH_CHECK_PORT, "/")[0] == 200)
    assert 1 == json.loads(running.http(HEALTH_CHECK_PORT, "/")[1])["localEndpoints"]
    assert "1" == running.header(HEALTH_CHECK_PORT, "/", "X-Load-Balancing-Endpoint-Weight")
    assert 0 == running.metric("kubeproxy_sync_proxy_rules_no_local_endpoints_total")
    assert running.metric("kubeproxy_network_programming_duration_seconds_count") >= 1
    assert running.metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0
    assert running.metric(
        'kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"}') > 0
    running.server.delete("Service", "default", "web")
    eventually(lambda: running.http(HEALTH_CHECK_PORT, "/")[0] == 0)


def test_healthz_fails_while_the_node_drains_and_livez_does_not(running: RunningAgent) -> None:
    """/healthz answers 503 (nodeEligible false) while node1 has the cluster autoscaler's
    taint, while it is being deleted and once its Node object is gone, and 200 again when
    the taint goes and the Node is back; /livez answers 200 throughout. Both are counted
    under kube-proxy's metric names."""
    eventually(lambda: running.engine.synced_once)

    def probe() -> tuple[int, bool, int]:
        status, body = running.http(running.health_server, "/healthz")
        return status, json.loads(body)["nodeEligible"], running.http(
            running.health_server, "/livez")[0]

    assert (200, True, 200) == probe()
    taint = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1764590000",
             "effect": "NoSchedule"}
    running.server.update(node1(spec={"taints": [taint]}))
    assert (503, False, 200) == eventually(lambda: (p := probe())[0] == 503 and p)
    running.server.update(node1(spec={"taints": []}))
    assert (200, True, 200) == eventually(lambda: (p := probe())[0] == 200 and p)
    running.server.update(node1(metadata={"deletionTimestamp": "2026-12-01T12:00:00Z",
                                          "finalizers": ["example.com/hold"]}))
    assert (503, False, 200) == eventually(lambda: (p := probe())[0] == 503 and p)
    running.server.delete("Node", None, "node1")
    time.sleep(0.5)  # the DELETED event arrives, and must not make the node eligible
    assert (503, False, 200) == probe()
    running.server.create(node1())
    assert (200, True, 200) == eventually(lambda: (p := probe())[0] == 200 and p)
    assert running.metric('kubeproxy_proxy_healthz_total{code="503"}') >= 3
    assert running.metric('kubeproxy_proxy_healthz_total{code="200"}') >= 3
    assert 0 == running.metric('kubeproxy_proxy_livez_total{code="503"}')
    assert running.metric('kubeproxy_proxy_livez_total{code="200"}') >= 6


def test_service_labelled_for_another_proxy_gets_no_rules(running: RunningAgent) -> None:
    """A Service labelled service.kubernetes.io/service-proxy-name gets no rule; one that
    gains the label loses its rules and its traffic; the slices of a headless Service
    (labelled service.kubernetes.io/headless) are never read."""
    other = {"service.kubernetes.io/service-proxy-name": "other-proxy"}
    running.server.create(web_service("mesh", "10.96.0.60", other))
    running.server.create(web_slice(["web-a"], name="mesh"))
    running.server.create(web_service())
    running.server.create(web_slice(["web-a", "web-b"]))
    headless = web_slice(["web-b"], name="db")
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = ""
    running.server.create(headless)
    assert {"web-a", "web-b"} == eventually(
        lambda: (s := running.servers("10.96.0.50", 80)) == {"web-a", "web-b"} and s)
    nat = running.netfilter.save_text("nat")
    assert [] == [text for text in ("10.96.0.60", "default/mesh", "default/db") if text in nat]
    running.server.update(web_service(labels=other))
    eventually(lambda: "10.96.0.50" not in running.netfilter.save_text("nat")
               and "10.96.0.50" not in running.netfilter.save_text("filter"))
    assert {"web-a", "web-b"}.isdisjoint(running.servers("10.96.0.50", 80, count=2))


def test_rules_written_by_the_last_sync_are_counted_per_table(running: RunningAgent) -> None:
    """sync_proxy_rules_iptables_last counts the rules the last sync wrote: some after a
    Service appears, none after a periodic full sync that found nothing to change."""
    running.server.create(web_service())
    running.server.create(web_slice(["web-a"]))
    eventually(lambda: running.metric(
        'kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="nat"}') > 0)
    eventually(lambda: running.metric("kubeproxy_sync_proxy_rules_iptables_last") == 0)
    assert running.metric(
        'kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"}') > 0
