"""Tests of the namespace lab itself: connectivity, pod lifecycle, teardown, host isolation.

No iptables rules are involved here; these tests establish that the test-bed the data-plane
tests build on routes packets like a cluster and cleans up after itself.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from iptsync.lab import netns
from iptsync.lab.echo import classify_error, parse_reply
from iptsync.lab.topology import (
    Cluster,
    ClusterSpec,
    NodeSpec,
    PodSpec,
    Reply,
    cleanup_stale,
    default_nodes,
)

needs_netns = pytest.mark.netns


def _unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def _echo_processes_named(name: str) -> list[int]:
    """PIDs of live ``iptsync.lab.echo serve`` processes whose command line names ``name``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"iptsync.lab.echo" in argv and name.encode() in argv:
            pids.append(int(entry.name))
    return pids


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _host_snapshot() -> dict[str, str]:
    """Read-only view of the host network namespace's links, addresses, routes and sysctls."""
    snap = {}
    for what in (["link"], ["-4", "addr"], ["-6", "addr"], ["-4", "route"], ["-6", "route"]):
        out = subprocess.run(["ip", "-o", *what], capture_output=True, text=True, check=True)
        # address lifetimes count down on their own; everything else must stay as it was
        snap[" ".join(what)] = re.sub(r"(valid|preferred)_lft \S+", "", out.stdout)
    for key in (
        "ipv4/ip_forward",
        "ipv4/conf/all/rp_filter",
        "ipv4/icmp_ratelimit",
        "ipv4/icmp_ratemask",
        "ipv6/icmp/ratelimit",
        "ipv6/conf/all/forwarding",
        "ipv6/conf/all/accept_dad",
        "ipv6/conf/default/accept_dad",
        "ipv6/conf/all/disable_ipv6",
        "ipv6/conf/default/accept_ra",
    ):
        snap[key] = Path("/proc/sys/net", key).read_text()
    return snap


# --------------------------------------------------------------------------- pure helpers


def test_require_netns_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """IPTSYNC_REQUIRE_NETNS=1 (and only "1") turns a missing-netns skip into a failure."""
    monkeypatch.setenv(netns.REQUIRE_NETNS_ENV, "1")
    assert netns.netns_required()
    monkeypatch.setenv(netns.REQUIRE_NETNS_ENV, "0")
    assert not netns.netns_required()
    monkeypatch.delenv(netns.REQUIRE_NETNS_ENV)
    assert not netns.netns_required()


def test_error_words_match_rule_outcomes() -> None:
    """REJECT's ECONNREFUSED is "refused", DROP's timeout is "timeout", ICMP unreachables too."""
    assert classify_error(ConnectionRefusedError(errno.ECONNREFUSED, "x")) == "refused"
    assert classify_error(TimeoutError("timed out")) == "timeout"
    assert classify_error(OSError(errno.EHOSTUNREACH, "x")) == "unreachable"
    assert classify_error(OSError(errno.ENETUNREACH, "x")) == "unreachable"
    assert classify_error(ConnectionResetError(errno.ECONNRESET, "x")) == "reset"
    assert classify_error(OSError(errno.EPERM, "x")) == "eperm"


def test_reply_parsing_round_trip() -> None:
    """A server line becomes a Reply with server name and the source address it saw."""
    obj = parse_reply(b"server1 10.0.1.10:40000\n")
    assert Reply.from_json(obj) == Reply(True, "server1", "10.0.1.10", 40000, None)
    obj6 = parse_reply(b"server1 [fd00:10:244:1::10]:40000\n")
    assert {"ok": True, "server": "server1", "seen_as": "[fd00:10:244:1::10]:40000"} == obj6
    assert Reply(True, "server1", "fd00:10:244:1::10", 40000, None) == Reply.from_json(obj6)
    assert Reply.from_json({"ok": False, "error": "timeout"}) == Reply(ok=False, error="timeout")
    assert parse_reply(b"garbage")["ok"] is False


def test_interface_names_are_limited_to_15_chars() -> None:
    """Interface names longer than the kernel's 15 characters are rejected before use."""
    assert netns.check_ifname("vp123") == "vp123"
    with pytest.raises(ValueError, match="invalid interface name"):
        netns.check_ifname("x" * 16)


