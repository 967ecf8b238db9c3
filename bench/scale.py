"""Scale benchmark (issue #6): iptsync's syncs against the floor and against kube-proxy's shape.

For each iptables backend, in network namespaces of its own (created here, deleted on exit,
Ctrl-C and SIGTERM; the host's rules are never touched), on a synthetic cluster from
:mod:`bench.generate`:

1. ``iptsync dump`` (the real CLI, a subprocess): wall time and peak RSS (``os.wait4``).
2. First full sync into an empty namespace with :class:`iptsync.engine.reconciler.Engine`
   (every object upserted, then one sync), end to end, with the report's phases; against the
   floor, a plain flushing ``iptables-restore`` of the same rules into another empty namespace.
3. Three changes, each applied by iptsync's partial sync (event to rules: upsert/delete plus
   sync) and, on the same kernel state, by a kube-proxy-style partial restore: one
   ``--noflush`` batch declaring and refilling every filter chain kube-proxy writes, nat
   KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING and KUBE-MARK-MASQ, the changed service's
   own chains, and ``-X`` of the chains it no longer has (kube-proxy's ``syncProxyRules``
   with ``tryPartialSync``). Only kube-proxy's restore is timed, not its render: a lower
   bound for kube-proxy. Both sides are reverted after each measurement, so every sample
   starts from the same rules.
4. The floor of any partial sync (one rule added in a new nat chain, on the loaded kernel), a
   full resync with nothing changed, and memory: the peak RSS of the real agent (``iptsync run
   --once`` inside a namespace, first sync and restart) and of this process.

    python -m bench.scale --services 10000 --endpoints 10 --backend both --out docs/performance.md
    python -m bench.scale --quick          # 300 services x 5 endpoints, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.generate import cluster, service_objects
from iptsync.core import names
from iptsync.core.plan import comparable
from iptsync.core.policy import Settings
from iptsync.core.render import jump_rules
from iptsync.core.ruleset import chain_line
from iptsync.core.state import ServiceKey
from iptsync.engine.apply import STAGE_LINES
from iptsync.engine.desired import Desired, desired_from_objects
from iptsync.engine.reconciler import Engine, EngineReport, bulk, render_service
from iptsync.kernel.netfilter import Backend, Netfilter
from iptsync.lab.netns import temporary_netns
from iptsync.options import build_settings

NODE = "node1"
CLUSTER_CIDR = "10.0.0.0/8"
QUICK = (300, 5)
TARGET_FULL_RATIO = 1.3
TARGET_CHANGE_RATIO = 5.0
TARGET_ENDPOINT_SECONDS = 0.2
TARGET_RSS_MB = 400.0
TARGET_DUMP_SECONDS = 3.0

# kube-proxy's syncProxyRules declares (so flushes) and refills these on every sync, partial
# or not; KUBE-FIREWALL only with localhost NodePorts (the default), as here.
KUBE_PROXY_FILTER_CHAINS = (names.KUBE_SERVICES, names.KUBE_EXTERNAL_SERVICES,
                            names.KUBE_FORWARD, names.KUBE_NODEPORTS,
                            names.KUBE_PROXY_FIREWALL, names.KUBE_FIREWALL)
KUBE_PROXY_NAT_CHAINS = (names.KUBE_SERVICES, names.KUBE_NODEPORTS, names.KUBE_POSTROUTING,
                         names.KUBE_MARK_MASQ)

# The smallest nat change that adds a rule, in a chain nobody else uses: the floor of any
# partial sync on a kernel holding the whole cluster.
PROBE_CHAIN = "IPTSYNC-BENCH-PROBE"
PROBE_PAYLOAD = f"*nat\n:{PROBE_CHAIN} - [0:0]\n-A {PROBE_CHAIN} -j RETURN\nCOMMIT\n"
PROBE_UNDO = f"*nat\n:{PROBE_CHAIN} - [0:0]\n-X {PROBE_CHAIN}\nCOMMIT\n"

Manifest = dict[str, Any]
Op = tuple[str, Manifest]  # ("upsert" | "delete", manifest)
Tables = dict[str, dict[str, list[str]]]  # table -> chain -> canonical rules

# Row labels of the results table, in order (the smoke test checks each is printed).
ROWS = (
    "`iptsync dump` time",
    "`iptsync dump` peak RSS",
    "full sync: iptsync, end to end",
    "full sync: bare `iptables-restore` (floor)",
    "full sync: iptsync / bare restore",
    "(a) +1 endpoint: iptsync partial sync",
    "(a) +1 endpoint: kube-proxy-style restore",
    "(a) +1 endpoint: kube-proxy-style / iptsync",
    "(b) +1 service: iptsync partial sync",
    "(b) +1 service: kube-proxy-style restore",
    "(b) +1 service: kube-proxy-style / iptsync",
    "(c) -1 service: iptsync partial sync",
    "(c) -1 service: kube-proxy-style restore",
    "(c) -1 service: kube-proxy-style / iptsync",
    "one-rule `--noflush` restore into the loaded nat table",
    "the same, KUBE-SERVICES reached from PREROUTING only",
    "the same, KUBE-SERVICES reached from no built-in chain",
    "no-op full resync",
    "no-op full resync found the kernel as expected",
    "agent `run --once` peak RSS, empty netns",
    "agent `run --once` peak RSS, restart on loaded netns",
    "agent `run --once` time, empty netns",
    "agent `run --once` time, restart on loaded netns",
    "bench process peak RSS (holds the benchmark's renders too)",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the workload ------------------------------------------------------------------------------

@dataclass
class Change:
    """One change: how to apply it and how to undo it, as engine events."""

    key: str  # "a", "b", "c"
    label: str
    service: ServiceKey
    forward: list[Op]
    backward: list[Op]
    after: list[Manifest]  # every object once the change is applied


@dataclass
class Workload:
    """The cluster, its manifests file, and every payload the benchmark replays."""

    services: int
    endpoints: int
    settings: Settings
    objects: list[Manifest]
    path: Path
    changes: list[Change]
    bare_payload: str = ""
    kube_proxy_forward: dict[str, str] = field(default_factory=dict)
    kube_proxy_backward: dict[str, str] = field(default_factory=dict)
    rule_lines: int = 0
    chains: int = 0
    expected: dict[str, Expected] = field(default_factory=dict)  # "base" and change keys

    @classmethod
    def build(cls, services: int, endpoints: int, directory: Path, *, seed: int = 1,
              verify: bool = False) -> Workload:
        if services < 3:
            raise ValueError("the benchmark needs at least 3 services")
        objects: list[Manifest] = cluster(services, endpoints, seed)["items"]
        path = directory / f"cluster-{services}x{endpoints}.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        settings = build_settings(node_name=NODE, cluster_cidr=CLUSTER_CIDR,
                                  masquerade_all=False, masquerade_bit=14,
                                  nodeport_addresses=None, node_ips=(),
                                  localhost_nodeports=True)
        work = cls(services, endpoints, settings, objects, path,
                   make_changes(objects, services, endpoints, seed))
        work._prepare(verify)
        return work

    def _prepare(self, verify: bool) -> None:
        """Render every state once: the bare payload, kube-proxy's payloads, expectations."""
        base = desired_from_objects(self.objects, self.settings)
        self.bare_payload = base.payload()
        self.rule_lines = sum(len(content.lines) for chains in base.tables.tables.values()
                              for content in chains.values())
        self.chains = sum(len(chains) for chains in base.tables.tables.values())
        base_chains = set(base.tables.tables["nat"])
        if verify:
            self.expected["base"] = Expected.of(base)
        for change in self.changes:
            after = desired_from_objects(change.after, self.settings)
            after_chains = set(after.tables.tables["nat"])
            self.kube_proxy_forward[change.key] = kube_proxy_payload(
                after, change.service, stale=base_chains - after_chains)
            self.kube_proxy_backward[change.key] = kube_proxy_payload(
                base, change.service, stale=after_chains - base_chains)
            if verify:
                self.expected[change.key] = Expected.of(after)


