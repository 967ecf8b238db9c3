"""Rulesets as text: iptables-restore output, iptables-save parsing, and rule canonicalisation.

A rule is kept as the argument list kube-proxy would hand to iptables-restore. The kernel does
not keep that spelling: ``iptables-save`` prints addresses with a prefix length, moves ``-p``
before the matches, spells ``--or-mark`` as ``--set-xmark``, rounds probabilities to 2^-31
steps and adds defaults (``--rsource``, ``--reject-with``). :func:`canonical` maps either
spelling to the one ``iptables-save`` prints (the same for the nft and legacy backends), so
desired and live rules can be compared as strings. Two of those defaults depend on the IP
family: ``ip6tables-save`` prints a bare ``-j REJECT`` with ``--reject-with
icmp6-port-unreachable`` and the recent match's mask as ``ffff:...:ffff``, so rules are
canonicalised for the family of the table they live in. Pure: no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from iptsync.core.model import IPFamily

TABLE_ORDER = ("filter", "nat")


class RulesetError(ValueError):
    """Text that is not valid iptables-save/restore input, or a rule we cannot canonicalise."""


class UnsafeRestoreText(RulesetError):
    """A chain name or argument that would break out of its restore line: never written."""


class Rule(NamedTuple):
    """One rule: its chain and its arguments (restore-input spelling, values unquoted).

    A named tuple rather than a frozen dataclass: a large cluster renders hundreds of
    thousands of rules, and a tuple is built three times faster.
    """

    chain: str
    args: tuple[str, ...]

    def restore_line(self, op: str = "-A", position: int | None = None) -> str:
        """``-A CHAIN args`` (or ``-I CHAIN POSITION args``, ``-D CHAIN args``)."""
        where = f"{self.chain} {position}" if position is not None else self.chain
        return f"{op} {where} {join_args(self.args)}".rstrip()

    @property
    def canonical(self) -> str:
        """The IPv4 spelling; a rule whose spelling depends on the family (REJECT, the recent
        match) is spelled with :func:`canonical` and its table's family."""
        return canonical(self.args)


@dataclass(frozen=True, slots=True)
class Jump:
    """A jump from a built-in chain to one of ours, ensured near the top of that chain."""

    table: str
    chain: str
    args: tuple[str, ...]

    @property
    def rule(self) -> Rule:
        return Rule(self.chain, self.args)


@dataclass
class Ruleset:
    """Rules as arguments: table -> chain -> rules (chains in declaration order), and jumps.

    What :func:`iptsync.core.render.base_ruleset` builds; the engine assembles the full desired
    ruleset (:class:`iptsync.core.plan.DesiredTables`) from it and the services' rules.
    """

    tables: dict[str, dict[str, list[Rule]]] = field(default_factory=dict)
    jumps: list[Jump] = field(default_factory=list)

    def chain(self, table: str, chain: str) -> list[Rule]:
        """The rules of a chain, creating the (empty) chain if needed."""
        return self.tables.setdefault(table, {}).setdefault(chain, [])

    def add(self, table: str, chain: str, *args: str) -> None:
        self.chain(table, chain).append(Rule(chain, tuple(args)))


def ordered_tables(tables: Iterable[str]) -> list[str]:
    names = list(tables)
    return [t for t in TABLE_ORDER if t in names] + sorted(t for t in names if t not in TABLE_ORDER)


def chain_line(name: str) -> str:
    """A restore chain declaration; for an existing chain it also flushes it (with --noflush).

    Every chain a batch creates, flushes, deletes (``-X``) or writes rules to is declared (or
    is a built-in chain), so checking the name here covers those lines too.
    """
    return f":{checked_chain(name)} - [0:0]"


def checked_chain(name: str) -> str:
    """``name``, if it can stand as one token of a restore line; else UnsafeRestoreText."""
    # isprintable() is False for newline, carriage return, NUL and the other controls.
    if not name or not name.isprintable() or " " in name:
        raise UnsafeRestoreText(f"refusing to write chain name {name!r} into a restore payload")
    return name


