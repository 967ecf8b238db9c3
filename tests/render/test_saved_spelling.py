"""The rules the renderer spells as iptables-save prints them are spelled exactly as
:func:`iptsync.core.ruleset.canonical` spells them.

A restart compares the rendered chains with the kernel's through these spellings instead of
canonicalising every rule; one wrong spelling would make every full sync rewrite that chain
and report drift. Checked rule by rule on every golden scenario, in each of its families,
with and without kube-proxy's large-cluster mode (which drops the endpoint comments).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iptsync.core.model import IPFamily
from iptsync.core.render import PortRules, render_service_port
from iptsync.core.ruleset import canonical, join_args
from iptsync.engine.reconciler import Engine
from iptsync.sources.files import load_objects

from .golden import FAMILY_SCENARIOS, SCENARIOS, scenario_settings


def port_renderings(name: str, family: IPFamily, large_cluster: bool) -> Iterator[PortRules]:
    """What the renderer makes of each service port of a golden scenario (spelled)."""
    engine = Engine(None, scenario_settings(name, family))
    for obj in load_objects([SCENARIOS / f"{name}.yaml"]).objects:
        engine.upsert(obj)
    for service in engine.state.services.values():
        for port in service.ports:
            yield render_service_port(port, engine.state.endpoints(port), engine.settings,
                                      engine.state.node_zone, large_cluster=large_cluster)


def spellings(name: str, family: IPFamily, large_cluster: bool) -> list[tuple[str, str, str]]:
    """(chain, the renderer's spelling, canonical()) of each rule the renderer spelled."""
    found = []
    for rules in port_renderings(name, family, large_cluster):
        assert rules.chains.keys() == rules.saved.keys()
        for chain, chain_rules in rules.chains.items():
            assert len(chain_rules) == len(rules.saved[chain])
            found += [(chain, saved, canonical(rule.args, family))
                      for rule, saved in zip(chain_rules, rules.saved[chain], strict=True)
                      if saved is not None]
    return found


@pytest.mark.parametrize("large_cluster", [False, True], ids=["comments", "large-cluster"])
@pytest.mark.parametrize(("name", "family"), FAMILY_SCENARIOS,
                         ids=[f"{n}-{f.value}" for n, f in FAMILY_SCENARIOS])
def test_the_renderers_spelling_is_the_canonical_one(name: str, family: IPFamily,
                                                     large_cluster: bool) -> None:
    """Every rule spelled by the renderer equals its canonical spelling."""
    found = spellings(name, family, large_cluster)
    assert [(chain, canonical_text) for chain, _saved, canonical_text in found] == [
        (chain, saved) for chain, saved, _canonical in found]


def test_the_renderer_spells_the_endpoint_and_service_chains() -> None:
    """The spellings cover what dominates a large ruleset: both rules of each endpoint
    chain and each jump of a service chain, with and without session affinity, in both
    families (else a restart would canonicalise them again, and this test passes on
    nothing)."""
    spelled = {(name, family): {chain.split("-")[1] for chain, _s, _c in
                                spellings(name, family, False)}
               for name, family in FAMILY_SCENARIOS}
    for family in IPFamily:
        kinds = set().union(*(found for (_name, f), found in spelled.items() if f is family))
        assert {"SEP", "SVC"} <= kinds, family
        assert {"SEP", "SVC"} <= spelled[("dualstack-clusterip-affinity", family)]


@pytest.mark.parametrize("large_cluster", [False, True], ids=["comments", "large-cluster"])
@pytest.mark.parametrize(("name", "family"), FAMILY_SCENARIOS,
                         ids=[f"{n}-{f.value}" for n, f in FAMILY_SCENARIOS])
def test_the_lines_the_renderer_writes_out_are_its_rules_joined(
        name: str, family: IPFamily, large_cluster: bool) -> None:
    """Each restore line the renderer writes out itself (PortRules.lines) is the line of its
    rule's arguments, joined and quoted as join_args does; and it writes most of them."""
    written = endpoint_chains = 0
    for rules in port_renderings(name, family, large_cluster):
        assert rules.chains.keys() == rules.lines.keys()
        for chain, chain_rules in rules.chains.items():
            endpoint_chains += chain.startswith("KUBE-SEP-")
            lines = rules.lines[chain]
            assert len(chain_rules) == len(lines)
            for rule, line in zip(chain_rules, lines, strict=True):
                if line is not None:
                    written += 1
                    assert f"-A {chain} {join_args(rule.args)}" == line
    assert written >= 2 * endpoint_chains
