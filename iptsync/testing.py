"""Test doubles for the kernel port and the agent's clock: run the sync logic without root.

:class:`FakeNetfilter` stands in for :class:`iptsync.kernel.netfilter.Netfilter`. It keeps the
filter, nat and mangle tables in memory and applies restore batches the way iptables-restore does
where it matters to a proxier::

    from iptsync.engine.reconciler import Engine
    from iptsync.testing import FakeConntrack, FakeNetfilter

    kernel = FakeNetfilter()
    engine = Engine(kernel, settings, flows=FakeConntrack())
    engine.upsert(service); engine.upsert(endpoint_slice)
    engine.sync()
    kernel.save()["nat"].chains          # what iptables-save would print, parsed
    kernel.fail_restore(table="nat")     # the next batch that writes nat is rejected there

What it enforces, as the kernel does (checked against both real backends by
``tests/kernel/test_fake_agrees.py``):

- each ``*table ... COMMIT`` block commits atomically, one table after the other: when a later
  table is rejected the earlier ones stay committed, and a block without COMMIT changes nothing;
- with ``--noflush`` (the default) a ``:CHAIN`` declaration flushes an existing chain and
  creates a new one (a built-in chain is never flushed); without it every table of the batch
  starts empty;
- a chain is declared before a rule is added to it, and a jump goes to an existing chain (or a
  target extension such as ACCEPT or DNAT);
- ``-X`` refuses a built-in chain, a chain that holds rules and a chain another rule jumps to;
- ``-D`` by rule spec refuses a rule the chain does not hold; ``-I CHAIN N`` refuses a position
  past the end;
- a rejected batch raises :class:`iptsync.kernel.port.RestoreError` naming the failing line,
  with the lines around it, as the real one does.

A jump to a chain not declared yet (even one declared further down the same table) is
rejected by both backends; legacy names the rule's line, nft the table's COMMIT, the fake the
rule's line.
Rules are stored as ``iptables-save`` prints them (:func:`iptsync.core.ruleset.canonical`), so
``-D`` by spec matches whatever spelling the rule was added with, and :meth:`FakeNetfilter.save`
reads like the real thing. Counters, packet matching and the xtables lock are not modelled.

:class:`FakeConntrack` stands in for :func:`iptsync.kernel.conntrack.clear_stale_flows`: a table of
flows from which each call deletes the stale ones, recording what it was asked. :class:`FakeClock`
is the agent's clock in simulated time: waiting for a message advances the time to the next
scheduled event (:meth:`FakeClock.call_at`) or to the end of the wait, without sleeping.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import queue
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from iptsync.core.flows import Flow, FlowTargets, stale
from iptsync.core.model import IPFamily
from iptsync.core.ruleset import (
    RulesetError,
    SavedTable,
    canonical,
    join_args,
    parse_save,
    split_args,
)
from iptsync.kernel.port import (
    OWNED_TABLES,
    Backend,
    NetfilterError,
    RestoreError,
    RuleStreamBase,
    excerpt,
)

T = TypeVar("T")

BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}
# Targets that are extensions rather than chains: a jump to any other name needs the chain.
TARGET_EXTENSIONS = frozenset({
    "ACCEPT", "DROP", "RETURN", "QUEUE", "NFQUEUE", "REJECT", "DNAT", "SNAT", "MASQUERADE",
    "REDIRECT", "NETMAP", "MARK", "CONNMARK", "CONNSECMARK", "SECMARK", "LOG", "NFLOG",
    "TRACE", "CT", "NOTRACK", "TPROXY", "TCPMSS", "TOS", "DSCP", "TTL", "HL", "CLASSIFY",
    "CHECKSUM", "AUDIT", "SET", "TEE", "IDLETIMER", "LED",
})


class Rejected(Exception):
    """A line or command the kernel refuses; the message says why, as iptables does."""


@dataclass
class FakeTable:
    """One table: chains in creation order with their rules (canonical), built-in policies."""

    name: str
    chains: dict[str, list[str]] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)
    family: IPFamily = IPFamily.IPV4  # iptables or ip6tables: how rules are spelled

    @classmethod
    def empty(cls, name: str, family: IPFamily = IPFamily.IPV4) -> FakeTable:
        builtins = BUILTIN_CHAINS[name]
        return cls(name, {chain: [] for chain in builtins}, dict.fromkeys(builtins, "ACCEPT"),
                   family)

    def copy(self) -> FakeTable:
        return FakeTable(self.name, {c: list(r) for c, r in self.chains.items()},
                         dict(self.policies), self.family)

    def rules_of(self, chain: str) -> list[str]:
        if chain not in self.chains:
            raise Rejected("No chain/target/match by that name.")
        return self.chains[chain]

    def is_builtin(self, chain: str) -> bool:
        return chain in BUILTIN_CHAINS[self.name]

    # --- what a restore line or an iptables command does ---------------------------------

    def declare(self, chain: str, policy: str) -> None:
        """``:CHAIN POLICY``: a built-in chain gets its policy; a user chain is flushed, or
        created when new (the --noflush meaning)."""
        if self.is_builtin(chain):
            if policy != "-":
                self.policies[chain] = policy
        elif policy != "-":
            raise Rejected(f"Can't set policy `{policy}' on `{chain}': Bad built-in chain name")
        else:
            self.chains[chain] = []

    def new_chain(self, chain: str) -> None:
        if chain in self.chains:
            raise Rejected("Chain already exists.")
        self.chains[chain] = []

    def append(self, chain: str, args: Sequence[str]) -> None:
        self.rules_of(chain).append(self._checked(args))

    def insert(self, chain: str, position: int, args: Sequence[str]) -> None:
        rules = self.rules_of(chain)
        if not 1 <= position <= len(rules) + 1:
            raise Rejected("Index of insertion too big.")
        rules.insert(position - 1, self._checked(args))

    def delete_rule(self, chain: str, args: Sequence[str]) -> None:
        rules = self.rules_of(chain)
        if len(args) == 1 and args[0].isdigit():
            if not 1 <= int(args[0]) <= len(rules):
                raise Rejected("Index of deletion too big.")
            del rules[int(args[0]) - 1]
            return
        rule = spelled(args, self.family)
        if rule not in rules:
            raise Rejected("Bad rule (does a matching rule exist in that chain?).")
        rules.remove(rule)

    def flush(self, chain: str | None) -> None:
        for name in [chain] if chain is not None else list(self.chains):
            self.rules_of(name).clear()

    def delete_chain(self, chain: str | None) -> None:
        doomed = [chain] if chain is not None else [c for c in self.chains
                                                    if not self.is_builtin(c)]
        for name in doomed:
            if self.is_builtin(name):
                raise Rejected("Operation not permitted (a built-in chain)")
            if self.rules_of(name):
                raise Rejected(f"CHAIN_DEL failed (Device or resource busy): chain {name} "
                               "holds rules")
            users = [c for c, rules in self.chains.items() if c not in doomed
                     for rule in rules if target(split_args(rule)) == name]
            if users:
                raise Rejected(f"CHAIN_DEL failed (Device or resource busy): chain {name} is "
                               f"referenced from {users[0]}")
        for name in doomed:
            del self.chains[name]

    def set_policy(self, chain: str, policy: str) -> None:
        if not self.is_builtin(chain):
            raise Rejected(f"Can't set policy `{policy}' on `{chain}': Bad built-in chain name")
        self.policies[chain] = policy

    def _checked(self, args: Sequence[str]) -> str:
        jump = target(args)
        if jump is not None and jump not in self.chains and jump not in TARGET_EXTENSIONS:
            raise Rejected(f"Chain '{jump}' does not exist")
        return spelled(args, self.family)

    # --- what iptables-save and iptables -S print ----------------------------------------

    def ordered_chains(self) -> list[str]:
        """Built-in chains in their fixed order, then the user chains sorted."""
        builtins = BUILTIN_CHAINS[self.name]
        return [*builtins, *sorted(c for c in self.chains if c not in builtins)]

    def save_lines(self) -> list[str]:
        chains = self.ordered_chains()
        return [f"*{self.name}",
                *(f":{c} {self.policies.get(c, '-')} [0:0]" for c in chains),
                *(rule_line(c, rule) for c in chains for rule in self.chains[c]),
                "COMMIT"]

    def listing(self, chain: str | None) -> list[str]:
        """``iptables -S [CHAIN]``."""
        chains = [chain] if chain is not None else self.ordered_chains()
        lines: list[str] = []
        for name in chains:
            rules = self.rules_of(name)
            lines.append(f"-P {name} {self.policies[name]}" if self.is_builtin(name)
                         else f"-N {name}")
            lines.extend(rule_line(name, rule) for rule in rules)
        return lines


def spelled(args: Sequence[str], family: IPFamily = IPFamily.IPV4) -> str:
    """A rule as ``family``'s save prints it (a match we cannot canonicalise: as given)."""
    return _spelled(tuple(args), family)