def _find(objects: Sequence[Manifest], kind: str, name: str) -> Manifest:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def make_changes(objects: list[Manifest], services: int, endpoints: int,
                 seed: int) -> list[Change]:
    """(a) one endpoint more for svc-00001 (ClusterIP); (b) a new NodePort service with
    ``endpoints`` endpoints; (c) svc-00002 (ClusterIP) and its slice removed."""
    changes = []

    svc = _find(objects, "Service", "svc-00001")
    old_slice = _find(objects, "EndpointSlice", "svc-00001-abcde")
    new_slice = copy.deepcopy(old_slice)
    new_slice["endpoints"].append({"addresses": ["10.254.0.1"], "nodeName": "node3",
                                   "conditions": {"ready": True}})
    changes.append(Change(
        "a", "+1 endpoint", (svc["metadata"]["namespace"], "svc-00001"),
        [("upsert", new_slice)], [("upsert", old_slice)],
        [new_slice if o is old_slice else o for o in objects]))

    # A plain NodePort (not LoadBalancer, not ETP=Local, no affinity in the generator's mix),
    # on a node port the generator never hands out.
    index = next(i for i in range(services, services + 1000)
                 if i % 10 == 0 and i % 20 and i % 25)
    new_svc, new_svc_slice = service_objects(index, endpoints, random.Random(seed + 1))
    new_svc["spec"]["ports"][0]["nodePort"] = 32767
    key = (new_svc["metadata"]["namespace"], new_svc["metadata"]["name"])
    changes.append(Change(
        "b", "+1 service", key,
        [("upsert", new_svc), ("upsert", new_svc_slice)],
        [("delete", new_svc), ("delete", new_svc_slice)],
        [*objects, new_svc, new_svc_slice]))

    gone_svc = _find(objects, "Service", "svc-00002")
    gone_slice = _find(objects, "EndpointSlice", "svc-00002-abcde")
    changes.append(Change(
        "c", "-1 service", (gone_svc["metadata"]["namespace"], "svc-00002"),
        [("delete", gone_svc), ("delete", gone_slice)],
        [("upsert", gone_svc), ("upsert", gone_slice)],
        [o for o in objects if o is not gone_svc and o is not gone_slice]))
    return changes


def service_chains(desired: Desired, service: ServiceKey) -> list[str]:
    """The nat chains of one service in ``desired`` (none when it does not exist)."""
    info = desired.state.services.get(service)
    if info is None:
        return []
    own = render_service(info, desired.state, desired.settings, False).chains
    return [chain for chain in desired.tables.tables["nat"] if chain in own]


