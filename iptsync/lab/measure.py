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
    compare_live,
    dump_service,
    external_name_result,
    live_tables,
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
    dump: DumpExcerpt
    live: LiveComparison
    external_name: ExternalNameResult
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


def read_back(cluster: Cluster, scenario: Scenario, backend: str,
              ) -> tuple[DumpExcerpt, LiveComparison, ExternalNameResult]:
    """The dump of the scenario's service, compared with its node; the ExternalName's traces."""
    dump = dump_service(scenario.manifests, scenario.dump_node, scenario.dump_service.ref,
                        scenario.cluster_cidr)
    live: dict[str, dict[str, str]] = {}
    error: str | None = None
    for node in scenario.nodes:
        try:
            live[node.name] = live_tables(cluster, node.name, backend)
        except (NetfilterError, OSError) as exc:
            error = error or f"{node.name}: {exc}"
    command = save_command(backend, "nat")
    if scenario.dump_node in live:
        comparison = compare_live(dump, live[scenario.dump_node]["nat"], command)
    else:
        comparison = LiveComparison(scenario.dump_node, command, False, tuple(dump.chains), (),
                                    error or "no rules read")
    return dump, comparison, external_name_result(scenario.external_name, dump, live, error)


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
    dump, live, external = read_back(cluster, scenario, backend)
    return LabResult(
        scenario=scenario, backend=backend, prefix=cluster.prefix, requests=requests,
        namespaces=cluster.namespaces, syncs=syncs, probes=probes, dump=dump, live=live,
        external_name=external, checks=evaluate(scenario, syncs, probes, live, external),
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
    progress(f"building the cluster in namespaces {cluster.prefix}* "
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
