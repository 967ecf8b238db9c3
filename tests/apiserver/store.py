"""The fake API server's storage: a small MVCC store with one global resourceVersion.

Like etcd behind kube-apiserver, every write bumps a single cluster-wide revision, and the
store keeps, per object, the versions written since the last compaction. That is what lets the
fake serve the read semantics the node agent depends on: a LIST at an exact resourceVersion
(``resourceVersionMatch=Exact``, or a continue token's snapshot) and a WATCH that replays the
events after a given resourceVersion. Reads older than what is retained fail with 410 Expired,
exactly like a compacted etcd or a watch cache whose window has moved on.

Two things bound the history: :meth:`Store.compact` (an explicit compaction revision) and
``max_events`` (the watch-cache window; when the oldest event falls out, resuming before it
is no longer possible). The *floor* is the oldest resourceVersion still served exactly.

Watches are :class:`Watcher` objects fed under the store's condition variable, so the order
of events on every stream is the order of the writes.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .selection import FieldSelector, LabelSelector

JsonObj = dict[str, Any]

INITIAL_EVENTS_END_ANNOTATION = "k8s.io/initial-events-end"


@dataclass(frozen=True)
class ResourceType:
    """One served resource: its kind, group/version, plural and scope."""

    kind: str
    group: str
    version: str
    plural: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...]
    selectable_fields: tuple[str, ...]

    @property
    def api_version(self) -> str:
        """``v1`` or ``group/version``."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        """The kind of a LIST response, e.g. ``ServiceList``."""
        return self.kind + "List"

    @property
    def qualified_resource(self) -> str:
        """``services`` or ``endpointslices.discovery.k8s.io``, as used in error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def fields(self, obj: JsonObj) -> dict[str, str]:
        """The field-selector values of ``obj`` (what ``ToSelectableFields`` returns)."""
        metadata = obj.get("metadata", {})
        spec = obj.get("spec") or {}
        values = {
            "metadata.name": metadata.get("name", ""),
            "metadata.namespace": metadata.get("namespace", ""),
            "spec.unschedulable": "true" if spec.get("unschedulable") else "false",
            "spec.clusterIP": str(spec.get("clusterIP", "")),
            "spec.type": str(spec.get("type", "")),
        }
        return {name: values[name] for name in self.selectable_fields}


SERVICES = ResourceType(
    kind="Service", group="", version="v1", plural="services", singular="service",
    namespaced=True, short_names=("svc",),
    selectable_fields=("metadata.name", "metadata.namespace", "spec.clusterIP", "spec.type"),
)
ENDPOINT_SLICES = ResourceType(
    kind="EndpointSlice", group="discovery.k8s.io", version="v1", plural="endpointslices",
    singular="endpointslice", namespaced=True, short_names=(),
    selectable_fields=("metadata.name", "metadata.namespace"),
)
NODES = ResourceType(
    kind="Node", group="", version="v1", plural="nodes", singular="node",
    namespaced=False, short_names=("no",),
    selectable_fields=("metadata.name", "spec.unschedulable"),
)
RESOURCE_TYPES: tuple[ResourceType, ...] = (SERVICES, ENDPOINT_SLICES, NODES)


def resource_type(kind: str) -> ResourceType:
    """Look a type up by kind (``Service``) or plural (``services``)."""
    for rtype in RESOURCE_TYPES:
        if kind in (rtype.kind, rtype.plural):
            return rtype
    raise ValueError(f"unknown kind {kind!r}; served: {[r.kind for r in RESOURCE_TYPES]}")


class ConflictError(Exception):
    """A test-side write the real server would refuse with 409 (exists / stale version)."""


Key = tuple[str, str, str]  # (kind, namespace or "", name)


def object_key(rtype: ResourceType, namespace: str | None, name: str) -> Key:
    """The store key; cluster-scoped objects have namespace ``""``."""
    return (rtype.kind, (namespace or "default") if rtype.namespaced else "", name)


def sort_key(key: Key) -> str:
    """The etcd-like ordering within a kind: ``namespace/name`` (or ``name``)."""
    return f"{key[1]}/{key[2]}" if key[1] else key[2]


@dataclass(frozen=True)
class Change:
    """One committed write: the event every watch of that kind is offered."""

    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    key: Key
    obj: JsonObj  # the state after the write; for DELETED the last state at the delete RV
    prev: JsonObj | None  # the state before (None for ADDED)


@dataclass(frozen=True)
class Filter:
    """What a LIST or WATCH selects: a type, optionally one namespace, and selectors."""

    rtype: ResourceType
    namespace: str | None = None
    labels: LabelSelector = field(default_factory=LabelSelector)
    fields: FieldSelector = field(default_factory=FieldSelector)

    def matches(self, obj: JsonObj) -> bool:
        """Whether ``obj`` (of this type) is selected."""
        metadata = obj.get("metadata", {})
        if self.namespace is not None and metadata.get("namespace") != self.namespace:
            return False
        return self.labels.matches(metadata.get("labels") or {}) and self.fields.matches(
            self.rtype.fields(obj))


