"""A batch that fails after one table committed leaves the kernel exactly as it was.

iptables-restore commits table by table: when the later table of a batch is rejected, the
earlier one has already changed the kernel and must be undone. Each example starts from a
previous sync of several services next to foreign rules, makes one kind of change, and has a
foreign program make the later table fail for real (a chain the batch jumps to disappears, or a
chain the batch deletes gets a foreign jump), so the kernel itself rejects the line. The
``iptables-save`` text of both tables right before the batch and after the failed sync must be
identical (counters and header comments aside). Each runs on the fake kernel and on the real
one on both backends (the ``kernel`` fixture): the fake rejects those lines as the kernel does.
The fake's own failure injection (:meth:`iptsync.testing.FakeNetfilter.fail_restore`) then
fails each table of each path in turn, without a foreign program.

Paths: ``planned`` (a full sync in one batch, filter then nat), ``staged`` (the same, new chains
loaded in batches first: the nft default), ``streamed`` (nat streamed while rendering, then
filter: the legacy default) and ``partial`` (only what changed, filter then nat). Conventions as
in test_incremental: node ``node1``, pods in 10.0.0.0/14, services ``s0``..``s4``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest
from agent.test_loop import ScriptedSource
from foreign import FOREIGN

from engine.world import SETTINGS, World, assert_holds_full_sync, endpoint_slice, service
from iptsync.agent.loop import Agent, Timing
from iptsync.core import names
from iptsync.core.plan import DEFAULT_STAGE_LINES, NO_STAGING, cleanup_plan
from iptsync.core.ruleset import SavedTable
from iptsync.engine.apply import SyncError, apply_plan
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.port import OWNED_TABLES, Backend, RestoreError, RuleStream
from iptsync.testing import FakeClock, FakeNetfilter

Kernel = Netfilter | FakeNetfilter


def snapshot(netfilter: Kernel | Racing) -> str:
    """Both tables as iptables-save prints them, without header comments and counters."""
    text = "".join(netfilter.save_text(table) for table in OWNED_TABLES)
    return re.sub(r"\[\d+:\d+\]", "[0:0]",
                  "".join(line for line in text.splitlines(keepends=True)
                          if not line.startswith("#")))


Race = Callable[["Kernel | Racing"], object]


class Racing:
    """A kernel where a foreign program changes the rules right after iptsync read them
    (``race``, once; the state at that moment is kept in ``before``) and, optionally, between
    a rejected batch and iptsync's undo (``after_failure``, once)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.race: Race | None = None
        self.after_failure: Race | None = None
        self.before = ""

    @property
    def backend(self) -> Backend:
        return self.kernel.backend

    def save(self, tables: Iterable[str] = OWNED_TABLES) -> dict[str, SavedTable]:
        saved = self.kernel.save(tables)
        if self.race is not None:
            race, self.race = self.race, None
            race(self.kernel)
            self.before = snapshot(self.kernel)
        return saved

    def restore(self, payload: str | Sequence[str], *, noflush: bool = True) -> None:
        try:
            self.kernel.restore(payload, noflush=noflush)
        except RestoreError:
            if self.after_failure is not None:
                action, self.after_failure = self.after_failure, None
                action(self.kernel)
            raise

    def restore_stream(self, *, noflush: bool = True) -> RuleStream:
        return self.kernel.restore_stream(noflush=noflush)

    def chain_exists(self, table: str, chain: str) -> bool:
        return self.kernel.chain_exists(table, chain)

    def run(self, *args: str) -> str:
        return self.kernel.run(*args)

    def save_text(self, table: str) -> str:
        return self.kernel.save_text(table)


def cluster(world: World, engine: Engine) -> None:
    """Four services: NodePort and LoadBalancer, one Local with no endpoints (filter rules)."""
    for index in range(4):
        world.apply(engine, service(index, "LoadBalancer" if index % 2 else "NodePort",
                                    index == 3, 2))
        endpoints = [] if index == 3 else [(0, True, True), (1, True, False)]
        world.apply(engine, endpoint_slice(index, endpoints))


