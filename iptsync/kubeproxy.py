"""kube-proxy's command line and KubeProxyConfiguration (v1alpha1), as one table.

Every flag and every configuration field of kube-proxy 1.34 has one :class:`Option`: kube-proxy's
spelling, the type of its value, kube-proxy's default, and what iptsync does with it: applies
it with kube-proxy's meaning (``key`` names the :class:`~iptsync.options.ProxyConfig` attribute
it sets) or ignores it, with the reason (logged at INFO when it is given). A value iptsync
cannot honour (``mode: ipvs``) is refused by the option's ``refuse`` check. The parser of
``iptsync run`` (and of the node flags of the other commands), ``iptsync check-config``, the
INFO lines and the table in docs/comparison.md all read this table, so they cannot disagree.

Pure: values in, typed values or :class:`OptionError` (naming the flag or field) out.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class OptionError(ValueError):
    """A flag or config value that cannot be used; the message names it."""


# --- value types (kube-proxy's Go types, read from a flag's text or a YAML value) -----------

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}


def parse_duration(text: str | float, what: str) -> float:
    """Seconds from a Go duration (``1s``, ``500ms``, ``1m30s``, ``-1s``, ``0``), as
    ``time.ParseDuration`` reads it, or from a plain number of seconds (iptsync's own flags
    always took those)."""
    if isinstance(text, bool):
        raise OptionError(f"{what}: {text!r} is not a duration like 1s, 500ms or 1m30s")
    if isinstance(text, int | float):
        return float(text)
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    sign, body = (-1.0, value[1:]) if value.startswith("-") else (1.0, value.lstrip("+"))
    parts = _DURATION.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise OptionError(f"{what}: {text!r} is not a duration like 1s, 500ms or 1m30s")
    return sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def go_duration(seconds: float) -> str:
    """``seconds`` as Go prints a duration (``30s``, ``1m0s``, ``24h0m0s``, ``250ms``)."""
    if seconds == 0:
        return "0s"
    sign, rest = ("-", -seconds) if seconds < 0 else ("", seconds)
    if rest < 1:
        return f"{sign}{rest * 1000:g}ms"
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:g}s"
    if hours or minutes:
        text = f"{int(minutes)}m" + text
    if hours:
        text = f"{int(hours)}h" + text
    return sign + text


def _string(raw: Any, what: str) -> str:
    if isinstance(raw, Mapping | list | bool):
        raise OptionError(f"{what}: {raw!r} is not a string")
    return "" if raw is None else str(raw)


def _bool(raw: Any, what: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if str(raw) in _GO_TRUE:
        return True
    if str(raw) in _GO_FALSE:
        return False
    raise OptionError(f"{what}: {raw!r} is not a boolean (true or false)")


def _int(raw: Any, what: str) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise OptionError(f"{what}: {raw!r} is not an integer")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: {raw!r} is not an integer") from None
    if not -2**31 <= value < 2**31:
        raise OptionError(f"{what}: {raw!r} does not fit in 32 bits")
    return value


def _float(raw: Any, what: str) -> float:
    if isinstance(raw, bool):
        raise OptionError(f"{what}: {raw!r} is not a number")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: {raw!r} is not a number") from None


def _duration(raw: Any, what: str) -> float:
    if isinstance(raw, str | int | float):
        return parse_duration(raw, what)
    raise OptionError(f"{what}: {raw!r} is not a duration like 1s, 500ms or 1m30s")


def _strings(raw: Any, what: str) -> tuple[str, ...]:
    """A flag's comma-separated values (repeated flags add up), or a YAML list of strings."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list | tuple) or not all(isinstance(r, str) for r in raw):
        raise OptionError(f"{what}: {raw!r} is not a list of strings")
    return tuple(part.strip() for text in raw for part in text.split(",") if part.strip())


