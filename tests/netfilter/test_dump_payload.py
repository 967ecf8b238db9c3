"""`iptsync dump` prints what a full sync writes, checked against the kernel on both backends.

The agent's full sync (planned, as on nft, or streamed while rendering, as on legacy) writes
into an empty namespace; the dump of the same objects, restored there afterwards with a
flushing iptables-restore, must leave the kernel exactly as the sync left it: every chain,
every rule in its order, every jump.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner

from iptsync.cli import main
from iptsync.core.render import Settings
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter
from iptsync.sources.files import load_objects

pytestmark = pytest.mark.netns

SCENARIOS = Path(__file__).parents[1] / "render" / "scenarios"
# Cluster IPs, NodePorts, load balancers with source ranges and affinity, Local policies, and
# services without endpoints (filter REJECT rules).
FILES = [SCENARIOS / f"{name}.yaml" for name in ("upstream-overall",
                                                 "loadbalancer-ranges-affinity",
                                                 "etp-local-with-local", "no-endpoints")]
SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))
FLAGS = ["--hostname-override", "node1", "--cluster-cidr", "10.0.0.0/14",
         "--node-ip", "10.100.0.2"]


def dump_payload() -> str:
    """What ``iptsync dump`` prints for FILES under FLAGS."""
    args = [arg for path in FILES for arg in ("--objects", str(path))]
    result = CliRunner().invoke(main, ["dump", *args, *FLAGS])
    assert 0 == result.exit_code, result.output
    return result.stdout


@pytest.mark.parametrize("stream_full", [False, True], ids=["planned", "streamed"])
def test_dump_payload_leaves_the_kernel_as_a_full_sync_does(netfilter: Netfilter,
                                                            stream_full: bool) -> None:
    """Restoring dump's payload over a full sync's rules changes nothing in either table."""
    engine = Engine(netfilter, SETTINGS, stream_full=stream_full)
    for manifest in load_objects(FILES).objects:
        engine.upsert(manifest)
    engine.sync(full=True)
    synced = netfilter.save()
    assert 20 < sum(len(rules) for rules in synced["nat"].chains.values())
    netfilter.restore(dump_payload(), noflush=False)  # flushes filter and nat first
    assert synced == netfilter.save()