def synced_cluster(netfilter: Kernel | Racing, *,
                   stream_full: bool | None = None,
                   stage_lines: int = DEFAULT_STAGE_LINES) -> tuple[World, Engine]:
    """:func:`cluster` next to the FOREIGN rules, synced once by an engine with those options."""
    netfilter.restore(FOREIGN)
    world = World()
    engine = Engine(netfilter, SETTINGS, stream_full=stream_full, stage_lines=stage_lines)
    cluster(world, engine)
    engine.sync()
    return world, engine


def remove_jumps(netfilter: Kernel | Racing, table: str, target: str) -> None:
    """A foreign program deletes every rule in a built-in chain that jumps to ``target``."""
    saved = netfilter.save([table])[table]
    netfilter.restore([f"*{table}",
                       *(f"-D {chain} {rule}" for chain, rules in saved.chains.items()
                         if not names.is_owned_chain(table, chain)
                         for rule in rules if rule.endswith(f"-j {target}")),
                       "COMMIT"])


def vanish(table: str, chain: str) -> tuple[Race, Race]:
    """Make the later table fail: before the sync the jumps to ``chain`` go (so the batch
    inserts them again), after iptsync read the kernel ``chain`` itself goes (so the kernel
    rejects the jump: there is nothing to jump to)."""
    def before(netfilter: Kernel | Racing) -> None:
        remove_jumps(netfilter, table, chain)

    def after(netfilter: Kernel | Racing) -> None:
        netfilter.run("-t", table, "-F", chain)
        netfilter.run("-t", table, "-X", chain)
    return before, after


# What the cluster or a foreign program changes before the failing sync.
Change = Callable[[World, Engine, "Kernel | Racing"], None]


def filter_chains_removed(world: World, engine: Engine, netfilter: Kernel | Racing) -> None:
    """Someone removed our filter chains and the jumps to them: all recreated, jumps inserted."""
    [filter_plan] = [t for t in cleanup_plan(netfilter.save()).tables if t.table == "filter"]
    netfilter.restore(filter_plan.lines())


def filter_jumps_removed(world: World, engine: Engine, netfilter: Kernel | Racing) -> None:
    """Someone removed our jumps from filter's built-in chains: inserted again."""
    for target in (names.KUBE_SERVICES, names.KUBE_EXTERNAL_SERVICES, names.KUBE_NODEPORTS):
        remove_jumps(netfilter, "filter", target)


def endpoints_lost(world: World, engine: Engine, netfilter: Kernel | Racing) -> None:
    """s0 loses its endpoints: filter chains rewritten (REJECT), nat chains rewritten, SEPs
    deleted."""
    world.apply(engine, endpoint_slice(0, []))


def endpoints_found(world: World, engine: Engine, netfilter: Kernel | Racing) -> None:
    """s3 gets endpoints: its filter REJECT rules go, nat chains are created."""
    world.apply(engine, endpoint_slice(3, [(2, True, True)]))


def service_added(world: World, engine: Engine, netfilter: Kernel | Racing) -> None:
    """A new service s4: new nat chains, top-level chains rewritten."""
    world.apply(engine, service(4, "LoadBalancer", False, 2))
    world.apply(engine, endpoint_slice(4, [(0, True, True), (1, True, False), (2, True, False)]))


def endpoint_added(world: World, engine: Engine, netfilter: Kernel | Racing) -> None:
    """s1 gets a third endpoint: its SVC chains rewritten, a SEP chain created."""
    world.apply(engine, endpoint_slice(1, [(0, True, True), (1, True, False), (2, False, True),
                                           (3, True, True)]))


def service_deleted(world: World, engine: Engine, netfilter: Kernel | Racing) -> None:
    """s1 is deleted: its nat chains deleted, top-level chains rewritten."""
    world.apply(engine, ("Service", 1))
    world.apply(engine, ("EndpointSlice", 1))


def nat_jumps_removed(world: World, engine: Engine, netfilter: Kernel | Racing) -> None:
    """Someone removed our jumps from nat's built-in chains: inserted again."""
    remove_jumps(netfilter, "nat", names.KUBE_SERVICES)


FILTER_CHANGES = [filter_chains_removed, filter_jumps_removed, endpoints_lost, endpoints_found]
NAT_CHANGES = [service_added, endpoint_added, service_deleted, nat_jumps_removed,
               endpoints_lost, endpoints_found]


