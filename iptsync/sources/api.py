"""List and watch Services, EndpointSlices and this node's Node from the Kubernetes API.

Services and EndpointSlices are selected as kube-proxy selects them
(:data:`iptsync.core.model.PROXY_LABEL_SELECTOR`), the Node by its name. Without a kubeconfig
the pod's service account is used (:func:`in_cluster_configuration`).

Each kind gets one thread doing what client-go's reflector does:

- LIST, in pages (``limit``/``continue``: large clusters hold tens of thousands of objects),
  and send a :class:`Snapshot`;
- WATCH from the list's resourceVersion with bookmarks allowed and a server-side
  ``timeoutSeconds`` drawn at random between ``min_watch_timeout`` and twice that, as client-go
  does, so that the watches of thousands of nodes do not all restart at once; every event,
  BOOKMARKs included, advances the resourceVersion to resume from; ADDED/MODIFIED/DELETED
  become :class:`Change` messages;
- when the server ends a watch (its ``timeoutSeconds``), or an established watch breaks, WATCH
  again from the last resourceVersion: no relist, and changes missed meanwhile still arrive;
- 410 Gone/Expired (an HTTP 410, or an ``ERROR`` event with code 410) means the history since
  that resourceVersion is gone: LIST again (counted in ``status.relists``);
- a request that fails (unreachable, reset, timed out, 5xx, ...) is retried with exponential
  backoff and jitter; meanwhile ``status.connected`` is False and ``status.last_error`` says
  why; one warning per outage, one info line on recovery.

Bounded staleness. When the server's host vanishes without a reset (a partition, a dead load
balancer, a frozen VM), a watch stays ESTABLISHED and nothing arrives: without more, only the
read timeout after ``timeoutSeconds`` (5 to 10 minutes) would notice. Two things cut that
short, and either declares the watch dead (a WARNING naming the kind and how long it was
silent), after which the kind is listed again (an INFO line when that succeeds):

- TCP keepalive with short timings on every connection the client opens (and a matching
  ``TCP_USER_TIMEOUT`` for requests sent into the void): the kernel ends a connection whose
  peer stopped answering after ``keepalive_idle + keepalive_interval * keepalive_count``
  seconds (25 s by default);
- a read timeout sized from the bookmark interval: once the server has sent a kind's watch a
  BOOKMARK (kube-apiserver's watch cache sends one about every minute), a watch silent for
  ``bookmark_interval + request_timeout`` seconds is dead even if TCP still answers (a hung
  server or proxy). A server that never sends bookmarks keeps the long read timeout, so it is
  not declared dead on every quiet interval.

``status.last_heard`` holds, per kind, when the server last said something (a list or watch
response, an event, a bookmark); the agent exports the seconds since as a metric.

Objects are never turned into the client's models: deserialising tens of thousands of them is
slow. The generated list methods are called with ``_preload_content=False`` (so the client
still supplies authentication, including in-cluster token refresh, TLS and proxies) and the
JSON is decoded here into plain dicts. LIST items lack ``kind``/``apiVersion``; they are added
because :mod:`iptsync.core.model` dispatches on them.

``stop()`` cannot rely on timeouts alone (an idle watch blocks in a socket read), so it shuts
the socket of every open response down, which ends the blocked read at once. Calls to the
sink are serialised, so the agent's sink need not be thread-safe.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import kubernetes.client
import kubernetes.config
import tenacity
import urllib3
from kubernetes.client import ApiException

from iptsync.core.model import PROXY_LABEL_SELECTOR
from iptsync.sources.base import KINDS, Change, Kind, Manifest, Sink, Snapshot, SourceStatus

logger = logging.getLogger(__name__)

_Action = Literal["upsert", "delete"]
JOIN_TIMEOUT = 2.0  # seconds stop() waits for the threads to end


class ApiConfigError(Exception):
    """No usable client configuration: a bad kubeconfig, or none and not running in a pod.

    Raised instead of the client's own exception so callers need not import ``kubernetes``.
    """


class _Expired(Exception):
    """The resourceVersion (or continue token) is older than the server's history: relist."""


class _BadResponse(Exception):
    """The server answered something that is not the list/watch protocol."""