@functools.lru_cache(maxsize=1 << 16)  # syncs write the same rules again and again
def _spelled(args: tuple[str, ...], family: IPFamily) -> str:
    try:
        return canonical(args, family)
    except RulesetError:
        return join_args(args)


def rule_line(chain: str, rule: str) -> str:
    return f"-A {chain} {rule}".rstrip()


def target(args: Sequence[str]) -> str | None:
    """The chain or extension a rule jumps (``-j``) or goes (``-g``) to."""
    for index, token in enumerate(args[:-1]):
        if token in ("-j", "--jump", "-g", "--goto"):
            return args[index + 1]
    return None


def apply_command(table: FakeTable, tokens: Sequence[str]) -> list[str]:
    """Apply one command (``-A CHAIN ...``, ``-X``, ...) to ``table``; what it prints."""
    if not tokens:
        raise Rejected("no command given")
    command, rest = tokens[0], list(tokens[1:])
    chain = rest[0] if rest else None
    args = rest[1:]
    if command in ("-A", "--append") and chain is not None:
        table.append(chain, args)
    elif command in ("-I", "--insert") and chain is not None:
        position = int(args.pop(0)) if args and args[0].isdigit() else 1
        table.insert(chain, position, args)
    elif command in ("-D", "--delete") and chain is not None:
        table.delete_rule(chain, args)
    elif command in ("-F", "--flush"):
        table.flush(chain)
    elif command in ("-X", "--delete-chain"):
        table.delete_chain(chain)
    elif command in ("-N", "--new-chain") and chain is not None:
        table.new_chain(chain)
    elif command in ("-P", "--policy") and chain is not None and args:
        table.set_policy(chain, args[0])
    elif command in ("-S", "--list-rules"):
        return table.listing(chain)
    elif command in ("-Z", "--zero"):
        pass  # counters are not modelled
    else:
        raise Rejected(f"command {' '.join(tokens)!r} is not modelled by FakeNetfilter")
    return []


