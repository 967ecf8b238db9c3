"""HTTP endpoints: ``/healthz`` and ``/livez``, ``/metrics``, and service health check ports.

Semantics follow kube-proxy's:

- ``/healthz`` and ``/livez`` answer 200 while the rules are fresh: no change has been waiting
  longer than the timeout (2 x ``--sync-period``) without a successful sync, in any IP family
  the node programs. Start-up counts as a queued change, so a node that never manages its
  first sync turns unhealthy. The body is JSON with ``lastUpdated``, ``currentTime``,
  ``nodeEligible``, ``healthy`` and ``status`` (``lastUpdated`` and ``healthy`` per family).
- For every service with ``externalTrafficPolicy: Local`` and a ``healthCheckNodePort``, a
  server on that port answers 200 with the number of local ready endpoints when there are
  some, else 503, so cloud load balancers stop sending traffic to nodes without endpoints.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


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

    def body(self) -> dict[str, Any]:
        def iso(stamp: float | None) -> str:
            return "" if stamp is None else datetime.fromtimestamp(stamp, UTC).isoformat()

        families = self.healthy_families()
        with self._lock:
            status = {family: {"lastUpdated": iso(self._updated[family]), "healthy": ok}
                      for family, ok in families.items()}
        return {"lastUpdated": iso(self.last_updated), "currentTime": iso(self.clock()),
                "nodeEligible": True, "healthy": all(families.values()), "status": status}


def parse_bind_address(text: str, what: str) -> tuple[str, int]:
    """``host:port`` (``0.0.0.0:10256``); an empty host means every address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class HttpServer:
    """A threaded HTTP server answering GETs with ``respond(path) -> (status, type, body)``."""

    def __init__(self, address: tuple[str, int],
                 respond: Callable[[str], tuple[int, str, bytes]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, content_type, body = respond(self.path.split("?", 1)[0])
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        self.httpd = ThreadingHTTPServer(address, Handler)
        self.httpd.daemon_threads = True
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


def _json(status: int, body: Mapping[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode() + b"\n"


class HealthServer(HttpServer):
    """``/healthz`` and ``/livez``."""

    def __init__(self, address: tuple[str, int], state: HealthState) -> None:
        def respond(path: str) -> tuple[int, str, bytes]:
            if path not in ("/healthz", "/livez"):
                return 404, "text/plain", b"not found\n"
            return _json(200 if state.healthy() else 503, state.body())

        super().__init__(address, respond)


class MetricsServer(HttpServer):
    """``/metrics`` in the Prometheus text format (and ``/healthz``, as kube-proxy has)."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 state: HealthState) -> None:
        def respond(path: str) -> tuple[int, str, bytes]:
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
            if path in ("/healthz", "/livez"):
                return _json(200 if state.healthy() else 503, state.body())
            return 404, "text/plain", b"not found\n"

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

    def _responder(self, port: int) -> Callable[[str], tuple[int, str, bytes]]:
        def respond(path: str) -> tuple[int, str, bytes]:
            health = self._health.get(port)
            if health is None:
                return 404, "text/plain", b"not found\n"
            proxy_ok = self.proxy_healthy()
            ok = health.local_endpoints > 0 and proxy_ok
            return _json(200 if ok else 503, {
                "service": {"namespace": health.namespace, "name": health.name},
                "localEndpoints": health.local_endpoints, "serviceProxyHealthy": proxy_ok})

        return respond

    def close(self) -> None:
        self.update({})
