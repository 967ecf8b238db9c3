"""``iptsync lab``: a two-node cluster of network namespaces, with real traffic through iptsync.

Why: the rules iptsync writes are easiest to believe when you watch packets go through them.
This module builds the documented lab (:mod:`iptsync.lab.topology`: nodes node1 10.100.0.2
and node2 10.100.0.3, an external client 10.100.0.100, pods running echo servers), runs
``iptsync run --once`` inside each node namespace against the bundled manifests in
``examples/lab/`` (the seed documents' server-service, deploy-svc as LoadBalancer with
NodePort 30200, and the ExternalName external-svc), then measures what a person wants to see:
how connections spread over the pods, which source address the pods saw (kept for pod ->
ClusterIP, masqueraded to a node address for NodePort and load-balancer traffic), what
``iptsync dump`` prints for one service and that the node holds exactly that, and that the
ExternalName service produced no rules at all.

Measuring and presenting are separate: :func:`run_lab` returns a :class:`LabResult` (plain
dataclasses), :func:`render_text` and :func:`result_json` turn it into the report, and
:func:`run_command` (what the ``iptsync lab`` command calls) glues them together with the
interactive ``--keep`` wait and signal handling. Everything happens in namespaces the lab
creates and deletes again (also on Ctrl-C and SIGTERM); the host's own network namespace is
never changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self, TextIO

import iptsync
from iptsync.desired import desired_from_objects
from iptsync.lab import netns
from iptsync.lab.topology import (
    CLIENT_IP,
    CLUSTER_CIDR,
    Cluster,
    ClusterSpec,
    LabError,
    PodSpec,
    Reply,
    default_nodes,
)
from iptsync.names import SVC_PREFIX, is_service_chain
from iptsync.netfilter import Backend, Netfilter, NetfilterError
from iptsync.options import build_settings
from iptsync.ruleset import Rule, RulesetError, SavedTable, chain_line, parse_save, split_args
from iptsync.sources.files import load_objects

NAMESPACE = "default"
"""Kubernetes namespace of every object in the lab's manifests."""
ECHO_PORT = 8080
NODE_PORT = 30200
LB_IP = "203.0.113.10"
LB_ROUTE = "203.0.113.0/24"
LB_VIA_NODE = "node1"
DUMP_NODE = "node1"
DUMP_SERVICE = "deploy-svc"
EXTERNAL_NAME_SERVICE = "external-svc"
DEFAULT_REQUESTS = 60
REQUEST_TIMEOUT = 1.0
"""Seconds one request may take; the echo servers answer in well under a millisecond."""
FIRST_BATCH = 3
"""Requests sent first to each target; if none is answered the rest are not sent (fail fast)."""
SYNC_TIMEOUT = 60.0
BAR_WIDTH = 40
NEEDS_ROOT = "iptsync lab needs root (network namespaces)"

# ----------------------------------------------------------------------------- the lab's shape


@dataclass(frozen=True)
class LabPod:
    """A pod of the lab: where it runs and which service it backs (``None``: the client pod)."""

    name: str
    node: str
    ip: str
    service: str | None


@dataclass(frozen=True)
class LabService:
    """A service of the bundled manifests, as the report describes it."""

    name: str
    kind: str
    cluster_ip: str | None = None
    port: int = 80
    node_port: int | None = None
    lb_ip: str | None = None
    external_name: str | None = None

    @property
    def ref(self) -> str:
        """``namespace/name``, as rule comments spell it."""
        return f"{NAMESPACE}/{self.name}"


CLIENT_POD = LabPod("client1", "node1", "10.0.1.3", None)
PODS: tuple[LabPod, ...] = (
    CLIENT_POD,
    LabPod("server1", "node1", "10.0.1.2", "server-service"),
    LabPod("server2", "node2", "10.0.2.2", "server-service"),
    LabPod("deploy-nginx-1", "node1", "10.0.1.10", "deploy-svc"),
    LabPod("deploy-nginx-2", "node1", "10.0.1.11", "deploy-svc"),
    LabPod("deploy-nginx-3", "node2", "10.0.2.10", "deploy-svc"),
)
SERVER_SERVICE = LabService("server-service", "ClusterIP", cluster_ip="10.3.241.152")
DEPLOY_SVC = LabService("deploy-svc", "LoadBalancer", cluster_ip="10.96.100.100",
                        node_port=NODE_PORT, lb_ip=LB_IP)
EXTERNAL_SVC = LabService(EXTERNAL_NAME_SERVICE, "ExternalName", external_name="google.com")
SERVICES: tuple[LabService, ...] = (SERVER_SERVICE, DEPLOY_SVC, EXTERNAL_SVC)
NODES = default_nodes(2)
NODE_IPS: dict[str, str] = {node.name: node.ip for node in NODES}


