"""The sysctls kube-proxy sets, written through /proc/sys of the current network namespace.

Besides route_localnet and bridge-nf-call-iptables, kube-proxy tunes conntrack at start
(``cmd/kube-proxy/app/conntrack.go`` and ``server_linux.go``): ``nf_conntrack_max`` from
``maxPerCore`` x CPUs, at least ``min`` (and the module's hash size to a quarter of it when
smaller), the TCP established and close-wait timeouts, the UDP timeouts and
``nf_conntrack_tcp_be_liberal``. :class:`ConntrackConfig` holds those settings with
kube-proxy's defaults, :func:`apply_conntrack` applies them as kube-proxy does. Where kube-proxy
would stop, iptsync does not: a sysctl that is missing, read-only (nf_conntrack_max in any
network namespace but the host's; /proc/sys or /sys mounted read-only in a container) or
refused is logged with its current value, the wanted one and why, and the agent goes on.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROUTE_LOCALNET = "net/ipv4/conf/all/route_localnet"
BRIDGE_NF_CALL_IPTABLES = "net/bridge/bridge-nf-call-iptables"
CONNTRACK_MAX = "net/netfilter/nf_conntrack_max"
TCP_ESTABLISHED = "net/netfilter/nf_conntrack_tcp_timeout_established"
TCP_CLOSE_WAIT = "net/netfilter/nf_conntrack_tcp_timeout_close_wait"
TCP_BE_LIBERAL = "net/netfilter/nf_conntrack_tcp_be_liberal"
UDP_TIMEOUT = "net/netfilter/nf_conntrack_udp_timeout"
UDP_STREAM_TIMEOUT = "net/netfilter/nf_conntrack_udp_timeout_stream"
HASHSIZE = "module/nf_conntrack/parameters/hashsize"  # under /sys: one for the whole machine

# What to do when a write fails, by errno (EROFS: /proc/sys or /sys mounted read-only, as in
# a container without privileges; EOPNOTSUPP: hashsize written from another network namespace).
_HINT = {errno.EPERM: "run privileged or set it on the node",
         errno.EACCES: "run privileged or set it on the node",
         errno.EOPNOTSUPP: "only the host's network namespace can set it"}


@dataclass(frozen=True)
class ConntrackConfig:
    """kube-proxy's ``conntrack`` settings (KubeProxyConntrackConfiguration), with its defaults.

    Timeouts are in seconds; None (or 0) leaves the kernel's value alone, as kube-proxy does.
    """

    max_per_core: int | None = 32768  # maxPerCore (--conntrack-max-per-core); None/0: leave max
    min: int | None = 131072  # min (--conntrack-min): the floor of maxPerCore x CPUs
    tcp_established_timeout: float | None = 86400.0  # tcpEstablishedTimeout, 24h
    tcp_close_wait_timeout: float | None = 3600.0  # tcpCloseWaitTimeout, 1h
    tcp_be_liberal: bool = False  # tcpBeLiberal: set nf_conntrack_tcp_be_liberal=1; else leave
    udp_timeout: float | None = None  # udpTimeout, 0s: leave alone
    udp_stream_timeout: float | None = None  # udpStreamTimeout, 0s: leave alone

    def conntrack_max(self, cpus: int) -> int | None:
        """nf_conntrack_max as kube-proxy computes it (None: leave it alone)."""
        if not self.max_per_core or self.max_per_core <= 0:
            return None
        return max(self.max_per_core * cpus, self.min or 0) or None


def apply_conntrack(config: ConntrackConfig, root: Path = Path("/proc/sys"), *,
                    sysfs: Path = Path("/sys"), cpus: int | None = None) -> None:
    """Set the conntrack sysctls of this network namespace as kube-proxy does at start;
    never raises (what is not set is logged, with why)."""
    wanted = config.conntrack_max(cpus or os.cpu_count() or 1)
    if wanted is not None and ensure(CONNTRACK_MAX, wanted, root, missing=log.warning) \
            and _read(root / CONNTRACK_MAX) == wanted:
        _ensure_hashsize(wanted // 4, sysfs)
    timeouts = ((TCP_ESTABLISHED, config.tcp_established_timeout),
                (TCP_CLOSE_WAIT, config.tcp_close_wait_timeout),
                (UDP_TIMEOUT, config.udp_timeout),
                (UDP_STREAM_TIMEOUT, config.udp_stream_timeout))
    for name, seconds in timeouts:
        if seconds and seconds > 0:
            ensure(name, int(seconds), root, missing=log.warning)  # kube-proxy truncates too
    if config.tcp_be_liberal:
        ensure(TCP_BE_LIBERAL, 1, root, missing=log.warning)


def tcp_be_liberal(root: Path = Path("/proc/sys")) -> bool:
    """Whether nf_conntrack_tcp_be_liberal is 1 here: kube-proxy then leaves out the rule that
    drops packets conntrack considers INVALID."""
    return _read(root / TCP_BE_LIBERAL) == 1


def ensure_proxy_sysctls(localhost_nodeports: bool, root: Path = Path("/proc/sys")) -> None:
    """route_localnet for localhost NodePorts; bridged traffic through iptables when bridged."""
    if localhost_nodeports and not ensure(ROUTE_LOCALNET, 1, root):
        log.warning("sysctl %s missing: localhost NodePorts will not work", ROUTE_LOCALNET)
    if not ensure(BRIDGE_NF_CALL_IPTABLES, 1, root):
        log.debug("br_netfilter not loaded; %s not set", BRIDGE_NF_CALL_IPTABLES)


def ensure(name: str, value: int, root: Path = Path("/proc/sys"), *,
           missing: Callable[..., None] | None = None) -> bool:
    """Set ``name`` to ``value`` if it exists and differs; returns whether it exists.

    A value that cannot be written is logged with the reason (at INFO when the kernel makes
    the sysctl read-only in this network namespace, at WARNING otherwise); ``missing``, a
    logging function, is called when the sysctl does not exist.
    """
    path = root / name
    dotted = name.replace("/", ".")
    if not path.exists():
        if missing is not None:
            missing("sysctl %s missing (is nf_conntrack loaded?): not set to %d", dotted, value)
        return False
    current = _read(path)
    if current == value:
        return True
    try:
        path.write_text(f"{value}\n")
    except OSError as err:
        # A mode without write bits is the kernel's own: nf_conntrack_max outside the host's
        # network namespace. Expected there, so not a warning.
        read_only = not path.stat().st_mode & 0o222
        hint = ("read-only in this network namespace, only the host's can set it" if read_only
                else _HINT.get(err.errno or 0, "set it on the node"))
        log.log(logging.INFO if read_only else logging.WARNING,
                "cannot set sysctl %s=%d (%s); %s; it stays %s", dotted, value,
                err.strerror or err, hint, current)
        return True
    log.info("set sysctl %s=%d (was %s)", dotted, value, current)
    return True


def _ensure_hashsize(wanted: int, sysfs: Path) -> None:
    """kube-proxy raises the module's hash size to a quarter of nf_conntrack_max, never
    lowers it (Linux allows the write from the host's network namespace only)."""
    path = sysfs / HASHSIZE
    current = _read(path)
    if current is None:
        log.warning("conntrack hashsize unreadable at %s: not raised to %d", path, wanted)
        return
    if current >= wanted:
        return
    try:
        path.write_text(f"{wanted}\n")
    except OSError as err:
        log.warning("cannot set conntrack hashsize=%d (%s); %s; it stays %d", wanted,
                    err.strerror or err, _HINT.get(err.errno or 0, "set it on the node"),
                    current)
        return
    log.info("set conntrack hashsize=%d (was %d)", wanted, current)


def _read(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
