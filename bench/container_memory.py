"""What a node's iptsync container is charged for memory, the figures its limit is sized from.

A container's memory limit counts more than the agent's own peak RSS (what bench/scale.py
reports): the ``iptables-restore`` / ``iptables-save`` it runs at the same time, and the kernel
memory of the rules it writes (nf_tables and x_tables allocate it with memory-cgroup accounting,
charged to the writer). Without a container engine, this measures both from outside: for
``iptsync run --once`` (the real CLI) into a fresh network namespace, first into an empty one and
then again on the loaded one (a restart), the resident memory of the agent and all its children
is summed every 50 ms and the largest sum kept; the rules' kernel memory is what
``/proc/meminfo`` (Slab + VmallocUsed + Percpu) gives back when the namespace is deleted. Other
activity on the machine moves /proc/meminfo too: read that column as an estimate.

    python -m bench.container_memory --services 10000 --endpoints 10 --backend both
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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


def rss_mb(pid: int) -> tuple[str, float]:
    """A process's name and resident memory in MB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "", 0.0
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return fields["Name"].strip(), int(fields.get("VmRSS", "0 kB").split()[0]) / 1024


def tree_peak(argv: list[str]) -> tuple[float, dict[str, float]]:
    """Run ``argv``; the largest summed RSS of it and its children, and that moment's parts."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, parts = 0.0, {}
    while proc.poll() is None:
        sample = [rss_mb(pid) for pid in descendants(proc.pid)]
        total = sum(mb for _, mb in sample)
        if total > peak:
            peak, parts = total, {name: mb for name, mb in sample if mb > 1}
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
    with tempfile.TemporaryDirectory() as directory:
        objects = Path(directory) / "cluster.json"
        objects.write_text(json.dumps(cluster(args.services, args.endpoints)))
        for backend in ("nft", "legacy") if args.backend == "both" else (args.backend,):
            measure(backend, objects)


if __name__ == "__main__":
    main()
