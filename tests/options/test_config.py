"""--config (a KubeProxyConfiguration): another proxy mode is refused, naming the file and the
field; zero values and nulls mean kube-proxy's defaults; each field set but ignored gets one
INFO line saying why, and a field kube-proxy does not know a warning.

The CLI checks run ``iptsync dump`` as a process (it needs no root and no netfilter).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iptsync.options import read_config

SERVICE = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": "default", "name": "web"},
           "spec": {"clusterIP": "10.96.0.50", "ports": [{"name": "http", "port": 80}]}}


def write_config(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                                    "kind": "KubeProxyConfiguration", **fields}))
    return path


def dump(tmp_path: Path, config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    objects = tmp_path / "objects.yaml"
    objects.write_text(yaml.safe_dump(SERVICE))
    return subprocess.run(
        [sys.executable, "-m", "iptsync.cli", "dump", "--objects", str(objects), "--config",
         str(config), "--hostname-override", "node1", *flags],
        capture_output=True, text=True, check=False, timeout=60)


def messages(stderr: str, level: str) -> list[str]:
    """The messages of ``level`` log lines (text format: time, level, logger, message)."""
    return [line.split(": ", 1)[1] for line in stderr.splitlines()
            if f" {level} iptsync" in line]


@pytest.mark.parametrize("mode", ["ipvs", "nftables", "kernelspace", "userspace"])
def test_another_proxy_mode_is_refused(tmp_path: Path, mode: str) -> None:
    """mode: ipvs (or any mode but iptables) stops iptsync with the file and field named."""
    path = write_config(tmp_path, mode=mode)
    expected = (f"--config {path}: mode: '{mode}' is not supported; iptsync implements "
                "kube-proxy's iptables mode only (set iptables, or leave it empty)")
    assert [expected] == [v.reason for v in read_config(path).refused]
    result = dump(tmp_path, path)
    assert 2 == result.returncode
    assert f"Error: {expected}" in result.stderr
    assert "" == result.stdout


@pytest.mark.parametrize("mode", ["", "iptables", None])
def test_iptables_mode_is_accepted(tmp_path: Path, mode: str | None) -> None:
    """mode: iptables, empty or null is kube-proxy's iptables mode: accepted."""
    config = read_config(write_config(tmp_path, mode=mode))
    assert [("mode", "same")] == [(v.name, v.handling) for v in config.verdicts]


def test_zero_values_and_nulls_are_kube_proxys_defaults(tmp_path: Path) -> None:
    """A zero duration, null pointer or empty address is the default; a pointer field's 0 is
    0 (conntrack.maxPerCore 0: leave nf_conntrack_max as it is)."""
    config = read_config(write_config(
        tmp_path, iptables={"syncPeriod": "0s", "minSyncPeriod": "0s", "masqueradeBit": None,
                            "localhostNodePorts": None},
        conntrack={"maxPerCore": 0, "min": None, "tcpEstablishedTimeout": None,
                   "tcpCloseWaitTimeout": "0s"},
        healthzBindAddress="", metricsBindAddress=""))
    assert (30.0, 1.0, 14, True) == (config.sync_period, config.min_sync_period,
                                     config.masquerade_bit, config.localhost_nodeports)
    assert (0, 131072, 86400.0, 0.0) == (
        config.conntrack.max_per_core, config.conntrack.min,
        config.conntrack.tcp_established_timeout, config.conntrack.tcp_close_wait_timeout)
    assert ("0.0.0.0:10256", "127.0.0.1:10249") == (config.healthz_address(),
                                                    config.metrics_address())


