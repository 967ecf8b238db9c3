"""A silent partition between the agent and the API server: noticed in seconds, healed in seconds.

Topology, all created by the test and with no link to the host: the node namespace (the
``netfilter`` fixture's, on both backends), where the agent writes its rules and from where its
HTTP client connects as 10.254.0.2; and an API namespace where the fake API server listens on
10.254.0.1, the two joined by a veth pair. The server runs in the test process: its listening
socket is created while the test's thread is moved into the API namespace
(:func:`iptsync.lab.netns.thread_in_netns`), and the agent's thread is started from inside the
node namespace, so every thread it starts (the watches) lives and connects there.

The partition is two DROP rules in the API namespace's filter table (INPUT from the node,
OUTPUT to it): packets vanish and no reset ever arrives, so the watches stay ESTABLISHED. The
server sends no periodic bookmarks, so the watch read timeout stays at timeoutSeconds (5
minutes and more): only TCP keepalive can notice in time. The agent is built the way ``run``
builds it (a kubeconfig; ApiSource makes its own client), with test-sized timings.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import FakeApiServer, manifest

from iptsync.agent.loop import Agent, Timing
from iptsync.agent.metrics import Metrics
from iptsync.core import names
from iptsync.core.policy import Settings
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Backend, Netfilter
from iptsync.lab.netns import add_veth, ip, temporary_netns, thread_in_netns
from iptsync.sources.api import ApiSettings, ApiSource

from .waiting import eventually

pytestmark = pytest.mark.netns

API_IP, NODE_IP = "10.254.0.1", "10.254.0.2"
SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address(NODE_IP),))
# A peer that stops answering is given up after 1 + 1 x 2 = 3 s; connection attempts into
# the partition time out after 2 s; retries come at most 0.5 s apart.
API_SETTINGS = ApiSettings(keepalive_idle=1, keepalive_interval=1, keepalive_count=2,
                           request_timeout=2.0, backoff_initial=0.05, backoff_max=0.5)
HEAL_TARGET = 60.0  # seconds: the bound from healing to the change being programmed


@pytest.fixture
def api_netns(netns: str) -> Iterator[str]:
    """A namespace for the API server, joined to the node namespace ``netns`` by a veth."""
    with temporary_netns(f"{netns}-api") as name:
        add_veth(netns, "to-api", name, "to-node")
        for ns, dev, address in ((netns, "to-api", NODE_IP), (name, "to-node", API_IP)):
            ip(ns, "addr", "add", f"{address}/30", "dev", dev)
            ip(ns, "link", "set", dev, "up")
        yield name


def web(name: str, cluster_ip: str) -> list[dict[str, Any]]:
    """A Service with one port and its EndpointSlice with one ready endpoint."""
    return [
        manifest("Service", name, "default", spec={
            "clusterIP": cluster_ip,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}),
        manifest("EndpointSlice", f"{name}-1", "default",
                 metadata={"labels": {"kubernetes.io/service-name": name}},
                 addressType="IPv4", ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
                 endpoints=[{"addresses": ["10.0.1.10"], "conditions": {"ready": True}}]),
    ]


def programmed(netfilter: Netfilter, name: str) -> bool:
    """Whether the service's SVC chain is in the node's nat table."""
    return names.svc_chain(f"default/{name}:http", "tcp") in netfilter.save()["nat"].chains


def partition(api_netns: str, action: str) -> None:
    """Drop (``-I``) or stop dropping (``-D``) every packet between node and API server."""
    api = Netfilter(Backend.NFT, netns=api_netns)
    api.run(action, "INPUT", "-s", NODE_IP, "-j", "DROP")
    api.run(action, "OUTPUT", "-d", NODE_IP, "-j", "DROP")


def messages(caplog: pytest.LogCaptureFixture, level: int, start: str) -> list[str]:
    """The API source's log messages at ``level`` that begin with ``start``."""
    return [r.getMessage() for r in caplog.records if r.name == "iptsync.sources.api"
            and r.levelno == level and r.getMessage().startswith(start)]


def test_silent_partition_is_noticed_and_a_change_made_meanwhile_is_programmed(
        netfilter: Netfilter, api_netns: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A partition without resets is declared dead within seconds (WARNING, staleness metric
    rising), and a Service created during it is programmed seconds after it heals (INFO)."""
    caplog.set_level(logging.INFO, logger="iptsync.sources.api")
    netfilter.restore("*filter\nCOMMIT\n*nat\nCOMMIT\n", noflush=False)
    server = FakeApiServer(bookmark_interval=None, host=API_IP)
    with thread_in_netns(api_netns):
        server.start()
    metrics = Metrics()
    try:
        server.create(manifest("Node", "node1", status={
            "addresses": [{"type": "InternalIP", "address": NODE_IP}]}))
        source = ApiSource("node1", kubeconfig=server.write_kubeconfig(tmp_path / "kubeconfig"),
                           settings=API_SETTINGS)
        agent = Agent(Engine(netfilter, SETTINGS), [source],
                      timing=Timing(min_sync_period=0.2, sync_period=1.0, canary_interval=0.5),
                      metrics=metrics)
        with thread_in_netns(netfilter.netns or ""):
            thread = threading.Thread(target=agent.run, name="agent", daemon=True)
            thread.start()
        try:
            for obj in web("before", "10.96.0.50"):
                server.create(obj)
            eventually(lambda: programmed(netfilter, "before"), 15.0)

            def staleness() -> float:
                value = metrics.registry.get_sample_value("iptsync_watch_staleness_seconds",
                                                          {"kind": "Service"})
                return -1.0 if value is None else value

            partition(api_netns, "-I")
            cut = time.monotonic()
            for obj in web("during", "10.96.0.51"):
                server.create(obj)
            dead = eventually(lambda: messages(caplog, logging.WARNING,
                                               "watch of Service declared dead"), 20.0)
            noticed_after = time.monotonic() - cut
            assert "(TCP keepalive: the server's host stopped answering)" in dead[0]
            eventually(lambda: staleness() >= 5.0, 20.0)  # reconnects fail meanwhile
            assert not programmed(netfilter, "during")

            partition(api_netns, "-D")
            healed = time.monotonic()
            eventually(lambda: programmed(netfilter, "during"), HEAL_TARGET)
            programmed_after = time.monotonic() - healed
            eventually(lambda: 0.0 <= staleness() < 2.0, 10.0)
            print(f"partition noticed after {noticed_after:.1f} s; change programmed "
                  f"{programmed_after:.1f} s after healing")
            assert (True, True) == (noticed_after < 10.0, programmed_after < HEAL_TARGET)
            assert [] != messages(caplog, logging.INFO, "Service objects listed again")
        finally:
            agent.stop()
            thread.join(timeout=10)
        assert not thread.is_alive(), "the agent did not stop"
    finally:
        server.stop()
    assert [] == server.handler_errors
