"""The sysctls kube-proxy sets, written through /proc/sys of the current network namespace."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"
BRIDGE_NF_CALL_IPTABLES = "net/bridge/bridge-nf-call-iptables"


def ensure(name: str, value: int, root: Path = Path("/proc/sys")) -> bool:
    """Set ``name`` to ``value`` if it exists and differs; returns whether it exists."""
    path = root / name
    if not path.exists():
        return False
    if path.read_text().strip() != str(value):
        try:
            path.write_text(f"{value}\n")
        except OSError as err:
            # A container without privileges sees /proc/sys read-only: the operator sets it.
            log.warning("cannot set sysctl %s=%d (%s); set it on the node", name.replace(
                "/", "."), value, err.strerror or err)
            return True
        log.info("set sysctl %s=%d", name.replace("/", "."), value)
    return True


def ensure_proxy_sysctls(localhost_nodeports: bool, root: Path = Path("/proc/sys")) -> None:
    """route_localnet for localhost NodePorts; bridged traffic through iptables when bridged."""
    if localhost_nodeports and not ensure(ROUTE_LOCALNET, 1, root):
        log.warning("sysctl %s missing: localhost NodePorts will not work", ROUTE_LOCALNET)
    if not ensure(BRIDGE_NF_CALL_IPTABLES, 1, root):
        log.debug("br_netfilter not loaded; %s not set", BRIDGE_NF_CALL_IPTABLES)
