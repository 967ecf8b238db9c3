"""Cost at rest and how every cost grows (issue #16): the running agent on a quiet node.

For each size (services x endpoints) and iptables backend, in network namespaces of its own
(created here, deleted on exit, Ctrl-C and SIGTERM; the host's rules are never touched), on a
synthetic cluster from :mod:`bench.generate`:

1. ``iptsync dump`` (the real CLI): wall time.
2. First full sync: the real agent (``iptsync run --once``, default flags) into an empty
   namespace: wall time, the engine's own sync time (its log line) and peak RSS; against the
   floor, one flushing ``iptables-restore`` of the same rules into another empty namespace.
3. Restart, interleaved with its floor: ``iptables-save`` of the loaded tables, then
   ``iptsync run --once`` (default flags) on the namespace already holding every rule.
4. kube-proxy's periodic sync: one ``iptables-restore --noflush`` that declares and refills
   every filter chain kube-proxy writes and nat's top-level chains (KUBE-SERVICES,
   KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-MARK-MASQ): wall time and CPU time (its own,
   ``RUSAGE_CHILDREN``). kube-proxy pays this every ``--iptables-sync-period`` (30 s), plus
   its render, which is not counted.
5. In this process, an :class:`~iptsync.engine.reconciler.Engine` on the loaded namespace: a
   no-op full resync (every chain compared), and a one-endpoint partial sync interleaved with
   the one-rule floor (a new nat chain with one rule, ``--noflush``).
6. The running agent (``iptsync run``, default flags, no ``--once``): after its first sync,
   its CPU time (utime + stime of the process and its waited children, ``/proc/PID/stat``)
   over an idle window, per 30 s sync period, and its RSS; then a flushed service chain
   (``iptables -t nat -F KUBE-SVC-...``, the canary intact) is timed until the agent has
   put its rules back, several times.

Each size and backend runs in a fresh process and appends one JSON record to ``--results``;
``--report`` turns the records into Markdown sections and a plot (docs/performance.md).

    python -m bench.quiet --services 10000 --backend both --results /tmp/quiet.jsonl
    python -m bench.quiet --report /tmp/quiet.jsonl --out /tmp/quiet.md --png docs/x.png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from bench.generate import cluster
from bench.scale import (
    CLUSTER_CIDR,
    NODE,
    PROBE_PAYLOAD,
    PROBE_UNDO,
    apply_ops,
    iptsync_command,
    kube_proxy_payload,
    log,
    machine,
    make_changes,
    markdown,
    namespace,
    node_flags,
    run_measured,
    seconds,
    timed_change,
    timed_restore,
    verdict,
)
from iptsync.core import names
from iptsync.engine.apply import STAGE_LINES
from iptsync.engine.desired import desired_from_objects
from iptsync.engine.reconciler import Engine, bulk
from iptsync.kernel.netfilter import Backend, Netfilter, XtablesLockError
from iptsync.options import build_settings

SYNC_PERIOD = 30.0  # kube-proxy's --iptables-sync-period, and iptsync's --sync-period
TARGET_IDLE_NFT = 0.1  # CPU seconds per sync period
TARGET_REPAIR_NFT = 2.0  # seconds from a flushed service chain to its rules back
TARGET_RESTART_RATIO = 2.0  # restart run --once / one iptables-save
TARGET_FULL_RATIO = 1.3
TARGET_PARTIAL_MARGIN = 0.030  # a partial sync within 30 ms of the one-rule floor
TARGET_RSS_MB = 400.0
TARGET_DUMP_SECONDS = 3.0
_TOTAL = re.compile(r"full sync: .*total=([0-9.]+)ms")
_STARTED_AGENT_TIMEOUT = 3600.0


@dataclasses.dataclass
class Record:
    """One size on one backend: every figure of the scaling curve (seconds, MB)."""

    services: int
    endpoints: int
    backend: str
    rules: int = 0
    load_start: str = ""
    load_end: str = ""
    dump: list[float] = dataclasses.field(default_factory=list)
    bare: float = float("nan")
    first: float = float("nan")  # run --once into an empty namespace, wall
    first_sync: float = float("nan")  # the engine's sync alone (its log line)
    first_rss: float = float("nan")
    save: list[float] = dataclasses.field(default_factory=list)
    restart: list[float] = dataclasses.field(default_factory=list)
    restart_sync: list[float] = dataclasses.field(default_factory=list)
    restart_rss: float = 0.0
    restart_cold: float = float("nan")  # a restart without kept renderings
    kube_proxy: list[float] = dataclasses.field(default_factory=list)  # wall
    kube_proxy_cpu: list[float] = dataclasses.field(default_factory=list)
    resync: list[float] = dataclasses.field(default_factory=list)  # engine, no-op, digests kept
    partial: list[float] = dataclasses.field(default_factory=list)
    floor: list[float] = dataclasses.field(default_factory=list)
    idle_window: float = float("nan")
    idle_cpu: float = float("nan")  # CPU seconds over the whole window
    agent_rss: float = float("nan")
    agent_hwm: float = float("nan")
    repair: list[float] = dataclasses.field(default_factory=list)

    @property
    def idle_per_period(self) -> float:
        return self.idle_cpu / self.idle_window * SYNC_PERIOD

    @property
    def restart_ratio(self) -> float:
        """Restart over save, pair by pair (each restart ran right after its save)."""
        return median([r / s for r, s in zip(self.restart, self.save, strict=True)])


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# --- the workload ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Cluster:
    """The manifests (and their file), the bare payload and kube-proxy's periodic batch."""

    objects: list[dict[str, Any]]
    path: Path
    settings: Any
    bare_payload: str
    periodic_payload: str
    rules: int
    service_chain: str  # a KUBE-SVC chain to flush


