"""Child processes a test starts (an agent, the lab): never left running when the test fails."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import AnyStr


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[AnyStr]) -> Iterator[subprocess.Popen[AnyStr]]:
    """``proc`` for the body; killed and reaped on leaving if it still runs (a failed assert
    or timeout must not leave it behind)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
