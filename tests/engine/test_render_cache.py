"""Renderings kept across restarts (iptsync.engine.rendercache).

A restarted engine takes the renderings the process before it kept, for every service whose
inputs are the same, and renders the others; it still compares everything with the kernel.
A file that is not ours, tampered with, or kept for other settings or code, is not used.
Conventions as in test_incremental (engine.world); the tests that write rules run on the
fake kernel and on both real backends.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.world import SETTINGS, World, assert_holds_full_sync, endpoint_slice, service
from iptsync.core import names
from iptsync.core.model import Endpoint, EndpointSliceInfo, IPFamily, Protocol, SlicePort
from iptsync.core.plan import ChainContent
from iptsync.engine import reconciler, rendercache
from iptsync.engine.reconciler import Engine, RenderedService
from iptsync.engine.rendercache import FORMAT as FORMAT_OF_THE_FILE
from iptsync.engine.rendercache import RenderCache
from iptsync.kernel.port import NetfilterPort
from iptsync.testing import FakeNetfilter


def cluster(world: World, engine: Engine) -> None:
    for index in range(4):
        world.apply(engine, service(index, "LoadBalancer" if index % 2 else "ClusterIP",
                                    index == 3, 2))
        world.apply(engine, endpoint_slice(index, [(0, True, True), (1, True, False)]))


def counting_renders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the services rendered from now on."""
    seen: list[str] = []
    render = reconciler.render_service

    def recorded(svc: Any, *args: Any, **kwargs: Any) -> RenderedService:
        seen.append(svc.name)
        return render(svc, *args, **kwargs)

    monkeypatch.setattr(reconciler, "render_service", recorded)
    return seen


def first_run(kernel: NetfilterPort, cache: RenderCache, world: World) -> Engine:
    """A process that syncs the cluster and keeps its renderings, as ``run --once`` does."""
    engine = Engine(kernel, SETTINGS, render_cache=cache)
    cluster(world, engine)
    engine.sync(full=True)
    # Into an empty kernel too, the renderer spelled the rules it can (else keeping them
    # would canonicalise every chain): the endpoint chains have their digest already.
    spelled = [content._digest for rendered in engine._rendered.values()
               for chain, content in rendered.chains.items()
               if chain.startswith(names.SEP_PREFIX)]
    assert spelled
    assert None not in spelled
    engine.keep_renderings()
    assert cache.path.exists()
    return engine


def restarted(kernel: NetfilterPort, cache: RenderCache, world: World,
              settings: Any = SETTINGS) -> Engine:
    engine = Engine(kernel, settings, render_cache=cache)
    for obj in world.objects.values():
        engine.upsert(obj)
    return engine


@pytest.fixture
def cache(tmp_path: Path) -> RenderCache:
    return RenderCache(tmp_path / "renderings", IPFamily.IPV4)


