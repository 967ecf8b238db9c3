"""Event-to-rules latency of the agent: API event in, rules in the kernel out.

The agent runs in this process against the fake API server of the test suite (the real
``kubernetes`` client over loopback HTTP, list + watch), with its rules going into a fresh
network namespace. After the first full sync, one EndpointSlice at a time gets one more
endpoint; the latency is from the server's update to the end of the agent's partial sync that
applied it. Changes are spaced by more than ``--min-sync-period``, so each one is the "first
change after a quiet period", applied at once. Prints a Markdown table; ``--out`` writes it.

    sudo .venv/bin/python -m bench.latency --services 1000 --changes 20 --out docs/latency.md
"""

from __future__ import annotations

import argparse
import ipaddress
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.generate import cluster
from bench.scale import namespace
from iptsync.agent.loop import Agent, Timing
from iptsync.core.policy import Settings
from iptsync.engine.apply import STAGE_LINES
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Backend, Netfilter
from iptsync.sources.api import ApiSource

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from apiserver import FakeApiServer

SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/8"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))


def measure(backend: Backend, services: int, endpoints: int, changes: int) -> dict[str, Any]:
    with namespace(f"lat-{backend.value}") as netns, FakeApiServer(
            bookmark_interval=10) as server:
        objects = cluster(services, endpoints)["items"]
        for obj in objects:
            server.create(obj)
        slices = [o for o in objects if o["kind"] == "EndpointSlice"]
        return _run(server, Netfilter(backend, netns=netns), slices, changes)


def _run(server: FakeApiServer, netfilter: Netfilter, slices: list[dict[str, Any]],
         changes: int) -> dict[str, Any]:
    client = server.api_client()
    client.configuration.retries = 0  # as ApiSource sets on clients it builds
    engine = Engine(netfilter, SETTINGS,
                    stage_lines=STAGE_LINES[netfilter.backend])
    agent = Agent(engine, [ApiSource("node1", api_client=client)],
                  timing=Timing(min_sync_period=1.0, sync_period=3600.0, canary_interval=5.0))
    started = time.monotonic()
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        while not engine.synced_once:
            time.sleep(0.01)
        startup = time.monotonic() - started
        first = agent.reports[-1]
        latencies, phases = [], []
        rng = random.Random(7)
        for i in range(changes):
            time.sleep(1.2)  # a quiet period
            target = dict(rng.choice(slices))
            target["endpoints"] = [*target["endpoints"], {
                "addresses": [f"10.250.{i // 250}.{i % 250 + 1}"], "conditions": {"ready": True}}]
            last = agent.reports[-1]
            mark = time.monotonic()
            server.update(target)
            while agent.reports[-1] is last:
                time.sleep(0.002)
            latencies.append(time.monotonic() - mark)
            phases.append(agent.reports[-1].phases)
    finally:
        agent.stop()
        thread.join(timeout=30)
        client.close()
    return {"startup": startup, "first": first.phases, "latencies": latencies,
            "phases": {name: statistics.median(p.get(name, 0.0) for p in phases)
                       for name in ("render", "plan", "apply", "total")}}


def table(results: dict[str, dict[str, Any]], services: int, endpoints: int) -> str:
    rows = [f"Agent event-to-rules latency, {services} services x {endpoints} endpoints "
            f"({platform.node()}, {time.strftime('%Y-%m-%d')})", "",
            "| backend | list + first full sync | latency p50 | p90 | max | partial sync phases "
            "(median): render / plan / apply |",
            "|---|---|---|---|---|---|"]
    for backend, r in results.items():
        lat = sorted(r["latencies"])
        p = r["phases"]
        rows.append(
            f"| {backend} | {r['startup']:.2f} s | {statistics.median(lat) * 1000:.0f} ms | "
            f"{lat[int(0.9 * (len(lat) - 1))] * 1000:.0f} ms | {lat[-1] * 1000:.0f} ms | "
            f"{p['render'] * 1000:.1f} / {p['plan'] * 1000:.1f} / {p['apply'] * 1000:.1f} ms |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--backend", choices=["nft", "legacy", "both"], default="both")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    backends = [Backend.NFT, Backend.LEGACY] if args.backend == "both" else [
        Backend(args.backend)]
    results = {b.value: measure(b, args.services, args.endpoints, args.changes)
               for b in backends}
    text = table(results, args.services, args.endpoints)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
