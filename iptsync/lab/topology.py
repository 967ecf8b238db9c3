"""A fake Kubernetes cluster made of network namespaces, for data-plane tests and the lab demo.

Why: iptsync's rules only prove themselves when real packets traverse them. This module builds,
on one Linux machine and without touching the host's network namespace, a topology shaped like
a small dual-stack cluster with a Calico-style routed pod network, so every pod packet crosses
its node's netfilter hooks exactly as on a real node::

        switch ns: bridge br0 = 10.100.0.1, fd00:100::1 (the "upstream router"; forwards nothing)
         sw0 |                   sw1 |                     swN |
     eth0 10.100.0.2         eth0 10.100.0.3          eth0 10.100.0.100
          fd00:100::2             fd00:100::3              fd00:100::100
       node1 ns                node2 ns                  client ns
     vp0 |    vp1 |            vp2 |
     pod ns   pod ns           pod ns       each: eth0 = PODIP/32 and PODIP6/128,
     10.0.1.x 10.0.1.y         10.0.2.z           default via 169.254.1.1 and fe80::1
     fd00:10:244:1::x          fd00:10:244:2::z

* Both IP families everywhere: nodes, pods and the client have an IPv4 and an IPv6 address
  (a node given no IPv6 address is IPv4-only, and so are its pods). Duplicate address detection
  is off in every namespace (``accept_dad=0``, ``nodad`` on every address), so addresses are
  usable at once; router advertisements and solicitations are off.
* Nodes: ``ip_forward=1`` and IPv6 ``forwarding=1``, ``rp_filter=0``, ICMP and ICMPv6 rate
  limits off, a route per family to every other node's pod CIDR via that node, and a default
  route per family via the switch (so node-local processes can connect to service VIPs that
  exist only as DNAT rules). Pods hang off their node on a routed veth (no bridge on the node):
  ``PODIP/32 dev vpN`` and ``PODIP6/128 dev vpN`` on the node, proxy ARP on ``vpN`` answering
  for the pod's IPv4 gateway ``169.254.1.1``, and the link-local ``fe80::1`` on every ``vpN``
  as the pod's IPv6 gateway.
* The external client has only its on-link routes; tests add routes for external IPs or
  load-balancer IPs (either family) with :meth:`Cluster.route_from_client`.
* Every pod runs :mod:`iptsync.lab.echo` (TCP and UDP 8080 by default) so :meth:`Cluster.ask`
  can tell which backend answered and which source address it saw.

Namespace names are ``<prefix><role>``, the prefix unique per instance (``ipts<pid>x<n>-``):
``<prefix>switch``, ``<prefix>client``, ``<prefix>node-<node>``, ``<prefix>pod-<pod>``. Code
refers to them by *key*: ``"switch"``, ``"client"``, ``"<node>"`` (or ``"node:<node>"``) and
``"pod:<pod>"``; :meth:`Cluster.ns` turns a key into the namespace name.

Everything is deleted on :meth:`Cluster.close` (called by ``with``, also when the body raised):
processes are killed first, then the namespaces, which takes their veths and routes with them.
:func:`cleanup_stale` removes what a killed run left behind. A ``Cluster`` is not thread-safe.
"""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import itertools
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from iptsync.lab import netns
from iptsync.lab.echo import DEFAULT_PORT, READY_PREFIX, join_host_port, split_host_port

NODE_CIDR = "10.100.0.0/24"
GATEWAY_IP = "10.100.0.1"
CLIENT_IP = "10.100.0.100"
CLUSTER_CIDR = "10.0.0.0/14"
POD_GATEWAY_IP = "169.254.1.1"
NODE_CIDR6 = "fd00:100::/64"
GATEWAY_IP6 = "fd00:100::1"
CLIENT_IP6 = "fd00:100::100"
CLUSTER_CIDR6 = "fd00:10:244::/56"
POD_GATEWAY_IP6 = "fe80::1"
"""The pods' IPv6 gateway: a link-local address on every node-side pod veth."""
READY_TIMEOUT = 15.0
"""Seconds to wait for echo servers to print their ready line."""

PREFIX_RE = re.compile(r"^ipts(\d+)x(\d+)-")
"""Shape of the namespace prefix of a :class:`Cluster`; group 1 is the owning PID."""

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$")
_RESERVED_NODE_NAMES = frozenset({"switch", "client"})
_instance_counter = itertools.count()


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _within(inner: IPNetwork, outer: IPNetwork) -> bool:
    """``inner`` lies inside ``outer`` (two CIDRs overlap exactly when one lies in the other)."""
    return inner.version == outer.version and inner.network_address in outer and (
        inner.broadcast_address in outer)