def kube_proxy_payload(desired: Desired, service: ServiceKey, stale: Iterable[str]) -> str:
    """kube-proxy's partial-sync batch for a change to ``service``, ending in ``desired``.

    The filter chains and nat's top-level chains are declared (flushed) and refilled in full;
    of the service chains, only the changed service's are written, and the ones that are gone
    are declared and deleted.
    """
    tables = desired.tables.tables
    filter_chains = [c for c in KUBE_PROXY_FILTER_CHAINS if c in tables["filter"]]
    nat_chains = [c for c in KUBE_PROXY_NAT_CHAINS if c in tables["nat"]]
    nat_chains += service_chains(desired, service)
    stale = sorted(stale)
    lines = ["*filter", *map(chain_line, filter_chains)]
    lines += [line for chain in filter_chains for line in tables["filter"][chain].lines]
    lines += ["COMMIT", "*nat", *map(chain_line, nat_chains), *map(chain_line, stale)]
    lines += [line for chain in nat_chains for line in tables["nat"][chain].lines]
    lines += [f"-X {chain}" for chain in stale]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ChainContent.free of each chain: where order does not matter
Spans = dict[tuple[str, str], tuple[int, int] | None]


@dataclass
class Expected:
    """What a fresh full render puts in the chains we own (canonical), and where the order
    of the rules does not matter (the services' rules in top-level chains)."""

    tables: Tables
    free: Spans

    @classmethod
    def of(cls, desired: Desired) -> Expected:
        tables = desired.tables.tables
        free = {(table, chain): content.free for table, chains in tables.items()
                for chain, content in chains.items()}
        return cls(services_sorted({table: {chain: content.canonical_rules()
                                            for chain, content in chains.items()}
                                    for table, chains in tables.items()}, free),
                   free)


def services_sorted(tables: Tables, free: Spans) -> Tables:
    return {table: {chain: comparable(rules, free.get((table, chain)))
                    for chain, rules in chains.items()} for table, chains in tables.items()}


def live_tables(netfilter: Netfilter) -> Tables:
    """The kernel's chains that iptsync owns (and kubelet's shared KUBE-FIREWALL)."""
    return {table: {chain: rules for chain, rules in saved.chains.items()
                    if names.is_owned_chain(table, chain) or chain == names.KUBE_FIREWALL}
            for table, saved in netfilter.save().items()}


def differences(expected: Tables, live: Tables) -> list[str]:
    """``table/chain`` for every chain whose rules differ (missing or extra chains too)."""
    out = []
    for table in sorted(set(expected) | set(live)):
        want, have = expected.get(table, {}), live.get(table, {})
        out += [f"{table}/{chain}" for chain in sorted(set(want) | set(have))
                if want.get(chain) != have.get(chain)]
    return out


# --- measuring -----------------------------------------------------------------------------------

@dataclass
class Samples:
    """Repeated timings, in seconds."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    def text(self) -> str:
        if len(self.values) == 1:
            return seconds(self.values[0])
        return f"{seconds(self.median)} ({seconds(self.low)} to {seconds(self.high)})"


def seconds(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


@dataclass
class Measured:
    """One subprocess: wall time, peak RSS (MB), exit status, what it logged last."""

    seconds: float
    max_rss_mb: float
    returncode: int
    last_log: str = ""
    log: list[str] = field(default_factory=list)  # every line it logged


# Forks the command from a small process and reports its peak RSS and wall time. Measuring
# from here would be wrong: a child started by this (large) process inherits its high-water
# mark at exec, so ru_maxrss would never read below this process's own size.
_MEASURE = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(2, b"\\n@measured %d %.6f\\n" % (usage.ru_maxrss, time.perf_counter() - started))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv: Sequence[str], stdout: Any = subprocess.DEVNULL) -> Measured:
    """Run ``argv`` and read its own peak RSS (``os.wait4``; ``ip netns exec`` execs in place,
    so through it this is the command's). The baseline is the forking helper's few MB."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], stdout=stdout,
                              stderr=err, check=False)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    marks = [line for line in lines if line.startswith("@measured ")]
    if not marks:
        raise RuntimeError(f"could not measure {argv[0]}: {lines[-5:]}")
    _tag, rss_kb, elapsed = marks[-1].split()
    logged = [line for line in lines if line.strip() and not line.startswith("@measured ")]
    return Measured(float(elapsed), int(rss_kb) / 1024, proc.returncode,
                    logged[-1] if logged else "", logged)


def iptsync_command() -> list[str]:
    script = Path(sys.executable).with_name("iptsync")
    return [str(script)] if script.exists() else [sys.executable, "-m", "iptsync.cli"]


def node_flags(path: Path) -> list[str]:
    return ["--objects", str(path), "--hostname-override", NODE, "--cluster-cidr", CLUSTER_CIDR]


@dataclass
class DumpResult:
    time: Samples
    max_rss_mb: float
    lines: int


def measure_dump(path: Path, repetitions: int) -> DumpResult:
    """``iptsync dump`` on the cluster file, ``repetitions`` times; the largest peak RSS."""
    times = Samples()
    rss = 0.0
    lines = 0
    for _ in range(repetitions):
        with tempfile.TemporaryFile() as out:
            measured = run_measured([*iptsync_command(), "dump", *node_flags(path)], out)
            if measured.returncode != 0:
                raise RuntimeError(f"iptsync dump failed: {measured.last_log}")
            out.seek(0)
            lines = sum(1 for _ in out)
        times.values.append(measured.seconds)
        rss = max(rss, measured.max_rss_mb)
    return DumpResult(times, rss, lines)


def namespace(tag: str) -> contextlib.AbstractContextManager[str]:
    """A fresh network namespace with loopback up; deleted on exit, whatever happens."""
    return temporary_netns(f"iptsync-bench-{os.getpid()}-{tag}")