# What a failed request can raise; all of it is retried with backoff.
_TRANSIENT = (ApiException, urllib3.exceptions.HTTPError, OSError, json.JSONDecodeError,
              _BadResponse)


@dataclass(frozen=True)
class ApiSettings:
    """How the threads talk to the API server (seconds unless said otherwise).

    The defaults suit production: a dead connection is noticed within about 25 s (keepalive)
    or 90 s (no bookmark on a connection that still answers TCP), and a change made during a
    partition is programmed well within a minute after it heals (at most ``request_timeout``
    for a connection attempt in flight, plus ``backoff_max``, plus one LIST). Tests shrink
    them all.
    """

    bookmarks: bool = True
    """Ask for BOOKMARK events (cheap resumes, and the heartbeat the read timeout relies on)."""
    min_watch_timeout: int = 300
    """Each watch asks the server to end it after a random ``timeoutSeconds`` between this
    and twice this (client-go's reflector: 5 minutes)."""
    bookmark_interval: float = 60.0
    """How often the server sends a watch a BOOKMARK (kube-apiserver: every minute)."""
    request_timeout: float = 30.0
    """Connect timeout; read timeout of lists; the grace added to the watch read timeout."""
    keepalive_idle: int = 10
    """Seconds a connection is quiet before the kernel probes its peer."""
    keepalive_interval: int = 5
    """Seconds between unanswered keepalive probes."""
    keepalive_count: int = 3
    """Unanswered probes after which the kernel ends the connection."""
    backoff_initial: float = 0.2
    """First wait after a failed request; the window doubles per failure ..."""
    backoff_max: float = 10.0
    """... up to this."""
    page_size: int = 500
    """Objects per LIST page."""

    def watch_timeout(self) -> int:
        """A ``timeoutSeconds`` for one watch: random in [min, 2 x min), as client-go does."""
        return int(self.min_watch_timeout * (1.0 + random.random()))

    def watch_read_timeout(self, timeout_seconds: int, *, bookmarks_arrive: bool) -> float:
        """How long a watch may stay silent before it is declared dead."""
        if self.bookmarks and bookmarks_arrive:
            return self.bookmark_interval + self.request_timeout
        # The server ends the stream after timeoutSeconds; the read timeout only catches a
        # connection that died without a word (keepalive normally notices much sooner).
        return timeout_seconds + self.request_timeout

    @property
    def dead_peer_timeout(self) -> int:
        """Seconds after which the kernel gives up on a peer that stopped answering."""
        return self.keepalive_idle + self.keepalive_interval * self.keepalive_count


def keepalive_socket_options(settings: ApiSettings) -> list[tuple[int, int, int]]:
    """urllib3 ``socket_options`` for API connections: its defaults plus TCP keepalive.

    ``TCP_USER_TIMEOUT`` bounds what keepalive cannot see: a request sent after the peer
    vanished sits unacknowledged, and keepalive probes only idle connections.
    """
    options = list(urllib3.connection.HTTPConnection.default_socket_options)
    options += [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, settings.keepalive_idle),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, settings.keepalive_interval),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.keepalive_count),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, settings.dead_peer_timeout * 1000),
    ]
    return options


@dataclass(frozen=True)
class _Resource:
    """One watched collection: its kind and the generated method that lists or watches it."""

    kind: Kind
    api_version: str
    list_call: Callable[..., Any]
    field_selector: str | None = None
    label_selector: str | None = None


def _resources(client: kubernetes.client.ApiClient, node_name: str) -> tuple[_Resource, ...]:
    core = kubernetes.client.CoreV1Api(client)
    discovery = kubernetes.client.DiscoveryV1Api(client)
    # kube-proxy's selector: what another proxy programs, and the slices of headless
    # Services, are never sent. A Service that gains one of the labels leaves the selection:
    # its watch sends DELETED, and its rules go.
    return (
        _Resource("Service", "v1", core.list_service_for_all_namespaces,
                  label_selector=PROXY_LABEL_SELECTOR),
        _Resource("EndpointSlice", "discovery.k8s.io/v1",
                  discovery.list_endpoint_slice_for_all_namespaces,
                  label_selector=PROXY_LABEL_SELECTOR),
        _Resource("Node", "v1", core.list_node, f"metadata.name={node_name}"),
    )


SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD = 60.0  # seconds a service-account token read is used (client-go: a minute)


