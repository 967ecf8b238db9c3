"""Shared test configuration.

Tests that need root and network namespaces are marked ``netns``. They skip on a laptop, but
with ``IPTSYNC_REQUIRE_NETNS=1`` (set by .ci/run) a skip is turned into a failure.
"""

from __future__ import annotations

import pytest

from iptsync.lab.netns import netns_required, netns_unavailable_reason


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Namespaces and iptables usable here; otherwise skip, or fail when they are required."""
    reason = netns_unavailable_reason()
    if reason is None:
        return
    if netns_required():
        pytest.fail(f"IPTSYNC_REQUIRE_NETNS=1 but network namespaces are unusable: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _netns_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("netns") is not None:
        request.getfixturevalue("netns_available")
