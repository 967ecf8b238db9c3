"""The kernel port: what the engine and the agent need from the node, and nothing more.

The engine reads the tables it owns, restores batches (or one batch streamed while it is still
being rendered), reads one chain to undo a partial sync, and clears stale conntrack entries;
the agent checks that its canary chain exists. These protocols name exactly that, so the sync
logic runs against the real adapters (:class:`iptsync.kernel.netfilter.Netfilter`,
:func:`iptsync.kernel.conntrack.clear_stale_flows`) or against the stateful fakes in
:mod:`iptsync.testing`, without root. The errors and the backend names are part of the
contract: every implementation raises :class:`RestoreError` for a rejected batch, naming the
failing line as iptables-restore does. Pure: no I/O.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Protocol, Self

from iptsync.core.flows import FlowTargets
from iptsync.core.ruleset import SavedTable

OWNED_TABLES = ("filter", "nat")  # the tables iptsync writes to and reads back


class Backend(enum.Enum):
    """The two kernel backends of iptables; they do not see each other's rules."""

    NFT = "nft"
    LEGACY = "legacy"


class NetfilterError(RuntimeError):
    """An iptables command failed."""


class RestoreError(NetfilterError):
    """iptables-restore rejected a payload; ``line`` is the failing line when known, and
    ``context`` the payload lines around it (:func:`excerpt`)."""

    def __init__(self, message: str, line: int | None, context: str) -> None:
        super().__init__(message)
        self.line = line
        self.context = context


class RuleStream(Protocol):
    """One iptables-restore run fed while its payload is produced (a context manager: leaving
    it normally closes the run, leaving it by an exception aborts it)."""

    def write(self, lines: Sequence[str]) -> None:
        """Send more payload lines."""

    def close(self) -> None:
        """Finish the run; raises :class:`RestoreError` when the payload was rejected."""

    def __enter__(self) -> RuleStream: ...

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None, /) -> None: ...


class RuleStreamBase(abc.ABC):
    """What every :class:`RuleStream` implementation shares: leaving its ``with`` block
    normally closes the run, leaving it by an exception aborts it (nothing more commits)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finish the run; raises :class:`RestoreError` when the payload was rejected."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop without committing the table in progress."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class NetfilterPort(Protocol):
    """One backend's iptables in one network namespace, as the engine and the agent use it.

    Each ``*table ... COMMIT`` block of a restore commits atomically, one table after the
    other: when a later table is rejected, the earlier ones stay committed.
    """

    @property
    def backend(self) -> Backend:
        """Which backend this is (the engine picks its batch strategy by it)."""

    def save(self, tables: Iterable[str] = OWNED_TABLES) -> dict[str, SavedTable]:
        """The live state of ``tables``;
        rules as iptables-save prints them; a missing table comes back empty."""

    def restore(self, payload: str | Sequence[str], *, noflush: bool = True) -> None:
        """Apply one batch; raises :class:`RestoreError` when it is rejected."""

    def restore_stream(self, *, noflush: bool = True) -> RuleStream:
        """A batch to write while it is still being produced."""

    def chain_exists(self, table: str, chain: str) -> bool:
        """Whether ``chain`` exists in ``table`` (the agent's canary check)."""

    def run(self, *args: str) -> str:
        """One plain ``iptables`` command (the engine only lists a chain: ``-t T -S C``);
        raises :class:`NetfilterError` when it fails."""


class FlowCleaner(Protocol):
    """Deletes the conntrack entries of ``targets``' IP family to its destinations that no
    longer reach one of their serving endpoints; returns how many it deleted."""

    def __call__(self, targets: FlowTargets, /) -> int: ...


def excerpt(payload: str | Sequence[str], line: int | None, radius: int = 3) -> str:
    """The lines around ``line`` (1-based) of a payload, numbered, the failing one marked."""
    if line is None:
        return ""
    lines = payload.splitlines() if isinstance(payload, str) else payload
    start, end = max(1, line - radius), min(len(lines), line + radius)
    return "\n".join(f"{'>' if n == line else ' '}{n:6d}  {lines[n - 1]}"
                     for n in range(start, end + 1))