@dataclass
class InjectedFailure:
    """A coming restore batch to reject: at its line ``line``, or at the COMMIT of
    ``table``; ``skip`` batches that qualify pass first."""

    table: str | None = None
    line: int | None = None
    skip: int = 0


class FakeNetfilter:
    """An in-memory netfilter that satisfies :class:`iptsync.kernel.port.NetfilterPort`.

    ``batches`` holds every restore payload received, in order (tests assert what a sync
    wrote); ``backend`` only decides which batch strategy the engine picks; ``family`` makes
    it ip6tables: rules are kept as ip6tables-save spells them, errors name ip6tables.
    """

    def __init__(self, backend: Backend = Backend.NFT,
                 family: IPFamily = IPFamily.IPV4) -> None:
        self._backend = backend
        self.family = family
        self.tables = {name: FakeTable.empty(name, family) for name in BUILTIN_CHAINS}
        self.batches: list[list[str]] = []
        self.failures: list[InjectedFailure] = []

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def command(self) -> str:
        """The plain command, as :attr:`iptsync.kernel.netfilter.Netfilter.command`."""
        tool = "iptables" if self.family is IPFamily.IPV4 else "ip6tables"
        return f"{tool}-{self._backend.value}"

    @property
    def tool(self) -> str:
        return f"{self.command}-restore"

    def fail_restore(self, *, table: str | None = None, line: int | None = None,
                     skip: int = 0) -> None:
        """Reject a coming batch as the kernel would: at its line ``line``, or at the COMMIT
        of ``table`` (earlier tables of the batch stay committed). Once; ``skip`` qualifying
        batches pass first."""
        if (table is None) == (line is None):
            raise ValueError("give either table or line")
        self.failures.append(InjectedFailure(table, line, skip))

    # --- the port ------------------------------------------------------------------------

    def save(self, tables: Iterable[str] = OWNED_TABLES) -> dict[str, SavedTable]:
        wanted = list(tables)
        saved = parse_save([line for name in wanted if name in self.tables
                            for line in self.tables[name].save_lines()], verbatim=True)
        return {name: saved.get(name, SavedTable(name)) for name in wanted}

    def save_text(self, table: str) -> str:
        return "".join(f"{line}\n" for line in self.tables[table].save_lines())

    def restore(self, payload: str | Sequence[str], *, noflush: bool = True) -> None:
        with self.restore_stream(noflush=noflush) as stream:
            stream.write(payload.splitlines() if isinstance(payload, str) else payload)

    def restore_stream(self, *, noflush: bool = True) -> FakeRuleStream:
        return FakeRuleStream(self, noflush=noflush)

    def chain_exists(self, table: str, chain: str) -> bool:
        return table in self.tables and chain in self.tables[table].chains

    def run(self, *args: str) -> str:
        """One ``iptables`` command: ``[-t TABLE] -A|-I|-D|-F|-X|-N|-P|-S|-Z ...``; each is
        its own commit, and a refused one changes nothing."""
        tokens = [a for a in args if a not in ("-w", "--wait")]
        name = "filter"
        if len(tokens) >= 2 and tokens[0] in ("-t", "--table"):
            name, tokens = tokens[1], tokens[2:]
        if name not in self.tables:
            raise NetfilterError(f"{self.command}: can't initialize table "
                                 f"'{name}'")
        working = self.tables[name].copy()
        try:
            printed = apply_command(working, tokens)
        except (Rejected, ValueError) as err:
            raise NetfilterError(f"{self.command}: {err}") from None
        self.tables[name] = working
        return "".join(f"{line}\n" for line in printed)

    def injected(self, *, table: str | None = None, line: int | None = None) -> bool:
        """Whether an injected failure hits this COMMIT of ``table`` (or this ``line``); one
        that hits is used up."""
        for failure in self.failures:
            if (table, line) in ((failure.table, None), (None, failure.line)):
                if failure.skip:
                    failure.skip -= 1
                    return False
                self.failures.remove(failure)
                return True
        return False


