"""The lab's namespace primitives that run in-process: moving one thread into a namespace."""

from __future__ import annotations

import os
import threading

import pytest

from iptsync.lab.netns import thread_in_netns

pytestmark = pytest.mark.netns


def current_netns() -> str:
    """The network namespace of the calling thread (``net:[inode]``)."""
    return os.readlink("/proc/thread-self/ns/net")


def test_thread_in_netns_moves_only_the_caller_and_threads_it_starts(netns: str) -> None:
    """Inside the block the caller and a thread it starts are in the namespace (and that
    thread stays there); the caller is back home afterwards, other threads never moved."""
    home = current_netns()
    seen: dict[str, str] = {}
    release = threading.Event()

    def record(name: str) -> None:
        seen[name] = current_netns()
        release.wait(5)
        seen[f"{name} later"] = current_netns()

    bystander = threading.Thread(target=record, args=("bystander",))
    bystander.start()
    with thread_in_netns(netns):
        inside = current_netns()
        started = threading.Thread(target=record, args=("started",))
        started.start()
    back = current_netns()
    release.set()
    started.join(5)
    bystander.join(5)
    assert (True, home) == (inside != home, back)
    assert {"bystander": home, "bystander later": home, "started": inside,
            "started later": inside} == seen
