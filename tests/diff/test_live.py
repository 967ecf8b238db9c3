"""`iptsync diff --live` on real netfilter, in a fresh network namespace, on both backends.

The lab's manifests are synced into the namespace with `iptsync run --once`; then a rule is
deleted by hand with iptables, as another tool or a person would, and `diff --live` must name
that chain and exit 1; after a re-sync it must report nothing and exit 0. Every command runs
inside the test's own namespace (``ip netns exec``); the host's rules are never touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iptsync.core import names
from iptsync.kernel.netfilter import Netfilter

pytestmark = pytest.mark.netns

LAB = Path(__file__).resolve().parents[2] / "examples" / "lab"
NODE_ARGS = ("--objects", str(LAB), "--hostname-override", "node1",
             "--cluster-cidr", "10.0.0.0/14")
DEPLOY_SVC = names.svc_chain("default/deploy-svc", "tcp")


def iptsync(netfilter: Netfilter, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the iptsync command line inside the netfilter's namespace, on its backend."""
    argv = ["ip", "netns", "exec", netfilter.netns or "", sys.executable, "-m", "iptsync.cli",
            *args, "--iptables-backend", netfilter.backend.value, *NODE_ARGS]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def test_diff_live_reports_a_rule_deleted_by_hand_until_the_next_sync(
        netfilter: Netfilter) -> None:
    """In sync: exit 0; a rule deleted with iptables: exit 1 naming its chain; re-sync: 0."""
    synced = iptsync(netfilter, "run", "--once")
    assert 0 == synced.returncode, synced.stderr
    clean = iptsync(netfilter, "diff", "--live")
    assert (0, f"no changes: the live rules ({netfilter.backend.value}) already hold the "
               "rules a sync for node1 writes\n") == (clean.returncode, clean.stdout)

    # The rule that sends the second third of deploy-svc's connections to 10.0.1.11.
    netfilter.run("-t", "nat", "-D", DEPLOY_SVC, "3")
    drifted = iptsync(netfilter, "diff", "--live")
    assert 1 == drifted.returncode, drifted.stderr
    lines = drifted.stdout.splitlines()
    assert f"@@ rewrite {DEPLOY_SVC}: 0 removed, 1 added, 3 unchanged @@" in lines
    [added] = [line for line in lines if line.startswith("+ ")]
    assert f'+ -A {DEPLOY_SVC} -m comment --comment "default/deploy-svc -> 10.0.1.11:8080"' \
        in added
    as_json = iptsync(netfilter, "diff", "--live", "--json")
    [ipv4] = json.loads(as_json.stdout)["families"]  # the namespace has no IPv6 address
    assert (1, "IPv4", [DEPLOY_SVC]) == (as_json.returncode, ipv4["family"],
                                         list(ipv4["tables"]["nat"]["rewrite"]))

    resynced = iptsync(netfilter, "run", "--once")
    assert 0 == resynced.returncode, resynced.stderr
    again = iptsync(netfilter, "diff", "--live")
    assert (0, "no changes") == (again.returncode, again.stdout.split(":")[0])
