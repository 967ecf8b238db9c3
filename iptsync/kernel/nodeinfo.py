"""This node's addresses, read with pyroute2 (for --nodeport-addresses and the node IP)."""

from __future__ import annotations

import ipaddress
import socket

from iptsync.core.model import IPAddress


def interface_addresses() -> list[IPAddress]:
    """IPv4 addresses of this network namespace's interfaces, non-loopback ones first."""
    from pyroute2 import IPRoute  # noqa: PLC0415  (netlink socket only when needed)

    with IPRoute() as ipr:
        found = [ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
                 for msg in ipr.get_addr(family=socket.AF_INET)]
    return sorted(found, key=lambda ip: ip.is_loopback)