def apply_ops(engine: Engine, ops: Iterable[Op]) -> None:
    for op, manifest in ops:
        if op == "upsert":
            engine.upsert(manifest)
        else:
            engine.delete(manifest)


def timed_change(engine: Engine, ops: Iterable[Op]) -> tuple[float, EngineReport]:
    """Event to rules in the kernel: the events, then one (partial) sync."""
    started = time.perf_counter()
    apply_ops(engine, ops)
    report = engine.sync()
    return time.perf_counter() - started, report


def timed_restore(netfilter: Netfilter, payload: str, *, noflush: bool = True) -> float:
    started = time.perf_counter()
    netfilter.restore(payload, noflush=noflush)
    return time.perf_counter() - started


def median_phases(reports: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for phases in reports for k in phases)
    return {k: statistics.median(p.get(k, 0.0) for p in reports) for k in keys}


@dataclass
class ChangeResult:
    key: str
    label: str
    iptsync: Samples = field(default_factory=Samples)
    kube_proxy: Samples = field(default_factory=Samples)
    phases: dict[str, float] = field(default_factory=dict)  # medians
    summary: str = ""  # the iptsync plan
    iptsync_lines: int = 0  # restore lines iptsync wrote
    kube_proxy_lines: int = 0
    all_partial: bool = True

    @property
    def ratio(self) -> float:
        return self.kube_proxy.median / self.iptsync.median


@dataclass
class BackendResult:
    backend: str
    full: Samples = field(default_factory=Samples)
    full_phases: dict[str, float] = field(default_factory=dict)  # last full sync, + "upsert"
    full_summary: str = ""
    bare: Samples = field(default_factory=Samples)
    changes: list[ChangeResult] = field(default_factory=list)
    probe: Samples = field(default_factory=Samples)  # one rule added: any partial's floor
    # The same with fewer built-in chains reaching KUBE-SERVICES (the kernel validates every
    # chain reachable from a base chain once per path when a batch adds a rule).
    probe_one_hook: Samples = field(default_factory=Samples)
    probe_unhooked: Samples = field(default_factory=Samples)
    resync: Samples = field(default_factory=Samples)
    resync_phases: dict[str, float] = field(default_factory=dict)
    resync_clean: bool = False
    bench_max_rss_mb: float = float("nan")
    agent_first: Measured | None = None
    agent_restart: Measured | None = None
    mismatches: list[str] = field(default_factory=list)  # "where: table/chain" (--verify)

    @property
    def full_ratio(self) -> float:
        return self.full.median / self.bare.median


def measure_backend(backend: Backend, work: Workload, *, repetitions: int,
                    full_repetitions: int = 1, verify: bool = False,
                    agent: bool = True) -> BackendResult:
    result = BackendResult(backend.value)

    def check(netfilter: Netfilter, state: str, where: str) -> None:
        if verify:
            want = work.expected[state]
            diff = differences(want.tables, services_sorted(live_tables(netfilter), want.free))
            result.mismatches += [f"{where}: {d}" for d in diff]

    def first_sync(netfilter: Netfilter) -> Engine:
        log(f"{backend.value}: first full sync with the engine")
        engine = Engine(netfilter, work.settings,
                        stage_lines=STAGE_LINES[backend])
        started = time.perf_counter()
        with bulk():  # as the agent's first lists (replace_kind) and run --once do
            for obj in work.objects:
                engine.upsert(obj)
        parsed = time.perf_counter() - started
        report = engine.sync()
        result.full.values.append(time.perf_counter() - started)
        result.bench_max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.full_phases = {"upsert": parsed, **report.phases}
        result.full_summary = report.plan.summary()
        check(netfilter, "base", "full sync")
        return engine

    with contextlib.ExitStack() as keep:
        for rep in range(full_repetitions):
            with namespace(f"{backend.value}-bare{rep}") as bare_ns:
                bare_nf = Netfilter(backend, netns=bare_ns)
                log(f"{backend.value}: bare restore ({work.rule_lines} rules)")
                result.bare.values.append(timed_restore(bare_nf, work.bare_payload,
                                                        noflush=False))
                check(bare_nf, "base", "bare restore")
            if rep < full_repetitions - 1:
                with namespace(f"{backend.value}-engine{rep}") as ns:
                    first_sync(Netfilter(backend, netns=ns))
        # The last first sync stays: the changes are measured on its kernel state.
        netfilter = Netfilter(backend, netns=keep.enter_context(
            namespace(f"{backend.value}-engine")))
        engine = first_sync(netfilter)

        for change in work.changes:
            log(f"{backend.value}: change ({change.key}) {change.label}")
            outcome = ChangeResult(change.key, change.label)
            forward = work.kube_proxy_forward[change.key]
            backward = work.kube_proxy_backward[change.key]
            outcome.kube_proxy_lines = forward.count("\n")
            phases = []
            for rep in range(repetitions):
                # Alternate which side goes first, so drift in the machine's load hits both.
                for side in (("iptsync", "kube-proxy") if rep % 2 == 0
                             else ("kube-proxy", "iptsync")):
                    if side == "iptsync":
                        took, report = timed_change(engine, change.forward)
                        outcome.iptsync.values.append(took)
                        outcome.all_partial &= not report.full
                        phases.append(report.phases)
                        outcome.summary = report.plan.summary()
                        outcome.iptsync_lines = (len(report.plan.payload_lines())
                                                 + sum(map(len, report.plan.stages())))
                        check(netfilter, change.key, f"({change.key}) iptsync")
                        apply_ops(engine, change.backward)
                        outcome.all_partial &= not engine.sync().full
                        check(netfilter, "base", f"({change.key}) iptsync undone")
                    else:
                        outcome.kube_proxy.values.append(timed_restore(netfilter, forward))
                        check(netfilter, change.key, f"({change.key}) kube-proxy-style")
                        netfilter.restore(backward)
                        check(netfilter, "base", f"({change.key}) kube-proxy-style undone")
            outcome.phases = median_phases(phases)
            result.changes.append(outcome)

        log(f"{backend.value}: one-rule restores")
        for _ in range(repetitions):
            result.probe.values.append(timed_restore(netfilter, PROBE_PAYLOAD))
            netfilter.restore(PROBE_UNDO)
        log(f"{backend.value}: one-rule restores with KUBE-SERVICES unhooked")
        probe_unhooked(netfilter, work.settings, repetitions, result)
        log(f"{backend.value}: no-op full resyncs")
        resyncs = []
        for rep in range(repetitions):
            started = time.perf_counter()
            report = engine.sync(full=True)
            result.resync.values.append(time.perf_counter() - started)
            resyncs.append(report.phases)
            if rep == 0:
                result.resync_clean = report.plan.empty and not report.drifted
        result.resync_phases = median_phases(resyncs)
        del engine  # the agent below measures its own memory; free ours first
        if agent:
            log(f"{backend.value}: agent run --once, restart on the loaded namespace")
            result.agent_restart = run_agent(backend, work.path, netfilter.netns)
    if agent:
        with namespace(f"{backend.value}-agent") as agent_ns:
            log(f"{backend.value}: agent run --once into an empty namespace")
            result.agent_first = run_agent(backend, work.path, agent_ns)
            check(Netfilter(backend, netns=agent_ns), "base", "agent run --once")
    return result