def _gates(raw: Any, what: str) -> dict[str, bool]:
    """``A=true,B=false`` (repeated flags add up), or a YAML map of names to booleans."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return {str(k): _bool(v, f"{what}.{k}") for k, v in raw.items()}
    gates: dict[str, bool] = {}
    for part in _strings(raw, what):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise OptionError(f"{what}: {part!r} is not NAME=true or NAME=false")
        gates[name.strip()] = _bool(value.strip(), f"{what} {name.strip()}")
    return gates


def _ip(raw: Any, what: str) -> str:
    text = _string(raw, what).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise OptionError(f"{what}: {text!r} is not an IP address") from None


def _host_port(raw: Any, what: str) -> str:
    """``IP:port``, ``[IPv6]:port``, a bare IP (kube-proxy adds the default port) or empty
    (the server is off)."""
    text = _string(raw, what).strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.ip_address(text)
        return text  # a bare IP (also an IPv6 one, which holds colons)
    except ValueError:
        pass
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise OptionError(f"{what}: {text!r} must be IP:port") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise OptionError(f"{what}: {text!r} must be IP:port, with a port in 1..65535")
    return text


@dataclass(frozen=True)
class Kind:
    """A value type: its name in the docs, how a flag's text or YAML value becomes a value,
    and how a value is shown (docs, check-config) and written back (``--write-config-to``)."""

    name: str
    parse: Callable[[Any, str], Any]
    show: Callable[[Any], str] = str
    yaml: Callable[[Any], Any] = lambda value: value
    repeated: bool = False  # a flag that may be given more than once (values add up)


STRING = Kind("string", _string, show=lambda v: f'"{v}"')
BOOL = Kind("bool", _bool, show=lambda v: str(v).lower())
INT = Kind("int32", _int)
FLOAT = Kind("float", _float, show=lambda v: f"{v:g}")
DURATION = Kind("duration", _duration, show=go_duration, yaml=go_duration)
STRINGS = Kind("[]string", _strings, show=lambda v: ",".join(v) if v else "[]",
               yaml=lambda v: list(v) if v else None, repeated=True)
GATES = Kind("map[string]bool", _gates,
             show=lambda v: ",".join(f"{k}={str(b).lower()}" for k, b in v.items()) or "{}",
             yaml=dict, repeated=True)
IP = Kind("IP", _ip)
HOST_PORT = Kind("IP:port", _host_port, show=lambda v: f'"{v}"')


# --- the table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One kube-proxy flag and/or KubeProxyConfiguration field.

    ``key``: the :class:`~iptsync.options.ProxyConfig` attribute an applied option sets;
    None for an ignored one. ``note``: what it does in iptsync (applied) or why it is ignored.
    ``default``: kube-proxy's, as a parsed value; a file value of None (or, with
    ``zero_is_default``, a zero one: kube-proxy's defaulting replaces those) means it.
    ``with_config``: the flag still counts when ``--config`` is given (kube-proxy ignores
    every other flag then). ``refuse``: the reason a parsed value is refused, or None.
    """

    flag: str | None
    field: str | None
    kind: Kind
    default: Any
    key: str | None
    note: str
    aliases: tuple[str, ...] = ()
    zero_is_default: bool = False
    with_config: bool = False
    refuse: Callable[[Any], str | None] | None = None

    @property
    def applied(self) -> bool:
        return self.key is not None

    @property
    def name(self) -> str:
        """The flag (``--cluster-cidr``), or the field for file-only options."""
        return f"--{self.flag}" if self.flag else str(self.field)


def _refuse_mode(mode: str) -> str | None:
    if mode in ("", "iptables"):
        return None
    # Refused rather than warned about: a node meant to run IPVS or nftables that silently
    # got iptables rules instead is the harder failure to find.
    return (f"{mode!r} is not supported; iptsync implements kube-proxy's iptables mode only "
            "(set iptables, or leave it empty)")


def _refuse_local_mode(mode: str) -> str | None:
    modes = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
    if mode in ("", *modes):
        return None
    return f"{mode!r} is not supported: must be one of {', '.join(modes)} (or empty)"


def _refuse_format(fmt: str) -> str | None:
    return None if fmt in ("text", "json") else f"{fmt!r} is not supported: text or json"


