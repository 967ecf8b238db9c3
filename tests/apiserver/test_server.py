"""The fake API server, exercised over real HTTP by the official ``kubernetes`` client.

These tests pin two things the node agent will rely on: that the fake speaks the list/watch
protocol the way kube-apiserver does (resourceVersion semantics, pagination, bookmarks, 410
Expired, timeouts, strict errors), and how the official client (``kubernetes`` 37) reacts to
it — ``Watch.stream`` yields BOOKMARK events as raw dicts and resumes from their
resourceVersion, retries a 410 once with the same resourceVersion before raising
``ApiException(status=410)``, and silently re-watches when the server closes a stream unless
``timeout_seconds`` was given.
"""

from __future__ import annotations

import contextlib
import json
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes.client
import kubernetes.config
import kubernetes.watch
import pytest
import urllib3
from kubernetes.client import (
    ApiException,
    CoreV1Api,
    DiscoveryV1Api,
    V1EndpointSliceList,
    V1NodeList,
    V1ServiceList,
)
from kubernetes.client.exceptions import NotFoundException, UnauthorizedException
from kubernetes.watch.watch import iter_resp_lines

from .server import FakeApiServer, decode_continue, encode_continue, manifest
from .status import JsonObj
from .store import INITIAL_EVENTS_END_ANNOTATION, ConflictError

WATCH_TIMEOUT = (5, 5)  # (connect, read) seconds: a broken test fails instead of hanging


# --- helpers ----------------------------------------------------------------------------------