def probe_unhooked(netfilter: Netfilter, settings: Settings, repetitions: int,
                   result: BackendResult) -> None:
    """The one-rule restore again with nat OUTPUT's jump to KUBE-SERVICES removed, then
    PREROUTING's too; both jumps are put back at the top of their chains afterwards."""
    hooks = [j for j in jump_rules(settings)
             if j.table == "nat" and j.args[-1] == names.KUBE_SERVICES]
    by_chain = {j.chain: j for j in hooks}
    removed = []
    try:
        for chain, samples in (("OUTPUT", result.probe_one_hook),
                               ("PREROUTING", result.probe_unhooked)):
            netfilter.restore(f"*nat\n{by_chain[chain].rule.restore_line('-D')}\nCOMMIT\n")
            removed.append(by_chain[chain])
            for _ in range(repetitions):
                samples.values.append(timed_restore(netfilter, PROBE_PAYLOAD))
                netfilter.restore(PROBE_UNDO)
    finally:
        if removed:
            netfilter.restore("*nat\n" + "".join(f"{j.rule.restore_line('-I', 1)}\n"
                                                  for j in removed) + "COMMIT\n")


def run_agent(backend: Backend, path: Path, netns: str | None) -> Measured:
    assert netns is not None
    measured = run_measured(["ip", "netns", "exec", netns, *iptsync_command(), "run", "--once",
                             *node_flags(path), "--iptables-backend", backend.value])
    if measured.returncode != 0:
        raise RuntimeError(f"iptsync run --once failed: {measured.last_log}")
    return measured


# --- reporting -----------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def table(work: Workload, dump: DumpResult | None, results: Sequence[BackendResult]) -> str:
    """The results as a Markdown table, one column per backend."""
    header = ["Measurement", "Target", *(r.backend for r in results)]
    rows: list[list[str]] = []

    def row(label: str, target: str, cells: Iterable[str]) -> None:
        rows.append([label, target, *cells])

    def each(fn: Callable[[BackendResult], str]) -> list[str]:
        return [fn(r) for r in results]

    same = [dump.time.text() if dump else "-"] * len(results)
    row(ROWS[0], f"< {TARGET_DUMP_SECONDS:.0f} s" + (
        f" ({verdict(dump.time.median < TARGET_DUMP_SECONDS)})" if dump else ""), same)
    row(ROWS[1], "-", [f"{dump.max_rss_mb:.0f} MB" if dump else "-"] * len(results))
    row(ROWS[2], "", each(lambda r: r.full.text()))
    row(ROWS[3], "", each(lambda r: r.bare.text()))
    row(ROWS[4], f"≤ {TARGET_FULL_RATIO}x", each(
        lambda r: f"{r.full_ratio:.2f}x ({verdict(r.full_ratio <= TARGET_FULL_RATIO)})"))
    for index, key in enumerate("abc"):
        base = 5 + 3 * index
        changes = [next(c for c in r.changes if c.key == key) for r in results]
        cells = [c.iptsync.text() for c in changes]
        if key == "a":
            cells = [text + (f" ({verdict(c.iptsync.median < TARGET_ENDPOINT_SECONDS)})"
                             if r.backend == "nft" else "")
                     for text, c, r in zip(cells, changes, results, strict=True)]
        row(ROWS[base], f"< {TARGET_ENDPOINT_SECONDS} s on nft" if key == "a" else "", cells)
        row(ROWS[base + 1], "", [c.kube_proxy.text() for c in changes])
        row(ROWS[base + 2], f"≥ {TARGET_CHANGE_RATIO:.0f}x",
            [f"{c.ratio:.1f}x ({verdict(c.ratio >= TARGET_CHANGE_RATIO)})" for c in changes])
    row(ROWS[14], "", each(lambda r: r.probe.text()))
    row(ROWS[15], "", each(lambda r: r.probe_one_hook.text()))
    row(ROWS[16], "", each(lambda r: r.probe_unhooked.text()))
    row(ROWS[17], "", each(lambda r: r.resync.text()))
    row(ROWS[18], "", each(lambda r: "yes" if r.resync_clean else "**no**"))

    def rss(m: Measured | None, target: bool) -> str:
        if m is None:
            return "-"
        return f"{m.max_rss_mb:.0f} MB" + (
            f" ({verdict(m.max_rss_mb < TARGET_RSS_MB)})" if target else "")

    row(ROWS[19], f"< {TARGET_RSS_MB:.0f} MB", each(lambda r: rss(r.agent_first, True)))
    row(ROWS[20], f"< {TARGET_RSS_MB:.0f} MB", each(lambda r: rss(r.agent_restart, True)))
    row(ROWS[21], "", each(lambda r: seconds(r.agent_first.seconds) if r.agent_first else "-"))
    row(ROWS[22], "", each(
        lambda r: seconds(r.agent_restart.seconds) if r.agent_restart else "-"))
    row(ROWS[23], "", each(lambda r: f"{r.bench_max_rss_mb:.0f} MB"))
    return markdown(header, rows)