def pods_of(service: str) -> tuple[str, ...]:
    """Names of the pods behind ``service``, in the lab's order."""
    return tuple(pod.name for pod in PODS if pod.service == service)


def lab_spec() -> ClusterSpec:
    """The cluster: two nodes, the client pod without a server, the others echoing on TCP 8080."""
    return ClusterSpec(
        nodes=NODES,
        pods=tuple(
            PodSpec(pod.name, pod.node, pod.ip,
                    tcp_ports=(ECHO_PORT,) if pod.service else (), udp_ports=())
            for pod in PODS
        ),
    )


def manifests_dir() -> Path:
    """``examples/lab`` of the source tree iptsync is imported from."""
    path = Path(iptsync.__file__).resolve().parent.parent / "examples" / "lab"
    if not path.is_dir():
        raise LabError(f"the lab's manifests are missing: {path} (run from a source checkout)")
    return path


def cannot_run_reason(backend: str) -> str | None:
    """Why the lab cannot run on this machine (not root, no namespaces, no iptables), or None."""
    if os.geteuid() != 0:
        return NEEDS_ROOT
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        return f"iptsync lab cannot run here: {reason}"
    for tool in (f"iptables-{backend}-restore", f"iptables-{backend}-save"):
        if shutil.which(tool) is None:
            return f"iptsync lab needs {tool} (Debian package iptables)"
    return None


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class NodeSync:
    """How ``iptsync run --once`` went on one node."""

    node: str
    ok: bool
    seconds: float
    detail: str


@dataclass(frozen=True)
class Probe:
    """A batch of TCP requests to one target and what came back."""

    section: str
    """``cluster-ip``, ``nodeport`` or ``load-balancer``."""
    service: str
    source: str
    """Namespace key the requests were sent from (``pod:client1``, ``client``)."""
    source_ip: str
    ip: str
    port: int
    expected: tuple[str, ...]
    """Pods that should answer."""
    sent: int
    answered: Mapping[str, int]
    """Answering server -> number of requests it answered."""
    errors: Mapping[str, int]
    """Error word (``timeout``, ``refused``, ...) -> number of requests that failed so."""
    seen_as: Mapping[str, int]
    """Source IP the servers saw -> number of requests."""

    @property
    def target(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def ok_count(self) -> int:
        return sum(self.answered.values())

    @property
    def missing(self) -> tuple[str, ...]:
        """Expected pods that answered no request."""
        return tuple(pod for pod in self.expected if not self.answered.get(pod))

    @property
    def unexpected(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.answered) - set(self.expected)))

    @property
    def every_pod_answered(self) -> bool:
        """All requests answered, by every expected pod and by no other."""
        return (self.sent > 0 and self.ok_count == self.sent and not self.missing
                and not self.unexpected)


@dataclass(frozen=True)
class DumpExcerpt:
    """The part of ``iptsync dump`` about one service: its nat rules, chain by chain."""

    node: str
    service: str
    command: str
    chains: Mapping[str, tuple[Rule, ...]]
    """Chain -> the service's rules in it (KUBE-SERVICES, KUBE-NODEPORTS: only those naming
    the service; its own KUBE-SVC/EXT/SEP chains: all), in dump order."""
    services_with_svc_chain: tuple[str, ...]
    """Every ``namespace/name`` the full dump has a KUBE-SVC chain for."""

    @property
    def lines(self) -> list[str]:
        """The excerpt in iptables-restore form: chain declarations, then the rules."""
        return ([chain_line(name) for name in self.chains]
                + [rule.restore_line() for rules in self.chains.values() for rule in rules])


@dataclass(frozen=True)
class LiveComparison:
    """Whether a node's live nat rules for the dumped service equal the dump."""

    node: str
    command: str
    matches: bool
    compared: tuple[str, ...]
    """Chains compared (the dump excerpt's)."""
    differing: tuple[str, ...]
    """Chains whose live rules differ from the dump."""
    error: str | None = None


@dataclass(frozen=True)
class ExternalNameResult:
    """What the nodes hold for the ExternalName service (it should be nothing)."""

    service: str
    in_dump: bool
    """The dump has a KUBE-SVC chain for it."""
    live_mentions: Mapping[str, tuple[str, ...]]
    """Node -> live nat/filter lines naming the service."""
    live_svc_chains: Mapping[str, tuple[str, ...]]
    """Node -> the services that have a live KUBE-SVC chain."""
    error: str | None = None


