"""Progress lines of long syncs: chains written so far of the total, every few seconds.

Both ways a full sync reaches the kernel: staged batches (nft's default) and one batch
streamed while rendering (legacy's). Conventions as in test_incremental (engine.world); the
interval is short so that a sync of a second or two logs several lines.
"""

from __future__ import annotations

import itertools
import logging
import re

import pytest

from engine.world import SETTINGS, World, assert_holds_full_sync, endpoint_slice, service
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter

pytestmark = pytest.mark.netns

INTERVAL = 0.1
SERVICES = 200  # x 2 ports x 10 endpoints: 4,400 chains, 12,000 rules


def big_cluster(engine: Engine) -> World:
    world = World()
    for index in range(SERVICES):
        world.apply(engine, service(index, "ClusterIP", False, 2))
        world.apply(engine, endpoint_slice(index, [(ip, True, False) for ip in range(10)]))
    return world


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "in progress" in r.getMessage()]


@pytest.mark.parametrize("stream_full", [False, True], ids=["staged", "streamed"])
def test_long_full_sync_logs_its_progress(netfilter: Netfilter, stream_full: bool,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A full sync longer than the interval logs at INFO how far it got, counts rising and
    lines at least an interval apart; the sync itself is unchanged."""
    caplog.set_level(logging.INFO, logger="iptsync")
    engine = Engine(netfilter, SETTINGS, stage_lines=500,
                    stream_full=stream_full, progress_interval=INTERVAL)
    world = big_cluster(engine)
    report = engine.sync()
    assert_holds_full_sync(list(world.objects.values()), netfilter)
    lines = progress_lines(caplog)
    assert len(lines) >= 2, f"sync took {report.phases['total']:.2f}s"
    assert {logging.INFO} == {r.levelno for r in lines}
    assert all(later.created - earlier.created >= INTERVAL * 0.9
               for earlier, later in itertools.pairwise(lines))
    if stream_full:
        pattern = (r"full sync in progress: (\d+) of (\d+) services sent to iptables-restore, "
                   r"(\d+) chains written \([\d.]+s so far\)")
        total = SERVICES
    else:
        pattern = r"sync in progress: (\d+) of (\d+) chains written \([\d.]+s so far\)"
        total = sum(len(t.written) for t in report.plan.tables)
    matches = [re.fullmatch(pattern, r.getMessage()) for r in lines]
    counts = [[int(n) for n in match.groups()] for match in matches if match]
    assert len(lines) == len(counts)
    done = [c[0] for c in counts]
    assert done == sorted(done)
    assert {total} == {c[1] for c in counts}
    assert 0 < done[-1] <= total


def test_quick_sync_logs_no_progress(netfilter: Netfilter,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """A sync shorter than the interval (the default, 5 s) logs no progress line."""
    caplog.set_level(logging.INFO, logger="iptsync")
    engine = Engine(netfilter, SETTINGS, stage_lines=500)
    big_cluster(engine)
    report = engine.sync()
    assert report.phases["total"] < 5
    assert [] == progress_lines(caplog)
