"""--config (a KubeProxyConfiguration): another proxy mode is refused, naming the file and the
field, and every field that is set but not applied is named in a warning.

The CLI checks run ``iptsync dump`` as a process (it needs no root and no netfilter).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iptsync.options import OptionError, read_config

SERVICE = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"namespace": "default", "name": "web"},
           "spec": {"clusterIP": "10.96.0.50", "ports": [{"name": "http", "port": 80}]}}


def write_config(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                                    "kind": "KubeProxyConfiguration", **fields}))
    return path


def dump(tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    objects = tmp_path / "objects.yaml"
    objects.write_text(yaml.safe_dump(SERVICE))
    return subprocess.run(
        [sys.executable, "-m", "iptsync.cli", "dump", "--objects", str(objects), "--config",
         str(config), "--hostname-override", "node1"],
        capture_output=True, text=True, check=False, timeout=60)


@pytest.mark.parametrize("mode", ["ipvs", "nftables", "kernelspace", "userspace"])
def test_another_proxy_mode_is_refused(tmp_path: Path, mode: str) -> None:
    """mode: ipvs (or any mode but iptables) stops iptsync with the file and field named."""
    path = write_config(tmp_path, mode=mode)
    with pytest.raises(OptionError, match=rf"--config {path}: mode: '{mode}' is not supported"):
        read_config(path)
    result = dump(tmp_path, path)
    assert 2 == result.returncode
    assert f"--config {path}: mode: '{mode}' is not supported" in result.stderr
    assert "" == result.stdout


@pytest.mark.parametrize("mode", ["", "iptables", None])
def test_iptables_mode_is_accepted(tmp_path: Path, mode: str | None) -> None:
    """mode: iptables, empty or null is kube-proxy's iptables mode: accepted silently."""
    assert () == read_config(write_config(tmp_path, mode=mode)).ignored


def test_each_set_but_unapplied_field_is_named(tmp_path: Path) -> None:
    """Fields iptsync does not apply are listed by path; zero values and applied ones are not."""
    path = write_config(
        tmp_path, mode="iptables", clusterCIDR="10.0.0.0/14", bindAddress="0.0.0.0",
        detectLocalMode="ClusterCIDR", portRange="", oomScoreAdj=-999,
        conntrack={"maxPerCore": 32768, "min": None, "udpTimeout": "0s",
                   "tcpBeLiberal": False},
        ipvs={"scheduler": "rr", "excludeCIDRs": [], "strictARP": False},
        iptables={"masqueradeAll": True, "syncPeriod": "30s"},
        featureGates={"SomeGate": True}, logging={"verbosity": 0})
    config = read_config(path)
    assert ["conntrack.maxPerCore", "detectLocalMode", "featureGates.SomeGate",
            "ipvs.scheduler", "oomScoreAdj"] == sorted(config.ignored)
    assert (True, 30.0) == (config.masquerade_all, config.sync_period)


def test_cli_warns_once_per_ignored_field(tmp_path: Path) -> None:
    """The command still runs, and stderr names each ignored field once."""
    path = write_config(tmp_path, conntrack={"maxPerCore": 32768}, ipvs={"scheduler": "rr"})
    result = dump(tmp_path, path)
    assert 0 == result.returncode, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "not supported" in line]
    assert [f"--config {path}: conntrack.maxPerCore is set but not supported by iptsync: "
            "ignored",
            f"--config {path}: ipvs.scheduler is set but not supported by iptsync: ignored"] \
        == [line[line.index("--config"):] for line in warnings]
    assert '"default/web:http has no endpoints"' in result.stdout
