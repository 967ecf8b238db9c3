"""A restart reads the live tables once, in a thread, while the manifests load and render.

Conventions as in test_incremental (engine.world); every test runs on the fake kernel and on
both real backends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import pytest

from engine.world import SETTINGS, World, assert_holds_full_sync, endpoint_slice, service
from iptsync.core import names
from iptsync.core.ruleset import SavedTable
from iptsync.engine.reconciler import Engine
from iptsync.kernel.port import OWNED_TABLES, NetfilterError, NetfilterPort

Save = Callable[[Iterable[str]], dict[str, SavedTable]]


def cluster(world: World, engine: Engine) -> None:
    for index in range(3):
        world.apply(engine, service(index, "NodePort", False, 2))
        world.apply(engine, endpoint_slice(index, [(0, True, True), (1, True, False)]))


def reads_by_thread(monkeypatch: pytest.MonkeyPatch, kernel: NetfilterPort) -> list[str]:
    """The name of the thread of each ``kernel.save()`` from now on."""
    threads: list[str] = []
    save: Save = kernel.save

    def recorded(tables: Iterable[str] = OWNED_TABLES) -> dict[str, SavedTable]:
        threads.append(threading.current_thread().name)
        return save(tables)

    monkeypatch.setattr(kernel, "save", recorded)
    return threads


def test_restart_reads_the_tables_once_ahead_and_repairs_what_it_read(
        kernel: NetfilterPort, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new engine on a node holding its rules, its read started before the manifests
    are fed in, reads once (in the read-ahead thread) and rewrites just the chain that was
    flushed before the read."""
    world = World()
    first = Engine(kernel, SETTINGS)
    cluster(world, first)
    first.sync()
    flushed = names.svc_chain("default/s1:p0", "tcp")
    kernel.run("-t", "nat", "-F", flushed)
    threads = reads_by_thread(monkeypatch, kernel)
    restarted = Engine(kernel, SETTINGS)
    restarted.read_ahead()
    for obj in world.objects.values():
        restarted.upsert(obj)
    report = restarted.sync(full=True)
    assert (["iptsync-read-ahead"], [("nat", [flushed])]) == (
        threads, [(t.table, t.written) for t in report.plan.tables])
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_failed_read_fails_the_sync_and_the_next_reads_again(
        kernel: NetfilterPort, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the read ahead fails, the sync raises its error and a full sync stays owed; the
    next one reads anew and writes every rule."""
    world = World()
    engine = Engine(kernel, SETTINGS)
    save: Save = kernel.save

    def failing(tables: Iterable[str] = OWNED_TABLES) -> dict[str, SavedTable]:
        raise NetfilterError("iptables-save: the test's failure")

    monkeypatch.setattr(kernel, "save", failing)
    engine.read_ahead()
    cluster(world, engine)
    with pytest.raises(NetfilterError, match="the test's failure"):
        engine.sync(full=True)
    monkeypatch.setattr(kernel, "save", save)
    assert (True, True) == (engine.needs_full, engine.sync().full)
    assert_holds_full_sync(list(world.objects.values()), kernel)
