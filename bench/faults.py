"""Fault suite (issue 12): an operator's worst day, injected into a real agent, timed.

Each fault runs the real agent (``iptsync run``, a subprocess inside a fresh network namespace
created here, deleted on exit, Ctrl-C and SIGTERM; the host's rules are never touched) on a
synthetic cluster from :mod:`bench.generate`, waits until every service is programmed (the
baseline), injects the fault, makes a change where the fault calls for one, and measures the
time until the rules converge: the change programmed and every service that should still be
there still programmed. A service counts as programmed when its ``KUBE-SVC-`` chain holds
rules and nat ``KUBE-SERVICES`` jumps to it (and nat PREROUTING and OUTPUT reach
``KUBE-SERVICES``); ``iptables-save`` of the namespace is read every ``POLL`` seconds. At the
end of each fault, ``iptsync diff --live`` on the same objects must find nothing to change.

API faults run the project's fake API server (``tests/apiserver``) in this process, listening
inside the agent's namespace, and give the agent a kubeconfig (``run --kubeconfig``); file
faults use ``run --objects DIR``. What each fault does is in :data:`FAULTS` and in
docs/operations.md ("Fault suite"). A fault the build does not handle shows in the table as
"not converged", "LOST" or "INJECTED", never as a crash of the suite.

    python -m bench.faults                           # every fault, both backends
    python -m bench.faults --backend nft --only outage-rst,flush-nat --services 20
    python -m bench.faults --json --out /tmp/faults.md
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.generate import cluster, service_objects
from bench.scale import CLUSTER_CIDR, NODE, iptsync_command, log, markdown, namespace
from iptsync.core import names
from iptsync.kernel.netfilter import Backend, Netfilter
from iptsync.lab.netns import ns_popen, stop_process

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from apiserver import FakeApiServer
from lockholder import holding

Manifest = dict[str, Any]

POLL = 0.1  # seconds between two reads of the namespace's nat table
BASELINE_TIMEOUT = 120.0  # the first sync of the baseline, before any fault
# Address and endpoint of the rule a hostile Service name tries to inject.
INJECTED_IP = "10.99.99.99"
INJECTED_RULE = (f"-A KUBE-SERVICES -d {INJECTED_IP}/32 -p tcp -m tcp --dport 80 "
                 "-j DNAT --to-destination 10.66.6.6:8080")
FOREIGN_CHAIN = "IPTSYNC-FAULT-REF"  # a chain of "another program" (fault failing-restore)


@dataclass(frozen=True)
class Options:
    services: int = 100
    endpoints: int = 3
    sync_period: float = 10.0
    timeout: float = 90.0  # per fault: how long to wait for convergence
    outage: float = 5.0
    partition: float = 15.0
    storm: float = 10.0
    lock: float = 8.0
    kill_services: int = 2000
    logs: Path | None = None  # keep the agents' logs here


@dataclass
class Row:
    """One line of the table."""

    fault: str
    backend: str
    converge: float | None = None  # seconds; None: not converged within ``timeout``
    timeout: float = 0.0
    lost: int = 0  # services that should be programmed and are not, at the end
    result: str = ""
    notes: list[str] = field(default_factory=list)

    def judge(self, *, injected: bool = False, intact: bool = True) -> None:
        """The result column: ok, or every way the build failed this fault."""
        problems = []
        if self.converge is None:
            problems.append(f"not converged within {self.timeout:.0f} s")
        if self.lost:
            problems.append(f"LOST {self.lost}")
        if injected:
            problems.append("INJECTED")
        if not intact:
            problems.append("previous rules NOT intact")
        self.result = "; ".join(problems) or "ok"


# --- what the kernel holds -----------------------------------------------------------------------

@dataclass(frozen=True)
class Svc:
    """One service port, as its rules name it."""

    namespace: str
    name: str
    chain: str


def service_ports(objects: Sequence[Manifest]) -> list[Svc]:
    """The SVC chain of every port of every Service in ``objects``."""
    out = []
    for obj in objects:
        if obj.get("kind") != "Service":
            continue
        meta = obj["metadata"]
        for port in obj["spec"]["ports"]:
            spn = f"{meta['namespace']}/{meta['name']}" + (
                f":{port['name']}" if port.get("name") else "")
            out.append(Svc(meta["namespace"], meta["name"],
                           names.svc_chain(spn, port.get("protocol", "TCP").lower())))
    return out


@dataclass(frozen=True)
class NatView:
    """What matters of one ``iptables-save -t nat``: rules per chain, KUBE-SERVICES' jumps."""

    rules: dict[str, int]
    service_jumps: frozenset[str]
    hooked: bool  # PREROUTING and OUTPUT both jump to KUBE-SERVICES
    text: str

    @classmethod
    def parse(cls, text: str) -> NatView:
        rules: dict[str, int] = {}
        jumps: dict[str, set[str]] = {}
        for line in text.splitlines():
            if line.startswith(":"):
                rules.setdefault(line[1:].split()[0], 0)
            elif line.startswith("-A "):
                parts = line.split()
                rules[parts[1]] = rules.get(parts[1], 0) + 1
                if "-j" in parts[:-1]:
                    jumps.setdefault(parts[1], set()).add(parts[parts.index("-j") + 1])
        hooked = all(names.KUBE_SERVICES in jumps.get(c, ()) for c in ("PREROUTING", "OUTPUT"))
        return cls(rules, frozenset(jumps.get(names.KUBE_SERVICES, ())), hooked, text)

    def programmed(self, svc: Svc) -> bool:
        return self.rules.get(svc.chain, 0) > 0 and svc.chain in self.service_jumps

    def missing(self, services: Sequence[Svc]) -> list[Svc]:
        if not self.hooked:
            return list(services)
        return [s for s in services if not self.programmed(s)]

    @property
    def injected(self) -> bool:
        return INJECTED_IP in self.text


