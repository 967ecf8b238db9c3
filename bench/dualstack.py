"""Dual-stack scale benchmark (issue #14): both IP families on one node, against their floors.

For each iptables backend, in network namespaces of its own (created here, deleted on exit;
the host's rules are never touched), on a synthetic cluster of N dual-stack Services
(``ipFamilies: [IPv4, IPv6]``) with M endpoints per family (an IPv4 and an IPv6
EndpointSlice each, as the EndpointSlice controller makes them):

1. First full sync of both families, end to end as the agent does it: every object parsed
   once and added to one engine per family, then the IPv4 sync and the IPv6 sync; against the
   floor, the bare flushing ``iptables-restore`` and ``ip6tables-restore`` of the same two
   payloads into another empty namespace. Repetitions are interleaved.
2. Per family, a partial sync (one endpoint more for one service, in that family's slice)
   against that family's one-rule floor (one rule in a new nat chain, ``--noflush``, on the
   same loaded kernel).
3. The peak RSS of the real agent (``iptsync run --once``, both families) in a namespace.

    python -m bench.dualstack --services 10000 --endpoints 10 --backend both
    python -m bench.dualstack --quick      # 300 services x 5 endpoints
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ipaddress
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.generate import service_objects
from bench.scale import (
    Measured,
    Samples,
    iptsync_command,
    log,
    namespace,
    run_measured,
    seconds,
    timed_restore,
)
from iptsync.core.model import IPFamily, parse_object
from iptsync.core.policy import Settings
from iptsync.engine.apply import STAGE_LINES
from iptsync.engine.desired import desired_from_objects
from iptsync.engine.families import in_turn
from iptsync.engine.reconciler import Engine, bulk
from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.port import Backend

Manifest = dict[str, Any]
NODE = "node1"
CLUSTER_CIDRS = ("10.0.0.0/8", "fd00:10::/32")
NODE_IPS = ("10.100.0.2", "fd00:100::2")
QUICK = (300, 5)
TARGET_FULL_RATIO = 1.3
TARGET_RSS_MB = 600.0
TARGET_PARTIAL_OVER_FLOOR = 0.030  # seconds


def v6(index: int, prefix: str) -> str:
    """The ``index``-th address after ``prefix`` (which ends in ``::``), spelled as the API
    server stores it (RFC 5952: ``fd00:96::1``, not ``fd00:96::0:1``)."""
    return str(ipaddress.IPv6Address(f"{prefix}{index >> 16:x}:{index & 0xFFFF:x}"))


def dual_stack_objects(index: int, endpoints: int, rng: random.Random) -> list[Manifest]:
    """:func:`bench.generate.service_objects`, made dual-stack: an IPv6 cluster IP (and LB IP)
    beside the IPv4 ones, and an IPv6 slice with as many endpoints on the same nodes."""
    service, v4_slice = service_objects(index, endpoints, rng)
    spec = service["spec"]
    spec["clusterIPs"] = [spec["clusterIP"], v6(index, "fd00:96::")]
    spec["ipFamilies"] = ["IPv4", "IPv6"]
    spec["ipFamilyPolicy"] = "RequireDualStack"
    ingress = service.get("status", {}).get("loadBalancer", {}).get("ingress")
    if ingress:
        ingress.append({"ip": v6(index, "2001:db8:203::")})
    v6_slice = copy.deepcopy(v4_slice)
    v6_slice["metadata"]["name"] = v4_slice["metadata"]["name"].replace("-abcde", "-v6xyz")
    v6_slice["addressType"] = "IPv6"
    for j, endpoint in enumerate(v6_slice["endpoints"]):
        endpoint["addresses"] = [v6(index * endpoints + j, "fd00:10:1::")]
    return [service, v4_slice, v6_slice]


def dual_stack_cluster(services: int, endpoints: int, seed: int = 1) -> list[Manifest]:
    rng = random.Random(seed)
    return [obj for i in range(services) for obj in dual_stack_objects(i, endpoints, rng)]


def family_settings() -> dict[IPFamily, Settings]:
    base = Settings(node_name=NODE,
                    cluster_cidrs=tuple(ipaddress.ip_network(c) for c in CLUSTER_CIDRS),
                    node_ips=tuple(ipaddress.ip_address(ip) for ip in NODE_IPS))
    return {family: base.for_family(family) for family in IPFamily}


@dataclass
class FamilyResult:
    partial: Samples = field(default_factory=Samples)
    floor: Samples = field(default_factory=Samples)


@dataclass
class BackendResult:
    backend: Backend
    full: Samples = field(default_factory=Samples)
    bare: Samples = field(default_factory=Samples)
    families: dict[IPFamily, FamilyResult] = field(
        default_factory=lambda: {f: FamilyResult() for f in IPFamily})
    agent: Measured | None = None

    @property
    def full_ratio(self) -> float:
        return self.full.median / self.bare.median


def engines(backend: Backend, netns: str) -> dict[IPFamily, Engine]:
    return {family: Engine(Netfilter(backend, netns, family=family), settings,
                           stage_lines=STAGE_LINES[backend])
            for family, settings in family_settings().items()}


def first_sync(backend: Backend, netns: str, objects: list[Manifest]) -> tuple[
        float, dict[IPFamily, Engine]]:
    """Parse once, add to both engines, sync IPv4 then IPv6 (IPv6 rendered while IPv4's
    restore runs), as ``run --once`` and the agent do; wall time end to end."""
    started = time.perf_counter()
    per_family = engines(backend, netns)
    with bulk():
        for obj in objects:
            parsed = parse_object(obj)
            assert parsed.value is not None, parsed.problems
            for engine in per_family.values():
                engine.add(parsed.value)
    for engine in in_turn(list(per_family.values())):
        engine.sync()
    return time.perf_counter() - started, per_family


def one_more_endpoint(objects: list[Manifest], family: IPFamily, round_: int) -> Manifest:
    """svc-00001's slice of ``family`` with one endpoint more (a new address each round)."""
    suffix = "-abcde" if family is IPFamily.IPV4 else "-v6xyz"
    original = next(o for o in objects if o["kind"] == "EndpointSlice"
                    and o["metadata"]["name"] == f"svc-00001{suffix}")
    changed = copy.deepcopy(original)
    address = (f"10.250.{round_ // 250}.{round_ % 250 + 1}" if family is IPFamily.IPV4
               else v6(round_, "fd00:10:2::"))
    changed["endpoints"].append({"addresses": [address], "nodeName": "node2",
                                 "conditions": {"ready": True}})
    return changed