# --- tokenising and quoting ------------------------------------------------------------------

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_NEEDS_QUOTES = re.compile(r'[\s"\\\x00]')


def split_args(text: str) -> list[str]:
    """Split a rule the way iptables-restore does (double quotes, backslash escapes)."""
    if '"' not in text:
        return text.split()
    return [re.sub(r"\\(.)", r"\1", quoted) if quoted is not None and bare == "" else bare
            for quoted, bare in _TOKEN.findall(text)]


def quote(token: str) -> str:
    if token and not _NEEDS_QUOTES.search(token):
        return token
    if "\n" in token or "\r" in token or "\0" in token:
        raise UnsafeRestoreText(f"refusing to write argument {token[:200]!r} into a restore "
                                "payload: it holds a newline, carriage return or NUL")
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def join_args(args: Iterable[str]) -> str:
    """The arguments as one restore line, quoted where iptables-restore needs it.

    Defence in depth behind the model's name checks: an argument holding a newline or a
    carriage return would end the line and start another (a rule of the writer's choosing),
    and a NUL cuts it short, so such an argument raises UnsafeRestoreText instead.
    """
    args = tuple(args)
    if all(args):
        # Newline, carriage return and NUL all need quotes: a token holding one always goes
        # through quote(), which refuses it; the fast paths below never see one.
        if not _NEEDS_QUOTES.search("".join(args)):
            return " ".join(args)  # the common case: nothing to quote
        if "--comment" in args:
            # The next common one: only the comment has spaces in it.
            i = args.index("--comment") + 1
            before, after = args[:i], args[i + 1:]
            if not _NEEDS_QUOTES.search("".join(before)) and not _NEEDS_QUOTES.search(
                    "".join(after)):
                return " ".join((*before, quote(args[i]), *after))
    return " ".join(map(quote, args))


# --- parsing iptables-save -------------------------------------------------------------------

@dataclass
class SavedTable:
    """One table as iptables-save printed it; rules are kept canonical."""

    name: str
    chains: dict[str, list[str]] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)  # built-in chains only


def parse_save(text: str | Iterable[str], *, verbatim: bool = False,
               family: IPFamily = IPFamily.IPV4) -> dict[str, SavedTable]:
    """Parse iptables-save (or, with ``family`` IPv6, ip6tables-save) output (either backend,
    with or without ``-c`` counters).

    ``text`` may be the whole output or its lines, one at a time (as read from a pipe: a large
    node's nat table never has to sit in memory as one string). Rules are canonicalised, so
    text edited by hand compares correctly. With ``verbatim``,
    for text straight from iptables-save (already the canonical spelling, by definition of
    :func:`canonical`), rules are kept as printed: at 10,000 services that halves the time
    to read a node's tables.
    """
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    lines = text.splitlines() if isinstance(text, str) else text
    rules: list[str] = []  # the last rule's chain's (a save lists each chain's rules together)
    last: str | None = None
    # The kernel keeps whatever bytes a comment was given, newlines included, and
    # iptables-save prints them as they are: another program's ``--comment $'a\nb'`` arrives
    # as two lines, the first with an open quote. Read as two rules it would stop every sync
    # from reading the table, so the lines are joined back (with the newline) while a quote is
    # open; such a rule is never written back (the restore writer refuses a newline). This
    # loop runs for every line of a save (440,000 at 10,000 services).
    pending: list[str] = []
    start = 0
    for at, raw in enumerate(lines, 1):
        if pending:
            pending.append(raw.rstrip("\n"))
            joined = "\n".join(pending)
            if _quote_open(joined):
                continue
            pending, line, number = [], joined.strip(), start
        else:
            line, number = raw.strip(), at
            # An even number of quotes and no backslash: closed, decided without a call.
            if ((line.count('"') & 1 or "\\" in line) and line.startswith("-A ")
                    and _quote_open(line)):
                pending, start = [line], at
                continue
        if verbatim and current is not None and line.startswith("-A "):
            # Most lines of a large save: first, and without a lookup while the chain is the
            # last one's.
            chain, _, rule = line[3:].partition(" ")
            if chain != last:
                rules, last = current.chains.setdefault(chain, []), chain
            rules.append(rule)
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current, last = tables.setdefault(line[1:], SavedTable(line[1:])), None
        elif current is None:
            raise RulesetError(f"line {number}: {line!r} outside a table")
        elif line == "COMMIT":
            current = None
        elif line.startswith(":"):
            name, policy, *_ = [*line[1:].split(), "-"]
            current.chains.setdefault(name, [])
            if policy != "-":
                current.policies[name] = policy
        else:
            chain, args = _parse_rule_line(line, number)
            try:
                rule = canonical(args, family)
            except RulesetError:
                # Another tool's rule with a match we do not model: keep it verbatim, so one
                # foreign rule can never stop a sync from reading the table.
                rule = join_args(args)
            current.chains.setdefault(chain, []).append(rule)
    if pending:
        raise RulesetError(f"line {start}: a quote opened in {pending[0]!r} is never closed")
    if current is not None:
        raise RulesetError(f"table {current.name} has no COMMIT")
    return tables


