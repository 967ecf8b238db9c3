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
