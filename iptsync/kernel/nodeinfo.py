"""This node's addresses, read with pyroute2 (for --nodeport-addresses and the node IP)."""

from __future__ import annotations

import ipaddress
import socket

from iptsync.core.model import IPAddress


def interface_addresses() -> list[IPAddress]:
    """Addresses of both families on this network namespace's interfaces, usable ones first
    (loopback and IPv6 link-local last: never a node's primary address)."""
    from pyroute2 import IPRoute  # noqa: PLC0415  (netlink socket only when needed)

    with IPRoute() as ipr:
        found = [ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                 for family in (socket.AF_INET, socket.AF_INET6)
                 for msg in ipr.get_addr(family=family)]
    return sorted(found, key=lambda ip: ip.is_loopback or ip.is_link_local)