PHASES = ("upsert", "render", "read", "plan", "apply", "other", "total")


def phase_table(result: BackendResult) -> str:
    """Per-phase times (ms) of one backend's syncs, from the engine's reports."""
    samples = len(result.full.values)
    label = "first full sync" + (f" (the last of {samples})" if samples > 1 else "")
    rows = [[label, *phase_cells(result.full_phases)]]
    for c in result.changes:
        rows.append([f"({c.key}) {c.label} (median)", *phase_cells(c.phases)])
    rows.append(["no-op full resync (median)", *phase_cells(result.resync_phases)])
    return markdown(["Sync", *(f"{p} (ms)" for p in PHASES)], rows)


def phase_cells(phases: dict[str, float]) -> list[str]:
    if "total" in phases:
        # What the engine's report does not name (e.g. assembling the desired tables).
        named = sum(v for k, v in phases.items() if k not in ("upsert", "total"))
        phases = {**phases, "other": phases["total"] - named}
    return [f"{phases[p] * 1000:.1f}" if p in phases else "-" for p in PHASES]


def payload_table(results: Sequence[BackendResult]) -> str:
    rows = []
    for c in results[0].changes if results else []:
        rows.append([f"({c.key}) {c.label}", str(c.iptsync_lines), str(c.kube_proxy_lines),
                     c.summary])
    return markdown(["Change", "iptsync restore lines", "kube-proxy-style restore lines",
                     "iptsync plan"], rows)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def dominant_phase(phases: dict[str, float]) -> str:
    named = {k: v for k, v in phases.items() if k != "total"}
    if not named:
        return "-"
    name = max(named, key=lambda k: named[k])
    total = phases.get("total", 0.0) + phases.get("upsert", 0.0)
    other = phases.get("total", 0.0) - sum(v for k, v in named.items() if k != "upsert")
    if other > named[name]:
        name, named[name] = "other (unnamed in the report)", other
    return f"{name} ({named[name]:.2f} s of {total:.2f} s)"


