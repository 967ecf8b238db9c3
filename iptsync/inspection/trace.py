"""Trace one new connection through a node's filter and nat rules, the way the kernel would.

Why: "why can't I reach my service?" is answered by the rules, but reading a few hundred
``KUBE-*`` rules by hand is slow and error-prone. This module walks a packet (source,
destination ``ip:port``, protocol, conntrack state NEW) through the netfilter hooks it would
cross on the node and reports every possible outcome with its probability: which endpoint
it is DNATed to, whether it is masqueraded, or where it is dropped or rejected, each with the
exact path of rules that decided it.

Both IP families work the same way: a packet is IPv4 or IPv6 (its destination says which,
and its source must agree), and is traced through that family's rules (``iptables`` or
``ip6tables``); addresses with ports print as kube-proxy writes them, ``[ip]:port`` for IPv6.

Both rule sources work and give the same structure (:class:`Tables`): the rendered rules of
:mod:`iptsync.engine.desired` (:func:`from_desired`) and the live rules read by
:meth:`iptsync.kernel.netfilter.Netfilter.save` (:func:`from_saved`). Each canonical rule is parsed
once (:func:`parse_rule`). The walk follows the kernel: rules in order, jumps and gotos,
RETURN, a user chain's end returns, a built-in chain's end applies its policy; the nat table
is consulted because the packet starts a connection, and a nat target ends that hook's nat
traversal. ``-m statistic --mode random`` forks the walk, so outcomes form a distribution
whose probabilities add up to 1. What is not modelled (interfaces, unknown matches or
targets) is assumed to match or to fall through, and is reported as a warning.

Hooks crossed, by where the packet enters:

* ``pod`` and ``external``: nat PREROUTING, routing, then filter INPUT and nat INPUT (to a
  node address, 127/8 or ::1) or filter FORWARD and nat POSTROUTING (anything else);
* ``node`` (locally generated): nat OUTPUT, filter OUTPUT, nat POSTROUTING, and filter INPUT
  when the destination is local.

Pure: no I/O; the command line reads the rules and the node's addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from iptsync.core.model import IPFamily, host_port
from iptsync.core.plan import DesiredTables
from iptsync.core.policy import ORIGINS, Origin, Verdict
from iptsync.core.ruleset import (
    Option,
    SavedTable,
    join_args,
    mark_value,
    read_args,
    split_args,
)

PROTOCOLS = ("tcp", "udp", "sctp")
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
LOOPBACK = {IPFamily.IPV4: ipaddress.ip_network("127.0.0.0/8"),
            IPFamily.IPV6: ipaddress.ip_network("::1/128")}
MAX_DEPTH = 64  # the kernel refuses deeper jump chains (and loops) when the rules are loaded

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_PROTOCOL_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp", "1": "icmp"}
# Targets that only log or annotate: the walk goes on, nothing to warn about.
_QUIET_TARGETS = frozenset({"LOG", "NFLOG", "ULOG", "TRACE", "AUDIT"})


class TraceError(ValueError):
    """A packet description that cannot be traced (bad address, port or protocol)."""


# --- the rules, parsed once ------------------------------------------------------------------

@dataclass(frozen=True)
class Match:
    """One ``-m NAME`` and its options (an option without ``-m`` gets the protocol's match)."""

    name: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class TraceRule:
    """A canonical rule, read once: what it matches and what it does."""

    text: str
    source: tuple[bool, Network] | None = None
    destination: tuple[bool, Network] | None = None
    protocol: tuple[bool, str] | None = None
    fragment: bool | None = None  # None: no -f; True: -f; False: ! -f
    interfaces: tuple[str, ...] = ()  # "-i eth0", "! -o lo": not modelled
    matches: tuple[Match, ...] = ()
    target: str | None = None
    goto: bool = False
    target_options: tuple[Option, ...] = ()
    unreadable: tuple[str, ...] = ()  # tokens the parser did not understand

    @property
    def comment(self) -> str | None:
        for match in self.matches:
            if match.name == "comment":
                for _, name, values in match.options:
                    if name == "--comment" and values:
                        return values[0]
        return None

    @property
    def text_without_comment(self) -> str:
        """The rule as iptables-save prints it, minus ``-m comment --comment ...``."""
        tokens = split_args(self.text)
        out: list[str] = []
        i = 0
        while i < len(tokens):
            if tokens[i] == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "comment":
                i += 2
                while i < len(tokens) and tokens[i] in ("--comment", "!"):
                    i += 2 if tokens[i] == "--comment" else 1
                continue
            out.append(tokens[i])
            i += 1
        return join_args(out)


def parse_rule(text: str) -> TraceRule:
    """Read one rule (iptables-save spelling, without ``-A CHAIN``); never raises."""
    args = read_args(split_args(text))
    unreadable = list(args.unreadable)
    addresses: dict[str, tuple[bool, Network]] = {}
    for opt in ("-s", "-d"):
        if opt in args.basics:
            negated, value = args.basics[opt]
            try:
                addresses[opt] = (negated, ipaddress.ip_network(value, strict=False))
            except ValueError:
                unreadable.append(f"{opt} {value}")
    protocol = None
    if "-p" in args.basics:
        negated, value = args.basics["-p"]
        protocol = (negated, _PROTOCOL_NUMBERS.get(value, value.lower()))
    fragment = not args.basics["-f"][0] if "-f" in args.basics else None
    interfaces = tuple(("! " if args.basics[opt][0] else "") + f"{opt} {args.basics[opt][1]}"
                       for opt in ("-i", "-o") if opt in args.basics)
    target, goto = (args.target[1], args.target[0] == "-g") if args.target else (None, False)
    return TraceRule(
        text=text, source=addresses.get("-s"), destination=addresses.get("-d"),
        protocol=protocol, fragment=fragment, interfaces=interfaces,
        matches=tuple(Match(name, tuple(options)) for name, options in args.matches),
        target=target, goto=goto, target_options=tuple(args.target_opts),
        unreadable=tuple(unreadable))


@dataclass(frozen=True)
class Tables:
    """What the tracer walks: table -> chain -> parsed rules, and built-in chain policies."""

    chains: Mapping[str, Mapping[str, tuple[TraceRule, ...]]]
    policies: Mapping[tuple[str, str], str] = field(default_factory=dict)

    def rules(self, table: str, chain: str) -> tuple[TraceRule, ...]:
        return self.chains.get(table, {}).get(chain, ())

    def has_chain(self, table: str, chain: str) -> bool:
        return chain in self.chains.get(table, {})


def from_desired(desired: DesiredTables) -> Tables:
    """The rendered rules; the jumps go at the top of the built-in chains, in listed order."""
    chains: dict[str, dict[str, tuple[TraceRule, ...]]] = {}
    for table, table_chains in desired.tables.items():
        chains[table] = {name: tuple(map(parse_rule, content.canonical_rules()))
                         for name, content in table_chains.items()}
    for table, builtins in BUILTIN_CHAINS.items():
        for chain in builtins:
            jumps = tuple(parse_rule(jump.rule.canonical) for jump in desired.jumps
                          if jump.table == table and jump.chain == chain)
            existing = chains.setdefault(table, {}).get(chain, ())
            chains[table][chain] = jumps + existing
    return Tables(chains)


def from_saved(tables: Mapping[str, SavedTable]) -> Tables:
    """The live rules, as :meth:`iptsync.kernel.netfilter.Netfilter.save` read them."""
    chains = {name: {chain: tuple(parse_rule(rule) for rule in rules)
                     for chain, rules in saved.chains.items()}
              for name, saved in tables.items()}
    policies = {(name, chain): policy for name, saved in tables.items()
                for chain, policy in saved.policies.items()}
    return Tables(chains, policies)


# --- the packet and the result ---------------------------------------------------------------

@dataclass(frozen=True)
class Packet:
    """The first packet of a connection: addresses, ports, protocol."""

    src: Address
    dst: Address
    dport: int
    proto: str = "tcp"
    sport: int | None = None  # unknown: rules testing --sport are assumed to match

    @property
    def family(self) -> IPFamily:
        """The packet's IP family: whose rules (iptables or ip6tables) it crosses."""
        return IPFamily.of(self.dst)

    def __str__(self) -> str:
        src = str(self.src) if self.sport is None else host_port(self.src, self.sport)
        return f"{self.proto} {src} -> {host_port(self.dst, self.dport)}"


def make_packet(src: str, dst: str, proto: str = "tcp", sport: int | None = None) -> Packet:
    """A packet from ``--src IP --dst IP:PORT --proto P`` text (``--dst [IPv6]:PORT``, as
    kube-proxy writes endpoints); :class:`TraceError` naming the flag if bad."""
    host, port_text = _host_and_port(dst)
    try:
        source = ipaddress.ip_address(src)
    except ValueError:
        raise TraceError(f"--src {src!r} is not an IP address") from None
    try:
        destination = ipaddress.ip_address(host)
    except ValueError:
        raise TraceError(f"--dst {dst!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise TraceError(f"--dst {dst!r}: {port_text!r} is not a port (1-65535)")
    if proto.lower() not in PROTOCOLS:
        raise TraceError(f"--proto {proto!r}: expected one of {', '.join(PROTOCOLS)}")
    if source.version != destination.version:
        # A connection never changes family: the node's iptables and ip6tables rules are
        # separate, and no rule translates one family into the other.
        raise TraceError(
            f"--src {src} is an {IPFamily.of(source).value} address but --dst {dst} is "
            f"{IPFamily.of(destination).value}: a connection stays in one IP family; give "
            f"both of the same family (a dual-stack Service has an address of each)")
    return Packet(source, destination, int(port_text), proto.lower(), sport)


def _host_and_port(dst: str) -> tuple[str, str]:
    """``IP:PORT`` or ``[IP]:PORT`` -> (IP, PORT) text; an IPv6 address needs the brackets,
    or its last group could not be told from the port."""
    if dst.startswith("["):
        host, closed, rest = dst[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise TraceError(f"--dst {dst!r}: expected [IPv6]:PORT, e.g. [fd00::1]:80")
        return host, rest[1:]
    host, sep, port_text = dst.rpartition(":")
    if ":" in host:
        raise TraceError(f"--dst {dst!r}: an IPv6 destination needs brackets and a port, "
                         f"as in [fd00::1]:80")
    if not sep:
        raise TraceError(f"--dst {dst!r}: expected IP:PORT (or [IPv6]:PORT)")
    return host, port_text


def default_origin(src: Address, cluster_cidrs: Iterable[Network],
                   node_ips: Iterable[Address] = ()) -> Origin:
    """``node`` for one of the node's addresses or a loopback one (only the node itself sends
    from 127/8 or ::1), ``pod`` inside the cluster CIDR, else ``external``."""
    if src.is_loopback or src in set(node_ips):
        return "node"
    return "pod" if any(src in cidr for cidr in cluster_cidrs) else "external"


@dataclass(frozen=True)
class Step:
    """One rule the packet matched (or a chain policy, or the routing decision)."""

    table: str  # filter, nat, or "routing"
    chain: str
    index: int | None  # 1-based rule number in the chain; None for a policy or routing
    rule: str  # the canonical rule, "-P CHAIN POLICY", or the routing decision
    comment: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One way the connection can end, with its probability and the rules that decided it."""

    verdict: Verdict
    endpoint: str | None  # "ip:port" ("[ip]:port" for IPv6) after DNAT
    probability: float
    masquerade: bool  # the source address is rewritten (MASQUERADE or SNAT)
    path: tuple[Step, ...]


@dataclass(frozen=True)
class TraceResult:
    """Every outcome of one traced packet (probabilities add up to 1) and the caveats."""

    packet: Packet
    origin: Origin
    node_ips: tuple[Address, ...]
    outcomes: tuple[Outcome, ...]
    warnings: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        """The verdict all outcomes agree on, or ``MIXED``."""
        verdicts = {o.verdict for o in self.outcomes}
        return verdicts.pop() if len(verdicts) == 1 else "MIXED"

    @property
    def endpoints(self) -> dict[str, float]:
        """DNAT destination ``ip:port`` (``[ip]:port`` for IPv6) -> summed probability."""
        out: dict[str, float] = {}
        for outcome in self.outcomes:
            if outcome.endpoint is not None:
                out[outcome.endpoint] = out.get(outcome.endpoint, 0.0) + outcome.probability
        return out

    @property
    def delivered(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.verdict in ("DNAT", "ACCEPT"))

    @property
    def masquerade(self) -> bool | None:
        """True if every delivered outcome is masqueraded, False if none is, None if some."""
        flags = {o.masquerade for o in self.delivered}
        if flags == {True}:
            return True
        return None if len(flags) == 2 else False

    @property
    def masquerade_probability(self) -> float:
        return sum(o.probability for o in self.delivered if o.masquerade)

    @property
    def most_likely(self) -> Outcome:
        """The outcome with the highest probability (the first one on a tie)."""
        return max(self.outcomes, key=lambda o: o.probability)


# --- the walk --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Flow:
    """The packet as the walk has changed it so far, on one branch."""

    src: Address
    dst: Address
    dport: int
    sport: int | None
    proto: str
    probability: float = 1.0
    mark: int = 0
    dnat: bool = False
    masquerade: bool = False
    path: tuple[Step, ...] = ()

    def step(self, step: Step) -> _Flow:
        return replace(self, path=(*self.path, step))


@dataclass(frozen=True)
class _Fork:
    """A match that holds with probability ``p`` (``-m statistic --mode random``)."""

    p: float


@dataclass(frozen=True)
class _Unknown:
    """A match the tracer does not model; assumed to hold."""

    what: str


_Result = bool | _Fork | _Unknown
# What a chain walk ends with: RETURN (fell off or -j RETURN), NAT (a nat target ended this
# hook's nat traversal), or a verdict.
_End = Literal["RETURN", "NAT", "ACCEPT", "DROP", "REJECT"]


@dataclass
class _Context:
    tables: Tables
    local: tuple[Address, ...]
    hook: str = ""
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def is_local(self, ip: Address) -> bool:
        return ip in self.local or ip in LOOPBACK[IPFamily.of(ip)]


def trace(tables: Tables, packet: Packet, *, origin: str,
          node_ips: Sequence[Address]) -> TraceResult:
    """Walk ``packet`` (a NEW connection entering at ``origin``) through ``tables``."""
    entry = _as_origin(origin)
    ctx = _Context(tables, tuple(node_ips))
    start = _Flow(packet.src, packet.dst, packet.dport, packet.sport, packet.proto)
    outcomes: list[Outcome] = []
    if entry == "node":
        before = [("nat", "OUTPUT"), ("filter", "OUTPUT")]
    else:
        before = [("nat", "PREROUTING")]
    for flow, verdict in _hooks(ctx, [start], before):
        if verdict != "ACCEPT":
            outcomes.append(_outcome(flow, verdict))
            continue
        route, after = _route(ctx, entry, flow)
        for final, end in _hooks(ctx, [flow.step(route)], after):
            outcomes.append(_outcome(final, end))
    return TraceResult(packet, entry, tuple(node_ips), tuple(outcomes), tuple(ctx.warnings))


def _as_origin(text: str) -> Origin:
    for origin in ORIGINS:
        if origin == text:
            return origin
    raise TraceError(f"origin {text!r}: expected one of {', '.join(ORIGINS)}")


def _route(ctx: _Context, origin: Origin,
           flow: _Flow) -> tuple[Step, list[tuple[str, str]]]:
    """The routing decision after nat PREROUTING/OUTPUT, and the hooks crossed after it."""
    local = ctx.is_local(flow.dst)
    if origin == "node":
        # A local destination still leaves through POSTROUTING (on lo), then comes in again:
        # nat is not consulted a second time for the same connection, filter INPUT is.
        if local:
            return (Step("routing", "OUTPUT", None, "local destination: delivered via lo"),
                    [("nat", "POSTROUTING"), ("filter", "INPUT")])
        return (Step("routing", "OUTPUT", None, "not a local destination: sent out"),
                [("nat", "POSTROUTING")])
    if local:
        return (Step("routing", "INPUT", None, "local destination: delivered on the node"),
                [("filter", "INPUT"), ("nat", "INPUT")])
    return (Step("routing", "FORWARD", None, "not a local destination: forwarded"),
            [("filter", "FORWARD"), ("nat", "POSTROUTING")])


def _outcome(flow: _Flow, verdict: str) -> Outcome:
    if verdict in ("DROP", "REJECT"):
        final: Verdict = "DROP" if verdict == "DROP" else "REJECT"
        return Outcome(final, None, flow.probability, flow.masquerade, flow.path)
    endpoint = host_port(flow.dst, flow.dport) if flow.dnat else None
    return Outcome("DNAT" if flow.dnat else "ACCEPT", endpoint, flow.probability,
                   flow.masquerade, flow.path)


def _hooks(ctx: _Context, flows: list[_Flow],
           hooks: Sequence[tuple[str, str]]) -> list[tuple[_Flow, str]]:
    """Run flows through hooks in order; a flow stops at its first DROP or REJECT."""
    done: list[tuple[_Flow, str]] = []
    for table, chain in hooks:
        going: list[_Flow] = []
        for flow in flows:
            for after, verdict in _hook(ctx, table, chain, flow):
                if verdict == "ACCEPT":
                    going.append(after)
                else:
                    done.append((after, verdict))
        flows = going
    return done + [(flow, "ACCEPT") for flow in flows]


def _hook(ctx: _Context, table: str, chain: str, flow: _Flow) -> list[tuple[_Flow, str]]:
    """One built-in chain: its rules, then its policy for what falls off the end."""
    ctx.hook = chain
    out: list[tuple[_Flow, str]] = []
    for after, end in _walk(ctx, table, chain, 0, flow, depth=0):
        if end == "RETURN":
            policy = ctx.tables.policies.get((table, chain), "ACCEPT")
            shown = after
            if table != "nat":  # nat's policy is always ACCEPT: no translation, nothing to show
                shown = after.step(Step(table, chain, None, f"-P {chain} {policy}", "policy"))
            out.append((shown, "DROP" if policy == "DROP" else "ACCEPT"))
        else:
            out.append((after, "ACCEPT" if end == "NAT" else end))
    return out


def _walk(ctx: _Context, table: str, chain: str, start: int, flow: _Flow, *,
          depth: int) -> list[tuple[_Flow, _End]]:
    """Rules of ``chain`` from ``start`` on; returns every branch with how it ended.

    A branch that goes on after a rule stays in this loop; only a fork (a random match, or
    a jump that came back on several branches) recurses, once per branch.
    """
    rules = ctx.tables.rules(table, chain)
    out: list[tuple[_Flow, _End]] = []
    index = start
    while index < len(rules):
        rule = rules[index]
        chances = _evaluate(ctx, f"{table} {chain} rule {index + 1}", rule, flow)
        index += 1
        if not chances:
            continue
        going: list[_Flow] = []
        for matched, p in chances:
            branch = replace(flow, probability=flow.probability * p)
            if not matched:
                going.append(branch)
                continue
            step = Step(table, chain, index, rule.text, rule.comment)
            for after, end in _target(ctx, table, rule, branch.step(step), depth):
                if end == "CONTINUE":
                    going.append(after)
                else:
                    out.append((after, end))
        if len(going) != 1:
            for branch in going:
                out += _walk(ctx, table, chain, index, branch, depth=depth)
            return out
        flow = going[0]
    return [*out, (flow, "RETURN")]


def _target(ctx: _Context, table: str, rule: TraceRule, flow: _Flow,
            depth: int) -> list[tuple[_Flow, _End | Literal["CONTINUE"]]]:
    target = rule.target
    if target is None or target in _QUIET_TARGETS:
        return [(flow, "CONTINUE")]
    if target == "ACCEPT":
        return [(flow, "ACCEPT")]
    if target == "DROP":
        return [(flow, "DROP")]
    if target == "REJECT":
        return [(flow, "REJECT")]
    if target == "RETURN":
        return [(flow, "RETURN")]
    if target == "MARK":
        return [(replace(flow, mark=_set_mark(ctx, rule, flow.mark)), "CONTINUE")]
    if target in ("DNAT", "REDIRECT"):
        return [(_dnat(ctx, rule, flow), "NAT")]
    if target in ("MASQUERADE", "SNAT"):
        return [(replace(flow, masquerade=True), "NAT")]
    if not ctx.tables.has_chain(table, target):
        ctx.warn(f"{table}: target {target} is not modelled; the walk goes on after it "
                 f"({rule.text})")
        return [(flow, "CONTINUE")]
    if depth >= MAX_DEPTH:
        ctx.warn(f"{table}: jumps nested deeper than {MAX_DEPTH} at {target}; stopped there")
        return [(flow, "CONTINUE")]
    out: list[tuple[_Flow, _End | Literal["CONTINUE"]]] = []
    for after, end in _walk(ctx, table, target, 0, flow, depth=depth + 1):
        if end == "RETURN" and not rule.goto:
            out.append((after, "CONTINUE"))  # back in the calling chain, after the jump
        else:
            out.append((after, end))  # a goto's RETURN returns from the calling chain too
    return out


def _set_mark(ctx: _Context, rule: TraceRule, mark: int) -> int:
    for _, name, values in rule.target_options:
        try:
            value, mask = mark_value(values[0] if values else "0")
        except ValueError:
            ctx.warn(f"MARK {name} {values}: not a number; mark unchanged ({rule.text})")
            continue
        if name == "--set-xmark":
            mark = (mark & ~mask & 0xFFFFFFFF) ^ value
        elif name == "--set-mark":
            mark = (mark & ~mask & 0xFFFFFFFF) | value
        elif name == "--or-mark":
            mark |= value
        elif name == "--xor-mark":
            mark ^= value
        elif name == "--and-mark":
            mark &= value
    return mark


def _dnat(ctx: _Context, rule: TraceRule, flow: _Flow) -> _Flow:
    options = {name: values[0] for _, name, values in rule.target_options if values}
    if rule.target == "REDIRECT":
        # To the node itself: loopback from the node, else the first node address of the
        # packet's family (the kernel takes the receiving interface's).
        family = IPFamily.of(flow.dst)
        own = [ip for ip in ctx.local if IPFamily.of(ip) is family]
        ip: Address = own[0] if own and ctx.hook != "OUTPUT" else ipaddress.ip_address(
            "127.0.0.1" if family is IPFamily.IPV4 else "::1")
        port_text = options.get("--to-ports", str(flow.dport))
        port = int(port_text.split("-")[0]) if port_text.split("-")[0].isdigit() else flow.dport
        return replace(flow, dst=ip, dport=port, dnat=True)
    to = options.get("--to-destination", "")
    host, port_text = to, ""
    if to.startswith("["):
        host, _, port_text = to[1:].partition("]")
        port_text = port_text.lstrip(":")
    elif to.count(":") == 1:
        host, _, port_text = to.partition(":")
    if "-" in host or "-" in port_text:
        ctx.warn(f"DNAT to a range {to}: the first address and port are used ({rule.text})")
    try:
        ip = ipaddress.ip_address(host.split("-")[0])
    except ValueError:
        ctx.warn(f"DNAT --to-destination {to!r} not understood; destination kept ({rule.text})")
        return replace(flow, dnat=True)
    first_port = port_text.split("-")[0]
    port = int(first_port) if first_port.isdigit() else flow.dport
    return replace(flow, dst=ip, dport=port, dnat=True)


# --- matches ---------------------------------------------------------------------------------

def _evaluate(ctx: _Context, where: str, rule: TraceRule,
              flow: _Flow) -> list[tuple[bool, float]]:
    """(matched, probability) pairs: [] no match, one pair, or a random fork into two."""
    if not _basics(rule, flow):
        return []
    results = [_match(ctx, match, flow) for match in rule.matches]
    if any(result is False for result in results):
        return []
    unknown = [r.what for r in results if isinstance(r, _Unknown)]
    unknown += [f"interface {text}" for text in rule.interfaces]
    unknown += [f"{token!r}" for token in rule.unreadable]
    if unknown:
        ctx.warn(f"{where}: {', '.join(unknown)} not modelled, "
                 f"assumed to match: {rule.text}")
    p = 1.0
    for result in results:
        if isinstance(result, _Fork):
            p *= result.p
    if p >= 1.0:
        return [(True, 1.0)]
    if p <= 0.0:
        return []
    return [(True, p), (False, 1.0 - p)]


def _basics(rule: TraceRule, flow: _Flow) -> bool:
    if rule.protocol is not None:
        negated, proto = rule.protocol
        if (proto in ("all", "0") or proto == flow.proto) == negated:
            return False
    for spec, ip in ((rule.source, flow.src), (rule.destination, flow.dst)):
        if spec is not None:
            negated, network = spec
            if (ip.version == network.version and ip in network) == negated:
                return False
    # The first packet of a connection is never a non-first fragment.
    return rule.fragment is not True


def _match(ctx: _Context, match: Match, flow: _Flow) -> _Result:
    name = match.name
    if name == "comment":
        return True
    if name in PROTOCOLS:
        return _ports_match(match, flow) if flow.proto == name else False
    checks = {"multiport": _multiport_match, "addrtype": _addrtype_match,
              "mark": _mark_match, "statistic": _statistic_match, "recent": _recent_match,
              "conntrack": _conntrack_match, "state": _conntrack_match}
    if name in checks:
        return checks[name](ctx, match, flow)
    return _Unknown(f"-m {name}")


def _combine(results: Iterable[_Result]) -> _Result:
    """All options of one match must hold: False wins, then unknown, then a fork."""
    collected = list(results)
    if any(r is False for r in collected):
        return False
    unknown = [r for r in collected if isinstance(r, _Unknown)]
    if unknown:
        return unknown[0]
    forks = [r for r in collected if isinstance(r, _Fork)]
    return forks[0] if forks else True


def _in_ports(spec: str, port: int) -> bool:
    for part in spec.split(","):
        low, sep, high = part.partition(":")
        lo = int(low) if low else 0
        hi = (int(high) if high else 65535) if sep else lo
        if lo <= port <= hi:
            return True
    return False


def _port_option(negated: bool, name: str, values: tuple[str, ...], flow: _Flow, *,
                 source: str, destination: str, both: str = "") -> _Result:
    spec = values[0] if values else ""
    try:
        if name == destination:
            return _in_ports(spec, flow.dport) != negated
        if name in (source, both) and flow.sport is None:
            return _Unknown(f"{name} {spec} (no source port given)")
        if name == source and flow.sport is not None:
            return _in_ports(spec, flow.sport) != negated
        if name == both and flow.sport is not None:
            return (_in_ports(spec, flow.dport) or _in_ports(spec, flow.sport)) != negated
    except ValueError:
        return _Unknown(f"{name} {spec}")
    return _Unknown(name)


def _ports_match(match: Match, flow: _Flow) -> _Result:
    results: list[_Result] = []
    for negated, name, values in match.options:
        if name == "--tcp-flags" and len(values) == 2:
            # The first packet of a TCP connection carries SYN alone.
            mask, comp = (_tcp_flags(v) for v in values)
            results.append(({"SYN"} & mask == comp) != negated)
        elif name in ("--sport", "--dport", "--source-port", "--destination-port"):
            short = {"--source-port": "--sport", "--destination-port": "--dport"}.get(name, name)
            results.append(_port_option(negated, short, values, flow, source="--sport",
                                        destination="--dport"))
        else:
            results.append(_Unknown(f"-m {match.name} {name}"))
    return _combine(results)


_TCP_FLAGS = frozenset({"FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"})


def _tcp_flags(text: str) -> frozenset[str]:
    names = set(text.split(","))
    if "ALL" in names:
        return _TCP_FLAGS
    return frozenset(names - {"NONE"})


def _multiport_match(ctx: _Context, match: Match, flow: _Flow) -> _Result:
    results = [_port_option(negated, name, values, flow, source="--sports",
                            destination="--dports", both="--ports")
               for negated, name, values in match.options]
    return _combine(results)


def _addrtype_match(ctx: _Context, match: Match, flow: _Flow) -> _Result:
    results: list[_Result] = []
    for negated, name, values in match.options:
        if name not in ("--src-type", "--dst-type"):
            results.append(_Unknown(f"-m addrtype {name}"))
            continue
        ip = flow.src if name == "--src-type" else flow.dst
        kinds = {_address_type(ctx, ip)}
        wanted = set(values[0].split(",")) if values else set()
        if not wanted <= {"LOCAL", "UNICAST", "MULTICAST", "BROADCAST", "UNSPEC"}:
            results.append(_Unknown(f"-m addrtype {name} {values[0]}"))
            continue
        results.append(bool(kinds & wanted) != negated)
    return _combine(results)


def _address_type(ctx: _Context, ip: Address) -> str:
    if ctx.is_local(ip):
        return "LOCAL"
    if ip.is_multicast:
        return "MULTICAST"
    if ip.is_unspecified:
        return "UNSPEC"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return "BROADCAST"
    return "UNICAST"


def _mark_match(ctx: _Context, match: Match, flow: _Flow) -> _Result:
    results: list[_Result] = []
    for negated, name, values in match.options:
        try:
            value, mask = mark_value(values[0] if values else "")
        except ValueError:
            results.append(_Unknown(f"-m mark {name} {values}"))
            continue
        results.append(((flow.mark & mask) == value) != negated)
    return _combine(results)


def _statistic_match(ctx: _Context, match: Match, flow: _Flow) -> _Result:
    options = {name: (negated, values) for negated, name, values in match.options}
    mode = options.get("--mode", (False, ("random",)))[1]
    if mode != ("random",) or "--probability" not in options:
        return _Unknown("-m statistic " + " ".join(mode))
    negated, values = options["--probability"]
    try:
        p = min(max(float(values[0]), 0.0), 1.0)
    except (ValueError, IndexError):
        return _Unknown(f"-m statistic --probability {values}")
    return _Fork(1.0 - p if negated else p)


def _recent_match(ctx: _Context, match: Match, flow: _Flow) -> _Result:
    # No recent-list state: a first packet finds no entry; --set always adds (and matches).
    for negated, name, _ in match.options:
        if name == "--set":
            return not negated
        if name in ("--rcheck", "--update", "--remove"):
            return negated
    return _Unknown("-m recent without --set/--rcheck/--update/--remove")


def _conntrack_match(ctx: _Context, match: Match, flow: _Flow) -> _Result:
    # The packet opens a connection (NEW); DNAT is set once a nat rule rewrote its destination.
    states = {"NEW"} | ({"DNAT"} if flow.dnat and match.name == "conntrack" else set())
    results: list[_Result] = []
    for negated, name, values in match.options:
        if name in ("--ctstate", "--state") and values:
            results.append(bool(states & set(values[0].split(","))) != negated)
        elif name == "--ctproto" and values:
            results.append((values[0].lower() in (flow.proto, "all")) != negated)
        else:
            results.append(_Unknown(f"-m {match.name} {name}"))
    return _combine(results)


# --- presenting ------------------------------------------------------------------------------

def percent(p: float) -> str:
    text = f"{p * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def _describe(outcome: Outcome) -> str:
    if outcome.verdict == "DNAT":
        return f"DNAT to {outcome.endpoint}"
    if outcome.verdict == "ACCEPT":
        return "ACCEPT (no DNAT: delivered to the original destination)"
    return outcome.verdict


def _step_lines(number: int, step: Step) -> list[str]:
    where = f"{step.table} {step.chain}" + (f" #{step.index}" if step.index else "")
    head = f"  {number:>3}. {where}"
    if step.comment and step.index:
        head += f'  "{step.comment}"'
    body = parse_rule(step.rule).text_without_comment if step.index else step.rule
    body = body or "(matches everything, no target: counted, the walk goes on)"
    return [head, f"         {body}"]


def _path_lines(outcome: Outcome, shown: tuple[Step, ...]) -> list[str]:
    """An outcome's path; the steps it shares with the path ``shown`` above are referenced."""
    path = outcome.path
    head = tail = 0
    limit = min(len(path), len(shown))
    while head < limit and path[head] == shown[head]:
        head += 1
    while tail < limit - head and path[-1 - tail] == shown[-1 - tail]:
        tail += 1
    title = f"path to {_describe(outcome)} ({percent(outcome.probability)})"
    lines = [f"{title}: steps 1-{head} as above, then" if head else f"{title}:"]
    for number, step in enumerate(path[head:len(path) - tail], head + 1):
        lines.extend(_step_lines(number, step))
    if tail:
        lines.append(f"         then steps {len(shown) - tail + 1}-{len(shown)} as above")
    return lines


def render_text(result: TraceResult) -> str:
    """A report for humans: the outcome distribution, masquerading, and the rules taken."""
    nodes = ", ".join(str(ip) for ip in result.node_ips) or "none given"
    entering = {"pod": "from a pod", "external": "from outside the node",
                "node": "from the node itself"}[result.origin]
    family = result.packet.family
    lines = [f"packet:     {result.packet}, a new connection {entering}",
             f"node IPs:   {nodes}; {LOOPBACK[family]} is local too",
             f"verdict:    {result.verdict}"]
    for outcome in result.outcomes:
        masq = ""
        if outcome.verdict in ("DNAT", "ACCEPT"):
            masq = "   masquerade: " + ("yes" if outcome.masquerade else "no")
        lines.append(f"  {percent(outcome.probability):>7}  {_describe(outcome)}{masq}")
    if result.delivered:
        lines.append("masquerade: " + {
            True: "yes (the endpoint sees a node address, not the client's)",
            False: "no (the endpoint sees the client's address)",
            None: "on some outcomes only (see each outcome above)"}[result.masquerade])
    first = result.outcomes[0].path if result.outcomes else ()
    for number, outcome in enumerate(result.outcomes):
        lines.append("")
        lines.extend(_path_lines(outcome, first if number else ()))
    if result.warnings:
        lines.append("")
        lines.append("warnings (not modelled, assumed to match or to fall through):")
        lines.extend(f"  - {warning}" for warning in result.warnings)
    return "\n".join(lines) + "\n"


def _step_json(step: Step) -> dict[str, Any]:
    return {"table": step.table, "chain": step.chain, "index": step.index, "rule": step.rule,
            "comment": step.comment}


def result_json(result: TraceResult) -> dict[str, Any]:
    """The machine-readable form: verdict, endpoints, masquerade, the likeliest path, all."""
    packet = result.packet
    return {
        "packet": {"src": str(packet.src), "dst": str(packet.dst), "dport": packet.dport,
                   "proto": packet.proto, "sport": packet.sport, "from": result.origin,
                   "family": packet.family.value},
        "node_ips": [str(ip) for ip in result.node_ips],
        "verdict": result.verdict,
        "endpoints": result.endpoints,
        "masquerade": result.masquerade is True,
        "masquerade_probability": result.masquerade_probability,
        "path": [_step_json(step) for step in result.most_likely.path],
        "outcomes": [{"verdict": o.verdict, "endpoint": o.endpoint,
                      "probability": o.probability, "masquerade": o.masquerade,
                      "path": [_step_json(step) for step in o.path]}
                     for o in result.outcomes],
        "warnings": list(result.warnings),
    }
