"""Where NodePorts listen, per IP family: kube-proxy's NodePortAddresses and the last rule of
nat KUBE-SERVICES."""

from __future__ import annotations

import ipaddress

import pytest

from iptsync.core.model import IPFamily
from iptsync.core.policy import Settings
from iptsync.core.render import nodeports_jumps

ip, net = ipaddress.ip_address, ipaddress.ip_network
NODE = Settings(node_name="node1", node_ips=(
    ip("10.100.0.2"), ip("127.0.0.1"), ip("fd00:100::2"), ip("::1")))
LOCAL = "-m addrtype --dst-type LOCAL"


@pytest.mark.parametrize(("family", "cidrs", "localhost", "expected"), [
    (IPFamily.IPV4, (), True, [LOCAL]),
    (IPFamily.IPV4, (), False, [f"{LOCAL} ! -d 127.0.0.0/8"]),
    (IPFamily.IPV4, ("0.0.0.0/0",), True, [LOCAL]),
    (IPFamily.IPV4, ("fd00:100::/64",), True, [LOCAL]),
    (IPFamily.IPV4, ("10.100.0.0/24", "127.0.0.0/8"), True, ["-d 10.100.0.2", "-d 127.0.0.1"]),
    (IPFamily.IPV4, ("10.100.0.0/24", "127.0.0.0/8"), False, ["-d 10.100.0.2"]),
    (IPFamily.IPV6, (), True, [f"{LOCAL} ! -d ::1/128"]),
    (IPFamily.IPV6, ("::/0",), True, [f"{LOCAL} ! -d ::1/128"]),
    (IPFamily.IPV6, ("10.100.0.0/24",), True, [f"{LOCAL} ! -d ::1/128"]),
    (IPFamily.IPV6, ("fd00:100::/64", "::1/128", "10.100.0.0/24"), True, ["-d fd00:100::2"]),
])
def test_nodeport_jump_per_family(family: IPFamily, cidrs: tuple[str, ...], localhost: bool,
                                  expected: list[str]) -> None:
    """NodePorts take every local address of the family unless --nodeport-addresses names
    CIDRs of that family (a zero-length one is every address); loopback serves IPv4 NodePorts
    only with localhost NodePorts on, IPv6 ones never."""
    settings = Settings(node_name="node1", node_ips=NODE.node_ips, localhost_nodeports=localhost,
                        nodeport_addresses=tuple(map(net, cidrs))).for_family(family)
    # Each rule is "-m comment --comment TEXT <destination> -j KUBE-NODEPORTS".
    assert expected == [" ".join(rule.args[4:-2]) for rule in nodeports_jumps(settings)]
