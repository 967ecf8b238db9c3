"""The conntrack cleanup benchmark at toy size (500 unrelated flows, 3 UDP services).

It checks the benchmark, not the performance: both families are measured, the partial cleanup
deletes the changed service's stale flows and the full one everybody's, the table keeps every
other flow (``measure`` asserts it), and the table names each figure.
"""

from __future__ import annotations

import pytest

from bench.conntrack import STALE_PER_SERVICE, measure, table
from iptsync.core.model import IPFamily

pytestmark = pytest.mark.netns


@pytest.mark.usefixtures("netns_available")
@pytest.mark.parametrize("family", list(IPFamily), ids=lambda f: f.value)
def test_the_benchmark_deletes_the_stale_flows_it_plants(family: IPFamily) -> None:
    """One changed service's stale flows go in a partial cleanup, every service's in a full
    one; the old full dump is timed over its sample; the table reports it all."""
    result = measure(family, 500, 3, 1, 100)
    assert (STALE_PER_SERVICE, 2 * STALE_PER_SERVICE, 100) == (
        result.partial_deleted, result.full_deleted, result.before_sampled)
    assert 0 < result.partial <= result.before
    assert f"| {family.value} | 500 | 3 |" in table([result], "note")
