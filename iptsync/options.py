"""Turn kube-proxy's command line and its KubeProxyConfiguration into iptsync's settings.

:func:`resolve` reads the flags given and the ``--config`` file through the table of
:mod:`iptsync.kubeproxy`, with kube-proxy's precedence: without ``--config``, the flags; with
it, the file, and of the flags only those kube-proxy still reads then (``--hostname-override``,
``--master``, the logging flags); every other flag given is ignored, with a warning, as
kube-proxy ignores it (silently). A zero or null field means kube-proxy's default where
kube-proxy's defaulting says so. Each flag and field given gets a :class:`Verdict`: applied
(``same``), ``ignored`` (why) or ``refused`` (why, naming the flag or field); the caller logs
them, or prints them (``iptsync check-config``). Pure apart from reading the config file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from iptsync.core.model import IPAddress, IPFamily, IPNetwork, NodeInfo
from iptsync.core.policy import Settings
from iptsync.kernel.sysctl import ConntrackConfig
from iptsync.kubeproxy import (
    API_VERSION,
    BY_FIELD,
    BY_FLAG,
    OPTIONS,
    SECTIONS,
    TYPE_FIELDS,
    Option,
    OptionError,
    go_duration,
    parse_duration,
)

__all__ = ["ConntrackConfig", "OptionError", "ProxyConfig", "Verdict", "build_settings",
           "parse_cidrs", "parse_duration", "parse_ips", "read_config", "resolve",
           "with_node"]

Handling = Literal["same", "ignored", "refused"]


@dataclass(frozen=True)
class Verdict:
    """What iptsync does with one flag or field that was given."""

    name: str  # "--cluster-cidr", or "iptables.syncPeriod" (a field of the config file)
    value: str  # as given
    handling: Handling
    reason: str
    default: bool = False  # the value is kube-proxy's default (a field kubeadm writes anyway)
    suspicious: bool = False  # ignored, and probably a mistake: a warning, not an INFO line


def _defaults() -> dict[str, Any]:
    return {option.key: option.default for option in OPTIONS if option.key}


@dataclass(frozen=True)
class ProxyConfig:
    """The configuration in effect: one attribute per applied option of
    :data:`iptsync.kubeproxy.OPTIONS` (its ``key``), kube-proxy's default where nothing set
    it, and the verdict on every flag and field given."""

    values: Mapping[str, Any] = field(default_factory=_defaults)
    verdicts: tuple[Verdict, ...] = ()
    ignored: Mapping[str, Any] = field(default_factory=dict)  # field -> value given, unused

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    @property
    def refused(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.handling == "refused"]

    @property
    def conntrack(self) -> ConntrackConfig:
        return ConntrackConfig(**{f.name: self.values[f"conntrack_{f.name}"]
                                  for f in fields(ConntrackConfig)})

    def healthz_address(self) -> str:
        """HOST:PORT of /healthz (empty: off), kube-proxy's default filled in."""
        return self._address("healthz_bind_address", "healthz_port", ("0.0.0.0", "[::]"))

    def metrics_address(self) -> str:
        """HOST:PORT of /metrics (empty: off), kube-proxy's default filled in."""
        return self._address("metrics_bind_address", "metrics_port", ("127.0.0.1", "[::1]"))

    def _address(self, key: str, port_key: str, hosts: tuple[str, str]) -> str:
        text, port = self.values[key], self.values[port_key]
        if text is None:  # not set: the bind address's family decides
            v6 = ipaddress.ip_address(self.values["bind_address"]).version == 6
            text = f"{hosts[v6]}:{BY_FLAG[port_key.replace('_', '-')].default}"
        if port == 0:  # the deprecated --healthz-port 0 / --metrics-port 0
            return ""
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return str(text)
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def load_document(path: str | Path) -> Mapping[str, Any]:
    """A KubeProxyConfiguration file, checked to be one; OptionError naming the file."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise OptionError(f"--config {path}: {err}") from None
    check_document(doc, f"--config {path}")
    assert isinstance(doc, Mapping)
    return doc


def check_document(doc: Any, where: str) -> None:
    if not isinstance(doc, Mapping) or doc.get("kind") != "KubeProxyConfiguration":
        raise OptionError(f"{where}: not a KubeProxyConfiguration")
    if doc.get("apiVersion") != API_VERSION:
        raise OptionError(f"{where}: apiVersion {doc.get('apiVersion')!r} is not supported "
                          f"(kube-proxy reads {API_VERSION})")


def read_config(path: str | Path) -> ProxyConfig:
    """The configuration a KubeProxyConfiguration file gives, without flags."""
    return resolve((), load_document(path), f"--config {path}")


def _shown(raw: Any) -> str:
    if isinstance(raw, list | tuple):
        return ",".join(map(str, raw))
    if isinstance(raw, Mapping):
        return ",".join(f"{k}={v}" for k, v in raw.items())
    if raw is None or raw == "":
        return "null" if raw is None else '""'
    return str(raw).lower() if isinstance(raw, bool) else str(raw)


class _Resolver:
    """Collects values (by key), where each came from, and the verdicts."""

    def __init__(self) -> None:
        self.values = _defaults() | {"healthz_bind_address": None,
                                     "metrics_bind_address": None}
        self.origin: dict[str, str] = {}
        self.verdicts: list[Verdict] = []
        self.ignored: dict[str, Any] = {}

    def take(self, option: Option, raw: Any, name: str, what: str, *,
             from_file: bool = False) -> None:
        shown = _shown(raw)
        if from_file and (raw is None or (option.zero_is_default and _zero(raw))):
            self.verdicts.append(Verdict(name, shown, "same" if option.applied else "ignored",
                                         option.note, default=True))
            return
        try:
            value = option.kind.parse(raw, what)
            problem = option.refuse(value) if option.refuse else None
        except OptionError as err:
            self.verdicts.append(Verdict(name, shown, "refused", str(err)))
            return
        if problem:
            self.verdicts.append(Verdict(name, shown, "refused", f"{what}: {problem}"))
            return
        is_default = value == option.default
        if option.key is None:
            if option.field:
                self.ignored[option.field] = value
            self.verdicts.append(Verdict(name, shown, "ignored", option.note, is_default))
            return
        if option.kind.repeated and not from_file and option.key in self.origin:
            value = _merge(self.values[option.key], value)
        self.values[option.key] = value
        self.origin[option.key] = what
        self.verdicts.append(Verdict(name, shown, "same", option.note, is_default))

    def refuse(self, name: str, value: str, reason: str) -> None:
        self.verdicts.append(Verdict(name, value, "refused", reason))


def _merge(before: Any, value: Any) -> Any:
    return {**before, **value} if isinstance(value, dict) else (*before, *value)


def _zero(raw: Any) -> bool:
    return raw in ("", 0, "0", "0s") and not isinstance(raw, bool)


def resolve(flags: Sequence[tuple[str, Any]], document: Mapping[str, Any] | None,
            where: str = "--config") -> ProxyConfig:
    """The configuration kube-proxy would run with, given ``flags`` (name without dashes,
    raw value, as given) and the ``--config`` file's ``document`` (None: no
    file; ``where`` names it in messages)."""
    resolver = _Resolver()
    if document is not None:
        _walk(resolver, document, "", where)
    for name, raw in flags:
        option = BY_FLAG[name]
        # kube-proxy replaces its whole configuration with the file: only the flags it reads
        # apart (with_config) still count.
        if document is not None and not option.with_config:
            hint = f"; set {option.field} in the file" if option.field else ""
            resolver.verdicts.append(Verdict(
                f"--{name}", _shown(raw), "ignored",
                f"--config is given: kube-proxy ignores this flag then, and so does "
                f"iptsync{hint}", suspicious=True))
            continue
        resolver.take(option, raw, f"--{name}", f"--{name}")
    _validate(resolver)
    return ProxyConfig(resolver.values, tuple(resolver.verdicts), resolver.ignored)


def _walk(resolver: _Resolver, doc: Mapping[str, Any], prefix: str, where: str) -> None:
    for key, raw in doc.items():
        path = f"{prefix}{key}"
        if path in TYPE_FIELDS:
            continue
        option = BY_FIELD.get(path)
        if option is not None:
            resolver.take(option, raw, path, f"{where}: {path}", from_file=True)
        elif path in SECTIONS and isinstance(raw, Mapping):
            _walk(resolver, raw, f"{path}.", where)
        elif not (path in SECTIONS and raw is None):
            resolver.verdicts.append(Verdict(
                path, _shown(raw), "ignored",
                "not a KubeProxyConfiguration v1alpha1 field (kube-proxy's lenient decoding "
                "drops it too)", suspicious=True))


def _validate(resolver: _Resolver) -> None:
    """kube-proxy's checks across fields, each naming the flag or field that set the value."""
    values, origin = resolver.values, resolver.origin

    def name(key: str, fallback: str) -> str:
        return origin.get(key, fallback)

    if values["min_sync_period"] > values["sync_period"]:
        resolver.refuse(name("min_sync_period", "--iptables-min-sync-period"),
                        go_duration(values["min_sync_period"]),
                        f"{name('min_sync_period', '--iptables-min-sync-period')}: must be "
                        f"less than or equal to the sync period "
                        f"({go_duration(values['sync_period'])})")
    mode = values["detect_local_mode"]
    for wanted, key, flag in (("BridgeInterface", "bridge_interface", "--pod-bridge-interface"),
                              ("InterfaceNamePrefix", "interface_name_prefix",
                               "--pod-interface-name-prefix")):
        if mode == wanted and not values[key]:
            resolver.refuse(name(key, flag), "", f"{name(key, flag)}: must not be empty with "
                            f"detect-local-mode {wanted}")
    if mode in ("", "ClusterCIDR") and values["cluster_cidr"]:
        _check_cluster_cidrs(resolver, values["cluster_cidr"], name("cluster_cidr",
                                                                    "--cluster-cidr"))
    _check_nodeport_addresses(resolver, values["nodeport_addresses"],
                              name("nodeport_addresses", "--nodeport-addresses"))


