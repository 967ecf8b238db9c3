"""A fake kube-apiserver over real HTTP, for testing the node agent's list/watch client.

The agent talks to the API server through the official ``kubernetes`` Python client, and the
bugs worth catching live in the protocol: which resourceVersion a watch resumes from, what
happens on 410 Expired, whether a paged LIST stays consistent, whether the agent survives the
server going away. Mocking the client hides all of that, so this module serves the real wire
protocol on 127.0.0.1, or another address (JSON only), for the three resources the agent
reads:

* ``/api/v1/services``, ``/api/v1/namespaces/{ns}/services[/{name}]``
* ``/apis/discovery.k8s.io/v1/endpointslices``, ``.../namespaces/{ns}/endpointslices[/{name}]``
* ``/api/v1/nodes[/{name}]``
* discovery (``/api``, ``/api/v1``, ``/apis``, ``/apis/discovery.k8s.io[/v1]``), ``/version``,
  ``/healthz``, ``/livez``, ``/readyz``.

It is strict where the real server is: ListOptions are validated like
``ValidateListOptions`` (422 Invalid), malformed numbers and selectors are 400, unknown paths
404, other verbs 405, a non-JSON Accept 406; a LIST at an exact resourceVersion older than the
retained history and a continue token from before a compaction are 410 Expired (the latter with
a fresh, inconsistent continue token); a WATCH from such a resourceVersion gets HTTP 200 and one
``ERROR`` event carrying the 410 Status, then the stream ends. LIST items carry no
``kind``/``apiVersion`` (as on the real server); watch event objects do.

Test controls: :meth:`FakeApiServer.create` / ``update`` / ``delete`` change the store and emit
watch events; ``compact`` expires history; ``bookmark`` and ``close_watches`` act on every open
watch, and while ``stalled`` open watches send nothing (a hung server); ``stop`` / ``start``
take the server away and bring it back on the same port with the same store; ``latency``
delays every request; ``requests`` records what the client sent, and
``wait_for_request`` / ``wait_for_watches`` let a test wait for the client instead of sleeping.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import re
import select
import socket
import socketserver
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import kubernetes.client
import yaml

from . import status
from .selection import FieldSelector, LabelSelector, SelectorError
from .status import ApiError, FieldError, JsonObj
from .store import (
    RESOURCE_TYPES,
    Filter,
    ResourceType,
    Store,
    Watcher,
    bookmark_event,
    resource_type,
)

SERVER_VERSION: JsonObj = {
    "major": "1",
    "minor": "34",
    "gitVersion": "v1.34.0-iptsync-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.24.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}

LIST_EXPIRED = "The resourceVersion for the provided list is too old."
CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this "
    "response to retrieve the remainder of the results. Continuing with the provided token "
    "results in an inconsistent list - objects that were created, modified, or deleted between "
    "the time the first chunk was returned and now may show up in the list."
)
_CONTINUE_VERSION = "meta.k8s.io/v1"
_INT_RE = re.compile(r"[+-]?[0-9]+")
_UINT_RE = re.compile(r"[0-9]+")
_JOIN_TIMEOUT = 5.0


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it, logged when its response status was sent."""

    method: str
    path: str
    query: Mapping[str, str]
    status: int

    @property
    def is_watch(self) -> bool:
        """True for a WATCH (``watch`` given and not ``0``/``false``)."""
        return "watch" in self.query and _parse_bool(self.query["watch"])


# --- ListOptions ------------------------------------------------------------------------------


def _parse_bool(value: str | None) -> bool:
    """``Convert_Slice_string_To_bool``: absent, ``0`` and ``false`` are false, all else true."""
    return value is not None and value != "0" and value.lower() != "false"


