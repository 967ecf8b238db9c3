"""Prometheus metrics under kube-proxy's names, so existing dashboards and alerts keep working.

Everything lives in one :class:`Metrics` object with its own registry (tests create as many
agents as they like). kube-proxy's metrics keep their names, types, buckets and labels
(``ip_family`` where kube-proxy has it); what iptsync adds is prefixed ``iptsync_``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# kube-proxy's buckets: exponential from 1 ms for sync durations ...
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# ... and 0.25 s to 5 min for network programming latency.
PROGRAMMING_BUCKETS = (
    *(0.25 * i for i in range(1, 3)),
    *(float(i) for i in range(1, 60)),
    *(60.0 + 5 * i for i in range(12)),
    *(120.0 + 30 * i for i in range(7)),
)


# kube-proxy's label for the IP family a metric is about ("IPv4", "IPv6"): on its sync,
# restore, rule count and programming latency metrics, and here on iptsync's per-sync ones.
FAMILY = ["ip_family"]


class Metrics:
    """The agent's metrics; :attr:`registry` is what ``/metrics`` serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds", FAMILY, buckets=SYNC_BUCKETS, registry=r)
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs", FAMILY, buckets=SYNC_BUCKETS,
            registry=r)
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs", FAMILY, buckets=SYNC_BUCKETS,
            registry=r)
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced", FAMILY, registry=r)
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", FAMILY, registry=r)
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds", FAMILY,
            buckets=PROGRAMMING_BUCKETS, registry=r)
        self.rules = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy", ["table", *FAMILY],
            registry=r)
        self.restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures", FAMILY, registry=r)
        self.partial_restore_failures = Counter(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures", FAMILY, registry=r)
        self.endpoint_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes", registry=r)
        self.endpoint_changes = Counter(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_changes_pending = Gauge(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes", registry=r)
        self.service_changes = Counter(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes", registry=r)
        self.rules_last = Gauge(
            "kubeproxy_sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync", ["table", *FAMILY],
            registry=r)
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy", *FAMILY], registry=r)
        self.healthz_answers = Counter(
            "kubeproxy_proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"],
            registry=r)
        self.livez_answers = Counter(
            "kubeproxy_proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"],
            registry=r)
        # iptsync's own.
        self.phase_duration = Histogram(
            "iptsync_sync_phase_duration_seconds",
            "Time spent in each phase of a sync (render, read, plan, apply, conntrack)",
            ["phase", *FAMILY], buckets=SYNC_BUCKETS, registry=r)
        self.syncs = Counter(
            "iptsync_syncs_total", "Syncs by kind (full or partial) and result",
            ["kind", "result", *FAMILY], registry=r)
        self.drift = Counter(
            "iptsync_drift_repairs_total",
            "Chains (or jumps) found changed by something else and repaired",
            ["table", *FAMILY], registry=r)
        self.undo_failures = Counter(
            "iptsync_undo_failures_total",
            "Tables whose undo after a failed restore was rejected too (they keep part of "
            "the failed batch until the next full sync)", ["table", *FAMILY], registry=r)
        self.outside_changes = Counter(
            "iptsync_outside_changes_total",
            "Changes by other programs the change watch reported, by how they were handled: "
            "chains (those chains read and repaired) or full (everything compared)",
            ["how", *FAMILY], registry=r)
        self.canary_missing = Counter(
            "iptsync_canary_missing_total",
            "Times the canary chain was found missing (tables flushed)", FAMILY,
            registry=r)
        self.invalid_objects = Gauge(
            "iptsync_invalid_objects",
            "Objects currently rejected (or partly dropped) as invalid", ["kind"], registry=r)
        self.source_connected = Gauge(
            "iptsync_source_connected", "1 when the object source is reachable", registry=r)
        self.watch_staleness = Gauge(
            "iptsync_watch_staleness_seconds",
            "Seconds since the API server last sent anything for this kind (a list or watch "
            "response, an event, a bookmark)",
            ["kind"], registry=r)
        self.file_errors = Counter(
            "iptsync_objects_file_errors_total",
            "Times an --objects file or path was found unreadable, unparsable or without any "
            "object (what it last yielded stays in use)", registry=r)
