"""The fake kernel agrees with the real one on what the engine relies on.

Each test runs the same restore payloads and commands against :class:`iptsync.testing.
FakeNetfilter` and against the real kernel on both backends (the ``kernel`` fixture), and
checks one literal expectation: what is accepted, which line is rejected, what each table
holds afterwards, and how iptables-save spells the rules. Where the backends themselves differ
(nft reports a jump to a missing chain at the table's COMMIT, legacy at the rule) the test
accepts either.
"""

from __future__ import annotations

import pytest

from iptsync.core.ruleset import SavedTable
from iptsync.kernel.port import NetfilterError, NetfilterPort, RestoreError

EMPTY = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
         "COMMIT", "*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]",
         ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]", "COMMIT"]


def chains(kernel: NetfilterPort, table: str) -> dict[str, list[str]]:
    """The table's chains (built-in ones only when they hold rules)."""
    saved: SavedTable = kernel.save([table])[table]
    return {chain: rules for chain, rules in saved.chains.items()
            if rules or chain not in ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING")}


def rejected_line(kernel: NetfilterPort, payload: list[str]) -> int | None:
    """Restore ``payload``; the line the kernel rejected (quoted in the error's context when
    the payload has it), or None when it was accepted."""
    failure: RestoreError | None = None
    try:
        kernel.restore(payload)
    except RestoreError as err:
        failure = err
    if failure is None:
        return None
    assert failure.line is not None, str(failure)
    if failure.line <= len(payload):
        assert f">{failure.line:6d}  {payload[failure.line - 1]}" in failure.context
    return failure.line


@pytest.fixture
def empty(kernel: NetfilterPort) -> NetfilterPort:
    kernel.restore(EMPTY, noflush=False)
    return kernel


def test_declaring_a_chain_flushes_it_or_creates_it(empty: NetfilterPort) -> None:
    """With --noflush, ``:A`` empties an existing chain A and creates a new chain B; a
    built-in chain's declaration leaves its rules alone."""
    empty.restore(["*filter", ":A - [0:0]", "-A A -j ACCEPT", "-A INPUT -j A", "COMMIT"])
    empty.restore(["*filter", ":INPUT ACCEPT [0:0]", ":A - [0:0]", ":B - [0:0]",
                   "-A B -j DROP", "COMMIT"])
    assert {"INPUT": ["-j A"], "A": [], "B": ["-j DROP"]} == chains(empty, "filter")


def test_jump_to_a_missing_chain_is_rejected_and_its_table_not_committed(
        empty: NetfilterPort) -> None:
    """A rule jumping to a chain that does not exist is rejected (at that rule, or at its
    table's COMMIT on nft), and nothing of that table is committed."""
    line = rejected_line(empty, ["*filter", ":A - [0:0]", "-A A -j MISSING", "COMMIT"])
    assert line in (3, 4)
    assert {} == chains(empty, "filter")


def test_rule_in_an_undeclared_chain_is_rejected(empty: NetfilterPort) -> None:
    """A rule for a chain that was never declared is rejected at its line."""
    assert 2 == rejected_line(empty, ["*filter", "-A UNDECLARED -j ACCEPT", "COMMIT"])


def test_tables_commit_one_at_a_time(empty: NetfilterPort) -> None:
    """When the second table of a batch is rejected, the first stays committed."""
    line = rejected_line(empty, ["*filter", ":A - [0:0]", "-A A -j ACCEPT", "COMMIT",
                                 "*nat", ":N - [0:0]", "-A N -j MISSING", "COMMIT"])
    assert line in (7, 8)
    assert ({"A": ["-j ACCEPT"]}, {}) == (chains(empty, "filter"), chains(empty, "nat"))


def test_batch_without_commit_changes_nothing(empty: NetfilterPort) -> None:
    """A table block that never reaches COMMIT is rejected and changes nothing."""
    assert 3 == rejected_line(empty, ["*filter", ":A - [0:0]"])
    assert {} == chains(empty, "filter")


@pytest.mark.parametrize("setup", [
    ["-A A -j ACCEPT"],
    ["-A INPUT -j A"],
], ids=["holding-rules", "referenced"])
def test_deleting_a_chain_in_use_is_rejected(empty: NetfilterPort, setup: list[str]) -> None:
    """``-X`` of a chain that holds rules, or that a rule jumps to, is rejected at its line."""
    empty.restore(["*filter", ":A - [0:0]", *setup, "COMMIT"])
    assert 2 == rejected_line(empty, ["*filter", "-X A", "COMMIT"])
    assert "A" in chains(empty, "filter")


def test_flushed_unreferenced_chain_can_be_deleted(empty: NetfilterPort) -> None:
    """Declaring a chain (which flushes it) and deleting it in one batch works once nothing
    jumps to it any more."""
    empty.restore(["*filter", ":A - [0:0]", "-A A -j ACCEPT", "-A INPUT -j A", "COMMIT"])
    assert None is rejected_line(empty, ["*filter", ":A - [0:0]", "-D INPUT -j A", "-X A",
                                         "COMMIT"])
    assert {} == chains(empty, "filter")


def test_rules_are_inserted_and_deleted_by_position_and_by_spec(empty: NetfilterPort) -> None:
    """``-I CHAIN N`` inserts before the Nth rule and refuses a position past the end; ``-D``
    by spec finds the rule whatever spelling it was added with, and refuses a rule the chain
    does not hold."""
    empty.restore(["*filter", ":A - [0:0]", "-A A -s 10.0.0.1 -j ACCEPT",
                   "-A A -s 10.0.0.3 -j ACCEPT", "-I A 2 -s 10.0.0.2 -j ACCEPT",
                   "-I A -p tcp --dport 80 -j DROP", "COMMIT"])
    assert 2 == rejected_line(empty, ["*filter", "-I A 9 -j ACCEPT", "COMMIT"])
    assert 2 == rejected_line(empty, ["*filter", "-D A -s 10.9.9.9/32 -j ACCEPT", "COMMIT"])
    empty.restore(["*filter", "-D A -p tcp -m tcp --dport 80 -j DROP",
                   "-D A -s 10.0.0.3/32 -j ACCEPT", "COMMIT"])
    assert {"A": ["-s 10.0.0.1/32 -j ACCEPT", "-s 10.0.0.2/32 -j ACCEPT"]} == chains(
        empty, "filter")


def test_restore_without_noflush_replaces_the_tables_it_names(empty: NetfilterPort) -> None:
    """Without --noflush every table of the batch is emptied first (its chains deleted);
    tables it does not name stay."""
    empty.restore(["*filter", ":A - [0:0]", "-A INPUT -j A", "COMMIT",
                   "*nat", ":N - [0:0]", "COMMIT"])
    empty.restore(["*filter", ":B - [0:0]", "COMMIT"], noflush=False)
    assert ({"B": []}, {"N": []}) == (chains(empty, "filter"), chains(empty, "nat"))


def test_saved_rules_are_spelled_as_the_kernel_prints_them(empty: NetfilterPort) -> None:
    """kube-proxy's spellings come back as iptables-save prints them: addresses with a
    prefix, the protocol's match made explicit, probabilities rounded, marks as set-xmark,
    comments quoted, REJECT's default reply."""
    empty.restore([
        "*nat", ":KUBE-MARK-MASQ - [0:0]", ":S - [0:0]",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        '-A S -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 '
        "--dport 80 -j KUBE-MARK-MASQ",
        "-A S -m statistic --mode random --probability 0.3333333333 -j KUBE-MARK-MASQ",
        "-A S -p tcp -m tcp -j DNAT --to-destination 10.0.0.1:8080", "COMMIT",
        "*filter", ":F - [0:0]", "-A F -d 10.96.0.11/32 -p tcp -m tcp --dport 80 -j REJECT",
        "COMMIT"])
    assert {
        "KUBE-MARK-MASQ": ["-j MARK --set-xmark 0x4000/0x4000"],
        "S": ['-d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" '
              "-m tcp --dport 80 -j KUBE-MARK-MASQ",
              "-m statistic --mode random --probability 0.33333333349 -j KUBE-MARK-MASQ",
              "-p tcp -m tcp -j DNAT --to-destination 10.0.0.1:8080"],
    } == chains(empty, "nat")
    assert {"F": ["-d 10.96.0.11/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with "
                  "icmp-port-unreachable"]} == chains(empty, "filter")


def test_commands_list_delete_and_flush_like_iptables(empty: NetfilterPort) -> None:
    """``-S CHAIN`` lists a chain as the engine reads it; ``-D CHAIN N``, ``-F`` and ``-X``
    act at once; a missing chain is an error, and ``chain_exists`` says so."""
    empty.restore(["*nat", ":A - [0:0]", "-A A -s 10.0.0.1 -j RETURN",
                   "-A A -s 10.0.0.2 -j RETURN", "-A PREROUTING -j A", "COMMIT"])
    assert ("-N A\n-A A -s 10.0.0.1/32 -j RETURN\n-A A -s 10.0.0.2/32 -j RETURN\n"
            == empty.run("-t", "nat", "-S", "A"))
    empty.run("-t", "nat", "-D", "A", "1")
    assert ["-s 10.0.0.2/32 -j RETURN"] == chains(empty, "nat")["A"]
    empty.run("-t", "nat", "-F")
    empty.run("-t", "nat", "-X")
    assert ({}, False, True) == (chains(empty, "nat"), empty.chain_exists("nat", "A"),
                                 empty.chain_exists("nat", "PREROUTING"))
    with pytest.raises(NetfilterError):
        empty.run("-t", "nat", "-S", "A")
