"""Run the lab once: build the cluster, sync the nodes, send traffic, read the rules back, judge.

Why: this is the sequence the ``iptsync lab`` command and its tests share, with the cluster's
lifetime around it. :func:`run_lab` returns a :class:`LabResult` (plain dataclasses) that the
report presents; it calls ``while_up`` before tearing the namespaces down, so the command can
show the report and hold the lab up for ``--keep``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from iptsync.kernel.port import NetfilterError
from iptsync.lab.checks import Check, evaluate
from iptsync.lab.readback import (
    DumpExcerpt,
    ExternalNameResult,
    LiveComparison,
    OtherFamilyResult,
    ReadBack,
    compare_live,
    dump_service,
    external_name_result,
    live_tables,
    other_family_result,
    save_command,
)
from iptsync.lab.scenario import Scenario, load_scenario, manifests_dir
from iptsync.lab.topology import Cluster, LabError
from iptsync.lab.traffic import NodeSync, Probe, probe_services, sync_node

DEFAULT_REQUESTS = 60


@dataclass(frozen=True)
class LabResult:
    """Everything the lab measured, with the scenario it measured."""

    scenario: Scenario
    backend: str
    prefix: str
    requests: int
    namespaces: Mapping[str, str]
    """Namespace key (``switch``, ``client``, ``node:node1``, ``pod:client1``...) -> name."""
    syncs: tuple[NodeSync, ...]
    probes: tuple[Probe, ...]
    dumps: tuple[DumpExcerpt, ...]
    """The dumped service's rules, one excerpt per IP family it has."""
    lives: tuple[LiveComparison, ...]
    """The dump node's live rules compared with each excerpt, in the same order."""
    external_name: ExternalNameResult
    other_family: tuple[OtherFamilyResult, ...]
    """Each single-stack service looked for in the other family's tables."""
    checks: tuple[Check, ...]

    @property
    def manifests(self) -> str:
        return str(self.scenario.manifests)

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


FAMILY_PREFIX = {"IPv4": "", "IPv6": "ip6 "}
"""How the tables of each family are keyed in the live tables read back: ``nat``, ``ip6 nat``."""


def read_back(cluster: Cluster, scenario: Scenario, backend: str) -> ReadBack:
    """The dump of the scenario's service in each of its families, each compared with its
    node; the ExternalName's traces in both families' tables; the single-stack services'
    traces in the other family's."""
    dumps = tuple(dump_service(scenario.manifests, scenario.dump_node,
                               scenario.dump_service.ref, scenario.cluster_cidrs, family)
                  for family in scenario.dump_service.families)
    live: dict[str, dict[str, str]] = {}
    error: str | None = None
    for node in scenario.nodes:
        families = ["IPv4", *(["IPv6"] if node.ip6 is not None else [])]
        for family in families:
            try:
                tables = live_tables(cluster, node.name, backend, family)
            except (NetfilterError, OSError) as exc:
                error = error or f"{node.name}: {exc}"
                continue
            live.setdefault(node.name, {}).update(
                {FAMILY_PREFIX[family] + table: text for table, text in tables.items()})
    comparisons = []
    for dump in dumps:
        command = save_command(backend, "nat", dump.family)
        text = live.get(scenario.dump_node, {}).get(FAMILY_PREFIX[dump.family] + "nat")
        comparisons.append(
            compare_live(dump, text, command) if text is not None else
            LiveComparison(scenario.dump_node, dump.family, command, False, tuple(dump.chains),
                           (), error or "no rules read"))
    return ReadBack(
        dumps, tuple(comparisons),
        external_name_result(scenario.external_name, dumps, live, error),
        tuple(other_family_result(s, live, FAMILY_PREFIX) for s in scenario.services
              if len(s.families) == 1))


def measure(cluster: Cluster, scenario: Scenario, backend: str, requests: int,
            progress: Callable[[str], None] = lambda _: None) -> LabResult:
    """Sync every node, send the traffic, read the rules back and judge it all."""
    nodes = [node.name for node in scenario.nodes]
    progress(f"running iptsync run --once --iptables-backend {backend} on "
             f"{' and '.join(nodes)}")
    syncs = tuple(sync_node(cluster, node, backend, scenario) for node in nodes)
    progress(f"sending {requests} requests to each service address")
    probes = probe_services(cluster, scenario, requests)
    progress("reading the rules back")
    rules = read_back(cluster, scenario, backend)
    return LabResult(
        scenario=scenario, backend=backend, prefix=cluster.prefix, requests=requests,
        namespaces=cluster.namespaces, syncs=syncs, probes=probes, dumps=rules.dumps,
        lives=rules.lives, external_name=rules.external_name, other_family=rules.other_family,
        checks=evaluate(scenario, syncs, probes, rules),
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
    scenario = load_scenario(manifests if manifests is not None else manifests_dir())
    try:
        cluster = Cluster(scenario.cluster_spec())
    except ValueError as exc:  # addresses that do not fit together, e.g. two nodes' pod CIDRs
        raise LabError(f"{scenario.manifests}: {exc}") from None
    progress(f"building the dual-stack cluster in namespaces {cluster.prefix}* "
             f"({len(scenario.nodes)} nodes, {len(scenario.pods)} pods, 1 client)")
    with cluster:
        try:
            for route in scenario.client_routes:
                cluster.route_from_client(route.to, via_node=route.via)
            result = measure(cluster, scenario, backend, requests, progress)
            if while_up is not None:
                while_up(result)
        finally:
            if before_teardown is not None:
                before_teardown()
            progress(f"tearing down {len(cluster.namespaces)} namespaces")
    return result
