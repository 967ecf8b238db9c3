"""Shared test configuration.

Tests that need root and network namespaces are marked ``netns``. They skip on a laptop, but
with ``IPTSYNC_REQUIRE_NETNS=1`` (set by .ci/run) a skip is turned into a failure.
"""

from __future__ import annotations

import os

import pytest

from iptsync.lab.netns import netns_unavailable_reason


def require_netns() -> None:
    """Skip (or, in CI, fail) when namespaces and iptables cannot be used here."""
    reason = netns_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("IPTSYNC_REQUIRE_NETNS") == "1":
        pytest.fail(f"netns tests required but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _netns_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("netns") is not None:
        require_netns()