def _quote_open(line: str) -> bool:
    """Whether ``line`` ends inside a double-quoted value (iptables-save escapes a quote or a
    backslash in a value with a backslash)."""
    inside = escaped = False
    for char in line:
        if escaped:
            escaped = False
        elif char == "\\" and inside:
            escaped = True
        elif char == '"':
            inside = not inside
    return inside


def _parse_rule_line(line: str, number: int) -> tuple[str, list[str]]:
    tokens = split_args(line)
    if tokens and tokens[0].startswith("["):  # counters from iptables-save -c
        tokens = tokens[1:]
    if len(tokens) < 2 or tokens[0] not in ("-A", "--append"):
        raise RulesetError(f"line {number}: expected '-A CHAIN ...', got {line!r}")
    return tokens[1], tokens[2:]


# --- canonicalisation ------------------------------------------------------------------------

_ADDRESS_OPTS = {"-s": "-s", "--source": "-s", "--src": "-s",
                 "-d": "-d", "--destination": "-d", "--dst": "-d",
                 "-i": "-i", "--in-interface": "-i", "-o": "-o", "--out-interface": "-o",
                 "-p": "-p", "--protocol": "-p"}
_OPT_ALIASES = {"--source-port": "--sport", "--destination-port": "--dport",
                "--source-ports": "--sports", "--destination-ports": "--dports"}
# The order in which iptables-save prints each match's options.
_OPTION_ORDER: dict[str, tuple[str, ...]] = {
    "tcp": ("--sport", "--dport", "--tcp-flags", "--syn"),
    "udp": ("--sport", "--dport"),
    "sctp": ("--sport", "--dport", "--chunk-types"),
    "addrtype": ("--src-type", "--dst-type", "--limit-iface-in", "--limit-iface-out"),
    "statistic": ("--mode", "--probability", "--every", "--packet"),
    "recent": ("--set", "--rcheck", "--update", "--remove", "--seconds", "--reap",
               "--hitcount", "--rttl", "--name", "--mask", "--rsource", "--rdest"),
    "conntrack": ("--ctstate", "--ctproto", "--ctorigsrc", "--ctorigdst", "--ctstatus"),
}
_OPTION_RANK = {match: {opt: i for i, opt in enumerate(order)}
                for match, order in _OPTION_ORDER.items()}