def test_default_nodes_are_dual_stack() -> None:
    """node1 and node2 get an IPv6 address and an IPv6 pod CIDR beside their IPv4 ones."""
    assert (NodeSpec("node1", "10.100.0.2", "10.0.1.0/24", "fd00:100::2", "fd00:10:244:1::/64"),
            NodeSpec("node2", "10.100.0.3", "10.0.2.0/24", "fd00:100::3",
                     "fd00:10:244:2::/64")) == default_nodes(2)


def test_spec_rejects_half_a_second_family_and_overlapping_ipv6_pod_cidrs() -> None:
    """A node needs both IPv6 fields or neither; IPv6 pod CIDRs may not overlap either."""
    half = (NodeSpec("a", "10.100.0.2", "10.0.1.0/24", ip6="fd00:100::2"),)
    with pytest.raises(ValueError, match="node a: give both an IPv6 address and an IPv6 pod"):
        Cluster(ClusterSpec(nodes=half))
    nodes = (NodeSpec("a", "10.100.0.2", "10.0.1.0/24", "fd00:100::2", "fd00:10:244:1::/64"),
             NodeSpec("b", "10.100.0.3", "10.0.2.0/24", "fd00:100::3", "fd00:10:244::/60"))
    with pytest.raises(ValueError, match=r"node b: pod CIDR fd00:10:244::/60 .* overlapping"):
        Cluster(ClusterSpec(nodes=nodes))


def test_spec_rejects_overlapping_pod_cidrs() -> None:
    """Two nodes may not share pod address space (routing between them would be ambiguous)."""
    nodes = (NodeSpec("a", "10.100.0.2", "10.0.1.0/24"), NodeSpec("b", "10.100.0.3", "10.0.1.0/25"))
    with pytest.raises(ValueError, match="overlapping"):
        Cluster(ClusterSpec(nodes=nodes))


# --------------------------------------------------------------------------- in namespaces


@needs_netns
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pod_reaches_pod_on_other_node(cluster: Cluster, proto: str) -> None:
    """A pod on node1 reaches a pod on node2, and the server sees the client pod's own IP."""
    replies = cluster.ask("pod:client1", proto, cluster.pod_ip("server1"), 8080, count=5)
    assert [r.ok for r in replies] == [True] * 5
    assert {r.server for r in replies} == {"server1"}
    assert {r.seen_as_ip for r in replies} == {cluster.pod_ip("client1")}
    assert len({r.seen_as_port for r in replies}) == 5  # independent requests, new source ports


@needs_netns
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pod_reaches_pod_on_other_node_over_ipv6(cluster: Cluster, proto: str) -> None:
    """The same over IPv6, at once after building (no duplicate address detection to wait
    for): the server sees the client pod's own IPv6 address."""
    replies = cluster.ask("pod:client1", proto, cluster.pod_ip6("server1"), 8080, count=3)
    assert [(True, "server1", cluster.pod_ip6("client1"))] * 3 == [
        (r.ok, r.server, r.seen_as_ip) for r in replies]