def fail_and_compare(kernel: Kernel, change: Change, later: tuple[str, str],
                     undone: str, *, stream_full: bool, stage_lines: int = NO_STAGING) -> None:
    """Sync a cluster, make ``change``, have the ``later`` (table, chain) vanish mid-sync:
    the failed full sync leaves the kernel as it was; the next sync converges."""
    racing = Racing(kernel)
    world, engine = synced_cluster(racing, stream_full=stream_full, stage_lines=stage_lines)
    change(world, engine, racing)
    before, after = vanish(*later)
    before(racing)
    racing.race = after
    with pytest.raises(SyncError) as failure:
        engine.sync(full=True)
    assert racing.before == snapshot(racing), str(failure.value)
    assert f"tables undone: {undone}" in str(failure.value)
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), racing)


NAT_FAILS = (("nat", names.KUBE_POSTROUTING), "filter")
FILTER_FAILS = (("filter", names.KUBE_FORWARD), "nat")


@pytest.mark.parametrize("change", FILTER_CHANGES, ids=lambda c: c.__name__)
def test_planned_full_sync_undoes_filter_when_nat_fails(kernel: Kernel,
                                                         change: Change) -> None:
    """A full sync in one batch whose nat part the kernel rejects leaves filter as it was."""
    fail_and_compare(kernel, change, *NAT_FAILS, stream_full=False)


@pytest.mark.parametrize("change", FILTER_CHANGES, ids=lambda c: c.__name__)
def test_staged_full_sync_undoes_filter_and_the_staged_chains_when_nat_fails(
        kernel: Kernel, change: Change) -> None:
    """A staged full sync whose final nat part the kernel rejects leaves no staged chain and
    filter as it was."""
    fail_and_compare(kernel, change, *NAT_FAILS, stream_full=False, stage_lines=1)


@pytest.mark.parametrize("change", NAT_CHANGES, ids=lambda c: c.__name__)
def test_streamed_full_sync_undoes_nat_when_filter_fails(kernel: Kernel,
                                                         change: Change) -> None:
    """A streamed full sync whose filter part the kernel rejects leaves nat as it was."""
    fail_and_compare(kernel, change, *FILTER_FAILS, stream_full=True)


PARTIAL_CHANGES = [endpoints_lost, endpoints_found, service_added, endpoint_added]


@pytest.mark.parametrize("change", PARTIAL_CHANGES, ids=lambda c: c.__name__)
def test_partial_sync_undoes_filter_when_nat_fails(kernel: Kernel,
                                                   change: Change) -> None:
    """A partial sync whose nat part the kernel rejects (a foreign rule jumps to a chain it
    deletes) leaves filter's inserted and deleted rules as they were, in their places."""
    kernel.restore(FOREIGN)
    world = World()
    engine = Engine(kernel, SETTINGS)
    cluster(world, engine)
    world.apply(engine, endpoint_slice(4, []))  # a second REJECT in filter, before s3's
    world.apply(engine, service(4, "NodePort", False, 1))
    engine.sync()
    change(world, engine, kernel)
    endpoints_lost(world, engine, kernel)  # filter always changes
    world.apply(engine, ("Service", 2))
    kernel.run("-t", "nat", "-A", "MY-NAT", "-j", names.svc_chain("default/s2:p0", "tcp"))
    before = snapshot(kernel)
    with pytest.raises(SyncError) as failure:
        engine.sync()
    assert before == snapshot(kernel), str(failure.value)
    assert "tables undone: filter" in str(failure.value)


def test_failed_cleanup_puts_back_filter_chains_and_foreign_jumps_in_place(
        kernel: Kernel) -> None:
    """A cleanup whose nat part the kernel rejects recreates the filter chains it deleted
    with their rules, and puts every jump it removed back at its place among foreign rules."""
    racing = Racing(kernel)
    synced_cluster(racing)
    racing.race = lambda nf: nf.run("-t", "nat", "-A", "MY-NAT", "-j",
                                    names.svc_chain("default/s1:p0", "tcp"))
    plan = cleanup_plan(racing.save())
    [filter_plan, _nat] = plan.tables
    assert (["filter", "nat"], True) == ([t.table for t in plan.tables], bool(filter_plan.deleted))
    with pytest.raises(SyncError) as failure:
        apply_plan(racing, plan)
    assert racing.before == snapshot(racing), str(failure.value)
    assert "tables undone: filter" in str(failure.value)