def bookmark_event(rtype: ResourceType, rv: int, *, initial_events_end: bool = False) -> JsonObj:
    """A BOOKMARK event: the object carries only kind, apiVersion and the resourceVersion."""
    metadata: JsonObj = {"resourceVersion": str(rv)}
    if initial_events_end:
        metadata["annotations"] = {INITIAL_EVENTS_END_ANNOTATION: "true"}
    return {"type": "BOOKMARK",
            "object": {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": metadata}}


class Watcher:
    """One open watch stream's queue; all state is guarded by the store's condition."""

    def __init__(self, flt: Filter, *, start_rv: int, allow_bookmarks: bool) -> None:
        self.filter = flt
        self.start_rv = start_rv
        self.allow_bookmarks = allow_bookmarks
        self.queue: deque[JsonObj] = deque()
        # None while open; "close" ends the stream cleanly, "abort" drops the connection.
        self.ending: str | None = None

    def offer(self, change: Change) -> None:
        """Queue ``change`` as the event this watch sees, if any (selector transitions too)."""
        if change.key[0] != self.filter.rtype.kind or change.rv <= self.start_rv:
            return
        event_type = self._event_type(change)
        if event_type is None:
            return
        if event_type == "DELETED" and change.type == "MODIFIED":
            # Left the selection: the real server (cacher and etcd watcher alike) sends the
            # previous content, the one that matched, at the new resourceVersion.
            assert change.prev is not None
            obj = copy.deepcopy(change.prev)
            obj["metadata"]["resourceVersion"] = str(change.rv)
        else:
            obj = copy.deepcopy(change.obj)
        self.queue.append({"type": event_type, "object": obj})

    def _event_type(self, change: Change) -> str | None:
        now = self.filter.matches(change.obj)
        if change.type == "ADDED":
            return "ADDED" if now else None
        if change.type == "DELETED":
            return "DELETED" if now else None
        before = change.prev is not None and self.filter.matches(change.prev)
        if before and now:
            return "MODIFIED"
        if now:
            return "ADDED"  # started matching the selector
        if before:
            return "DELETED"  # stopped matching
        return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """Objects, their retained versions, the event window and the open watchers."""

    def __init__(self, *, max_events: int = 1000) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.cond = threading.Condition()
        self.max_events = max_events
        self._rv = 1
        self._floor = 1
        self._live: dict[Key, JsonObj] = {}
        self._versions: dict[Key, list[tuple[int, JsonObj | None]]] = {}
        self._history: deque[Change] = deque()
        self.watchers: set[Watcher] = set()

    # --- state (callers hold self.cond) -------------------------------------------------

    @property
    def rv(self) -> int:
        """The current global resourceVersion."""
        return self._rv

    @property
    def floor(self) -> int:
        """The oldest resourceVersion still served exactly (LIST Exact, WATCH resume)."""
        return self._floor

    # --- writes (test side) -------------------------------------------------------------

    def create(self, obj: JsonObj) -> JsonObj:
        """Add a new object (ADDED); ConflictError if it exists."""
        rtype, key, new = self._prepare(obj)
        with self.cond:
            if key in self._live:
                raise ConflictError(f'{rtype.qualified_resource} "{key[2]}" already exists')
            metadata = new["metadata"]
            metadata["uid"] = metadata.get("uid") or str(uuid.uuid4())
            metadata["creationTimestamp"] = metadata.get("creationTimestamp") or _now()
            return self._commit("ADDED", key, new, None)

    def update(self, obj: JsonObj) -> JsonObj:
        """Replace an existing object (MODIFIED), keeping uid and creationTimestamp.

        A ``metadata.resourceVersion`` in ``obj`` is a precondition, as on the real server.
        """
        rtype, key, new = self._prepare(obj)
        with self.cond:
            old = self._live.get(key)
            if old is None:
                raise KeyError(f'{rtype.qualified_resource} "{key[2]}" not found')
            wanted = (obj.get("metadata") or {}).get("resourceVersion")
            current = old["metadata"]["resourceVersion"]
            if wanted and wanted != current:
                raise ConflictError(
                    f'Operation cannot be fulfilled on {rtype.qualified_resource} "{key[2]}": '
                    "the object has been modified; please apply your changes to the latest "
                    f"version and try again (precondition {wanted}, current {current})"
                )
            new["metadata"]["uid"] = old["metadata"]["uid"]
            new["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            return self._commit("MODIFIED", key, new, old)

    def delete(self, kind: str, namespace: str | None, name: str) -> JsonObj:
        """Remove an object (DELETED, carrying the deletion's resourceVersion)."""
        rtype = resource_type(kind)
        key = object_key(rtype, namespace, name)
        with self.cond:
            old = self._live.get(key)
            if old is None:
                raise KeyError(f'{rtype.qualified_resource} "{name}" not found')
            return self._commit("DELETED", key, copy.deepcopy(old), old)

    def get(self, kind: str, namespace: str | None, name: str) -> JsonObj:
        """A copy of the current object; KeyError if absent."""
        rtype = resource_type(kind)
        with self.cond:
            obj = self._live.get(object_key(rtype, namespace, name))
            if obj is None:
                raise KeyError(f'{rtype.qualified_resource} "{name}" not found')
            return copy.deepcopy(obj)

    def _prepare(self, obj: JsonObj) -> tuple[ResourceType, Key, JsonObj]:
        new = copy.deepcopy(obj)
        rtype = resource_type(str(new.get("kind", "")))
        if new.get("apiVersion") != rtype.api_version:
            got = new.get("apiVersion")
            raise ValueError(f"{rtype.kind} needs apiVersion {rtype.api_version!r}, got {got!r}")
        metadata = new.setdefault("metadata", {})
        if not metadata.get("name"):
            raise ValueError(f"{rtype.kind} without metadata.name")
        if rtype.namespaced:
            metadata["namespace"] = metadata.get("namespace") or "default"
        else:
            metadata.pop("namespace", None)
        return rtype, object_key(rtype, metadata.get("namespace"), metadata["name"]), new

    def _commit(self, event_type: str, key: Key, new: JsonObj, old: JsonObj | None) -> JsonObj:
        self._rv += 1
        new["metadata"]["resourceVersion"] = str(self._rv)
        if event_type == "DELETED":
            self._live.pop(key)
            self._versions.setdefault(key, []).append((self._rv, None))
        else:
            self._live[key] = new
            self._versions.setdefault(key, []).append((self._rv, new))
        change = Change(self._rv, event_type, key, new, old)
        self._history.append(change)
        while len(self._history) > self.max_events:
            evicted = self._history.popleft()
            self._floor = max(self._floor, evicted.rv)
            self._prune(evicted.key)
        for watcher in self.watchers:
            watcher.offer(change)
        self.cond.notify_all()
        return copy.deepcopy(new)

    # --- compaction ---------------------------------------------------------------------

    def compact(self, rv: int | None = None) -> int:
        """Forget history before ``rv`` (default: now); returns the new floor."""
        with self.cond:
            target = self._rv if rv is None else rv
            if not 1 <= target <= self._rv:
                raise ValueError(f"compaction revision {target} outside [1, {self._rv}]")
            self._floor = max(self._floor, target)
            while self._history and self._history[0].rv <= self._floor:
                self._history.popleft()
            for key in list(self._versions):
                self._prune(key)
            return self._floor

    def _prune(self, key: Key) -> None:
        """Drop versions no snapshot at or after the floor can see."""
        versions = self._versions.get(key)
        if not versions:
            return
        keep_from = 0
        for index, (rv, _) in enumerate(versions):
            if rv <= self._floor:
                keep_from = index
        kept = versions[keep_from:]
        if kept and kept[0][0] <= self._floor and kept[0][1] is None:
            kept = kept[1:]  # deleted before the floor: invisible from every servable snapshot
        if kept:
            self._versions[key] = kept
        else:
            del self._versions[key]

    # --- reads (callers hold self.cond) -------------------------------------------------

    def snapshot(self, flt: Filter, rv: int) -> Iterator[tuple[str, JsonObj]]:
        """``(sort key, object)`` of every selected object as of ``rv``, in key order."""
        selected: list[tuple[str, JsonObj]] = []
        for key, versions in self._versions.items():
            if key[0] != flt.rtype.kind:
                continue
            state: JsonObj | None = None
            for version_rv, obj in versions:
                if version_rv > rv:
                    break
                state = obj
            if state is not None and flt.matches(state):
                selected.append((sort_key(key), state))
        selected.sort(key=lambda item: item[0])
        for skey, obj in selected:
            yield skey, copy.deepcopy(obj)

    def changes_since(self, rv: int) -> list[Change]:
        """Retained changes after ``rv`` (the caller checked ``rv >= floor``)."""
        return [change for change in self._history if change.rv > rv]

    def live_objects(self, kind: str) -> list[JsonObj]:
        """Copies of the current objects of a kind, in key order."""
        rtype = resource_type(kind)
        with self.cond:
            items = sorted((sort_key(k), o) for k, o in self._live.items() if k[0] == rtype.kind)
            return [copy.deepcopy(obj) for _, obj in items]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (holding the condition) until ``predicate`` holds or ``timeout`` elapses."""
        return self.cond.wait_for(predicate, timeout)
