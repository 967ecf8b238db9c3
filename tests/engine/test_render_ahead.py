"""Families synced in turn: the next one renders while the first one's restore runs.

Conventions as in test_incremental (engine.world); the tests that write rules run on the fake
kernel and on both real backends.
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from engine.world import SETTINGS, World, assert_holds_full_sync, endpoint_slice, service
from iptsync.engine import reconciler
from iptsync.engine.families import in_turn
from iptsync.engine.reconciler import Engine, RenderedService, bulk
from iptsync.kernel.port import NetfilterPort
from iptsync.testing import FakeNetfilter


def cluster(world: World, engine: Engine) -> None:
    for index in range(3):
        world.apply(engine, service(index, "NodePort", False, 2))
        world.apply(engine, endpoint_slice(index, [(0, True, True), (1, True, False)]))


def renders_by_thread(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(thread name, service name) of each service rendered from now on."""
    seen: list[tuple[str, str]] = []
    render = reconciler.render_service

    def recorded(service: Any, *args: Any, **kwargs: Any) -> RenderedService:
        seen.append((threading.current_thread().name, service.name))
        return render(service, *args, **kwargs)

    monkeypatch.setattr(reconciler, "render_service", recorded)
    return seen


def test_the_second_engine_renders_once_the_first_has_sent_its_rules(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In turn, the first engine renders in the caller's thread; the second renders in a
    thread started once the first sync has sent its rules (not before: that would slow the
    first one's rendering), and its sync writes those renderings without rendering again."""
    first_world, second_world = World(), World()
    first, second = Engine(FakeNetfilter(), SETTINGS), Engine(FakeNetfilter(), SETTINGS)
    cluster(first_world, first)
    cluster(second_world, second)
    seen = renders_by_thread(monkeypatch)
    ahead_by_restore: list[bool] = []
    assert first.netfilter is not None
    restore = first.netfilter.restore

    def recorded(payload: str, **kwargs: Any) -> None:
        ahead_by_restore.append(len(seen) > 3 or any(
            t.name == "iptsync-render-ahead" for t in threading.enumerate()))
        restore(payload, **kwargs)

    monkeypatch.setattr(first.netfilter, "restore", recorded)
    for engine in in_turn([first, second]):
        engine.sync()
    main = threading.current_thread().name
    assert [(main, f"s{i}") for i in range(3)] + [
        ("iptsync-render-ahead", f"s{i}") for i in range(3)] == seen
    assert ahead_by_restore[0]  # started before the first engine's restore
    assert (None, None) == (first.when_rendered, second.when_rendered)
    for world, engine in ((first_world, first), (second_world, second)):
        assert engine.netfilter is not None
        assert_holds_full_sync(list(world.objects.values()), engine.netfilter)


def test_a_change_after_rendering_ahead_is_rendered_again(kernel: NetfilterPort) -> None:
    """What changes between rendering ahead and the sync is rendered again: the sync writes
    the services as they are then (a new endpoint, a deleted service), not as rendered."""
    world = World()
    engine = Engine(kernel, SETTINGS)
    cluster(world, engine)
    engine.render_ahead()
    world.apply(engine, endpoint_slice(0, [(0, True, True), (1, True, False), (2, True, True)]))
    world.apply(engine, ("Service", 1))
    engine.sync()
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_a_failed_render_ahead_is_said_and_the_sync_renders_itself(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An error while rendering ahead is logged, never raised where it would lose an object
    being fed in; the services stay due, and the sync renders and writes them itself."""
    world = World()
    kernel = FakeNetfilter()
    engine = Engine(kernel, SETTINGS)
    cluster(world, engine)
    render = reconciler.render_service

    def failing_ahead(*args: Any, **kwargs: Any) -> RenderedService:
        if threading.current_thread().name == "iptsync-render-ahead":
            raise RuntimeError("the test's failure")
        return render(*args, **kwargs)

    monkeypatch.setattr(reconciler, "render_service", failing_ahead)
    engine.render_ahead()
    world.apply(engine, service(3, "ClusterIP", False, 1))  # fed in after the failure
    engine.sync()
    assert "rendering ahead failed" in caplog.text
    assert "the test's failure" in caplog.text
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_the_collector_stays_off_until_the_last_bulk_block_closes() -> None:
    """bulk() blocks open in two threads: closing the first leaves the collector off for the
    second; closing the last turns it back on."""
    was_enabled = gc.isenabled()  # in-process dump commands of other tests turn it off
    gc.enable()
    opened, close_first = threading.Event(), threading.Event()

    def first() -> None:
        with bulk():
            opened.set()
            close_first.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert opened.wait(10)
        with bulk():
            close_first.set()
            thread.join(10)
            assert not gc.isenabled()
        assert gc.isenabled()
    finally:
        close_first.set()
        thread.join(10)
        if not was_enabled:
            gc.disable()
