"""Stale-flow cleanup with a full conntrack table (issue 16): kernel-filtered vs a full dump.

A fresh network namespace (created here, deleted on exit) gets ``--flows`` unrelated UDP
conntrack entries (answered; a quarter to DNS servers on port 53, the services' port, the rest
to other ports; never DNATed), created over ctnetlink in batches, plus, for each of
``--services`` UDP services (all on port 53), unanswered flows pinned to a serving endpoint and
flows pinned to a removed one. Then, in the same run:

- **partial**: what a sync that changed one service does (``clear_stale_flows`` with that
  service's destinations: one kernel-filtered dump per destination port);
- **full**: what a full sync does (every service's destinations);
- **filtered, nothing stale**: the partial cleanup again once the table is clean (the usual
  case: a sync that changed a service nobody is talking to);
- **before**: the cleanup as it was (every entry of the table dumped into Python by pyroute2
  and judged there), timed over the first ``--old-sample`` entries and scaled to the table,
  since the whole dump takes minutes (``--old-sample 0`` dumps it all).

nf_conntrack_max is read, never written: the table a namespace may hold is that global limit,
and ``--flows`` is scaled down (with a note) when it does not fit with room to spare.

    python -m bench.conntrack                       # 100,000 flows, IPv4 and IPv6
    python -m bench.conntrack --flows 20000 --family IPv4 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.scale import log, markdown, namespace
from iptsync.core.flows import UDP, Flow, flow_targets, stale
from iptsync.core.model import IPFamily
from iptsync.core.policy import Settings
from iptsync.engine.reconciler import Engine
from iptsync.kernel.conntrack import NewEntry, clear_stale_flows, insert_flows, list_flows
from iptsync.lab.netns import thread_in_netns

Manifest = dict[str, Any]
TARGET = 0.2  # seconds: issue 16's bound for the cleanup with 100,000 unrelated entries
HEADROOM = 0.8  # of nf_conntrack_max, so that the host's own flows still fit beside ours
STALE_PER_SERVICE = 10
PORT, TARGET_PORT = 53, 5353


@dataclass
class Result:
    """One family's figures (seconds of wall clock, and of CPU in this process, kernel time
    of the dumps included; medians of ``repetitions`` runs)."""

    family: str
    flows: int
    services: int
    partial: float
    partial_cpu: float
    partial_deleted: int
    full: float
    full_cpu: float
    full_deleted: int
    clean: float
    clean_cpu: float
    before: float
    before_cpu: float
    before_sampled: int


def cluster_ip(family: IPFamily, index: int) -> str:
    return (f"10.96.{index // 250}.{index % 250 + 1}" if family is IPFamily.IPV4
            else f"fd00:96::{index + 1:x}")


def pod_ip(family: IPFamily, service: int, endpoint: int) -> str:
    return (f"10.1.{service % 250}.{endpoint + 1}" if family is IPFamily.IPV4
            else f"fd00:1::{service:x}:{endpoint + 1:x}")


def client_ip(family: IPFamily, index: int) -> str:
    return (f"10.2.{index // 250 % 250}.{index % 250 + 1}" if family is IPFamily.IPV4
            else f"fd00:2::{index + 1:x}")


def udp_service(family: IPFamily, index: int) -> list[Manifest]:
    """Service ``dns-N`` (UDP 53, port 5353) and its slice: endpoints 1 and 2 serve."""
    name = f"dns-{index}"
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"namespace": "bench", "name": name},
         "spec": {"clusterIP": cluster_ip(family, index), "ipFamilies": [family.value],
                  "ports": [{"name": "dns", "port": PORT, "protocol": "UDP",
                             "targetPort": TARGET_PORT}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"namespace": "bench", "name": f"{name}-x",
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": family.value,
         "ports": [{"name": "dns", "port": TARGET_PORT, "protocol": "UDP"}],
         "endpoints": [{"addresses": [pod_ip(family, index, e)], "conditions": {"ready": True}}
                       for e in range(2)]},
    ]


def unrelated(family: IPFamily, count: int) -> Iterator[NewEntry]:
    """UDP flows to servers outside the cluster, answered: a quarter to port 53 (the
    services' port), never DNATed."""
    for index in range(count):
        port = PORT if index % 4 == 0 else 1024 + index % 50000
        server = (f"192.0.2.{index % 250 + 1}" if family is IPFamily.IPV4
                  else f"2001:db8::{index % 250 + 1:x}")
        yield NewEntry(Flow(UDP, server, port, server, port), client_ip(family, index // 50),
                       1024 + index % 50, replied=True)


def service_flows(family: IPFamily, services: int) -> tuple[list[NewEntry], list[NewEntry]]:
    """(kept, stale) flows of every service: pinned to endpoint 1, or to a removed one."""
    kept, doomed = [], []
    for index in range(services):
        for n in range(STALE_PER_SERVICE):
            client = client_ip(family, 60000 + n)
            kept.append(NewEntry(Flow(UDP, cluster_ip(family, index), PORT,
                                      pod_ip(family, index, 0), TARGET_PORT), client, 2000 + n))
            doomed.append(NewEntry(Flow(UDP, cluster_ip(family, index), PORT,
                                        pod_ip(family, index, 9), TARGET_PORT), client,
                                   3000 + n))
    return kept, doomed


def timed(action: Callable[[], int]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, what the action returned)."""
    started, cpu = time.perf_counter(), time.process_time()
    count = action()
    return time.perf_counter() - started, time.process_time() - cpu, count


def old_full_dump(family: IPFamily, engine: Engine, sample: int) -> int:
    """The cleanup before: pyroute2 dumps every entry of the family into Python, each is
    judged there. Reads ``sample`` entries (all when 0); returns how many it read."""
    import socket  # noqa: PLC0415

    from pyroute2 import Conntrack  # noqa: PLC0415

    targets = flow_targets(engine.state, engine.settings)
    ct = Conntrack(nfgen_family=socket.AF_INET if family is IPFamily.IPV4 else socket.AF_INET6)
    read = 0
    try:
        for entry in ct.dump_entries():
            orig, reply = entry.tuple_orig, entry.tuple_reply
            stale(Flow(orig.proto, orig.daddr, orig.dport or 0, reply.saddr, reply.sport or 0),
                  targets)
            read += 1
            if read == sample:
                break
        return read
    finally:
        ct.close()


def measure(family: IPFamily, flows: int, services: int, repetitions: int,
            old_sample: int) -> Result:
    engine = Engine(None, Settings(node_name="node1", family=family))
    for index in range(services):
        for obj in udp_service(family, index):
            engine.upsert(obj)
    changed = {("bench", "dns-0")}
    kept, doomed = service_flows(family, services)
    with namespace(family.value.lower()) as netns, thread_in_netns(netns):
        started = time.perf_counter()
        insert_flows(family, unrelated(family, flows))
        insert_flows(family, kept)
        log(f"{family.value}: {flows} unrelated + {len(kept)} kept flows in "
            f"{time.perf_counter() - started:.1f} s")
        partial, full, clean = [], [], []
        for _ in range(repetitions):
            insert_flows(family, doomed)
            partial.append(timed(lambda: clear_stale_flows(
                flow_targets(engine.state, engine.settings, changed))))
            full.append(timed(lambda: clear_stale_flows(
                flow_targets(engine.state, engine.settings))))
            clean.append(timed(lambda: clear_stale_flows(
                flow_targets(engine.state, engine.settings, changed))))
        left = len(list_flows(family))
        assert flows + len(kept) == left, f"{left} flows left, expected {flows + len(kept)}"
        log(f"{family.value}: timing the old full dump over "
            f"{old_sample or 'every'} entries")
        before = timed(lambda: old_full_dump(family, engine, old_sample))
    scale = (flows + len(kept)) / before[2]
    return Result(family.value, flows, services, *median(partial), partial[0][2],
                  *median(full), full[0][2], *median(clean),
                  before[0] * scale, before[1] * scale, before[2])


def median(runs: list[tuple[float, float, int]]) -> tuple[float, float]:
    """The median wall and CPU seconds of ``runs``."""
    return (statistics.median(wall for wall, _cpu, _count in runs),
            statistics.median(cpu for _wall, cpu, _count in runs))


def fitting(flows: int, services: int) -> tuple[int, str]:
    """``flows`` scaled down to what nf_conntrack_max leaves room for, and a note when so."""
    limit = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    room = int(limit * HEADROOM) - services * STALE_PER_SERVICE * 2
    if flows <= room:
        return flows, f"nf_conntrack_max {limit}: {flows} flows fit"
    return room, (f"nf_conntrack_max {limit} (read, not changed): {flows} flows do not fit "
                  f"with room to spare; scaled down to {room}")


def table(results: list[Result], note: str) -> str:
    rows = []
    for r in results:
        rows.append([r.family, f"{r.flows:,}", str(r.services),
                     f"{ms(r.partial)} ({ms(r.partial_cpu)} CPU), {r.partial_deleted} deleted",
                     f"{ms(r.clean)} ({ms(r.clean_cpu)} CPU)",
                     f"{ms(r.full)} ({ms(r.full_cpu)} CPU), {r.full_deleted} deleted",
                     f"{r.before:.1f} s ({r.before_cpu:.1f} s CPU; "
                     f"from {r.before_sampled:,} entries)",
                     f"{r.before / r.partial:.0f}x",
                     "yes" if r.partial <= TARGET else "NO"])
    header = ["family", "unrelated flows", "UDP services", "partial sync cleanup",
              "partial, nothing stale", "full sync cleanup", "before: full dump (scaled)",
              "speed-up (partial)", f"partial <= {TARGET} s"]
    return f"{note}\n\n{markdown(header, rows)}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--family", choices=["IPv4", "IPv6", "both"], default="both")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--old-sample", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    flows, note = fitting(args.flows, args.services)
    log(note)
    families = list(IPFamily) if args.family == "both" else [IPFamily(args.family)]
    results = [measure(family, flows, args.services, args.repetitions, args.old_sample)
               for family in families]
    if args.json:
        print(json.dumps({"note": note, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(table(results, note))


if __name__ == "__main__":
    main()
