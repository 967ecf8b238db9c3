"""The documentation shows what the code does today."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dump_examples_page_is_current() -> None:
    """docs/dump-examples.md equals a fresh `iptsync dump` of every example directory."""
    os.chdir(ROOT)
    module = runpy.run_path(str(ROOT / "scripts" / "gen_dump_examples.py"))
    assert (ROOT / "docs" / "dump-examples.md").read_text() == module["render_page"]()


def test_rules_page_ipv6_example_is_current() -> None:
    """Every rule docs/rules.md shows for the IPv6 half of prod/web is in that scenario's
    golden IPv6 rules (which tests/render checks against the renderer)."""
    page = (ROOT / "docs" / "rules.md").read_text().split("## IPv6 and dual-stack", 1)[1]
    shown = [line for line in page.splitlines() if line.startswith("-A ")]
    golden = (ROOT / "tests" / "render" / "scenarios"
              / "dualstack-clusterip-affinity.v6.rules").read_text().splitlines()
    assert 6 == len(shown)
    assert [] == [line for line in shown if line not in golden]
