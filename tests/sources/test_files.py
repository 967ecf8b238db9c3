"""FilesSource: ``--objects`` files and directories, polled for changes.

Conventions: ``manifests/`` holds ``services.yaml`` (two Services, multi-document YAML),
``slices.json`` (a ``kubectl get -o json`` List of one EndpointSlice) and ``node.yaml``; the
source polls every 20 ms, so a change shows within a few polls. A test cannot tell which poll
sees a rewrite half done, so after a change it waits for the *latest* full round of Snapshots
to show the expected state.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iptsync.sources.base import KINDS, Kind, Snapshot
from iptsync.sources.files import FilesSource

from .conftest import Recorder, names

POLL = 0.02


def service_yaml(*service_names: str) -> str:
    """Multi-document YAML with one ClusterIP Service per name."""
    return "---\n".join(
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n"
        "spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n"
        for name in service_names)


SLICES = {"apiVersion": "v1", "kind": "List", "items": [{
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": "web-1", "namespace": "default",
                 "labels": {"kubernetes.io/service-name": "web"}},
    "addressType": "IPv4",
    "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
    "ports": [{"port": 8080}]}]}
NODE = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n"


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    """The directory of the conventions above."""
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "services.yaml").write_text(service_yaml("web", "db"))
    (directory / "slices.json").write_text(json.dumps(SLICES))
    (directory / "node.yaml").write_text(NODE)
    return directory


@pytest.fixture
def start_source(recorder: Recorder) -> Iterator[Callable[..., FilesSource]]:
    """Start a FilesSource feeding ``recorder``; stopped afterwards."""
    started: list[FilesSource] = []

    def start(*paths: Path, poll_interval: float = POLL) -> FilesSource:
        source = FilesSource(paths, poll_interval=poll_interval)
        started.append(source)
        source.start(recorder)
        return source

    yield start
    for source in started:
        source.stop()


def round_of_snapshots(recorder: Recorder, number: int) -> dict[Kind, Snapshot]:
    """Wait for the ``number``-th Snapshot of every kind (1 is the initial load)."""
    recorder.wait_for(lambda r: all(len(r.snapshots(kind)) >= number for kind in KINDS))
    return {kind: recorder.snapshots(kind)[number - 1] for kind in KINDS}


def latest_state(recorder: Recorder) -> dict[Kind, list[str]] | None:
    """Object names per kind in the last complete round of Snapshots (None: mid-round)."""
    counts = {len(recorder.snapshots(kind)) for kind in KINDS}
    if len(counts) != 1 or counts == {0}:
        return None
    return {kind: names(recorder.latest(kind)) for kind in KINDS}


def wait_for_state(recorder: Recorder, expected: dict[Kind, list[str]]) -> None:
    """Wait until the last complete round of Snapshots names exactly ``expected``."""
    recorder.wait_for(lambda r: expected == latest_state(r))


def test_snapshot_of_every_kind_at_start(manifests: Path, recorder: Recorder,
                                         start_source: Callable[..., FilesSource]) -> None:
    """At start one Snapshot per kind holds that kind's objects from every file."""
    source = start_source(manifests)
    first = round_of_snapshots(recorder, 1)
    assert {"Service": ["web", "db"], "EndpointSlice": ["web-1"], "Node": ["node-a"]} \
        == {kind: names(snapshot) for kind, snapshot in first.items()}
    assert (True, None) == (source.status.connected, source.status.last_error)


def test_unchanged_files_are_not_sent_again(manifests: Path, recorder: Recorder,
                                            start_source: Callable[..., FilesSource]) -> None:
    """Polls that find nothing changed send nothing."""
    start_source(manifests)
    round_of_snapshots(recorder, 1)
    time.sleep(10 * POLL)
    assert 3 == len(recorder.messages)


def test_edited_file_sends_fresh_snapshots(manifests: Path, recorder: Recorder,
                                           start_source: Callable[..., FilesSource]) -> None:
    """Editing a file sends new Snapshots of every kind, reflecting the edit."""
    source = start_source(manifests)
    round_of_snapshots(recorder, 1)
    (manifests / "services.yaml").write_text(service_yaml("web", "api", "cache"))
    wait_for_state(recorder, {"Service": ["web", "api", "cache"],
                              "EndpointSlice": ["web-1"], "Node": ["node-a"]})
    assert [True, True] == [len(recorder.snapshots("Node")) > 1, source.status.relists > 0]


def test_named_file_is_watched(manifests: Path, recorder: Recorder,
                               start_source: Callable[..., FilesSource]) -> None:
    """A file named directly (not through its directory) is watched too."""
    start_source(manifests / "node.yaml")
    assert ["node-a"] == names(round_of_snapshots(recorder, 1)["Node"])
    # A different size: a same-size rewrite within one file-timestamp tick is not detectable.
    (manifests / "node.yaml").write_text(NODE.replace("node-a", "node-bb"))
    wait_for_state(recorder, {"Service": [], "EndpointSlice": [], "Node": ["node-bb"]})


def test_new_file_in_directory(manifests: Path, recorder: Recorder,
                               start_source: Callable[..., FilesSource]) -> None:
    """A manifest file added to a watched directory is loaded."""
    start_source(manifests)
    round_of_snapshots(recorder, 1)
    (manifests / "more").mkdir()
    (manifests / "more" / "extra.yml").write_text(service_yaml("extra"))
    wait_for_state(recorder, {"Service": ["extra", "web", "db"], "EndpointSlice": ["web-1"],
                              "Node": ["node-a"]})


def test_deleted_file(manifests: Path, recorder: Recorder,
                      start_source: Callable[..., FilesSource]) -> None:
    """Removing a file drops its objects from the next Snapshots."""
    start_source(manifests)
    round_of_snapshots(recorder, 1)
    (manifests / "node.yaml").unlink()
    wait_for_state(recorder, {"Service": ["web", "db"], "EndpointSlice": ["web-1"], "Node": []})


def test_broken_file_is_reported_and_others_load(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """A file that does not parse is logged by name and skipped; the other files still load."""
    broken = manifests / "broken.yaml"
    broken.write_text("kind: Service\nmetadata: [unclosed\n")
    source = start_source(manifests)
    first = round_of_snapshots(recorder, 1)
    assert (["web", "db"], ["node-a"]) == (names(first["Service"]), names(first["Node"]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [True] == [w.startswith(f"{broken}: cannot read manifests: ") for w in warnings]
    assert str(broken) in str(source.status.last_error)


def test_file_fixed_later(manifests: Path, recorder: Recorder,
                          start_source: Callable[..., FilesSource]) -> None:
    """Once a broken file is fixed its objects arrive and the error is cleared."""
    broken = manifests / "broken.yaml"
    broken.write_text("kind: Service\nmetadata: [unclosed\n")
    source = start_source(manifests)
    round_of_snapshots(recorder, 1)
    broken.write_text(service_yaml("fixed"))
    wait_for_state(recorder, {"Service": ["fixed", "web", "db"], "EndpointSlice": ["web-1"],
                              "Node": ["node-a"]})
    assert source.status.last_error is None


def test_stop_is_prompt(manifests: Path, recorder: Recorder,
                        start_source: Callable[..., FilesSource]) -> None:
    """stop() does not wait for the next poll."""
    source = start_source(manifests, poll_interval=30.0)
    round_of_snapshots(recorder, 1)
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1.0