class FakeRuleStream(RuleStreamBase):
    """One restore batch into a :class:`FakeNetfilter`, applied line by line as written.

    A table commits when its COMMIT line arrives; the first refused line ends the batch (later
    lines are ignored, as iptables-restore exits there) and :meth:`close` reports it.
    """

    def __init__(self, kernel: FakeNetfilter, *, noflush: bool) -> None:
        self.kernel = kernel
        self.noflush = noflush
        self.lines: list[str] = []
        kernel.batches.append(self.lines)
        self._working: FakeTable | None = None
        self._error: tuple[int, str] | None = None
        self._failing_lines = {f.line for f in kernel.failures if f.line is not None}

    def write(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.lines.append(line)
            if self._error is None:
                try:
                    self._apply(line, len(self.lines))
                except Rejected as err:
                    self._error = (len(self.lines), str(err))
                    self._working = None

    def abort(self) -> None:
        """Stop without committing the table in progress."""
        self._working = None

    def close(self) -> None:
        if self._error is None and self._working is not None:
            self._error = (len(self.lines) + 1, "COMMIT expected")
            self._working = None
        if self._error is not None:
            number, reason = self._error
            raise RestoreError(f"{self.kernel.tool}: line {number} failed: {reason}", number,
                               excerpt(self.lines, number))

    def _apply(self, raw: str, number: int) -> None:
        line = raw.strip()
        working = self._working
        if number in self._failing_lines and self.kernel.injected(line=number):
            raise Rejected("Operation not permitted (injected by FakeNetfilter)")
        if not line or line.startswith("#"):
            return
        if line.startswith("*"):
            name = line[1:]
            if working is not None:
                raise Rejected(f"COMMIT expected before table '{name}'")
            if name not in self.kernel.tables:
                raise Rejected(f"table name '{name}' invalid")
            self._working = (self.kernel.tables[name].copy() if self.noflush
                             else FakeTable.empty(name, self.kernel.family))
        elif working is None:
            raise Rejected("rule outside a table")
        elif line == "COMMIT":
            if self.kernel.injected(table=working.name):
                raise Rejected("Operation not permitted (injected by FakeNetfilter)")
            self.kernel.tables[working.name] = working
            self._working = None
        elif line.startswith(":"):
            chain, policy, *_ = [*line[1:].split(), "-"]
            working.declare(chain, policy)
        else:
            try:
                apply_command(working, split_args(line))
            except ValueError as err:
                raise Rejected(str(err)) from None


class FakeConntrack:
    """A conntrack table for :class:`iptsync.kernel.port.FlowCleaner`: each call deletes the flows
    that :func:`iptsync.core.flows.stale` condemns and records the targets it was given."""

    def __init__(self, flows: Iterable[Flow] = ()) -> None:
        self.flows = list(flows)
        self.calls: list[FlowTargets] = []

    def __call__(self, targets: FlowTargets, /) -> int:
        self.calls.append(targets)
        kept = [flow for flow in self.flows if not stale(flow, targets)]
        deleted = len(self.flows) - len(kept)
        self.flows = kept
        return deleted


class FakeClock:
    """Simulated time for :class:`iptsync.agent.loop.Agent` (its
    :class:`~iptsync.agent.loop.Clock`).

    Nothing sleeps: waiting for a message with nothing queued runs the events scheduled
    within the wait (which may queue messages, change the kernel, or stop the agent) and
    moves the time to the first message or to the end of the wait.
    """

    def __init__(self, start: float = 1000.0, epoch: float = 1_767_225_600.0) -> None:
        self.now = start
        self.epoch = epoch  # what time() says at monotonic 0
        self._events: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch + self.now

    def call_at(self, when: float, action: Callable[[], object]) -> None:
        """Run ``action`` when the simulated time reaches ``when``."""
        heapq.heappush(self._events, (when, next(self._order), action))

    def call_after(self, delay: float, action: Callable[[], object]) -> None:
        self.call_at(self.now + delay, action)

    def advance(self, seconds: float) -> None:
        """Move the time on, running the events due meanwhile."""
        self._run_until(self.now + seconds, None)

    def wait(self, messages: queue.Queue[T], timeout: float) -> T | None:
        return self._run_until(self.now + timeout, messages)

    def _run_until(self, end: float, messages: queue.Queue[T] | None) -> T | None:
        while True:
            if messages is not None:
                try:
                    return messages.get_nowait()
                except queue.Empty:
                    pass
            if not self._events or self._events[0][0] > end:
                self.now = max(self.now, end)
                return None
            when, _order, action = heapq.heappop(self._events)
            self.now = max(self.now, when)
            action()
