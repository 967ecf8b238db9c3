"""Renderings kept across restarts: a restarted agent reuses what it rendered before.

A restart on a loaded node compares every rule it would write with what the kernel holds.
Rendering 10,000 services to compare them costs more than reading the kernel, and the
renderer is pure: the same service, endpoints and node settings give the same chains. So
each engine keeps its renderings in a file (by default under ``/run/iptsync``, which a
reboot empties along with the kernel's tables), each with a fingerprint of its inputs, and
the next process takes a rendering whose fingerprint matches instead of rendering again.

What the file cannot change:

- The rules in the kernel. A reused rendering is compared with the kernel like any other:
  the file saves rendering time, never the comparison.
- What is rendered. A rendering is reused only when everything it was rendered from is the
  same: the service, its endpoints (every field the renderer reads), this node's settings
  and zone, the large-cluster mode, and the renderer's own code (a digest of its source, so
  an upgrade or a local edit discards the file).
- The shape of a restore payload. The file is JSON (reading it runs no code); it is used
  only when this user owns it and nobody else can write it, and a line that is not a rule of
  the chain it belongs to, or a text with a control character escaped in it, discards the
  whole file.

A file that cannot be used is said once and ignored: everything is rendered, as without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import IO

import iptsync
from iptsync.core.model import EndpointSliceInfo, IPFamily, ServiceInfo
from iptsync.core.plan import ChainContent, RenderedService, TopRule
from iptsync.core.policy import Settings
from iptsync.core.ruleset import checked_chain
from iptsync.core.state import ServiceKey

log = logging.getLogger(__name__)

DEFAULT_DIR = "/run/iptsync"
FORMAT = "iptsync-render-cache/1"
# JSON escapes other than \" and \\: a control character (newline, NUL...) in some text.
_ESCAPED_CONTROL = re.compile(r'\\[^"\\]')
# What a rendering depends on besides its inputs: the renderer's code.
_RENDER_MODULES = ("core/model.py", "core/names.py", "core/plan.py", "core/policy.py",
                   "core/render.py", "core/ruleset.py", "core/state.py",
                   "engine/reconciler.py", "engine/rendercache.py")
# Every field of an EndpointSlice's endpoint (``key`` stands for ip, port and address) and of
# the slice: tests/engine/test_render_cache.py changes each and expects another fingerprint.
_ENDPOINT_FIELDS = attrgetter("key", "node_name", "zone", "zone_hints", "ready", "serving",
                              "terminating", "node_hints")
_ZONE_HINTS, _NODE_HINTS = attrgetter("zone_hints"), attrgetter("node_hints")
_SLICE_FIELDS = attrgetter("namespace", "name", "service", "family", "ports", "trigger_time")

Reusable = dict[ServiceKey, tuple[str, RenderedService]]
# The top-level chains' digests: (table, chain) -> (their lines' key, digest). Rules in those
# chains are not spelled by the renderer; when a restart assembles the same lines, it takes
# the digest instead of canonicalising 20,000 rules.
TopDigests = dict[tuple[str, str], tuple[str, int]]


def lines_key(content: ChainContent) -> str:
    """What a chain's digest follows from (its lines, which slice is unordered, family)."""
    return _digest(f"{content.free}\n{content.family.value}\n" + "\n".join(content.lines))


@functools.cache
def code_digest() -> str:
    """A digest of the renderer's source and the package version."""
    root = Path(iptsync.__file__).parent
    digest = hashlib.blake2b(iptsync.__version__.encode(), digest_size=16)
    for module in _RENDER_MODULES:
        digest.update((root / module).read_bytes())
    return digest.hexdigest()


def header(settings: Settings, zone: str | None, large_cluster: bool) -> str:
    """What every rendering of one engine depends on, as one digest."""
    return _digest(repr((FORMAT, code_digest(), settings, zone, large_cluster)))


def fingerprint(service: ServiceInfo, slices: Sequence[EndpointSliceInfo]) -> str:
    """A digest of one service's inputs: the service and its EndpointSlices (from which its
    ports' endpoints are merged), in key order.

    ``repr`` of the dataclasses spells every field of a service (tuples, enums, dates and
    addresses spell the same in every process); an endpoint's hint sets are sorted, since a
    set of strings iterates in an order that changes from process to process.
    """
    parts: list[object] = [service]
    for info in slices:
        rows = list(map(_ENDPOINT_FIELDS, info.endpoints))
        if any(map(_ZONE_HINTS, info.endpoints)) or any(map(_NODE_HINTS, info.endpoints)):
            rows = [(*row[:3], sorted(row[3]), *row[4:7], sorted(row[7])) for row in rows]
        parts.append((_SLICE_FIELDS(info), rows))
    return _digest(repr(parts))


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class Snapshot:
    """What to write, taken in the engine's thread (its inputs are immutable); ``count``
    says which renderings it holds (see :meth:`iptsync.engine.reconciler.Engine.renderings`)."""

    header: str
    services: list[tuple[ServiceInfo, list[EndpointSliceInfo], RenderedService]]
    top: dict[tuple[str, str], ChainContent]
    count: int = 0


