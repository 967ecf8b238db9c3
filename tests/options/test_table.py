"""The table of kube-proxy's options is complete (every flag and field of kube-proxy 1.34)
and docs/comparison.md shows it as it is."""

from __future__ import annotations

import runpy
from pathlib import Path

from iptsync.kubeproxy import BY_FIELD, BY_FLAG, OPTIONS, markdown_table

ROOT = Path(__file__).resolve().parents[2]

# kube-proxy 1.34's flags: cmd/kube-proxy/app/options.go (AddFlags) and the logging flags of
# k8s.io/component-base/logs/api/v1 (logsapi.AddFlags).
KUBE_PROXY_FLAGS = {
    "config", "write-config-to", "cleanup", "feature-gates", "kubeconfig", "master",
    "kube-api-content-type", "kube-api-burst", "kube-api-qps", "hostname-override",
    "bind-address", "healthz-bind-address", "metrics-bind-address", "bind-address-hard-fail",
    "profiling", "show-hidden-metrics-for-version", "init-only", "proxy-mode",
    "iptables-masquerade-bit", "masquerade-all", "iptables-localhost-nodeports",
    "iptables-sync-period", "iptables-min-sync-period", "ipvs-sync-period",
    "ipvs-min-sync-period", "ipvs-scheduler", "ipvs-exclude-cidrs", "ipvs-strict-arp",
    "ipvs-tcp-timeout", "ipvs-tcpfin-timeout", "ipvs-udp-timeout", "detect-local-mode",
    "pod-bridge-interface", "pod-interface-name-prefix", "cluster-cidr", "nodeport-addresses",
    "oom-score-adj", "conntrack-max-per-core", "conntrack-min",
    "conntrack-tcp-timeout-established", "conntrack-tcp-timeout-close-wait",
    "conntrack-tcp-be-liberal", "conntrack-udp-timeout", "conntrack-udp-timeout-stream",
    "config-sync-period", "healthz-port", "metrics-port",
    "v", "vmodule", "logging-format", "log-flush-frequency", "log-json-info-buffer-size",
    "log-json-split-stream", "log-text-info-buffer-size", "log-text-split-stream",
}
# KubeProxyConfiguration v1alpha1's fields: staging/src/k8s.io/kube-proxy/config/v1alpha1/
# types.go, with component-base's ClientConnectionConfiguration and LoggingConfiguration.
V1ALPHA1_FIELDS = {
    "featureGates", "clientConnection.kubeconfig", "clientConnection.acceptContentTypes",
    "clientConnection.contentType", "clientConnection.qps", "clientConnection.burst",
    "logging.format", "logging.flushFrequency", "logging.verbosity", "logging.vmodule",
    "logging.options.json.splitStream", "logging.options.json.infoBufferSize",
    "logging.options.text.splitStream", "logging.options.text.infoBufferSize",
    "hostnameOverride", "bindAddress", "healthzBindAddress", "metricsBindAddress",
    "bindAddressHardFail", "enableProfiling", "showHiddenMetricsForVersion", "mode",
    "iptables.masqueradeBit", "iptables.masqueradeAll", "iptables.localhostNodePorts",
    "iptables.syncPeriod", "iptables.minSyncPeriod", "ipvs.syncPeriod", "ipvs.minSyncPeriod",
    "ipvs.scheduler", "ipvs.excludeCIDRs", "ipvs.strictARP", "ipvs.tcpTimeout",
    "ipvs.tcpFinTimeout", "ipvs.udpTimeout", "nftables.masqueradeBit",
    "nftables.masqueradeAll", "nftables.syncPeriod", "nftables.minSyncPeriod",
    "winkernel.networkName", "winkernel.sourceVip", "winkernel.enableDSR",
    "winkernel.rootHnsEndpointName", "winkernel.forwardHealthCheckVip", "detectLocalMode",
    "detectLocal.bridgeInterface", "detectLocal.interfaceNamePrefix", "clusterCIDR",
    "nodePortAddresses", "oomScoreAdj", "conntrack.maxPerCore", "conntrack.min",
    "conntrack.tcpEstablishedTimeout", "conntrack.tcpCloseWaitTimeout", "conntrack.tcpBeLiberal",
    "conntrack.udpTimeout", "conntrack.udpStreamTimeout", "configSyncPeriod", "portRange",
    "windowsRunAsService",
}


def test_every_kube_proxy_flag_and_field_has_one_entry() -> None:
    """The table holds exactly kube-proxy's flags (plus iptsync's documented aliases) and
    v1alpha1's fields, each once."""
    assert KUBE_PROXY_FLAGS == {o.flag for o in OPTIONS if o.flag}
    assert {"sync-period", "min-sync-period"} == set(BY_FLAG) - KUBE_PROXY_FLAGS
    assert V1ALPHA1_FIELDS == set(BY_FIELD)
    assert len(OPTIONS) == len({(o.flag, o.field) for o in OPTIONS})


def test_comparison_page_shows_the_table() -> None:
    """docs/comparison.md holds the generated table as it is now (regenerate it with
    scripts/gen_options_table.py)."""
    generator = runpy.run_path(str(ROOT / "scripts" / "gen_options_table.py"))
    page = (ROOT / "docs" / "comparison.md").read_text()
    assert generator["page_with_table"](page) == page
    assert markdown_table() in page