@dataclass(frozen=True)
class Check:
    """One expectation of the lab and whether it held."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class LabResult:
    """Everything the lab measured; :func:`render_text` and :func:`result_json` present it."""

    backend: str
    prefix: str
    requests: int
    manifests: str
    namespaces: Mapping[str, str]
    """Namespace key (``switch``, ``client``, ``node:node1``, ``pod:client1``...) -> name."""
    syncs: tuple[NodeSync, ...]
    probes: tuple[Probe, ...]
    dump: DumpExcerpt
    live: LiveComparison
    external_name: ExternalNameResult
    checks: tuple[Check, ...]

    @property
    def passed(self) -> int:
        return sum(1 for check in self.checks if check.passed)

    @property
    def failed(self) -> int:
        return len(self.checks) - self.passed

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def probes_in(self, section: str) -> list[Probe]:
        return [probe for probe in self.probes if probe.section == section]


# ----------------------------------------------------------------------------- measuring

_LOG_LINE = re.compile(r"^\S+ \S+ (?:\w+) [\w.]+: (.*)$")
_TIMINGS = re.compile(r";?\s*(?:\w+=[\d.]+ms\s*)+$")
"""The per-phase timings at the end of a sync's log line (the report shows the wall time)."""


def sync_node(cluster: Cluster, node: str, backend: str, manifests: Path) -> NodeSync:
    """Run ``iptsync run --once`` inside ``node``'s namespace, like the data-plane tests do."""
    argv = netns.python_argv(
        "iptsync.cli", "run", "--once", "--iptables-backend", backend,
        "--objects", str(manifests), "--hostname-override", node,
        "--cluster-cidr", CLUSTER_CIDR,
    )
    start = time.monotonic()
    try:
        proc = cluster.exec(node, argv, check=False, timeout=SYNC_TIMEOUT)
    except netns.NetnsError as exc:
        return NodeSync(node, False, time.monotonic() - start, str(exc))
    seconds = time.monotonic() - start
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    messages = [m.group(1) if (m := _LOG_LINE.match(line)) else line for line in lines]
    messages = [_TIMINGS.sub("", message) for message in messages]
    if proc.returncode != 0:
        detail = "; ".join(messages[-3:]) or f"exit status {proc.returncode}"
        return NodeSync(node, False, seconds, detail)
    return NodeSync(node, True, seconds, messages[-1] if messages else "")


def probe(cluster: Cluster, *, section: str, service: str, source: str, source_ip: str,
          ip: str, port: int, count: int) -> Probe:
    """Send ``count`` TCP requests (each a new connection) from ``source`` to ``ip:port``.

    The first :data:`FIRST_BATCH` go alone; when none of them is answered the rest are not
    sent, so a broken path fails in seconds instead of ``count`` timeouts.
    """
    first = min(count, FIRST_BATCH)
    replies: list[Reply] = cluster.ask(source, "tcp", ip, port, count=first,
                                       timeout=REQUEST_TIMEOUT)
    if count > first and any(reply.ok for reply in replies):
        replies += cluster.ask(source, "tcp", ip, port, count=count - first,
                               timeout=REQUEST_TIMEOUT)
    return Probe(
        section=section, service=service, source=source, source_ip=source_ip, ip=ip,
        port=port, expected=pods_of(service), sent=len(replies),
        answered=dict(Counter(r.server for r in replies if r.ok and r.server)),
        errors=dict(Counter(r.error or "unknown" for r in replies if not r.ok)),
        seen_as=dict(Counter(r.seen_as_ip for r in replies if r.ok and r.seen_as_ip)),
    )