def source_digest() -> str:
    """A digest of the iptsync sources measured (the tree may be edited during a run)."""
    package = Path(names.__file__).resolve().parents[1]  # iptsync/, not iptsync/core/
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict[str, str]:
    def version(tool: str) -> str:
        try:
            return subprocess.run([tool, "--version"], capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return "not installed"

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), "0")
    return {
        "CPUs (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU": cpu,
        "memory": f"{int(mem) / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "iptables (nft)": version("iptables-nft"),
        "iptables (legacy)": version("iptables-legacy"),
        "Python": platform.python_version(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "iptsync sources (sha256 of iptsync/**/*.py)": source_digest(),
    }


def plot(results: Sequence[BackendResult], path: Path, title: str) -> None:
    """One panel per backend, log scale: per change, iptsync's partial sync vs the
    kube-proxy-style restore; and the first full sync vs the bare restore (the floor)."""
    import matplotlib  # noqa: PLC0415  (only the bench extra has it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.8),
                             squeeze=False, sharey=True)
    width = 0.38
    colors = {"iptsync": "#2a7ab0", "kube-proxy-style restore": "#c8553d",
              "bare iptables-restore (floor)": "#9a9a9a"}
    every = [v for r in results for s in (r.full, r.bare) for v in s.values]
    every += [v for r in results for c in r.changes
              for s in (c.iptsync, c.kube_proxy) for v in s.values]
    for ax, result in zip(axes[0], results, strict=True):
        groups = [(f"({c.key}) {c.label}", c.iptsync, "kube-proxy-style restore", c.kube_proxy)
                  for c in result.changes]
        groups.append(("first full sync", result.full, "bare iptables-restore (floor)",
                       result.bare))
        for x, (_label, ours, other_name, other) in enumerate(groups):
            for offset, name, samples in ((-width / 2, "iptsync", ours),
                                          (width / 2, other_name, other)):
                error = [[samples.median - samples.low], [samples.high - samples.median]]
                ax.bar(x + offset, samples.median, width, yerr=error, capsize=3,
                       color=colors[name], label=name)
            ratio = (other.median / ours.median if other_name != "bare iptables-restore (floor)"
                     else ours.median / other.median)
            digits = 2 if other_name == "bare iptables-restore (floor)" else 1
            ax.annotate(f"{ratio:.{digits}f}x", (x, max(ours.high, other.high) * 1.3),
                        ha="center", fontsize=9)
        if result.backend == "nft":
            ax.axhline(TARGET_ENDPOINT_SECONDS, linestyle="--", color="black", linewidth=0.8,
                       label=f"{TARGET_ENDPOINT_SECONDS} s target for (a) on nft")
        ax.set_yscale("log")
        ax.set_ylim(min(every) / 2, max(every) * 4)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g} s"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=9)
        ax.set_title(f"{result.backend} backend")
        ax.grid(axis="y", which="major", linewidth=0.4, alpha=0.6)
    axes[0][0].set_ylabel("seconds: median, whiskers min to max")
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles),
               fontsize=9, frameon=False)
    fig.suptitle(f"{title} (ratios: kube-proxy-style / iptsync; full sync: iptsync / floor)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def document(work: Workload, dump: DumpResult | None, results: Sequence[BackendResult], *,
             info: dict[str, str], started: datetime.datetime, repetitions: int,
             full_repetitions: int, png: str | None, command: str) -> str:
    """docs/performance.md: the machine, the tables, the plot and what they say."""
    size = f"{work.services:,} services x {work.endpoints} endpoints"
    out = [f"# Performance at {size}", "",
           f"Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC "
           f"(issue #6; see DESIGN.md, \"Performance targets\").", "",
           "## Machine", "", markdown(["", ""], list(map(list, info.items()))),
           "## Workload", "",
           f"`bench/generate.py`: {size} (every 10th a NodePort, every 20th a LoadBalancer, "
           "every 50th of those ETP=Local, every 25th ClientIP affinity), node `node1`, "
           f"`--cluster-cidr {CLUSTER_CIDR}`. A full render is {work.rule_lines:,} rules in "
           f"{work.chains:,} chains ({dump.lines if dump else 0:,} lines of `iptsync dump`).",
           "",
           "The changes: (a) one endpoint added to the EndpointSlice of `svc-00001` "
           "(ClusterIP); (b) a new NodePort service with its slice "
           f"({work.endpoints} endpoints); (c) `svc-00002` (ClusterIP) and its slice "
           f"removed. Each is measured {repetitions} times per side (median, min to max); the "
           f"full sync and the bare restore {full_repetitions} time(s) each.", "",
           "## Results", "", table(work, dump, results), ""]
    if png:
        out += [f"![iptsync partial syncs vs kube-proxy-style restores]({png})", ""]
    out += ["## Where the time goes", "",
            "Phases from the engine's sync reports (`upsert`: feeding every manifest to "
            "`Engine.upsert`, i.e. parsing and state; `read`: iptables-save and parsing; "
            "`apply`: iptables-restore, staged batches included).", ""]
    for result in results:
        out += [f"### {result.backend}", "", phase_table(result), "",
                f"First full sync plan: {result.full_summary}.", ""]
    out += ["### Restore payloads of the changes", "", payload_table(results), ""]
    out += ["## What was measured", "", *METHOD, ""]
    out += ["## Verdict", "", *verdicts(dump, results), ""]
    return "\n".join(out)


METHOD = [
    "- Every namespace is created for the run (`ip netns add`) and deleted afterwards; "
    "nothing runs in the host namespace.",
    "- *iptsync, end to end*: a new `Engine(Netfilter(backend, netns), settings, "
    "stage_lines=STAGE_LINES[backend])`, every manifest upserted (with "
    "the cyclic collector paused, as the agent's first lists and `run --once` do), then "
    "`engine.sync()` into an empty namespace (nft: new chains staged in bounded batches, "
    "then one atomic batch; legacy: one batch streamed to iptables-restore while the "
    "services are rendered). *Bare restore*: the same rules "
    "(`desired_from_objects(...).payload()`) fed to one flushing "
    "`iptables-restore` (no `--noflush`) in another empty namespace: the floor.",
    "- *iptsync partial sync*: from the event to the end of the sync (`upsert`/`delete` + "
    "`engine.sync()`, render, plan and `iptables-restore` included). *kube-proxy-style*: "
    "only the `iptables-restore --noflush` of kube-proxy's partial-sync batch (every filter "
    "chain it owns and nat KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-MARK-MASQ "
    "declared and refilled, plus the changed service's chains and `-X` of its stale ones), "
    "built beforehand from the full render after the change. kube-proxy's own render of "
    "every service is not counted, so the kube-proxy-style figure is a lower bound and the "
    "ratio favours kube-proxy.",
    "- Both sides start from the same kernel state: each measured change is undone (iptsync "
    "by a partial sync, kube-proxy-style by the reverse batch) before the next sample, and "
    "the sides alternate which goes first. The no-op full resync at the end reads the whole "
    "kernel state and compares it with the engine's: finding nothing to write or repair "
    "shows both sides left exactly the rules a full sync writes.",
    "- *One-rule restore*: a new nat chain with one `-j RETURN` rule, the smallest batch "
    "that adds a rule, on the loaded kernel: the floor of any partial sync. It is measured "
    "again with nat OUTPUT's jump to KUBE-SERVICES removed, then PREROUTING's too (both are "
    "put back afterwards): when a batch adds a rule, nf_tables validates every chain "
    "reachable from a base chain, once per path, so its cost follows the whole ruleset.",
    "- Memory: the agent's peak RSS is the real CLI (`ip netns exec NS iptsync run --once "
    "--objects FILE ...`), read with `os.wait4` from a small forking helper (a child of the "
    "large benchmark process would inherit its high-water mark at exec); once into an empty "
    "namespace (a first sync) and once into the namespace already holding every rule (a "
    "restart). The bench process's own peak also holds the manifests and the renders the "
    "benchmark needs for its payloads, so it only bounds the engine's from above.",
    "- The machine has 2 cores and other jobs were running: absolute times are noisy; the "
    "ratios compare measurements taken in the same run, interleaved.",
]


