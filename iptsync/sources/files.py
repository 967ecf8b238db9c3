"""Read Kubernetes manifests from files and directories (``--objects``).

Accepts what people have on disk or what ``kubectl get -o yaml|json`` prints: single objects,
multi-document YAML, JSON, and ``kind: List`` wrappers. Directories are read recursively: their
``.yaml``, ``.yml`` and ``.json`` files in path order, hidden entries (``.name``, such as a
ConfigMap volume's ``..data``) left out, other files named in one warning.

Input that cannot be used is never taken to mean "no objects": a file or directory that cannot
be read, a file that does not parse, and a path given that yields no Kubernetes object are
*errors* (:attr:`LoadedObjects.errors`), which the one-shot commands refuse and which
:class:`FilesSource` answers by keeping what that file or path last yielded. The same object
(kind, namespace, name) defined twice is reported with both places; the last one wins.
Services and EndpointSlices that kube-proxy's label selector leaves out (meant for another
proxy, or a headless Service's slices) are left out here too, each such Service named in one
INFO line.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iptsync.core.model import (
    PROXY_LABEL_SELECTOR,
    Problem,
    object_key,
    object_ref,
    other_proxy_label,
)
from iptsync.sources.base import KINDS, Sink, Snapshot, SourceStatus

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
SUFFIXES_TEXT = ".yaml, .yml or .json"

# One object read from a file: the manifest, the line its YAML document starts on (None in
# JSON) and its index among a List's items (None outside a List).
Located = tuple[dict[str, Any], int | None, int | None]


@dataclass(frozen=True)
class FileProblem(Problem):
    """A problem with the input rather than with one object's fields. ``ref`` is where
    (``file:line:column`` when known); a duplicate object is named by its kind and ref."""

    def __str__(self) -> str:
        return f"{self.ref}: {self.message}" if self.kind == "file" else (
            f"{self.kind} {self.ref}: {self.message}")


def file_problem(path: Path, message: str, line: int | None = None,
                 column: int | None = None) -> FileProblem:
    where = ":".join(str(part) for part in (path, line, column) if part is not None)
    return FileProblem("file", where, "", message, dropped="file")


@dataclass(frozen=True)
class LoadedObjects:
    """Every object read, each (kind, namespace, name) once; ``problems`` holds ``errors``
    (input that could not be used) and the rest (duplicates, files left out, documents that
    are not objects)."""

    objects: list[dict[str, Any]]
    errors: list[FileProblem]
    problems: list[FileProblem]


@dataclass
class Reading:
    """One read of the paths: the objects of every file that loaded (command-line order, then
    path order), and the errors and warnings met."""

    paths: tuple[Path, ...]
    objects: dict[Path, list[Located]] = field(default_factory=dict)
    errors: dict[Path, FileProblem] = field(default_factory=dict)  # by file or directory
    warnings: list[FileProblem] = field(default_factory=list)

    def ordered(self) -> Iterator[tuple[Path, list[Located]]]:
        """The files' objects in command-line order, then path order."""
        def position(path: Path) -> tuple[int, Path]:
            return next(i for i, top in enumerate(self.paths) if within(path, top)), path

        for path in sorted(self.objects, key=position):
            yield path, self.objects[path]


def within(path: Path, top: Path) -> bool:
    """``path`` is ``top`` or lies under it."""
    return path == top or top in path.parents


@dataclass
class Scan:
    """What the paths hold now: manifest files per path given, files left out per directory,
    and the files or directories that cannot be read, with why."""

    files: dict[Path, list[Path]] = field(default_factory=dict)
    ignored: dict[Path, list[Path]] = field(default_factory=dict)
    unreadable: dict[Path, str] = field(default_factory=dict)


def scan(paths: Iterable[Path]) -> Scan:
    """Find the manifest files of ``paths`` (a file named is read whatever its suffix)."""
    found = Scan()
    for top in paths:
        try:
            is_dir = top.is_dir()
            if not is_dir:
                os.stat(top)
        except OSError as err:
            found.unreadable[top] = err.strerror or str(err)
            continue
        found.files[top] = _walk(top, found) if is_dir else [top]
    return found


