"""HTTP endpoints: ``/healthz`` and ``/livez``, ``/metrics``, and service health check ports.

Semantics follow kube-proxy's:

- ``/livez`` answers 200 while the rules are fresh: no change has been waiting longer than the
  timeout (2 x ``--sync-period``) without a successful sync, in any IP family the node
  programs. Start-up counts as a queued change, so a node that never manages its first sync
  turns unhealthy. The body is JSON with ``lastUpdated``, ``currentTime``, ``healthy`` and
  ``status`` (``lastUpdated`` and ``healthy`` per family).
- ``/healthz`` answers the same, except that it also answers 503 while the node is not
  eligible for load-balancer traffic (KEP-3836): its Node object has a deletionTimestamp, the
  cluster autoscaler's ``ToBeDeletedByClusterAutoscaler`` taint, or is gone. Load balancers
  probing it drain the node before it goes; the body adds ``nodeEligible``. Until the first
  Node object arrives the node counts as eligible, as in kube-proxy.
- For every service with ``externalTrafficPolicy: Local`` and a ``healthCheckNodePort``, a
  server on that port answers 200 with the number of local ready endpoints when there are
  some, else 503, so cloud load balancers stop sending traffic to nodes without endpoints;
  the ``X-Load-Balancing-Endpoint-Weight`` header carries that number (load balancers that
  weigh nodes by it, such as Google's WEIGHTED_MAGLEV, spread traffic by endpoints).

The listeners never resolve names: Python's ``HTTPServer`` looks its own address up in DNS
(``socket.getfqdn``) when it binds, which took about 10 s per listener on a node whose DNS did
not answer yet, exactly when a node proxy starts.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from iptsync.agent.metrics import Metrics
from iptsync.core.model import NodeInfo

log = logging.getLogger(__name__)

ENDPOINT_WEIGHT_HEADER = "X-Load-Balancing-Endpoint-Weight"
BIND_RETRY_INTERVAL = 5.0  # seconds between attempts on a busy address (kube-proxy's)


class HealthState:
    """When changes were queued and when rules were last synced (wall clock, seconds), per IP
    family: like kube-proxy's, one ``/healthz`` for every family, unhealthy while any one of
    them has had a change waiting longer than the timeout."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.time,
                 families: Iterable[str] = ("IPv4",)) -> None:
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._queued: dict[str, float | None] = {}  # oldest change still waiting
        self._updated: dict[str, float | None] = {}
        self.track(families)
        self.node_eligible = True  # until a Node object says otherwise (kube-proxy's start)

    def track(self, families: Iterable[str]) -> None:
        """Watch these families too; the first sync of each is owed from now (start-up)."""
        with self._lock:
            for family in families:
                if family not in self._queued:
                    self._queued[family] = self.clock()
                    self._updated[family] = None

    def queued(self, family: str | None = None) -> None:
        """A change is waiting for ``family`` (None: every family)."""
        with self._lock:
            for name in self._families(family):
                if self._queued[name] is None:
                    self._queued[name] = self.clock()  # the oldest change still waiting counts

    def updated(self, family: str | None = None) -> None:
        """``family`` (None: every family) holds every change queued so far."""
        with self._lock:
            for name in self._families(family):
                self._updated[name] = self.clock()
                self._queued[name] = None

    def _families(self, family: str | None) -> list[str]:
        """The tracked families ``family`` names (None: all); an untracked one is none."""
        return list(self._queued) if family is None else [f for f in self._queued if f == family]

    @property
    def last_updated(self) -> float | None:
        """The last successful sync of any family."""
        with self._lock:
            return max((u for u in self._updated.values() if u is not None), default=None)

    def healthy_families(self) -> dict[str, bool]:
        with self._lock:
            now = self.clock()
            return {family: waiting is None or now - waiting < self.timeout
                    for family, waiting in self._queued.items()}

    def healthy(self) -> bool:
        return all(self.healthy_families().values())

    def node_changed(self, node: NodeInfo | None) -> None:
        """Follow this node's Node object (None: it was deleted) for ``/healthz``."""
        reason = "its Node object was deleted" if node is None else node.draining
        with self._lock:
            was, self.node_eligible = self.node_eligible, reason is None
        if was and reason is not None:
            log.info("node is draining: %s; /healthz answers 503 so that load balancers stop "
                     "sending it new connections (/livez and the rules are unaffected)", reason)
        elif not was and reason is None:
            log.info("node is eligible again: /healthz answers 200 while the rules are fresh")

    def livez(self) -> tuple[int, dict[str, Any]]:
        """``/livez``: fresh rules or not, whatever the node's state."""
        return (200 if self.healthy() else 503), self.body()

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """``/healthz``: fresh rules on a node eligible for load-balancer traffic."""
        eligible = self.node_eligible
        status = 200 if self.healthy() and eligible else 503
        return status, {**self.body(), "nodeEligible": eligible}

    def body(self) -> dict[str, Any]:
        """What /livez answers (/healthz adds nodeEligible): times, and health per family."""
        def iso(stamp: float | None) -> str:
            return "" if stamp is None else datetime.fromtimestamp(stamp, UTC).isoformat()

        families = self.healthy_families()
        with self._lock:
            status = {family: {"lastUpdated": iso(self._updated[family]), "healthy": ok}
                      for family, ok in families.items()}
        return {"lastUpdated": iso(self.last_updated), "currentTime": iso(self.clock()),
                "healthy": all(families.values()), "status": status}


