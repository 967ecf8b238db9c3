"""The cost-at-rest benchmark at toy size (20 services x 2 endpoints, both backends).

It checks the benchmark, not the performance: every figure of a record is measured, the
running agent puts a flushed service chain back, and the report and plot are written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from bench.quiet import Record, load, main, measure_size, prepare
from iptsync.kernel.netfilter import Backend

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def records(netns_available: None) -> list[Record]:
    return list(measure_size(20, 2, [Backend.NFT, Backend.LEGACY], repetitions=1, idle=3.0,
                             repairs=1))


def unmeasured(record: Record) -> list[str]:
    """The fields of ``record`` left empty or NaN."""
    out = []
    for item in dataclasses.fields(record):
        value = getattr(record, item.name)
        values = value if isinstance(value, list) else [value]
        if not values or any(isinstance(v, float) and math.isnan(v) for v in values):
            out.append(item.name)
    return out


def test_every_figure_is_measured(records: list[Record]) -> None:
    """Each backend's record has every figure, a repair included (a NaN repair: timed out)."""
    assert {"nft": [], "legacy": []} == {r.backend: unmeasured(r) for r in records}


def test_periodic_payload_rewrites_only_top_level_chains(tmp_path: Path) -> None:
    """kube-proxy's periodic batch declares the filter chains and nat's top-level chains,
    and none of a service's own."""
    payload = prepare(20, 2, tmp_path).periodic_payload.splitlines()
    declared = [line.split()[0][1:] for line in payload if line.startswith(":")]
    assert ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL", "KUBE-SERVICES", "KUBE-NODEPORTS",
            "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] == declared


def test_report_reads_the_records_back(tmp_path: Path, records: list[Record]) -> None:
    """Records written as JSON lines come back equal, and --report writes Markdown that
    embeds the plot and checks the targets of the size asked for."""
    results = tmp_path / "quiet.jsonl"
    results.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
    out, png = tmp_path / "quiet.md", tmp_path / "curve.png"
    main(["--report", str(results), "--out", str(out), "--png", str(png), "--at", "20"])
    text = out.read_text()
    assert (records, True, True, 2) == (load(results), png.stat().st_size > 0,
                                        "![How each cost grows](curve.png)" in text,
                                        text.count("flushed service chain repaired"))
