"""kube-proxy's conntrack settings, applied as kube-proxy applies them.

Host safety: nf_conntrack_max and the module's hashsize are one for the whole machine, so the
tests that change them write into a fake /proc/sys and /sys (``tmp_path``); the per-namespace
sysctls (timeouts, tcp_be_liberal) are written inside a namespace of the test's own only, by a
process started there, and the host's values are checked to be unchanged.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.sysctl import (
    CONNTRACK_MAX,
    HASHSIZE,
    TCP_BE_LIBERAL,
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    UDP_STREAM_TIMEOUT,
    UDP_TIMEOUT,
    ConntrackConfig,
    apply_conntrack,
    tcp_be_liberal,
)
from iptsync.lab.netns import get_sysctl, set_sysctl

SCENARIO = Path(__file__).parents[1] / "render" / "scenarios" / "clusterip-two-endpoints.yaml"
KERNEL_DEFAULTS = {CONNTRACK_MAX: 65536, TCP_ESTABLISHED: 432000, TCP_CLOSE_WAIT: 60,
                   TCP_BE_LIBERAL: 0, UDP_TIMEOUT: 30, UDP_STREAM_TIMEOUT: 120}
PER_NAMESPACE = (TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_BE_LIBERAL, UDP_TIMEOUT,
                 UDP_STREAM_TIMEOUT)


def fake_node(tmp_path: Path, hashsize: int = 16384,
              skip: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A /proc/sys and a /sys holding the kernel's defaults (minus ``skip``)."""
    root, sysfs = tmp_path / "proc-sys", tmp_path / "sys"
    for name, value in KERNEL_DEFAULTS.items():
        if name not in skip:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(f"{value}\n")
    (sysfs / HASHSIZE).parent.mkdir(parents=True)
    (sysfs / HASHSIZE).write_text(f"{hashsize}\n")
    return root, sysfs


def values(root: Path, sysfs: Path) -> dict[str, int]:
    found = {name: int((root / name).read_text()) for name in KERNEL_DEFAULTS
             if (root / name).exists()}
    return found | {HASHSIZE: int((sysfs / HASHSIZE).read_text())}


def test_kube_proxys_defaults_set_the_max_its_hash_size_and_the_tcp_timeouts(
        tmp_path: Path) -> None:
    """On 2 CPUs the floor wins (131072 > 2 x 32768); the hash size goes to a quarter of it;
    TCP established 24h, close-wait 1h; UDP timeouts and tcp_be_liberal are left alone."""
    root, sysfs = fake_node(tmp_path)
    apply_conntrack(ConntrackConfig(), root, sysfs=sysfs, cpus=2)
    assert {CONNTRACK_MAX: 131072, HASHSIZE: 32768, TCP_ESTABLISHED: 86400,
            TCP_CLOSE_WAIT: 3600, TCP_BE_LIBERAL: 0, UDP_TIMEOUT: 30,
            UDP_STREAM_TIMEOUT: 120} == values(root, sysfs)


def test_max_per_core_scales_with_cpus_and_the_hash_size_is_never_lowered(
        tmp_path: Path) -> None:
    """8 CPUs x 32768 is above the floor; a hash size already above a quarter stays."""
    root, sysfs = fake_node(tmp_path, hashsize=300000)
    apply_conntrack(ConntrackConfig(), root, sysfs=sysfs, cpus=8)
    assert (262144, 300000) == (values(root, sysfs)[CONNTRACK_MAX],
                                values(root, sysfs)[HASHSIZE])


def test_configured_udp_timeouts_and_tcp_be_liberal_are_set(tmp_path: Path) -> None:
    """udpTimeout, udpStreamTimeout (whole seconds) and tcpBeLiberal are applied when set,
    and tcp_be_liberal then reads back as on."""
    root, sysfs = fake_node(tmp_path)
    apply_conntrack(ConntrackConfig(udp_timeout=45.9, udp_stream_timeout=300.0,
                                    tcp_be_liberal=True), root, sysfs=sysfs, cpus=2)
    found = values(root, sysfs)
    assert (45, 300, 1) == (found[UDP_TIMEOUT], found[UDP_STREAM_TIMEOUT],
                            found[TCP_BE_LIBERAL])
    assert True is tcp_be_liberal(root)


def test_values_meaning_leave_alone_change_nothing(tmp_path: Path) -> None:
    """maxPerCore 0 or unset, zero or unset timeouts and tcpBeLiberal false change nothing."""
    root, sysfs = fake_node(tmp_path)
    before = values(root, sysfs)
    apply_conntrack(ConntrackConfig(max_per_core=0, min=None, tcp_established_timeout=None,
                                    tcp_close_wait_timeout=0.0), root, sysfs=sysfs, cpus=2)
    assert before == values(root, sysfs)