_CTSTATE_ORDER = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
# Options that take exactly one value, whatever it looks like (a comment may be "!" or "--x").
_ONE_VALUE = frozenset({
    "--comment", "--log-prefix", "--nflog-prefix", "--name", "--to-destination", "--to-source",
    "--set-xmark", "--set-mark", "--or-mark", "--xor-mark", "--and-mark", "--mark", "--ctstate",
    "--state", "--sport", "--dport", "--sports", "--dports", "--ports", "--probability",
    "--mode", "--seconds", "--src-type", "--dst-type", "--mask", "--reject-with", "--to-ports",
    "--hitcount", "--every", "--packet", "--ctstatus", "--ctproto",
})
# Options that take none.
_NO_VALUE = frozenset({"--set", "--rcheck", "--update", "--remove", "--reap", "--rsource",
                       "--rdest", "--random", "--random-fully", "--persistent", "--syn",
                       "--rttl", "--limit-iface-in", "--limit-iface-out"})
# iptables-save prints string values bare only when made of these (xtables_save_string).
_BARE_CHARS = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_PROBABILITY_SCALE = 0x80000000  # xt_statistic keeps the probability as a 31-bit fraction
# xt_comment holds XT_MAX_COMMENT_LEN (256) bytes with the closing NUL; both backends' restore
# cut a longer comment there without a word (measured: 300 bytes in, 255 in iptables-save).
MAX_COMMENT_BYTES = 255

Option = tuple[bool, str, tuple[str, ...]]  # (negated, --name, values)
# The defaults each family's save prints when a rule leaves them out (measured with both
# backends of iptables-save and ip6tables-save).
_REJECT_DEFAULT = {IPFamily.IPV4: "icmp-port-unreachable",
                   IPFamily.IPV6: "icmp6-port-unreachable"}
_RECENT_MASK = {IPFamily.IPV4: "255.255.255.255",
                IPFamily.IPV6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}


@dataclass
class RuleArgs:
    """A rule's arguments sorted into their parts, values as written (not normalised)."""

    basics: dict[str, tuple[bool, str]] = field(default_factory=dict)  # -s -d -i -o -p -f
    matches: list[tuple[str, list[Option]]] = field(default_factory=list)
    target: tuple[str, str] | None = None  # ("-j"|"-g", name)
    target_opts: list[Option] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # tokens that fit nowhere


_BASICS = ("-s", "-d", "-i", "-o", "-p", "-f")  # in the order iptables-save prints them
# Matches with an option whose value iptables-save spells its own way (_normalise_option).
_NORMALISED_MATCHES = frozenset({"statistic", "mark", "conntrack", "state", "tcp"})


def canonical(args: Sequence[str], family: IPFamily = IPFamily.IPV4) -> str:
    """The rule's arguments as ``iptables-save`` (``ip6tables-save`` for ``family`` IPv6)
    prints them, for comparison and reuse."""
    parsed = read_args(args)
    if parsed.unreadable:
        raise RulesetError(f"cannot read rule arguments at {parsed.unreadable[0]!r}: "
                           f"{join_args(args)}")
    out: list[str] = []
    basics = parsed.basics
    for opt in _BASICS if basics else ():
        if opt in basics:
            negated, value = basics[opt]
            if negated:
                out.append("!")
            out.append(opt)
            if opt in ("-s", "-d"):
                value = _address(value)
            elif opt == "-p":
                value = value.lower()
            if value:
                out.append(value)
    for name, options in parsed.matches:
        out += ("-m", name)
        out += _match_options(name, options, family)
    if parsed.target is not None:
        flag, target = parsed.target
        out += (flag, target)
        if parsed.target_opts or target == "REJECT":
            out += _target_options(target, parsed.target_opts, family)
    return " ".join(out)


def saved_host(address: str, family: IPFamily) -> str:
    """A host address (``str()`` of an address) as iptables-save prints it after ``-s`` or
    ``-d``: with its /32 or /128, as :func:`canonical` spells it."""
    return _address(address) if family is IPFamily.IPV4 else f"{address}/128"


def saved_address(value: str) -> str:
    """An address or CIDR as iptables-save prints it after ``-s`` or ``-d``."""
    return _address(value)


