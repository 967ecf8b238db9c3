"""ApiSource against the fake API server, through the real ``kubernetes`` client over HTTP.

Conventions: the agent runs on node ``node-a``; ``node-b`` is another node it must not see.
Backoff and timeouts are small so outages resolve in milliseconds; waits have deadlines.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from apiserver import FakeApiServer, RecordedRequest, manifest

from iptsync.core.model import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    object_key,
    parse_object,
)
from iptsync.sources.api import (
    ApiConfigError,
    ApiSettings,
    ApiSource,
    in_cluster_configuration,
    keepalive_socket_options,
)
from iptsync.sources.base import KINDS, Kind, Snapshot

from .conftest import Recorder, names, wait_until

NODE = "node-a"
SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
NODES = "/api/v1/nodes"
FAST = ApiSettings(backoff_initial=0.01, backoff_max=0.05, request_timeout=5.0,
                   min_watch_timeout=60)


def service(name: str, namespace: str = "default", cluster_ip: str = "10.96.0.10") -> Any:
    """A ClusterIP Service with one TCP port."""
    return manifest("Service", name, namespace,
                    spec={"type": "ClusterIP", "clusterIP": cluster_ip,
                          "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})


def endpoint_slice(name: str, service_name: str, address: str) -> Any:
    """An IPv4 EndpointSlice of ``service_name`` with one ready endpoint."""
    return manifest("EndpointSlice", name, "default",
                    metadata={"labels": {"kubernetes.io/service-name": service_name}},
                    addressType="IPv4",
                    endpoints=[{"addresses": [address], "conditions": {"ready": True}}],
                    ports=[{"name": "http", "port": 8080, "protocol": "TCP"}])


def node(name: str, address: str = "192.168.0.10") -> Any:
    """A Node with one InternalIP."""
    return manifest("Node", name, status={"addresses": [{"type": "InternalIP",
                                                          "address": address}]})


def requests_to(server: FakeApiServer, path: str, *, watch: bool) -> list[RecordedRequest]:
    """The logged LIST (``watch=False``) or WATCH requests of one collection."""
    return [r for r in server.requests if r.path == path and r.is_watch == watch]


def is_watch_of(path: str, request: RecordedRequest) -> bool:
    """Whether ``request`` is a WATCH of the collection at ``path``."""
    return request.path == path and request.is_watch


def synced(recorder: Recorder) -> dict[Kind, Snapshot]:
    """Wait for the first Snapshot of every kind; returns them by kind."""
    recorder.wait_for(lambda r: all(r.snapshots(kind) for kind in KINDS))
    return {kind: recorder.snapshots(kind)[0] for kind in KINDS}


@pytest.fixture
def start_source(apiserver: FakeApiServer,
                 recorder: Recorder) -> Iterator[Callable[..., ApiSource]]:
    """Start an ApiSource for ``node-a`` feeding ``recorder``; stopped afterwards."""
    started: list[tuple[ApiSource, kubernetes.client.ApiClient]] = []

    def start(**options: Any) -> ApiSource:
        settings = replace(FAST, **options)
        configuration = apiserver.client_configuration()
        # As ApiSource configures the clients it builds.
        configuration.retries = 0
        configuration.socket_options = keepalive_socket_options(settings)
        client = kubernetes.client.ApiClient(configuration)
        source = ApiSource(NODE, api_client=client, settings=settings)
        started.append((source, client))
        source.start(recorder)
        return source

    yield start
    for source, client in started:
        source.stop()
        client.close()  # type: ignore[no-untyped-call]


def test_initial_snapshots(apiserver: FakeApiServer, recorder: Recorder,
                           start_source: Callable[..., ApiSource]) -> None:
    """The first Snapshots hold every Service and EndpointSlice but only this node's Node."""
    apiserver.create(service("web"))
    apiserver.create(service("db", "shop", cluster_ip="10.96.0.11"))
    apiserver.create(endpoint_slice("web-1", "web", "10.0.0.1"))
    apiserver.create(node(NODE))
    apiserver.create(node("node-b", "192.168.0.11"))
    source = start_source()
    snapshots = synced(recorder)
    assert {"Service": [("default", "web"), ("shop", "db")],
            "EndpointSlice": [("default", "web-1")],
            "Node": [("", NODE)]} \
        == {kind: [object_key(obj) for obj in s.objects] for kind, s in snapshots.items()}
    assert {apiserver.resource_version} == {s.resource_version for s in snapshots.values()}
    wait_until(lambda: source.status.connected, "connected")


