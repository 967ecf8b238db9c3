"""Applying a plan: staged new chains first, then one atomic batch, undone on failure.

A failed restore is undone table by table (see :mod:`iptsync.core.plan`) so the kernel keeps the
previous rules, and the error names the failing line with the payload lines around it. The
engine (:mod:`iptsync.engine.reconciler`) decides what to plan; this module only applies it.
"""

from __future__ import annotations

import logging

from iptsync.core.plan import DEFAULT_STAGE_LINES, NO_STAGING, Plan, TablePlan
from iptsync.engine.progress import Progress
from iptsync.kernel.port import Backend, NetfilterError, NetfilterPort, RestoreError

log = logging.getLogger(__name__)


# Measured at 1,000 services x 10 endpoints (44k lines, first sync): nft took 5.6 s in one
# --noflush batch and 1.5 s staged; legacy took 0.35 s in one batch and 1.1 s staged, because
# legacy rewrites the whole table for every batch. So only nft stages.
STAGE_LINES = {Backend.NFT: DEFAULT_STAGE_LINES, Backend.LEGACY: NO_STAGING}
# Full syncs that take one batch (legacy) stream it to iptables-restore while the engine still
# renders: at 10,000 services, rendering overlaps the restore instead of preceding it.
STREAM_FULL = {Backend.NFT: False, Backend.LEGACY: True}


class SyncError(RuntimeError):
    """A sync that could not be applied. The previous rules are still in place, except in
    the tables named in ``undo_failed``, which keep what the failed batch committed."""

    def __init__(self, message: str, undo_failed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.undo_failed = undo_failed


def apply_plan(netfilter: NetfilterPort, plan: Plan, progress: Progress | None = None) -> None:
    """Apply ``plan``: staged new chains first, then one atomic batch; undo on failure.

    A failure while staging changes no traffic (nothing references the new chains yet); the
    chains loaded so far are removed again. ``progress`` is told how many of the plan's
    chains each stage has filled.
    """
    if plan.empty:
        return
    total, filled = sum(len(t.written) for t in plan.tables), 0
    for stage in plan.stages():
        try:
            netfilter.restore(stage)
        except RestoreError as err:
            discard_staged(netfilter, plan, ())
            detail = f"\n{err.context}" if err.context else ""
            raise SyncError(f"iptables-restore failed while loading new chains (no traffic "
                            f"affected): {err}{detail}") from err
        if progress is not None:
            # A stage holds whole chains: the ones its rules fill.
            filled += len({line.split(" ", 2)[1] for line in stage if line.startswith("-A ")})
            progress.report("sync in progress: %d of %d chains written", filled, total)
    try:
        netfilter.restore(plan.payload_lines())
    except RestoreError as err:
        raise failed_restore(netfilter, plan, err) from err


def failed_restore(netfilter: NetfilterPort, plan: Plan, err: RestoreError) -> SyncError:
    """Undo the tables of ``plan`` that were committed before the failing line.

    The last committed table is undone first, so the kernel passes back through the states
    the batch took it through (nat and filter rules never jump to each other, but traffic
    sees both: undoing in reverse keeps every intermediate state one that the batch itself
    already showed). Each table's undo is one atomic batch: it either puts the whole table
    back or changes nothing, and then the table keeps the failed batch's changes until the
    next sync, which is a full one.

    When the error names no line (iptables-restore killed, or a message without one), the
    tables are read back to tell which committed (:meth:`TablePlan.committed_in`): undoing a
    table that never committed would fail, or put back a rule that was never removed. A
    table whose state cannot be told is left as it is and reported like a failed undo.
    """
    failed: list[str] = []
    if err.line is not None:
        committed = plan.committed_before(err.line)
    else:
        committed, unknown = committed_in_kernel(netfilter, plan)
        for table in unknown:
            failed.append(table.table)
            log.error("UNDO FAILED for table %s after a failed restore whose error names no "
                      "line: cannot tell whether the %s table committed, so it is left as it "
                      "is, maybe with the failed batch's changes (%s), until the next sync, "
                      "which is a full one", table.table, table.table, table.summary())
    undone: list[str] = []
    for table in reversed(committed):
        try:
            netfilter.restore(table.undo_lines())
            undone.append(table.table)
        except NetfilterError as undo_err:
            failed.append(table.table)
            created = ", ".join(table.created[:10]) + (", ..." if len(table.created) > 10
                                                       else "")
            log.error("UNDO FAILED for table %s after a failed restore: %s. The %s table keeps "
                      "the failed batch's changes (%s%s) next to the previous rules of the "
                      "other tables until the next sync, which is a full one", table.table,
                      undo_err, table.table, table.summary(),
                      f"; new chains: {created}" if created else "")
    discard_staged(netfilter, plan, [t.table for t in committed])
    detail = f"\n{err.context}" if err.context else ""
    undo = f"; UNDO FAILED for {', '.join(failed)} (kept the batch's changes)" if failed else ""
    return SyncError(f"iptables-restore failed: {err}; tables undone: "
                     f"{', '.join(undone) or 'none'}{undo}{detail}", tuple(failed))


def committed_in_kernel(netfilter: NetfilterPort,
                        plan: Plan) -> tuple[list[TablePlan], list[TablePlan]]:
    """The tables of ``plan`` the kernel shows committed, and those it cannot tell about."""
    try:
        live = netfilter.save([t.table for t in plan.tables])
    except NetfilterError as read_err:
        log.error("cannot read the tables back after a failed restore: %s", read_err)
        return [], list(plan.tables)
    states = {t.table: t.committed_in(live[t.table], staged=plan.staged) for t in plan.tables}
    return ([t for t in plan.tables if states[t.table]],
            [t for t in plan.tables if states[t.table] is None])


def discard_staged(netfilter: NetfilterPort, plan: Plan, committed: list[str] | tuple[()]) -> None:
    """Remove the staged new chains of the tables that never committed (no traffic reaches
    them); a chain left behind is only logged: the next full sync reuses or deletes it."""
    for batch in plan.discards(committed):
        try:
            netfilter.restore(batch)
        except NetfilterError as discard_err:
            log.warning("could not remove new chains loaded for the failed sync (no traffic "
                        "reaches them; the next full sync reuses or deletes them): %s",
                        discard_err)