def _parse_int(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    if not _INT_RE.fullmatch(value):
        raise status.bad_request(f'{name}: strconv.ParseInt: parsing "{value}": invalid syntax')
    return int(value)


def _parse_rv(value: str) -> int:
    if not _UINT_RE.fullmatch(value):
        raise status.bad_request(
            f'resourceVersion: Invalid value: "{value}": strconv.ParseUint: parsing "{value}": '
            "invalid syntax"
        )
    return int(value)


@dataclass(frozen=True)
class ListOptions:
    """The decoded query of a LIST or WATCH (``metainternalversion.ListOptions``)."""

    watch: bool
    allow_bookmarks: bool
    resource_version: str
    resource_version_match: str
    send_initial_events: bool | None
    limit: int
    continue_token: str
    timeout_seconds: int | None
    labels: LabelSelector
    fields: FieldSelector

    @classmethod
    def from_query(cls, query: Mapping[str, str], rtype: ResourceType) -> ListOptions:
        """Decode the parameters; malformed numbers or selectors are 400 BadRequest."""
        try:
            labels = LabelSelector.parse(query.get("labelSelector", ""))
            fields = FieldSelector.parse(query.get("fieldSelector", ""), rtype.selectable_fields)
        except SelectorError as err:
            raise status.bad_request(str(err)) from err
        send_initial = query.get("sendInitialEvents")
        return cls(
            watch=_parse_bool(query.get("watch")),
            allow_bookmarks=_parse_bool(query.get("allowWatchBookmarks")),
            resource_version=query.get("resourceVersion", ""),
            resource_version_match=query.get("resourceVersionMatch", ""),
            send_initial_events=None if send_initial is None else _parse_bool(send_initial),
            limit=_parse_int("limit", query.get("limit")) or 0,
            continue_token=query.get("continue", ""),
            timeout_seconds=_parse_int("timeoutSeconds", query.get("timeoutSeconds")) or None,
            labels=labels,
            fields=fields,
        )

    def validate(self) -> list[FieldError]:
        """``ValidateListOptions`` (WatchList enabled): errors make a 422 Invalid."""
        match = self.resource_version_match
        errors: list[FieldError] = []
        field = "resourceVersionMatch"
        if self.watch:
            if self.send_initial_events is not None and match != "NotOlderThan":
                errors.append(FieldError.forbidden(
                    field,
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"))
            if match:
                if self.send_initial_events is None:
                    errors.append(FieldError.forbidden(
                        field,
                        "resourceVersionMatch is forbidden for watch unless sendInitialEvents is "
                        "provided"))
                if match != "NotOlderThan":
                    errors.append(FieldError.not_supported(field, match, ["NotOlderThan"]))
                if self.continue_token:
                    errors.append(FieldError.forbidden(
                        field, "resourceVersionMatch is forbidden when continue is provided"))
            return errors
        if match:
            if not self.resource_version:
                errors.append(FieldError.forbidden(
                    field, "resourceVersionMatch is forbidden unless resourceVersion is provided"))
            if self.continue_token:
                errors.append(FieldError.forbidden(
                    field, "resourceVersionMatch is forbidden when continue is provided"))
            if match not in ("Exact", "NotOlderThan"):
                errors.append(FieldError.not_supported(field, match, ["Exact", "NotOlderThan", ""]))
            if match == "Exact" and self.resource_version == "0":
                errors.append(FieldError.forbidden(
                    field, 'resourceVersionMatch "exact" is forbidden for resourceVersion "0"'))
        if self.send_initial_events is not None:
            errors.append(FieldError.forbidden(
                "sendInitialEvents", "sendInitialEvents is forbidden for list"))
        return errors


def encode_continue(rv: int, start: str) -> str:
    """A continue token like the etcd3 store's: base64url JSON of version, rv and start key."""
    raw = json.dumps({"v": _CONTINUE_VERSION, "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    """``(rv, start key)`` of a token; 400 BadRequest ``invalid continue token`` otherwise."""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(data, dict) or data.get("v") != _CONTINUE_VERSION:
            raise ValueError("continue key is not valid: server does not recognize this encoding")
        rv, start = data.get("rv"), data.get("start")
        if not isinstance(rv, int) or rv == 0 or rv < -1:
            raise ValueError("continue key is not valid: incorrect encoded start resourceVersion "
                             f"(version {_CONTINUE_VERSION})")
        if not isinstance(start, str) or not start:
            raise ValueError("continue key is not valid: encoded start key empty")
    except (ValueError, binascii.Error, UnicodeDecodeError) as err:
        raise status.bad_request(f"invalid continue token: {err}") from err
    return rv, start


# --- routing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    """What a path names: a fixed document, a collection, or one object."""

    document: JsonObj | str | None = None
    rtype: ResourceType | None = None
    namespace: str | None = None
    name: str | None = None


def _group_version_prefix(rtype: ResourceType) -> str:
    return f"/apis/{rtype.group}/{rtype.version}" if rtype.group else f"/api/{rtype.version}"


def _resource_list(group_version: str) -> JsonObj:
    resources = [
        {
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ["get", "list", "watch"],
            **({"shortNames": list(r.short_names)} if r.short_names else {}),
        }
        for r in RESOURCE_TYPES
        if r.api_version == group_version
    ]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": resources}


def _api_group(group: str) -> JsonObj:
    versions = sorted({r.version for r in RESOURCE_TYPES if r.group == group})
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def _documents(address: str) -> dict[str, JsonObj | str]:
    groups = sorted({r.group for r in RESOURCE_TYPES if r.group})
    docs: dict[str, JsonObj | str] = {
        "/version": SERVER_VERSION,
        "/api": {"kind": "APIVersions", "versions": ["v1"],
                 "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                 "serverAddress": address}]},
        "/api/v1": _resource_list("v1"),
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1",
                  "groups": [_api_group(g) for g in groups]},
        "/healthz": "ok",
        "/livez": "ok",
        "/readyz": "ok",
    }
    for group in groups:
        docs[f"/apis/{group}"] = {"kind": "APIGroup", "apiVersion": "v1", **_api_group(group)}
        for version in sorted({r.version for r in RESOURCE_TYPES if r.group == group}):
            docs[f"/apis/{group}/{version}"] = _resource_list(f"{group}/{version}")
    # The generated client asks for discovery with a trailing slash (``/api/v1/``); the real
    # server answers both spellings of these fixed documents.
    docs.update({f"{path}/": doc for path, doc in docs.items() if not isinstance(doc, str)})
    return docs


def route(path: str, documents: Mapping[str, JsonObj | str]) -> _Route:
    """Resolve a request path; anything not served is 404 NotFound."""
    if path in documents:
        return _Route(document=documents[path])
    for rtype in RESOURCE_TYPES:
        prefix = _group_version_prefix(rtype) + "/"
        if not path.startswith(prefix):
            continue
        parts = [unquote(p) for p in path[len(prefix):].split("/")]
        if any(not p for p in parts):
            continue
        if rtype.namespaced and len(parts) in (3, 4) and parts[0] == "namespaces" \
                and parts[2] == rtype.plural:
            return _Route(rtype=rtype, namespace=parts[1],
                          name=parts[3] if len(parts) == 4 else None)
        if parts[0] == rtype.plural and len(parts) == 1:
            return _Route(rtype=rtype)
        if parts[0] == rtype.plural and len(parts) == 2 and not rtype.namespaced:
            return _Route(rtype=rtype, name=parts[1])
    raise status.path_not_found()


def _accepts_json(accept: str | None) -> bool:
    if accept is None or not accept.strip():
        return True
    for media_range in accept.split(","):
        media_type, *params = (p.strip() for p in media_range.split(";"))
        if any(p.replace(" ", "").startswith("as=") for p in params):
            continue  # a Table or other conversion the fake does not serve
        if media_type.lower() in ("application/json", "application/*", "*/*"):
            return True
    return False


def _list_item(obj: JsonObj) -> JsonObj:
    """A LIST item: the real server omits kind and apiVersion inside typed lists."""
    obj.pop("kind", None)
    obj.pop("apiVersion", None)
    return obj


# --- HTTP -------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: FakeApiServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._connection_opened(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        finally:
            self.owner._connection_closed(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            return  # the client or stop() dropped the connection
        self.owner._record_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        """Disable Nagle: headers and body are separate writes, and a delayed ACK would add
        40 ms to every response."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr line; see ``FakeApiServer.requests``."""

    def do_GET(self) -> None:
        """Serve GET: discovery, LIST, WATCH or a named object."""
        self._handle("GET")

    def do_HEAD(self) -> None:
        """Not served (405)."""
        self._handle("HEAD")

    def do_POST(self) -> None:
        """Not served (405): the fake is read-only over HTTP; tests write via the store."""
        self._handle("POST")

    def do_PUT(self) -> None:
        """Not served (405)."""
        self._handle("PUT")

    def do_PATCH(self) -> None:
        """Not served (405)."""
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        """Not served (405)."""
        self._handle("DELETE")

    def do_OPTIONS(self) -> None:
        """Not served (405)."""
        self._handle("OPTIONS")

    # --- dispatch ---

    def _handle(self, method: str) -> None:
        owner = self.server.owner
        self._method = method
        split = urlsplit(self.path)
        self._path = split.path
        self._query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        if method != "GET":
            self._discard_body()
        if owner.latency > 0:
            owner._stopping.wait(owner.latency)  # stop() cuts the delay short
        try:
            owner._authenticate(self.headers.get("Authorization"))
            target = route(self._path, owner._documents)
            if method != "GET":
                raise status.method_not_allowed()
            if isinstance(target.document, str):
                self._send(200, target.document.encode(), "text/plain; charset=utf-8")
                return
            if not _accepts_json(self.headers.get("Accept")):
                raise status.not_acceptable(["application/json"])
            if target.document is not None:
                self._send_json(200, target.document)
            elif target.name is not None:
                assert target.rtype is not None
                self._send_json(200, owner._get_object(target.rtype, target.namespace,
                                                       target.name))
            else:
                assert target.rtype is not None
                self._collection(target.rtype, target.namespace)
        except ApiError as err:
            self._send_json(err.code, err.body)
        except OSError:
            raise
        except Exception as exc:
            owner._record_error(traceback.format_exc())
            internal = status.internal_error(repr(exc))
            self._send_json(internal.code, internal.body)

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            self.rfile.read(int(length))
        elif self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def _collection(self, rtype: ResourceType, namespace: str | None) -> None:
        owner = self.server.owner
        options = ListOptions.from_query(self._query, rtype)
        errors = options.validate()
        if errors:
            raise status.invalid("meta.k8s.io", "ListOptions", "", errors)
        flt = Filter(rtype, namespace, options.labels, options.fields)
        if not options.watch:
            self._send_json(200, owner._list(flt, options))
            return
        watcher, error = owner._open_watch(flt, options)
        self._stream(watcher, error, options)

    # --- responses ---

    def _record(self, code: int) -> None:
        self.server.owner._record_request(
            RecordedRequest(self._method, self._path, dict(self._query), code))

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self._record(code)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self._method != "HEAD":
            self.wfile.write(body)

    def _send_json(self, code: int, body: JsonObj) -> None:
        self._send(code, (json.dumps(body, separators=(",", ":")) + "\n").encode(),
                   "application/json")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream(self, watcher: Watcher | None, error: ApiError | None,
                options: ListOptions) -> None:
        """Send events as chunked newline-delimited JSON until timeout, close or disconnect."""
        owner = self.server.owner
        store = owner.store
        try:
            self._record(200)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if watcher is None:
                assert error is not None
                event = {"type": "ERROR", "object": error.body}
                self._write_chunk(json.dumps(event, separators=(",", ":")).encode() + b"\n")
                self._write_chunk(b"")
                return
            start = time.monotonic()
            deadline = start + options.timeout_seconds if options.timeout_seconds else None
            interval = owner.bookmark_interval if watcher.allow_bookmarks else None
            next_bookmark = start + interval if interval else None
            while True:
                with store.cond:
                    now = time.monotonic()
                    idle = not watcher.queue and watcher.ending is None
                    wakeups = [t for t in (deadline, next_bookmark) if t is not None]
                    if idle and all(now < t for t in wakeups):
                        store.cond.wait(min([0.1] + [t - now for t in wakeups]))
                        now = time.monotonic()
                    if owner.stalled and watcher.ending != "abort":
                        store.cond.wait(0.02)  # hung: nothing sent, the connection stays up
                        continue
                    batch = list(watcher.queue)
                    watcher.queue.clear()
                    ending = watcher.ending
                    if next_bookmark is not None and now >= next_bookmark:
                        assert interval is not None
                        if store.rv >= watcher.start_rv:
                            batch.append(bookmark_event(watcher.filter.rtype, store.rv))
                        next_bookmark = now + interval
                    timed_out = deadline is not None and now >= deadline
                if ending == "abort":
                    self.close_connection = True
                    return
                for event in batch:
                    self._write_chunk(json.dumps(event, separators=(",", ":")).encode() + b"\n")
                if ending == "close" or timed_out:
                    break
                if self._client_gone():
                    self.close_connection = True
                    return
            self._write_chunk(b"")
        finally:
            if watcher is not None:
                with store.cond:
                    store.watchers.discard(watcher)
                    store.cond.notify_all()


# --- the server -------------------------------------------------------------------------------


class FakeApiServer:
    """A fake kube-apiserver on ``http://<host>:<port>``; use as a context manager.

    ``bookmark_interval``: seconds between periodic BOOKMARKs on watches that allow them
    (None: only on :meth:`bookmark`). ``max_events``: the watch-history window. ``latency``:
    seconds slept before answering each request (settable at any time). ``token``: when set,
    requests must carry ``Authorization: Bearer <token>`` (else 401). ``too_large_rv_wait``:
    how long a LIST at a future resourceVersion waits for the store before 504 (the real
    server waits 3 s). ``host``: the address to listen on (the listening socket belongs to
    the network namespace of the thread that calls :meth:`start`). ``tls``: (certificate,
    key) files to serve HTTPS with, as the in-cluster address is. ``stalled``: while True,
    open watches send nothing at all, neither events nor bookmarks, and never time out, as a
    hung server or proxy would; what they missed is sent once it is False again.
    """

    def __init__(
        self,
        *,
        bookmark_interval: float | None = 0.5,
        max_events: int = 1000,
        latency: float = 0.0,
        token: str | None = None,
        too_large_rv_wait: float = 0.0,
        host: str = "127.0.0.1",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.store = Store(max_events=max_events)
        self.host = host
        self.tls = tls
        self.stalled = False
        self.bookmark_interval = bookmark_interval
        self.latency = latency
        self.token = token
        self.too_large_rv_wait = too_large_rv_wait
        self._port = 0
        self._documents: dict[str, JsonObj | str] = {}
        self._lifecycle = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._log_cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._errors: list[str] = []
        self._connections_cond = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._serializer: kubernetes.client.ApiClient | None = None

    # --- lifecycle ---

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Listen (again) on the same port with the same store; RuntimeError if running.

        OSError if another process took the port while the server was stopped.
        """
        with self._lifecycle:
            if self._httpd is not None:
                raise RuntimeError("the fake API server is already running")
            httpd = _HTTPServer((self.host, self._port), self)
            if self.tls is not None:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(*self.tls)
                httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
            self._stopping = threading.Event()
            self._port = int(httpd.server_address[1])
            self._documents = _documents(f"{self.host}:{self._port}")
            thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                      name=f"fake-apiserver-{self._port}", daemon=True)
            thread.start()
            self._httpd, self._thread = httpd, thread

    def stop(self) -> None:
        """Go away: abort open watches, drop every connection, refuse new ones (idempotent).

        The store, its history and the port are kept. A real restart also loses the watch
        cache's history; call :meth:`compact` while stopped to simulate that.
        """
        with self._lifecycle:
            httpd, thread = self._httpd, self._thread
            self._httpd = self._thread = None
            if httpd is None or thread is None:
                return
            self._stopping.set()
            with self.store.cond:
                for watcher in self.store.watchers:
                    watcher.ending = "abort"
                self.store.cond.notify_all()
            httpd.shutdown()
            httpd.server_close()
            thread.join(_JOIN_TIMEOUT)
            with self._connections_cond:
                open_connections = list(self._connections)
            for sock in open_connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._connections_cond:
                if not self._connections_cond.wait_for(lambda: not self._connections,
                                                       _JOIN_TIMEOUT):
                    self._record_error(f"{len(self._connections)} connection(s) outlived stop()")

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._httpd is not None

    @property
    def port(self) -> int:
        """The TCP port (0 before the first start)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://<host>:<port>`` (``https`` with ``tls``)."""
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://{self.host}:{self._port}"

    # --- client helpers ---

    def client_configuration(self) -> kubernetes.client.Configuration:
        """A client Configuration for this server (no proxy; bearer token if one is set)."""
        config = kubernetes.client.Configuration(host=self.url)
        config.proxy = None  # never send loopback traffic through an environment proxy
        if self.token is not None:
            config.api_key = {"authorization": f"Bearer {self.token}"}
        return config

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new ApiClient for this server; the caller closes it."""
        return kubernetes.client.ApiClient(self.client_configuration())

    def write_kubeconfig(self, path: str | Path, *, context: str = "fake") -> Path:
        """Write a kubeconfig whose current context points at this server; returns the path."""
        user: JsonObj = {"token": self.token} if self.token is not None else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
        }
        target = Path(path)
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        return target

    # --- store (test side) ---

    def create(self, obj: JsonObj | object) -> JsonObj:
        """Create a Service/EndpointSlice/Node (manifest dict or client model); returns it."""
        return self.store.create(self._manifest(obj))

    def update(self, obj: JsonObj | object) -> JsonObj:
        """Replace an object (a resourceVersion in it is a precondition); returns the copy."""
        return self.store.update(self._manifest(obj))

    def _manifest(self, obj: JsonObj | object) -> JsonObj:
        """A dict as is; a ``kubernetes`` model serialized to its camelCase manifest."""
        if isinstance(obj, dict):
            return obj
        if self._serializer is None:
            self._serializer = kubernetes.client.ApiClient()
        serialize = self._serializer.sanitize_for_serialization
        manifest: JsonObj = serialize(obj)  # type: ignore[no-untyped-call]
        return manifest

    def delete(self, kind: str, namespace: str | None, name: str) -> JsonObj:
        """Delete an object (namespace None for Nodes); returns its last state."""
        return self.store.delete(kind, namespace, name)

    def get(self, kind: str, namespace: str | None, name: str) -> JsonObj:
        """The current object (KeyError if absent)."""
        return self.store.get(kind, namespace, name)

    def objects(self, kind: str) -> list[JsonObj]:
        """All current objects of a kind, in namespace/name order."""
        return self.store.live_objects(kind)

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion."""
        with self.store.cond:
            return str(self.store.rv)

    def compact(self, resource_version: str | int | None = None) -> str:
        """Expire history before ``resource_version`` (default: now); returns the floor.

        Afterwards a WATCH from an older resourceVersion gets a 410 ERROR event, and a LIST
        at an exact older resourceVersion (or an older continue token) gets HTTP 410.
        """
        rv = None if resource_version is None else int(resource_version)
        return str(self.store.compact(rv))

    # --- watch controls ---

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resourceVersion on every watch that allows them."""
        with self.store.cond:
            for watcher in self.store.watchers:
                if watcher.allow_bookmarks and self.store.rv >= watcher.start_rv:
                    watcher.queue.append(bookmark_event(watcher.filter.rtype, self.store.rv))
            self.store.cond.notify_all()

    def close_watches(self) -> None:
        """End every open watch cleanly (final chunk sent), as on a server-side timeout."""
        with self.store.cond:
            for watcher in self.store.watchers:
                watcher.ending = watcher.ending or "close"
            self.store.cond.notify_all()

    @property
    def active_watches(self) -> int:
        """How many watch streams are open."""
        with self.store.cond:
            return len(self.store.watchers)

    def wait_for_watches(self, count: int, timeout: float = 5.0) -> None:
        """Block until exactly ``count`` watches are open; TimeoutError otherwise."""
        with self.store.cond:
            if not self.store.wait_for(lambda: len(self.store.watchers) == count, timeout):
                raise TimeoutError(
                    f"expected {count} open watches, have {len(self.store.watchers)}")

    # --- logs ---

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the request log, oldest first."""
        with self._log_cond:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Empty the request log."""
        with self._log_cond:
            self._requests.clear()

    def wait_for_request(self, match: Callable[[RecordedRequest], bool],
                         timeout: float = 5.0) -> RecordedRequest:
        """Block until a logged request satisfies ``match`` (e.g. the agent's re-watch).

        The request is logged when its response starts; for a watch, its stream is registered
        by then. Returns the first match in the log; TimeoutError if none arrives in time.
        """
        def found() -> RecordedRequest | None:
            return next((r for r in self._requests if match(r)), None)

        with self._log_cond:
            if not self._log_cond.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"no matching request in {len(self._requests)} logged")
            request = found()
            assert request is not None
            return request

    @property
    def handler_errors(self) -> list[str]:
        """Tracebacks of bugs in the fake itself (each was answered with 500); want none."""
        with self._log_cond:
            return list(self._errors)

    # --- internals used by the handler ---

    def _record_request(self, request: RecordedRequest) -> None:
        with self._log_cond:
            self._requests.append(request)
            self._log_cond.notify_all()

    def _record_error(self, text: str) -> None:
        with self._log_cond:
            self._errors.append(text)

    def _connection_opened(self, sock: socket.socket) -> None:
        with self._connections_cond:
            self._connections.add(sock)

    def _connection_closed(self, sock: socket.socket) -> None:
        with self._connections_cond:
            self._connections.discard(sock)
            self._connections_cond.notify_all()

    def _authenticate(self, header: str | None) -> None:
        if self.token is not None and header != f"Bearer {self.token}":
            raise status.unauthorized()

    def _get_object(self, rtype: ResourceType, namespace: str | None, name: str) -> JsonObj:
        try:
            return self.store.get(rtype.kind, namespace, name)
        except KeyError:
            raise status.object_not_found(rtype.qualified_resource, rtype.group, rtype.plural,
                                          name) from None

    def _wait_for_rv(self, wanted: int) -> None:
        """Caller holds the store condition; 504 if ``wanted`` is not reached in time."""
        store = self.store
        if wanted > store.rv and not store.wait_for(lambda: store.rv >= wanted,
                                                    self.too_large_rv_wait):
            raise status.too_large_resource_version(wanted, store.rv)

    def _list(self, flt: Filter, options: ListOptions) -> JsonObj:
        """A LIST response, with the real server's resourceVersion semantics."""
        store = self.store
        rtype = flt.rtype
        with store.cond:
            start = ""
            if options.continue_token:
                if options.resource_version not in ("", "0"):
                    raise status.bad_request(
                        "specifying resource version is not allowed when using continue")
                token_rv, start = decode_continue(options.continue_token)
                if token_rv == -1:
                    snapshot_rv = store.rv
                elif token_rv < store.floor:
                    raise status.expired(CONTINUE_EXPIRED,
                                         continue_token=encode_continue(-1, start))
                elif token_rv > store.rv:
                    raise status.bad_request("invalid continue token: continue key is not "
                                             "valid: resourceVersion from the future")
                else:
                    snapshot_rv = token_rv
            elif options.resource_version in ("", "0"):
                snapshot_rv = store.rv  # most recent, or "any" which the fake serves as recent
            else:
                wanted = _parse_rv(options.resource_version)
                self._wait_for_rv(wanted)
                match = options.resource_version_match
                exact = match == "Exact" or (not match and options.limit > 0)
                if exact and wanted < store.floor:
                    raise status.expired(LIST_EXPIRED)
                snapshot_rv = wanted if exact else store.rv
            items = [(key, obj) for key, obj in store.snapshot(flt, snapshot_rv) if key >= start]
        metadata: JsonObj = {"resourceVersion": str(snapshot_rv)}
        if 0 < options.limit < len(items):
            page, rest = items[:options.limit], items[options.limit:]
            metadata["continue"] = encode_continue(snapshot_rv, page[-1][0] + "\x00")
            if flt.labels.empty and flt.fields.empty:
                metadata["remainingItemCount"] = len(rest)
            items = page
        return {"kind": rtype.list_kind, "apiVersion": rtype.api_version, "metadata": metadata,
                "items": [_list_item(obj) for _, obj in items]}

    def _open_watch(self, flt: Filter, options: ListOptions
                    ) -> tuple[Watcher | None, ApiError | None]:
        """Register a watcher pre-filled with its initial events, or say which error to send."""
        store = self.store
        text = options.resource_version
        has_rv = text not in ("", "0")
        with store.cond:
            if options.send_initial_events is None and has_rv:
                start_rv, initial_state = _parse_rv(text), False  # "Start at Exact"
            elif options.send_initial_events is False:
                # NotOlderThan without initial state: from the given RV, or from now.
                start_rv, initial_state = (_parse_rv(text) if has_rv else store.rv), False
            else:
                # "Get State and Start at Most Recent/Any", or WatchList (sendInitialEvents).
                if has_rv:
                    try:
                        self._wait_for_rv(_parse_rv(text))
                    except ApiError as err:
                        if err.code != 504:
                            raise
                        return None, err
                start_rv, initial_state = store.rv, True
            if start_rv < store.floor:
                return None, status.expired(
                    f"too old resource version: {start_rv} ({store.floor})")
            watcher = Watcher(flt, start_rv=start_rv, allow_bookmarks=options.allow_bookmarks)
            if initial_state:
                for _, obj in store.snapshot(flt, start_rv):
                    watcher.queue.append({"type": "ADDED", "object": obj})
                if options.send_initial_events and options.allow_bookmarks:
                    watcher.queue.append(
                        bookmark_event(flt.rtype, start_rv, initial_events_end=True))
            else:
                for change in store.changes_since(start_rv):
                    watcher.offer(change)
            store.watchers.add(watcher)
            store.cond.notify_all()
            return watcher, None


def manifest(kind: str, name: str, namespace: str | None = None, **fields: Any) -> JsonObj:
    """A minimal manifest for ``kind`` with extra top-level fields (``spec=...``, ...)."""
    rtype = resource_type(kind)
    metadata: JsonObj = {"name": name}
    if rtype.namespaced:
        metadata["namespace"] = namespace or "default"
    extra = copy.deepcopy(fields)
    metadata.update(extra.pop("metadata", {}))
    return {"apiVersion": rtype.api_version, "kind": rtype.kind, "metadata": metadata, **extra}
