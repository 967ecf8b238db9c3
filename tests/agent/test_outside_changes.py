"""`iptsync run` repairs what other programs change, within about a second, without waiting
for a full sync: the change watch (nft notifications, legacy table sizes) on real netfilter."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import reaped

from iptsync.core import names
from iptsync.kernel.netfilter import Netfilter

from .test_run_command import endpoint_slice, service
from .waiting import eventually

pytestmark = pytest.mark.netns


def test_flushed_service_chain_is_repaired_within_two_seconds(netfilter: Netfilter,
                                                              tmp_path: Path) -> None:
    """A service chain flushed by another program is back within 2 s (sync period 1m)."""
    objects = tmp_path / "web.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        service("web", "10.96.0.50"), endpoint_slice("web", "10.0.1.10", "10.0.2.10")]}))
    netns = str(netfilter.netns)
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "iptsync.cli", "run",
            "--objects", str(objects), "--hostname-override", "node1",
            "--cluster-cidr", "10.0.0.0/14", "--iptables-backend", netfilter.backend.value,
            "--min-sync-period", "100ms", "--sync-period", "1m",
            "--healthz-bind-address", "", "--metrics-bind-address", "",
            "--no-conntrack-cleanup", "--log-format", "json"]
    svc = names.svc_chain("default/web:http", "tcp")
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with reaped(agent):
        eventually(lambda: 2 == len(netfilter.save(["nat"])["nat"].chains.get(svc, [])) - 1)
        before = netfilter.save(["nat"])["nat"].chains[svc]
        subprocess.run(["ip", "netns", "exec", netns, netfilter.command, "-t", "nat", "-F",
                        svc], check=True)
        flushed = time.monotonic()
        eventually(lambda: before == netfilter.save(["nat"])["nat"].chains[svc], timeout=2.0)
        repaired = time.monotonic() - flushed
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=10)
    logs = [json.loads(line)["msg"] for line in err.splitlines() if line.startswith("{")]
    assert any(f"nat/{svc}" in msg and "outside iptsync" in msg for msg in logs) or any(
        "changed size" in msg for msg in logs), logs
    assert repaired < 2.0