def test_a_missing_sysctl_is_logged_and_the_others_are_still_set(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without nf_conntrack_max (no conntrack module yet) a warning names it; the timeouts
    are set all the same and nothing is raised."""
    root, sysfs = fake_node(tmp_path, skip=(CONNTRACK_MAX,))
    with caplog.at_level(logging.INFO, logger="iptsync"):
        apply_conntrack(ConntrackConfig(), root, sysfs=sysfs, cpus=2)
    assert ["sysctl net.netfilter.nf_conntrack_max missing (is nf_conntrack loaded?): "
            "not set to 131072"] == [r.getMessage() for r in caplog.records
                                     if r.levelno == logging.WARNING]
    assert (86400, 16384) == (values(root, sysfs)[TCP_ESTABLISHED],
                              values(root, sysfs)[HASHSIZE])


def in_netns(netns: str, *argv: str, read_only_proc_sys: bool = False
             ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``netns`` (with /proc/sys mounted read-only in a private mount
    namespace, as in a container without privileges, when asked)."""
    command = ["ip", "netns", "exec", netns]
    if read_only_proc_sys:
        command += ["unshare", "--mount", "sh", "-c", 'mount --bind /proc/sys /proc/sys && '
                    'mount -o remount,bind,ro /proc/sys && exec "$@"', "sh"]
    return subprocess.run([*command, *argv], capture_output=True, text=True, check=False,
                          timeout=120)


def host_values() -> dict[str, str]:
    return {name: Path("/proc/sys", name).read_text() for name in (*PER_NAMESPACE,
                                                                   CONNTRACK_MAX)}


def test_conntrack_sysctls_read_back_in_the_node_namespace(netns: str) -> None:
    """Applied inside a node namespace, the timeouts and tcp_be_liberal read back there with
    the configured values; the host's stay as they were."""
    host = host_values()
    config = ("ConntrackConfig(max_per_core=None, tcp_established_timeout=7200, "
              "tcp_close_wait_timeout=120, udp_timeout=45, udp_stream_timeout=150, "
              "tcp_be_liberal=True)")
    result = in_netns(netns, sys.executable, "-c",
                      "from iptsync.kernel.sysctl import *; "
                      f"apply_conntrack({config}); print(tcp_be_liberal())")
    assert 0 == result.returncode, result.stderr
    assert "True" == result.stdout.strip()
    assert ["7200", "120", "1", "45", "150"] == [
        get_sysctl(netns, name.replace("/", ".")) for name in PER_NAMESPACE]
    assert host == host_values()


def test_the_agent_syncs_with_proc_sys_read_only_and_says_what_it_did_not_set(
        netfilter: Netfilter) -> None:
    """With /proc/sys read-only (a container without privileges) `run --once` still syncs
    and exits 0; each conntrack sysctl it could not set is named with the reason."""
    assert netfilter.netns is not None
    result = in_netns(netfilter.netns, sys.executable, "-m", "iptsync.cli", "run", "--once",
                      "--iptables-backend", netfilter.backend.value, "--objects",
                      str(SCENARIO), "--hostname-override", "node1", "--cluster-cidr",
                      "10.0.0.0/8", read_only_proc_sys=True)
    assert 0 == result.returncode, result.stderr
    for name, value in (("nf_conntrack_tcp_timeout_established", 86400),
                        ("nf_conntrack_tcp_timeout_close_wait", 3600)):
        assert (f"WARNING iptsync.kernel.sysctl: cannot set sysctl net.netfilter.{name}="
                f"{value} (Read-only file system); set it on the node; it stays ") in result.stderr
    assert "KUBE-SERVICES" in netfilter.save()["nat"].chains


def test_tcp_be_liberal_on_the_node_leaves_out_the_invalid_drop(netfilter: Netfilter) -> None:
    """With nf_conntrack_tcp_be_liberal=1 in the node namespace, `run --once` programs no
    INVALID drop rule in KUBE-FORWARD, as kube-proxy; with 0, it does."""
    assert netfilter.netns is not None
    invalid_drop = "-m conntrack --ctstate INVALID -j DROP"
    programmed = []
    for liberal in (1, 0):
        set_sysctl(netfilter.netns, "net.netfilter.nf_conntrack_tcp_be_liberal", liberal)
        result = in_netns(netfilter.netns, sys.executable, "-m", "iptsync.cli", "run",
                          "--once", "--iptables-backend", netfilter.backend.value,
                          "--objects", str(SCENARIO), "--hostname-override", "node1",
                          "--cluster-cidr", "10.0.0.0/8")
        assert 0 == result.returncode, result.stderr
        programmed.append(invalid_drop in netfilter.save()["filter"].chains["KUBE-FORWARD"])
    assert [False, True] == programmed
