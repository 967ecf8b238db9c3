"""kube-proxy's command line: its spellings, its precedence over and under --config, its
validation (each message naming the flag or field), and one INFO line per ignored flag.

Flags are read as ``iptsync run`` reads them (:func:`split_args`, then :func:`resolve`); the
CLI checks run ``iptsync dump`` as a process (no root, no netfilter).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from iptsync.kubeproxy import normalize_args, split_args
from iptsync.options import ProxyConfig, resolve

from .test_config import SERVICE, messages

DOCUMENT = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}


def flags(*args: str, document: dict[str, Any] | None = None) -> ProxyConfig:
    given, others = split_args(list(args))
    assert [] == others
    return resolve(given, document)


def periods(config: ProxyConfig) -> tuple[float, float]:
    return config.sync_period, config.min_sync_period


def addresses(config: ProxyConfig) -> tuple[str, str]:
    return config.healthz_address(), config.metrics_address()


def dump(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    objects = tmp_path / "objects.yaml"
    objects.write_text(yaml.safe_dump(SERVICE))
    return subprocess.run(
        [sys.executable, "-m", "iptsync.cli", "dump", "--objects", str(objects), *args],
        capture_output=True, text=True, check=False, timeout=60)


def test_kube_proxys_names_and_iptsyncs_short_ones_are_read() -> None:
    """--iptables-sync-period and --iptables-min-sync-period, and the older --sync-period and
    --min-sync-period, set the same periods; Go durations are read as Go reads them."""
    assert (60.0, 10.0) == periods(
        flags("--iptables-sync-period=1m", "--iptables-min-sync-period", "10s"))
    assert (90.0, 0.25) == periods(flags("--sync-period", "1m30s", "--min-sync-period=250ms"))


@pytest.mark.parametrize(("args", "expected"), [
    (["--masquerade-all"], (True, True)),
    (["--masquerade-all=false", "--iptables-localhost-nodeports=false"], (False, False)),
    (["--masquerade-all=1", "--no-iptables-localhost-nodeports"], (True, False)),
])
def test_go_boolean_forms(args: list[str], expected: tuple[bool, bool]) -> None:
    """A boolean flag alone is true; =true/=false/=1 are Go's forms; iptsync's older
    --no-iptables-localhost-nodeports still means false."""
    config = flags(*args)
    assert expected == (config.masquerade_all, config.localhost_nodeports)


@pytest.mark.parametrize("args", [["-v=4"], ["-v", "4"], ["-v4"], ["--v=4"], ["--v", "4"]])
def test_klog_verbosity_forms(args: list[str]) -> None:
    """kube-proxy's -v=4, -v 4, -v4 and --v=4 are its verbosity; a bare -v or -vv stays
    iptsync's own count."""
    assert 4 == flags(*args).verbosity
    assert ["-v", "-vv", "--cluster-cidr", "10.0.0.0/8"] == normalize_args(
        ["-v", "-vv", "--cluster-cidr", "10.0.0.0/8"])


def test_repeated_list_flags_add_up() -> None:
    """--nodeport-addresses given twice (each comma-separated) keeps every CIDR, as pflag's
    string slices do; --feature-gates merges."""
    config = flags("--nodeport-addresses=10.0.0.0/8,192.168.0.0/16",
                   "--nodeport-addresses", "fd00::/64")
    assert ("10.0.0.0/8", "192.168.0.0/16", "fd00::/64") == config.nodeport_addresses


def test_without_config_flags_win_and_defaults_fill_in() -> None:
    """No flag: kube-proxy's defaults; each flag given sets its value."""
    config = flags()
    assert (30.0, 1.0, 14, True, "0.0.0.0:10256", "127.0.0.1:10249") == (
        config.sync_period, config.min_sync_period, config.masquerade_bit,
        config.localhost_nodeports, config.healthz_address(), config.metrics_address())
    assert [] == list(config.verdicts)