@needs_netns
def test_no_address_is_tentative_and_the_second_family_is_wired(cluster: Cluster) -> None:
    """Every IPv6 address in every namespace is usable (none tentative, DAD off); pods have
    PODIP6/128 behind fe80::1, nodes forward IPv6 and route each other's IPv6 pod CIDR."""
    for key in cluster.namespaces:
        addrs = cluster.exec(key, ["ip", "-o", "-6", "addr"]).stdout
        assert "tentative" not in addrs, (key, addrs)
        assert ["0", "0"] == cluster.exec(key, ["sysctl", "-n", "net.ipv6.conf.all.accept_dad",
                                                "net.ipv6.conf.default.accept_dad"]
                                          ).stdout.split()
    pod = cluster.pod("client1")
    assert "fd00:10:244:1::10" == pod.ip6  # 10.0.1.10's last number, as hex digits
    addrs = cluster.exec(pod.ns, ["ip", "-o", "-6", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet6 {pod.ip6}/128 " in addrs
    assert "default via fe80::1 dev eth0" in cluster.exec(pod.ns, ["ip", "-6", "route"]).stdout
    node_routes = cluster.exec("node1", ["ip", "-6", "route"]).stdout
    assert f"{pod.ip6} dev {pod.host_veth}" in node_routes
    assert "fd00:10:244:2::/64 via fd00:100::3 dev eth0" in node_routes
    assert "default via fd00:100::1 dev eth0" in node_routes
    assert ["1", "0"] == cluster.exec("node1", [
        "sysctl", "-n", "net.ipv6.conf.all.forwarding", f"net.ipv6.conf.{pod.host_veth}.accept_dad",
    ]).stdout.split()


@needs_netns
def test_udp_source_port_is_kept(cluster: Cluster) -> None:
    """With src_port every datagram leaves from that port, so the flow stays one 5-tuple."""
    replies = cluster.ask(
        "pod:client1", "udp", cluster.pod_ip("server1"), 8080, count=3, src_port=40123
    )
    assert [(r.ok, r.seen_as_port) for r in replies] == [(True, 40123)] * 3


@needs_netns
def test_external_client_reaches_node_ip(cluster: Cluster) -> None:
    """The external client reaches a host-network server on node1's IP over TCP and UDP."""
    cluster.start_echo("node1", "node1-host", tcp_ports=(9090,), udp_ports=(9090,))
    for proto in ("tcp", "udp"):
        (reply,) = cluster.ask("client", proto, cluster.node_ip("node1"), 9090)
        assert reply == Reply(True, "node1-host", cluster.client_ip, reply.seen_as_port, None)


@needs_netns
def test_closed_port_is_refused_and_blackhole_times_out(cluster: Cluster) -> None:
    """A closed port answers "refused" (TCP RST / ICMP port unreachable); no route "timeout"."""
    server_ip = cluster.pod_ip("server1")
    for proto in ("tcp", "udp"):
        (reply,) = cluster.ask("pod:client1", proto, server_ip, 8081)
        assert reply == Reply(ok=False, error="refused")
    (reply,) = cluster.ask("pod:client1", "tcp", "10.0.2.250", 8080, timeout=0.3)
    assert reply == Reply(ok=False, error="timeout")


@needs_netns
def test_pod_and_node_wiring(cluster: Cluster) -> None:
    """Pods have PODIP/32 behind 169.254.1.1; nodes route them per veth with proxy ARP on."""
    pod = cluster.pod("client1")
    addrs = cluster.exec("pod:client1", ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet {pod.ip}/32 " in addrs
    routes = cluster.exec(pod.ns, ["ip", "route"]).stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    node_routes = cluster.exec("node1", ["ip", "route"]).stdout
    assert f"{pod.ip} dev {pod.host_veth}" in node_routes
    assert "10.0.2.0/24 via 10.100.0.3 dev eth0" in node_routes
    assert "bridge" not in cluster.exec("node1", ["ip", "-d", "link"]).stdout
    values = cluster.exec(
        "node1",
        [
            "sysctl",
            "-n",
            "net.ipv4.ip_forward",
            "net.ipv4.icmp_ratelimit",
            "net.ipv4.conf.all.rp_filter",
            f"net.ipv4.conf.{pod.host_veth}.proxy_arp",
        ],
    ).stdout.split()
    assert values == ["1", "0", "0", "1"]
    assert cluster.ns("node1") == cluster.ns("node:node1") == f"{cluster.prefix}node-node1"
    assert cluster.client_ns == f"{cluster.prefix}client"


@needs_netns
def test_client_routes_and_node_addresses_on_demand(cluster: Cluster) -> None:
    """route_from_client + add_node_address let the client reach an extra IP owned by a node,
    of either family (the UDP answer comes from the address asked)."""
    cluster.add_node_address("node2", "198.51.100.7", dev="lo")
    cluster.route_from_client("198.51.100.7/32", via_node="node2")
    cluster.add_node_address("node2", "2001:db8:198::7", dev="lo")
    cluster.route_from_client("2001:db8:198::/64", via_node="node2")
    cluster.start_echo("node2", "node2-lb", tcp_ports=(9191,), udp_ports=(9191,))
    for ip, client in (("198.51.100.7", cluster.client_ip), ("2001:db8:198::7",
                                                             cluster.client_ip6)):
        for proto in ("tcp", "udp"):
            (reply,) = cluster.ask("client", proto, ip, 9191)
            assert (True, "node2-lb", client) == (reply.ok, reply.server, reply.seen_as_ip)


@needs_netns
def test_removed_pod_stops_answering(cluster: Cluster) -> None:
    """After remove_pod, requests to that pod fail and its namespace and route are gone."""
    pod = cluster.add_pod("node2", "victim", tcp_ports=(8080,), udp_ports=(8080,))
    assert pod.server is not None
    (before,) = cluster.ask("pod:client1", "tcp", pod.ip, 8080)
    assert before.ok
    assert before.server == "victim"
    cluster.remove_pod("victim")
    for proto in ("tcp", "udp"):
        (after,) = cluster.ask("pod:client1", proto, pod.ip, 8080, timeout=0.3)
        assert not after.ok
        assert after.error in {"timeout", "unreachable"}
    assert pod.ns not in netns.list_netns()
    assert _pid_gone(pod.server.pid)
    assert pod.ip not in cluster.exec("node2", ["ip", "route"]).stdout
    with pytest.raises(KeyError):
        cluster.ns("pod:victim")


@needs_netns
def test_exit_removes_namespaces_and_processes(netns_ok: None) -> None:
    """Leaving the with-block deletes every namespace with the prefix and kills the servers."""
    name = _unique("tmp")
    with Cluster(ClusterSpec(pods=(PodSpec(name, "node1"),))) as lab:
        prefix = lab.prefix
        pids = [s.pid for s in lab.servers]
        assert _echo_processes_named(name) == pids
        assert len([n for n in netns.list_netns() if n.startswith(prefix)]) == 5
    assert [n for n in netns.list_netns() if n.startswith(prefix)] == []
    assert all(_pid_gone(pid) for pid in pids)
    assert _echo_processes_named(name) == []


@needs_netns
def test_exit_cleans_up_when_body_raises(netns_ok: None) -> None:
    """An exception inside the with-block still removes namespaces and servers, and propagates."""
    name = _unique("boom")
    prefix = ""
    with (  # noqa: PT012 - the body must run inside both context managers
        pytest.raises(RuntimeError, match="body failed"),
        Cluster(ClusterSpec(nodes=default_nodes(3))) as lab,
    ):
        prefix = lab.prefix
        lab.add_pod("node3", name)
        lab.start_echo("client", f"{name}-c")
        raise RuntimeError("body failed")
    assert prefix
    assert [n for n in netns.list_netns() if n.startswith(prefix)] == []
    assert _echo_processes_named(name) == []
    assert _echo_processes_named(f"{name}-c") == []


@needs_netns
def test_host_namespace_is_untouched(netns_ok: None) -> None:
    """Building, using and tearing down a cluster leaves the host's links, routes, sysctls alone."""
    before = _host_snapshot()
    with Cluster(ClusterSpec(pods=(PodSpec("a", "node1"), PodSpec("b", "node2")))) as lab:
        lab.route_from_client("203.0.113.0/24")
        lab.add_node_address("node1", "203.0.113.9/32")
        lab.route_from_client("2001:db8:203::/64")
        lab.add_node_address("node1", "2001:db8:203::9")
        assert lab.ask("pod:a", "udp", lab.pod_ip("b"), 8080)[0].ok
        assert lab.ask("pod:a", "udp", lab.pod_ip6("b"), 8080)[0].ok
        assert _host_snapshot() == before
    assert _host_snapshot() == before


@needs_netns
def test_cleanup_stale_only_removes_dead_owners(netns_ok: None) -> None:
    """cleanup_stale() removes namespaces of dead runs and leaves live runs' namespaces alone."""
    proc = subprocess.Popen(["true"])
    proc.wait()  # a PID that no longer exists
    dead = f"ipts{proc.pid}x9-switch"
    alive = f"ipts{os.getpid()}x999999-switch"
    dead_logs = Path(tempfile.gettempdir(), f"ipts{proc.pid}x9-lab-test")
    try:
        netns.add_netns(dead)
        netns.add_netns(alive)
        dead_logs.mkdir()
        removed = cleanup_stale()
        assert dead in removed
        assert not dead_logs.exists()
        assert alive not in removed
        assert alive in netns.list_netns()
        assert cleanup_stale(f"ipts{os.getpid()}x999999-") == [alive]
    finally:
        shutil.rmtree(dead_logs, ignore_errors=True)
        netns.delete_netns(dead)
        netns.delete_netns(alive)
    assert not {dead, alive} & set(netns.list_netns())
