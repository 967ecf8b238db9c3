"""Show what a sync would change on a node, as a readable diff of its chains.

Why: before letting iptsync take over a node, or when rules look wrong, a person wants to see
what a sync would write without writing it. The planner (:func:`iptsync.core.plan.make_plan`)
already knows which chains a sync creates, rewrites and deletes and which jumps it inserts;
this module turns that plan into a report: per table, each chain with the rules that go
(``-``) and come (``+``), in the canonical form ``iptables-save`` prints, so the lines can be
compared with (and searched in) the output of ``iptables-save`` on the node.

Pure: plan + live tables + desired ruleset in, report lines or JSON out.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from iptsync.core.plan import ChainContent, DesiredTables, Plan
from iptsync.core.ruleset import SavedTable, ordered_tables

Action = Literal["create", "rewrite", "delete"]


@dataclass(frozen=True)
class ChainDiff:
    """One chain a sync would touch, and its rules before and after (canonical form)."""

    table: str
    chain: str
    action: Action
    before: tuple[str, ...]  # live rules (empty for a chain to create)
    after: tuple[str, ...]  # desired rules (empty for a chain to delete)

    def matcher(self) -> difflib.SequenceMatcher[str]:
        return difflib.SequenceMatcher(None, self.before, self.after, autojunk=False)

    def opcodes(self) -> Sequence[tuple[str, int, int, int, int]]:
        return self.matcher().get_opcodes()

    @property
    def removed(self) -> list[str]:
        return [rule for tag, i1, i2, _, _ in self.opcodes() if tag in ("delete", "replace")
                for rule in self.before[i1:i2]]

    @property
    def added(self) -> list[str]:
        return [rule for tag, _, _, j1, j2 in self.opcodes() if tag in ("insert", "replace")
                for rule in self.after[j1:j2]]

    @property
    def unchanged(self) -> int:
        return sum(i2 - i1 for tag, i1, i2, _, _ in self.opcodes() if tag == "equal")


@dataclass(frozen=True)
class JumpDiff:
    """A jump from a built-in chain that a sync would insert at the top of that chain."""

    table: str
    chain: str
    rule: str  # canonical


@dataclass(frozen=True)
class DiffReport:
    """Everything a sync would change, table by table, in the plan's order."""

    chains: tuple[ChainDiff, ...]
    jumps: tuple[JumpDiff, ...]

    @property
    def changed(self) -> bool:
        return bool(self.chains or self.jumps)

    def tables(self) -> list[str]:
        return ordered_tables({c.table for c in self.chains} | {j.table for j in self.jumps})


def diff_report(plan: Plan, live: Mapping[str, SavedTable],
                desired: DesiredTables) -> DiffReport:
    """The plan's changes with the rules behind them: created, rewritten, deleted, jumps."""
    chains: list[ChainDiff] = []
    jumps: list[JumpDiff] = []
    for table_plan in plan.tables:
        table = table_plan.table
        current = live.get(table) or SavedTable(table)
        wanted = desired.tables.get(table, {})

        def before(chain: str, current: SavedTable = current) -> tuple[str, ...]:
            return tuple(current.chains.get(chain, ()))

        def after(chain: str,
                  wanted: Mapping[str, ChainContent] = wanted) -> tuple[str, ...]:
            return tuple(wanted[chain].canonical_rules())  # a chain the plan writes

        rewritten = [c for c in table_plan.written if c not in table_plan.created]
        chains += [ChainDiff(table, c, "create", (), after(c)) for c in table_plan.created]
        chains += [ChainDiff(table, c, "rewrite", before(c), after(c)) for c in rewritten]
        chains += [ChainDiff(table, c, "delete", before(c), ()) for c in table_plan.deleted]
        jumps += [JumpDiff(table, j.chain, j.rule.canonical) for j in table_plan.jumps]
    return DiffReport(tuple(chains), tuple(jumps))


# --- text ------------------------------------------------------------------------------------

def render_text(report: DiffReport, *, live_label: str, desired_label: str,
                context: int = 1) -> str:
    """A unified-diff-like report: ``@@`` per chain, ``-``/``+`` per rule, a summary."""
    if not report.changed:
        return f"no changes: the {live_label} already hold {desired_label}\n"
    lines = [f"--- {live_label}", f"+++ {desired_label}"]
    for table in report.tables():
        lines.append(f"*{table}")
        for chain in (c for c in report.chains if c.table == table):
            lines.extend(_chain_lines(chain, context))
        table_jumps = [j for j in report.jumps if j.table == table]
        if table_jumps:
            lines.append(f"@@ insert {_count(len(table_jumps), 'jump')} at the top of "
                         "built-in chains @@")
            lines.extend(f"+ {_rule_line('-I', j.chain, j.rule)}" for j in table_jumps)
    lines.append(f"summary: {summary(report)}")
    return "\n".join(lines) + "\n"


def _chain_lines(chain: ChainDiff, context: int) -> list[str]:
    if chain.action == "create":
        return [f"@@ create {chain.chain} ({_count(len(chain.after), 'rule')}) @@",
                *(f"+ {_rule_line('-A', chain.chain, r)}" for r in chain.after)]
    if chain.action == "delete":
        return [f"@@ delete {chain.chain} ({_count(len(chain.before), 'rule')}) @@",
                *(f"- {_rule_line('-A', chain.chain, r)}" for r in chain.before)]
    lines = [f"@@ rewrite {chain.chain}: {len(chain.removed)} removed, {len(chain.added)} "
             f"added, {chain.unchanged} unchanged @@"]
    for number, group in enumerate(chain.matcher().get_grouped_opcodes(context)):
        if number:
            lines.append("  ...")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                lines.extend(f"  {_rule_line('-A', chain.chain, r)}"
                             for r in chain.before[i1:i2])
                continue
            lines.extend(f"- {_rule_line('-A', chain.chain, r)}" for r in chain.before[i1:i2])
            lines.extend(f"+ {_rule_line('-A', chain.chain, r)}" for r in chain.after[j1:j2])
    return lines


def _rule_line(op: str, chain: str, rule: str) -> str:
    return f"{op} {chain} {rule}".rstrip()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary(report: DiffReport) -> str:
    """``filter: 1 jump to insert; nat: 2 chains to create, 1 chain to rewrite``."""
    parts = []
    for table in report.tables():
        items = []
        for action in ("create", "rewrite", "delete"):
            n = sum(1 for c in report.chains if c.table == table and c.action == action)
            if n:
                items.append(f"{_count(n, 'chain')} to {action}")
        jumps = sum(1 for j in report.jumps if j.table == table)
        if jumps:
            items.append(f"{_count(jumps, 'jump')} to insert")
        parts.append(f"{table}: {', '.join(items)}")
    return "; ".join(parts) or "no changes"


# --- JSON ------------------------------------------------------------------------------------

def report_json(report: DiffReport) -> dict[str, Any]:
    """``changed``, ``summary``, and per table the chains by action and the jumps."""
    tables: dict[str, Any] = {}
    for table in report.tables():
        chains = [c for c in report.chains if c.table == table]
        tables[table] = {
            "create": {c.chain: list(c.after) for c in chains if c.action == "create"},
            "rewrite": {c.chain: {"removed": c.removed, "added": c.added,
                                  "unchanged": c.unchanged}
                        for c in chains if c.action == "rewrite"},
            "delete": {c.chain: list(c.before) for c in chains if c.action == "delete"},
            "jumps": [{"chain": j.chain, "rule": j.rule} for j in report.jumps
                      if j.table == table],
        }
    return {"changed": report.changed, "summary": summary(report), "tables": tables}
