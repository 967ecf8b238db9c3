"""The scale benchmark at toy size (20 services x 2 endpoints, one sample, both backends).

It checks the benchmark, not the performance: every row of the table is measured, and the
kube-proxy-style restores and iptsync's partial syncs apply the same change, leaving exactly
the rules a fresh full render gives (``verify`` compares the kernel after every step).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.scale import (
    ROWS,
    BackendResult,
    DumpResult,
    Workload,
    document,
    measure_backend,
    measure_dump,
    plot,
    service_chains,
    table,
)
from iptsync.engine.desired import desired_from_objects
from iptsync.kernel.netfilter import Backend

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    return Workload.build(20, 2, tmp_path_factory.mktemp("bench"), verify=True)


@pytest.fixture(scope="module")
def dump(workload: Workload) -> DumpResult:
    return measure_dump(workload.path, 1)


@pytest.fixture(scope="module")
def results(netns_available: None, workload: Workload) -> list[BackendResult]:
    return [measure_backend(backend, workload, repetitions=1, verify=True)
            for backend in (Backend.NFT, Backend.LEGACY)]


def test_table_has_every_row(workload: Workload, dump: DumpResult,
                             results: list[BackendResult]) -> None:
    """The printed table has one row per measurement, in order, for both backends."""
    lines = table(workload, dump, results).splitlines()
    assert ["Measurement", "Target", "nft", "legacy"] == [
        cell.strip() for cell in lines[0].strip("|").split("|")]
    assert list(ROWS) == [line.strip("|").split("|")[0].strip() for line in lines[2:]]


def test_both_sides_leave_what_a_full_render_writes(results: list[BackendResult]) -> None:
    """After each kube-proxy-style restore and each partial sync (and their undoing), the
    kernel holds exactly a fresh full render of that state."""
    assert {"nft": [], "legacy": []} == {r.backend: r.mismatches for r in results}


def test_partial_syncs_stay_partial_and_resync_finds_nothing(
        results: list[BackendResult]) -> None:
    """iptsync's changes are partial syncs, and the final full resync has nothing to repair."""
    assert {"nft": (True, True), "legacy": (True, True)} == {
        r.backend: (all(c.all_partial for c in r.changes), r.resync_clean) for r in results}


def test_kube_proxy_batch_for_a_removed_service_deletes_its_chains(workload: Workload) -> None:
    """kube-proxy's batch for change (c) flushes and deletes exactly the service's chains."""
    base = desired_from_objects(workload.objects, workload.settings)
    [removal] = [c for c in workload.changes if c.key == "c"]
    payload = workload.kube_proxy_forward["c"].splitlines()
    assert sorted(service_chains(base, removal.service)) == sorted(
        line.split()[1] for line in payload if line.startswith("-X "))


def test_kube_proxy_batch_rewrites_the_top_level_chains(workload: Workload) -> None:
    """kube-proxy's batch for one endpoint declares every top-level chain it rewrites."""
    payload = workload.kube_proxy_forward["a"].splitlines()
    declared = [line.split()[0][1:] for line in payload if line.startswith(":KUBE-")
                and not line.startswith((":KUBE-SVC-", ":KUBE-SEP-"))]
    assert ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL", "KUBE-SERVICES", "KUBE-NODEPORTS",
            "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] == declared


def test_report_embeds_the_plot(tmp_path: Path, workload: Workload, dump: DumpResult,
                                results: list[BackendResult]) -> None:
    """The Markdown report carries the results table and embeds the PNG written next to it."""
    import datetime  # noqa: PLC0415

    png = tmp_path / "performance.png"
    plot(results, png, "smoke")
    text = document(workload, dump, results, info={"kernel": "test"},
                    started=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
                    repetitions=1, full_repetitions=1, png=png.name, command="smoke")
    assert (True, True, True) == (png.stat().st_size > 0, "![" in text and png.name in text,
                                  table(workload, dump, results) in text)