def saved_comment(text: str) -> str:
    """``-m comment --comment TEXT`` as iptables-save prints it."""
    return f"-m comment --comment {_save_quote(kernel_comment(text))}"


def saved_probability(text: str) -> str:
    """A statistic match's probability as iptables-save prints it."""
    return _probability(text)


def saved_recent(flags: str, name: str, family: IPFamily) -> str:
    """``-m recent FLAGS --name NAME`` (FLAGS: ``--set``, or ``--rcheck --seconds N --reap``)
    as iptables-save prints it, with the defaults it adds."""
    return f"-m recent {flags} --name {name} --mask {_RECENT_MASK[family]} --rsource"


def read_args(args: Sequence[str]) -> RuleArgs:
    """Sort a rule's arguments into basics, matches and target, the way iptables reads them.

    Never raises: what fits nowhere goes to ``unreadable``. Shared by :func:`canonical` and
    the packet tracer, so both read a rule the same way.
    """
    parsed = RuleArgs()
    current: list[Option] | None = None
    negated = False
    i, n = 0, len(args)
    while i < n:
        token = args[i]
        if token == "!":
            negated = True
            i += 1
            continue
        if token in ("-f", "--fragment"):
            parsed.basics["-f"] = (negated, "")
            i += 1
        elif i + 1 < n and token in _ADDRESS_OPTS:
            parsed.basics[_ADDRESS_OPTS[token]] = (negated, args[i + 1])
            i += 2
        elif i + 1 < n and token in ("-m", "--match"):
            current = []
            parsed.matches.append((args[i + 1], current))
            i += 2
        elif i + 1 < n and token in ("-j", "--jump", "-g", "--goto"):
            parsed.target = ("-g" if token in ("-g", "--goto") else "-j", args[i + 1])
            current = parsed.target_opts
            i += 2
        elif token.startswith("--"):
            i += 1
            values: tuple[str, ...] = ()
            if token in _ONE_VALUE:
                values, i = tuple(args[i:i + 1]), i + 1
            elif token not in _NO_VALUE:
                start = i
                while i < n and args[i] != "!" and not args[i].startswith("-"):
                    i += 1
                values = tuple(args[start:i])
            if current is None:  # e.g. "-p tcp --dport 80": iptables loads the tcp match itself
                current = []
                parsed.matches.append((parsed.basics.get("-p", (False, "?"))[1].lower(),
                                       current))
            current.append((negated, _OPT_ALIASES.get(token, token), values))
        else:
            parsed.unreadable.append(token)
            i += 1
        negated = False
    return parsed


# An IPv4 address without leading zeros, alone or /32: its network form is itself with /32.
# Every endpoint and service address of a render is one; a restart canonicalises 130,000 of
# them at 10,000 services, and ipaddress took a third of that time.
_HOST_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                        r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:/32)?")


def _address(value: str) -> str:
    if _HOST_IPV4.fullmatch(value):
        return value if value.endswith("/32") else f"{value}/32"
    return _network(value)


@functools.lru_cache(maxsize=4096)
def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise RulesetError(f"bad address {value!r}") from None


def _format_options(options: Iterable[Option]) -> list[str]:
    out: list[str] = []
    for negated, name, values in options:
        if negated:
            out.append("!")
        out.append(name)
        for value in values:
            out.append(_save_quote(value) if not value or _NEEDS_QUOTES.search(value)
                       else value)
    return out


def _match_options(name: str, options: list[Option], family: IPFamily) -> list[str]:
    if name == "comment":
        return [tok for negated, opt, values in options
                for tok in ((["!"] if negated else []) + [opt]
                            + [_save_quote(kernel_comment(v)) for v in values])]
    normalised = ([_normalise_option(name, opt) for opt in options]
                  if name in _NORMALISED_MATCHES else list(options))
    if name == "recent":
        present = {opt[1] for opt in normalised}
        if "--name" not in present:
            normalised.append((False, "--name", ("DEFAULT",)))
        if "--mask" not in present:
            normalised.append((False, "--mask", (_RECENT_MASK[family],)))
        if not present & {"--rsource", "--rdest"}:
            normalised.append((False, "--rsource", ()))
    rank = _OPTION_RANK.get(name)
    if rank and len(normalised) > 1:
        normalised.sort(key=lambda opt: rank.get(opt[1], len(rank)))
    return _format_options(normalised)


