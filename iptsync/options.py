"""Turn command-line flags (kube-proxy's names) and a KubeProxyConfiguration into Settings.

Flags win over the config file, as in kube-proxy. Pure apart from reading the config file.
A config that asks for another proxy mode is refused; every other field that is set but not
applied is listed in :attr:`ProxyConfig.ignored`, for the caller to warn about.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from iptsync.core.model import IPAddress, IPFamily, IPNetwork, NodeInfo
from iptsync.core.policy import Settings


class OptionError(ValueError):
    """A flag or config value that cannot be used; the message names it."""


@dataclass(frozen=True)
class ProxyConfig:
    """The KubeProxyConfiguration fields iptsync uses (None: not set)."""

    hostname_override: str | None = None
    cluster_cidr: str | None = None
    masquerade_all: bool | None = None
    masquerade_bit: int | None = None
    nodeport_addresses: tuple[str, ...] | None = None
    localhost_nodeports: bool | None = None
    min_sync_period: float | None = None
    sync_period: float | None = None
    healthz_bind_address: str | None = None
    metrics_bind_address: str | None = None
    ignored: tuple[str, ...] = ()  # set fields iptsync does not apply, as dotted paths


# The KubeProxyConfiguration fields read above (and mode, checked); any other field with a
# value is reported as ignored, so nothing an operator set is dropped without a word.
APPLIED_FIELDS = frozenset({
    "apiVersion", "kind", "mode", "hostnameOverride", "clusterCIDR", "nodePortAddresses",
    "healthzBindAddress", "metricsBindAddress", "iptables.masqueradeAll",
    "iptables.masqueradeBit", "iptables.localhostNodePorts", "iptables.minSyncPeriod",
    "iptables.syncPeriod",
})
# Defaults that change nothing (beside the zero values: kubeadm writes every field, most as
# null, "", 0, false or 0s).
_NO_OP_DEFAULTS = {"bindAddress": ("0.0.0.0", "::")}
_SUPPORTED_MODES = ("", "iptables")


def unapplied_fields(doc: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the fields of ``doc`` that hold a value iptsync does not apply."""
    found: list[str] = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if path in APPLIED_FIELDS or value in _NO_OP_DEFAULTS.get(path, ()):
            continue
        if isinstance(value, Mapping):
            found.extend(unapplied_fields(value, f"{path}."))
        elif not _unset(value):
            found.append(path)
    return found


def _unset(value: Any) -> bool:
    if isinstance(value, bool | list):
        return not value
    return value in (None, "", 0, "0", "0s")


def parse_cidrs(text: str | Iterable[str] | None, what: str) -> tuple[IPNetwork, ...]:
    if text is None:
        return ()
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in parts if p.strip())
    except ValueError as err:
        raise OptionError(f"{what}: {err}") from None


def parse_ips(texts: Iterable[str], what: str) -> tuple[IPAddress, ...]:
    """Addresses, each given on its own or comma-separated (``--node-ip 10.0.0.2,fd00::2``)."""
    try:
        return tuple(ipaddress.ip_address(t.strip()) for text in texts
                     for t in text.split(",") if t.strip())
    except ValueError as err:
        raise OptionError(f"{what}: {err}") from None


def one_per_family(values: Sequence[IPAddress | IPNetwork], what: str) -> None:
    """Refuse two values of one IP family, as kube-proxy refuses a --cluster-cidr that is
    not one CIDR or a dual-stack pair: a second value of a family would be silently unused."""
    seen: dict[IPFamily, IPAddress | IPNetwork] = {}
    for value in values:
        family = IPFamily.of(value)
        if family in seen:
            raise OptionError(f"{what}: {seen[family]} and {value} are both {family.value}; "
                              "give at most one per IP family (IPv4,IPv6)")
        seen[family] = value


def parse_cluster_cidrs(text: str | Iterable[str] | None,
                        what: str = "--cluster-cidr") -> tuple[IPNetwork, ...]:
    """kube-proxy's --cluster-cidr: one CIDR, or one per family (``10.244.0.0/16,fd00::/56``)."""
    cidrs = parse_cidrs(text, what)
    one_per_family(cidrs, what)
    return cidrs


NODEPORT_PRIMARY = "primary"  # --nodeport-addresses primary: the node's primary IP per family