def one_rule_floor(netfilter: Netfilter, round_: int) -> float:
    chain = f"IPTSYNC-FLOOR-{round_}"
    started = time.perf_counter()
    netfilter.restore(f"*nat\n:{chain} - [0:0]\n-A {chain} -j RETURN\nCOMMIT\n")
    elapsed = time.perf_counter() - started
    netfilter.restore(f"*nat\n-F {chain}\n-X {chain}\nCOMMIT\n")
    return elapsed


def measure_backend(backend: Backend, objects: list[Manifest], path: Path,
                    payloads: dict[IPFamily, str], repetitions: int) -> BackendResult:
    result = BackendResult(backend)
    kept: dict[IPFamily, Engine] = {}
    with contextlib.ExitStack() as keep:
        for rep in range(repetitions):
            with namespace(f"{backend.value}-dsbare{rep}") as bare_ns:
                log(f"{backend.value}: bare restores of both payloads")
                result.bare.values.append(sum(
                    timed_restore(Netfilter(backend, bare_ns, family=family), payload,
                                  noflush=False) for family, payload in payloads.items()))
            log(f"{backend.value}: first full sync of both families")
            ns = keep.enter_context(namespace(f"{backend.value}-ds{rep}")) \
                if rep == repetitions - 1 else None
            if ns is None:
                with namespace(f"{backend.value}-ds{rep}") as scratch:
                    elapsed, _ = first_sync(backend, scratch, objects)
            else:
                elapsed, kept = first_sync(backend, ns, objects)
            result.full.values.append(elapsed)
        for family, engine in kept.items():
            assert engine.netfilter is not None
            netfilter = engine.netfilter
            assert isinstance(netfilter, Netfilter)
            for round_ in range(repetitions * 2):
                log(f"{backend.value}: {family.value} partial sync and one-rule floor")
                started = time.perf_counter()
                engine.upsert(one_more_endpoint(objects, family, round_))
                engine.sync()
                result.families[family].partial.values.append(time.perf_counter() - started)
                result.families[family].floor.values.append(one_rule_floor(netfilter, round_))
        with namespace(f"{backend.value}-dsagent") as agent_ns:
            log(f"{backend.value}: iptsync run --once, both families")
            result.agent = run_measured([
                "ip", "netns", "exec", agent_ns, *iptsync_command(), "run", "--once",
                "--objects", str(path), "--hostname-override", NODE,
                "--cluster-cidr", ",".join(CLUSTER_CIDRS),
                *[arg for ip in NODE_IPS for arg in ("--node-ip", ip)],
                "--iptables-backend", backend.value, "--no-conntrack-cleanup"])
    return result