def _normalise_option(match: str, option: Option) -> Option:
    negated, name, values = option
    if match == "statistic" and name == "--probability" and values:
        return negated, name, (_probability(values[0]),)
    if match == "mark" and name == "--mark" and values:
        return negated, name, (_mark(values[0]),)
    if (match, name) in (("conntrack", "--ctstate"), ("conntrack", "--state"),
                         ("state", "--state")) and values:
        states = values[0].split(",")
        states.sort(key=lambda s: _CTSTATE_ORDER.index(s) if s in _CTSTATE_ORDER else 99)
        return negated, "--ctstate" if match == "conntrack" else "--state", (",".join(states),)
    if match == "tcp" and name == "--syn":
        return negated, "--tcp-flags", ("FIN,SYN,RST,ACK", "SYN")
    return option


def _target_options(target: str, options: list[Option], family: IPFamily) -> list[str]:
    if target == "MARK":
        return _format_options(_mark_target(opt) for opt in options)
    if target == "REJECT" and not options:
        return ["--reject-with", _REJECT_DEFAULT[family]]
    return _format_options(options)


def _mark_target(option: Option) -> Option:
    negated, name, values = option
    number, mask = mark_value(values[0] if values else "0")
    if name == "--or-mark":
        return negated, "--set-xmark", (f"{number:#x}/{number:#x}",)
    if name == "--xor-mark":
        return negated, "--set-xmark", (f"{number:#x}/0x0",)
    if name == "--and-mark":
        return negated, "--set-xmark", (f"0x0/{~number & 0xFFFFFFFF:#x}",)
    if name == "--set-mark":
        return negated, "--set-xmark", (f"{number:#x}/{(mask | number):#x}",)
    if name == "--set-xmark":
        return negated, "--set-xmark", (f"{number:#x}/{mask:#x}",)
    return option


def kernel_comment(text: str) -> str:
    """A comment as the kernel keeps it: its first 255 bytes.

    Compared in this form, a rule with a longer comment matches what the kernel holds, so a
    full sync does not rewrite its chain (and report drift) every period.
    """
    if len(text) <= MAX_COMMENT_BYTES // 4:  # short enough in any encoding
        return text
    raw = text.encode()
    # A cut inside a multi-byte character leaves bytes no save output decodes; names are
    # ASCII (the model checks them), so only a hand-made ruleset could get there.
    return text if len(raw) <= MAX_COMMENT_BYTES else raw[:MAX_COMMENT_BYTES].decode(
        errors="ignore")


def mark_value(text: str) -> tuple[int, int]:
    """``VALUE[/MASK]`` as numbers (mask 0xffffffff when absent); raises ValueError."""
    value, _, mask_text = text.partition("/")
    return int(value, 0), int(mask_text, 0) if mask_text else 0xFFFFFFFF


def _mark(text: str) -> str:
    number, mask = mark_value(text)
    return f"{number:#x}" if mask == 0xFFFFFFFF else f"{number:#x}/{mask:#x}"


def _probability(text: str) -> str:
    # The kernel keeps round(p * 2^31); iptables-save prints that fraction with 11 decimals.
    scaled = int(float(text) * _PROBABILITY_SCALE + 0.5)
    return f"{scaled / _PROBABILITY_SCALE:.11f}"


def _save_quote(text: str) -> str:
    """A string value as iptables-save prints it (xtables_save_string)."""
    if text and all(ch in _BARE_CHARS for ch in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f'"{escaped}"'