def parse_nodeport_addresses(text: str | Sequence[str] | None,
                             what: str = "--nodeport-addresses",
                             ) -> tuple[tuple[IPNetwork, ...], bool]:
    """CIDRs of both families, or kube-proxy's ``primary`` (alone): (CIDRs, primary)."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text or ())]
    if NODEPORT_PRIMARY not in parts:
        return parse_cidrs(parts, what), False
    if [p for p in parts if p] != [NODEPORT_PRIMARY]:
        raise OptionError(f"{what}: {NODEPORT_PRIMARY!r} cannot be combined with CIDRs")
    return (), True


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int, what: str) -> float:
    """A Go-style duration (``1s``, ``500ms``, ``1m30s``) or a number of seconds."""
    if isinstance(text, int | float):
        return float(text)
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise OptionError(f"{what}: {text!r} is not a duration like 1s, 500ms or 1m30s")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def read_config(path: str | Path) -> ProxyConfig:
    """Read the fields iptsync uses from a KubeProxyConfiguration YAML file."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise OptionError(f"--config {path}: {err}") from None
    if not isinstance(doc, Mapping) or doc.get("kind") != "KubeProxyConfiguration":
        raise OptionError(f"--config {path}: not a KubeProxyConfiguration")
    mode = doc.get("mode") or ""
    if mode not in _SUPPORTED_MODES:
        # Refused rather than warned about: a node that was meant to run IPVS or nftables
        # and silently got iptables rules instead is the harder failure to find.
        raise OptionError(f"--config {path}: mode: {mode!r} is not supported; iptsync "
                          "implements kube-proxy's iptables mode only (set mode: iptables, "
                          "or leave it empty)")
    iptables = doc.get("iptables") or {}
    addresses = doc.get("nodePortAddresses")
    return ProxyConfig(
        hostname_override=doc.get("hostnameOverride") or None,
        cluster_cidr=doc.get("clusterCIDR") or None,
        masquerade_all=_opt(iptables, "masqueradeAll", bool),
        masquerade_bit=_opt(iptables, "masqueradeBit", int),
        nodeport_addresses=tuple(addresses) if addresses else None,
        localhost_nodeports=_opt(iptables, "localhostNodePorts", bool),
        min_sync_period=_duration_opt(iptables, "minSyncPeriod"),
        sync_period=_duration_opt(iptables, "syncPeriod"),
        healthz_bind_address=doc.get("healthzBindAddress") or None,
        metrics_bind_address=doc.get("metricsBindAddress") or None,
        ignored=tuple(unapplied_fields(doc)),
    )


def _opt(section: Mapping[str, Any], key: str, kind: type) -> Any:
    value = section.get(key)
    if value is not None and not isinstance(value, kind):
        raise OptionError(f"--config: iptables.{key} must be a {kind.__name__}")
    return value


def _duration_opt(section: Mapping[str, Any], key: str) -> float | None:
    value = section.get(key)
    return None if value is None else parse_duration(value, f"--config: iptables.{key}")


def build_settings(*, node_name: str, cluster_cidr: str | None, masquerade_all: bool,
                   masquerade_bit: int, nodeport_addresses: str | Sequence[str] | None,
                   node_ips: Sequence[IPAddress], localhost_nodeports: bool) -> Settings:
    if not 0 <= masquerade_bit <= 31:
        raise OptionError(f"--iptables-masquerade-bit: {masquerade_bit} is outside 0..31")
    one_per_family(node_ips, "--node-ip")
    addresses, primary = parse_nodeport_addresses(nodeport_addresses)
    return Settings(
        node_name=node_name,
        cluster_cidrs=parse_cluster_cidrs(cluster_cidr),
        masquerade_all=masquerade_all,
        masquerade_bit=masquerade_bit,
        nodeport_addresses=addresses,
        nodeport_primary=primary,
        node_ips=tuple(node_ips),
        localhost_nodeports=localhost_nodeports,
    )


def with_node(settings: Settings, node: NodeInfo | None,
              interface_ips: Sequence[IPAddress] = ()) -> Settings:
    """Fill in node addresses of the settings' family: --node-ip or else the Node object's
    (the first is the primary), then the interfaces'; and resolve --nodeport-addresses
    primary to that primary address."""
    family = settings.family
    known = list(settings.node_ips) or [ip for ip in (node.addresses if node else ())
                                        if IPFamily.of(ip) is family]
    ips = known + [ip for ip in interface_ips if ip not in known and IPFamily.of(ip) is family]
    settings = replace(settings, node_ips=tuple(ips))
    if settings.nodeport_primary:
        settings = replace(settings, nodeport_addresses=primary_nodeport_cidrs(known[:1]))
    return settings


def primary_nodeport_cidrs(primary: Sequence[IPAddress]) -> tuple[IPNetwork, ...]:
    """--nodeport-addresses primary for one family, as kube-proxy resolves it: the node's
    primary address of the family as a /32 or /128; none known (or loopback): no
    restriction, every address of the family accepts NodePorts."""
    return tuple(ipaddress.ip_network(ip) for ip in primary if not ip.is_loopback)