def _comments(args: Sequence[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--comment"]


def _names_service(args: Sequence[str], ref: str) -> bool:
    """True when a ``--comment`` of the rule names ``ref`` (``namespace/name``) as a word."""
    return any(ref in comment.split() for comment in _comments(args))


def _jump_target(args: Sequence[str]) -> str | None:
    for flag in ("-j", "-g"):
        if flag in args[:-1]:
            return args[args.index(flag) + 1]
    return None


def _svc_chain_services(chains: Mapping[str, Sequence[Sequence[str]]]) -> tuple[str, ...]:
    """``namespace/name`` of every service owning a KUBE-SVC chain (from its rules' comments)."""
    found: set[str] = set()
    for chain, rules in chains.items():
        if chain.startswith(SVC_PREFIX):
            found.update(c.split()[0] for args in rules for c in _comments(args) if c.split())
    return tuple(sorted(found))


def service_chains(nat: Mapping[str, Sequence[Rule]], ref: str) -> dict[str, tuple[Rule, ...]]:
    """The rules of ``ref`` in a nat table: its entries in KUBE-SERVICES and KUBE-NODEPORTS,
    then every per-service chain reachable from them, in the table's order."""
    entries: dict[str, tuple[Rule, ...]] = {}
    for entry in ("KUBE-SERVICES", "KUBE-NODEPORTS"):
        rules = tuple(rule for rule in nat.get(entry, ()) if _names_service(rule.args, ref))
        if rules:
            entries[entry] = rules
    reachable: set[str] = set()
    queue = [_jump_target(rule.args) for rules in entries.values() for rule in rules]
    while queue:
        chain = queue.pop()
        if chain is None or chain in reachable or not is_service_chain(chain):
            continue
        reachable.add(chain)
        queue.extend(_jump_target(rule.args) for rule in nat.get(chain, ()))
    return {chain: entries.get(chain, tuple(rules)) for chain, rules in nat.items()
            if chain in entries or chain in reachable}


def dump_command(manifests: Path, node: str) -> str:
    """The ``iptsync dump`` command line the excerpt is taken from (paths relative to here)."""
    try:
        objects = str(manifests.resolve().relative_to(Path.cwd()))
    except ValueError:
        objects = str(manifests)
    return (f"iptsync dump --objects {objects} --hostname-override {node} "
            f"--cluster-cidr {CLUSTER_CIDR}")


def dump_service(manifests: Path, node: str, service: str) -> DumpExcerpt:
    """What ``iptsync dump`` prints for ``service`` on ``node`` (same code path; no root)."""
    loaded = load_objects([manifests])
    settings = build_settings(node_name=node, cluster_cidr=CLUSTER_CIDR, masquerade_all=False,
                              masquerade_bit=14, nodeport_addresses=None, node_ips=(),
                              localhost_nodeports=True)
    tables = desired_from_objects(loaded.objects, settings).tables.tables
    nat = {chain: [Rule(chain, tuple(split_args(line)[2:])) for line in content.lines]
           for chain, content in tables.get("nat", {}).items()}
    ref = f"{NAMESPACE}/{service}"
    return DumpExcerpt(
        node=node, service=ref, command=dump_command(manifests, node),
        chains=service_chains(nat, ref),
        services_with_svc_chain=_svc_chain_services(
            {chain: [rule.args for rule in rules] for chain, rules in nat.items()}),
    )


def save_command(backend: str, table: str) -> str:
    return f"iptables-{backend}-save -t {table}"


def live_tables(cluster: Cluster, node: str, backend: str) -> dict[str, str]:
    """``iptables-save`` text of the nat and filter tables inside ``node``'s namespace."""
    netfilter = Netfilter(Backend(backend), netns=cluster.ns(node))
    return {table: netfilter.save_text(table) for table in ("nat", "filter")}


def compare_live(dump: DumpExcerpt, nat_text: str, command: str) -> LiveComparison:
    """Compare the dumped rules with a node's live nat table (canonical form, chain by chain)."""
    try:
        live = parse_save(nat_text).get("nat", SavedTable("nat"))
    except RulesetError as exc:
        return LiveComparison(dump.node, command, False, tuple(dump.chains), (),
                              f"cannot parse: {exc}")
    differing: list[str] = []
    for chain, rules in dump.chains.items():
        have = live.chains.get(chain, [])
        if not is_service_chain(chain):
            have = [c for c in have if _names_service(split_args(c), dump.service)]
        if [rule.canonical for rule in rules] != have:
            differing.append(chain)
    return LiveComparison(dump.node, command, not differing, tuple(dump.chains),
                          tuple(differing))


def external_name_result(dump: DumpExcerpt, live: Mapping[str, Mapping[str, str]],
                         error: str | None = None) -> ExternalNameResult:
    """Look for any trace of the ExternalName service in the dump and the nodes' tables."""
    ref = EXTERNAL_SVC.ref
    mentions: dict[str, tuple[str, ...]] = {}
    svc_chains: dict[str, tuple[str, ...]] = {}
    for node, tables in live.items():
        mentions[node] = tuple(line for text in tables.values() for line in text.splitlines()
                               if EXTERNAL_NAME_SERVICE in line)
        try:
            nat = parse_save(tables.get("nat", "")).get("nat", SavedTable("nat"))
        except RulesetError as exc:
            error = error or f"{node}: cannot parse the nat table: {exc}"
            continue
        svc_chains[node] = _svc_chain_services(
            {chain: [split_args(c) for c in rules] for chain, rules in nat.chains.items()})
    return ExternalNameResult(ref, ref in dump.services_with_svc_chain, mentions, svc_chains,
                              error)


def describe_ip(ip: str) -> str:
    """Who an address belongs to in the lab: ``pod client1``, ``node1``, ``the client``."""
    for pod in PODS:
        if pod.ip == ip:
            return f"pod {pod.name}"
    for name, node_ip in NODE_IPS.items():
        if node_ip == ip:
            return name
    return "the external client" if ip == CLIENT_IP else "unknown"


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def evaluate(syncs: Sequence[NodeSync], probes: Sequence[Probe], live: LiveComparison,
             external: ExternalNameResult) -> tuple[Check, ...]:
    """The lab's expectations, each as a passed or failed :class:`Check`. Pure."""
    checks = [Check(f"{s.node}: iptsync run --once applied the rules", s.ok,
                    f"{s.detail} ({s.seconds:.1f} s)") for s in syncs]
    node_ips = set(NODE_IPS.values())
    for p in probes:
        where = {"cluster-ip": f"ClusterIP {p.target} from {describe_ip(p.source_ip)}",
                 "nodeport": f"NodePort {p.target} ({describe_ip(p.ip)}) from outside",
                 "load-balancer": f"load-balancer IP {p.target} from outside"}[p.section]
        answered = f"{p.ok_count}/{p.sent} answered: {_counts(p.answered) or 'none'}"
        if p.errors:
            answered += f"; failed: {_counts(p.errors)}"
        if p.missing:
            answered += f"; silent: {', '.join(p.missing)}"
        if p.section == "load-balancer":
            checks.append(Check(f"{p.service}: {where} is reachable",
                                p.sent > 0 and p.ok_count == p.sent, answered))
        checks.append(Check(f"{p.service}: {where}, every pod answered",
                            p.every_pod_answered, answered))
        seen = _counts(p.seen_as) or "nothing"
        if p.section == "cluster-ip":
            checks.append(Check(
                f"{p.service}: pods saw the client pod's own address {p.source_ip} "
                "(source kept)",
                bool(p.seen_as) and set(p.seen_as) == {p.source_ip}, f"seen: {seen}"))
        elif p.section == "nodeport":
            checks.append(Check(
                f"{p.service}: NodePort {p.target} source masqueraded to a node address",
                bool(p.seen_as) and set(p.seen_as) <= node_ips, f"seen: {seen}"))
    if live.error is not None:
        live_detail = live.error
    elif live.matches:
        live_detail = f"{len(live.compared)} chains identical"
    else:
        live_detail = f"differing: {', '.join(live.differing)}"
    checks.append(Check(f"{live.node} holds exactly what iptsync dump prints for "
                        f"{DUMP_SERVICE} ({live.command})",
                        live.error is None and live.matches, live_detail))
    leftovers = {node: lines for node, lines in external.live_mentions.items() if lines}
    svc_on = [node for node, services in external.live_svc_chains.items()
              if external.service in services]
    chains = "; ".join(f"{node}: KUBE-SVC chains for {', '.join(services) or 'nothing'}"
                       for node, services in external.live_svc_chains.items())
    detail = external.error or (
        f"{chains}; rules naming {EXTERNAL_NAME_SERVICE}: "
        + (", ".join(f"{node} {len(lines)}" for node, lines in leftovers.items()) or "none"))
    checks.append(Check(
        f"ExternalName {EXTERNAL_NAME_SERVICE}: no KUBE-SVC chain and no rule on any node",
        external.error is None and not external.in_dump and not svc_on and not leftovers
        and len(external.live_svc_chains) == len(NODES),
        detail))
    return tuple(checks)


def measure(cluster: Cluster, backend: str, requests: int, manifests: Path,
            progress: Callable[[str], None] = lambda _: None) -> LabResult:
    """Sync every node, send the traffic, read the rules back and judge it all."""
    nodes = [node.name for node in NODES]
    progress(f"running iptsync run --once --iptables-backend {backend} on "
             f"{' and '.join(nodes)}")
    syncs = tuple(sync_node(cluster, node, backend, manifests) for node in nodes)
    progress(f"sending {requests} requests to each service address")
    probes: list[Probe] = []
    client_ns = f"pod:{CLIENT_POD.name}"
    for service in (SERVER_SERVICE, DEPLOY_SVC):
        assert service.cluster_ip is not None
        probes.append(probe(cluster, section="cluster-ip", service=service.name,
                            source=client_ns, source_ip=CLIENT_POD.ip, ip=service.cluster_ip,
                            port=service.port, count=requests))
    for node in nodes:
        probes.append(probe(cluster, section="nodeport", service=DEPLOY_SVC.name,
                            source="client", source_ip=CLIENT_IP, ip=NODE_IPS[node],
                            port=NODE_PORT, count=requests))
    probes.append(probe(cluster, section="load-balancer", service=DEPLOY_SVC.name,
                        source="client", source_ip=CLIENT_IP, ip=LB_IP, port=DEPLOY_SVC.port,
                        count=requests))
    progress("reading the rules back")
    dump = dump_service(manifests, DUMP_NODE, DUMP_SERVICE)
    live: dict[str, dict[str, str]] = {}
    error: str | None = None
    for node in nodes:
        try:
            live[node] = live_tables(cluster, node, backend)
        except (NetfilterError, OSError) as exc:
            error = error or f"{node}: {exc}"
    command = save_command(backend, "nat")
    if DUMP_NODE in live:
        comparison = compare_live(dump, live[DUMP_NODE]["nat"], command)
    else:
        comparison = LiveComparison(DUMP_NODE, command, False, tuple(dump.chains), (),
                                    error or "no rules read")
    external = external_name_result(dump, live, error)
    return LabResult(
        backend=backend, prefix=cluster.prefix, requests=requests, manifests=str(manifests),
        namespaces=cluster.namespaces, syncs=syncs, probes=tuple(probes), dump=dump,
        live=comparison, external_name=external,
        checks=evaluate(syncs, probes, comparison, external),
    )


def run_lab(backend: str = "nft", requests: int = DEFAULT_REQUESTS, *,
            manifests: Path | None = None,
            while_up: Callable[[LabResult], None] | None = None,
            before_teardown: Callable[[], None] | None = None,
            progress: Callable[[str], None] = lambda _: None) -> LabResult:
    """Build the lab, measure it, call ``while_up`` with the result, then tear it all down.

    ``before_teardown`` runs once the lab is about to be deleted, however the body ended (the
    command uses it to defer further signals so a second Ctrl-C cannot cut the cleanup short).
    """
    if backend not in ("nft", "legacy"):
        raise ValueError(f"backend must be 'nft' or 'legacy', not {backend!r}")
    if requests < 1:
        raise ValueError("requests must be at least 1")
    objects = manifests if manifests is not None else manifests_dir()
    cluster = Cluster(lab_spec())
    progress(f"building the cluster in namespaces {cluster.prefix}* "
             f"({len(NODES)} nodes, {len(PODS)} pods, 1 client)")
    with cluster:
        try:
            cluster.route_from_client(LB_ROUTE, via_node=LB_VIA_NODE)
            result = measure(cluster, backend, requests, objects, progress)
            if while_up is not None:
                while_up(result)
        finally:
            if before_teardown is not None:
                before_teardown()
            progress(f"tearing down {len(cluster.namespaces)} namespaces")
    return result


# ----------------------------------------------------------------------------- presenting


def _bar(count: int, total: int) -> str:
    filled = round(BAR_WIDTH * count / total) if total else 0
    return "#" * filled + " " * (BAR_WIDTH - filled)


def _pod_line(name: str, count: int, total: int) -> str:
    pod = next((p for p in PODS if p.name == name), None)
    ip, node = (pod.ip, pod.node) if pod else ("?", "?")
    share = f"{100 * count / total:3.0f}%" if total else "  -%"
    note = "  <- no answer" if count == 0 else ""
    return f"    {name:<16}{ip:<11}{node:<7}{count:>4}  {_bar(count, total)} {share}{note}"


def _sources_line(p: Probe) -> str:
    if not p.seen_as:
        return "    no answer, so no source address seen"
    seen = ", ".join(f"{ip} ({describe_ip(ip)})" + (f" x{n}" if len(p.seen_as) > 1 else "")
                     for ip, n in sorted(p.seen_as.items(), key=lambda kv: -kv[1]))
    if set(p.seen_as) == {p.source_ip}:
        verdict = "the source address was kept"
    elif set(p.seen_as) <= set(NODE_IPS.values()):
        verdict = "masqueraded to a node address"
    else:
        verdict = "neither kept nor a node address"
    return f"    the pods saw the source {seen}: {verdict}"


def _probe_block(p: Probe, heading: str) -> list[str]:
    lines = [f"  {heading}: {p.sent} requests, {p.ok_count} answered"]
    names = list(p.expected) + [n for n in p.unexpected if n not in p.expected]
    lines += [_pod_line(name, p.answered.get(name, 0), p.sent) for name in names]
    if p.errors:
        lines.append(f"    failed requests: {_counts(p.errors)}")
    lines.append(_sources_line(p))
    return lines


def _title(text: str) -> list[str]:
    return ["", f"== {text} =="]


def _service_line(s: LabService) -> str:
    if s.kind == "ExternalName":
        where, ports = f"-> {s.external_name}", "DNS alias only: no rules expected"
    else:
        where = s.cluster_ip or ""
        ports = f"port {s.port} -> {ECHO_PORT}"
        if s.node_port:
            ports += f", NodePort {s.node_port}"
        if s.lb_ip:
            ports += f", LB IP {s.lb_ip}"
    return f"    {s.name:<16}{s.kind:<14}{where:<15}{ports}"


def render_header(result: LabResult) -> list[str]:
    """The topology: nodes, client, pods, services, and how the sync on each node went."""
    lines = [
        "iptsync lab: a two-node Kubernetes-like cluster made of network namespaces",
        f"  backend {result.backend}, namespaces {result.prefix}*, manifests {result.manifests}",
        *_title("Topology"),
        "  nodes",
    ]
    lines += [f"    {n.name:<16}{n.ip:<15}pod CIDR {n.pod_cidr}" for n in NODES]
    lines += ["  client (outside the cluster)",
              f"    {'client':<16}{CLIENT_IP:<15}routes {LB_ROUTE} via {LB_VIA_NODE}",
              f"  pods (echo servers on TCP {ECHO_PORT} answering with their name)"]
    for pod in PODS:
        role = pod.service or "sends the in-cluster requests"
        lines.append(f"    {pod.name:<16}{pod.ip:<15}{pod.node:<7}{role}")
    lines.append("  services")
    lines += [_service_line(s) for s in SERVICES]
    lines.append("  iptsync run --once on each node")
    for s in result.syncs:
        parts = [part.strip() for part in s.detail.split("; ") if part.strip()]
        lines.append(f"    {s.node:<16}{'ok' if s.ok else 'FAILED'} in {s.seconds:.1f} s"
                     + (f": {parts[0]}" if parts else ""))
        lines += [f"{'':<22}{part}" for part in parts[1:]]
    return lines


def render_traffic(result: LabResult) -> list[str]:
    """The three traffic sections: ClusterIP spread, NodePort on every node, load balancer."""
    lines = _title("Connections spreading over pods")
    for p in result.probes_in("cluster-ip"):
        lines += _probe_block(p, f"{describe_ip(p.source_ip)} ({p.source_ip}) -> {p.service} "
                                 f"{p.target}")
    lines += _title("NodePort from outside on every node")
    for p in result.probes_in("nodeport"):
        lines += _probe_block(p, f"client {p.source_ip} -> {describe_ip(p.ip)} {p.target} "
                                 f"({p.service})")
    lines += _title("Load-balancer IP from outside")
    for p in result.probes_in("load-balancer"):
        lines += _probe_block(p, f"client {p.source_ip} -> {p.target} ({p.service}; routed "
                                 f"via {LB_VIA_NODE})")
    return lines


def _chain_notes(dump: DumpExcerpt) -> list[str]:
    notes: list[str] = []
    pods_by_ip = {pod.ip: pod.name for pod in PODS}
    for chain, rules in dump.chains.items():
        if chain.startswith("KUBE-SVC-"):
            notes.append(f"    {chain}  picks one pod at random, each equally likely")
        elif chain.startswith("KUBE-EXT-"):
            notes.append(f"    {chain}  NodePort/LB traffic: mark for masquerade, "
                         "then the KUBE-SVC chain")
        elif chain.startswith("KUBE-SEP-"):
            dest = next((r.args[r.args.index("--to-destination") + 1] for r in rules
                         if "--to-destination" in r.args[:-1]), "?")
            pod = pods_by_ip.get(dest.rpartition(":")[0], "?")
            notes.append(f"    {chain}  DNAT to {dest} ({pod})")
    return notes


def render_dump(result: LabResult) -> list[str]:
    """The dump excerpt for one service, a key to its chains, and the live comparison."""
    dump, live = result.dump, result.live
    lines = [*_title(f"What `iptsync dump` prints for {DUMP_SERVICE}"),
             f"  $ {dump.command}",
             f"  (nat table, only the rules of {dump.service})"]
    lines += [f"  {line}" for line in dump.lines]
    lines.append("  reading it:")
    lines += _chain_notes(dump)
    if live.error is not None:
        verdict = f"could not be read: {live.error}"
    elif live.matches:
        verdict = "the same rules"
    else:
        verdict = f"DIFFERENT in {', '.join(live.differing)}"
    lines.append(f"  {live.node}'s live rules ({live.command} in its namespace): {verdict}")
    return lines


def render_checks(result: LabResult) -> list[str]:
    """Every check with PASS/FAIL, then the summary line."""
    lines = _title("Checks")
    for check in result.checks:
        lines.append(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}")
        if not check.passed:
            lines.append(f"        {check.detail}")
    lines.append("")
    lines.append(summary_line(result))
    return lines


def summary_line(result: LabResult) -> str:
    return f"lab: {result.passed} checks passed, {result.failed} failed"


def render_text(result: LabResult) -> str:
    """The whole human-readable report."""
    lines = (render_header(result) + render_traffic(result) + render_dump(result)
             + render_checks(result))
    return "\n".join(lines) + "\n"


def result_json(result: LabResult) -> dict[str, Any]:
    """The result as JSON-ready data (``iptsync lab --json``)."""
    return {
        "backend": result.backend,
        "prefix": result.prefix,
        "requests": result.requests,
        "manifests": result.manifests,
        "namespaces": dict(result.namespaces),
        "topology": {
            "nodes": {n.name: {"ip": n.ip, "pod_cidr": n.pod_cidr} for n in NODES},
            "client": CLIENT_IP,
            "pods": {p.name: {"ip": p.ip, "node": p.node, "service": p.service} for p in PODS},
        },
        "syncs": [{"node": s.node, "ok": s.ok, "seconds": round(s.seconds, 3),
                   "detail": s.detail} for s in result.syncs],
        "probes": [{"section": p.section, "service": p.service, "source": p.source,
                    "source_ip": p.source_ip, "target": p.target, "expected": list(p.expected),
                    "sent": p.sent, "answered": dict(p.answered), "errors": dict(p.errors),
                    "seen_as": dict(p.seen_as)} for p in result.probes],
        "dump": {"node": result.dump.node, "service": result.dump.service,
                 "command": result.dump.command, "lines": result.dump.lines,
                 "services_with_svc_chain": list(result.dump.services_with_svc_chain)},
        "live": {"node": result.live.node, "command": result.live.command,
                 "matches": result.live.matches, "compared": list(result.live.compared),
                 "differing": list(result.live.differing),
                 "error": result.live.error},
        "external_name": {
            "service": result.external_name.service,
            "in_dump": result.external_name.in_dump,
            "live_mentions": {k: list(v) for k, v in result.external_name.live_mentions.items()},
            "live_svc_chains": {k: list(v)
                                for k, v in result.external_name.live_svc_chains.items()},
            "error": result.external_name.error,
        },
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail}
                   for c in result.checks],
        "passed": result.passed,
        "failed": result.failed,
    }


