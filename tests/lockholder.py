"""Holding the xtables lock from a test, to see what waits for it and what gives up."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HoldLock = Callable[[float], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def holding(lock: Path, seconds: float) -> Iterator[None]:
    """``lock`` held by another process (flock) for ``seconds``, from just before the body."""
    holder = subprocess.Popen(["flock", "-x", str(lock), "sleep", str(seconds)])
    try:
        time.sleep(0.2)  # let flock take it
        yield
    finally:
        holder.wait(timeout=10)