def prepare(services: int, endpoints: int, directory: Path) -> Cluster:
    objects: list[dict[str, Any]] = cluster(services, endpoints)["items"]
    path = directory / f"cluster-{services}x{endpoints}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    settings = build_settings(node_name=NODE, cluster_cidr=CLUSTER_CIDR, masquerade_all=False,
                              masquerade_bit=14, nodeport_addresses=None, node_ips=(),
                              localhost_nodeports=True)
    base = desired_from_objects(objects, settings)
    rules = sum(len(content.lines) for chains in base.tables.tables.values()
                for content in chains.values())
    # No service's own chains: kube-proxy's periodic sync with nothing changed.
    periodic = kube_proxy_payload(base, ("", ""), ())
    svc = next(chain for chain in base.tables.tables["nat"]
               if chain.startswith(names.SVC_PREFIX))
    return Cluster(objects, path, settings, base.payload(), periodic, rules, svc)


# --- measuring ------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its children it has waited for (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sync_total(text: str) -> float:
    """The engine's own time of the last full sync in an agent's log (seconds)."""
    found = _TOTAL.findall(text)
    return float(found[-1]) / 1000 if found else float("nan")


def run_once(backend: Backend, path: Path, netns: str, *, detect: bool = False,
             extra: Sequence[str] = ()) -> tuple[float, float, float]:
    """``iptsync run --once`` in ``netns``: wall, sync alone, peak RSS. With ``detect``, the
    default flags (the backend detected: a restart); else ``--iptables-backend`` (an empty
    namespace gives detection nothing to go by)."""
    chosen = [] if detect else ["--iptables-backend", backend.value]
    argv = ["ip", "netns", "exec", netns, *iptsync_command(), "run", "--once",
            *node_flags(path), *chosen, *extra]
    measured = run_measured(argv)
    for _ in range(3):
        # Other programs on a shared machine hold the (global) xtables lock at times; the
        # agent would retry, and so does the benchmark.
        if measured.returncode == 0 or "xtables lock" not in measured.last_log:
            break
        log(f"{backend.value}: run --once could not take the xtables lock; again")
        measured = run_measured(argv)
    if measured.returncode != 0:
        raise RuntimeError(f"iptsync run --once ({backend.value}) failed: {measured.last_log}")
    # (The sync's line is not the last one: keeping the renderings is said after it.)
    return measured.seconds, sync_total("\n".join(measured.log)), measured.max_rss_mb