def test_list_items_get_kind_and_api_version(apiserver: FakeApiServer, recorder: Recorder,
                                            start_source: Callable[..., ApiSource]) -> None:
    """LIST items (which lack kind/apiVersion) are sent with both, so the model parses them."""
    apiserver.create(service("web"))
    apiserver.create(endpoint_slice("web-1", "web", "10.0.0.1"))
    apiserver.create(node(NODE))
    start_source()
    objects = [obj for s in synced(recorder).values() for obj in s.objects]
    assert [("Service", "v1"), ("EndpointSlice", "discovery.k8s.io/v1"), ("Node", "v1")] \
        == [(obj["kind"], obj["apiVersion"]) for obj in objects]
    assert [True, True, True] == [parse_object(obj).value is not None for obj in objects]


def test_list_then_watch_requests(apiserver: FakeApiServer, recorder: Recorder,
                                  start_source: Callable[..., ApiSource]) -> None:
    """Each kind is listed in pages, then watched from the list's RV with bookmarks allowed."""
    apiserver.create(node(NODE))
    start_source()
    rv = synced(recorder)["Node"].resource_version
    apiserver.wait_for_watches(3)
    assert [{"fieldSelector": f"metadata.name={NODE}", "limit": "500"}] \
        == [r.query for r in requests_to(apiserver, NODES, watch=False)]
    assert [{"fieldSelector": f"metadata.name={NODE}", "watch": "true", "resourceVersion": rv,
             "allowWatchBookmarks": "true"}] \
        == [without_timeout(r.query) for r in requests_to(apiserver, NODES, watch=True)]
    assert [{"labelSelector": "!service.kubernetes.io/headless,"
                               "!service.kubernetes.io/service-proxy-name",
             "watch": "true", "resourceVersion": rv, "allowWatchBookmarks": "true"}] \
        == [without_timeout(r.query) for r in requests_to(apiserver, SERVICES, watch=True)]


def without_timeout(query: Mapping[str, str]) -> dict[str, str]:
    """A request's query without ``timeoutSeconds`` (random; checked on its own)."""
    return {key: value for key, value in query.items() if key != "timeoutSeconds"}


def test_watch_timeouts_are_randomised_like_client_go(
        apiserver: FakeApiServer, recorder: Recorder,
        start_source: Callable[..., ApiSource]) -> None:
    """Every watch asks for a timeoutSeconds drawn from [min, 2 x min), not one fixed value."""
    start_source(min_watch_timeout=60)
    synced(recorder)
    for rounds in range(2, 6):
        apiserver.wait_for_watches(3)
        apiserver.close_watches()
        wait_until(lambda n=rounds: len([r for r in apiserver.requests if r.is_watch]) >= 3 * n,
                   f"watch round {rounds}")
    timeouts = [int(r.query["timeoutSeconds"]) for r in apiserver.requests if r.is_watch]
    assert (True, True) == (all(60 <= t < 120 for t in timeouts), len(set(timeouts)) > 1)


def test_list_is_paginated(apiserver: FakeApiServer, recorder: Recorder,
                           start_source: Callable[..., ApiSource]) -> None:
    """With more objects than a page, the LIST follows continue tokens and sends them all."""
    for index in range(5):
        apiserver.create(service(f"svc-{index}"))
    start_source(page_size=2)
    snapshot = synced(recorder)["Service"]
    assert [f"svc-{index}" for index in range(5)] == names(snapshot)
    pages = requests_to(apiserver, SERVICES, watch=False)
    assert [("2", False), ("2", True), ("2", True)] \
        == [(r.query["limit"], "continue" in r.query) for r in pages]