def _check_cluster_cidrs(resolver: _Resolver, text: str, what: str) -> None:
    """One CIDR, or a pair of one IPv4 and one IPv6 CIDR (kube-proxy's dual-stack rule)."""
    parts = text.split(",")
    try:
        cidrs = [ipaddress.ip_network(p.strip(), strict=False) for p in parts]
    except ValueError as err:
        resolver.refuse(what, text, f"{what}: {err} (must be a valid CIDR block, e.g. "
                        "10.100.0.0/16 or fde4:8dba:82e1::/48)")
        return
    if len(cidrs) > 2 or (len(cidrs) == 2 and cidrs[0].version == cidrs[1].version):
        resolver.refuse(what, text, f"{what}: must be either a single CIDR or a dual-stack "
                        "pair of CIDRs (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)")


def _check_nodeport_addresses(resolver: _Resolver, addresses: tuple[str, ...],
                              what: str) -> None:
    if "primary" in addresses:
        if addresses != ("primary",):
            resolver.refuse(what, ",".join(addresses), f"{what}: can't use both 'primary' "
                            "and CIDRs")
        return
    for address in addresses:
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            resolver.refuse(what, ",".join(addresses),
                            f"{what}: {address!r} must be a valid CIDR")


def effective_document(config: ProxyConfig) -> dict[str, Any]:
    """The configuration in effect as a KubeProxyConfiguration (``--write-config-to``):
    applied options at their values, the others as given or at kube-proxy's default."""
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "KubeProxyConfiguration"}
    for option in OPTIONS:
        if option.field is None:
            continue
        if option.key == "healthz_bind_address":
            value: Any = config.healthz_address()
        elif option.key == "metrics_bind_address":
            value = config.metrics_address()
        elif option.key is not None:
            value = option.kind.yaml(config.values[option.key])
        else:
            value = option.kind.yaml(config.ignored.get(option.field, option.default))
        _put(doc, option.field, value)
    return doc


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    *sections, last = path.split(".")
    for part in sections:
        doc = doc.setdefault(part, {})
    doc[last] = value


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