def test_with_config_only_hostname_master_and_logging_flags_count() -> None:
    """With --config, kube-proxy takes its configuration from the file: --cluster-cidr and
    --iptables-sync-period are ignored (a warning each), --hostname-override, --master and
    --v still count."""
    config = flags("--config=/etc/kube-proxy.conf", "--cluster-cidr=10.1.0.0/16",
                   "--iptables-sync-period=5s", "--hostname-override=Node1",
                   "--master=https://10.0.0.1:6443", "--v=2",
                   document={**DOCUMENT, "clusterCIDR": "10.244.0.0/16",
                             "hostnameOverride": "from-file", "logging": {"verbosity": 5}})
    assert ("10.244.0.0/16", 30.0, "Node1", "https://10.0.0.1:6443", 2) == (
        config.cluster_cidr, config.sync_period, config.hostname_override, config.master,
        config.verbosity)
    assert [("--cluster-cidr", "set clusterCIDR in the file"),
            ("--iptables-sync-period", "set iptables.syncPeriod in the file")] == [
        (v.name, v.reason.rsplit("; ", 1)[1]) for v in config.verdicts if v.suspicious]


def test_addresses_take_kube_proxys_defaults_and_deprecated_ports() -> None:
    """A bare IP gets the default port (or --healthz-port's); port 0 and an empty address
    turn a server off; an IPv6 --bind-address moves the defaults to [::] and [::1]."""
    assert ("127.0.0.1:10256", "") == addresses(
        flags("--healthz-bind-address=127.0.0.1", "--metrics-bind-address="))
    assert ("127.0.0.1:1234", "") == addresses(
        flags("--healthz-bind-address=127.0.0.1", "--healthz-port=1234", "--metrics-port=0"))
    assert ("[::]:10256", "[::1]:10249") == addresses(flags("--bind-address=::"))


@pytest.mark.parametrize(("args", "message"), [
    (["--proxy-mode=ipvs"], "--proxy-mode: 'ipvs' is not supported; iptsync implements "
     "kube-proxy's iptables mode only (set iptables, or leave it empty)"),
    (["--iptables-masquerade-bit=32"],
     "--iptables-masquerade-bit: 32 must be within the range [0, 31]"),
    (["--iptables-sync-period=0s"], "--iptables-sync-period: must be greater than 0"),
    (["--iptables-min-sync-period=1m"], "--iptables-min-sync-period: must be less than or "
     "equal to the sync period (30s)"),
    (["--iptables-sync-period=soon"],
     "--iptables-sync-period: 'soon' is not a duration like 1s, 500ms or 1m30s"),
    (["--masquerade-all=yes"], "--masquerade-all: 'yes' is not a boolean (true or false)"),
    (["--conntrack-max-per-core=-1"],
     "--conntrack-max-per-core: must be greater than or equal to 0"),
    (["--oom-score-adj=-1001"], "--oom-score-adj: -1001 must be within the range "
     "[-1000, 1000]"),
    (["--detect-local-mode=PodCIDR"], "--detect-local-mode: 'PodCIDR' is not supported: "
     "must be one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix (or empty)"),
    (["--detect-local-mode=BridgeInterface"], "--pod-bridge-interface: must not be empty with "
     "detect-local-mode BridgeInterface"),
    (["--cluster-cidr=10.0.0.0/8,10.1.0.0/16"], "--cluster-cidr: must be either a single "
     "CIDR or a dual-stack pair of CIDRs (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)"),
    (["--nodeport-addresses=primary,10.0.0.0/8"],
     "--nodeport-addresses: can't use both 'primary' and CIDRs"),
    (["--nodeport-addresses=10.0.0.0/33"],
     "--nodeport-addresses: '10.0.0.0/33' must be a valid CIDR"),
    (["--healthz-bind-address=localhost:10256"],
     "--healthz-bind-address: 'localhost:10256' must be IP:port"),
    (["--bind-address=node1"], "--bind-address: 'node1' is not an IP address"),
    (["--hostname-override= "], "--hostname-override: must not be empty"),
    (["--logging-format=xml"], "--logging-format: 'xml' is not supported: text or json"),
])
def test_invalid_values_are_refused_naming_the_flag(args: list[str], message: str) -> None:
    """kube-proxy's validation: the value is refused, the message names the flag."""
    assert [message] == [v.reason for v in flags(*args).refused]