def timed_save(backend: Backend, netns: str) -> float:
    started = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", netns, f"iptables-{backend.value}-save"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Agent:
    """``iptsync run`` (default flags but the backend) in a namespace, its log collected by
    a thread."""

    def __init__(self, path: Path, netns: str, backend: Backend) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *iptsync_command(), "run", *node_flags(path),
             "--iptables-backend", backend.value],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, args=(self.proc.stderr,),
                                       daemon=True)
        self.reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, what: Callable[[str], bool], timeout: float, since: int = 0) -> str:
        """The first log line from index ``since`` on for which ``what`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[since:]:
                if what(line):
                    return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited: {self.lines[-5:]}")
            time.sleep(0.2)
        raise RuntimeError(f"no such log line within {timeout:.0f} s: {self.lines[-5:]}")

    def stop(self) -> None:
        # ip netns exec execs in place: this pid is the agent's.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=5)


@contextlib.contextmanager
def running_agent(path: Path, netns: str, backend: Backend) -> Iterator[Agent]:
    agent = Agent(path, netns, backend)
    try:
        yield agent
    finally:
        agent.stop()


def iptables(netfilter: Netfilter, *args: str, patience: float = 120.0) -> str:
    """``netfilter.run(*args)``, waiting out the xtables lock (legacy: the agent's restores
    and other programs on the machine take it) for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return netfilter.run(*args)
        except XtablesLockError:
            if time.monotonic() > deadline:
                raise


def service_rules(netfilter: Netfilter, chain: str) -> int:
    return sum(1 for line in iptables(netfilter, "-t", "nat", "-S", chain).splitlines()
               if line.startswith("-A "))


def timed_repair(netfilter: Netfilter, chain: str, timeout: float) -> float:
    """Flush ``chain`` (nat) behind the agent's back; seconds until its rules are back."""
    want = service_rules(netfilter, chain)
    iptables(netfilter, "-t", "nat", "-F", chain)
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if service_rules(netfilter, chain) == want:
            return time.perf_counter() - started
        time.sleep(0.05)
    return float("nan")


def measure(backend: Backend, work: Cluster, record: Record, *, repetitions: int,
            idle: float, repairs: int) -> None:
    name = backend.value
    with namespace(f"{name}-bare") as bare_ns:
        log(f"{name}: bare restore ({work.rules} rules)")
        record.bare = timed_restore(Netfilter(backend, netns=bare_ns), work.bare_payload,
                                    noflush=False)
    with namespace(f"{name}-node") as ns:
        netfilter = Netfilter(backend, netns=ns)
        log(f"{name}: first sync, run --once")
        record.first, record.first_sync, record.first_rss = run_once(backend, work.path, ns)
        log(f"{name}: restart run --once without the renderings kept")
        record.restart_cold = run_once(backend, work.path, ns, detect=True,
                                       extra=["--render-cache-dir", ""])[0]
        for _ in range(repetitions):
            log(f"{name}: iptables-save, then restart run --once")
            record.save.append(timed_save(backend, ns))
            wall, sync, rss = run_once(backend, work.path, ns, detect=True)
            record.restart.append(wall)
            record.restart_sync.append(sync)
            record.restart_rss = max(rss, record.restart_rss)
        log(f"{name}: kube-proxy-style periodic restores")
        for _ in range(repetitions):
            cpu = children_cpu()
            record.kube_proxy.append(timed_restore(netfilter, work.periodic_payload))
            record.kube_proxy_cpu.append(children_cpu() - cpu)
        engine_figures(backend, work, record, netfilter, repetitions)
        log(f"{name}: the running agent, idle for {idle:.0f} s")
        with running_agent(work.path, ns, backend) as agent:
            agent.wait_for(lambda line: "first full sync done" in line, _STARTED_AGENT_TIMEOUT)
            time.sleep(2)  # the first sync's conntrack cleanup and health server
            pid = agent.proc.pid
            cpu, started = cpu_seconds(pid), time.monotonic()
            time.sleep(idle)
            record.idle_cpu = cpu_seconds(pid) - cpu
            record.idle_window = time.monotonic() - started
            record.agent_rss = status_mb(pid, "VmRSS")
            record.agent_hwm = status_mb(pid, "VmHWM")
            for _ in range(repairs):
                log(f"{name}: flushing {work.service_chain}")
                record.repair.append(timed_repair(netfilter, work.service_chain, 120.0))
                time.sleep(2)  # let the agent settle (its watch marks the repair)


