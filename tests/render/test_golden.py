"""Golden tests: each scenario's rendered rules equal hand-checked iptables-restore text.

Rules within a chain are compared in order. Within the shared top-level chains kube-proxy's
order between services is not defined, so those are compared sorted, except that the NodePort
jump must stay the last rule of nat KUBE-SERVICES. Set IPTSYNC_REGEN_GOLDEN=1 to rewrite the
expected files after a deliberate change, then review the diff by hand. The ``upstream-*``
files are kube-proxy's expectations (docs/comparison.md) and are never rewritten: a difference
there is a bug in iptsync, or a deliberate and documented departure edited in by hand.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from iptsync.core import names
from iptsync.core.render import NODEPORTS_COMMENT
from iptsync.core.ruleset import split_args
from iptsync.engine.desired import desired_from_objects
from iptsync.sources.files import load_objects

from .golden import SCENARIO_NAMES, SCENARIOS, expected_warnings, scenario_settings

UNORDERED = {names.KUBE_SERVICES, names.KUBE_NODEPORTS, names.KUBE_EXTERNAL_SERVICES,
             names.KUBE_PROXY_FIREWALL}


def render_scenario(name: str) -> str:
    settings = scenario_settings(name)
    loaded = load_objects([SCENARIOS / f"{name}.yaml"])
    desired = desired_from_objects(loaded.objects, settings)
    assert expected_warnings(name) == [str(p) for p in loaded.problems + desired.problems]
    return desired.payload()


def layout(text: str) -> dict[str, Any]:
    """Tables -> declared chains, per-chain rule lines, and inserted jumps."""
    tables: dict[str, Any] = {}
    current: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], {"chains": set(), "rules": {}, "jumps": []})
        elif line.startswith(":"):
            current["chains"].add(line[1:].split()[0])
        elif line.startswith("-A "):
            chain = split_args(line)[1]
            current["rules"].setdefault(chain, []).append(line)
        elif line.startswith("-I "):
            current["jumps"].append(line)
    for table in tables.values():
        for chain, rules in table["rules"].items():
            if chain in UNORDERED:
                last = rules[-1] if NODEPORTS_COMMENT in rules[-1] else None
                table["rules"][chain] = (sorted(r for r in rules if r != last), last)
    return tables


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_rendered_rules_match_golden_file(name: str) -> None:
    """The renderer's output for the scenario equals the hand-checked expected rules."""
    actual = render_scenario(name)
    expected_file = SCENARIOS / f"{name}.rules"
    if os.environ.get("IPTSYNC_REGEN_GOLDEN") == "1" and not name.startswith("upstream-"):
        expected_file.write_text(actual)
    assert layout(expected_file.read_text()) == layout(actual)


def test_nodeport_jump_is_last_rule_of_nat_services() -> None:
    """kube-proxy's rule: the KUBE-NODEPORTS jump must be the last rule in KUBE-SERVICES."""
    text = render_scenario("upstream-overall")
    services = [line for line in text.splitlines() if line.startswith("-A KUBE-SERVICES ")
                and "addrtype --dst-type LOCAL -j KUBE-NODEPORTS" in line]
    nat = text.split("*nat", 1)[1]
    last = [line for line in nat.splitlines() if line.startswith("-A KUBE-SERVICES ")][-1]
    assert services == [last]
