"""Fixtures for the network-namespace lab tests.

These tests need root and working ``ip netns``; elsewhere they skip, unless
``IPTSYNC_REQUIRE_NETNS=1`` says the run must exercise them, in which case they fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iptsync.lab.topology import Cluster, ClusterSpec, PodSpec, cleanup_stale


@pytest.fixture(scope="session")
def netns_ok(netns_available: None) -> None:
    """Namespaces usable; namespaces left by killed earlier runs are removed once."""
    cleanup_stale()


@pytest.fixture(scope="module")
def cluster(netns_ok: None) -> Iterator[Cluster]:
    """A two-node cluster with pod ``server1`` on node2 and pod ``client1`` on node1."""
    spec = ClusterSpec(pods=(PodSpec("server1", "node2"), PodSpec("client1", "node1")))
    with Cluster(spec) as built:
        yield built
