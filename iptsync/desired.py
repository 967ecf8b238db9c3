"""From objects to the desired ruleset: parse, build the cluster state, render.

Shared by ``iptsync dump`` and ``iptsync run``, so both always agree on what the rules are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from iptsync.model import Problem, parse_all
from iptsync.options import with_node
from iptsync.policy import Settings
from iptsync.render import render
from iptsync.ruleset import Ruleset
from iptsync.state import ClusterState

log = logging.getLogger("iptsync")


@dataclass
class Desired:
    ruleset: Ruleset
    state: ClusterState
    settings: Settings
    problems: list[Problem]


def report(problems: Iterable[Problem]) -> None:
    """Log every rejected object or endpoint as a warning naming it and the field."""
    for problem in problems:
        log.warning("%s", problem)


def desired_from_objects(objects: Iterable[Any], settings: Settings,
                         interface_ips: Iterable[Any] = ()) -> Desired:
    accepted, problems = parse_all(objects)
    state = ClusterState.from_parsed(settings.node_name, accepted)
    settings = with_node(settings, state.node, tuple(interface_ips))
    return Desired(render(state, settings), state, settings, problems)