def test_invalid_field_is_refused_naming_the_file_and_field() -> None:
    """The same checks on the file name it and the field."""
    config = resolve((), {**DOCUMENT, "iptables": {"masqueradeBit": 40},
                          "conntrack": {"udpTimeout": "-1s"}}, "--config /x.yaml")
    assert ["--config /x.yaml: iptables.masqueradeBit: 40 must be within the range [0, 31]",
            "--config /x.yaml: conntrack.udpTimeout: must be greater than or equal to 0"] == [
        v.reason for v in config.refused]


def test_cli_refuses_with_every_message_and_status_2(tmp_path: Path) -> None:
    """The command stops before doing anything: usage error, each refusal on its line."""
    result = dump(tmp_path, "--proxy-mode=nftables", "--iptables-masquerade-bit=40")
    assert 2 == result.returncode
    assert ("Error: --proxy-mode: 'nftables' is not supported; iptsync implements "
            "kube-proxy's iptables mode only (set iptables, or leave it empty)\n"
            "--iptables-masquerade-bit: 40 must be within the range [0, 31]\n") in result.stderr
    assert "" == result.stdout


def test_cli_logs_one_info_line_per_ignored_flag(tmp_path: Path) -> None:
    """GKE's flags that do not apply each get one INFO line saying why; the applied ones
    none; a flag --config makes kube-proxy ignore is a warning."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(DOCUMENT))
    result = dump(tmp_path, "-v", "--hostname-override=node1", "--oom-score-adj=-998",
                  "--v=2", "--ipvs-sync-period=1m", "--feature-gates=A=true,B=false",
                  "--iptables-sync-period=1m")
    assert 0 == result.returncode, result.stderr
    assert ["--feature-gates=A=true,B=false is ignored: iptsync has no feature gates: it "
            "behaves as kube-proxy 1.34 with its default gates",
            "--oom-score-adj=-998 is ignored: iptsync leaves its OOM score to the pod (its "
            "priority class and requests)",
            "--ipvs-sync-period=1m is ignored: only used in ipvs mode, which iptsync does not "
            "implement"] == [m for m in messages(result.stderr, "INFO") if m.startswith("--")]
    with_config = dump(tmp_path, "--config", str(config), "--cluster-cidr=10.0.0.0/8")
    assert ["--cluster-cidr=10.0.0.0/8 is ignored: --config is given: kube-proxy ignores "
            "this flag then, and so does iptsync; set clusterCIDR in the file"] == \
        messages(with_config.stderr, "WARNING")


def test_nodeport_addresses_primary_is_the_node_objects_primary_ip(tmp_path: Path) -> None:
    """--nodeport-addresses primary: NodePorts only on the node's primary IP."""
    objects = tmp_path / "objects.yaml"
    objects.write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "default",
                                                             "name": "np"},
         "spec": {"type": "NodePort", "clusterIP": "10.96.0.60",
                  "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.5"}]}}]))
    result = subprocess.run(
        [sys.executable, "-m", "iptsync.cli", "dump", "--objects", str(objects),
         "--hostname-override", "node1", "--nodeport-addresses", "primary"],
        capture_output=True, text=True, check=False, timeout=60)
    assert 0 == result.returncode, result.stderr
    jumps = [line for line in result.stdout.splitlines()
             if line.startswith("-A KUBE-SERVICES") and line.endswith("-j KUBE-NODEPORTS")]
    assert ['-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this '
            'must be the last rule in this chain" -d 192.168.0.5 -j KUBE-NODEPORTS'] == jumps
