"""Shared test configuration.

Tests that need root and network namespaces are marked ``netns``. They skip on a laptop, but
with ``IPTSYNC_REQUIRE_NETNS=1`` (set by .ci/run) a skip is turned into a failure. The
``netns`` and ``netfilter`` fixtures give a test a fresh, empty namespace of its own; the
``kernel`` fixture runs one test body against the fake kernel (no root) and against the real
one on both backends (marked ``netns``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from apiserver import FakeApiServer
from lockholder import HoldLock, holding

from iptsync.core.model import IPFamily
from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.port import Backend
from iptsync.lab.netns import netns_required, netns_unavailable_reason, temporary_netns
from iptsync.testing import FakeNetfilter

_counter = itertools.count()

# `iptsync run` keeps its renderings for the next start (iptsync.engine.rendercache): the
# tests' runs keep them in a directory of this session's, not in the node's /run/iptsync.
if "IPTSYNC_RENDER_CACHE_DIR" not in os.environ:
    os.environ["IPTSYNC_RENDER_CACHE_DIR"] = tempfile.mkdtemp(prefix="iptsync-test-renderings-")
    atexit.register(shutil.rmtree, os.environ["IPTSYNC_RENDER_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Namespaces and iptables usable here; otherwise skip, or fail when they are required."""
    reason = netns_unavailable_reason()
    if reason is None:
        return
    if netns_required():
        pytest.fail(f"IPTSYNC_REQUIRE_NETNS=1 but network namespaces are unusable: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes a namespace or a real kernel needs root: it is a ``netns`` test
    whether or not its module says so, so ``-m "not netns"`` leaves it out."""
    for item in items:
        if {"netns", "netfilter"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _netns_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("netns") is not None:
        request.getfixturevalue("netns_available")


@pytest.fixture(autouse=True)
def _logging_levels() -> Iterator[None]:
    """Put back the levels a command run in-process sets (``setup_logging`` raises or lowers
    the ``iptsync`` logger): otherwise a later test's caplog misses INFO lines."""
    ours, root = logging.getLogger("iptsync"), logging.getLogger()
    saved = ours.level, root.level
    yield
    ours.setLevel(saved[0])
    root.setLevel(saved[1])


@pytest.fixture
def netns() -> Iterator[str]:
    """A new network namespace with loopback up, deleted afterwards (also on failure)."""
    with temporary_netns(f"iptsync-t{os.getpid()}-{next(_counter)}") as name:
        yield name


@pytest.fixture(params=[Backend.NFT, Backend.LEGACY], ids=["nft", "legacy"])
def netfilter(request: pytest.FixtureRequest, netns: str) -> Netfilter:
    """Both kernel backends, each in its own fresh namespace."""
    return Netfilter(request.param, netns=netns)


@pytest.fixture(params=[Backend.NFT, Backend.LEGACY], ids=["nft", "legacy"])
def netfilter6(request: pytest.FixtureRequest, netns: str) -> Netfilter:
    """Both kernel backends' ip6tables (``ip6tables-nft-*``, ``ip6tables-legacy-*``), each in
    a fresh namespace of its own."""
    return Netfilter(request.param, netns=netns, family=IPFamily.IPV6)


@pytest.fixture(params=[
    pytest.param(None, id="fake"),
    pytest.param(Backend.NFT, id="nft", marks=pytest.mark.netns),
    pytest.param(Backend.LEGACY, id="legacy", marks=pytest.mark.netns),
])
def kernel(request: pytest.FixtureRequest) -> FakeNetfilter | Netfilter:
    """The in-memory fake (iptsync.testing), then the real kernel on both backends, each in a
    fresh namespace of its own: one test body, three kernels."""
    if request.param is None:
        return FakeNetfilter()
    return Netfilter(request.param, netns=request.getfixturevalue("netns"))


@pytest.fixture(params=[
    pytest.param(None, id="fake"),
    pytest.param(Backend.NFT, id="nft", marks=pytest.mark.netns),
    pytest.param(Backend.LEGACY, id="legacy", marks=pytest.mark.netns),
])
def kernel6(request: pytest.FixtureRequest) -> FakeNetfilter | Netfilter:
    """:func:`kernel` for IPv6: the fake as ip6tables, then ip6tables on both backends."""
    if request.param is None:
        return FakeNetfilter(family=IPFamily.IPV6)
    return Netfilter(request.param, netns=request.getfixturevalue("netns"),
                     family=IPFamily.IPV6)


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    """A running fake API server without periodic bookmarks, stopped afterwards; a 500 from
    the fake itself (a bug in the test infrastructure, not the client) fails the test."""
    with FakeApiServer(bookmark_interval=None) as server:
        yield server
    assert [] == server.handler_errors



@pytest.fixture
def xtables_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HoldLock:
    """A private xtables lock (``XTABLES_LOCKFILE``: the host's is untouched) and a way to
    hold it for some seconds while the body of a ``with`` runs."""
    lock = tmp_path / "xtables.lock"
    lock.touch()
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lock))
    return lambda seconds: holding(lock, seconds)