def build_settings(*, node_name: str, cluster_cidr: str | None, masquerade_all: bool,
                   masquerade_bit: int, nodeport_addresses: str | Sequence[str] | None,
                   node_ips: Sequence[IPAddress], localhost_nodeports: bool,
                   detect_local_mode: str = "ClusterCIDR", bridge_interface: str = "",
                   interface_name_prefix: str = "") -> Settings:
    if not 0 <= masquerade_bit <= 31:
        raise OptionError(f"--iptables-masquerade-bit: {masquerade_bit} is outside 0..31")
    one_per_family(node_ips, "--node-ip")
    primary = nodeport_addresses in ("primary", ("primary",), ["primary"])
    return Settings(
        node_name=node_name,
        cluster_cidrs=parse_cluster_cidrs(cluster_cidr),
        masquerade_all=masquerade_all,
        masquerade_bit=masquerade_bit,
        nodeport_addresses=() if primary else parse_cidrs(nodeport_addresses,
                                                          "--nodeport-addresses"),
        nodeport_primary=primary,
        node_ips=tuple(node_ips),
        localhost_nodeports=localhost_nodeports,
        detect_local_mode=detect_local_mode or "ClusterCIDR",
        bridge_interface=bridge_interface,
        interface_name_prefix=interface_name_prefix,
    )


def settings_from_config(config: ProxyConfig, *, node_name: str,
                         node_ips: Sequence[IPAddress]) -> Settings:
    """Settings for this node from the configuration in effect; ``node_ips``: iptsync's own
    ``--node-ip`` flags. A specific ``bindAddress`` is the node's primary IP of its family."""
    ips = list(node_ips)
    bind = ipaddress.ip_address(config.bind_address)
    if not bind.is_unspecified and bind not in ips:
        ips.insert(0, bind)
    return build_settings(
        node_name=node_name, cluster_cidr=config.cluster_cidr or None,
        masquerade_all=config.masquerade_all, masquerade_bit=config.masquerade_bit,
        nodeport_addresses=config.nodeport_addresses or None, node_ips=ips,
        localhost_nodeports=config.localhost_nodeports,
        detect_local_mode=config.detect_local_mode, bridge_interface=config.bridge_interface,
        interface_name_prefix=config.interface_name_prefix)


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
