"""From objects to the desired ruleset, through the engine the agent runs.

``iptsync dump``, ``diff``, ``trace --objects``, ``explain`` and the lab feed the objects to an
:class:`iptsync.engine.reconciler.Engine` that has no kernel and ask it for its desired tables:
the same per-service render cache and the same assembly as ``iptsync run``, so what they show is
what a sync writes. """

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from iptsync.core.model import Problem, parse_all
from iptsync.core.plan import NO_STAGING, DesiredTables, make_plan
from iptsync.core.policy import Settings
from iptsync.core.state import ClusterState
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
    accepted, problems = parse_all(objects)
    engine = Engine(None, settings, interface_ips=interface_ips)
    for parsed in accepted:
        assert parsed.value is not None  # parse_all keeps only accepted objects
        engine.add(parsed.value)
    return Desired(engine.desired(), engine.state, engine.settings, problems)