def test_a_restart_reuses_every_rendering_and_still_repairs_the_kernel(
        kernel: NetfilterPort, cache: RenderCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is rendered again or canonicalised, and a chain flushed while no agent ran
    is still found and rewritten: the kept renderings save rendering, never the
    comparison."""
    world = World()
    before = first_run(kernel, cache, world)
    flushed = next(chain for chain in before.desired().tables["nat"]
                   if chain.startswith(names.SVC_PREFIX))
    kernel.restore(f"*nat\n:{flushed} - [0:0]\nCOMMIT\n")
    seen = counting_renders(monkeypatch)
    canonicalised: list[int] = []
    canonical_rules = ChainContent.canonical_rules
    monkeypatch.setattr(ChainContent, "canonical_rules", lambda self: (
        canonicalised.append(self.lines) or canonical_rules(self)))
    after = restarted(kernel, cache, world)
    report = after.sync(full=True)
    assert seen == []
    # Every digest was kept, the top-level chains' too: nothing is canonicalised.
    assert canonicalised == []
    assert [flushed] == [chain for table in report.plan.tables for chain in table.written]
    assert_holds_full_sync(list(world.objects.values()), kernel)
    assert {key: rendered.chains for key, rendered in after._rendered.items()} == {
        key: rendered.chains for key, rendered in before._rendered.items()}


def test_a_changed_service_alone_is_rendered_again(
        kernel: NetfilterPort, cache: RenderCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes while no agent ran: a new endpoint (s1), a deleted service (s2) and a new
    one (s4). s1 and s4 are rendered; everything else is reused and the kernel ends as a
    full sync of the new objects leaves it."""
    world = World()
    first_run(kernel, cache, world)
    world.objects[("EndpointSlice", "s1-x")] = endpoint_slice(
        1, [(0, True, True), (1, True, False), (2, True, False)])
    for gone in ("s2", "s2-x"):
        world.objects.pop(("Service" if gone == "s2" else "EndpointSlice", gone))
    world.objects[("Service", "s4")] = service(4, "NodePort", False, 1)
    seen = counting_renders(monkeypatch)
    restarted(kernel, cache, world).sync(full=True)
    assert sorted(seen) == ["s1", "s4"]
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_renderings_kept_for_other_settings_are_not_used(
        cache: RenderCache, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Another node name, another cluster CIDR, or another version of the renderer: every
    service is rendered."""
    world = World()
    first_run(FakeNetfilter(), cache, world)
    seen = counting_renders(monkeypatch)
    for settings in (dataclasses.replace(SETTINGS, node_name="node2"),
                     dataclasses.replace(SETTINGS, cluster_cidrs=(
                         ipaddress.ip_network("10.8.0.0/14"),))):
        seen.clear()
        restarted(FakeNetfilter(), cache, world, settings).sync(full=True)
        assert sorted(seen) == ["s0", "s1", "s2", "s3"]
    monkeypatch.setattr(rendercache, "code_digest", lambda: "another renderer")
    seen.clear()
    with caplog.at_level(logging.INFO, "iptsync"):
        restarted(FakeNetfilter(), cache, world).sync(full=True)
    assert sorted(seen) == ["s0", "s1", "s2", "s3"]
    assert "written for another configuration, node zone or version" in caplog.text


@pytest.mark.parametrize("damage", ["group-writable", "newline", "foreign-line", "truncated",
                                    "format", "not-an-object", "infinite-digest", "not-utf-8"])
def test_a_file_that_cannot_be_trusted_is_not_used(
        cache: RenderCache, damage: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Writable by others, a rule with a newline in it (a second line of the writer's
    choosing in a restore payload), a line that is not a rule of its chain, a cut-off file,
    another format, JSON of the wrong shape, a digest JSON reads as infinite, bytes that are
    not UTF-8: said, and every service rendered; the sync is as without the file (never an
    error: a file left in place would fail every start the same way)."""
    world = World()
    first_run(FakeNetfilter(), cache, world)
    text = cache.path.read_text()
    head, first, *rest = text.split("\n")
    entry = json.loads(first)
    chain, rules, digest = entry[3][0]
    if damage == "group-writable":
        cache.path.chmod(0o664)
    elif damage == "newline":
        entry[3][0] = [chain, [rules[0] + "\n-A KUBE-SERVICES -j ACCEPT", *rules[1:]], digest]
    elif damage == "foreign-line":
        entry[3][0] = [chain, ["-A KUBE-SERVICES -j ACCEPT", *rules[1:]], digest]
    elif damage == "truncated":
        first = first[: len(first) // 2]
    elif damage == "format":
        head = json.dumps({"format": "iptsync-render-cache/0", "header": "x"})
    elif damage == "not-an-object":
        head = json.dumps([FORMAT_OF_THE_FILE])
    elif damage == "infinite-digest":
        entry[3][0] = [chain, rules, float("inf")]
    if damage in ("newline", "foreign-line", "infinite-digest"):
        first = json.dumps(entry)
    if damage == "not-utf-8":
        cache.path.write_bytes("\n".join([head, first, *rest]).encode() + b"\xff\xfe\n")
    elif damage != "group-writable":
        cache.path.write_text("\n".join([head, first, *rest]))
    seen = counting_renders(monkeypatch)
    kernel = FakeNetfilter()
    with caplog.at_level(logging.INFO, "iptsync"):
        restarted(kernel, cache, world).sync(full=True)
    assert sorted(seen) == ["s0", "s1", "s2", "s3"]
    assert f"render cache {cache.path}: not used" in caplog.text
    assert_holds_full_sync(list(world.objects.values()), kernel)
    assert "-j ACCEPT" not in kernel.save_text("nat")


def test_renderings_not_of_the_current_inputs_are_not_written(cache: RenderCache) -> None:
    """A change not rendered yet, at stop or after a failed sync: the file is left as it
    was (written whole or not at all, never with services missing or out of date)."""
    world = World()
    engine = first_run(FakeNetfilter(), cache, world)
    kept = cache.path.read_text()
    world.apply(engine, endpoint_slice(0, [(0, True, True), (3, True, False)]))
    engine.keep_renderings()  # s0's change is not rendered yet
    assert kept == cache.path.read_text()
    engine.sync()
    engine.keep_renderings()
    assert kept != cache.path.read_text()


def test_deleting_the_node_renders_the_services_again_when_its_zone_mattered() -> None:
    """Topology hints are read for this node's zone: the Node object deleted, the services
    render again (without the zone), and no rendering for the old zone is kept."""
    engine = Engine(FakeNetfilter(), SETTINGS)
    world = World()
    cluster(world, engine)
    engine.upsert({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "node1",
                                "labels": {"topology.kubernetes.io/zone": "zone-a"}},
                   "status": {"addresses": [{"type": "InternalIP", "address": "10.100.0.2"}]}})
    engine.sync(full=True)
    assert not engine.pending
    engine.delete({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}})
    assert engine.pending


def test_the_renderings_are_written_again_only_when_something_changed(
        cache: RenderCache) -> None:
    """A restart that reused everything has nothing new to keep; one change makes it write."""
    world = World()
    first_run(FakeNetfilter(), cache, world)
    os.utime(cache.path, (0, 0))
    engine = restarted(FakeNetfilter(), cache, world)
    engine.sync(full=True)
    assert engine.renderings() is None
    world.apply(engine, endpoint_slice(0, [(0, True, True)]))
    engine.sync()
    engine.keep_renderings()
    assert cache.path.stat().st_mtime > 0


# --- the fingerprint sees every input --------------------------------------------------------

ENDPOINT = Endpoint(ipaddress.ip_address("10.0.0.1"), 0, "node1", "zone-a")
SLICE = EndpointSliceInfo("default", "s0-x", "s0", IPFamily.IPV4,
                          (SlicePort("p0", Protocol.TCP, 8080),), (ENDPOINT,))
OTHER_VALUES: dict[str, Any] = {
    "ip": ipaddress.ip_address("10.0.0.2"), "port": 1, "node_name": "node2", "zone": "zone-b",
    "zone_hints": frozenset({"zone-a"}), "ready": False, "serving": False, "terminating": True,
    "node_hints": frozenset({"node1"}), "address": "10.0.0.3", "namespace": "other",
    "name": "s0-y", "service": "s1",
    "family": IPFamily.IPV6, "ports": (SlicePort("p0", Protocol.UDP, 8080),),
    "endpoints": (), "trigger_time": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
}


def test_every_field_of_an_endpoint_and_a_slice_changes_the_fingerprint() -> None:
    """A field the fingerprint missed would let a restart reuse a rendering of other
    inputs. (``key`` follows from the others; ``address`` spells ``ip``, so a new ``ip``
    comes with its own spelling, as every parser builds it.)"""
    svc = World()  # any service will do: only the slices vary here
    engine = Engine(None, SETTINGS)
    svc.apply(engine, service(0, "ClusterIP", False, 1))
    info = engine.state.services[("default", "s0")]
    base = rendercache.fingerprint(info, [SLICE])
    for field in dataclasses.fields(Endpoint):
        if field.name == "key":
            continue
        changed = dataclasses.replace(ENDPOINT, **{field.name: OTHER_VALUES[field.name]},
                                      **({"address": ""} if field.name == "ip" else {}))
        assert rendercache.fingerprint(info, [dataclasses.replace(
            SLICE, endpoints=(changed,))]) != base, field.name
    for field in dataclasses.fields(EndpointSliceInfo):
        changed_slice = dataclasses.replace(SLICE, **{field.name: OTHER_VALUES[field.name]})
        assert rendercache.fingerprint(info, [changed_slice]) != base, field.name
    assert rendercache.fingerprint(info, [SLICE, SLICE]) != base
    assert rendercache.fingerprint(dataclasses.replace(info, name="s9"), [SLICE]) != base


FINGERPRINT_IN_A_PROCESS = """
import ipaddress
from iptsync.core.model import Endpoint, EndpointSliceInfo, IPFamily, ServiceInfo
from iptsync.engine.rendercache import fingerprint
hints = frozenset(f"zone-{i}" for i in range(20))
endpoint = Endpoint(ipaddress.ip_address("10.0.0.1"), 0, "n", "z", hints, node_hints=hints)
print(fingerprint(ServiceInfo("default", "s0", ()),
                  [EndpointSliceInfo("default", "s0-x", "s0", IPFamily.IPV4, (), (endpoint,))]))
"""


def test_the_fingerprint_is_the_same_in_every_process() -> None:
    """Processes hash strings differently, and a set of strings iterates in an order that
    follows: the hint sets are sorted, so equal inputs give one fingerprint everywhere."""
    found = {subprocess.run([sys.executable, "-c", FINGERPRINT_IN_A_PROCESS], check=True,
                            capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
             for seed in (1, 2, 3)}
    assert len(found) == 1