def _refuse_blank(name: str) -> str | None:
    return "must not be empty" if not name.strip() else None


def _refuse_negative(value: float) -> str | None:
    return "must be greater than or equal to 0" if value < 0 else None


def _refuse_bit(bit: int) -> str | None:
    return None if 0 <= bit <= 31 else f"{bit} must be within the range [0, 31]"


def _refuse_oom(value: int) -> str | None:
    return None if -1000 <= value <= 1000 else f"{value} must be within the range [-1000, 1000]"


def _refuse_positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


IPVS = "only used in ipvs mode, which iptsync does not implement"
NFT = "only used in nftables mode, which iptsync does not implement"
WINDOWS = "Windows (kernelspace mode) only"
GO_LOG = "a setting of Go's logging library; iptsync writes each line at once"


def _ipvs(flag: str | None, field: str, kind: Kind, default: Any) -> Option:
    return Option(flag, f"ipvs.{field}", kind, default, None, IPVS, zero_is_default=True)


OPTIONS: tuple[Option, ...] = (
    # How kube-proxy is started.
    Option("config", None, STRING, "", "config_file",
           "reads this KubeProxyConfiguration file; other flags are then ignored, as by "
           "kube-proxy (but --hostname-override, --master and the logging flags). A change "
           "to the file is read at the next start (kube-proxy exits on one)",
           with_config=True),
    Option("write-config-to", None, STRING, "", "write_config_to",
           "writes the configuration in effect (defaults, file, flags) to this file as a "
           "KubeProxyConfiguration and exits", with_config=True),
    Option("cleanup", None, BOOL, False, "cleanup",
           "removes every chain and jump rule kube-proxy (iptables mode) or iptsync owns, and "
           "exits (as `iptsync cleanup`)", with_config=True),
    Option("init-only", None, BOOL, False, "init_only",
           "sets the sysctls that need privileges (route_localnet, conntrack) and exits",
           with_config=True),
    Option("proxy-mode", "mode", STRING, "", "mode",
           "iptables, or empty (kube-proxy's default on Linux, iptables); any other mode is "
           "refused", refuse=_refuse_mode),
    Option("feature-gates", "featureGates", GATES, {}, None,
           "iptsync has no feature gates: it behaves as kube-proxy 1.34 with its default gates"),
    # The API server.
    Option("kubeconfig", "clientConnection.kubeconfig", STRING, "", "kubeconfig",
           "the kubeconfig of the API server connection; empty: the pod's service account"),
    Option("master", None, STRING, "", "master",
           "the API server's address, instead of the kubeconfig's", with_config=True),
    Option(None, "clientConnection.acceptContentTypes", STRING, "", None,
           "iptsync's client asks for JSON, the one type it reads"),
    Option("kube-api-content-type", "clientConnection.contentType", STRING,
           "application/vnd.kubernetes.protobuf", None,
           "iptsync's client sends and reads JSON only (the Python client has no protobuf)",
           zero_is_default=True),
    Option("kube-api-qps", "clientConnection.qps", FLOAT, 5.0, None,
           "iptsync's client does not rate-limit: it sends one list and one watch per kind "
           "(Services, EndpointSlices, its Node) and relists only on 410 Gone",
           zero_is_default=True),
    Option("kube-api-burst", "clientConnection.burst", INT, 10, None,
           "iptsync's client does not rate-limit (see qps)", zero_is_default=True,
           refuse=_refuse_negative),
    Option("config-sync-period", "configSyncPeriod", DURATION, 900.0, None,
           "iptsync's watches have no periodic resync: a watch that ends is resumed, a 410 "
           "relists", zero_is_default=True, refuse=_refuse_positive),
    # The node.
    Option("hostname-override", "hostnameOverride", STRING, "", "hostname_override",
           "this node's name (lower-cased; default: the host name); the flag wins over the "
           "file, as in kube-proxy", zero_is_default=True, with_config=True,
           refuse=_refuse_blank),
    Option("bind-address", "bindAddress", IP, "0.0.0.0", "bind_address",
           "unless 0.0.0.0 or ::, the node's primary IP of its family (instead of the Node "
           "object's); its family picks the default health and metrics addresses",
           zero_is_default=True),
    Option("healthz-bind-address", "healthzBindAddress", HOST_PORT, "0.0.0.0:10256",
           "healthz_bind_address", "/healthz and /livez; a bare IP gets port 10256; empty "
           "(flag): off", zero_is_default=True),
    Option("metrics-bind-address", "metricsBindAddress", HOST_PORT, "127.0.0.1:10249",
           "metrics_bind_address", "/metrics; a bare IP gets port 10249; empty (flag): off",
           zero_is_default=True),
    Option("healthz-port", None, INT, 10256, "healthz_port",
           "deprecated: 0 turns /healthz off, another port completes a bare "
           "--healthz-bind-address IP"),
    Option("metrics-port", None, INT, 10249, "metrics_port",
           "deprecated: 0 turns /metrics off, another port completes a bare "
           "--metrics-bind-address IP"),
    Option("bind-address-hard-fail", "bindAddressHardFail", BOOL, False,
           "bind_address_hard_fail",
           "exits when the health or metrics address cannot be bound (default: retry)"),
    Option("profiling", "enableProfiling", BOOL, False, None,
           "Go's pprof handlers; iptsync is a Python program and serves none"),
    Option("show-hidden-metrics-for-version", "showHiddenMetricsForVersion", STRING, "", None,
           "iptsync has no hidden (deprecated) metrics to show"),
    Option("oom-score-adj", "oomScoreAdj", INT, -999, None,
           "iptsync leaves its OOM score to the pod (its priority class and requests)",
           refuse=_refuse_oom),
    # Rules.
    Option("cluster-cidr", "clusterCIDR", STRING, "", "cluster_cidr",
           "the pods' CIDR (one per IP family, comma-separated): traffic from outside it is "
           "masqueraded (detect-local-mode ClusterCIDR)"),
    Option("detect-local-mode", "detectLocalMode", STRING, "", "detect_local_mode",
           "how traffic from local pods is told apart: ClusterCIDR (default), NodeCIDR, "
           "BridgeInterface, InterfaceNamePrefix", refuse=_refuse_local_mode),
    Option("pod-bridge-interface", "detectLocal.bridgeInterface", STRING, "",
           "bridge_interface", "the pods' bridge, for detect-local-mode BridgeInterface"),
    Option("pod-interface-name-prefix", "detectLocal.interfaceNamePrefix", STRING, "",
           "interface_name_prefix",
           "the pods' interface name prefix, for detect-local-mode InterfaceNamePrefix"),
    Option("nodeport-addresses", "nodePortAddresses", STRINGS, (), "nodeport_addresses",
           "NodePorts only on node IPs in these CIDRs (both families), or only on the node's "
           "primary IPs with `primary`; empty: every local IP"),
    Option("masquerade-all", "iptables.masqueradeAll", BOOL, False, "masquerade_all",
           "masquerades all traffic to cluster IPs"),
    Option("iptables-masquerade-bit", "iptables.masqueradeBit", INT, 14, "masquerade_bit",
           "the fwmark bit of KUBE-MARK-MASQ (14: 0x4000)", refuse=_refuse_bit),
    Option("iptables-localhost-nodeports", "iptables.localhostNodePorts", BOOL, True,
           "localhost_nodeports", "NodePorts on 127.0.0.1 (IPv4; sets route_localnet); "
           "iptsync's older --no-iptables-localhost-nodeports is =false"),
    Option("iptables-sync-period", "iptables.syncPeriod", DURATION, 30.0, "sync_period",
           "/healthz turns 503 when a change waited twice this; without a change watch, "
           "also the time between full syncs", aliases=("sync-period",),
           zero_is_default=True, refuse=_refuse_positive),
    Option("iptables-min-sync-period", "iptables.minSyncPeriod", DURATION, 1.0,
           "min_sync_period", "least time between two syncs; 0: every change at once",
           aliases=("min-sync-period",), zero_is_default=True, refuse=_refuse_negative),
    # conntrack (applied in the node's network namespace, as kube-proxy does).
    Option("conntrack-max-per-core", "conntrack.maxPerCore", INT, 32768,
           "conntrack_max_per_core",
           "nf_conntrack_max = this x CPUs (at least conntrack-min); 0: leave it",
           refuse=_refuse_negative),
    Option("conntrack-min", "conntrack.min", INT, 131072, "conntrack_min",
           "the least nf_conntrack_max set from conntrack-max-per-core",
           refuse=_refuse_negative),
    Option("conntrack-tcp-timeout-established", "conntrack.tcpEstablishedTimeout", DURATION,
           86400.0, "conntrack_tcp_established_timeout",
           "nf_conntrack_tcp_timeout_established; 0: leave it", refuse=_refuse_negative),
    Option("conntrack-tcp-timeout-close-wait", "conntrack.tcpCloseWaitTimeout", DURATION,
           3600.0, "conntrack_tcp_close_wait_timeout",
           "nf_conntrack_tcp_timeout_close_wait; 0: leave it", refuse=_refuse_negative),
    Option("conntrack-tcp-be-liberal", "conntrack.tcpBeLiberal", BOOL, False,
           "conntrack_tcp_be_liberal",
           "sets nf_conntrack_tcp_be_liberal=1 (and no INVALID drop rule is written)"),
    Option("conntrack-udp-timeout", "conntrack.udpTimeout", DURATION, 0.0,
           "conntrack_udp_timeout", "nf_conntrack_udp_timeout; 0: leave it",
           refuse=_refuse_negative),
    Option("conntrack-udp-timeout-stream", "conntrack.udpStreamTimeout", DURATION, 0.0,
           "conntrack_udp_stream_timeout", "nf_conntrack_udp_timeout_stream; 0: leave it",
           refuse=_refuse_negative),
    # Logging (these flags count even with --config, as in kube-proxy).
    Option("v", "logging.verbosity", INT, 0, "verbosity",
           "0-3: iptsync's info lines; 4-5: its debug lines; 6 and more: the libraries' too",
           with_config=True, refuse=_refuse_negative),
    Option("logging-format", "logging.format", STRING, "text", "logging_format",
           "text, or json (one JSON object per line, as --log-format json)",
           zero_is_default=True, with_config=True, refuse=_refuse_format),
    Option("vmodule", "logging.vmodule", STRINGS, (), None,
           "per-Go-file log levels; iptsync's levels are set with --v", with_config=True),
    Option("log-flush-frequency", "logging.flushFrequency", DURATION, 5.0, None, GO_LOG,
           zero_is_default=True, with_config=True),
    Option("log-json-info-buffer-size", "logging.options.json.infoBufferSize", STRING, "0",
           None, GO_LOG, with_config=True),
    Option("log-json-split-stream", "logging.options.json.splitStream", BOOL, False, None,
           GO_LOG, with_config=True),
    Option("log-text-info-buffer-size", "logging.options.text.infoBufferSize", STRING, "0",
           None, GO_LOG, with_config=True),
    Option("log-text-split-stream", "logging.options.text.splitStream", BOOL, False, None,
           GO_LOG, with_config=True),
    # Other modes.
    _ipvs("ipvs-sync-period", "syncPeriod", DURATION, 30.0),
    _ipvs("ipvs-min-sync-period", "minSyncPeriod", DURATION, 0.0),
    _ipvs("ipvs-scheduler", "scheduler", STRING, ""),
    _ipvs("ipvs-exclude-cidrs", "excludeCIDRs", STRINGS, ()),
    _ipvs("ipvs-strict-arp", "strictARP", BOOL, False),
    _ipvs("ipvs-tcp-timeout", "tcpTimeout", DURATION, 0.0),
    _ipvs("ipvs-tcpfin-timeout", "tcpFinTimeout", DURATION, 0.0),
    _ipvs("ipvs-udp-timeout", "udpTimeout", DURATION, 0.0),
    Option(None, "nftables.masqueradeBit", INT, 14, None, NFT),
    Option(None, "nftables.masqueradeAll", BOOL, False, None, NFT),
    Option(None, "nftables.syncPeriod", DURATION, 30.0, None, NFT, zero_is_default=True),
    Option(None, "nftables.minSyncPeriod", DURATION, 1.0, None, NFT, zero_is_default=True),
    Option(None, "winkernel.networkName", STRING, "", None, WINDOWS),
    Option(None, "winkernel.sourceVip", STRING, "", None, WINDOWS),
    Option(None, "winkernel.enableDSR", BOOL, False, None, WINDOWS),
    Option(None, "winkernel.rootHnsEndpointName", STRING, "", None, WINDOWS),
    Option(None, "winkernel.forwardHealthCheckVip", BOOL, False, None, WINDOWS),
    Option(None, "windowsRunAsService", BOOL, False, None, WINDOWS),
    Option(None, "portRange", STRING, "", None,
           "a setting of the userspace mode, removed from kube-proxy; unused"),
)