def test_fields_are_read_with_kube_proxys_meanings(tmp_path: Path) -> None:
    """Durations in Go's spelling, a bare IP for an address (the port added), the
    conntrack and local-detection settings, the kubeconfig of the API connection."""
    config = read_config(write_config(
        tmp_path, clusterCIDR="10.0.0.0/14,fd00:10::/56", detectLocalMode="BridgeInterface",
        detectLocal={"bridgeInterface": "cbr0"}, healthzBindAddress="127.0.0.1",
        bindAddress="::", iptables={"syncPeriod": "1m30s", "minSyncPeriod": "500ms"},
        conntrack={"tcpBeLiberal": True, "udpTimeout": "30s", "udpStreamTimeout": "2m"},
        clientConnection={"kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf"},
        nodePortAddresses=["primary"]))
    assert ("10.0.0.0/14,fd00:10::/56", "BridgeInterface", "cbr0", 90.0, 0.5) == (
        config.cluster_cidr, config.detect_local_mode, config.bridge_interface,
        config.sync_period, config.min_sync_period)
    assert ("127.0.0.1:10256", "[::1]:10249") == (config.healthz_address(),
                                                  config.metrics_address())
    assert (True, 30.0, 120.0) == (config.conntrack.tcp_be_liberal,
                                   config.conntrack.udp_timeout,
                                   config.conntrack.udp_stream_timeout)
    assert ("/var/lib/kube-proxy/kubeconfig.conf", ("primary",)) == (
        config.kubeconfig, config.nodeport_addresses)


def test_each_ignored_field_is_named_with_its_reason(tmp_path: Path) -> None:
    """Fields iptsync does not apply are ignored (zero values as defaults); a field that is
    not kube-proxy's is suspicious."""
    path = write_config(
        tmp_path, mode="iptables", clusterCIDR="10.0.0.0/14", bindAddress="0.0.0.0",
        portRange="", oomScoreAdj=-999, udpIdleTimeout="250ms",
        ipvs={"scheduler": "rr", "excludeCIDRs": [], "strictARP": False},
        iptables={"masqueradeAll": True, "syncPeriod": "30s"},
        featureGates={"SomeGate": True}, logging={"verbosity": 2})
    config = read_config(path)
    ignored = {v.name: (v.default, v.suspicious) for v in config.verdicts
               if v.handling == "ignored"}
    assert {"portRange": (True, False), "oomScoreAdj": (True, False),
            "udpIdleTimeout": (False, True), "ipvs.scheduler": (False, False),
            "ipvs.excludeCIDRs": (True, False), "ipvs.strictARP": (True, False),
            "featureGates": (False, False)} == ignored
    assert (True, 30.0, 2) == (config.masquerade_all, config.sync_period, config.verbosity)


def test_cli_logs_one_info_line_per_ignored_field(tmp_path: Path) -> None:
    """The command still runs; -v shows one INFO line per ignored field set to something
    other than kube-proxy's default, and an unknown field is a warning."""
    path = write_config(tmp_path, oomScoreAdj=-998, ipvs={"scheduler": "rr"},
                        conntrack={"maxPerCore": 0}, udpIdleTimeout="250ms")
    result = dump(tmp_path, path, "-v")
    assert 0 == result.returncode, result.stderr
    assert [f"--config {path}: ipvs.scheduler=rr is ignored: only used in ipvs mode, which "
            "iptsync does not implement",
            f"--config {path}: oomScoreAdj=-998 is ignored: iptsync leaves its OOM score to "
            "the pod (its priority class and requests)"] == [
                m for m in messages(result.stderr, "INFO") if m.startswith("--config")]
    assert [f"--config {path}: udpIdleTimeout=250ms is ignored: not a KubeProxyConfiguration "
            "v1alpha1 field (kube-proxy's lenient decoding drops it too)"] == \
        messages(result.stderr, "WARNING")
    assert '"default/web:http has no endpoints"' in result.stdout


@pytest.mark.parametrize(("document", "message"), [
    ({"kind": "KubeletConfiguration"}, "not a KubeProxyConfiguration"),
    ({"kind": "KubeProxyConfiguration", "apiVersion": "kubeproxy.config.k8s.io/v1"},
     "apiVersion 'kubeproxy.config.k8s.io/v1' is not supported (kube-proxy reads "
     "kubeproxy.config.k8s.io/v1alpha1)"),
])
def test_a_file_that_is_not_a_v1alpha1_configuration_is_refused(
        tmp_path: Path, document: dict[str, str], message: str) -> None:
    """Another kind or version stops the command, naming the file."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    result = dump(tmp_path, path)
    assert 2 == result.returncode
    assert f"Error: --config {path}: {message}" in result.stderr