def engine_figures(backend: Backend, work: Cluster, record: Record, netfilter: Netfilter,
                   repetitions: int) -> None:
    """No-op full resync, and the one-endpoint partial sync against the one-rule floor."""
    log(f"{backend.value}: engine resyncs and partial syncs")
    engine = Engine(netfilter, work.settings, stage_lines=STAGE_LINES[backend])
    with bulk():
        for obj in work.objects:
            engine.upsert(obj)
    engine.sync(full=True)  # the engine's restart: the kernel already holds every rule
    # (a) of bench.scale: one endpoint more for svc-00001
    change = make_changes(work.objects, record.services, record.endpoints, 1)[0]
    for rep in range(repetitions):
        started = time.perf_counter()
        engine.sync(full=True)
        record.resync.append(time.perf_counter() - started)
        for side in ("iptsync", "floor") if rep % 2 == 0 else ("floor", "iptsync"):
            if side == "iptsync":
                record.partial.append(timed_change(engine, change.forward)[0])
                apply_ops(engine, change.backward)
                engine.sync()
            else:
                record.floor.append(timed_restore(netfilter, PROBE_PAYLOAD))
                netfilter.restore(PROBE_UNDO)
    del engine
    gc.collect()


def measure_size(services: int, endpoints: int, backends: Sequence[Backend], *,
                 repetitions: int, idle: float, repairs: int) -> Iterator[Record]:
    with tempfile.TemporaryDirectory(prefix="iptsync-quiet-") as tmp:
        log(f"{services} x {endpoints}: generating and rendering")
        work = prepare(services, endpoints, Path(tmp))
        dump = []
        for _ in range(repetitions):
            measured = run_measured([*iptsync_command(), "dump", *node_flags(work.path)])
            dump.append(measured.seconds)
        for backend in backends:
            record = Record(services, endpoints, backend.value, work.rules, loadavg(), dump=dump)
            measure(backend, work, record, repetitions=repetitions, idle=idle, repairs=repairs)
            record.load_end = loadavg()
            yield record


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- reporting ------------------------------------------------------------------------------------

def load(path: Path) -> list[Record]:
    """The records of ``path``; of several for one size and backend, the last one (the file
    keeps the history, the report the latest measurement)."""
    fields = {f.name for f in dataclasses.fields(Record)}
    latest: dict[tuple[int, int, str], Record] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = Record(**{k: v for k, v in json.loads(line).items() if k in fields})
            latest[(record.services, record.endpoints, record.backend)] = record
    return list(latest.values())


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(b) else "-"