def test_watch_events_become_changes(apiserver: FakeApiServer, recorder: Recorder,
                                     start_source: Callable[..., ApiSource]) -> None:
    """ADDED and MODIFIED arrive as upsert Changes, DELETED as delete, with kind and RV."""
    source = start_source()
    synced(recorder)
    apiserver.wait_for_watches(3)
    created = apiserver.create(service("web"))
    modified = apiserver.update({**created, "spec": {**created["spec"], "clusterIP": "10.96.0.12"}})
    deleted = apiserver.delete("Service", "default", "web")
    apiserver.create(endpoint_slice("web-1", "web", "10.0.0.1"))
    recorder.wait_for(lambda r: len(r.changes("Service")) == 3
                      and len(r.changes("EndpointSlice")) == 1)
    assert [("upsert", created), ("upsert", modified), ("delete", deleted)] \
        == [(c.action, c.obj) for c in recorder.changes("Service")]
    assert [c.obj["metadata"]["resourceVersion"] for c in recorder.changes("Service")] \
        == [c.resource_version for c in recorder.changes("Service")]
    assert [("upsert", "EndpointSlice", "web-1")] \
        == [(c.action, c.obj["kind"], c.obj["metadata"]["name"])
            for c in recorder.changes("EndpointSlice")]
    assert {"Service": 3, "EndpointSlice": 1} == source.status.events


def test_only_this_node_is_watched(apiserver: FakeApiServer, recorder: Recorder,
                                   start_source: Callable[..., ApiSource]) -> None:
    """Changes to other Nodes are not sent; changes to this node are."""
    start_source()
    synced(recorder)
    apiserver.wait_for_watches(3)
    apiserver.create(node("node-b"))
    apiserver.create(node(NODE))
    recorder.wait_for(lambda r: bool(r.changes("Node")))
    apiserver.close_watches()  # flushes anything still queued for node-b, then ends the streams
    apiserver.wait_for_request(lambda r: is_watch_of(NODES, r)
                               and r.query["resourceVersion"] == apiserver.resource_version)
    assert [NODE] == [c.obj["metadata"]["name"] for c in recorder.changes("Node")]


def test_bookmark_advances_resume_point(apiserver: FakeApiServer, recorder: Recorder,
                                        start_source: Callable[..., ApiSource]) -> None:
    """After a BOOKMARK, the next watch resumes from the bookmark's RV, not the list's."""
    start_source()
    list_rv = synced(recorder)["Service"].resource_version
    apiserver.wait_for_watches(3)
    apiserver.create(node("node-b"))  # moves the global RV; no watched object changes
    apiserver.bookmark()
    apiserver.clear_requests()
    apiserver.close_watches()  # the bookmark, already queued, is delivered first
    rewatch = apiserver.wait_for_request(partial(is_watch_of, SERVICES))
    assert (apiserver.resource_version, True) \
        == (rewatch.query["resourceVersion"], int(list_rv) < int(apiserver.resource_version))


def test_server_closed_watch_rewatches_without_relist(
        apiserver: FakeApiServer, recorder: Recorder,
        start_source: Callable[..., ApiSource]) -> None:
    """A watch the server ends is resumed from the last RV: no LIST, no new Snapshot."""
    source = start_source()
    rv = synced(recorder)["Service"].resource_version
    apiserver.wait_for_watches(3)
    apiserver.clear_requests()
    apiserver.close_watches()
    for path in (SERVICES, SLICES, NODES):
        apiserver.wait_for_request(partial(is_watch_of, path))
    apiserver.create(service("late"))
    recorder.wait_for(lambda r: bool(r.changes("Service")))
    assert [rv, rv, rv] == [r.query["resourceVersion"] for r in apiserver.requests]
    assert (3, 0) == (sum(len(recorder.snapshots(kind)) for kind in KINDS),
                      source.status.relists)


