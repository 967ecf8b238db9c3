"""Fixtures for tests against real netfilter: a fresh, empty network namespace per test."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator

import pytest

from iptsync.netfilter import Backend, Netfilter

_counter = itertools.count()


@pytest.fixture
def netns() -> Iterator[str]:
    """A new network namespace with loopback up, deleted afterwards (also on failure)."""
    name = f"iptsync-t{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(params=[Backend.NFT, Backend.LEGACY], ids=["nft", "legacy"])
def netfilter(request: pytest.FixtureRequest, netns: str) -> Netfilter:
    """Both kernel backends, each in its own fresh namespace."""
    return Netfilter(request.param, netns=netns)