def sized(records: Sequence[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (r.services, r.backend != "nft"))


def curve_table(records: Sequence[Record]) -> str:
    """One row per size and backend: every cost, medians."""
    header = ["services x endpoints", "backend", "rules", "first sync (run --once) / engine",
              "bare restore", "engine / bare", "restart run --once", "iptables-save",
              "restart / save", "no-op resync (engine)", "+1 endpoint", "one-rule floor",
              "dump", "agent RSS (peak)", "idle CPU per 30 s", "kube-proxy periodic restore "
              "(wall / CPU)", "flushed chain repaired", "load (start / end)"]
    rows = []
    for r in sized(records):
        rows.append([
            f"{r.services:,} x {r.endpoints}", r.backend, f"{r.rules:,}",
            f"{seconds(r.first)} / {seconds(r.first_sync)}", seconds(r.bare),
            ratio(r.first_sync, r.bare), seconds(median(r.restart)), seconds(median(r.save)),
            f"{r.restart_ratio:.2f}x", seconds(median(r.resync)),
            seconds(median(r.partial)), seconds(median(r.floor)), seconds(median(r.dump)),
            f"{r.agent_rss:.0f} MB ({max(r.agent_hwm, r.first_rss, r.restart_rss):.0f} MB)",
            f"{r.idle_per_period:.3f} s",
            f"{seconds(median(r.kube_proxy))} / {median(r.kube_proxy_cpu):.3f} s",
            seconds(median(r.repair)), f"{r.load_start} / {r.load_end}"])
    return markdown(header, rows)


def targets(records: Sequence[Record], services: int) -> list[str]:
    """The issue's targets at ``services`` (10,000), one line each."""
    lines = []
    for r in sized([r for r in records if r.services == services]):
        b = r.backend
        if b == "nft":
            lines.append(f"- {b}: idle CPU per sync period {r.idle_per_period:.3f} s, target "
                         f"≤ {TARGET_IDLE_NFT} s: "
                         f"{verdict(r.idle_per_period <= TARGET_IDLE_NFT)} (the kube-proxy-style "
                         f"periodic restore: {median(r.kube_proxy_cpu):.3f} s CPU, "
                         f"{seconds(median(r.kube_proxy))} wall).")
            lines.append(f"- {b}: a flushed service chain repaired in "
                         f"{seconds(median(r.repair))} (median of {len(r.repair)}: "
                         + ", ".join(seconds(v) for v in r.repair)
                         + f"), target ≤ {TARGET_REPAIR_NFT:.0f} s: "
                         f"{verdict(median(r.repair) <= TARGET_REPAIR_NFT)}.")
        else:
            kp = median(r.kube_proxy_cpu)
            lines.append(f"- {b}: idle CPU per sync period {r.idle_per_period:.3f} s, target "
                         f"≤ the kube-proxy-style periodic restore ({kp:.3f} s CPU, "
                         f"{seconds(median(r.kube_proxy))} wall): "
                         f"{verdict(r.idle_per_period <= kp)}; a flushed service chain "
                         f"repaired in {seconds(median(r.repair))}.")
        restart = r.restart_ratio
        lines.append(f"- {b}: restart `run --once` {seconds(median(r.restart))} vs one "
                     f"`iptables-{b}-save` {seconds(median(r.save))}: {restart:.2f}x (median of "
                     f"the {len(r.save)} pairs' ratios), target "
                     f"≤ {TARGET_RESTART_RATIO:.0f}x"
                     + (f": {verdict(restart <= TARGET_RESTART_RATIO)}" if b == "nft"
                        else " (set for nft)")
                     + f"; the engine's sync alone {seconds(median(r.restart_sync))}; without "
                     f"the renderings kept by the run before, {seconds(r.restart_cold)}.")
        full = r.first_sync / r.bare
        margin = median(r.partial) - median(r.floor)
        peak = max(r.agent_hwm, r.first_rss, r.restart_rss)
        lines.append(f"- {b}: first sync {seconds(r.first_sync)} (engine) vs bare restore "
                     f"{seconds(r.bare)}: {full:.2f}x, target ≤ {TARGET_FULL_RATIO}x: "
                     f"{verdict(full <= TARGET_FULL_RATIO)}; +1 endpoint "
                     f"{seconds(median(r.partial))} vs one-rule floor "
                     f"{seconds(median(r.floor))} ({margin * 1000:+.0f} ms, target within "
                     f"{TARGET_PARTIAL_MARGIN * 1000:.0f} ms: "
                     f"{verdict(margin <= TARGET_PARTIAL_MARGIN)}); agent peak RSS "
                     f"{peak:.0f} MB, target < {TARGET_RSS_MB:.0f} MB: "
                     f"{verdict(peak < TARGET_RSS_MB)}.")
    dumps = [v for r in records if r.services == services for v in r.dump]
    if dumps:
        lines.append(f"- `iptsync dump` {seconds(median(dumps))} (median of {len(dumps)}: "
                     f"{seconds(min(dumps))} to {seconds(max(dumps))}), target < "
                     f"{TARGET_DUMP_SECONDS:.0f} s: "
                     f"{verdict(median(dumps) < TARGET_DUMP_SECONDS)}.")
    return lines


# (label, value, colour): a cost and its floor (dashed) share a colour.
CURVES: tuple[tuple[str, Callable[[Record], float], str], ...] = (
    ("first sync (engine)", lambda r: r.first_sync, "#1f77b4"),
    ("bare restore (floor)", lambda r: r.bare, "#1f77b4"),
    ("restart run --once", lambda r: median(r.restart), "#d62728"),
    ("iptables-save", lambda r: median(r.save), "#d62728"),
    ("+1 endpoint", lambda r: median(r.partial), "#2ca02c"),
    ("one-rule floor", lambda r: median(r.floor), "#2ca02c"),
    ("idle CPU per 30 s", lambda r: r.idle_per_period, "#9467bd"),
    ("kube-proxy periodic restore (CPU)", lambda r: median(r.kube_proxy_cpu), "#9467bd"),
    ("no-op resync (engine)", lambda r: median(r.resync), "#8c564b"),
    ("dump", lambda r: median(r.dump), "#7f7f7f"),
    ("flushed chain repaired", lambda r: median(r.repair), "#ff7f0e"),
)
FLOORS = frozenset({"bare restore (floor)", "iptables-save", "one-rule floor",
                    "kube-proxy periodic restore (CPU)"})


def plot(records: Sequence[Record], path: Path) -> None:
    """One panel per backend, log-log: each cost against the number of services; and the
    agent's RSS."""
    import matplotlib  # noqa: PLC0415  (only the bench extra has it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    backends = [b for b in ("nft", "legacy") if any(r.backend == b for r in records)]
    fig, axes = plt.subplots(1, len(backends) + 1, figsize=(6 * len(backends) + 4.5, 5.4),
                             squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=False):
        mine = sized([r for r in records if r.backend == backend])
        xs = [r.services for r in mine]
        for label, value, colour in CURVES:
            ax.plot(xs, [value(r) for r in mine], "--" if label in FLOORS else "-", marker="o",
                    markersize=3, color=colour, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("services (x 10 endpoints)")
        ax.set_ylabel("seconds (CPU seconds for idle and kube-proxy)")
        ax.set_title(f"{backend} backend")
        ax.grid(which="major", linewidth=0.4, alpha=0.6)
    rss = axes[0][-1]
    for backend in backends:
        mine = sized([r for r in records if r.backend == backend])
        rss.plot([r.services for r in mine],
                 [max(r.agent_hwm, r.first_rss, r.restart_rss) for r in mine], marker="o",
                 label=f"{backend}: agent peak RSS")
    rss.axhline(TARGET_RSS_MB, linestyle="--", color="black", linewidth=0.8,
                label=f"{TARGET_RSS_MB:.0f} MB target")
    rss.set_xscale("log")
    rss.set_xlabel("services (x 10 endpoints)")
    rss.set_ylabel("MB")
    rss.set_title("memory")
    rss.grid(linewidth=0.4, alpha=0.6)
    rss.legend(fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle("How each cost grows with the cluster (medians; dashed: floors and "
                 "kube-proxy)", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(records: Sequence[Record], png: str | None, at: int) -> str:
    out = ["## Cost at rest and the scaling curve", "",
           "Generated by `python -m bench.quiet` (issue #16); see the module docstring for "
           "what each figure is. The machine is shared: the load average at the start and "
           "the end of each row is in its last column, and each row's ratios compare "
           "measurements from the same run, interleaved.", "",
           curve_table(records), ""]
    if png:
        out += [f"![How each cost grows]({png})", ""]
    out += [f"### Targets at {at:,} services x 10 endpoints", "", *targets(records, at), ""]
    return "\n".join(out)


# --- command line ---------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quiet",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--backend", choices=["nft", "legacy", "both"], default="both")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--idle", type=float, default=3 * SYNC_PERIOD,
                        help="seconds the running agent is watched while idle")
    parser.add_argument("--repairs", type=int, default=5)
    parser.add_argument("--results", type=Path, default=Path("quiet.jsonl"),
                        help="JSON lines file the records are appended to")
    parser.add_argument("--report", type=Path, default=None,
                        help="read this results file and write the Markdown (no measuring)")
    parser.add_argument("--out", type=Path, default=None, help="the Markdown (with --report)")
    parser.add_argument("--png", type=Path, default=None, help="the plot (with --report)")
    parser.add_argument("--at", type=int, default=10000,
                        help="the size whose targets are checked (with --report)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        records = load(args.report)
        if args.png:
            plot(records, args.png)
        text = report(records, args.png.name if args.png else None, args.at)
        if args.out:
            args.out.write_text(text)
        else:
            print(text)
        return 0
    if os.geteuid() != 0:
        print("bench.quiet needs root (network namespaces)", file=sys.stderr)
        return 2

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    backends = [Backend.NFT, Backend.LEGACY] if args.backend == "both" else [
        Backend(args.backend)]
    log(f"machine: {machine()}")
    for record in measure_size(args.services, args.endpoints, backends,
                               repetitions=args.repetitions, idle=args.idle,
                               repairs=args.repairs):
        with args.results.open("a") as out:
            out.write(json.dumps(dataclasses.asdict(record)) + "\n")
        log(f"recorded {record.services} x {record.endpoints} {record.backend}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the benchmark's namespaces are deleted")
        sys.exit(130)