def parse_bind_address(text: str, what: str) -> tuple[str, int]:
    """``host:port`` (``0.0.0.0:10256``); an empty host means every address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Reply(NamedTuple):
    """What a server answers a GET with."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class _Listener(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind sets server_name from socket.getfqdn(host), a reverse DNS
        # lookup; nothing here reads server_name, and a node's DNS may not answer yet.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Listener6(_Listener):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # Both families on "::" (as Go's ":port"): an IPv6-only or dual-stack node's load
        # balancer may check either address.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _listen(address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> _Listener:
    """Listen on an IPv4 or IPv6 address; an empty host means both families where the node
    has IPv6 (else IPv4 alone)."""
    host, port = address
    if ":" in host:
        return _Listener6((host, port), handler)
    if host:
        return _Listener((host, port), handler)
    try:
        return _Listener6(("::", port), handler)
    except OSError as err:
        if err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        return _Listener(("", port), handler)


class HttpServer:
    """A threaded HTTP server answering GETs with ``respond(path) -> Reply``."""

    def __init__(self, address: tuple[str, int], respond: Callable[[str], Reply]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                reply = respond(self.path.split("?", 1)[0])
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for name, value in reply.headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        self.httpd = _listen(address, Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name=f"http-{address[1]}")
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class PendingServer:
    """A server whose address was busy: tried again every ``interval`` seconds until it
    listens or :meth:`close` (kube-proxy retries its health and metrics servers so, unless
    ``--bind-address-hard-fail``). The old proxy of a node being switched over may still hold
    the port for a while."""

    def __init__(self, start: Callable[[], HttpServer], what: str,
                 interval: float = BIND_RETRY_INTERVAL) -> None:
        self.server: HttpServer | None = None
        self._start = start
        self._what = what
        self._interval = interval
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"bind-{what}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                server = self._start()
            except OSError as err:
                log.debug("%s: still cannot listen: %s", self._what, err)
                continue
            with self._lock:
                if self._stopping.is_set():
                    server.close()
                    return
                self.server = server
            log.info("%s: listening now", self._what)
            return

    def close(self) -> None:
        with self._lock:
            self._stopping.set()
            server = self.server
        self._thread.join(timeout=5)
        if server is not None:
            server.close()


def _json(status: int, body: Mapping[str, Any], headers: tuple[tuple[str, str], ...] = (),
          ) -> Reply:
    return Reply(status, "application/json", json.dumps(body).encode() + b"\n", headers)


NOT_FOUND = Reply(404, "text/plain", b"not found\n")


class HealthServer(HttpServer):
    """``/healthz`` and ``/livez``, each answer counted in kube-proxy's metrics."""

    def __init__(self, address: tuple[str, int], state: HealthState,
                 metrics: Metrics | None = None) -> None:
        def respond(path: str) -> Reply:
            if path == "/healthz":
                status, body = state.healthz()
                counter = metrics.healthz_answers if metrics else None
            elif path == "/livez":
                status, body = state.livez()
                counter = metrics.livez_answers if metrics else None
            else:
                return NOT_FOUND
            if counter is not None:
                counter.labels(str(status)).inc()
            return _json(status, body)

        super().__init__(address, respond)


class MetricsServer(HttpServer):
    """``/metrics`` in the Prometheus text format (and ``/healthz``, as kube-proxy has)."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 state: HealthState) -> None:
        def respond(path: str) -> Reply:
            if path == "/metrics":
                return Reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            if path == "/healthz":
                return _json(*state.healthz())
            if path == "/livez":
                return _json(*state.livez())
            return NOT_FOUND

        super().__init__(address, respond)


@dataclass(frozen=True)
class ServiceHealth:
    """What one health check node port reports."""

    namespace: str
    name: str
    local_endpoints: int


class ServiceHealthServers:
    """One HTTP server per health check node port, kept in line with the services."""

    def __init__(self, host: str = "", proxy_healthy: Callable[[], bool] = lambda: True) -> None:
        self.host = host
        self.proxy_healthy = proxy_healthy
        self._servers: dict[int, HttpServer] = {}
        self._health: dict[int, ServiceHealth] = {}

    def update(self, wanted: Mapping[int, ServiceHealth]) -> None:
        """Serve exactly the ports in ``wanted``; a port that cannot be bound is logged."""
        self._health = dict(wanted)
        for port in [p for p in self._servers if p not in wanted]:
            self._servers.pop(port).close()
        for port in wanted:
            if port in self._servers:
                continue
            try:
                self._servers[port] = HttpServer((self.host, port), self._responder(port))
            except OSError as err:
                log.error("cannot serve the health check node port %d of %s/%s: %s", port,
                          wanted[port].namespace, wanted[port].name, err)

    def _responder(self, port: int) -> Callable[[str], Reply]:
        def respond(path: str) -> Reply:
            health = self._health.get(port)
            if health is None:
                return NOT_FOUND
            proxy_ok = self.proxy_healthy()
            ok = health.local_endpoints > 0 and proxy_ok
            return _json(200 if ok else 503, {
                "service": {"namespace": health.namespace, "name": health.name},
                "localEndpoints": health.local_endpoints, "serviceProxyHealthy": proxy_ok},
                ((ENDPOINT_WEIGHT_HEADER, str(health.local_endpoints)),))

        return respond

    def close(self) -> None:
        self.update({})