# The top-level keys of a KubeProxyConfiguration that are not options.
TYPE_FIELDS = ("apiVersion", "kind")
API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
BY_FLAG: dict[str, Option] = {name: option for option in OPTIONS if option.flag
                              for name in (option.flag, *option.aliases)}
BY_FIELD: dict[str, Option] = {option.field: option for option in OPTIONS if option.field}
# Sections of the file: a field under one of these that is not in the table is unknown.
SECTIONS = frozenset(field.rsplit(".", 1)[0] for field in BY_FIELD if "." in field) | {
    "logging.options"}


# iptsync's older spelling of a kube-proxy flag's false value.
_NEGATED = {"--no-iptables-localhost-nodeports": "--iptables-localhost-nodeports=false"}


def normalize_args(args: list[str]) -> list[str]:
    """kube-proxy's ``-v=2``, ``-v 2`` and ``-v2`` as ``--v=2`` (a bare ``-v`` or ``-vv`` is
    iptsync's own verbosity count), and iptsync's negated flag as kube-proxy spells it."""
    result: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            return result + args[index:]
        if arg.startswith("-v=") or (arg.startswith("-v") and arg[2:].isdigit()):
            result.append(f"--v={arg[2:].lstrip('=')}")
        elif arg == "-v" and index + 1 < len(args) and args[index + 1].isdigit():
            index += 1
            result.append(f"--v={args[index]}")
        else:
            result.append(_NEGATED.get(arg, arg))
        index += 1
    return result