def test_expired_watch_relists(apiserver: FakeApiServer, recorder: Recorder,
                               start_source: Callable[..., ApiSource]) -> None:
    """A watch from a compacted RV (410 ERROR event) relists: the Snapshot drops what went."""
    apiserver.create(service("kept"))
    apiserver.create(service("gone"))
    source = start_source()
    assert ["gone", "kept"] == names(synced(recorder)["Service"])
    apiserver.wait_for_watches(3)
    apiserver.stop()
    apiserver.delete("Service", "default", "gone")
    apiserver.compact()
    apiserver.clear_requests()
    apiserver.start()
    assert ["kept"] == names(recorder.wait_for_snapshots("Service", 2))
    wait_until(lambda: source.status.relists == 3, "one relist per kind")
    assert [] == recorder.changes("Service")
    assert [True, False] == [r.is_watch for r in apiserver.requests if r.path == SERVICES][:2]
    assert apiserver.resource_version == recorder.latest("Service").resource_version


def test_expired_continue_token_restarts_list(apiserver: FakeApiServer, recorder: Recorder,
                                              start_source: Callable[..., ApiSource]) -> None:
    """A continue token expired mid-list (HTTP 410) restarts the LIST; one Snapshot results."""
    apiserver.create(service("a"))
    apiserver.create(service("b"))
    apiserver.latency = 0.2  # room to compact between the first and the second page
    start_source(page_size=1)
    apiserver.wait_for_request(lambda r: r.path == SERVICES and not r.is_watch)
    apiserver.create(service("late"))
    apiserver.compact()
    apiserver.wait_for_request(lambda r: r.status == 410)
    apiserver.latency = 0.0
    assert ["a", "b", "late"] == names(recorder.wait_for_snapshots("Service", 1))
    assert [200, 410, 200, 200, 200] \
        == [r.status for r in requests_to(apiserver, SERVICES, watch=False)]
    assert 1 == len(recorder.snapshots("Service"))


def test_silent_watch_is_declared_dead_and_relisted(
        apiserver: FakeApiServer, recorder: Recorder, start_source: Callable[..., ApiSource],
        caplog: pytest.LogCaptureFixture) -> None:
    """Watches kept alive by bookmarks stay up; once nothing arrives (no event, no bookmark)
    for bookmark_interval + request_timeout, a WARNING names the kind and its silence, the
    kind is listed again (with what changed meanwhile) and an INFO line says so."""
    caplog.set_level(logging.INFO, logger="iptsync.sources.api")
    apiserver.bookmark_interval = 0.1
    source = start_source(bookmark_interval=0.1, request_timeout=0.5)
    synced(recorder)
    time.sleep(1.5)  # 15 bookmarks: the short read timeout is armed, and never fires
    assert (0, []) == (source.status.relists, warnings(caplog))
    apiserver.stalled = True
    started = time.monotonic()
    apiserver.create(service("during"))
    snapshot = recorder.wait_for_snapshots("Service", 2)  # LISTs still answer
    declared_after = time.monotonic() - started
    apiserver.stalled = False
    assert ["during"] == names(snapshot)
    dead = next(m for m in warnings(caplog) if m.startswith("watch of Service declared dead"))
    silence = float(dead.split(" for ")[1].split(" s ")[0])
    assert (True, True, True) == (0.5 <= silence < 2.0, declared_after < 2.0,
                                  "(read timeout: no event or bookmark in time)" in dead), dead
    assert ["Service objects listed again (1) after a dead watch"] \
        == [m.split(",")[0] for m in infos(caplog) if m.startswith("Service objects")][:1]


def test_short_read_timeout_waits_for_a_first_bookmark(
        apiserver: FakeApiServer, recorder: Recorder,
        start_source: Callable[..., ApiSource]) -> None:
    """A server that sends no bookmarks is not declared dead every bookmark interval; the
    silence per kind still grows for the staleness metric."""
    source = start_source(bookmark_interval=0.1, request_timeout=0.5)
    synced(recorder)
    apiserver.wait_for_watches(3)
    time.sleep(1.5)
    silence = source.status.silence(time.monotonic())
    assert (0, 3) == (source.status.relists, apiserver.active_watches)
    assert dict.fromkeys(KINDS, True) == {kind: s >= 1.0 for kind, s in silence.items()}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The source's WARNING messages so far."""
    return [r.getMessage() for r in caplog.records
            if r.name == "iptsync.sources.api" and r.levelno == logging.WARNING]


