"""The golden scenarios' files, shared by the render and ruleset tests.

Each ``NAME.yaml`` holds a scenario's objects, ``NAME.rules`` its expected restore text, and
``NAME.warnings`` (when the scenario has objects that are not programmed) the exact warnings
its objects must produce, one a line.
"""

from __future__ import annotations

from pathlib import Path

SCENARIOS = Path(__file__).parent / "scenarios"
SCENARIO_NAMES = sorted(p.stem for p in SCENARIOS.glob("*.yaml"))


def expected_warnings(name: str) -> list[str]:
    """The warnings scenario ``name`` must produce (none without a .warnings file)."""
    path = SCENARIOS / f"{name}.warnings"
    return path.read_text().splitlines() if path.exists() else []