def undo_will_fail(kernel: Kernel) -> tuple[Racing, World, Engine]:
    """A synced cluster whose next full sync fails in nat after filter committed new chains,
    and whose undo of filter then fails: a foreign rule jumps to one of those new chains."""
    racing = Racing(kernel)
    world, engine = synced_cluster(racing, stream_full=False)
    filter_chains_removed(world, engine, racing)
    before, after = vanish(*NAT_FAILS[0])
    before(racing)
    racing.race = after
    racing.after_failure = lambda nf: nf.run("-A", "MY-FIREWALL", "-j", names.KUBE_FORWARD)
    return racing, world, engine


def test_failed_undo_is_reported_and_the_next_sync_is_full(
        kernel: Kernel, caplog: pytest.LogCaptureFixture) -> None:
    """When the undo itself is rejected, the error says so and what the table keeps, and
    the next sync is full."""
    racing, world, engine = undo_will_fail(kernel)
    with pytest.raises(SyncError) as failure:
        engine.sync(full=True)
    assert ("filter",) == failure.value.undo_failed
    assert "tables undone: none; UNDO FAILED for filter" in str(failure.value)
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "UNDO FAILED for table filter" in record.getMessage()
    assert ("filter: 6 chains written (6 new), 0 deleted, 9 jumps, 11 rules; new chains: "
            "KUBE-NODEPORTS, KUBE-SERVICES") in record.getMessage()
    assert engine.needs_full
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), racing)


def test_agent_counts_a_failed_undo_and_says_what_the_table_keeps(
        kernel: Kernel, caplog: pytest.LogCaptureFixture) -> None:
    """The agent's log does not claim the previous rules are in place after a failed undo;
    iptsync_undo_failures_total counts it, and the retry converges."""
    racing, world, engine = undo_will_fail(kernel)
    objects = list(world.objects.values())
    source = ScriptedSource(objects)
    agent = Agent(engine, [source], timing=Timing(min_sync_period=0.05, sync_period=60,
                                                  canary_interval=60), clock=FakeClock())
    agent.run(iterations=1)
    assert 1 == agent.metrics.registry.get_sample_value("iptsync_undo_failures_total",
                                                         {"table": "filter",
                                                          "ip_family": "IPv4"})
    [message] = [r.getMessage() for r in caplog.records if r.name == "iptsync.agent.loop"
                 and r.levelname == "ERROR"]
    assert message.startswith("full sync failed, the filter table keeps part of the failed "
                              "batch; retrying in full")
    agent.run(iterations=3)
    assert not agent.reports[-1].plan.empty
    assert_holds_full_sync(objects, racing)


@dataclass
class DiesAfterCommits(Netfilter):
    """The real netfilter, except that the next batch of several tables commits only its
    first ``commits`` tables and then fails with an error that names no line (as when
    iptables-restore is killed)."""

    commits: int | None = None

    def restore(self, payload: str | Sequence[str], *, noflush: bool = True) -> None:
        lines = payload.splitlines() if isinstance(payload, str) else list(payload)
        ends = [index for index, line in enumerate(lines) if line == "COMMIT"]
        if self.commits is None or len(ends) < 2:
            super().restore(lines, noflush=noflush)
            return
        commits, self.commits = self.commits, None
        if commits:
            super().restore(lines[:ends[commits - 1] + 1], noflush=noflush)
        raise RestoreError("iptables-restore: killed by signal 9", None, "")


UNDONE = {0: "none", 1: "filter", 2: "nat, filter"}