def infos(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The source's INFO messages so far."""
    return [r.getMessage() for r in caplog.records
            if r.name == "iptsync.sources.api" and r.levelno == logging.INFO]


def test_api_down_then_back(apiserver: FakeApiServer, recorder: Recorder,
                            start_source: Callable[..., ApiSource],
                            caplog: pytest.LogCaptureFixture) -> None:
    """While the API is down nothing is sent and connected is False; then it catches up."""
    caplog.set_level(logging.INFO, logger="iptsync.sources.api")
    source = start_source()
    synced(recorder)
    apiserver.wait_for_watches(3)
    wait_until(lambda: source.status.connected, "connected")
    sent = recorder.messages
    apiserver.stop()
    wait_until(lambda: "Connection refused" in str(source.status.last_error), "refused")
    assert not source.status.connected
    time.sleep(0.2)  # several retries at this backoff, all refused
    assert sent == recorder.messages
    apiserver.create(service("while-down"))
    apiserver.start()
    recorder.wait_for(lambda r: bool(r.changes("Service")))
    wait_until(lambda: source.status.connected, "reconnected")
    assert ("while-down", 0, None) == (recorder.changes("Service")[0].obj["metadata"]["name"],
                                       source.status.relists, source.status.last_error)
    assert [logging.WARNING, logging.INFO] == [
        r.levelno for r in caplog.records if r.name == "iptsync.sources.api"
        and (r.levelno >= logging.WARNING or r.getMessage() == "Kubernetes API reachable again")]
    assert [] == [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]


def test_unreachable_at_start(apiserver: FakeApiServer, recorder: Recorder,
                              start_source: Callable[..., ApiSource]) -> None:
    """A source started while the API is down sends nothing until it can list."""
    apiserver.create(service("web"))
    apiserver.stop()
    source = start_source()
    wait_until(lambda: source.status.last_error is not None, "a failed list")
    assert ([], False) == (recorder.messages, source.status.connected)
    apiserver.start()
    assert ["web"] == names(synced(recorder)["Service"])
    wait_until(lambda: source.status.connected, "connected")
    assert 0 == source.status.relists


def test_stop_ends_idle_watches_promptly(apiserver: FakeApiServer, recorder: Recorder,
                                         start_source: Callable[..., ApiSource]) -> None:
    """stop() ends threads blocked on idle watches well within two seconds."""
    source = start_source(min_watch_timeout=300, request_timeout=60.0)
    synced(recorder)
    apiserver.wait_for_watches(3)
    started = time.monotonic()
    source.stop()
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert [] == [t.name for t in threading.enumerate() if t.name.startswith("iptsync-watch")]
    apiserver.wait_for_watches(0)


def test_stop_during_backoff_is_prompt(apiserver: FakeApiServer,
                                       start_source: Callable[..., ApiSource]) -> None:
    """stop() does not wait out a long backoff while the API is down."""
    apiserver.stop()
    source = start_source(backoff_initial=5.0, backoff_max=30.0)
    wait_until(lambda: source.status.last_error is not None, "a failed list")
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1.0


def test_kubeconfig_with_token(recorder: Recorder, tmp_path: Path) -> None:
    """Built from a kubeconfig, the source authenticates with its token (the fake checks)."""
    with FakeApiServer(bookmark_interval=None, token="s3cret") as server:
        server.create(node(NODE))
        source = ApiSource(NODE, kubeconfig=server.write_kubeconfig(tmp_path / "kubeconfig"),
                           settings=FAST)
        source.start(recorder)
        try:
            assert [NODE] == names(synced(recorder)["Node"])
        finally:
            source.stop()
        assert ([], {200}) == (server.handler_errors, {r.status for r in server.requests})


def test_unusable_kubeconfig(tmp_path: Path) -> None:
    """A kubeconfig that cannot be loaded raises ApiConfigError naming it, at construction."""
    missing = tmp_path / "missing"
    with pytest.raises(ApiConfigError, match=f"cannot use kubeconfig {missing}: "):
        ApiSource(NODE, kubeconfig=missing)


def labelled(obj: Any, **labels: str) -> Any:
    """``obj`` with more labels."""
    obj["metadata"].setdefault("labels", {}).update(labels)
    return obj


def test_objects_for_other_proxies_are_not_listed_and_gaining_the_label_deletes(
        apiserver: FakeApiServer, recorder: Recorder,
        start_source: Callable[..., ApiSource]) -> None:
    """Services and EndpointSlices are listed and watched with kube-proxy's label selector:
    a Service labelled service-proxy-name and a headless Service's slices never arrive, and a
    Service that gains the label arrives as deleted."""
    apiserver.create(service("web"))
    apiserver.create(endpoint_slice("web-1", "web", "10.0.0.1"))
    apiserver.create(labelled(service("mesh", cluster_ip="10.96.0.11"),
                              **{SERVICE_PROXY_NAME_LABEL: "other-proxy"}))
    apiserver.create(labelled(endpoint_slice("mesh-1", "mesh", "10.0.0.2"),
                              **{SERVICE_PROXY_NAME_LABEL: "other-proxy"}))
    apiserver.create(labelled(endpoint_slice("db-1", "db", "10.0.0.3"),
                              **{HEADLESS_LABEL: ""}))
    apiserver.create(node(NODE))
    start_source()
    snapshots = synced(recorder)
    assert (["web"], ["web-1"]) == (names(snapshots["Service"]), names(snapshots["EndpointSlice"]))
    selector = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
    assert {selector} == {r.query.get("labelSelector") for r in apiserver.requests
                          if r.path in (SERVICES, SLICES)}
    apiserver.wait_for_watches(3)
    apiserver.update(labelled(service("web"), **{SERVICE_PROXY_NAME_LABEL: "other-proxy"}))
    recorder.wait_for(lambda r: bool(r.changes("Service")))
    assert [("delete", "web")] == [(c.action, c.obj["metadata"]["name"])
                                   for c in recorder.changes("Service")]


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), valid a day."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_in_cluster_token_ending_in_a_newline_is_trimmed(tmp_path: Path,
                                                       recorder: Recorder) -> None:
    """The service account's token file, ending in a newline as many tools write it, is
    sent trimmed (as client-go does) to the https address the pod's environment names."""
    cert, key = self_signed(tmp_path)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("s3cret-token\n")
    (account / "ca.crt").write_bytes(cert.read_bytes())
    with FakeApiServer(bookmark_interval=None, token="s3cret-token", tls=(cert, key)) as server:
        server.create(node(NODE))
        configuration = in_cluster_configuration(
            {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
             "KUBERNETES_SERVICE_PORT": str(server.port)}, account)
        configuration.retries = 0
        client = kubernetes.client.ApiClient(configuration)
        source = ApiSource(NODE, api_client=client, settings=FAST)
        source.start(recorder)
        try:
            assert [NODE] == names(synced(recorder)["Node"])
        finally:
            source.stop()
            client.close()  # type: ignore[no-untyped-call]
        assert ([], {200}) == (server.handler_errors, {r.status for r in server.requests})


def test_in_cluster_configuration_outside_a_pod(tmp_path: Path) -> None:
    """Without the pod's environment or service account, the error says what is missing."""
    with pytest.raises(ApiConfigError, match="KUBERNETES_SERVICE_HOST and "
                                             "KUBERNETES_SERVICE_PORT are not set"):
        in_cluster_configuration({}, tmp_path)
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ApiConfigError, match=f"{tmp_path / 'ca.crt'} is missing"):
        in_cluster_configuration(environ, tmp_path)
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ApiConfigError, match=f"the service account token {tmp_path / 'token'} "
                                             "is empty"):
        in_cluster_configuration(environ, tmp_path)