class RenderCache:
    """One engine's renderings file: :meth:`load` at the first sync, :meth:`save` after."""

    def __init__(self, directory: str | os.PathLike[str], family: IPFamily) -> None:
        name = f"renderings-{family.value.lower()}"
        self.path = Path(directory) / f"{name}.json"
        self._temporary_prefix = f".{name}-"  # a write under way (one per family at a time)

    def load(self, headers: Collection[str],
             family: IPFamily) -> tuple[str, Reusable, TopDigests]:
        """The header the renderings were kept for (one of ``headers``), the renderings and
        the top-level chains' digests; nothing (and said why) when there are none or the file
        cannot be used. Never raises: whatever is wrong with the file, everything is
        rendered, as without it."""
        started = time.monotonic()
        try:
            with open(self.path, encoding="utf-8") as file:
                info = os.fstat(file.fileno())
                if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    log.warning("render cache %s: not used: it must belong to uid %d and be "
                                "writable by nobody else (it is uid %d, mode %o)", self.path,
                                os.geteuid(), info.st_uid, stat.S_IMODE(info.st_mode))
                    return "", {}, {}
                found, reusable, top = _read(file, headers, family)
        except FileNotFoundError:
            log.info("render cache %s: none yet; rendering every service", self.path)
            return "", {}, {}
        except Exception as err:
            log.warning("render cache %s: not used: %s", self.path,
                        f"{type(err).__name__}: {err}"[:300])
            return "", {}, {}
        if not found:
            log.info("render cache %s: written for another configuration, node zone or "
                     "version; rendering every service", self.path)
            return "", {}, {}
        log.info("render cache %s: %d services' renderings read in %.2fs", self.path,
                 len(reusable), time.monotonic() - started)
        return found, reusable, top

    def save(self, snapshot: Snapshot) -> bool:
        """Write ``snapshot`` in place of the file (a reader sees the old or the new one);
        whether it was written. A failure is said, never raised: the file only saves time."""
        started = time.monotonic()
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for stale in directory.glob(f"{self._temporary_prefix}*"):
                stale.unlink(missing_ok=True)  # left by a process killed while writing
            fd, temporary = tempfile.mkstemp(dir=directory, prefix=self._temporary_prefix)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    file.write(json.dumps({
                        "format": FORMAT, "header": snapshot.header,
                        "top": [[table, chain, lines_key(content), content.digest()]
                                for (table, chain), content in snapshot.top.items()]}))
                    file.write("\n")
                    file.writelines(_entries(snapshot.services))
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except Exception as err:
            log.warning("render cache %s: not written: %s", self.path, err)
            return False
        log.info("render cache %s: %d services' renderings written in %.2fs", self.path,
                 len(snapshot.services), time.monotonic() - started)
        return True


def _read(file: IO[str], headers: Collection[str],
          family: IPFamily) -> tuple[str, Reusable, TopDigests]:
    """The file's renderings, line by line (never the whole file in memory at once)."""
    head = json.loads(_checked(file.readline()))
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    found = str(head.get("header"))
    if found not in headers:
        return "", {}, {}
    top = {(str(table), str(chain)): (str(key), int(digest))
           for table, chain, key, digest in head.get("top", [])}
    reusable: Reusable = {}
    for line in file:
        if line == "\n":
            continue
        namespace, name, digest, chains, top_rules, endpoints, no_internal, no_external = (
            json.loads(_checked(line)))
        contents = {}
        for chain, rules, chain_digest in chains:
            prefix = f"-A {checked_chain(chain)} "
            # (str.startswith refuses what is not a string: a TypeError, caught by load.)
            if not all(map(str.startswith, rules, repeat(prefix))):
                raise ValueError(f"chain {chain}: a line that is not one of its rules")
            contents[chain] = ChainContent(tuple(rules), family=family,
                                           digest=int(chain_digest))
        rules = tuple(TopRule((str(ns), str(svc), int(port), int(seq)), str(table),
                              checked_chain(chain), str(rule))
                      for (ns, svc, port, seq), table, chain, rule in top_rules)
        reusable[(str(namespace), str(name))] = (str(digest), RenderedService(
            contents, rules, int(endpoints), int(no_internal), int(no_external)))
    return found, reusable, top


def _checked(line: str) -> str:
    """``line``, refused if a control character is escaped in it, or it was cut off."""
    if _ESCAPED_CONTROL.search(line):
        raise ValueError("it holds an escaped control character")
    if not line.endswith("\n"):
        raise ValueError("it was cut off")
    return line


def _entries(services: Iterable[tuple[ServiceInfo, list[EndpointSliceInfo], RenderedService]],
             ) -> Iterable[str]:
    for service, slices, rendered in services:
        # Every chain with its digest (the renderer spelled most; the rest are computed
        # here once, not at every restart).
        chains = [[chain, content.lines, content.digest()]
                  for chain, content in rendered.chains.items()]
        top = [[rule.key, rule.table, rule.chain, rule.text] for rule in rendered.top]
        yield json.dumps([service.namespace, service.name, fingerprint(service, slices),
                          chains, top, rendered.endpoints, rendered.no_local_internal,
                          rendered.no_local_external], separators=(",", ":"),
                         ensure_ascii=False) + "\n"