@pytest.mark.parametrize("commits", [0, 1, 2])
def test_full_sync_failing_without_a_line_undoes_only_the_committed_tables(
        netfilter: Netfilter, commits: int) -> None:
    """A batch (filter then nat, both inserting jumps) that fails with no line named after
    committing 0, 1 or 2 tables: only the committed ones are undone, the kernel is as before
    (undoing a table that never committed used to fail on its jumps)."""
    dying = DiesAfterCommits(netfilter.backend, netfilter.netns)
    world, engine = synced_cluster(dying, stream_full=False)
    filter_jumps_removed(world, engine, dying)
    nat_jumps_removed(world, engine, dying)
    before = snapshot(dying)
    dying.commits = commits
    with pytest.raises(SyncError) as failure:
        engine.sync(full=True)
    assert before == snapshot(dying), str(failure.value)
    assert f"tables undone: {UNDONE[commits]}\n" in f"{failure.value}\n"
    assert () == failure.value.undo_failed
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), dying)


@pytest.mark.parametrize("commits", [0, 1, 2])
def test_partial_sync_failing_without_a_line_undoes_only_the_committed_tables(
        netfilter: Netfilter, commits: int) -> None:
    """A partial sync (filter: a REJECT deleted; nat: chains created, rules inserted) that
    fails with no line named after committing 0, 1 or 2 tables leaves the kernel as before:
    no REJECT put back twice, no undo of a rule never inserted."""
    dying = DiesAfterCommits(netfilter.backend, netfilter.netns)
    world, engine = synced_cluster(dying)
    endpoints_found(world, engine, dying)
    before = snapshot(dying)
    dying.commits = commits
    with pytest.raises(SyncError) as failure:
        engine.sync()
    assert before == snapshot(dying), str(failure.value)
    assert f"tables undone: {UNDONE[commits]}\n" in f"{failure.value}\n"
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), dying)


# --- the fake kernel's failure injection: every table of every path --------------------------

FIRST_COMMITTED = {"planned": "filter", "streamed": "nat", "partial": "filter"}


@pytest.mark.parametrize("table", ["filter", "nat"])
@pytest.mark.parametrize("path", ["planned", "streamed", "partial"])
def test_batch_rejected_in_any_table_leaves_both_tables_as_they_were(path: str,
                                                                      table: str) -> None:
    """Whichever table of a batch the kernel rejects, on every path, both tables end as they
    were: a table committed before the failing one is undone, and the next sync converges."""
    kernel = FakeNetfilter()
    world, engine = synced_cluster(kernel, stream_full=path == "streamed")
    endpoints_lost(world, engine, kernel)  # both tables change
    endpoints_found(world, engine, kernel)
    before = snapshot(kernel)
    kernel.fail_restore(table=table)
    with pytest.raises(SyncError) as failure:
        engine.sync(full=path != "partial")
    assert before == snapshot(kernel), str(failure.value)
    undone = FIRST_COMMITTED[path] if table != FIRST_COMMITTED[path] else "none"
    assert f"tables undone: {undone}" in str(failure.value)
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), kernel)


def test_rejected_line_is_named_and_quoted_in_the_error() -> None:
    """A batch rejected at line N fails the sync with an error that names line N and quotes
    the payload around it, the failing line marked."""
    kernel = FakeNetfilter()
    world = World()
    engine = Engine(kernel, SETTINGS)
    cluster(world, engine)
    kernel.fail_restore(line=3)
    with pytest.raises(SyncError) as failure:
        engine.sync()
    message = str(failure.value)
    assert "line 3 failed" in message
    [batch] = kernel.batches  # nothing was committed, so nothing was undone
    assert f">     3  {batch[2]}" in message
    assert f"      4  {batch[3]}" in message


def test_rejected_stage_removes_the_chains_staged_so_far() -> None:
    """A first sync staged in batches whose nat stage the kernel rejects changes nothing: the
    filter chains staged before it are removed again, and the error says no traffic was
    affected."""
    kernel = FakeNetfilter()
    kernel.restore(FOREIGN)
    before = snapshot(kernel)
    world = World()
    engine = Engine(kernel, SETTINGS, stream_full=False, stage_lines=1)
    cluster(world, engine)
    kernel.fail_restore(table="nat")
    with pytest.raises(SyncError, match="while loading new chains \\(no traffic affected\\)"):
        engine.sync()
    assert before == snapshot(kernel)
    assert engine.sync().full
    assert_holds_full_sync(list(world.objects.values()), kernel)
