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
from iptsync.sources.files import FilesSource, load_objects

from .conftest import Recorder, names, wait_until

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


BROKEN = "kind: Service\nmetadata: [unclosed\n"  # error at 3:1, the list opened at 2:11


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_broken_file_at_start_sends_nothing_until_fixed(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """A file that does not parse at start: warning with file:line:column, nothing sent (the
    agent leaves the kernel alone) until it is fixed; then everything arrives."""
    broken = manifests / "broken.yaml"
    broken.write_text(BROKEN)
    source = start_source(manifests)
    wait_until(lambda: source.status.read_errors == 1, "the error to be counted")
    time.sleep(5 * POLL)
    assert [] == recorder.messages
    assert [f"{broken}:3:1: cannot parse YAML: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence started at line 2, column 11); no object from "
            "it is used", "not syncing until every --objects path loads without errors; the "
            "rules in place are left as they are"] == warnings_logged(caplog)
    assert (False, True) == (source.status.connected, str(broken) in str(source.status.last_error))
    broken.write_text(service_yaml("fixed"))
    wait_for_state(recorder, {"Service": ["fixed", "web", "db"], "EndpointSlice": ["web-1"],
                              "Node": ["node-a"]})
    assert (True, None) == (source.status.connected, source.status.last_error)


def break_and_wait(path: Path, text: str, source: FilesSource, recorder: Recorder,
                   errors: int) -> dict[Kind, list[str]]:
    """Write ``text`` to ``path``, wait for the ``errors``-th error and the Snapshots sent after
    it; returns their names."""
    rounds = len(recorder.snapshots("Node"))
    path.write_text(text)
    wait_until(lambda: source.status.read_errors == errors, "the error to be counted")
    round_of_snapshots(recorder, rounds + 1)
    state = latest_state(recorder)
    assert state is not None
    return state


def test_file_broken_later_keeps_its_objects_until_fixed(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """A file that stops parsing keeps the objects it last yielded, with a warning naming the
    line and column; once fixed, an INFO and its new objects."""
    caplog.set_level(logging.INFO)
    services = manifests / "services.yaml"
    source = start_source(manifests)
    round_of_snapshots(recorder, 1)
    state = break_and_wait(services, service_yaml("web", "db") + "spec: [\n", source, recorder, 1)
    assert {"Service": ["web", "db"], "EndpointSlice": ["web-1"], "Node": ["node-a"]} == state
    assert [f"{services}:11:1: cannot parse YAML: expected the node content, but found "
            "'<stream end>' (while parsing a flow node started at line 11, column 1); keeping "
            "the objects last loaded from it (2)"] == warnings_logged(caplog)
    assert False is source.status.connected
    services.write_text(service_yaml("web"))
    wait_for_state(recorder, {"Service": ["web"], "EndpointSlice": ["web-1"], "Node": ["node-a"]})
    assert [f"{services}: loads again; using the objects it holds now (1)"] == [
        r.getMessage() for r in caplog.records if "loads again" in r.getMessage()]
    assert (True, 1) == (source.status.connected, source.status.read_errors)


def test_other_files_still_update_while_one_is_broken(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource]) -> None:
    """While one file is broken, edits to the others are sent, with the broken one's last
    objects."""
    source = start_source(manifests)
    round_of_snapshots(recorder, 1)
    break_and_wait(manifests / "services.yaml", BROKEN, source, recorder, 1)
    (manifests / "node.yaml").write_text(NODE.replace("node-a", "node-bb"))
    wait_for_state(recorder, {"Service": ["web", "db"], "EndpointSlice": ["web-1"],
                              "Node": ["node-bb"]})


def test_broken_json_is_reported_with_line_and_column(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """A JSON syntax error names the file, line and column, and keeps the file's objects."""
    slices = manifests / "slices.json"
    source = start_source(manifests)
    round_of_snapshots(recorder, 1)
    state = break_and_wait(slices, '{"kind": "List",\n  "items" []}', source, recorder, 1)
    assert ["web-1"] == state["EndpointSlice"]
    assert [f"{slices}:2:11: cannot parse JSON: Expecting ':' delimiter; keeping the "
            "objects last loaded from it (1)"] == warnings_logged(caplog)


def test_removed_directory_keeps_everything(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """A directory given that disappears (renamed, unmounted) keeps all it yielded, with a
    warning; back in place, its objects are read again."""
    source = start_source(manifests)
    round_of_snapshots(recorder, 1)
    moved = manifests.with_name("moved")
    manifests.rename(moved)
    wait_until(lambda: source.status.read_errors == 1, "the error to be counted")
    round_of_snapshots(recorder, 2)
    assert {"Service": ["web", "db"], "EndpointSlice": ["web-1"], "Node": ["node-a"]} \
        == latest_state(recorder)
    assert [f"{manifests}: cannot read: No such file or directory; keeping the objects last "
            "loaded from it (4)"] == warnings_logged(caplog)
    moved.rename(manifests)
    (manifests / "node.yaml").unlink()
    wait_for_state(recorder, {"Service": ["web", "db"], "EndpointSlice": ["web-1"], "Node": []})


def test_emptied_directory_keeps_everything(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """A directory given whose files are all removed is an error, not "no Services": its
    last objects stay, with a warning."""
    source = start_source(manifests)
    round_of_snapshots(recorder, 1)
    for path in manifests.iterdir():
        path.unlink()
    wait_until(lambda: source.status.read_errors == 1, "the error to be counted")
    round_of_snapshots(recorder, 2)
    assert {"Service": ["web", "db"], "EndpointSlice": ["web-1"], "Node": ["node-a"]} \
        == latest_state(recorder)
    assert [f"{manifests}: holds no .yaml, .yml or .json file; keeping the objects last "
            "loaded from it (4)"] == warnings_logged(caplog)


def test_files_left_out_are_named_once(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """Files without a manifest suffix are named in one warning, not again on each reload;
    hidden files are left out without one."""
    (manifests / "README.md").write_text("notes\n")
    (manifests / "svc.ymal").write_text(service_yaml("typo"))
    (manifests / ".hidden.yaml").write_text(service_yaml("hidden"))
    start_source(manifests)
    round_of_snapshots(recorder, 1)
    (manifests / "services.yaml").write_text(service_yaml("web"))
    wait_for_state(recorder, {"Service": ["web"], "EndpointSlice": ["web-1"], "Node": ["node-a"]})
    assert [f"{manifests}: ignoring files without a .yaml, .yml or .json suffix: README.md, "
            "svc.ymal"] == warnings_logged(caplog)


def test_duplicate_object_last_definition_wins(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """The same Service in two files: a warning with both places; the later file's wins."""
    (manifests / "zz-override.yaml").write_text(service_yaml("db").replace("80", "81"))
    start_source(manifests)
    services = round_of_snapshots(recorder, 1)["Service"]
    assert [("web", 80), ("db", 81)] == [(obj["metadata"]["name"], obj["spec"]["ports"][0]["port"])
                                         for obj in services.objects]
    assert [f"Service default/db: defined more than once: {manifests}/services.yaml:6, then "
            f"{manifests}/zz-override.yaml:1; the last definition "
            f"({manifests}/zz-override.yaml:1) is used"] == warnings_logged(caplog)


def test_stop_is_prompt(manifests: Path, recorder: Recorder,
                        start_source: Callable[..., FilesSource]) -> None:
    """stop() does not wait for the next poll."""
    source = start_source(manifests, poll_interval=30.0)
    round_of_snapshots(recorder, 1)
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1.0


def problems_of(*paths: Path) -> tuple[list[str], list[str]]:
    """``load_objects``' errors and other problems, as text."""
    loaded = load_objects(paths)
    return ([str(e) for e in loaded.errors],
            [str(p) for p in loaded.problems if p not in loaded.errors])


def test_load_errors_name_the_path_and_why(tmp_path: Path) -> None:
    """Every way input can be unusable is an error naming the path (and line and column)."""
    empty, no_objects, missing = tmp_path / "empty", tmp_path / "no-objects", tmp_path / "nope"
    empty.mkdir()
    no_objects.mkdir()
    (no_objects / "comments.yaml").write_text("# nothing yet\n")
    latin1, control = tmp_path / "latin1.yaml", tmp_path / "control.yaml"
    latin1.write_bytes(b"kind: Service # caf\xe9\n")
    control.write_text("kind: Service\nmetadata: {name: \x07}\n")
    assert ([f"{empty}: holds no .yaml, .yml or .json file"], []) == problems_of(empty)
    assert ([f"{no_objects}: yields no Kubernetes object"], []) == problems_of(no_objects)
    assert ([f"{missing}: cannot read: No such file or directory"], []) == problems_of(missing)
    assert ([f"{latin1}: cannot read: not UTF-8 text (invalid continuation byte at byte 19)"],
            []) == problems_of(latin1)
    assert ([f"{control}:2:18: cannot parse YAML: unacceptable character #x0007: special "
             "characters are not allowed"], []) == problems_of(control)


def test_a_service_without_namespace_is_the_same_object_as_in_default(tmp_path: Path) -> None:
    """No namespace means ``default``, as the agent keys it: the two are one object defined
    twice, the last definition wins and the duplicate is named."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(service_yaml("web").replace(", namespace: default", ""))
    second.write_text(service_yaml("web").replace("80", "82"))
    loaded = load_objects([tmp_path])
    assert ([82], [("Service", "default/web", f"defined more than once: {first}:1, then "
                    f"{second}:1; the last definition ({second}:1) is used")]) == (
        [o["spec"]["ports"][0]["port"] for o in loaded.objects],
        [(p.kind, p.ref, p.message) for p in loaded.problems])


def test_documents_that_are_not_objects_are_skipped_with_a_warning(tmp_path: Path) -> None:
    """A document or List item without a kind is named and skipped; the rest loads."""
    path = tmp_path / "mixed.yaml"
    path.write_text(service_yaml("web") + "---\n- a list\n---\nkind: List\nitems: [{}, "
                    "{kind: Service, metadata: {name: db}}]\n---\n")
    loaded = load_objects([path])
    assert [["web"], ["db"]] == [[o["metadata"]["name"]] for o in loaded.objects]
    assert ([], [f"{path}:6: not a Kubernetes object (a mapping with a kind); skipped",
                 f"{path}:8 items[0]: not a Kubernetes object (a mapping with a kind); skipped"]
            ) == problems_of(path)


def test_duplicates_across_paths_follow_the_command_line_order(tmp_path: Path) -> None:
    """Paths are read in the order given, files in path order: the last definition wins."""
    first, second = tmp_path / "b.yaml", tmp_path / "a.yaml"
    first.write_text(service_yaml("web").replace("80", "81"))
    second.write_text(service_yaml("web").replace("80", "82"))
    loaded = load_objects([first, second])
    assert [82] == [o["spec"]["ports"][0]["port"] for o in loaded.objects]
    assert [("Service", "default/web", "definition",
             f"defined more than once: {first}:1, then {second}:1; the last definition "
             f"({second}:1) is used")] == [(p.kind, p.ref, p.dropped, p.message)
                                           for p in loaded.problems]
    assert [81] == [o["spec"]["ports"][0]["port"] for o in load_objects([tmp_path]).objects]


def test_metadata_that_is_not_a_mapping_does_not_stop_the_source(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource]) -> None:
    """An object whose metadata is a string (``metadata: web``) is passed on for the model to
    reject by name; the source keeps polling: a later edit still arrives (it used to end the
    polling thread with an AttributeError, silently)."""
    start_source(manifests)
    round_of_snapshots(recorder, 1)
    (manifests / "typo.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: web\n")
    wait_for_state(recorder, {"Service": ["web", "db", ""], "EndpointSlice": ["web-1"],
                              "Node": ["node-a"]})
    (manifests / "node.yaml").write_text(NODE.replace("node-a", "node-bb"))
    wait_for_state(recorder, {"Service": ["web", "db", ""], "EndpointSlice": ["web-1"],
                              "Node": ["node-bb"]})


LABELLED_DB = ("apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default, "
               "labels: {service.kubernetes.io/service-proxy-name: other-proxy}}\n"
               "spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n")


def test_services_for_other_proxies_are_left_out_with_one_info_line(
        manifests: Path, recorder: Recorder, start_source: Callable[..., FilesSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """A Service that gains kube-proxy's service-proxy-name label leaves the Snapshots (its
    rules go), named once in an INFO line; a headless Service's slices are left out."""
    headless = json.loads(json.dumps(SLICES))
    headless["items"][0]["metadata"].update(
        name="db-1", labels={"kubernetes.io/service-name": "db",
                             "service.kubernetes.io/headless": ""})
    (manifests / "headless.json").write_text(json.dumps(headless))
    caplog.set_level(logging.INFO, "iptsync.sources.files")
    start_source(manifests)
    wait_for_state(recorder, {"Service": ["web", "db"], "EndpointSlice": ["web-1"],
                              "Node": ["node-a"]})
    (manifests / "services.yaml").write_text(service_yaml("web") + "---\n" + LABELLED_DB)
    wait_for_state(recorder, {"Service": ["web"], "EndpointSlice": ["web-1"],
                              "Node": ["node-a"]})
    (manifests / "node.yaml").write_text(NODE.replace("node-a", "node-bb"))
    wait_for_state(recorder, {"Service": ["web"], "EndpointSlice": ["web-1"],
                              "Node": ["node-bb"]})
    assert ["Service default/db: not programmed: labelled service.kubernetes.io/"
            "service-proxy-name=other-proxy (left to another proxy, as kube-proxy's label "
            "selector !service.kubernetes.io/headless,!service.kubernetes.io/"
            "service-proxy-name does)"] == [
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO
        and "not programmed" in r.getMessage()]