def _walk(top: Path, found: Scan) -> list[Path]:
    def unreadable(err: OSError) -> None:
        found.unreadable[Path(err.filename)] = err.strerror or str(err)

    files: list[Path] = []
    for root, dirnames, filenames in os.walk(top, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(root, name)
            if path.suffix in MANIFEST_SUFFIXES:
                files.append(path)
            else:
                found.ignored.setdefault(top, []).append(path)
    return sorted(files)


def read_paths(paths: Iterable[str | Path]) -> Reading:
    """Read every manifest file of ``paths``; nothing is raised, everything is reported."""
    reading = Reading(tuple(Path(p) for p in paths))
    found = scan(reading.paths)
    for path, why in found.unreadable.items():
        reading.errors[path] = file_problem(path, f"cannot read: {why}")
    for top, ignored in found.ignored.items():
        names = ", ".join(str(path.relative_to(top)) for path in sorted(ignored))
        reading.warnings.append(file_problem(
            top, f"ignoring files without a {SUFFIXES_TEXT} suffix: {names}"))
    for top, files in found.files.items():
        for path in files:
            if path not in reading.objects and path not in reading.errors:
                _read_file(path, reading)
        if not any(within(bad, top) for bad in reading.errors) and not any(
                reading.objects.get(path) for path in files):
            reading.errors[top] = file_problem(top, "yields no Kubernetes object" if files else
                                               f"holds no {SUFFIXES_TEXT} file")
    return reading


def _read_file(path: Path, reading: Reading) -> None:
    try:
        text = path.read_text()
    except OSError as err:
        reading.errors[path] = file_problem(path, f"cannot read: {err.strerror or err}")
        return
    except UnicodeDecodeError as err:
        reading.errors[path] = file_problem(path, f"cannot read: not UTF-8 text ({err.reason} "
                                                  f"at byte {err.start})")
        return
    located: list[Located] = []
    try:
        for line, document in _documents(path, text):
            located.extend(_objects(path, line, document, reading.warnings))
    except json.JSONDecodeError as err:
        reading.errors[path] = file_problem(path, f"cannot parse JSON: {err.msg}",
                                            err.lineno, err.colno)
        return
    except yaml.YAMLError as err:
        reading.errors[path] = _yaml_problem(path, text, err)
        return
    reading.objects[path] = located


def _documents(path: Path, text: str) -> Iterator[tuple[int | None, Any]]:
    """Each document of the file with the line it starts on (JSON: one, line unknown)."""
    if path.suffix == ".json":
        yield None, json.loads(text)
        return
    constructor = yaml.SafeLoader("")
    for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
        yield node.start_mark.line + 1, constructor.construct_document(node)


def _yaml_problem(path: Path, text: str, err: yaml.YAMLError) -> FileProblem:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        message = f"cannot parse YAML: {err.problem}"
        if err.context and err.context_mark is not None:
            context = err.context_mark
            message += (f" ({err.context} started at line {context.line + 1}, "
                        f"column {context.column + 1})")
        elif err.context:
            message += f" ({err.context})"
        return file_problem(path, message, mark.line + 1, mark.column + 1)
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        column = err.position - text.rfind("\n", 0, err.position)
        reason = str(err).splitlines()[0]  # "unacceptable character #x0007: ..."
        return file_problem(path, f"cannot parse YAML: {reason}", line, column)
    return file_problem(path, f"cannot parse YAML: {err}")


def _objects(path: Path, line: int | None, document: Any,
             warnings: list[FileProblem]) -> Iterator[Located]:
    """The objects of one document (a List's items, each with its index)."""
    if document is None:  # an empty document, such as after a trailing ---
        return
    kind = document.get("kind") if isinstance(document, dict) else None
    if isinstance(kind, str) and kind.endswith("List") and isinstance(document.get("items"), list):
        # API list responses (ServiceList...) leave kind out of their items.
        item_kind = kind[: -len("List")]
        for index, listed in enumerate(document["items"]):
            missing_kind = isinstance(listed, dict) and item_kind and "kind" not in listed
            item = {"kind": item_kind, **listed} if missing_kind else listed
            if _is_object(item):
                yield item, line, index
            else:
                warnings.append(_not_an_object(path, line, index))
    elif _is_object(document):
        yield document, line, None
    else:
        warnings.append(_not_an_object(path, line, None))


def _not_an_object(path: Path, line: int | None, item: int | None) -> FileProblem:
    return FileProblem("file", _where(path, line, item), "",
                       "not a Kubernetes object (a mapping with a kind); skipped",
                       dropped="document")


def _is_object(document: Any) -> bool:
    return isinstance(document, dict) and isinstance(document.get("kind"), str) and bool(
        document["kind"])


def _where(path: Path, line: int | None, item: int | None) -> str:
    where = str(path) if line is None else f"{path}:{line}"
    return where if item is None else f"{where} items[{item}]"


def unique_objects(reading: Reading) -> tuple[list[dict[str, Any]], list[FileProblem]]:
    """The objects in order, each (kind, namespace, name) once: the last definition wins and
    every earlier one is reported with both places."""
    objects: list[dict[str, Any] | None] = []
    # Where each object was seen, formatted only for duplicates (a dump reads 100k objects).
    seen: dict[tuple[str, str, str], tuple[int, Path, int | None, int | None]] = {}
    duplicates: list[FileProblem] = []
    for path, located in reading.ordered():
        for obj, line, item in located:
            namespace, name = object_key(obj)
            if name:
                key = (obj["kind"], namespace, name)
                earlier = seen.get(key)
                if earlier is not None:
                    objects[earlier[0]] = None
                    first, then = _where(*earlier[1:]), _where(path, line, item)
                    duplicates.append(FileProblem(
                        key[0], f"{namespace}/{name}" if namespace else name, "",
                        f"defined more than once: {first}, then {then}; the last definition "
                        f"({then}) is used", dropped="definition"))
                seen[key] = (len(objects), path, line, item)
            objects.append(obj)
    return [obj for obj in objects if obj is not None], duplicates


def selected(objects: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects kube-proxy's label selector lists (:data:`PROXY_LABEL_SELECTOR`), and a line
    for each Service it leaves out. The EndpointSlices of such Services (and of headless ones)
    go without a word: their Service says it."""
    kept: list[dict[str, Any]] = []
    notes: list[str] = []
    for obj in objects:
        label = (other_proxy_label(obj) if obj.get("kind") in ("Service", "EndpointSlice")
                 else None)
        if label is None:
            kept.append(obj)
        elif obj["kind"] == "Service":
            notes.append(f"Service {object_ref(obj)}: not programmed: labelled {label} (left to "
                         f"another proxy, as kube-proxy's label selector "
                         f"{PROXY_LABEL_SELECTOR} does)")
    return kept, notes


def load_objects(paths: Iterable[str | Path]) -> LoadedObjects:
    """Load every object from the given files and directories, for a one-shot command."""
    reading = read_paths(paths)
    objects, duplicates = unique_objects(reading)
    objects, notes = selected(objects)
    for note in notes:
        logger.info("%s", note)
    errors = list(reading.errors.values())
    return LoadedObjects(objects, errors, [*errors, *reading.warnings, *duplicates])


# What identifies one version of a file: (mtime_ns, ctime_ns, size, inode); None if unreadable.
_FileStamp = tuple[int, int, int, int] | None


class FilesSource:
    """Manifests from ``paths``, sent again as Snapshots of every kind whenever they change.

    Every ``poll_interval`` seconds the files (and the listings of the directories named) are
    compared with what was loaded; on any difference that has stayed for one interval,
    everything is reloaded. A file or directory that cannot be used (:func:`read_paths`'s
    errors) keeps the objects it last yielded, with a warning naming it; an INFO says when it
    loads again. Until every path has loaded once without errors nothing is sent, so the agent
    leaves the rules in the kernel alone rather than drop the Services of a broken file.
    """

    def __init__(self, paths: Iterable[str | Path], poll_interval: float = 1.0) -> None:
        self.status = SourceStatus()
        self._paths = tuple(Path(p) for p in paths)
        self._poll_interval = poll_interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_good: dict[Path, list[Located]] = {}  # per file, what it last yielded
        self._failing: dict[Path, FileProblem] = {}  # errors as last reported
        self._warned: set[str] = set()
        self._noted: set[str] = set()  # Services left to other proxies, as last logged
        self._sent = False

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
        reading = read_paths(self._paths)
        kept = self._keep_last_good(reading)
        self._report(reading, kept)
        self._last_good = reading.objects
        objects, duplicates = unique_objects(reading)
        self._warn_once([*reading.warnings, *duplicates])
        objects, notes = selected(objects)
        for note in notes:
            if note not in self._noted:
                logger.info("%s", note)
        self._noted = set(notes)
        if reading.errors and not self._sent:
            logger.warning("not syncing until every --objects path loads without errors; the "
                           "rules in place are left as they are")
            return
        self._sent = True
        for kind in KINDS:
            sink(Snapshot(kind, tuple(obj for obj in objects if obj.get("kind") == kind)))

    def _keep_last_good(self, reading: Reading) -> dict[Path, int]:
        """Give every file under an error what it last yielded; the count kept per error."""
        kept = dict.fromkeys(reading.errors, 0)
        for path, located in self._last_good.items():
            bad = next((bad for bad in reading.errors if within(path, bad)), None)
            if bad is not None and not reading.objects.get(path):
                reading.objects[path] = located
                kept[bad] += len(located)
        return kept

    def _report(self, reading: Reading, kept: dict[Path, int]) -> None:
        for path, problem in reading.errors.items():
            if self._failing.get(path) != problem:
                self.status.read_errors += 1
                logger.warning("%s; %s", problem, f"keeping the objects last loaded from it "
                               f"({kept[path]})" if kept[path] else "no object from it is used")
        for path in self._failing.keys() - reading.errors.keys():
            count = sum(len(located) for file, located in reading.objects.items()
                        if within(file, path))
            logger.info("%s: loads again; using the objects it holds now (%d)", path, count)
        self._failing = dict(reading.errors)
        self.status.connected = not reading.errors
        self.status.last_error = "; ".join(str(p) for p in reading.errors.values()) or None

    def _warn_once(self, warnings: list[FileProblem]) -> None:
        """Log warnings not already logged at the previous load (not one per poll)."""
        texts = [str(warning) for warning in warnings]
        for text in texts:
            if text not in self._warned:
                logger.warning("%s", text)
        self._warned = set(texts)


def _stamps(paths: Iterable[Path]) -> dict[Path, _FileStamp]:
    found = scan(paths)
    files = [path for listed in (*found.files.values(), *found.ignored.values())
             for path in listed]
    return {**{path: _stamp(path) for path in files}, **dict.fromkeys(found.unreadable)}


def _stamp(path: Path) -> _FileStamp:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)
