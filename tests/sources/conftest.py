"""A recording sink and condition waits shared by the source tests.

Sources deliver from their own threads, so tests never sleep for an outcome: they wait on the
recorder (or poll a status field) with a deadline, and fail with what was seen instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from iptsync.core.model import object_key
from iptsync.sources.base import Change, Kind, Message, Snapshot

DEADLINE = 5.0  # seconds; every wait in these tests ends well before it when things work


class Recorder:
    """A sink that keeps every message and lets a test wait for the ones it expects."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    @property
    def messages(self) -> list[Message]:
        """A copy of everything received so far, oldest first."""
        with self._cond:
            return list(self._messages)

    def wait_for(self, predicate: Callable[[Recorder], bool]) -> None:
        """Block until ``predicate(self)`` holds; AssertionError with the messages if not."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), DEADLINE):
                raise AssertionError(f"condition not met; received {self._messages!r:.2000}")

    def snapshots(self, kind: Kind) -> list[Snapshot]:
        """The Snapshots of ``kind`` received so far."""
        return [m for m in self.messages if isinstance(m, Snapshot) and m.kind == kind]

    def changes(self, kind: Kind) -> list[Change]:
        """The Changes of ``kind`` received so far."""
        return [m for m in self.messages if isinstance(m, Change) and m.kind == kind]

    def latest(self, kind: Kind) -> Snapshot:
        """The last Snapshot of ``kind`` (it must exist)."""
        return self.snapshots(kind)[-1]

    def wait_for_snapshots(self, kind: Kind, count: int) -> Snapshot:
        """Wait for ``count`` Snapshots of ``kind``; returns the last."""
        self.wait_for(lambda r: len(r.snapshots(kind)) >= count)
        return self.latest(kind)


def names(snapshot: Snapshot) -> list[str]:
    """``metadata.name`` of each object of a Snapshot, in order."""
    return [object_key(obj)[1] for obj in snapshot.objects]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` every 10 ms until it holds; AssertionError naming ``what`` if not."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def recorder() -> Recorder:
    """A fresh recording sink."""
    return Recorder()
