"""From objects to the desired ruleset, through the engine the agent runs.

``iptsync dump``, ``diff``, ``trace --objects``, ``explain`` and the lab feed the objects to an
:class:`iptsync.engine.reconciler.Engine` that has no kernel and ask it for its desired tables:
the same per-service render cache and the same assembly as ``iptsync run``, so what they show is
what a sync writes. """

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from iptsync.core.model import IPFamily, NodeInfo, Problem, parse_all
from iptsync.core.plan import NO_STAGING, DesiredTables, make_plan
from iptsync.core.policy import Settings
from iptsync.core.state import ClusterState
from iptsync.engine.families import FamilyEngines, offline_families
from iptsync.engine.reconciler import Engine

log = logging.getLogger("iptsync")


@dataclass
class Desired:
    tables: DesiredTables
    state: ClusterState
    settings: Settings  # with the node's addresses
    problems: list[Problem]

    def payload(self) -> str:
        """What a full sync writes onto a node that holds none of our rules (``dump``)."""
        return make_plan(self.tables, {}, NO_STAGING).payload


def report(problems: Iterable[Problem]) -> None:
    """Log every rejected object or endpoint as a warning naming it and the field."""
    for problem in problems:
        log.warning("%s", problem)


def desired_from_objects(objects: Iterable[Any], settings: Settings,
                         interface_ips: Iterable[Any] = ()) -> Desired:
    """Parse ``objects`` (every problem kept, in order) and render what a sync writes."""
    [desired] = desired_per_family(objects, settings, [settings.family], interface_ips)
    return desired


def desired_per_family(objects: Iterable[Any], settings: Settings,
                       families: Sequence[IPFamily] | None = None,
                       interface_ips: Iterable[Any] = ()) -> list[Desired]:
    """What a sync writes in each of ``families`` (each with the flags' values of its family:
    ``settings.for_family``), the objects parsed once, every problem kept in order in each.
    Without ``families``: those the node has, as far as the objects and the flags say
    (:func:`iptsync.engine.families.offline_families`)."""
    accepted, problems = parse_all(objects)
    values = [parsed.value for parsed in accepted if parsed.value is not None]
    if families is None:
        node = next((v for v in values if isinstance(v, NodeInfo)
                     and v.name == settings.node_name), None)
        choice = offline_families(settings, node)
        for family, why in choice.left_out.items():
            log.info("%s rules not shown: %s", family.value, why)
        families = choice.families
    ips = tuple(interface_ips)
    engines = FamilyEngines(Engine(None, settings.for_family(family), interface_ips=ips)
                            for family in families)
    for value in values:
        engines.add(value)
    return [Desired(engine.desired(), engine.state, engine.settings, problems)
            for engine in engines.engines.values()]
