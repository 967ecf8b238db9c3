"""``iptsync trace --live`` reads the destination's family from the kernel: ip6tables for IPv6.

A fresh namespace per backend gets node1's addresses of both families (on a veth pair of its
own, IPv6 without duplicate address detection so the address is usable at once) and node1's rules
of both families as the engine renders them for ``dual-stack.yaml``, loaded with
``iptables-<backend>-restore`` and ``ip6tables-<backend>-restore``. The command then runs in
the namespace as on a node: it must read the family's rules with that family's save command
(``ip6tables-save`` prints REJECT with ``--reject-with icmp6-port-unreachable``), take the
node's addresses of that family from the interfaces, and print ``[ip]:port``.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from iptsync.core.model import IPFamily
from iptsync.core.policy import Settings
from iptsync.engine.desired import desired_from_objects
from iptsync.kernel.netfilter import Netfilter
from iptsync.lab.netns import ip_batch, lab_env, ns_exec, python_argv
from iptsync.sources.files import load_objects

pytestmark = pytest.mark.netns

OBJECTS = Path(__file__).parent / "dual-stack.yaml"
CLUSTER_CIDRS = "10.0.0.0/14,fd00:10:244::/56"


@pytest.fixture
def node1(netfilter: Netfilter) -> Netfilter:
    """The namespace with node1's addresses and node1's rules of both families loaded."""
    assert netfilter.netns is not None
    ip_batch(netfilter.netns, ["link add node0 type veth peer name node0-peer",
                               "addr add 10.100.0.2/24 dev node0",
                               "addr add fd00:100::2/64 dev node0 nodad",
                               "link set node0-peer up", "link set node0 up"])
    settings = Settings(node_name="node1", cluster_cidrs=tuple(
        map(ipaddress.ip_network, CLUSTER_CIDRS.split(","))))
    objects = load_objects([OBJECTS]).objects
    for family in IPFamily:
        desired = desired_from_objects(objects, settings.for_family(family))
        Netfilter(netfilter.backend, netns=netfilter.netns, family=family).restore(
            desired.payload())
    return netfilter


def traced(node: Netfilter, src: str, dst: str) -> dict[str, Any]:
    """`iptsync trace --live --json` inside the node's namespace."""
    assert node.netns is not None
    result = ns_exec(node.netns, python_argv(
        "iptsync.cli", "trace", "--live", "--json", "--iptables-backend", node.backend.value,
        "--cluster-cidr", CLUSTER_CIDRS, "--src", src, "--dst", dst), check=False,
        env=lab_env())
    assert 0 == result.returncode, result.stderr
    return dict(json.loads(result.stdout))


def test_live_trace_reads_the_destinations_family(node1: Netfilter) -> None:
    """IPv6 destinations are traced through ip6tables' rules, IPv4 ones through iptables'
    (in the same namespace), each with the node's addresses of its family."""
    nodeport = traced(node1, "fd00:100::100", "[fd00:100::2]:30080")
    assert ("IPv6", "external", "DNAT", True, []) == (
        nodeport["packet"]["family"], nodeport["packet"]["from"], nodeport["verdict"],
        nodeport["masquerade"], nodeport["warnings"])
    assert {"[fd00:10:244:1::10]:8080", "[fd00:10:244:2::10]:8080",
            "[fd00:10:244:2::11]:8080"} == set(nodeport["endpoints"])
    assert 1.0 == pytest.approx(sum(nodeport["endpoints"].values()))
    assert "fd00:100::2" in nodeport["node_ips"]
    assert {6} == {ipaddress.ip_address(ip).version for ip in nodeport["node_ips"]}
    v4 = traced(node1, "10.100.0.100", "10.100.0.2:30080")
    assert ("IPv4", {"10.0.1.10:8080", "10.0.2.10:8080", "10.0.2.11:8080"}) == (
        v4["packet"]["family"], set(v4["endpoints"]))


def test_live_ipv6_reject_drop_and_local_endpoint(node1: Netfilter) -> None:
    """On ip6tables' own spelling of the rules: no endpoints REJECTs, a source outside the
    load balancer's IPv6 range is dropped, ETP=Local keeps the client's IPv6 address."""
    empty = traced(node1, "fd00:10:244:1::3", "[fd00:96::13]:80")
    assert ("REJECT", "default/empty:http has no endpoints") == (
        empty["verdict"], empty["path"][-1]["comment"])
    assert "--reject-with icmp6-port-unreachable" in empty["path"][-1]["rule"]
    denied = traced(node1, "fd00:100::100", "[2001:db8:20::20]:443")
    assert ("DROP", "KUBE-PROXY-FIREWALL") == (denied["verdict"], denied["path"][-1]["chain"])
    allowed = traced(node1, "2001:db8:1::5", "[2001:db8:20::20]:443")
    assert {"[fd00:10:244:1::40]:8443", "[fd00:10:244:2::40]:8443"} == set(allowed["endpoints"])
    local = traced(node1, "fd00:100::100", "[fd00:100::2]:30082")
    assert ({"[fd00:10:244:1::30]:8080": 1.0}, False) == (local["endpoints"],
                                                          local["masquerade"])
