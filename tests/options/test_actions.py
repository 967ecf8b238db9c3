"""kube-proxy's one-shot flags: --write-config-to writes the configuration in effect and
exits; --init-only sets the privileged sysctls and exits; --cleanup removes kube-proxy's (and
iptsync's) rules and exits. The last two run inside a namespace the test creates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from iptsync.kernel.netfilter import Netfilter
from iptsync.options import read_config


def iptsync_run(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, sys.executable, "-m", "iptsync.cli", "run", *args],
                          capture_output=True, text=True, check=False, timeout=60)


def test_write_config_to_writes_what_reads_back_the_same(tmp_path: Path) -> None:
    """The file holds the flags' values and kube-proxy's defaults (the ignored flags' values
    too, as kube-proxy writes them); read back, it gives the same configuration."""
    path = tmp_path / "written.yaml"
    result = iptsync_run("--write-config-to", str(path), "--cluster-cidr=10.0.0.0/14",
                         "--iptables-sync-period=1m", "--conntrack-max-per-core=0",
                         "--oom-score-adj=-998", "--healthz-bind-address=127.0.0.1")
    assert 0 == result.returncode, result.stderr
    config = read_config(path)
    assert ("10.0.0.0/14", 60.0, 1.0, 0, "127.0.0.1:10256") == (
        config.cluster_cidr, config.sync_period, config.min_sync_period,
        config.conntrack.max_per_core, config.healthz_address())
    assert {"oomScoreAdj": -998} == {k: v for k, v in config.ignored.items()
                                     if k == "oomScoreAdj"}
    assert [] == [v.name for v in config.verdicts
                  if v.handling == "refused" or v.suspicious]


@pytest.mark.netns
def test_init_only_sets_route_localnet_and_writes_no_rule(netfilter: Netfilter) -> None:
    """--init-only: route_localnet=1 in the node's namespace, no chain written, exit 0."""
    netns = str(netfilter.netns)
    result = iptsync_run("--init-only", "--hostname-override=node1", netns=netns)
    assert 0 == result.returncode, result.stderr
    sysctl = subprocess.run(["ip", "netns", "exec", netns, "cat",
                             "/proc/sys/net/ipv4/conf/all/route_localnet"],
                            capture_output=True, text=True, check=True)
    assert "1" == sysctl.stdout.strip()
    assert [] == [chain for table in netfilter.save().values() for chain in table.chains
                  if chain.startswith("KUBE-")]


@pytest.mark.netns
def test_cleanup_removes_kube_chains_and_leaves_the_rest(netfilter: Netfilter) -> None:
    """--cleanup: kube-proxy's chains and jumps go, another chain and rule stay, exit 0."""
    netfilter.restore("*nat\n:KUBE-SERVICES - [0:0]\n:OTHER - [0:0]\n"
                      "-A PREROUTING -j KUBE-SERVICES\n-A PREROUTING -j OTHER\nCOMMIT\n",
                      noflush=False)
    result = iptsync_run("--cleanup", "--iptables-backend", netfilter.backend.value,
                         netns=str(netfilter.netns))
    assert 0 == result.returncode, result.stderr
    nat = netfilter.save()["nat"].chains
    assert ["OTHER"] == [chain for chain in nat if chain not in ("PREROUTING", "INPUT",
                                                                  "OUTPUT", "POSTROUTING")]
    assert ["-j OTHER"] == nat["PREROUTING"]
