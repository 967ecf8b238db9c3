"""What every source (the Kubernetes API, ``--objects`` files) hands to the agent.

A source runs in its own thread and calls ``sink`` with messages. It never parses objects into
the model: messages carry plain manifest dicts (what the API's JSON decodes to) so the agent
parses everything one way. Two kinds of message:

- :class:`Snapshot`: the complete current set of one kind (after a list, a relist on 410 Gone,
  or a reload of the files). The agent replaces everything it held of that kind, so objects
  deleted while a watch was down disappear. The first snapshot of every kind the agent waits
  for marks that source as synced; no rule is touched before that.
- :class:`Change`: one watch event (ADDED and MODIFIED are ``upsert``, DELETED is ``delete``).

``Source.start`` must return at once; ``Source.stop`` must make the thread end promptly
(within a second or two) and join it. A source retries on its own when its backend is
unreachable and reports its health through :attr:`Source.status`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Kind = Literal["Service", "EndpointSlice", "Node"]
KINDS: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node")

Manifest = Mapping[str, Any]


@dataclass(frozen=True)
class Snapshot:
    """The complete set of objects of ``kind`` as of ``resource_version``."""

    kind: Kind
    objects: tuple[Manifest, ...]
    resource_version: str = ""


@dataclass(frozen=True)
class Change:
    """One object added, modified or deleted (for ``delete``, the last state known)."""

    kind: Kind
    action: Literal["upsert", "delete"]
    obj: Manifest
    resource_version: str = ""


Message = Snapshot | Change
Sink = Callable[[Message], None]


@dataclass
class SourceStatus:
    """What a source tells the health endpoint and the logs."""

    connected: bool = False
    last_error: str | None = None
    relists: int = 0  # lists after the first (410 Gone, reconnects)
    events: dict[str, int] = field(default_factory=dict)  # per kind
    # Times an input (an --objects file or path) was found unusable: unreadable, unparsable or
    # empty. Cumulative; the agent publishes it as iptsync_objects_file_errors_total.
    read_errors: int = 0
    # Per kind, when (time.monotonic()) the backend last said something: a response, an
    # event, a bookmark. Sources that do not watch leave it empty.
    last_heard: dict[str, float] = field(default_factory=dict)

    def silence(self, now: float) -> dict[str, float]:
        """Seconds since the backend last said something, per kind (``now``: monotonic)."""
        heard = list(self.last_heard.items())  # one atomic copy: sources write from threads
        return {kind: max(0.0, now - at) for kind, at in heard}


class Source(Protocol):
    status: SourceStatus

    def start(self, sink: Sink) -> None: ...

    def stop(self) -> None: ...

