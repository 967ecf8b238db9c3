"""Drive the lab: ``iptsync run --once`` on each node, then batches of TCP requests.

Why: these are the two things the lab does to its namespaces before it judges them. Each
returns plain data (:class:`NodeSync`, :class:`Probe`) that the checks and the report read;
nothing here decides whether what came back is right. Every service address is asked in each
IP family the service has: an IPv6 cluster IP from the client pod's IPv6 address, a NodePort
on each node's IPv6 address, an IPv6 load-balancer IP from the external client's.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from iptsync.lab import netns
from iptsync.lab.echo import join_host_port
from iptsync.lab.scenario import Scenario
from iptsync.lab.topology import Cluster, Reply

REQUEST_TIMEOUT = 1.0
"""Seconds one request may take; the echo servers answer in well under a millisecond."""
FIRST_BATCH = 3
"""Requests sent first to each target; if none is answered the rest are not sent (fail fast)."""
SYNC_TIMEOUT = 60.0


@dataclass(frozen=True)
class NodeSync:
    """How ``iptsync run --once`` went on one node."""

    node: str
    ok: bool
    seconds: float
    detail: str


@dataclass(frozen=True)
class Probe:
    """A batch of TCP requests to one target and what came back."""

    section: str
    """``cluster-ip``, ``nodeport`` or ``load-balancer``."""
    family: str
    """``IPv4`` or ``IPv6``: the family of the address asked."""
    service: str
    source: str
    """Namespace key the requests were sent from (``pod:client1``, ``client``)."""
    source_ip: str
    ip: str
    port: int
    expected: tuple[str, ...]
    """Pods that should answer."""
    sent: int
    answered: Mapping[str, int]
    """Answering server -> number of requests it answered."""
    errors: Mapping[str, int]
    """Error word (``timeout``, ``refused``, ...) -> number of requests that failed so."""
    seen_as: Mapping[str, int]
    """Source IP the servers saw -> number of requests."""

    @property
    def target(self) -> str:
        return join_host_port(self.ip, self.port)

    @property
    def ok_count(self) -> int:
        return sum(self.answered.values())

    @property
    def missing(self) -> tuple[str, ...]:
        """Expected pods that answered no request."""
        return tuple(pod for pod in self.expected if not self.answered.get(pod))

    @property
    def unexpected(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.answered) - set(self.expected)))

    @property
    def every_pod_answered(self) -> bool:
        """All requests answered, by every expected pod and by no other."""
        return (self.sent > 0 and self.ok_count == self.sent and not self.missing
                and not self.unexpected)


_LOG_LINE = re.compile(r"^\S+ \S+ (?:\w+) [\w.]+: (.*)$")
_TIMINGS = re.compile(r";?\s*(?:\w+=[\d.]+ms\s*)+$")
"""The per-phase timings at the end of a sync's log line (the report shows the wall time)."""
_SYNCED = re.compile(r"^(?:IPv[46]: )?full sync: ")
"""A family's sync line (``IPv6: full sync: ...``; no family named on a single-stack node)."""


def sync_node(cluster: Cluster, node: str, backend: str, scenario: Scenario) -> NodeSync:
    """Run ``iptsync run --once`` inside ``node``'s namespace, like the data-plane tests do:
    one sync per IP family the node has an address of."""
    argv = netns.python_argv(
        "iptsync.cli", "run", "--once", "--iptables-backend", backend,
        "--objects", str(scenario.manifests), "--hostname-override", node,
        "--cluster-cidr", scenario.cluster_cidrs,
        # The lab's nodes share one host's /run: each syncs from scratch instead.
        "--render-cache-dir", "",
    )
    start = time.monotonic()
    try:
        proc = cluster.exec(node, argv, check=False, timeout=SYNC_TIMEOUT)
    except netns.NetnsError as exc:
        return NodeSync(node, False, time.monotonic() - start, str(exc))
    seconds = time.monotonic() - start
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    messages = [m.group(1) if (m := _LOG_LINE.match(line)) else line for line in lines]
    messages = [_TIMINGS.sub("", message) for message in messages]
    if proc.returncode != 0:
        detail = "; ".join(messages[-3:]) or f"exit status {proc.returncode}"
        return NodeSync(node, False, seconds, detail)
    synced = [message for message in messages if _SYNCED.match(message)]
    return NodeSync(node, True, seconds, "; ".join(synced or messages[-1:]))


def probe(cluster: Cluster, *, section: str, service: str, source: str, source_ip: str,
          ip: str, port: int, expected: tuple[str, ...], count: int) -> Probe:
    """Send ``count`` TCP requests (each a new connection) from ``source`` to ``ip:port``.

    The first :data:`FIRST_BATCH` go alone; when none of them is answered the rest are not
    sent, so a broken path fails in seconds instead of ``count`` timeouts.
    """
    first = min(count, FIRST_BATCH)
    replies: list[Reply] = cluster.ask(source, "tcp", ip, port, count=first,
                                       timeout=REQUEST_TIMEOUT)
    if count > first and any(reply.ok for reply in replies):
        replies += cluster.ask(source, "tcp", ip, port, count=count - first,
                               timeout=REQUEST_TIMEOUT)
    return Probe(
        section=section, family="IPv6" if ":" in ip else "IPv4", service=service,
        source=source, source_ip=source_ip, ip=ip,
        port=port, expected=expected, sent=len(replies),
        answered=dict(Counter(r.server for r in replies if r.ok and r.server)),
        errors=dict(Counter(r.error or "unknown" for r in replies if not r.ok)),
        seen_as=dict(Counter(r.seen_as_ip for r in replies if r.ok and r.seen_as_ip)),
    )


def probe_services(cluster: Cluster, scenario: Scenario, requests: int) -> tuple[Probe, ...]:
    """Every service address, in each family the service has, from where a user would use
    it: each cluster IP from the in-cluster client pod, each NodePort on every node address
    and each load-balancer IP from the external client."""
    client = scenario.client_pod
    client_ips = {"IPv4": client.ip, "IPv6": client.ip6}
    outside = {"IPv4": scenario.client_ip, "IPv6": scenario.client_ip6}
    probes: list[Probe] = []
    for s in scenario.services:
        for family in s.families:
            ip, source_ip = s.cluster_ip_of(family), client_ips[family]
            if ip is not None and source_ip is not None and s.port is not None:
                probes.append(probe(cluster, section="cluster-ip", service=s.name,
                                    source=f"pod:{client.name}", source_ip=source_ip, ip=ip,
                                    port=s.port, expected=scenario.pods_of(s.name),
                                    count=requests))
    probes += [probe(cluster, section="nodeport", service=s.name, source="client",
                     source_ip=outside[family], ip=node_ip, port=s.node_port,
                     expected=scenario.pods_of(s.name), count=requests)
               for s in scenario.services if s.node_port is not None
               for family in s.families
               for node_ip in scenario.node_ips_of(family).values()]
    probes += [probe(cluster, section="load-balancer", service=s.name, source="client",
                     source_ip=outside[family], ip=lb_ip, port=s.port,
                     expected=scenario.pods_of(s.name), count=requests)
               for s in scenario.services for family in s.families
               if (lb_ip := s.lb_ip_of(family)) is not None and s.port is not None]
    return tuple(probes)