class LabError(RuntimeError):
    """The lab could not be built, used or torn down as asked."""


def new_prefix() -> str:
    """A namespace-name prefix unique to this process and call: ``ipts<pid>x<n>-``."""
    return f"ipts{os.getpid()}x{next(_instance_counter)}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str | None = None) -> list[str]:
    """Delete leftover lab namespaces (killing what runs in them); return the names deleted.

    With ``prefix``, every namespace whose name starts with it goes. Without, only namespaces
    shaped like a :class:`Cluster` prefix whose owning process no longer exists, so clusters of
    runs still in progress (e.g. parallel test workers) are left alone. The matching temporary
    log directories (``<tmp>/<prefix>lab-*``) are removed too.
    """
    if prefix == "":
        raise ValueError("an empty prefix would match every namespace")

    def stale(name: str) -> bool:
        if prefix is not None:
            return name.startswith(prefix)
        match = PREFIX_RE.match(name)
        return match is not None and not _pid_alive(int(match.group(1)))

    removed: list[str] = []
    for name in netns.list_netns():
        if stale(name):
            netns.delete_netns(name)
            removed.append(name)
    pattern = "ipts*-lab-*" if prefix is None else glob.escape(prefix) + "lab-*"
    for entry in Path(tempfile.gettempdir()).glob(pattern):
        if entry.is_dir() and stale(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------- specification


@dataclass(frozen=True)
class NodeSpec:
    """One node: its name, its IPs on the node network and the pod CIDRs routed to it.

    ``ip6`` and ``pod_cidr6`` are both set (a dual-stack node) or both ``None`` (IPv4 only).
    """

    name: str
    ip: str
    pod_cidr: str
    ip6: str | None = None
    pod_cidr6: str | None = None


def default_nodes(count: int = 2) -> tuple[NodeSpec, ...]:
    """Dual-stack ``node1``..``nodeN`` at 10.100.0.2.. and fd00:100::2.., with pod CIDRs
    10.0.1.0/24 and fd00:10:244:1::/64, 10.0.2.0/24 and fd00:10:244:2::/64, ..."""
    if not 1 <= count <= 250:
        raise ValueError("node count must be between 1 and 250")
    return tuple(
        NodeSpec(name=f"node{i}", ip=f"10.100.0.{i + 1}", pod_cidr=f"10.0.{i}.0/24",
                 ip6=f"fd00:100::{i + 1:x}", pod_cidr6=f"fd00:10:244:{i:x}::/64")
        for i in range(1, count + 1)
    )


@dataclass(frozen=True)
class PodSpec:
    """A pod to create: on ``node``, with ``ip`` (next free in the node's CIDR if ``None``)
    and, on a dual-stack node, ``ip6`` (if ``None``: the IPv4 address's last number written
    as hex digits in the node's IPv6 pod CIDR, so 10.0.1.10 goes with fd00:10:244:1::10)."""

    name: str
    node: str
    ip: str | None = None
    tcp_ports: tuple[int, ...] = (DEFAULT_PORT,)
    udp_ports: tuple[int, ...] = (DEFAULT_PORT,)
    ip6: str | None = None


@dataclass(frozen=True)
class ClusterSpec:
    """Declarative shape of a :class:`Cluster`; the defaults are the documented lab layout."""

    nodes: tuple[NodeSpec, ...] = field(default_factory=default_nodes)
    pods: tuple[PodSpec, ...] = ()
    node_cidr: str = NODE_CIDR
    gateway_ip: str = GATEWAY_IP
    client_ip: str = CLIENT_IP
    cluster_cidr: str = CLUSTER_CIDR
    node_cidr6: str = NODE_CIDR6
    gateway_ip6: str = GATEWAY_IP6
    client_ip6: str = CLIENT_IP6
    cluster_cidr6: str = CLUSTER_CIDR6


# --------------------------------------------------------------------------- runtime objects


@dataclass(frozen=True)
class Reply:
    """Outcome of one request made by :meth:`Cluster.ask`.

    On success ``server`` is the answering echo server's name and ``seen_as_ip``/``seen_as_port``
    the source address it saw; on failure ``error`` is ``"refused"``, ``"timeout"``,
    ``"unreachable"``, ``"reset"`` or another lower-case errno name.
    """

    ok: bool
    server: str | None = None
    seen_as_ip: str | None = None
    seen_as_port: int | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Reply:
        """Build from one JSON object printed by ``python -m iptsync.lab.echo ask``."""
        if not obj.get("ok"):
            return cls(ok=False, error=str(obj.get("error", "unknown")))
        host, port = split_host_port(str(obj["seen_as"]))
        return cls(ok=True, server=str(obj["server"]), seen_as_ip=host, seen_as_port=int(port))


@dataclass(eq=False)
class EchoServer:
    """A running ``iptsync.lab.echo serve`` process inside one namespace."""

    name: str
    ns: str
    tcp_ports: tuple[int, ...]
    udp_ports: tuple[int, ...]
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """PID of the server process."""
        return self.proc.pid

    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc.poll() is None

    def log(self) -> str:
        """What the server wrote to stderr so far (for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the server and reap it (idempotent)."""
        netns.stop_process(self.proc)


@dataclass(frozen=True)
class Pod:
    """A pod: its namespace, IPs, node, the node-side veth and its echo server (if any)."""

    name: str
    node: str
    ip: str
    ns: str
    host_veth: str
    server: EchoServer | None
    ip6: str | None = None


def _spawn_echo(
    ns: str, name: str, tcp_ports: Sequence[int], udp_ports: Sequence[int], log_path: Path
) -> EchoServer:
    args = ["serve", "--name", name, "--bind", "0.0.0.0", "--bind", "::"]
    for port in tcp_ports:
        args += ["--tcp", str(port)]
    for port in udp_ports:
        args += ["--udp", str(port)]
    with log_path.open("wb") as log:
        proc = netns.ns_popen(
            ns,
            netns.python_argv("iptsync.lab.echo", *args),
            stdout=subprocess.PIPE,
            stderr=log,
            env=netns.lab_env(),
        )
    return EchoServer(name, ns, tuple(tcp_ports), tuple(udp_ports), proc, log_path)


def wait_ready(servers: Sequence[EchoServer], timeout: float = READY_TIMEOUT) -> None:
    """Wait until every server printed its ready line; raise :class:`LabError` otherwise."""
    deadline = time.monotonic() + timeout
    pending: dict[int, EchoServer] = {}
    for server in servers:
        assert server.proc.stdout is not None
        pending[server.proc.stdout.fileno()] = server
    buffers: dict[int, bytes] = dict.fromkeys(pending, b"")
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(s.name for s in pending.values())
            raise LabError(f"echo servers not ready after {timeout}s: {names}")
        readable, _, _ = select.select(list(pending), [], [], remaining)
        for fd in readable:
            server = pending[fd]
            chunk = os.read(fd, 4096)
            if not chunk:
                server.proc.wait(timeout=5)
                raise LabError(
                    f"echo server {server.name!r} in {server.ns} exited with status "
                    f"{server.proc.returncode} before ready: {server.log().strip()}"
                )
            buffers[fd] += chunk
            if b"\n" in buffers[fd]:
                line = buffers[fd].split(b"\n", 1)[0].decode(errors="replace")
                if not line.startswith(READY_PREFIX):
                    raise LabError(f"echo server {server.name!r} said {line!r}, not ready")
                del pending[fd]


def _check_name(kind: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid {kind} name {name!r} (lower-case letters, digits, '-')")
    return name


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """The namespace cluster; use as ``with Cluster(spec) as cluster: ...``.

    Namespace keys accepted wherever a namespace is named (``ns``, ``exec``, ``ask``, ...):
    ``"switch"``, ``"client"``, a node name such as ``"node1"`` (or ``"node:node1"``),
    ``"pod:<pod name>"``, or the full namespace name itself.
    """

    def __init__(self, spec: ClusterSpec | None = None, *, prefix: str | None = None) -> None:
        self.spec = spec if spec is not None else ClusterSpec()
        self.prefix = prefix if prefix is not None else new_prefix()
        if not self.prefix.endswith("-") or len(self.prefix) < 4:
            raise ValueError(f"namespace prefix {self.prefix!r} must be >= 4 chars ending in '-'")
        netns.check_nsname(self.prefix + "x")
        self._nodes: dict[str, NodeSpec] = {}
        self._validate_spec()
        self._ns: dict[str, str] = {}
        self._created: list[str] = []
        self._pods: dict[str, Pod] = {}
        self._servers: list[EchoServer] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._veth_seq = itertools.count()
        self._tmpdir: Path | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        nodes, pods = list(self._nodes), list(self._pods)
        return f"Cluster(prefix={self.prefix!r}, nodes={nodes}, pods={pods})"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as cleanup_exc:  # do not mask the body's exception
            warnings.warn(f"lab cleanup failed: {cleanup_exc}", RuntimeWarning, stacklevel=2)

    def start(self) -> Self:
        """Build the topology and start the spec's pods; on any failure tear everything down."""
        if self._started:
            raise LabError("cluster already started")
        self._started = True
        try:
            self._build()
        except BaseException:
            try:
                self.close()
            except Exception as cleanup_exc:
                warnings.warn(f"lab cleanup failed: {cleanup_exc}", RuntimeWarning, stacklevel=2)
            raise
        return self

    def close(self) -> None:
        """Kill every process the cluster started and delete all its namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        procs = [s.proc for s in self._servers] + self._procs
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in procs:
            try:
                netns.stop_process(proc)
            except Exception as exc:
                errors.append(f"stopping pid {proc.pid}: {exc}")
        for name in reversed(self._created):
            try:
                netns.delete_netns(name)
            except Exception as exc:
                errors.append(f"deleting {name}: {exc}")
        self._created.clear()
        self._ns.clear()
        self._pods.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if errors:
            raise LabError("lab cleanup incomplete: " + "; ".join(errors))

    # ------------------------------------------------------------------ building

    def _validate_spec(self) -> None:
        spec = self.spec
        networks: dict[int, tuple[IPNetwork, IPNetwork]] = {
            4: (ipaddress.IPv4Network(spec.node_cidr), ipaddress.IPv4Network(spec.cluster_cidr)),
            6: (ipaddress.IPv6Network(spec.node_cidr6),
                ipaddress.IPv6Network(spec.cluster_cidr6))}
        used_ips: set[IPAddress] = {
            ipaddress.IPv4Address(spec.gateway_ip), ipaddress.IPv4Address(spec.client_ip),
            ipaddress.IPv6Address(spec.gateway_ip6), ipaddress.IPv6Address(spec.client_ip6)}
        for addr in used_ips:
            if addr not in networks[addr.version][0]:
                raise ValueError(f"{addr} is not in the node network {networks[addr.version][0]}")
        if not spec.nodes:
            raise ValueError("a cluster needs at least one node")
        pod_nets: list[IPNetwork] = []
        for node in spec.nodes:
            _check_name("node", node.name)
            if node.name in _RESERVED_NODE_NAMES or node.name in self._nodes:
                raise ValueError(f"node name {node.name!r} is reserved or repeated")
            if (node.ip6 is None) != (node.pod_cidr6 is None):
                raise ValueError(f"node {node.name}: give both an IPv6 address and an IPv6 "
                                 "pod CIDR, or neither")
            pairs: list[tuple[IPAddress, IPNetwork]] = [
                (ipaddress.IPv4Address(node.ip), ipaddress.IPv4Network(node.pod_cidr))]
            if node.ip6 is not None and node.pod_cidr6 is not None:
                pairs.append((ipaddress.IPv6Address(node.ip6),
                              ipaddress.IPv6Network(node.pod_cidr6)))
            for addr, pod_net in pairs:
                node_net, cluster_net = networks[addr.version]
                if addr not in node_net or addr in used_ips:
                    raise ValueError(f"node {node.name}: IP {addr} outside {node_net} or in use")
                used_ips.add(addr)
                same_family = [n for n in pod_nets if n.version == pod_net.version]
                if not _within(pod_net, cluster_net) or any(
                        _within(pod_net, n) or _within(n, pod_net) for n in same_family):
                    raise ValueError(
                        f"node {node.name}: pod CIDR {pod_net} outside {cluster_net} "
                        "or overlapping another node's"
                    )
                pod_nets.append(pod_net)
            self._nodes[node.name] = node

    def _new_ns(self, key: str, suffix: str) -> str:
        name = netns.check_nsname(self.prefix + suffix)
        self._created.append(name)  # registered first: cleanup must cover a half-made one
        netns.run(["ip", "netns", "add", name])
        self._ns[key] = name
        netns.ip(name, "link", "set", "lo", "up")
        netns.set_sysctls(name, self._base_sysctls())
        return name

    @staticmethod
    def _base_sysctls() -> dict[str, str | int]:
        """Every namespace's: no ICMP rate limits (tests count REJECT answers), and IPv6
        addresses usable at once (no duplicate address detection) and left alone (no router
        advertisements or solicitations). Set right after the namespace is made, before any
        interface enters it, so the ``default`` values reach every interface it gets."""
        values: dict[str, str | int] = {"net.ipv4.icmp_ratelimit": 0, "net.ipv4.icmp_ratemask": 0,
                                        "net.ipv6.icmp.ratelimit": 0}
        for scope in ("all", "default"):
            values |= {f"net.ipv6.conf.{scope}.disable_ipv6": 0,
                       f"net.ipv6.conf.{scope}.accept_dad": 0,
                       f"net.ipv6.conf.{scope}.accept_ra": 0,
                       f"net.ipv6.conf.{scope}.router_solicitations": 0}
        return values

    @staticmethod
    def _interface_sysctls(ifname: str) -> dict[str, str | int]:
        """One interface's own copy of the IPv6 settings (DAD runs unless both ``all`` and
        the interface say no)."""
        return {f"net.ipv6.conf.{ifname}.accept_dad": 0, f"net.ipv6.conf.{ifname}.accept_ra": 0}

    def _build(self) -> None:
        spec = self.spec
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}lab-"))
        if not Path("/proc/sys/net/ipv6").exists():
            raise LabError("the lab is dual-stack and this kernel has no IPv6")
        prefixlen = ipaddress.IPv4Network(spec.node_cidr).prefixlen
        prefixlen6 = ipaddress.IPv6Network(spec.node_cidr6).prefixlen
        switch = self._new_ns("switch", "switch")
        client = self._new_ns("client", "client")
        for node in spec.nodes:
            self._new_ns(f"node:{node.name}", f"node-{node.name}")
        for node in spec.nodes:
            netns.set_sysctls(
                self.ns(node.name),
                {
                    "net.ipv4.ip_forward": 1,
                    "net.ipv6.conf.all.forwarding": 1,
                    "net.ipv6.conf.default.forwarding": 1,
                    "net.ipv4.conf.all.rp_filter": 0,
                    "net.ipv4.conf.default.rp_filter": 0,
                    "net.ipv4.conf.lo.rp_filter": 0,
                },
            )
        # No multicast snooping: neighbour discovery goes by multicast, and a snooping bridge
        # would hold it back until it has seen each host's MLD report.
        netns.ip_batch(
            switch,
            [
                "link add br0 type bridge mcast_snooping 0",
                f"addr add {spec.gateway_ip}/{prefixlen} dev br0",
                f"addr add {spec.gateway_ip6}/{prefixlen6} dev br0 nodad",
                "link set br0 up",
            ],
        )
        attached = [(self.ns(n.name), n.ip, n.ip6) for n in spec.nodes]
        attached.append((client, spec.client_ip, spec.client_ip6))
        for index, (ns, addr, addr6) in enumerate(attached):
            port = f"sw{index}"
            netns.add_veth(switch, port, ns, "eth0")
            netns.set_sysctls(switch, self._interface_sysctls(port))
            netns.set_sysctls(ns, self._interface_sysctls("eth0"))
            netns.ip_batch(switch, [f"link set {port} master br0", f"link set {port} up"])
            commands = [f"addr add {addr}/{prefixlen} dev eth0"]
            if addr6 is not None:
                commands.append(f"addr add {addr6}/{prefixlen6} dev eth0 nodad")
            netns.ip_batch(ns, [*commands, "link set eth0 up"])
        for node in spec.nodes:
            ns = self.ns(node.name)
            netns.set_sysctl(ns, "net.ipv4.conf.eth0.rp_filter", 0)
            others = [other for other in spec.nodes if other.name != node.name]
            routes = [f"route add {other.pod_cidr} via {other.ip} dev eth0" for other in others]
            routes.append(f"route add default via {spec.gateway_ip} dev eth0")
            if node.ip6 is not None:
                routes += [f"route add {other.pod_cidr6} via {other.ip6} dev eth0"
                           for other in others if other.ip6 is not None]
                routes.append(f"route add default via {spec.gateway_ip6} dev eth0")
            netns.ip_batch(ns, routes)
        if spec.pods:
            self.add_pods(spec.pods)

    # ------------------------------------------------------------------ namespaces

    def _require_running(self) -> None:
        if not self._started or self._closed:
            raise LabError("cluster is not running (use it inside 'with Cluster() as c:')")

    def ns(self, key: str) -> str:
        """Namespace name for a key: ``switch``, ``client``, ``<node>``, ``node:<node>``,
        ``pod:<pod>``, or an own namespace's full name (returned unchanged)."""
        if key in self._ns:
            return self._ns[key]
        if f"node:{key}" in self._ns:
            return self._ns[f"node:{key}"]
        if key in self._ns.values():
            return key
        raise KeyError(f"no namespace {key!r} in this cluster; keys: {sorted(self._ns)}")

    @property
    def namespaces(self) -> dict[str, str]:
        """All current namespaces, key -> namespace name."""
        return dict(self._ns)

    @property
    def switch_ns(self) -> str:
        """Namespace holding the bridge that connects nodes and client."""
        return self.ns("switch")

    @property
    def client_ns(self) -> str:
        """Namespace of the external (non-cluster) client."""
        return self.ns("client")

    @property
    def client_ip(self) -> str:
        """IP of the external client on the node network."""
        return self.spec.client_ip

    @property
    def client_ip6(self) -> str:
        """IPv6 address of the external client on the node network."""
        return self.spec.client_ip6

    # ------------------------------------------------------------------ nodes

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names in spec order."""
        return tuple(self._nodes)

    def node_ip(self, node: str) -> str:
        """IP of ``node`` on the node network."""
        return self._node(node).ip

    @property
    def node_ips(self) -> dict[str, str]:
        """Node name -> node IP."""
        return {name: n.ip for name, n in self._nodes.items()}

    def node_ip6(self, node: str) -> str:
        """IPv6 address of ``node`` on the node network (LabError for an IPv4-only node)."""
        spec = self._node(node)
        if spec.ip6 is None:
            raise LabError(f"node {spec.name} has no IPv6 address")
        return spec.ip6

    @property
    def node_ips6(self) -> dict[str, str]:
        """Node name -> node IPv6 address, for the dual-stack nodes."""
        return {name: n.ip6 for name, n in self._nodes.items() if n.ip6 is not None}

    def pod_cidr(self, node: str) -> str:
        """Pod CIDR routed to ``node``."""
        return self._node(node).pod_cidr

    def _node(self, node: str) -> NodeSpec:
        name = node.removeprefix("node:")
        if name not in self._nodes:
            raise KeyError(f"no node {node!r}; nodes: {list(self._nodes)}")
        return self._nodes[name]

    def add_node_address(self, node: str, cidr: str, dev: str = "lo") -> None:
        """Add a local address of either family (a host address if no length is given) on
        ``dev`` of ``node``."""
        self._require_running()
        iface = ipaddress.ip_interface(cidr)
        netns.ip(
            self.ns(self._node(node).name),
            "addr",
            "add",
            iface.with_prefixlen,
            "dev",
            netns.check_ifname(dev),
            *(["nodad"] if iface.version == 6 else []),
        )

    def route_from_client(self, cidr: str, via_node: str = "node1") -> None:
        """Make the external client send ``cidr`` (e.g. an external or LB IP, either family)
        via ``via_node``'s address of that family."""
        self._require_running()
        net = ipaddress.ip_network(cidr, strict=False)
        via = self.node_ip6(via_node) if net.version == 6 else self.node_ip(via_node)
        netns.ip(self.client_ns, "route", "replace", str(net), "via", via, "dev", "eth0")

    # ------------------------------------------------------------------ pods

    @property
    def pods(self) -> dict[str, Pod]:
        """Current pods by name."""
        return dict(self._pods)

    def pod(self, name: str) -> Pod:
        """The pod called ``name``."""
        try:
            return self._pods[name]
        except KeyError:
            raise KeyError(f"no pod {name!r}; pods: {list(self._pods)}") from None

    def pod_ip(self, name: str) -> str:
        """IP of pod ``name``."""
        return self.pod(name).ip

    def pod_ip6(self, name: str) -> str:
        """IPv6 address of pod ``name`` (LabError for a pod on an IPv4-only node)."""
        pod = self.pod(name)
        if pod.ip6 is None:
            raise LabError(f"pod {name} has no IPv6 address (node {pod.node} is IPv4-only)")
        return pod.ip6

    @property
    def pod_ips(self) -> dict[str, str]:
        """Pod name -> pod IP."""
        return {name: p.ip for name, p in self._pods.items()}

    @property
    def pod_ips6(self) -> dict[str, str]:
        """Pod name -> pod IPv6 address, for the pods on dual-stack nodes."""
        return {name: p.ip6 for name, p in self._pods.items() if p.ip6 is not None}

    def _allocate_ip(self, node: NodeSpec, wanted: str | None) -> str:
        net = ipaddress.IPv4Network(node.pod_cidr)
        used = {p.ip for p in self._pods.values()}
        if wanted is not None:
            addr = ipaddress.IPv4Address(wanted)
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise ValueError(f"pod IP {addr} is not a host address of {node.name}'s {net}")
            if str(addr) in used:
                raise ValueError(f"pod IP {addr} is already used")
            return str(addr)
        for index, host in enumerate(net.hosts()):
            if index >= 9 and str(host) not in used:
                return str(host)
        raise LabError(f"no free pod IP left in {net}")

    def _allocate_ip6(self, node: NodeSpec, ip: str, wanted: str | None) -> str | None:
        if node.pod_cidr6 is None:
            if wanted is not None:
                raise ValueError(f"pod IPv6 {wanted}: node {node.name} is IPv4-only")
            return None
        net = ipaddress.IPv6Network(node.pod_cidr6)
        if wanted is None:
            offset = int(ipaddress.IPv4Address(ip)) - int(
                ipaddress.IPv4Network(node.pod_cidr).network_address)
            addr = net.network_address + int(str(offset), 16)
        else:
            addr = ipaddress.IPv6Address(wanted)
        if addr not in net or addr == net.network_address:
            raise ValueError(f"pod IPv6 {addr} is not a host address of {node.name}'s {net}")
        if str(addr) in {p.ip6 for p in self._pods.values()}:
            raise ValueError(f"pod IPv6 {addr} is already used")
        return str(addr)

    def add_pod(
        self,
        node: str,
        name: str,
        ip: str | None = None,
        *,
        tcp_ports: Sequence[int] = (DEFAULT_PORT,),
        udp_ports: Sequence[int] = (DEFAULT_PORT,),
    ) -> Pod:
        """Create pod ``name`` on ``node`` (IP auto-picked if ``None``) and start its echo server.

        The server listens on ``tcp_ports`` and ``udp_ports`` (both empty: no server) and answers
        with the pod's name. Returns once the server is ready.
        """
        return self.add_pods(
            [PodSpec(name, self._node(node).name, ip, tuple(tcp_ports), tuple(udp_ports))]
        )[0]

    def add_pods(self, specs: Iterable[PodSpec]) -> list[Pod]:
        """Create several pods, starting their echo servers concurrently; wait until all ready."""
        self._require_running()
        assert self._tmpdir is not None
        created: list[Pod] = []
        for spec in specs:
            _check_name("pod", spec.name)
            if spec.name in self._pods:
                raise ValueError(f"pod {spec.name!r} already exists")
            node = self._node(spec.node)
            pod_ip = self._allocate_ip(node, spec.ip)
            pod_ip6 = self._allocate_ip6(node, pod_ip, spec.ip6)
            node_ns = self.ns(node.name)
            pod_ns = self._new_ns(f"pod:{spec.name}", f"pod-{spec.name}")
            veth = netns.check_ifname(f"vp{next(self._veth_seq)}")
            netns.add_veth(node_ns, veth, pod_ns, "eth0")
            netns.set_sysctls(pod_ns, self._interface_sysctls("eth0"))
            netns.set_sysctls(
                node_ns,
                {
                    **self._interface_sysctls(veth),
                    f"net.ipv4.conf.{veth}.proxy_arp": 1,
                    f"net.ipv4.conf.{veth}.rp_filter": 0,
                    # answer the pod's ARP at once, not after up to 0.8 s
                    f"net.ipv4.neigh.{veth}.proxy_delay": 0,
                },
            )
            node_side = [f"link set {veth} up", f"route add {pod_ip}/32 dev {veth}"]
            pod_side = [
                f"addr add {pod_ip}/32 dev eth0",
                "link set eth0 up",
                f"route add {POD_GATEWAY_IP} dev eth0 scope link",
                f"route add default via {POD_GATEWAY_IP} dev eth0",
            ]
            if pod_ip6 is not None:
                node_side += [f"addr add {POD_GATEWAY_IP6}/64 dev {veth} nodad",
                              f"route add {pod_ip6}/128 dev {veth}"]
                pod_side += [f"addr add {pod_ip6}/128 dev eth0 nodad",
                             f"route add default via {POD_GATEWAY_IP6} dev eth0"]
            netns.ip_batch(node_ns, node_side)
            netns.ip_batch(pod_ns, pod_side)
            server = None
            if spec.tcp_ports or spec.udp_ports:
                server = _spawn_echo(
                    pod_ns,
                    spec.name,
                    spec.tcp_ports,
                    spec.udp_ports,
                    self._tmpdir / f"pod-{spec.name}.log",
                )
                self._servers.append(server)
            pod = Pod(spec.name, node.name, pod_ip, pod_ns, veth, server, pod_ip6)
            self._pods[spec.name] = pod
            created.append(pod)
        wait_ready([p.server for p in created if p.server is not None])
        return created

    def remove_pod(self, name: str) -> None:
        """Stop pod ``name``'s server and delete the pod, its veth and its route on the node."""
        self._require_running()
        pod = self.pod(name)
        del self._pods[name]
        if pod.server is not None:
            pod.server.stop()
            self._servers.remove(pod.server)
        # Deleting the veth synchronously (namespace teardown is asynchronous in the kernel)
        # removes the node's /32 route at once, so the pod is gone when this returns.
        netns.ip(self.ns(pod.node), "link", "del", pod.host_veth, check=False)
        netns.delete_netns(pod.ns)
        self._created.remove(pod.ns)
        self._ns.pop(f"pod:{name}", None)

    def start_echo(
        self,
        key: str,
        name: str,
        tcp_ports: Sequence[int] = (DEFAULT_PORT,),
        udp_ports: Sequence[int] = (DEFAULT_PORT,),
    ) -> EchoServer:
        """Start an extra echo server in any namespace (e.g. a host-network one on a node).

        It is stopped by :meth:`close`, or earlier by the caller with ``server.stop()``.
        """
        self._require_running()
        assert self._tmpdir is not None
        ns = self.ns(key)
        server = _spawn_echo(
            ns,
            name,
            tuple(tcp_ports),
            tuple(udp_ports),
            self._tmpdir / f"echo-{len(self._servers)}-{name}.log",
        )
        self._servers.append(server)
        wait_ready([server])
        return server

    @property
    def servers(self) -> list[EchoServer]:
        """All echo servers started by this cluster (pods' and extra ones)."""
        return list(self._servers)

    # ------------------------------------------------------------------ running things

    def exec(
        self,
        key: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = netns.DEFAULT_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace ``key`` and return its captured text output.

        ``env`` defaults to this environment plus a PYTHONPATH that makes ``iptsync``
        importable; with ``check`` a non-zero exit raises :class:`netns.NetnsError`.
        """
        self._require_running()
        return netns.ns_exec(
            self.ns(key),
            argv,
            check=check,
            timeout=timeout,
            input=input,
            env=netns.lab_env() if env is None else env,
        )

    def spawn(
        self,
        key: str,
        argv: Sequence[str],
        *,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the background in namespace ``key``; killed by :meth:`close`."""
        self._require_running()
        proc = netns.ns_popen(
            self.ns(key),
            argv,
            stdout=stdout,
            stderr=stderr,
            env=netns.lab_env() if env is None else env,
        )
        self._procs.append(proc)
        return proc

    def ask(  # noqa: PLR0917 - positional order is the documented lab API
        self,
        from_ns: str,
        proto: str,
        ip: str,
        port: int,
        count: int = 1,
        timeout: float = 1.0,
        src_port: int | None = None,
        *,
        src_ip: str | None = None,
        interval: float = 0.0,
    ) -> list[Reply]:
        """Make ``count`` independent ``proto`` (tcp/udp) requests from ``from_ns`` to ``ip:port``.

        All requests run in one ``python -m iptsync.lab.echo ask`` process inside the namespace.
        Each request uses a new connection / new UDP socket; with ``src_port`` every one binds
        that source port, so a UDP flow stays one conntrack entry.
        """
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be 'tcp' or 'udp', not {proto!r}")
        if count < 1:
            raise ValueError("count must be at least 1")
        argv = netns.python_argv(
            "iptsync.lab.echo",
            "ask",
            "--proto",
            proto,
            "--to",
            join_host_port(ip, port),
            "--count",
            str(count),
            "--timeout",
            str(timeout),
            "--interval",
            str(interval),
        )
        if src_ip is not None:
            argv += ["--src-ip", src_ip]
        if src_port is not None:
            argv += ["--src-port", str(src_port)]
        budget = count * (timeout + interval + 0.5) + 20.0
        out = self.exec(from_ns, argv, timeout=budget).stdout
        replies = [Reply.from_json(json.loads(line)) for line in out.splitlines() if line.strip()]
        if len(replies) != count:
            raise LabError(f"asked {count} times but got {len(replies)} answers: {out!r}")
        return replies
