"""What a node's iptsync container is charged for memory, the figures its limit is sized from.

A container's memory limit counts more than the agent's own peak RSS (what bench/scale.py
reports): the ``iptables-restore`` / ``iptables-save`` it runs at the same time, and the kernel
memory of the rules it writes (nf_tables and x_tables allocate it with memory-cgroup accounting,
charged to the writer). Without a container engine, this measures both from outside. It runs
``iptsync run --once`` (the real CLI) into a fresh network namespace, first into an empty one,
then again on the loaded one (a restart), sums the proportional set size of the agent and all
its children every 50 ms and keeps the largest sum. The rules' kernel memory is what
``/proc/meminfo`` (Slab + VmallocUsed + Percpu) gives back when the namespace is deleted; other
activity on the machine moves those counters too, so read that figure as an estimate.

    python -m bench.container_memory --services 10000 --endpoints 10 --backend both
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.generate import cluster
from bench.scale import iptsync_command, namespace, node_flags

KERNEL_FIELDS = ("Slab", "VmallocUsed", "Percpu")


def kernel_mb() -> float:
    """Slab + VmallocUsed + Percpu from /proc/meminfo, in MB."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return sum(fields[key] for key in KERNEL_FIELDS) / 1024


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


def pss_mb(pid: int) -> tuple[str, float]:
    """A process's name and proportional set size in MB (0 once it is gone). PSS, not RSS: a
    child between fork and exec shares the agent's pages, and summing RSS would count them
    twice where the memory cgroup charges them once."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        if len(name) == 15:  # cut there: iptables-legacy-save and -restore would look alike
            name = Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name
    except (OSError, UnicodeDecodeError):
        return "", 0.0
    fields = dict(line.split(":", 1) for line in rollup.splitlines()[1:])
    return name, int(fields.get("Pss", "0 kB").split()[0]) / 1024


def tree_peak(argv: list[str]) -> tuple[float, dict[str, float]]:
    """Run ``argv``; the largest summed PSS of it and its children, and that moment's parts."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, parts = 0.0, {}
    while proc.poll() is None:
        sample = [pss_mb(pid) for pid in descendants(proc.pid)]
        total = sum(mb for _, mb in sample)
        if total > peak:
            parts = {}
            for name, mb in sample:
                parts[name] = parts.get(name, 0.0) + mb
            peak = total
        time.sleep(0.05)
    _, errors = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed: {errors.decode(errors='replace')[-2000:]}")
    return peak, parts


def measure(backend: str, objects: Path) -> None:
    with namespace(f"mem-{backend}") as netns:
        argv = ["ip", "netns", "exec", netns, *iptsync_command(), "run", "--once",
                *node_flags(objects), "--iptables-backend", backend]
        for moment in ("first sync", "restart"):
            peak, parts = tree_peak(argv)
            shown = ", ".join(f"{name} {mb:.0f}" for name, mb in parts.items())
            print(f"{backend}, {moment}: {peak:.0f} MB together ({shown})", flush=True)
        loaded = kernel_mb()
    time.sleep(5)  # the kernel frees a deleted namespace's rules asynchronously
    print(f"{backend}: about {loaded - kernel_mb():.0f} MB of kernel memory freed with the "
          f"rules ({' + '.join(KERNEL_FIELDS)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--backend", choices=("nft", "legacy", "both"), default="both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    # SIGTERM unwinds like Ctrl-C, so the namespace is deleted.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory() as directory:
        objects = Path(directory) / "cluster.json"
        objects.write_text(json.dumps(cluster(args.services, args.endpoints)))
        for backend in ("nft", "legacy") if args.backend == "both" else (args.backend,):
            measure(backend, objects)


if __name__ == "__main__":
    main()