def in_cluster_configuration(environ: Mapping[str, str] = os.environ,
                             account: Path = SERVICE_ACCOUNT) -> kubernetes.client.Configuration:
    """The pod's service account, as client-go's ``rest.InClusterConfig`` uses it.

    The API server is ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``, verified
    with ``ca.crt``; the ``token`` file is read again every minute (kubelet rotates projected
    tokens) and trimmed of surrounding whitespace, as client-go's file token source does. The
    Python client's own loader sends the file as it is: a token file ending in a newline
    made every request fail (http.client refuses a header value holding one).
    """
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    port = environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ApiConfigError("cannot use in-cluster configuration: KUBERNETES_SERVICE_HOST "
                             "and KUBERNETES_SERVICE_PORT are not set (not running in a pod?)")
    token_file, ca_file = account / "token", account / "ca.crt"
    if not ca_file.is_file():
        raise ApiConfigError(f"cannot use in-cluster configuration: {ca_file} is missing")
    configuration = kubernetes.client.Configuration(
        host=f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}")
    configuration.ssl_ca_cert = str(ca_file)
    try:
        _read_token(token_file, configuration)
    except OSError as err:
        raise ApiConfigError(f"cannot use in-cluster configuration: {err}") from err
    read_at = time.monotonic()

    def refresh(config: kubernetes.client.Configuration) -> None:
        nonlocal read_at
        if time.monotonic() - read_at < TOKEN_REREAD:
            return
        read_at = time.monotonic()
        try:
            _read_token(token_file, config)
        except OSError as err:
            logger.warning("%s; using the token read before", err)

    # The client calls the hook before each request. (Its stub types the attribute None.)
    configuration.refresh_api_key_hook = refresh  # type: ignore[assignment]
    return configuration


def _read_token(token_file: Path, configuration: kubernetes.client.Configuration) -> None:
    """Set the bearer token from ``token_file``, trimmed; OSError saying why it cannot."""
    try:
        token = token_file.read_text().strip()
    except OSError as err:
        raise OSError(f"cannot read the service account token {token_file}: "
                      f"{err.strerror or err}") from err
    if not token:
        raise OSError(f"the service account token {token_file} is empty")
    configuration.api_key["authorization"] = f"Bearer {token}"


def _client_from_config(kubeconfig: str | Path | None, settings: ApiSettings,
                        master: str | None = None) -> kubernetes.client.ApiClient:
    """An ApiClient from a kubeconfig file, or from the pod's service account without one;
    ``master`` (kube-proxy's --master) replaces the server address, and with no kubeconfig
    is the whole configuration (as client-go's BuildConfigFromFlags)."""
    if kubeconfig is None and master:
        configuration = kubernetes.client.Configuration()
    elif kubeconfig is None:
        configuration = in_cluster_configuration()
    else:
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), client_configuration=configuration)
        except kubernetes.config.ConfigException as err:
            raise ApiConfigError(f"cannot use kubeconfig {kubeconfig}: {err}") from err
    if master:
        configuration.host = master
    # Retries are ours (backoff, one warning per outage); urllib3's would add three instant
    # attempts and a warning each to every failed request.
    configuration.retries = 0
    configuration.socket_options = keepalive_socket_options(settings)
    return kubernetes.client.ApiClient(configuration)


