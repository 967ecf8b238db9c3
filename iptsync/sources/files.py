"""Read Kubernetes manifests from files and directories (``--objects``).

Accepts what people have on disk or what ``kubectl get -o yaml|json`` prints: single objects,
multi-document YAML, JSON, and ``kind: List`` wrappers. A file that cannot be read or parsed is
reported as a problem and skipped; the other files still load.

:class:`FilesSource` serves the agent without ``--once``: it polls the files instead of using
inotify, because polling sees every way a file changes (edited in place, replaced by rename, a
ConfigMap volume's symlink swap, a file appearing in or leaving a directory) at the cost of a
few ``stat`` calls per interval.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from iptsync.model import Problem
from iptsync.sources.base import KINDS, Sink, Snapshot, SourceStatus

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class LoadedObjects:
    objects: list[dict[str, Any]]
    problems: list[Problem]
    files: list[Path]


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, plus every manifest file under the directories named, sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix in MANIFEST_SUFFIXES))
        else:
            files.append(path)
    return files


def load_objects(paths: Iterable[str | Path]) -> LoadedObjects:
    """Load every object from the given files and directories."""
    objects: list[dict[str, Any]] = []
    problems: list[Problem] = []
    files = manifest_files(paths)
    for path in files:
        try:
            documents = list(_documents(path))
        except (OSError, ValueError, yaml.YAMLError) as err:
            problems.append(Problem("file", str(path), "", f"cannot read manifests: {err}"))
            continue
        for document in documents:
            objects.extend(_flatten(document))
    return LoadedObjects(objects, problems, files)


def _documents(path: Path) -> Iterator[Any]:
    text = path.read_text()
    if path.suffix == ".json":
        yield json.loads(text)
    else:
        yield from yaml.safe_load_all(text)


def _flatten(document: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(document, dict):
        return
    kind = str(document.get("kind", ""))
    if kind.endswith("List") and isinstance(document.get("items"), list):
        # API list responses (ServiceList...) leave kind out of their items.
        item_kind = kind[: -len("List")]
        for item in document["items"]:
            missing_kind = isinstance(item, dict) and item_kind and "kind" not in item
            yield from _flatten({"kind": item_kind, **item} if missing_kind else item)
    else:
        yield document


# What identifies one version of a file: (mtime_ns, ctime_ns, size, inode); None if unreadable.
_FileStamp = tuple[int, int, int, int] | None


class FilesSource:
    """Manifests from ``paths``, sent again as Snapshots of every kind whenever they change.

    Every ``poll_interval`` seconds the files (and the listings of the directories named) are
    compared with what was loaded; on any difference that has stayed for one interval,
    everything is reloaded. Files that cannot be read or parsed are logged as warnings and
    skipped, the others are still sent.
    """

    def __init__(self, paths: Iterable[str | Path], poll_interval: float = 1.0) -> None:
        self.status = SourceStatus()
        self._paths = tuple(Path(p) for p in paths)
        self._poll_interval = poll_interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, sink: Sink) -> None:
        """Load and send the first Snapshots in a thread, then keep polling; returns at once."""
        self._thread = threading.Thread(target=self._run, args=(sink,), daemon=True,
                                        name="iptsync-files")
        self._thread.start()

    def stop(self) -> None:
        """End the polling thread and join it."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, sink: Sink) -> None:
        # Stamps are taken before loading, so a change made during a load shows on a later poll.
        loaded = _stamps(self._paths)
        self._load_and_send(sink)
        previous = loaded
        while not self._stopping.wait(self._poll_interval):
            stamps = _stamps(self._paths)
            # Reload only once the files have stopped changing for a whole interval: a file
            # being rewritten (truncated, then written) would otherwise be loaded half-written
            # and its services dropped until the next poll.
            if stamps != loaded and stamps == previous:
                self.status.relists += 1
                self._load_and_send(sink)
                loaded = stamps
            previous = stamps

    def _load_and_send(self, sink: Sink) -> None:
        result = load_objects(self._paths)
        for problem in result.problems:
            logger.warning("%s: %s", problem.ref, problem.message)
        self.status.connected = True
        self.status.last_error = "; ".join(f"{p.ref}: {p.message}" for p in result.problems) \
            or None
        for kind in KINDS:
            objects = tuple(obj for obj in result.objects if obj.get("kind") == kind)
            sink(Snapshot(kind, objects))


def _stamps(paths: Iterable[Path]) -> dict[Path, _FileStamp]:
    return {path: _stamp(path) for path in manifest_files(paths)}


def _stamp(path: Path) -> _FileStamp:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)