@dataclass
class Expect:
    """Converged: every service of ``keep`` (there before the fault) and of ``changed`` (the
    change made during it) programmed, no chain of an ``absent`` one left."""

    keep: list[Svc]
    changed: list[Svc] = field(default_factory=list)
    absent: list[Svc] = field(default_factory=list)

    def met(self, view: NatView) -> bool:
        return not view.missing([*self.keep, *self.changed]) and not any(
            view.rules.get(s.chain) is not None for s in self.absent)


# --- the node: a namespace, its agent, and a way to watch it ------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def in_netns(netns: str, action: Callable[[], None]) -> None:
    """Run ``action`` in a thread that has entered ``netns``: the sockets it opens, and the
    threads it starts, live there (the fake API server listens inside the node's namespace,
    where the agent reaches it over loopback and the suite can cut that path)."""
    failure: list[BaseException] = []

    def enter_and_run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {netns}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            action()
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    thread = threading.Thread(target=enter_and_run, name=f"in-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


class Agent:
    """``iptsync run`` inside a namespace, its output in a log file."""

    def __init__(self, netns: str, backend: Backend, source: Sequence[str], opts: Options,
                 logfile: Path, *, env: dict[str, str] | None = None) -> None:
        self.argv = [*iptsync_command(), "run", *source, "--hostname-override", NODE,
                     "--cluster-cidr", CLUSTER_CIDR, "--iptables-backend", backend.value,
                     "--sync-period", f"{opts.sync_period:g}s",
                     "--healthz-bind-address", "127.0.0.1:10256",
                     "--metrics-bind-address", "127.0.0.1:10249"]
        self.netns = netns
        self.logfile = logfile
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.proc = ns_popen(self.netns, self.argv, stdout=out, stderr=out, env=self.env)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def last_error(self) -> str:
        lines = [ln for ln in self.log_text().splitlines() if " ERROR " in ln or "Error" in ln]
        return lines[-1][:160] if lines else ""


@dataclass
class Node:
    """One namespace with a running agent; ``services`` is what should be programmed."""

    netns: str
    backend: Backend
    agent: Agent
    workdir: Path
    services: list[Svc]
    netfilter: Netfilter = field(init=False)

    def __post_init__(self) -> None:
        self.netfilter = Netfilter(self.backend, netns=self.netns)

    def view(self) -> NatView:
        return NatView.parse(self.netfilter.save_text("nat"))

    def wait(self, expect: Expect, since: float, timeout: float) -> float | None:
        """Seconds from ``since`` until ``expect`` is met; None if not within ``timeout``."""
        while True:
            if expect.met(self.view()):
                return time.monotonic() - since
            if time.monotonic() - since > timeout:
                return None
            time.sleep(POLL)

    def watch(self, seconds: float, keep: Sequence[Svc]) -> tuple[int, bool]:
        """Poll for ``seconds``: the most services of ``keep`` missing at once, and whether an
        injected rule was ever seen."""
        worst, injected = 0, False
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            view = self.view()
            worst = max(worst, len(view.missing(keep)))
            injected |= view.injected
            time.sleep(POLL)
        return worst, injected

    def baseline(self) -> None:
        started = time.monotonic()
        took = self.wait(Expect(self.services), started, BASELINE_TIMEOUT)
        if took is None:
            raise FaultSetupError(f"the baseline did not sync within {BASELINE_TIMEOUT:.0f} s "
                                  f"({self.agent.last_error() or 'no error logged'})")
        log(f"  baseline of {len(self.services)} services synced in {took:.1f} s")

    def diff_live(self, objects_path: Path) -> str:
        """``iptsync diff --live`` on ``objects_path``: "clean" or what it found."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, *iptsync_command(), "diff", "--live",
             "--objects", str(objects_path), "--hostname-override", NODE,
             "--cluster-cidr", CLUSTER_CIDR, "--iptables-backend", self.backend.value],
            capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return "diff --live: clean"
        if result.returncode != 1:
            error = (result.stderr.strip().splitlines() or ["?"])[-1]
            return f"diff --live: exit {result.returncode} ({error[:120]})"
        changed = sum(1 for ln in result.stdout.splitlines() if ln.startswith(("+", "-")))
        return f"diff --live: exit {result.returncode} ({changed} rule lines differ)"

    def finish(self, row: Row, expect: Expect, objects_path: Path) -> None:
        """Lost: services programmed before the fault that are not now."""
        row.lost = len(self.view().missing(expect.keep))
        row.notes.append(self.diff_live(objects_path))


class FaultSetupError(RuntimeError):
    """The fault could not be set up (the baseline never synced): reported, not raised."""


@contextlib.contextmanager
def scratch(opts: Options, tag: str) -> Iterator[Path]:
    """A temporary directory for one fault's files; with ``opts.logs``, the agents' logs are
    copied there (as ``TAG-NAME.log``) before it goes."""
    with tempfile.TemporaryDirectory(prefix="iptsync-faults-") as tmp:
        try:
            yield Path(tmp)
        finally:
            if opts.logs is not None:
                opts.logs.mkdir(parents=True, exist_ok=True)
                for log_file in Path(tmp).glob("*.log"):
                    shutil.copyfile(log_file, opts.logs / f"{tag}-{log_file.name}")


def write_objects(path: Path, objects: Sequence[Manifest]) -> Path:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    return path


def baseline_objects(services: int, endpoints: int) -> list[Manifest]:
    """The generated cluster's Services and EndpointSlices."""
    items: list[Manifest] = cluster(services, endpoints)["items"]
    return items


def extra_service(k: int, endpoints: int) -> list[Manifest]:
    """A new ClusterIP service and its slice (odd indices far above the baseline's: never a
    NodePort, so its node port cannot collide with the baseline's)."""
    return service_objects(9001 + 2 * k, endpoints, random.Random(k))


@contextlib.contextmanager
def api_node(opts: Options, backend: Backend, tag: str,
             env: dict[str, str] | None = None) -> Iterator[tuple[Node, FakeApiServer]]:
    """A namespace, the fake API server listening in it, the agent watching it (baseline
    synced)."""
    with namespace(f"{tag}-{backend.value}") as netns, \
            scratch(opts, f"{tag}-{backend.value}") as workdir:
        server = FakeApiServer(bookmark_interval=5.0)
        in_netns(netns, server.start)
        try:
            objects = baseline_objects(opts.services, opts.endpoints)
            for obj in objects:
                server.create(obj)
            kubeconfig = server.write_kubeconfig(workdir / "kubeconfig")
            agent = Agent(netns, backend, ["--kubeconfig", str(kubeconfig)], opts,
                          workdir / "agent.log", env=env)
            agent.start()
            try:
                node = Node(netns, backend, agent, workdir, service_ports(objects))
                node.baseline()
                yield node, server
            finally:
                agent.stop()
        finally:
            server.stop()


def store_objects(server: FakeApiServer, path: Path) -> Path:
    """What the API server holds, as a manifests file for ``iptsync diff``."""
    return write_objects(path, [{"kind": kind, **obj} for kind in ("Service", "EndpointSlice")
                                for obj in server.objects(kind)])


@contextlib.contextmanager
def files_node(opts: Options, backend: Backend, tag: str, files: dict[str, list[Manifest]],
               ) -> Iterator[Node]:
    """A namespace and the agent watching a directory of manifest files (baseline synced)."""
    with namespace(f"{tag}-{backend.value}") as netns, \
            scratch(opts, f"{tag}-{backend.value}") as workdir:
        manifests = workdir / "manifests"
        manifests.mkdir()
        for name, objects in files.items():
            (manifests / name).write_text(yaml.safe_dump_all(objects))
        agent = Agent(netns, backend, ["--objects", str(manifests)], opts,
                      workdir / "agent.log")
        agent.start()
        try:
            node = Node(netns, backend, agent, workdir,
                        service_ports([o for objs in files.values() for o in objs]))
            node.baseline()
            yield node
        finally:
            agent.stop()


# --- the faults ----------------------------------------------------------------------------------

def outage_rst(opts: Options, backend: Backend, row: Row) -> None:
    """The API server goes away (connections reset, new ones refused); a Service is created
    meanwhile; the server comes back. Timed from the restart."""
    with api_node(opts, backend, "outage-rst") as (node, server):
        new = extra_service(0, opts.endpoints)
        server.stop()
        for obj in new:
            server.create(obj)
        worst, _ = node.watch(opts.outage, node.services)
        row.notes.append(f"outage {opts.outage:g} s; most services missing during it: {worst}")
        in_netns(node.netns, server.start)
        expect = Expect(node.services, service_ports(new))
        row.converge = node.wait(expect, time.monotonic(), opts.timeout)
        node.finish(row, expect, store_objects(server, node.workdir / "objects.json"))


def partition(opts: Options, backend: Backend, row: Row) -> None:
    """No reset: the path to the API server drops every packet, and the server's side of each
    connection vanishes (its resets dropped too), as when its host or a load balancer dies.
    A Service is created meanwhile; the path heals. Timed from the healing."""
    with api_node(opts, backend, "partition") as (node, server):
        port = str(server.port)
        drops = [["-t", "raw", "PREROUTING", "-i", "lo", "-p", "tcp", side, port, "-j", "DROP"]
                 for side in ("--dport", "--sport")]
        for rule in drops:
            node.netfilter.run(rule[0], rule[1], "-I", *rule[2:])
        # The server's side of every established connection is destroyed; the reset the
        # kernel sends for it is dropped, so the agent's sockets stay ESTABLISHED.
        subprocess.run(["ip", "netns", "exec", node.netns, "ss", "-K", "-t", "state",
                        "established", f"( sport = :{port} )"], capture_output=True,
                       check=True)
        new = extra_service(0, opts.endpoints)
        for obj in new:
            server.create(obj)
        worst, _ = node.watch(opts.partition, node.services)
        for rule in drops:
            node.netfilter.run(rule[0], rule[1], "-D", *rule[2:])
        row.notes.append(f"partition {opts.partition:g} s; most services missing during it: "
                         f"{worst}")
        expect = Expect(node.services, service_ports(new))
        row.converge = node.wait(expect, time.monotonic(), opts.timeout)
        node.finish(row, expect, store_objects(server, node.workdir / "objects.json"))


def storm_410(opts: Options, backend: Backend, row: Row) -> None:
    """For ``storm`` seconds, every 0.5 s: history compacted and every watch closed, so each
    re-watch gets 410 Gone and relists. A Service is created as the storm starts; timed from
    that change."""
    with api_node(opts, backend, "410-storm") as (node, server):
        new = extra_service(0, opts.endpoints)
        expect = Expect(node.services, service_ports(new))
        server.clear_requests()
        started = time.monotonic()
        for obj in new:
            server.create(obj)
        converged: float | None = None
        bump = 0
        while time.monotonic() - started < opts.storm:
            # Another node's object moves the resourceVersion on without an event for the
            # agent (it watches its own Node only), so its last resourceVersion is expired.
            bump += 1
            server.create({"apiVersion": "v1", "kind": "Node",
                           "metadata": {"name": f"storm-{bump}"}})
            server.compact()
            server.close_watches()
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                if converged is None and expect.met(node.view()):
                    converged = time.monotonic() - started
                time.sleep(POLL)
        lists = sum(1 for r in server.requests if not r.is_watch and r.method == "GET"
                    and r.path.endswith(("/services", "/endpointslices")))
        row.notes.append(f"storm {opts.storm:g} s, {bump} compactions; {lists} LISTs by the "
                         "agent")
        row.converge = converged if converged is not None else node.wait(
            expect, started, opts.timeout)
        node.finish(row, expect, store_objects(server, node.workdir / "objects.json"))


def kill_9(opts: Options, backend: Backend, row: Row) -> None:
    """``kill -9`` of the agent during a large first sync, at three moments: while its first
    ``iptables-restore`` runs, as its first chains reach the kernel, and (from a reference
    run) half way from there to every service programmed. Then a restart, timed until every
    service is programmed, and ``diff --live`` must be clean."""
    with scratch(opts, f"kill-9-{backend.value}") as workdir:
        objects = baseline_objects(opts.kill_services, opts.endpoints)
        path = write_objects(workdir / "cluster.json", objects)
        services = service_ports(objects)
        with namespace(f"ref-{backend.value}") as netns:
            agent = Agent(netns, backend, ["--objects", str(path)], opts, workdir / "ref.log")
            node = Node(netns, backend, agent, workdir, services)
            agent.start()
            try:
                started = time.monotonic()
                appear = first_chains(node, started, opts.timeout)
                done = node.wait(Expect(services), started, opts.timeout)
            finally:
                agent.stop()
        if appear is None or done is None:
            raise FaultSetupError(f"the reference first sync did not finish within "
                                  f"{opts.timeout:.0f} s")
        row.notes.append(f"{opts.kill_services} services; reference run from the agent's "
                         f"start: first chains {appear:.1f} s, all programmed {done:.1f} s")
        moments: dict[str, Callable[[Node, float], object]] = {
            "while its first iptables-restore ran": lambda node, _: restore_running(
                node, opts.timeout),
            "as the first chains appeared": lambda node, started: first_chains(
                node, started, opts.timeout),
            "half way to done": lambda _, started: time.sleep(
                max(0.0, (appear + done) / 2 - (time.monotonic() - started))),
        }
        worst: float | None = 0.0
        for index, (when, wait) in enumerate(moments.items()):
            with namespace(f"kill{index}-{backend.value}") as netns:
                agent = Agent(netns, backend, ["--objects", str(path)], opts,
                              workdir / f"agent-{index}.log")
                node = Node(netns, backend, agent, workdir, services)
                agent.start()
                try:
                    wait(node, time.monotonic())
                    agent.kill9()
                    time.sleep(0.5)  # an iptables-restore left behind sees EOF and exits
                    view = node.view()
                    found = len(services) - len(view.missing(services))
                    chains = sum(1 for c in view.rules if names.is_service_chain(c))
                    agent.start()
                    took = node.wait(Expect(services), time.monotonic(), opts.timeout)
                    diff = node.diff_live(path)
                    lost = len(node.view().missing(services))
                finally:
                    agent.stop()
            row.lost = max(row.lost, lost)
            worst = None if took is None or worst is None else max(worst, took)
            row.notes.append(f"killed {when}: {chains} service chains, {found}/{len(services)} "
                             f"services programmed; restart "
                             f"{'-' if took is None else f'{took:.1f} s'}, {diff}")
        row.converge = worst


def restore_running(node: Node, timeout: float) -> bool:
    """Wait until the agent has an ``iptables-*-restore`` child (False: not in time)."""
    assert node.agent.proc is not None
    parent = str(node.agent.proc.pid)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                # stat: pid (comm) state ppid ...; no spaces in the comm of these commands.
                if (proc / "stat").read_text().split()[3] == parent and "-restore" in (
                        proc / "cmdline").read_text():
                    return True
        time.sleep(0.005)
    return False


def first_chains(node: Node, since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until a service chain is in the kernel (None: not in time)."""
    while time.monotonic() - since < timeout:
        if any(names.is_service_chain(c) for c in node.view().rules):
            return time.monotonic() - since
        time.sleep(0.02)
    return None


def flush_nat(opts: Options, backend: Backend, row: Row) -> None:
    """``iptables -t nat -F`` by another program; timed until repaired."""
    with api_node(opts, backend, "flush-nat") as (node, server):
        node.netfilter.run("-t", "nat", "-F")
        expect = Expect(node.services)
        row.converge = node.wait(expect, time.monotonic(), opts.timeout)
        row.notes.append(f"--sync-period {opts.sync_period:g}s")
        node.finish(row, expect, store_objects(server, node.workdir / "objects.json"))


def flush_chain(opts: Options, backend: Backend, row: Row) -> None:
    """One service's KUBE-SVC chain flushed by another program; timed until repaired."""
    with api_node(opts, backend, "flush-chain") as (node, server):
        node.netfilter.run("-t", "nat", "-F", node.services[1].chain)
        expect = Expect(node.services)
        row.converge = node.wait(expect, time.monotonic(), opts.timeout)
        row.notes.append(f"--sync-period {opts.sync_period:g}s")
        node.finish(row, expect, store_objects(server, node.workdir / "objects.json"))


def xtables_lock(opts: Options, backend: Backend, row: Row) -> None:
    """Another program holds the xtables lock (a private lock file, ``XTABLES_LOCKFILE``) for
    ``lock`` seconds; a Service is created meanwhile. Timed from that change."""
    with scratch(opts, f"xtables-lock-file-{backend.value}") as tmp:
        lock = tmp / "xtables.lock"
        lock.touch()
        env = {**os.environ, "XTABLES_LOCKFILE": str(lock)}
        with api_node(opts, backend, "xtables-lock", env) as (node, server):
            new = extra_service(0, opts.endpoints)
            expect = Expect(node.services, service_ports(new))
            with holding(lock, opts.lock):
                started = time.monotonic()
                for obj in new:
                    server.create(obj)
                row.converge = node.wait(expect, started, opts.timeout)
            row.notes.append(f"lock held {opts.lock:g} s"
                             + ("; nft takes no xtables lock" if backend is Backend.NFT else ""))
            node.finish(row, expect, store_objects(server, node.workdir / "objects.json"))


BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


def owned_rules(netfilter: Netfilter) -> dict[str, dict[str, list[str]]]:
    """The rules of every chain iptsync owns and of the built-in chains (its jumps), per
    table."""
    return {table: {chain: rules for chain, rules in saved.chains.items()
                    if names.is_owned_chain(table, chain) or chain in BUILTIN_CHAINS}
            for table, saved in netfilter.save().items()}


def failing_restore(opts: Options, backend: Backend, row: Row) -> None:
    """A batch the kernel rejects: a Service is deleted while another program's chain still
    jumps to its chain (``-X`` fails: in use), and in the same change a new Service is
    created and another one without endpoints (a REJECT rule: the filter table changes
    too). The previous rules must stay as they were in both tables; once the foreign rule is
    gone, timed until the changes are programmed."""
    with api_node(opts, backend, "failing-restore") as (node, server):
        victim = node.services[1]
        before = owned_rules(node.netfilter)
        node.netfilter.restore(f"*nat\n:{FOREIGN_CHAIN} - [0:0]\n"
                               f"-A {FOREIGN_CHAIN} -j {victim.chain}\nCOMMIT\n")
        new = extra_service(0, opts.endpoints)
        server.delete("Service", victim.namespace, victim.name)
        server.delete("EndpointSlice", victim.namespace, f"{victim.name}-abcde")
        for obj in [*new, *extra_service(1, 0)]:
            server.create(obj)
        intact = rejected_batch_left(node, before, row, opts.timeout / 3)
        keep = [s for s in node.services if s != victim]
        expect = Expect(keep, service_ports(new), absent=[victim])
        row.converge = node.wait(expect, time.monotonic(), opts.timeout)
        node.finish(row, expect, store_objects(server, node.workdir / "objects.json"))
        row.judge(intact=intact)


def rejected_batch_left(node: Node, before: dict[str, dict[str, list[str]]], row: Row,
                        timeout: float) -> bool:
    """Once the agent logs a failed sync: are its chains and the built-in chains as
    ``before``? Then the foreign chain goes (the cause of the failure). False only when a
    failure left the rules changed."""
    failed = wait_for_log(node.agent, "sync failed", timeout)
    after = owned_rules(node.netfilter)
    intact = before == after
    row.notes.append("the agent logged a failed sync" if failed
                     else "no failed sync logged (the batch was not rejected)")
    if failed:
        row.notes.append("rules after the failure: " + (
            "as before" if intact else "CHANGED: " + changed_chains(before, after)))
    node.netfilter.restore(f"*nat\n:{FOREIGN_CHAIN} - [0:0]\n-X {FOREIGN_CHAIN}\nCOMMIT\n")
    return intact or not failed


def changed_chains(before: dict[str, dict[str, list[str]]],
                   after: dict[str, dict[str, list[str]]]) -> str:
    diff = [f"{t}/{c}" for t in sorted(set(before) | set(after))
            for c in sorted(set(before.get(t, {})) | set(after.get(t, {})))
            if before.get(t, {}).get(c) != after.get(t, {}).get(c)]
    return ", ".join(diff[:5]) + (f" (+{len(diff) - 5})" if len(diff) > 5 else "")


def wait_for_log(agent: Agent, text: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in agent.log_text():
            return True
        time.sleep(POLL)
    return False


def hostile_service(name: str) -> list[Manifest]:
    """A Service named ``name`` with one endpoint (as an ``--objects`` file may hold it)."""
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"clusterIP": "10.96.250.1",
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                             "targetPort": 8080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "hostile-abcde", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": ["10.1.250.1"], "conditions": {"ready": True}}]},
    ]


def hostile(opts: Options, backend: Backend, row: Row, name: str) -> None:
    """A file with a hostile Service name appears in the watched directory, with a new
    ordinary Service beside it: the ordinary one must be programmed, every other service
    kept, and no rule of the name's making may reach the kernel."""
    objects = baseline_objects(opts.services, opts.endpoints)
    with files_node(opts, backend, row.fault, {"cluster.yaml": objects}) as node:
        new = extra_service(0, opts.endpoints)
        manifests = node.workdir / "manifests"
        (manifests / "new.yaml").write_text(yaml.safe_dump_all(new))
        (manifests / "hostile.yaml").write_text(yaml.safe_dump_all(hostile_service(name)))
        started = time.monotonic()
        expect = Expect(node.services, service_ports(new))
        row.converge = node.wait(expect, started, opts.timeout)
        _, injected = node.watch(3.0, node.services)  # a later sync must not inject either
        injected |= node.view().injected
        row.notes.append("injected rule in the kernel" if injected else "nothing injected")
        if error := node.agent.last_error():
            row.notes.append(f"last error: {error}")
        node.finish(row, expect, manifests)
        row.judge(injected=injected)


def hostile_inject(opts: Options, backend: Backend, row: Row) -> None:
    """A Service name carrying a newline and a DNAT rule for an unrelated address."""
    hostile(opts, backend, row, f"x\n{INJECTED_RULE}\n#")


def hostile_break(opts: Options, backend: Backend, row: Row) -> None:
    """A Service name with a bare newline (an unterminated quote in a restore payload)."""
    hostile(opts, backend, row, "oops\nname")


def yaml_typo(opts: Options, backend: Backend, row: Row) -> None:
    """A syntax error is written into one of four watched files, and a new Service into
    another file: the new one must be programmed and the broken file's services kept."""
    objects = baseline_objects(opts.services, opts.endpoints)
    quarter = len(objects) // 8 * 2  # whole (Service, EndpointSlice) pairs
    files = {f"part-{i}.yaml": objects[i * quarter:(i + 1) * quarter if i < 3 else None]
             for i in range(4)}
    with files_node(opts, backend, "yaml-typo", files) as node:
        new = extra_service(0, opts.endpoints)
        manifests = node.workdir / "manifests"
        broken = manifests / "part-1.yaml"
        broken.write_text(broken.read_text() + "spec: [unclosed\n  ports: {\n")
        (manifests / "new.yaml").write_text(yaml.safe_dump_all(new))
        started = time.monotonic()
        expect = Expect(node.services, service_ports(new))
        row.converge = node.wait(expect, started, opts.timeout)
        kept = service_ports(files["part-1.yaml"])
        row.notes.append(f"services of the broken file still programmed: "
                         f"{len(kept) - len(node.view().missing(kept))}/{len(kept)}")
        # The node keeps what the broken file last yielded: that, the other files, the new one.
        good = write_objects(node.workdir / "objects.json",
                             [o for objs in files.values() for o in objs] + new)
        node.finish(row, expect, good)


# Name, what it injects (first line of the docstring is the table's description).
FAULTS: dict[str, Callable[[Options, Backend, Row], None]] = {
    "outage-rst": outage_rst,
    "partition": partition,
    "410-storm": storm_410,
    "kill-9": kill_9,
    "flush-nat": flush_nat,
    "flush-chain": flush_chain,
    "xtables-lock": xtables_lock,
    "failing-restore": failing_restore,
    "hostile-inject": hostile_inject,
    "hostile-break": hostile_break,
    "yaml-typo": yaml_typo,
}


def run_fault(name: str, opts: Options, backend: Backend) -> Row:
    """One fault on one backend; whatever goes wrong becomes the row's result."""
    row = Row(name, backend.value, timeout=opts.timeout)
    log(f"{name} ({backend.value})")
    try:
        FAULTS[name](opts, backend, row)
    except (FaultSetupError, subprocess.CalledProcessError, OSError, RuntimeError) as err:
        row.result = f"ERROR: {err}"[:200]
        log(f"  {row.result}")
        return row
    if not row.result:
        row.judge()
    took = "-" if row.converge is None else f"{row.converge:.1f} s"
    log(f"  converge {took}, lost {row.lost}: {row.result}")
    return row


def run_suite(opts: Options, backends: Sequence[Backend], only: Sequence[str]) -> list[Row]:
    return [run_fault(name, opts, backend) for backend in backends for name in only]


# --- reporting -----------------------------------------------------------------------------------

def table(rows: Sequence[Row]) -> str:
    cells = [[r.fault, r.backend, "-" if r.converge is None else f"{r.converge:.1f}",
              str(r.lost), r.result, "; ".join(r.notes)] for r in rows]
    return markdown(["fault", "backend", "converge (s)", "lost services", "result", "notes"],
                    cells)


def document(rows: Sequence[Row], opts: Options, command: str) -> str:
    header = (f"Fault suite: {opts.services} services x {opts.endpoints} endpoints "
              f"(kill-9: {opts.kill_services}), --sync-period {opts.sync_period:g}s, "
              f"timeout {opts.timeout:g} s per fault ({platform.node()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')} UTC, `{command}`)")
    return f"{header}\n\n{table(rows)}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.faults",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    defaults = Options()
    parser.add_argument("--backend", choices=["nft", "legacy", "both"], default="both")
    parser.add_argument("--only", default=",".join(FAULTS),
                        help=f"comma-separated faults, in order (default: all: "
                             f"{', '.join(FAULTS)})")
    parser.add_argument("--services", type=int, default=defaults.services)
    parser.add_argument("--endpoints", type=int, default=defaults.endpoints)
    parser.add_argument("--sync-period", type=float, default=defaults.sync_period,
                        help="the agent's --sync-period, seconds (full resync, drift repair)")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="seconds to wait for convergence after each fault")
    parser.add_argument("--partition-seconds", type=float, default=defaults.partition)
    parser.add_argument("--outage-seconds", type=float, default=defaults.outage)
    parser.add_argument("--storm-seconds", type=float, default=defaults.storm)
    parser.add_argument("--lock-seconds", type=float, default=defaults.lock)
    parser.add_argument("--kill-services", type=int, default=defaults.kill_services,
                        help="services of the first sync that kill-9 interrupts")
    parser.add_argument("--logs", type=Path, default=None,
                        help="copy every agent's log into this directory")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    parser.add_argument("--out", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)
    unknown = [n for n in args.only.split(",") if n not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s): {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    if args.services < 4:
        parser.error("--services must be at least 4")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.faults needs root (network namespaces)", file=sys.stderr)
        return 2

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    opts = Options(services=args.services, endpoints=args.endpoints,
                   sync_period=args.sync_period, timeout=args.timeout,
                   outage=args.outage_seconds, partition=args.partition_seconds,
                   storm=args.storm_seconds, lock=args.lock_seconds,
                   kill_services=args.kill_services, logs=args.logs)
    backends = [Backend.NFT, Backend.LEGACY] if args.backend == "both" else [
        Backend(args.backend)]
    command = "python -m bench.faults " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = run_suite(opts, backends, args.only.split(","))
    text = document(rows, opts, command)
    print(text)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    if args.out:
        args.out.write_text(text)
        log(f"wrote {args.out}")
    return 0 if all(r.result == "ok" for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the suite's namespaces and processes are gone")
        sys.exit(130)