def split_args(args: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """kube-proxy's flags in ``args`` as pflag reads them (``--name=value``, ``--name value``,
    a boolean without a value is true; a repeated one adds up), and what is not one."""
    flags: list[tuple[str, Any]] = []
    others: list[str] = []
    args = normalize_args(args)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        name, eq, value = arg[2:].partition("=")
        option = BY_FLAG.get(name) if arg.startswith("--") else None
        if option is None:
            others.append(arg)
            continue
        if not eq and option.kind is BOOL:
            value = "true"
        elif not eq:
            if index == len(args):
                others.append(arg)  # a flag that needs a value and has none
                continue
            value, index = args[index], index + 1
        flags.append((name, [value] if option.kind.repeated else value))
    return flags, others


def markdown_table() -> str:
    """The table of docs/comparison.md: every flag and field, with iptsync's handling."""
    lines = ["| flag | config field | type | kube-proxy's default | iptsync |",
             "|---|---|---|---|---|"]
    for option in OPTIONS:
        flags = ", ".join(f"`--{name}`" for name in (option.flag, *option.aliases) if name)
        field = f"`{option.field}`" if option.field else ""
        handling = "**applied**" if option.applied else "ignored"
        lines.append(f"| {flags} | {field} | {option.kind.name} | "
                     f"`{option.kind.show(option.default)}` | {handling}: {option.note} |")
    return "\n".join(lines) + "\n"