def report(services: int, endpoints: int, results: list[BackendResult]) -> str:
    lines = [f"### Dual-stack: {services:,} services x {endpoints} endpoints per family",
             "", "| | " + " | ".join(r.backend.value for r in results) + " | target |",
             "|---|" + "---|" * len(results) + "---|"]

    def row(label: str, cells: Iterator[str], target: str) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")

    row("first full sync, both families, end to end",
        (f"{r.full.text()} vs {r.bare.text()} = **{r.full_ratio:.2f}x**" for r in results),
        f"<= {TARGET_FULL_RATIO}x of the bare restores of both payloads")
    def over_floor(result: FamilyResult) -> str:
        extra = (result.partial.median - result.floor.median) * 1000
        return f"{result.partial.text()} vs {result.floor.text()} (+{extra:.0f} ms)"

    for family in IPFamily:
        row(f"{family.value}: +1 endpoint, partial sync vs one-rule floor",
            (over_floor(r.families[family]) for r in results),
            f"within {TARGET_PARTIAL_OVER_FLOOR * 1000:.0f} ms of the floor")
    row("agent peak RSS (`run --once`, both families)",
        (f"{r.agent.max_rss_mb:.0f} MB in {seconds(r.agent.seconds)}" if r.agent else "-"
         for r in results), f"< {TARGET_RSS_MB:.0f} MB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--backend", choices=["nft", "legacy", "both"], default="both")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    services, endpoints = QUICK if args.quick else (args.services, args.endpoints)
    backends = [Backend.NFT, Backend.LEGACY] if args.backend == "both" else [
        Backend(args.backend)]
    objects = dual_stack_cluster(services, endpoints)
    settings = family_settings()
    payloads = {family: desired_from_objects(objects, s).payload()
                for family, s in settings.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cluster.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        results = [measure_backend(b, objects, path, payloads, args.repetitions)
                   for b in backends]
    text = report(services, endpoints, results)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps([{
            "backend": r.backend.value, "full": r.full.values, "bare": r.bare.values,
            "full_ratio": r.full_ratio,
            "partial": {f.value: r.families[f].partial.values for f in IPFamily},
            "floor": {f.value: r.families[f].floor.values for f in IPFamily},
            "agent_rss_mb": r.agent.max_rss_mb if r.agent else None,
        } for r in results], indent=1))
    ok = all(r.full_ratio <= TARGET_FULL_RATIO and r.agent is not None
             and r.agent.max_rss_mb < TARGET_RSS_MB for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