class ApiSource:
    """Services, EndpointSlices and the Node ``node_name`` from the API server (list+watch).

    Without ``api_client``, the client is built from ``kubeconfig``, or from the in-cluster
    service account when that is None (configuration errors raise here, not in the threads);
    a client built here is closed by :meth:`stop`, one passed in is left to its owner (give it
    ``configuration.retries = 0`` and ``configuration.socket_options =
    keepalive_socket_options(settings)``, as built here, or urllib3 retries and logs on its
    own and a dead peer goes unnoticed until the read timeout). ``settings``: see
    :class:`ApiSettings`.
    """

    def __init__(
        self,
        node_name: str,
        *,
        kubeconfig: str | Path | None = None,
        api_client: kubernetes.client.ApiClient | None = None,
        settings: ApiSettings = ApiSettings(),
        master: str | None = None,
    ) -> None:
        self.status = SourceStatus()
        self._owns_client = api_client is None
        self._client = (api_client if api_client is not None
                        else _client_from_config(kubeconfig, settings, master))
        self._tracker = _StatusTracker(self.status)
        self._stopping = threading.Event()
        self._sink_lock = threading.Lock()
        self._reflectors = [
            _Reflector(resource, settings, self._tracker, self._stopping, self._send)
            for resource in _resources(self._client, node_name)
        ]
        self._threads: list[threading.Thread] = []
        self._sink: Sink | None = None

    def start(self, sink: Sink) -> None:
        """Start one list+watch thread per kind; returns at once."""
        self._sink = sink
        for reflector in self._reflectors:
            thread = threading.Thread(target=reflector.run, daemon=True,
                                      name=f"iptsync-watch-{reflector.kind}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """End every thread (open requests are cut short) and join them."""
        self._stopping.set()
        for reflector in self._reflectors:
            reflector.interrupt()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("%s did not stop within %.0f s", thread.name, JOIN_TIMEOUT)
        self._threads.clear()
        if self._owns_client:
            self._client.close()  # type: ignore[no-untyped-call]

    def _send(self, message: Snapshot | Change) -> None:
        assert self._sink is not None
        with self._sink_lock:
            self._sink(message)


class _StatusTracker:
    """Keeps :class:`SourceStatus` for all kinds; logs once per outage and on recovery."""

    def __init__(self, status: SourceStatus) -> None:
        self._status = status
        self._lock = threading.Lock()
        self._reachable: set[Kind] = set()
        self._in_outage = False

    def request_succeeded(self, kind: Kind) -> None:
        """A request for ``kind`` got an answer; connected once every kind has one."""
        with self._lock:
            self._reachable.add(kind)
            if len(self._reachable) < len(KINDS) or self._status.connected:
                return
            if self._in_outage:
                self._in_outage = False
                logger.info("Kubernetes API reachable again")
            # Status last: whoever sees it changed can rely on the log line being written.
            self._status.last_error = None
            self._status.connected = True

    def request_failed(self, kind: Kind, message: str) -> None:
        """A request for ``kind`` failed and will be retried."""
        with self._lock:
            self._reachable.discard(kind)
            if not self._in_outage:
                self._in_outage = True
                logger.warning("%s; retrying with backoff until it answers", message)
            self._status.connected = False
            self._status.last_error = message

    def relisted(self) -> None:
        """A LIST after the first one of a kind."""
        with self._lock:
            self._status.relists += 1

    def heard(self, kind: Kind) -> None:
        """The server said something about ``kind``: a response, an event or a bookmark."""
        with self._lock:
            self._status.last_heard[kind] = time.monotonic()

    def silence(self, kind: Kind) -> float:
        """Seconds since the server last said something about ``kind``."""
        with self._lock:
            return self._status.silence(time.monotonic()).get(kind, 0.0)

    def event(self, kind: Kind) -> None:
        """A watch event became a Change."""
        with self._lock:
            self._status.events[kind] = self._status.events.get(kind, 0) + 1


class _Reflector:
    """The list+watch loop of one kind, run in its own thread."""

    def __init__(self, resource: _Resource, settings: ApiSettings, tracker: _StatusTracker,
                 stopping: threading.Event, send: Callable[[Snapshot | Change], None]) -> None:
        self.kind = resource.kind
        self._resource = resource
        self._settings = settings
        self._tracker = tracker
        self._stopping = stopping
        self._send = send
        self._resource_version: str | None = None  # None: a LIST is due
        self._listed = False
        self._bookmarks_arrive = False  # arms the read timeout sized from bookmark_interval
        self._silent_since: float | None = None  # when a watch declared dead went silent
        self._response_lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None

    def run(self) -> None:
        """Thread body: one request cycle after another until stopped."""
        try:
            while not self._stopping.is_set():
                self._retrying()(self._cycle)
        except Exception as err:
            if self._stopping.is_set():
                return  # stop() cut a request short
            logger.exception("list+watch of %s stopped", self.kind)
            self._tracker.request_failed(self.kind, f"list+watch of {self.kind} stopped: {err}")

    def interrupt(self) -> None:
        """Cut the open request short: shutting the socket down ends a blocked read."""
        with self._response_lock:
            if self._response is not None:
                _shut_down(self._response)

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_TRANSIENT),
            wait=tenacity.wait_random_exponential(multiplier=self._settings.backoff_initial,
                                                  min=self._settings.backoff_initial,
                                                  max=self._settings.backoff_max),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._sleep,
            before_sleep=self._report_failure,
            reraise=True,
        )

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _report_failure(self, state: tenacity.RetryCallState) -> None:
        assert state.outcome is not None
        error = state.outcome.exception()
        verb = "list" if self._resource_version is None else "watch"
        self._tracker.request_failed(
            self.kind, f"cannot {verb} {self.kind} objects: {describe_error(error)}")

    def _cycle(self) -> None:
        """One request: a LIST when due, else a WATCH streamed until it ends."""
        try:
            if self._resource_version is None:
                self._list()
            else:
                self._watch()
        except _Expired as err:
            logger.info("%s: %s; listing again", self.kind, err)
            self._resource_version = None

    # --- LIST ---

    def _list(self) -> None:
        objects: list[Manifest] = []
        token: str | None = None
        while True:
            page = self._list_page(token)
            objects.extend(self._with_kind(item) for item in page.get("items") or ())
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                break
        resource_version = str(metadata.get("resourceVersion") or "")
        if not resource_version:
            raise _BadResponse(f"{self.kind} list without metadata.resourceVersion")
        if self._listed:
            self._tracker.relisted()
        self._listed = True
        self._resource_version = resource_version
        if self._silent_since is not None:
            logger.info("%s objects listed again (%d) after a dead watch, %.1f s after the API "
                        "server went silent", self.kind, len(objects),
                        time.monotonic() - self._silent_since)
            self._silent_since = None
        self._send(Snapshot(self.kind, tuple(objects), resource_version))

    def _list_page(self, token: str | None) -> dict[str, Any]:
        timeout = self._settings.request_timeout
        with self._request(limit=self._settings.page_size, _continue=token,
                           _request_timeout=(timeout, timeout)) as response:
            page = json.loads(response.data)
        if not isinstance(page, dict):
            raise _BadResponse(f"{self.kind} list is not a JSON object")
        return page

    def _with_kind(self, item: Any) -> Manifest:
        if not isinstance(item, dict):
            raise _BadResponse(f"{self.kind} list item is not a JSON object")
        item.setdefault("kind", self.kind)
        item.setdefault("apiVersion", self._resource.api_version)
        return item

    # --- WATCH ---

    def _watch(self) -> None:
        settings = self._settings
        timeout_seconds = settings.watch_timeout()
        read_timeout = settings.watch_read_timeout(timeout_seconds,
                                                   bookmarks_arrive=self._bookmarks_arrive)
        with self._request(
            watch=True,
            resource_version=self._resource_version,
            allow_watch_bookmarks=settings.bookmarks,
            timeout_seconds=timeout_seconds,
            _request_timeout=(settings.request_timeout, read_timeout),
        ) as response:
            armed = self._bookmarks_arrive
            try:
                for line in _lines(response):
                    self._tracker.heard(self.kind)
                    self._handle(json.loads(line))
                    if self._bookmarks_arrive and not armed:
                        # The first bookmark proves the server sends them: arm this stream.
                        armed = True
                        _set_read_timeout(response, settings.watch_read_timeout(
                            timeout_seconds, bookmarks_arrive=True))
            except (urllib3.exceptions.HTTPError, OSError) as err:
                if self._stopping.is_set():
                    return
                if _timed_out(err):
                    self._declare_dead(_why_dead(err))
                else:
                    logger.info("watch of %s broke (%s); watching again from %s",
                                self.kind, describe_error(err), self._resource_version)

    def _declare_dead(self, reason: str) -> None:
        """Nothing arrived for too long (read timeout or keepalive): list again."""
        silence = self._tracker.silence(self.kind)
        logger.warning("watch of %s declared dead: nothing from the API server for %.1f s "
                       "(%s); reconnecting and listing again", self.kind, silence, reason)
        self._silent_since = time.monotonic() - silence
        self._resource_version = None

    def _handle(self, event: Any) -> None:
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise _BadResponse(f"{self.kind} watch event without an object: {event!r:.200}")
        event_type = event.get("type")
        if event_type == "ERROR":
            raise _error_event(obj)
        if event_type in ("ADDED", "MODIFIED", "DELETED"):
            action: _Action = "delete" if event_type == "DELETED" else "upsert"
            manifest = self._with_kind(obj)
            self._tracker.event(self.kind)
            self._send(Change(self.kind, action, manifest, _resource_version_of(manifest)))
        elif event_type == "BOOKMARK":
            self._bookmarks_arrive = True
        else:
            logger.warning("ignoring %s watch event of unknown type %r", self.kind, event_type)
            return
        self._resource_version = _resource_version_of(obj) or self._resource_version

    # --- HTTP ---

    @contextlib.contextmanager
    def _request(self, **params: Any) -> Iterator[urllib3.BaseHTTPResponse]:
        """The raw response of one list or watch request, registered for :meth:`interrupt`."""
        try:
            response = self._resource.list_call(
                field_selector=self._resource.field_selector,
                label_selector=self._resource.label_selector, _preload_content=False, **params)
        except ApiException as err:
            if err.status == 410:
                self._tracker.request_succeeded(self.kind)
                raise _Expired(describe_error(err)) from err
            raise
        self._tracker.request_succeeded(self.kind)
        self._tracker.heard(self.kind)
        with self._response_lock:
            self._response = response
            if self._stopping.is_set():
                _shut_down(response)  # stop() ran before the response was registered
        try:
            yield response
        finally:
            with self._response_lock:
                self._response = None
            response.close()
            response.release_conn()


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The non-empty lines of a streamed body, each as soon as its newline arrives."""
    pending: list[bytes] = []
    for chunk in response.stream(None):
        *complete, rest = chunk.split(b"\n")
        if complete:
            first = b"".join([*pending, complete[0]])
            pending = []
            yield from (line for line in (first, *complete[1:]) if line.strip())
        pending.append(rest)
    if b"".join(pending).strip():
        raise _BadResponse("watch stream ended in the middle of an event")


def _timed_out(error: BaseException) -> bool:
    """Whether a broken stream timed out (read timeout, or keepalive's ETIMEDOUT)."""
    return (isinstance(error, (urllib3.exceptions.ReadTimeoutError, TimeoutError))
            or isinstance(error.__cause__, TimeoutError))


def _why_dead(error: BaseException) -> str:
    """What gave up on a timed-out stream: the kernel (keepalive) or the read timeout."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, OSError) and cause.errno == errno.ETIMEDOUT:
        return "TCP keepalive: the server's host stopped answering"
    return "read timeout: no event or bookmark in time"


def _error_event(status: dict[str, Any]) -> Exception:
    """The exception an ``ERROR`` watch event (a metav1.Status) stands for."""
    text = f"{status.get('code')} {status.get('reason')}: {status.get('message')}"
    if status.get("code") == 410:
        return _Expired(text)
    return _BadResponse(f"watch error {text}")


def _resource_version_of(obj: Manifest) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _socket(response: urllib3.BaseHTTPResponse) -> Any:
    """The response's socket (plain or TLS), or None once the connection is released."""
    return getattr(getattr(response, "connection", None), "sock", None)


def _shut_down(response: urllib3.BaseHTTPResponse) -> None:
    """Shut the response's socket down (close() could block behind an SSL read's lock)."""
    sock = _socket(response)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _set_read_timeout(response: urllib3.BaseHTTPResponse, seconds: float) -> None:
    """Change the read timeout of a response being streamed (it applies to each read)."""
    sock = _socket(response)
    if sock is not None:
        sock.settimeout(seconds)


def describe_error(error: BaseException | None) -> str:
    """A one-line reason for a failed request, for logs and ``status.last_error``."""
    if isinstance(error, ApiException):
        message = _status_message(error.body)
        return f"HTTP {error.status} {error.reason}" + (f": {message}" if message else "")
    if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
        # urllib3's connection errors carry (connection object, message): the message says it.
        return str(error.reason.args[-1] if error.reason.args else error.reason)
    return f"{type(error).__name__}: {error}"


def _status_message(body: Any) -> str:
    """The ``message`` of a metav1.Status body, or "" when the body is not one."""
    try:
        status = json.loads(body)
    except (TypeError, ValueError):
        return ""
    return str(status.get("message") or "") if isinstance(status, dict) else ""
