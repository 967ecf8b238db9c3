"""Read Kubernetes manifests from files and directories (``--objects``).

Accepts what people have on disk or what ``kubectl get -o yaml|json`` prints: single objects,
multi-document YAML, JSON, and ``kind: List`` wrappers. A file that cannot be read or parsed is
reported as a problem and skipped; the other files still load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from iptsync.model import Problem

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