def service(name: str, namespace: str = "default", labels: dict[str, str] | None = None,
            cluster_ip: str = "10.96.0.10") -> JsonObj:
    """A ClusterIP Service manifest."""
    return manifest("Service", name, namespace, metadata={"labels": labels or {}},
                    spec={"type": "ClusterIP", "clusterIP": cluster_ip,
                          "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})


def endpoint_slice(name: str, service_name: str, addresses: list[str],
                   namespace: str = "default") -> JsonObj:
    """An IPv4 EndpointSlice manifest owned by ``service_name``."""
    return manifest(
        "EndpointSlice", name, namespace,
        metadata={"labels": {"kubernetes.io/service-name": service_name}},
        addressType="IPv4",
        endpoints=[{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
    )


def node(name: str) -> JsonObj:
    """A Node manifest with one InternalIP."""
    return manifest("Node", name, status={"addresses": [{"type": "InternalIP",
                                                          "address": "192.168.0.10"}]})


class ClientWatch:
    """``kubernetes.watch.Watch``, unchanged, behind typed methods (the client's are untyped)."""

    def __init__(self) -> None:
        self.watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]

    def stream(self, func: Callable[..., Any], **kwargs: Any) -> Iterator[dict[str, Any]]:
        """``Watch.stream(func, **kwargs)``: events with ``type``, ``object``, ``raw_object``."""
        return cast(Iterator[dict[str, Any]],
                    self.watch.stream(func, **kwargs))  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        """``Watch.stop()``: end the stream after the current event."""
        self.watch.stop()  # type: ignore[no-untyped-call]

    @property
    def resource_version(self) -> str | None:
        """The resourceVersion the Watch would resume from."""
        return cast(str | None, self.watch.resource_version)


ListResult = V1ServiceList | V1EndpointSliceList | V1NodeList


def list_rv(result: ListResult) -> str:
    """``metadata.resourceVersion`` of a typed LIST result."""
    assert result.metadata is not None
    assert result.metadata.resource_version is not None
    return result.metadata.resource_version


def list_continue(result: ListResult) -> str | None:
    """``metadata.continue`` of a typed LIST result."""
    assert result.metadata is not None
    return result.metadata.var_continue


def remaining(result: ListResult) -> int | None:
    """``metadata.remainingItemCount`` of a typed LIST result."""
    assert result.metadata is not None
    return result.metadata.remaining_item_count


def status_of(error: ApiException) -> JsonObj:
    """The Status body of an ApiException."""
    assert error.body is not None
    return cast(JsonObj, json.loads(error.body))


def raw_service_watch(core: CoreV1Api, **kwargs: Any) -> urllib3.HTTPResponse:
    """A raw WATCH of all Services, as the agent will issue it (``_preload_content=False``)."""
    response = core.list_service_for_all_namespaces(
        watch=True, _preload_content=False, _request_timeout=WATCH_TIMEOUT, **kwargs)
    return cast(urllib3.HTTPResponse, response)


def events(response: urllib3.HTTPResponse) -> Iterator[JsonObj]:
    """The decoded newline-delimited events of a raw watch response."""
    for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
        if line:
            yield cast(JsonObj, json.loads(line))


@contextlib.contextmanager
def background(action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` in a thread during the block; re-raise its failure afterwards."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    thread.join(10)
    if failures:
        raise failures[0]


def names(items: list[Any]) -> list[str]:
    """``metadata.name`` of typed client objects."""
    return [item.metadata.name for item in items]


@pytest.fixture
def http(apiserver: FakeApiServer) -> Iterator[urllib3.PoolManager]:
    """A bare urllib3 pool for protocol-level requests the client cannot express."""
    pool = urllib3.PoolManager(retries=False)
    yield pool
    pool.clear()


def get_raw(http: urllib3.PoolManager, server: FakeApiServer, path: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, JsonObj]:
    """Status code and decoded JSON body of one request."""
    response = http.request(method, server.url + path, headers=headers)
    return response.status, cast(JsonObj, json.loads(response.data))


# --- LIST -------------------------------------------------------------------------------------


def test_list_services_typed(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """LIST of all Services returns every object, in namespace/name order, at the current RV."""
    apiserver.create(service("web", "b-ns"))
    apiserver.create(service("db", "a-ns"))
    result = core.list_service_for_all_namespaces()
    assert apiserver.resource_version == list_rv(result)
    assert ["db", "web"] == names(result.items)
    first: Any = result.items[0]  # typed fields are Optional; the asserts check them
    assert ("a-ns", "10.96.0.10") == (first.metadata.namespace, first.spec.cluster_ip)
    assert first.metadata.uid
    assert first.metadata.creation_timestamp is not None
    assert apiserver.get("Service", "a-ns", "db")["metadata"]["resourceVersion"] \
        == first.metadata.resource_version


def test_list_namespaced_services(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """A namespaced LIST only returns that namespace's Services."""
    apiserver.create(service("web", "one"))
    apiserver.create(service("web", "two"))
    result = core.list_namespaced_service("two")
    assert ["two"] == [cast(Any, s).metadata.namespace for s in result.items]


def test_list_endpoint_slices_typed(apiserver: FakeApiServer, discovery: DiscoveryV1Api) -> None:
    """EndpointSlices list through DiscoveryV1Api, filtered by the service-name label."""
    apiserver.create(endpoint_slice("web-abc", "web", ["10.0.0.1", "10.0.0.2"]))
    apiserver.create(endpoint_slice("db-xyz", "db", ["10.0.1.1"]))
    result = discovery.list_endpoint_slice_for_all_namespaces(
        label_selector="kubernetes.io/service-name=web")
    assert ["web-abc"] == names(result.items)
    web: Any = result.items[0]
    assert [["10.0.0.1"], ["10.0.0.2"]] == [e.addresses for e in web.endpoints]
    assert apiserver.resource_version == list_rv(result)


def test_list_node_by_field_selector(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """``list_node(field_selector=metadata.name=X)`` returns just that Node; read_node works."""
    apiserver.create(node("node-a"))
    apiserver.create(node("node-b"))
    assert ["node-b"] == names(core.list_node(field_selector="metadata.name=node-b").items)
    assert ["node-a"] == names(core.list_node(field_selector="metadata.name!=node-b").items)
    read: Any = core.read_node("node-a")
    assert "192.168.0.10" == read.status.addresses[0].address


def test_raw_list_json(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """A raw LIST is compact JSON; items carry no kind/apiVersion, like the real server."""
    created = apiserver.create(service("web"))
    response = cast(urllib3.HTTPResponse,
                    core.list_service_for_all_namespaces(_preload_content=False))
    body = json.loads(response.data)
    assert ("ServiceList", "v1") == (body["kind"], body["apiVersion"])
    assert {"resourceVersion": apiserver.resource_version} == body["metadata"]
    item = {k: v for k, v in created.items() if k not in ("kind", "apiVersion")}
    assert [item] == body["items"]
    assert "application/json" == response.headers["Content-Type"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", ["web"]),
        ("app==web", ["web"]),
        ("app!=web", ["db", "plain"]),
        ("app", ["db", "web"]),
        ("!app", ["plain"]),
        ("app in (web, db)", ["db", "web"]),
        ("app notin (web)", ["db", "plain"]),
        ("app=web,tier=front", ["web"]),
        ("app=db,tier=front", []),
        ("", ["db", "plain", "web"]),
    ],
)
def test_label_selectors(apiserver: FakeApiServer, core: CoreV1Api, selector: str,
                         expected: list[str]) -> None:
    """Equality, inequality, existence and set label selectors select like labels.Parse."""
    apiserver.create(service("web", labels={"app": "web", "tier": "front"}))
    apiserver.create(service("db", labels={"app": "db"}))
    apiserver.create(service("plain"))
    assert expected == names(core.list_service_for_all_namespaces(label_selector=selector).items)


def test_pagination_is_a_consistent_snapshot(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """limit/continue pages come from the first page's snapshot, whatever changes meanwhile."""
    for index in range(5):
        apiserver.create(service(f"svc-{index}"))
    first = core.list_service_for_all_namespaces(limit=2)
    assert ["svc-0", "svc-1"] == names(first.items)
    assert 3 == remaining(first)
    apiserver.delete("Service", "default", "svc-3")
    apiserver.create(service("svc-9"))
    second = core.list_service_for_all_namespaces(limit=2, _continue=list_continue(first))
    third = core.list_service_for_all_namespaces(limit=2, _continue=list_continue(second))
    assert (["svc-2", "svc-3"], ["svc-4"]) == (names(second.items), names(third.items))
    assert {list_rv(first)} == {list_rv(second), list_rv(third)}
    assert (None, None) == (list_continue(third), remaining(third))
    assert [{"limit": "2"}, {"limit": "2", "continue": list_continue(first)},
            {"limit": "2", "continue": list_continue(second)}] \
        == [dict(r.query) for r in apiserver.requests]


def test_continue_token_encodes_snapshot_rv(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """The continue token carries the list's resourceVersion and the next start key."""
    apiserver.create(service("a"))
    apiserver.create(service("b"))
    page = core.list_service_for_all_namespaces(limit=1)
    token = list_continue(page)
    assert token is not None
    assert (int(list_rv(page)), "default/a\x00") == decode_continue(token)


def test_continue_after_compaction_is_410_with_fresh_token(
        apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """A continue token older than the compaction is 410 Expired with an inconsistent token."""
    for name in ("a", "b", "c"):
        apiserver.create(service(name))
    page = core.list_service_for_all_namespaces(limit=1)
    apiserver.create(service("d"))
    apiserver.compact()
    with pytest.raises(ApiException) as caught:
        core.list_service_for_all_namespaces(limit=1, _continue=list_continue(page))
    body = status_of(caught.value)
    assert (410, "Expired") == (caught.value.status, body["reason"])
    assert body["message"].startswith("The provided continue parameter is too old")
    rest = core.list_service_for_all_namespaces(_continue=body["metadata"]["continue"])
    assert ["b", "c", "d"] == names(rest.items)
    assert apiserver.resource_version == list_rv(rest)


def test_list_exact_resource_version_serves_history(
        apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """resourceVersionMatch=Exact lists the past state; after compaction it is HTTP 410."""
    apiserver.create(service("old"))
    then = list_rv(core.list_service_for_all_namespaces())
    apiserver.delete("Service", "default", "old")
    apiserver.create(service("new"))
    past = core.list_service_for_all_namespaces(resource_version=then,
                                                resource_version_match="Exact")
    assert (["old"], then) == (names(past.items), list_rv(past))
    apiserver.compact()
    with pytest.raises(ApiException) as caught:
        core.list_service_for_all_namespaces(resource_version=then,
                                             resource_version_match="Exact")
    body = status_of(caught.value)
    assert (410, "Expired", "The resourceVersion for the provided list is too old.") \
        == (body["code"], body["reason"], body["message"])


def test_list_not_older_than_serves_current(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """A bare old resourceVersion (NotOlderThan) is served at the current state, even compacted."""
    apiserver.create(service("a"))
    then = apiserver.resource_version
    apiserver.create(service("b"))
    apiserver.compact()
    result = core.list_service_for_all_namespaces(resource_version=then)
    assert (["a", "b"], apiserver.resource_version) \
        == (names(result.items), list_rv(result))
    any_rv = core.list_service_for_all_namespaces(resource_version="0")
    assert apiserver.resource_version == list_rv(any_rv)


def test_list_future_resource_version_is_504(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """A LIST at a resourceVersion the store has not reached is 504 ResourceVersionTooLarge."""
    future = str(int(apiserver.resource_version) + 10)
    with pytest.raises(ApiException) as caught:
        core.list_service_for_all_namespaces(resource_version=future)
    body = status_of(caught.value)
    assert (504, "Timeout", "ResourceVersionTooLarge") \
        == (caught.value.status, body["reason"], body["details"]["causes"][0]["reason"])


def test_list_future_resource_version_waits_for_store() -> None:
    """Within too_large_rv_wait a LIST at a future RV waits until the store reaches it."""
    with FakeApiServer(too_large_rv_wait=5, bookmark_interval=None) as server, \
            server.api_client() as client:
        future = str(int(server.resource_version) + 1)

        def write_later() -> None:
            time.sleep(0.1)
            server.create(service("late"))

        with background(write_later):
            result = CoreV1Api(client).list_service_for_all_namespaces(resource_version=future)
        assert (["late"], future) == (names(result.items), list_rv(result))
        assert [] == server.handler_errors


# --- strict errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("resourceVersionMatch=Exact",
         "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless "
         "resourceVersion is provided"),
        ("resourceVersion=0&resourceVersionMatch=Exact",
         'resourceVersionMatch: Forbidden: resourceVersionMatch "exact" is forbidden for '
         'resourceVersion "0"'),
        ("resourceVersion=5&resourceVersionMatch=Newest",
         'resourceVersionMatch: Unsupported value: "Newest": supported values: "Exact", '
         '"NotOlderThan", ""'),
        ("sendInitialEvents=true",
         "sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list"),
        ("watch=true&resourceVersionMatch=NotOlderThan",
         "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless "
         "sendInitialEvents is provided"),
        ("watch=true&sendInitialEvents=true",
         "resourceVersionMatch: Forbidden: sendInitialEvents requires setting "
         "resourceVersionMatch to NotOlderThan"),
    ],
)
def test_invalid_list_options_are_422(apiserver: FakeApiServer, http: urllib3.PoolManager,
                                      query: str, detail: str) -> None:
    """Invalid resourceVersion/resourceVersionMatch/sendInitialEvents combinations are 422."""
    code, body = get_raw(http, apiserver, "/api/v1/services?" + query)
    assert (422, "Invalid") == (code, body["reason"])
    assert f'ListOptions.meta.k8s.io "" is invalid: {detail}' == body["message"]
    assert {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422} \
        == {k: body[k] for k in ("kind", "apiVersion", "status", "code")}


@pytest.mark.parametrize(
    ("query", "message_start"),
    [
        ("limit=ten", 'limit: strconv.ParseInt: parsing "ten"'),
        ("watch=1&timeoutSeconds=1.5", 'timeoutSeconds: strconv.ParseInt: parsing "1.5"'),
        ("resourceVersion=abc", 'resourceVersion: Invalid value: "abc"'),
        ("watch=true&resourceVersion=-1", 'resourceVersion: Invalid value: "-1"'),
        ("labelSelector=a%20b", "unable to parse requirement"),
        ("labelSelector=app%3D%3E", "unable to parse requirement"),
        ("fieldSelector=spec.selector%3Dx", "field label not supported: spec.selector"),
        ("fieldSelector=metadata.name", "invalid selector: 'metadata.name'"),
        ("continue=bm90LWpzb24", "invalid continue token"),
        (f"continue={encode_continue(1, 'a')}&resourceVersion=1",
         "specifying resource version is not allowed when using continue"),
    ],
)
def test_malformed_parameters_are_400(apiserver: FakeApiServer, http: urllib3.PoolManager,
                                      query: str, message_start: str) -> None:
    """Unparseable numbers, selectors, resourceVersions and continue tokens are 400 BadRequest."""
    code, body = get_raw(http, apiserver, "/api/v1/services?" + query)
    assert (400, "BadRequest") == (code, body["reason"])
    assert body["message"].startswith(message_start), body["message"]


def test_node_field_selector_rejects_namespace(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """Nodes are cluster-scoped: metadata.namespace is not a selectable field (400)."""
    with pytest.raises(ApiException) as caught:
        core.list_node(field_selector="metadata.namespace=default")
    assert (400, "field label not supported: metadata.namespace") \
        == (caught.value.status, status_of(caught.value)["message"])


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/pods",
        "/api/v1/services/web",  # Services are namespaced: no cluster-scoped named path
        "/api/v1/namespaces/default/nodes",
        "/api/v1/namespaces/default/services/web/status",
        "/apis/discovery.k8s.io/v1beta1/endpointslices",
        "/apis/discovery.k8s.io/v1/services",
        "/openapi/v2",
    ],
)
def test_unknown_paths_are_404(apiserver: FakeApiServer, http: urllib3.PoolManager,
                               path: str) -> None:
    """Paths the server does not serve are 404 with the generic NotFound Status."""
    assert (404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": "the server could not find the requested resource",
                  "reason": "NotFound", "details": {}, "code": 404}) \
        == get_raw(http, apiserver, path)


def test_missing_object_is_404_with_details(apiserver: FakeApiServer, core: CoreV1Api,
                                            discovery: DiscoveryV1Api) -> None:
    """GET of an absent object is 404 NotFound naming the resource and object."""
    with pytest.raises(NotFoundException) as caught:
        core.read_namespaced_service("web", "default")
    body = status_of(caught.value)
    assert ('services "web" not found', {"name": "web", "kind": "services"}) \
        == (body["message"], body["details"])
    with pytest.raises(NotFoundException) as slice_caught:
        discovery.read_namespaced_endpoint_slice("web-1", "default")
    assert 'endpointslices.discovery.k8s.io "web-1" not found' \
        == status_of(slice_caught.value)["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/namespaces/default/services"),
        ("PUT", "/api/v1/namespaces/default/services/web"),
        ("PATCH", "/api/v1/nodes/node-a"),
        ("DELETE", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-1"),
        ("POST", "/api/v1/nodes"),
    ],
)
def test_unsupported_verbs_are_405(apiserver: FakeApiServer, http: urllib3.PoolManager,
                                   method: str, path: str) -> None:
    """Writes over HTTP are 405 MethodNotAllowed with a Status body (the fake is read-only)."""
    code, body = get_raw(http, apiserver, path, method=method)
    assert (405, "MethodNotAllowed") == (code, body["reason"])


def test_non_json_accept_is_406(apiserver: FakeApiServer, http: urllib3.PoolManager) -> None:
    """Asking only for protobuf or a Table is 406; a JSON fallback in Accept is fine."""
    protobuf = {"Accept": "application/vnd.kubernetes.protobuf"}
    table = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    fallback = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io, application/json"}
    assert 406 == get_raw(http, apiserver, "/api/v1/nodes", headers=protobuf)[0]
    assert 406 == get_raw(http, apiserver, "/api/v1/nodes", headers=table)[0]
    assert 200 == get_raw(http, apiserver, "/api/v1/nodes", headers=fallback)[0]


def test_request_log_records_status(apiserver: FakeApiServer, http: urllib3.PoolManager) -> None:
    """Every request is logged with method, path, decoded query and response status."""
    get_raw(http, apiserver, "/api/v1/nodes?labelSelector=a%3Db&limit=3")
    get_raw(http, apiserver, "/api/v1/nodes/gone")
    assert [("GET", "/api/v1/nodes", {"labelSelector": "a=b", "limit": "3"}, 200),
            ("GET", "/api/v1/nodes/gone", {}, 404)] \
        == [(r.method, r.path, dict(r.query), r.status) for r in apiserver.requests]
    apiserver.clear_requests()
    assert [] == apiserver.requests


# --- discovery, config ------------------------------------------------------------------------


def test_discovery_documents(apiserver: FakeApiServer,
                             api_client: kubernetes.client.ApiClient) -> None:
    """/version, /api, /apis and the group-version resource lists satisfy the client helpers."""
    assert "v1.34.0-iptsync-fake" == kubernetes.client.VersionApi(api_client).get_code().git_version
    assert ["v1"] == kubernetes.client.CoreApi(api_client).get_api_versions().versions
    groups = kubernetes.client.ApisApi(api_client).get_api_versions().groups
    assert ["discovery.k8s.io"] == [g.name for g in groups]
    core_resources = kubernetes.client.CoreV1Api(api_client).get_api_resources().resources
    assert {"nodes": False, "services": True} == {r.name: r.namespaced for r in core_resources}
    slices = kubernetes.client.DiscoveryV1Api(api_client).get_api_resources()
    assert ("discovery.k8s.io/v1", ["endpointslices"]) \
        == (slices.group_version, [r.name for r in slices.resources])
    group: Any = kubernetes.client.DiscoveryApi(api_client).get_api_group()
    assert "discovery.k8s.io/v1" == group.preferred_version.group_version


def test_kubeconfig_with_token(tmp_path: Path) -> None:
    """A written kubeconfig loads with load_kube_config and carries the bearer token (else 401)."""
    with FakeApiServer(token="s3cret", bookmark_interval=None) as server:
        server.create(node("node-a"))
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(server.write_kubeconfig(tmp_path / "kubeconfig")),
            client_configuration=config)
        assert server.url == config.host
        with kubernetes.client.ApiClient(config) as client:
            assert ["node-a"] == names(CoreV1Api(client).list_node().items)
        anonymous = kubernetes.client.Configuration(host=server.url)
        anonymous.proxy = None
        with kubernetes.client.ApiClient(anonymous) as client, \
                pytest.raises(UnauthorizedException):
            CoreV1Api(client).list_node()
        assert [200, 401] == [r.status for r in server.requests]
        assert [] == server.handler_errors


def test_healthz_is_plain_ok(apiserver: FakeApiServer, http: urllib3.PoolManager) -> None:
    """/healthz, /livez and /readyz answer a plain ``ok`` like the real server."""
    for path in ("/healthz", "/livez", "/readyz"):
        response = http.request("GET", apiserver.url + path)
        assert (200, b"ok") == (response.status, response.data)


# --- WATCH with the official Watch helper -----------------------------------------------------


def test_watch_stream_after_list(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """Watch.stream from the LIST's resourceVersion sees later ADDED/MODIFIED/DELETED only."""
    apiserver.create(service("before"))
    listed = core.list_service_for_all_namespaces()

    def changes() -> None:
        apiserver.wait_for_watches(1)
        apiserver.create(service("web"))
        apiserver.update(service("web", cluster_ip="10.96.0.99"))
        apiserver.delete("Service", "default", "web")

    seen: list[tuple[str, str, str]] = []
    watch = ClientWatch()
    with background(changes):
        for event in watch.stream(core.list_service_for_all_namespaces,
                                  resource_version=list_rv(listed),
                                  _request_timeout=WATCH_TIMEOUT):
            obj = event["object"]
            seen.append((event["type"], obj.metadata.name, obj.spec.cluster_ip))
            if len(seen) == 3:
                watch.stop()
    assert [("ADDED", "web", "10.96.0.10"), ("MODIFIED", "web", "10.96.0.99"),
            ("DELETED", "web", "10.96.0.99")] == seen
    assert apiserver.resource_version == watch.resource_version
    assert [list_rv(listed)] \
        == [r.query["resourceVersion"] for r in apiserver.requests if r.is_watch]


def test_watch_yields_bookmarks_and_resumes_from_them(
        apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """Watch.stream yields BOOKMARKs as raw dicts, adopts their RV and resumes from it."""
    start = apiserver.resource_version
    apiserver.create(node("unwatched"))  # advances the RV without a Service event
    bookmark_rv = apiserver.resource_version

    def server_side() -> None:
        apiserver.wait_for_watches(1)
        apiserver.bookmark()
        # The loop below ends the stream on the bookmark; wait for the client's re-watch.
        apiserver.wait_for_request(lambda r: r.is_watch
                                   and r.query["resourceVersion"] == bookmark_rv)
        apiserver.create(service("web"))

    seen: list[tuple[str, Any]] = []
    watch = ClientWatch()
    with background(server_side):
        for event in watch.stream(core.list_service_for_all_namespaces, resource_version=start,
                                  allow_watch_bookmarks=True, _request_timeout=WATCH_TIMEOUT):
            seen.append((event["type"], event["object"]))
            if event["type"] == "BOOKMARK":
                assert bookmark_rv == watch.resource_version
                apiserver.close_watches()
            else:
                watch.stop()
    bookmark = {"kind": "Service", "apiVersion": "v1",
                "metadata": {"resourceVersion": bookmark_rv}}
    assert [("BOOKMARK", bookmark), ("ADDED", "web")] \
        == [(kind, obj if kind == "BOOKMARK" else obj.metadata.name) for kind, obj in seen]
    assert [start, bookmark_rv] \
        == [r.query["resourceVersion"] for r in apiserver.requests if r.is_watch]


def test_watch_close_resumes_from_last_event(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """When the server ends a watch, Watch.stream re-watches from the last RV without a LIST."""
    start = list_rv(core.list_service_for_all_namespaces())
    resumed_rv = str(int(start) + 1)  # the RV of the one Service created below

    def server_side() -> None:
        apiserver.wait_for_watches(1)
        apiserver.create(service("a"))
        apiserver.wait_for_request(lambda r: r.is_watch
                                   and r.query["resourceVersion"] == resumed_rv)
        apiserver.create(service("b"))

    seen: list[str] = []
    watch = ClientWatch()
    with background(server_side):
        for event in watch.stream(core.list_service_for_all_namespaces, resource_version=start,
                                  _request_timeout=WATCH_TIMEOUT):
            seen.append(event["object"].metadata.name)
            if len(seen) == 1:
                apiserver.close_watches()
            else:
                watch.stop()
    assert ["a", "b"] == seen
    assert [(False, None), (True, start), (True, resumed_rv)] \
        == [(r.is_watch, r.query.get("resourceVersion")) for r in apiserver.requests]


def test_watch_410_client_retries_once_then_raises(
        apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """On a 410 ERROR event Watch.stream retries once with the same RV, then raises 410."""
    apiserver.create(service("a"))
    stale = list_rv(core.list_service_for_all_namespaces())
    apiserver.create(service("b"))
    floor = apiserver.compact()
    apiserver.clear_requests()
    with pytest.raises(ApiException) as caught:
        for _ in ClientWatch().stream(core.list_service_for_all_namespaces,
                                      resource_version=stale, _request_timeout=WATCH_TIMEOUT):
            pass
    assert (410, f"Expired: too old resource version: {stale} ({floor})") \
        == (caught.value.status, caught.value.reason)
    assert [(True, stale, 200)] * 2 \
        == [(r.is_watch, r.query["resourceVersion"], r.status) for r in apiserver.requests]


def test_watch_410_with_timeout_raises_without_retry(
        apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """With timeout_seconds set, Watch.stream raises the 410 at once (one request, no retry)."""
    stale = apiserver.resource_version
    apiserver.create(service("a"))
    apiserver.compact()
    with pytest.raises(ApiException) as caught:
        for _ in ClientWatch().stream(core.list_service_for_all_namespaces,
                                      resource_version=stale, timeout_seconds=5,
                                      _request_timeout=WATCH_TIMEOUT):
            pass
    assert 410 == caught.value.status
    assert 1 == len(apiserver.requests)


def test_watch_deserialize_false_crashes_on_error_event(
        apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """Client quirk: Watch.stream(deserialize=False) raises KeyError on an ERROR event."""
    stale = apiserver.resource_version
    apiserver.create(service("a"))
    apiserver.compact()
    with pytest.raises(KeyError, match="raw_object"):
        for _ in ClientWatch().stream(core.list_service_for_all_namespaces,
                                      resource_version=stale, deserialize=False,
                                      _request_timeout=WATCH_TIMEOUT):
            pass


def test_stalled_watch_sends_nothing_until_released(apiserver: FakeApiServer,
                                                    core: CoreV1Api) -> None:
    """While stalled, an open watch sends no event and no bookmark and ignores its
    timeoutSeconds, the connection staying up; released, it sends what it held back."""
    apiserver.bookmark_interval = 0.1
    apiserver.stalled = True  # the response headers still go out
    response = raw_service_watch(core, resource_version=apiserver.resource_version,
                                 timeout_seconds=1)
    apiserver.create(service("held"))
    sock = response.connection.sock  # type: ignore[union-attr]
    held_back = select.select([sock], [], [], 1.5)[0]
    apiserver.stalled = False
    assert ([], 1) == (held_back, apiserver.active_watches)
    assert ("ADDED", "held") == next(
        (e["type"], e["object"]["metadata"]["name"]) for e in events(response)
        if e["type"] != "BOOKMARK")
    response.release_conn()


def test_watch_timeout_seconds_ends_stream(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """timeoutSeconds makes the server end the stream; Watch.stream then returns normally."""
    started = time.monotonic()
    seen = list(ClientWatch().stream(core.list_service_for_all_namespaces,
                                     resource_version=apiserver.resource_version,
                                     timeout_seconds=1, _request_timeout=WATCH_TIMEOUT))
    elapsed = time.monotonic() - started
    assert [] == seen
    assert 0.9 <= elapsed < 3, elapsed
    assert [("1", 200)] == [(r.query["timeoutSeconds"], r.status) for r in apiserver.requests]


# --- WATCH, raw -------------------------------------------------------------------------------


def test_raw_watch_events_are_full_objects(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """Raw watch lines are {"type", "object"} with kind/apiVersion and the write's RV."""
    response = raw_service_watch(core, resource_version=apiserver.resource_version)
    stream = events(response)
    created = apiserver.create(service("web"))
    deleted = apiserver.delete("Service", "default", "web")
    assert [{"type": "ADDED", "object": created}, {"type": "DELETED", "object": deleted}] \
        == [next(stream), next(stream)]
    assert int(created["metadata"]["resourceVersion"]) + 1 \
        == int(deleted["metadata"]["resourceVersion"])
    assert "chunked" == response.headers["Transfer-Encoding"]
    response.close()


@pytest.mark.parametrize("resource_version", [None, "0"])
def test_watch_without_rv_starts_with_synthetic_added(
        apiserver: FakeApiServer, core: CoreV1Api, resource_version: str | None) -> None:
    """A watch with resourceVersion unset or "0" first gets ADDED for every existing object."""
    apiserver.create(service("a"))
    apiserver.create(service("b", "other"))
    kwargs = {} if resource_version is None else {"resource_version": resource_version}
    stream = events(raw_service_watch(core, **kwargs))
    initial = [next(stream), next(stream)]
    assert [("ADDED", "a"), ("ADDED", "b")] \
        == [(e["type"], e["object"]["metadata"]["name"]) for e in initial]
    apiserver.create(service("c"))
    live = next(stream)
    assert ("ADDED", "c") == (live["type"], live["object"]["metadata"]["name"])


def test_watch_replays_history_after_rv(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """A watch from an older retained RV replays every change after it, in order."""
    start = apiserver.resource_version
    apiserver.create(service("a"))
    apiserver.update(service("a", cluster_ip="10.96.0.11"))
    apiserver.create(service("b"))
    stream = events(raw_service_watch(core, resource_version=start))
    assert [("ADDED", "a"), ("MODIFIED", "a"), ("ADDED", "b")] \
        == [(e["type"], e["object"]["metadata"]["name"]) for e in (next(stream) for _ in "abc")]


def test_watch_selector_transitions(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """With a label selector, leaving the selection is DELETED (with the content that last
    matched, at the new resourceVersion, as kube-apiserver sends it) and entering it is
    ADDED."""
    apiserver.create(service("web", labels={"app": "web"}))
    response = core.list_namespaced_service(
        "default", watch=True, label_selector="app=web",
        resource_version=apiserver.resource_version, _preload_content=False,
        _request_timeout=WATCH_TIMEOUT)
    stream = events(cast(urllib3.HTTPResponse, response))
    apiserver.create(service("other", labels={"app": "other"}))
    apiserver.update(service("web", labels={"app": "moved"}))
    apiserver.update(service("web", labels={"app": "web"}))
    apiserver.create(service("web", "elsewhere", labels={"app": "web"}))
    apiserver.update(service("web", cluster_ip="10.96.0.12", labels={"app": "web"}))
    seen = [next(stream) for _ in range(3)]
    assert [("DELETED", "web"), ("ADDED", "web"), ("MODIFIED", "web")] \
        == [(e["type"], e["object"]["metadata"]["labels"]["app"]) for e in seen]
    moved = apiserver.store.rv - 3  # the update that took "web" out of the selection
    assert str(moved) == seen[0]["object"]["metadata"]["resourceVersion"]


def test_raw_watch_bookmarks_on_demand(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """server.bookmark() sends a BOOKMARK with only kind, apiVersion and the current RV."""
    stream = events(raw_service_watch(core, resource_version=apiserver.resource_version,
                                      allow_watch_bookmarks=True))
    apiserver.create(node("n"))
    apiserver.bookmark()
    assert {"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1", "metadata": {
        "resourceVersion": apiserver.resource_version}}} == next(stream)


def test_no_bookmarks_unless_allowed(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """Without allowWatchBookmarks no BOOKMARK is sent, on demand or periodically."""
    stream = events(raw_service_watch(core, resource_version=apiserver.resource_version))
    apiserver.bookmark()
    apiserver.create(service("web"))
    assert "ADDED" == next(stream)["type"]


def test_periodic_bookmarks() -> None:
    """With bookmark_interval set, watches that allow bookmarks get them periodically."""
    with FakeApiServer(bookmark_interval=0.2) as server, server.api_client() as client:
        core = CoreV1Api(client)
        started = time.monotonic()
        stream = events(raw_service_watch(core, resource_version=server.resource_version,
                                          allow_watch_bookmarks=True))
        first, second = next(stream), next(stream)
        elapsed = time.monotonic() - started
        assert ["BOOKMARK", "BOOKMARK"] == [first["type"], second["type"]]
        assert 0.35 <= elapsed < 2, elapsed
        assert [] == server.handler_errors


def test_raw_watch_410_is_error_event(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """A raw watch from before the compaction gets HTTP 200, one 410 ERROR event, then EOF."""
    stale = apiserver.resource_version
    apiserver.create(service("a"))
    floor = apiserver.compact()
    response = raw_service_watch(core, resource_version=stale)
    assert 200 == response.status
    assert [{"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": f"too old resource version: {stale} ({floor})", "reason": "Expired",
        "code": 410}}] == list(events(response))


def test_history_window_expires_old_rvs() -> None:
    """With max_events=3 only the last three changes can be replayed; older RVs get 410."""
    with FakeApiServer(max_events=3, bookmark_interval=None) as server, \
            server.api_client() as client:
        core = CoreV1Api(client)
        rvs = [server.create(service(f"s{i}"))["metadata"]["resourceVersion"] for i in range(5)]
        assert "ERROR" == next(events(raw_service_watch(core, resource_version=rvs[0])))["type"]
        replay = events(raw_service_watch(core, resource_version=rvs[1]))
        assert ["s2", "s3", "s4"] == [next(replay)["object"]["metadata"]["name"] for _ in "abc"]
        assert [] == server.handler_errors


def test_watch_list_initial_events_end_bookmark(apiserver: FakeApiServer,
                                                core: CoreV1Api) -> None:
    """sendInitialEvents=true streams the state, then a BOOKMARK annotated initial-events-end."""
    apiserver.create(service("a"))
    stream = events(raw_service_watch(core, send_initial_events=True,
                                      resource_version_match="NotOlderThan",
                                      allow_watch_bookmarks=True))
    added, bookmark = next(stream), next(stream)
    assert ("ADDED", "a") == (added["type"], added["object"]["metadata"]["name"])
    assert {"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1", "metadata": {
        "resourceVersion": apiserver.resource_version,
        "annotations": {INITIAL_EVENTS_END_ANNOTATION: "true"}}}} == bookmark


def test_raw_watch_timeout_ends_cleanly(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """timeoutSeconds ends a raw stream with the terminating chunk (no protocol error)."""
    response = raw_service_watch(core, resource_version=apiserver.resource_version,
                                 timeout_seconds=1)
    assert [] == list(events(response))
    apiserver.wait_for_watches(0)


def test_close_watches_ends_raw_stream(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """close_watches() ends every open stream cleanly after the events already queued."""
    first = raw_service_watch(core, resource_version=apiserver.resource_version)
    second = raw_service_watch(core, resource_version=apiserver.resource_version)
    assert 2 == apiserver.active_watches
    apiserver.create(service("a"))
    apiserver.close_watches()
    assert (["ADDED"], ["ADDED"]) == ([e["type"] for e in events(first)],
                                      [e["type"] for e in events(second)])
    apiserver.wait_for_watches(0)


def test_client_disconnect_closes_watch(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """When the client drops a watch connection the server notices and forgets the watch."""
    response = raw_service_watch(core, resource_version=apiserver.resource_version)
    apiserver.wait_for_watches(1)
    response.close()
    apiserver.wait_for_watches(0)


# --- availability -----------------------------------------------------------------------------


def test_stop_and_start(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """stop() breaks watches and refuses connections; start() serves the same store and port."""
    apiserver.create(service("a"))
    port = apiserver.port
    stream = events(raw_service_watch(core, resource_version=apiserver.resource_version))
    apiserver.stop()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(stream)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as caught:
        core.list_service_for_all_namespaces()
    assert isinstance(caught.value.reason, urllib3.exceptions.NewConnectionError)
    apiserver.create(service("b"))  # the store changes while the server is away
    apiserver.start()
    assert (port, ["a", "b"]) == (apiserver.port,
                                  names(core.list_service_for_all_namespaces().items))


def test_watch_stream_raises_when_server_dies(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """Watch.stream does not retry a broken connection: urllib3's ProtocolError propagates."""
    watch = ClientWatch()
    stream = watch.stream(core.list_service_for_all_namespaces,
                          resource_version=apiserver.resource_version,
                          _request_timeout=WATCH_TIMEOUT)

    def server_side() -> None:
        apiserver.wait_for_watches(1)
        apiserver.create(service("a"))

    with background(server_side):
        assert "ADDED" == next(stream)["type"]
    apiserver.stop()
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(stream)
    assert 1 == len([r for r in apiserver.requests if r.is_watch])


def test_restart_keeps_history_unless_compacted(apiserver: FakeApiServer,
                                                core: CoreV1Api) -> None:
    """After a restart a watch resumes from its RV; compacting while down makes that a 410."""
    before = apiserver.resource_version
    apiserver.stop()
    apiserver.create(service("missed"))
    apiserver.start()
    resumed = next(events(raw_service_watch(core, resource_version=before)))
    assert ("ADDED", "missed") == (resumed["type"], resumed["object"]["metadata"]["name"])
    apiserver.stop()
    apiserver.compact()
    apiserver.start()
    assert "Expired" == next(events(raw_service_watch(core, resource_version=before)))[
        "object"]["reason"]


def test_latency_delays_responses(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """latency delays every response by at least that many seconds."""
    apiserver.latency = 0.3
    started = time.monotonic()
    core.list_node()
    assert time.monotonic() - started >= 0.3
    apiserver.latency = 0.0


# --- store ------------------------------------------------------------------------------------


def test_create_accepts_client_models(apiserver: FakeApiServer, core: CoreV1Api) -> None:
    """create() takes official client models as well as manifest dicts."""
    model = kubernetes.client.V1Service(
        api_version="v1", kind="Service",
        metadata=kubernetes.client.V1ObjectMeta(name="web", namespace="shop"),
        spec=kubernetes.client.V1ServiceSpec(
            cluster_ip="10.96.1.1", ports=[kubernetes.client.V1ServicePort(port=443)]))
    stored = apiserver.create(model)
    assert {"clusterIP": "10.96.1.1", "ports": [{"port": 443}]} == stored["spec"]
    read: Any = core.read_namespaced_service("web", "shop")
    assert "10.96.1.1" == read.spec.cluster_ip


def test_store_write_rules(apiserver: FakeApiServer) -> None:
    """create refuses duplicates, update checks a given RV, delete/get of absent is KeyError."""
    created = apiserver.create(service("a"))
    with pytest.raises(ConflictError):
        apiserver.create(service("a"))
    updated = apiserver.update(created)  # its RV is current: the precondition holds
    assert (created["metadata"]["uid"], created["metadata"]["creationTimestamp"]) \
        == (updated["metadata"]["uid"], updated["metadata"]["creationTimestamp"])
    with pytest.raises(ConflictError):
        apiserver.update(created)  # now stale
    with pytest.raises(KeyError):
        apiserver.delete("Service", "default", "missing")
    with pytest.raises(KeyError):
        apiserver.get("Node", None, "missing")
    with pytest.raises(ValueError, match="apiVersion"):
        apiserver.create({**node("n"), "apiVersion": "discovery.k8s.io/v1"})
    assert [str(int(created["metadata"]["resourceVersion"]) + 1)] \
        == [o["metadata"]["resourceVersion"] for o in apiserver.objects("Service")]
