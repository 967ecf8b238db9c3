"""The health, metrics and health check node port listeners start without name resolution.

Python's ``HTTPServer`` looks its own address up (``socket.getfqdn``) when it binds: on a node
whose DNS does not answer yet, as when a node proxy starts, that took 10 s per listener.
The namespace test reproduces such a node: its resolver points at an address in a second
namespace that silently drops DNS queries, and ``/etc/hosts`` does not know the host's name
(both bind-mounted in a private mount namespace; the host's files are untouched).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iptsync.agent.health import (
    ENDPOINT_WEIGHT_HEADER,
    HealthServer,
    HealthState,
    HttpServer,
    MetricsServer,
    ServiceHealth,
    ServiceHealthServers,
)
from iptsync.agent.metrics import Metrics
from iptsync.lab.netns import ip, temporary_netns

STARTS = """
import time
from iptsync.agent.health import HealthServer, HealthState, MetricsServer
from iptsync.agent.metrics import Metrics
started = time.monotonic()
health = HealthServer(("0.0.0.0", 0), HealthState(60.0))
metrics = MetricsServer(("0.0.0.0", 0), Metrics().registry, HealthState(60.0))
print(round(time.monotonic() - started, 2))
"""


def answer(port: int, path: str = "/livez") -> tuple[int, str | None]:
    """Status and X-Load-Balancing-Endpoint-Weight header of a GET."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status), response.headers.get(ENDPOINT_WEIGHT_HEADER)
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get(ENDPOINT_WEIGHT_HEADER)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_listeners_never_ask_for_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Health, metrics and health check node port servers bind and answer with
    ``socket.getfqdn`` failing: they never look a name up. A health check node port sends
    the local endpoint count as X-Load-Balancing-Endpoint-Weight."""
    def no_lookup(*_args: Any) -> str:
        raise AssertionError("getfqdn called")

    monkeypatch.setattr("socket.getfqdn", no_lookup)
    state = HealthState(60.0)
    servers: list[HttpServer] = [HealthServer(("127.0.0.1", 0), state),
                                 MetricsServer(("127.0.0.1", 0), Metrics().registry, state)]
    node_ports = ServiceHealthServers("127.0.0.1")
    port = free_port()
    try:
        assert [(200, None), (200, None)] == [answer(server.port) for server in servers]
        node_ports.update({port: ServiceHealth("default", "web", 3)})
        assert (200, "3") == answer(port, "/")
        node_ports.update({port: ServiceHealth("default", "web", 0)})
        assert (503, "0") == answer(port, "/")
    finally:
        node_ports.close()
        for server in servers:
            server.close()


@pytest.fixture
def silent_dns(netns: str, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """``netns`` whose resolver (10.254.0.53, in a second namespace) drops every query; a
    resolv.conf naming it and a hosts file without the host's name."""
    with temporary_netns(f"{netns}-dns") as sink:
        ip(netns, "link", "add", "dnsq0", "type", "veth", "peer", "name", "dnsq1",
           "netns", sink)
        ip(netns, "addr", "add", "10.254.0.2/24", "dev", "dnsq0")
        ip(netns, "link", "set", "dnsq0", "up")
        ip(sink, "addr", "add", "10.254.0.53/24", "dev", "dnsq1")
        ip(sink, "link", "set", "dnsq1", "up")
        subprocess.run(["ip", "netns", "exec", sink, "iptables-nft", "-A", "INPUT", "-p", "udp",
                        "--dport", "53", "-j", "DROP"], check=True)
        resolv, hosts = tmp_path / "resolv.conf", tmp_path / "hosts"
        resolv.write_text("nameserver 10.254.0.53\n")
        hosts.write_text("127.0.0.1 localhost\n")
        yield netns, resolv, hosts


def test_listeners_start_at_once_where_dns_does_not_answer(
        silent_dns: tuple[str, Path, Path]) -> None:
    """With a resolver that never answers, the health and metrics servers on 0.0.0.0 start
    within a second (Python's own HTTPServer took 10 s each there)."""
    netns, resolv, hosts = silent_dns
    script = (f"mount --bind {resolv} /etc/resolv.conf && mount --bind {hosts} /etc/hosts "
              f"&& exec {sys.executable} -c '{STARTS}'")
    result = subprocess.run(["ip", "netns", "exec", netns, "unshare", "-m", "sh", "-c", script],
                            capture_output=True, text=True, check=False, timeout=120)
    assert 0 == result.returncode, result.stderr
    assert float(result.stdout) < 1.0


SERVES_BOTH_FAMILIES = """
import urllib.request
from iptsync.agent.health import HttpServer, Reply
server = HttpServer(("", 0), lambda path: Reply(200, "text/plain", b"ok"))
named = HttpServer(("::1", 0), lambda path: Reply(200, "text/plain", b"v6"))
for url in (f"http://127.0.0.1:{server.port}/", f"http://[::1]:{server.port}/",
            f"http://[::1]:{named.port}/"):
    print(urllib.request.urlopen(url, timeout=5).read().decode())
"""


@pytest.mark.netns
def test_empty_host_listens_on_both_families_and_ipv6_hosts_bind(netns: str) -> None:
    """An empty host (health check node ports) answers on IPv4 and IPv6 loopback, as Go's
    ":port" does; an IPv6 host ("[::1]:10256") binds IPv6."""
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c",
                             SERVES_BOTH_FAMILIES], capture_output=True, text=True,
                            check=False, timeout=60)
    assert ["ok", "ok", "v6"] == result.stdout.split(), result.stderr