def verdicts(dump: DumpResult | None, results: Sequence[BackendResult]) -> list[str]:
    lines = []
    if dump:
        lines.append(f"- `iptsync dump`: {dump.time.text()}, target < {TARGET_DUMP_SECONDS:.0f} s: "
                     f"{verdict(dump.time.median < TARGET_DUMP_SECONDS)}; peak RSS "
                     f"{dump.max_rss_mb:.0f} MB.")
    for r in results:
        a = next(c for c in r.changes if c.key == "a")
        lines.append(
            f"- {r.backend}: full sync {r.full.text()} vs bare restore {r.bare.text()}: "
            f"{r.full_ratio:.2f}x, target ≤ {TARGET_FULL_RATIO}x: "
            f"{verdict(r.full_ratio <= TARGET_FULL_RATIO)}; largest phase (last sample): "
            f"{dominant_phase(r.full_phases)}.")
        a_target = (f", target < {TARGET_ENDPOINT_SECONDS} s: "
                    f"{verdict(a.iptsync.median < TARGET_ENDPOINT_SECONDS)}"
                    if r.backend == "nft" else "")
        lines.append(
            f"- {r.backend}: one endpoint added in {a.iptsync.text()}{a_target}; "
            + "; ".join(f"({c.key}) {c.ratio:.1f}x faster than kube-proxy-style "
                        f"({verdict(c.ratio >= TARGET_CHANGE_RATIO)})" for c in r.changes)
            + f"; largest phase of (a): {dominant_phase(a.phases)}; a one-rule `--noflush` "
            f"restore into the same tables alone took {r.probe.text()} "
            f"({r.probe_one_hook.text()} with KUBE-SERVICES reached from PREROUTING only, "
            f"{r.probe_unhooked.text()} with it reached from no built-in chain).")
        for m, what in ((r.agent_first, "first sync"), (r.agent_restart, "restart")):
            if m is not None:
                lines.append(f"- {r.backend}: agent peak RSS ({what}) {m.max_rss_mb:.0f} MB, "
                             f"target < {TARGET_RSS_MB:.0f} MB: "
                             f"{verdict(m.max_rss_mb < TARGET_RSS_MB)} "
                             f"(`run --once` took {seconds(m.seconds)}).")
        lines.append(f"- {r.backend}: no-op full resync {r.resync.text()}; it found the kernel "
                     f"holding exactly the expected rules: "
                     f"{'yes' if r.resync_clean else '**no**'}; partial syncs stayed partial: "
                     f"{'yes' if all(c.all_partial for c in r.changes) else '**no**'}.")
    return lines


# --- command line --------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK[0]} services x {QUICK[1]} endpoints")
    parser.add_argument("--backend", choices=["nft", "legacy", "both"], default="both")
    parser.add_argument("--repetitions", type=int, default=5,
                        help="samples per change and of the no-op resync (median reported)")
    parser.add_argument("--full-repetitions", type=int, default=1,
                        help="samples of the first full sync and of the bare restore")
    parser.add_argument("--dump-repetitions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verify", action="store_true",
                        help="after every step, compare the kernel with a fresh full render "
                             "(slow at scale)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write this Markdown report (and a PNG plot next to it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.services, args.endpoints = QUICK
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.scale needs root (network namespaces)", file=sys.stderr)
        return 2

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C raises KeyboardInterrupt even when started in the background (where SIGINT is
    # inherited as ignored), so the namespaces are always deleted.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = datetime.datetime.now(datetime.UTC)
    info = machine()
    backends = [Backend.NFT, Backend.LEGACY] if args.backend == "both" else [
        Backend(args.backend)]
    command = "python -m bench.scale " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="iptsync-bench-") as tmp:
        log(f"generating and rendering {args.services} x {args.endpoints}")
        work = Workload.build(args.services, args.endpoints, Path(tmp), seed=args.seed,
                              verify=args.verify)
        log(f"{work.rule_lines} rules in {work.chains} chains; iptsync dump")
        dump = measure_dump(work.path, args.dump_repetitions)
        results = [measure_backend(b, work, repetitions=args.repetitions,
                                   full_repetitions=args.full_repetitions, verify=args.verify)
                   for b in backends]
        print(table(work, dump, results))
        for result in results:
            print(f"{result.backend} phases:\n{phase_table(result)}")
            if result.mismatches:
                print(f"{result.backend}: kernel differs from a full render at: "
                      + ", ".join(result.mismatches[:20]))
        info["load average at the end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        if source_digest() != info["iptsync sources (sha256 of iptsync/**/*.py)"]:
            info["warning"] = ("the iptsync sources changed during the run: subprocesses "
                               "started late may have run other code than this process")
            log(f"warning: {info['warning']}")
        if args.out:
            png = args.out.with_suffix(".png")
            plot(results, png, f"{work.services:,} services x {work.endpoints} endpoints")
            args.out.write_text(document(
                work, dump, results, info=info, started=started, repetitions=args.repetitions,
                full_repetitions=args.full_repetitions, png=png.name, command=command))
            log(f"wrote {args.out} and {png}")
    return 1 if any(r.mismatches for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the benchmark's namespaces are deleted")
        sys.exit(130)