def keep_hint(result: LabResult) -> str:
    """How to look around the lab while ``--keep`` holds it up."""
    ns = result.namespaces
    node1, client_pod = ns.get("node:node1", "?"), ns.get(f"pod:{CLIENT_POD.name}", "?")
    echo = f"{sys.executable} -m iptsync.lab.echo ask --proto tcp"
    width = max(len(key) for key in ns) if ns else 0
    lines = [
        "",
        "The lab stays up until you press Enter (or Ctrl-C). From another shell, as root:",
        f"  ip netns exec {node1} {save_command(result.backend, 'nat')}",
        f"  ip netns exec {node1} conntrack -L",
        f"  ip netns exec {client_pod} {echo} --to {DEPLOY_SVC.cluster_ip}:80 --count 5",
        f"  ip netns exec {ns.get('client', '?')} {echo} --to {LB_IP}:80 --count 5",
        "namespaces:",
        *(f"  {key:<{width}}  {name}" for key, name in ns.items()),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


class SignalGuard:
    """Turns SIGINT, SIGTERM and SIGHUP into one KeyboardInterrupt, then defers the rest.

    The first signal raises ``KeyboardInterrupt`` wherever the lab is, so the cluster's context
    manager deletes every namespace. Once :meth:`defer` was called (teardown has begun) or a
    signal was already taken, SIGINT is ignored and SIGTERM/SIGHUP only print a note: the
    cleanup must not be cut short. The previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def defer(self) -> None:
        """From now on signals no longer interrupt (teardown in progress).

        SIGINT is ignored outright rather than handled: a Ctrl-C in the terminal reaches the
        whole process group, and the ``ip netns del`` commands of the teardown inherit an
        ignored SIGINT, so a second Ctrl-C cannot kill them halfway either.
        """
        self.deferring = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring:
            self.signum = self.signum or signum
            self.err.write("lab: removing the namespaces, please wait\n")
            self.err.flush()
            return
        self.signum = signum
        self.defer()
        raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_for_enter(stdin: TextIO) -> None:
    """Block until a line (Enter), end of input, Ctrl-C or SIGTERM."""
    with contextlib.suppress(KeyboardInterrupt):
        stdin.readline()


def run_command(*, backend: str = "nft", requests: int = DEFAULT_REQUESTS, keep: bool = False,
                as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                stdin: TextIO | None = None) -> int:
    """``iptsync lab``: run the lab, print the report; the exit status (0: every check passed,
    1: a check failed, 2: the lab could not run, 128+N: stopped by signal N)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    stdin = stdin if stdin is not None else sys.stdin
    reason = cannot_run_reason(backend)
    if reason is not None:
        err.write(f"{reason}\n")
        return 2

    def progress(message: str) -> None:
        err.write(f"lab: {message}\n")
        err.flush()

    shown: list[LabResult] = []

    def show(result: LabResult) -> None:
        if as_json:
            json.dump(result_json(result), out, indent=2)
            out.write("\n")
        else:
            out.write(render_text(result))
        out.flush()
        shown.append(result)  # from here on, a signal only ends the lab early
        if keep:  # on stderr: stdout stays the report (or the JSON) alone
            err.write(keep_hint(result) + "\n")
            err.flush()
            wait_for_enter(stdin)

    result: LabResult | None = None
    with SignalGuard(err) as guard:
        try:
            result = run_lab(backend, requests, while_up=show, before_teardown=guard.defer,
                             progress=progress)
        except KeyboardInterrupt:
            result = shown[0] if shown else None
        except (LabError, netns.NetnsError, OSError) as exc:
            err.write(f"iptsync lab: {exc}\n")
            return 2
    if result is None:
        name = signal.Signals(guard.signum).name if guard.signum else "interrupt"
        err.write(f"lab: stopped by {name}; all namespaces removed\n")
        return 128 + (guard.signum or signal.SIGINT)
    return 0 if result.ok else 1

