"""Round trips through iptsync.core.ruleset: quoting, iptables-save parsing and canonical forms.

The canonical form is what ``iptables-save`` prints for a rule; desired and live rules are
compared in it. The expected strings below were observed with iptables 1.8.9 on both the nft
and the legacy backend, and the ``netns`` test checks the canonicaliser against the kernel.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from render.golden import (
    FAMILY_SCENARIOS,
    SCENARIO_NAMES,
    SCENARIOS,
    expected_warnings,
    scenario_settings,
)

from iptsync.core.model import IPFamily
from iptsync.core.plan import ChainContent, DesiredTables
from iptsync.core.policy import Settings
from iptsync.core.ruleset import (
    Jump,
    Rule,
    RulesetError,
    SavedTable,
    canonical,
    join_args,
    parse_save,
    quote,
    split_args,
)
from iptsync.core.state import ClusterState
from iptsync.engine.desired import Desired, desired_from_objects
from iptsync.sources.files import load_objects

SETTINGS = Settings(
    node_name="node1",
    cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
    node_ips=(ipaddress.ip_address("10.100.0.2"),),
)
BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
Chains = dict[str, dict[str, list[str]]]


def render_scenario(name: str) -> Desired:
    """The desired ruleset of a golden scenario under the suite's settings."""
    loaded = load_objects([SCENARIOS / f"{name}.yaml"])
    desired = desired_from_objects(loaded.objects, SETTINGS)
    assert expected_warnings(name) == [str(p) for p in loaded.problems + desired.problems]
    return desired


def render_family(name: str, family: IPFamily) -> Desired:
    """A golden scenario's desired ruleset for ``family`` (IPv6: with its golden settings)."""
    if family is IPFamily.IPV4:
        return render_scenario(name)
    loaded = load_objects([SCENARIOS / f"{name}.yaml"])
    return desired_from_objects(loaded.objects, scenario_settings(name, family))


def written(rules: dict[tuple[str, str], list[tuple[str, ...]]],
            jumps: list[Jump] | None = None) -> Desired:
    """A desired ruleset written by hand: (table, chain) -> each rule's arguments."""
    tables: dict[str, dict[str, ChainContent]] = {}
    for (table, chain), args in rules.items():
        lines = tuple(f"-A {chain} {join_args(rule)}" for rule in args)
        tables.setdefault(table, {})[chain] = ChainContent(lines)
    return Desired(DesiredTables(tables, jumps or []), ClusterState("node1"), SETTINGS, [])


def expected_chains(desired: Desired) -> Chains:
    """Table -> chain -> canonical rules, without the inserted jumps."""
    return {table: {chain: content.canonical_rules() for chain, content in chains.items()}
            for table, chains in desired.tables.tables.items()}


def expected_jumps(desired: Desired) -> Chains:
    """Table -> built-in chain -> canonical jumps, in the order they must end up."""
    out: Chains = {}
    for jump in desired.tables.jumps:
        out.setdefault(jump.table, {}).setdefault(jump.chain, []).append(jump.rule.canonical)
    return out


def saved_chains(tables: dict[str, SavedTable]) -> Chains:
    """Table -> chain -> rules of parsed iptables-save output."""
    return {name: dict(table.chains) for name, table in tables.items()}


# --- quoting ------------------------------------------------------------------------------

# Any text but NUL, newline and carriage return (refused), plus text dense in the characters
# quoting cares about.
TOKENS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00\n\r"), max_size=10),
    st.text(' "\\\'\tab-!', max_size=6),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(TOKENS, max_size=8))
def test_split_args_inverts_join_args(tokens: list[str]) -> None:
    """Any tokens (spaces, quotes, backslashes, empty strings) survive join then split."""
    assert tokens == split_args(join_args(tokens))


@pytest.mark.parametrize(("token", "quoted"), [
    ("KUBE-SVC-X", "KUBE-SVC-X"),
    ("ns1/svc1:p80", "ns1/svc1:p80"),
    ("x y", '"x y"'),
    ("", '""'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("tab\there", '"tab\there"'),
])
def test_quote_only_quotes_when_needed(token: str, quoted: str) -> None:
    """Tokens without blanks, quotes or backslashes stay bare; others are quoted and escaped."""
    assert quoted == quote(token)


@pytest.mark.parametrize(("text", "tokens"), [
    ("-A KUBE-SERVICES -j RETURN", ["-A", "KUBE-SERVICES", "-j", "RETURN"]),
    ('-m comment --comment "a b" -j X', ["-m", "comment", "--comment", "a b", "-j", "X"]),
    ('--comment "say \\"hi\\""', ["--comment", 'say "hi"']),
    ('--comment "" -j X', ["--comment", "", "-j", "X"]),
    ("  -j   X  ", ["-j", "X"]),
])
def test_split_args_reads_restore_quoting(text: str, tokens: list[str]) -> None:
    """split_args follows iptables-restore: double quotes group, backslash escapes."""
    assert tokens == split_args(text)


def test_restore_line_spellings() -> None:
    """A rule prints as -A, -I with a position, or -D, with its arguments quoted."""
    rule = Rule("KUBE-X", ("-m", "comment", "--comment", "a b", "-j", "ACCEPT"))
    assert '-A KUBE-X -m comment --comment "a b" -j ACCEPT' == rule.restore_line()
    assert '-I KUBE-X 1 -m comment --comment "a b" -j ACCEPT' == rule.restore_line("-I", 1)
    assert '-D KUBE-X -m comment --comment "a b" -j ACCEPT' == rule.restore_line("-D")
    assert "-A KUBE-EMPTY" == Rule("KUBE-EMPTY", ()).restore_line()


# --- parsing iptables-save ----------------------------------------------------------------

NFT_SAVE = """\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sat Nov 21 23:56:29 2026
*filter
:INPUT ACCEPT [1234:567890]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [12:3456]
:KUBE-FIREWALL - [0:0]
:KUBE-NODEPORTS - [0:0]
[12:345] -A INPUT -j KUBE-FIREWALL
[0:0] -A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
[7:420] -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming \
localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
# Completed on Sat Nov 21 23:56:29 2026
"""

LEGACY_SAVE = """\
# Generated by iptables-legacy-save v1.8.9 on Sat Nov 21 23:56:30 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SEP-ABC - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XYZ - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SEP-ABC -s 10.180.0.3/32 -m comment --comment ns1/svc1:p80 -j KUBE-MARK-MASQ
-A KUBE-SEP-ABC -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT \
--to-destination 10.180.0.3:80
-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" \
-m tcp --dport 80 -j KUBE-SVC-XYZ
-A KUBE-SVC-XYZ -m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" -m statistic \
--mode random --probability 0.50000000000 -j KUBE-SEP-ABC
COMMIT
# Completed on Sat Nov 21 23:56:30 2026
"""


def test_parse_save_reads_tables_chains_policies_and_counters() -> None:
    """Headers and counters are skipped; chains keep their order; policies of built-ins kept."""
    tables = parse_save(NFT_SAVE + LEGACY_SAVE)
    assert ["filter", "nat"] == list(tables)
    flt = tables["filter"]
    assert "filter" == flt.name
    assert {"INPUT": "ACCEPT", "FORWARD": "DROP", "OUTPUT": "ACCEPT"} == flt.policies
    assert ["INPUT", "FORWARD", "OUTPUT", "KUBE-FIREWALL", "KUBE-NODEPORTS"] == list(flt.chains)
    expected_filter = {
        "INPUT": ["-j KUBE-FIREWALL",
                  '-m comment --comment "kubernetes health check service ports" '
                  "-j KUBE-NODEPORTS"],
        "FORWARD": [],
        "OUTPUT": [],
        "KUBE-FIREWALL": ['! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block '
                          'incoming localnet connections" -m conntrack ! --ctstate '
                          "RELATED,ESTABLISHED,DNAT -j DROP"],
        "KUBE-NODEPORTS": [],
    }
    assert expected_filter == flt.chains


def test_parse_save_canonicalises_legacy_rules() -> None:
    """Rules come back canonical: unquoted comments quoted, everything else as saved."""
    nat = parse_save(LEGACY_SAVE)["nat"]
    assert {"PREROUTING": "ACCEPT", "INPUT": "ACCEPT", "OUTPUT": "ACCEPT",
            "POSTROUTING": "ACCEPT"} == nat.policies
    expected = {
        "PREROUTING": ['-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
        "INPUT": [],
        "OUTPUT": [],
        "POSTROUTING": [],
        "KUBE-SEP-ABC": [
            '-s 10.180.0.3/32 -m comment --comment "ns1/svc1:p80" -j KUBE-MARK-MASQ',
            '-p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT '
            "--to-destination 10.180.0.3:80"],
        "KUBE-SERVICES": ['-d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 '
                          'cluster IP" -m tcp --dport 80 -j KUBE-SVC-XYZ'],
        "KUBE-SVC-XYZ": ['-m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" -m statistic '
                         "--mode random --probability 0.50000000000 -j KUBE-SEP-ABC"],
    }
    assert expected == nat.chains


def test_parse_save_of_save_without_counters_or_headers() -> None:
    """A minimal table with a rule-less chain and --append spelling parses."""
    tables = parse_save("*nat\n:KUBE-A - [0:0]\n--append KUBE-B -j RETURN\nCOMMIT\n")
    assert {"nat": {"KUBE-A": [], "KUBE-B": ["-j RETURN"]}} == saved_chains(tables)
    assert {} == tables["nat"].policies


def test_parse_save_of_empty_text_is_empty() -> None:
    """No tables in, no tables out (blank and comment lines only)."""
    assert {} == parse_save("\n# nothing here\n\n")


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("-A INPUT -j ACCEPT\n*filter\nCOMMIT\n", "outside a table", id="before-table"),
    pytest.param("*filter\nCOMMIT\n-A INPUT -j ACCEPT\n", "outside a table", id="after-commit"),
    pytest.param(":INPUT ACCEPT [0:0]\n", "outside a table", id="chain-outside"),
    pytest.param("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n", "has no COMMIT",
                 id="missing-commit"),
    pytest.param("*filter\nCOMMIT\n*nat\n-A X -j RETURN\n", "table nat has no COMMIT",
                 id="second-table-missing-commit"),
    pytest.param("*filter\n-I INPUT 1 -j X\nCOMMIT\n", "expected '-A CHAIN ...'",
                 id="insert-line"),
    pytest.param("*filter\n-A\nCOMMIT\n", "expected '-A CHAIN ...'", id="no-chain"),
])
def test_parse_save_rejects_malformed_text(text: str, message: str) -> None:
    """Rules outside a table, a missing COMMIT and non -A rule lines raise RulesetError."""
    with pytest.raises(RulesetError, match=message):
        parse_save(text)


def test_parse_save_accepts_foreign_fragment_rules() -> None:
    """A rule of another tool matching fragments (-f) does not stop the table from parsing."""
    text = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -f -j DROP\n-A INPUT -j ACCEPT\nCOMMIT\n"
    assert {"filter": {"INPUT": ["-f -j DROP", "-j ACCEPT"]}} == saved_chains(parse_save(text))


# --- rendered rulesets read back ----------------------------------------------------------

def restore_sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """(table, lines) for each ``*table`` ... ``COMMIT`` section of restore input."""
    table, lines = "", list[str]()
    for line in text.splitlines():
        if line.startswith("*"):
            table, lines = line[1:], []
        elif line == "COMMIT":
            yield table, lines
        else:
            lines.append(line)


def inserted_jumps(text: str) -> Chains:
    """Apply every ``-I CHAIN 1 ...`` line of restore input to empty chains, per table."""
    out: Chains = {}
    for table, lines in restore_sections(text):
        for line in lines:
            if line.startswith("-I "):
                _op, chain, position, *args = split_args(line)
                assert "1" == position
                out.setdefault(table, {}).setdefault(chain, []).insert(0, canonical(args))
    return out


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_dump_payload_reads_back_as_canonical_rules(name: str) -> None:
    """A rendered ruleset's -A lines parse back, chain by chain, to the canonical rules."""
    desired = render_scenario(name)
    text = desired.payload()
    appended = "".join(line + "\n" for line in text.splitlines() if not line.startswith("-I "))
    tables = parse_save(appended)
    assert expected_chains(desired) == saved_chains(tables)
    for table, chains in desired.tables.tables.items():
        assert list(chains) == list(tables[table].chains)
        assert {} == tables[table].policies


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_dump_payload_inserts_jumps_in_listed_order(name: str) -> None:
    """The -I lines leave each built-in chain with its jumps in the order listed."""
    desired = render_scenario(name)
    jumps = inserted_jumps(desired.payload())
    assert expected_jumps(desired) == jumps
    for table, chains in jumps.items():
        assert set(chains) <= set(BUILTIN_CHAINS[table])


def test_dump_payload_round_trips_awkward_comments() -> None:
    """Comments with quotes, backslashes and blanks survive the dump payload and parse_save."""
    comments = ['say "hi"', "back\\slash", "tab\tand  spaces", "trailing\\"]
    desired = written(
        {("nat", "KUBE-X"): [("-m", "comment", "--comment", c, "-j", "RETURN") for c in comments]},
        [Jump("nat", "OUTPUT", ("-m", "comment", "--comment", 'q"uote', "-j", "KUBE-X"))])
    text = desired.payload()
    appended = "".join(line + "\n" for line in text.splitlines() if not line.startswith("-I "))
    expected = [f"-m comment --comment {quote(c)} -j RETURN" for c in comments]
    assert {"nat": {"KUBE-X": expected}} == saved_chains(parse_save(appended))
    assert ['-m comment --comment "q\\"uote" -j KUBE-X'] == inserted_jumps(text)["nat"]["OUTPUT"]


def test_dump_payload_orders_tables_and_declares_chains_first() -> None:
    """filter comes before nat, and each table declares its chains before any rule."""
    desired = written({("nat", "KUBE-B"): [("-j", "RETURN")],
                       ("filter", "KUBE-A"): [("-j", "RETURN")], ("mangle", "KUBE-C"): []})
    expected = ("*filter\n:KUBE-A - [0:0]\n-A KUBE-A -j RETURN\nCOMMIT\n"
                "*nat\n:KUBE-B - [0:0]\n-A KUBE-B -j RETURN\nCOMMIT\n"
                "*mangle\n:KUBE-C - [0:0]\nCOMMIT\n")
    assert expected == desired.payload()


# --- canonical forms, as iptables 1.8.9 prints them ---------------------------------------

CANONICAL: list[Any] = [
    pytest.param("-d 172.30.0.41", "-d 172.30.0.41/32", id="host-prefix"),
    pytest.param('-m comment --comment "x y" -m tcp -p tcp -d 10.0.0.1 --dport 80 -j X',
                 '-d 10.0.0.1/32 -p tcp -m comment --comment "x y" -m tcp --dport 80 -j X',
                 id="basics-first"),
    pytest.param("-m comment --comment ns1/svc1:p80 -j X",
                 '-m comment --comment "ns1/svc1:p80" -j X', id="comment-quoted"),
    pytest.param("-j MARK --or-mark 0x4000", "-j MARK --set-xmark 0x4000/0x4000",
                 id="or-mark"),
    pytest.param("-j MARK --xor-mark 0x4000", "-j MARK --set-xmark 0x4000/0x0",
                 id="xor-mark"),
    pytest.param("-m statistic --mode random --probability 0.3333333333 -j X",
                 "-m statistic --mode random --probability 0.33333333349 -j X",
                 id="probability-third"),
    pytest.param("-m statistic --mode random --probability 0.5000000000 -j X",
                 "-m statistic --mode random --probability 0.50000000000 -j X",
                 id="probability-half"),
    pytest.param("-m recent --name S --rcheck --seconds 10800 --reap -j S",
                 "-m recent --rcheck --seconds 10800 --reap --name S --mask 255.255.255.255 "
                 "--rsource -j S", id="recent-rcheck"),
    pytest.param("-m recent --name S --set -m tcp -p tcp -j DNAT --to-destination "
                 "10.180.0.3:80",
                 "-p tcp -m recent --set --name S --mask 255.255.255.255 --rsource -m tcp "
                 "-j DNAT --to-destination 10.180.0.3:80", id="recent-set"),
    pytest.param("-j REJECT", "-j REJECT --reject-with icmp-port-unreachable",
                 id="reject-default"),
    pytest.param("-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate "
                 "RELATED,ESTABLISHED,DNAT -j DROP",
                 "! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate "
                 "RELATED,ESTABLISHED,DNAT -j DROP", id="negations"),
    # Further normalisations, also checked against iptables 1.8.9 (nft and legacy).
    pytest.param("-j MARK --and-mark 0x4000", "-j MARK --set-xmark 0x0/0xffffbfff",
                 id="and-mark"),
    pytest.param("-j MARK --set-mark 0x4000", "-j MARK --set-xmark 0x4000/0xffffffff",
                 id="set-mark"),
    pytest.param("-j MARK --set-mark 0x4000/0xff00", "-j MARK --set-xmark 0x4000/0xff00",
                 id="set-mark-mask"),
    pytest.param("-m mark --mark 0x4000/0xffffffff -j X", "-m mark --mark 0x4000 -j X",
                 id="mark-full-mask"),
    pytest.param("-m conntrack --ctstate ESTABLISHED,RELATED -j X",
                 "-m conntrack --ctstate RELATED,ESTABLISHED -j X", id="ctstate-order"),
    pytest.param("-m statistic --mode random --probability 0.0010000000 -j X",
                 "-m statistic --mode random --probability 0.00100000016 -j X",
                 id="probability-small"),
    pytest.param("-p TCP --dport 80 -j X", "-p tcp -m tcp --dport 80 -j X",
                 id="implicit-protocol-match"),
    pytest.param("-p tcp -m tcp --dport 80 --sport 1000 -j X",
                 "-p tcp -m tcp --sport 1000 --dport 80 -j X", id="port-order"),
    pytest.param("-p tcp -m tcp --destination-port 80 -j X", "-p tcp -m tcp --dport 80 -j X",
                 id="long-port-option"),
    pytest.param("--destination 10.0.0.0/8 --source 10.1.2.3 -j X",
                 "-s 10.1.2.3/32 -d 10.0.0.0/8 -j X", id="long-address-options"),
    pytest.param("--dst 10.0.0.5/8 -j X", "-d 10.0.0.0/8 -j X", id="host-bits-masked"),
    pytest.param("-s 10.1.2.3/255.255.0.0 -j X", "-s 10.1.0.0/16 -j X", id="netmask"),
    pytest.param("-s 255.0.9.250/32 -d 0.0.0.0 -j X", "-s 255.0.9.250/32 -d 0.0.0.0/32 -j X",
                 id="host-address-edges"),
    pytest.param("-s 10.1.2.3/31 -j X", "-s 10.1.2.2/31 -j X", id="near-host-prefix"),
    pytest.param("-d fd00::1 -j X", "-d fd00::1/128 -j X", id="ipv6-host"),
    pytest.param("-o eth1 -i eth0 -s 1.2.3.4 -j X", "-s 1.2.3.4/32 -i eth0 -o eth1 -j X",
                 id="interfaces"),
    pytest.param("-m addrtype --dst-type LOCAL --src-type LOCAL -j X",
                 "-m addrtype --src-type LOCAL --dst-type LOCAL -j X", id="addrtype-order"),
    pytest.param('-m comment --comment "with \\"quote\\" and \\\\ slash" -j X',
                 '-m comment --comment "with \\"quote\\" and \\\\ slash" -j X',
                 id="comment-escapes"),
    pytest.param('-m comment --comment "" -j X', '-m comment --comment "" -j X',
                 id="comment-empty"),
    pytest.param("--goto KUBE-X", "-g KUBE-X", id="goto"),
    pytest.param("--jump ACCEPT", "-j ACCEPT", id="jump"),
    pytest.param('-m comment --comment "only a comment"', '-m comment --comment "only a comment"',
                 id="no-target"),
    pytest.param("", "", id="empty"),
]


@pytest.mark.parametrize(("rule", "saved"), CANONICAL)
def test_canonical_matches_iptables_save(rule: str, saved: str) -> None:
    """canonical() spells a rule exactly as iptables-save prints it."""
    assert saved == canonical(split_args(rule))


@pytest.mark.parametrize("address", ["010.1.2.3", "256.1.2.3", "1.2.3", "1.2.3.4/33"])
def test_canonical_refuses_a_malformed_address(address: str) -> None:
    """An address with a leading zero, out of range or short is refused, never passed through."""
    with pytest.raises(RulesetError, match="bad address"):
        canonical(["-s", address, "-j", "X"])


@pytest.mark.parametrize(("rule", "saved"), CANONICAL)
def test_canonical_of_saved_spelling_is_unchanged(rule: str, saved: str) -> None:
    """The iptables-save spelling is already canonical (a live rule compares as itself)."""
    assert saved == canonical(split_args(saved))


FOREIGN_RULES: list[Any] = [
    pytest.param("-m comment --comment myservice -j X", "-m comment --comment myservice -j X",
                 id="comment-of-safe-characters"),
    pytest.param("-m comment --comment \"a'b\" -j X", "-m comment --comment \"a\\'b\" -j X",
                 id="comment-apostrophe"),
    pytest.param('-m comment --comment "!" -j X', '-m comment --comment "!" -j X',
                 id="comment-bang"),
    pytest.param('-m comment --comment "--foo bar" -j X',
                 '-m comment --comment "--foo bar" -j X', id="comment-dashes"),
    pytest.param('-j LOG --log-prefix "x: "', '-j LOG --log-prefix "x: "',
                 id="option-value-with-blank"),
    pytest.param("-p tcp --syn -j X", "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j X",
                 id="syn"),
    pytest.param("-m state --state ESTABLISHED,RELATED -j X",
                 "-m state --state RELATED,ESTABLISHED -j X", id="state-order"),
]


@pytest.mark.parametrize(("rule", "saved"), FOREIGN_RULES)
def test_canonical_matches_iptables_save_for_foreign_rules(rule: str, saved: str) -> None:
    """Rules iptsync never writes but may find in a table are also spelled as saved."""
    assert saved == canonical(split_args(rule))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9_999_999_999))
def test_canonical_probability_is_stable(tenth_billionths: int) -> None:
    """A probability printed with 10 decimals canonicalises to a fixed point."""
    rule = ["-m", "statistic", "--mode", "random", "--probability",
            f"{tenth_billionths / 1e10:.10f}", "-j", "X"]
    once = canonical(rule)
    assert once == canonical(split_args(once))


def scenario_rules(name: str) -> Iterator[tuple[str, ...]]:
    """The arguments of every rule and jump of a rendered golden scenario."""
    desired = render_scenario(name)
    for chains in desired.tables.tables.values():
        for content in chains.values():
            yield from (tuple(split_args(line)[2:]) for line in content.lines)
    yield from (jump.args for jump in desired.tables.jumps)


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_canonical_is_idempotent_on_rendered_rules(name: str) -> None:
    """canonical(split_args(canonical(x))) == canonical(x) for every rendered rule."""
    for args in scenario_rules(name):
        once = canonical(args)
        assert once == canonical(split_args(once)), args


# --- the kernel agrees ------------------------------------------------------------------

def live_chains(tables: dict[str, SavedTable]) -> Chains:
    """Saved chains, leaving out built-in chains that hold no rules."""
    return {name: {chain: rules for chain, rules in table.chains.items()
                   if rules or chain not in BUILTIN_CHAINS.get(name, ())}
            for name, table in tables.items()}


def desired_live(desired: Desired) -> Chains:
    """What iptables-save should show after restoring the ruleset on an empty node."""
    out = expected_chains(desired)
    for table, chains in expected_jumps(desired).items():
        for chain, rules in chains.items():
            out.setdefault(table, {})[chain] = rules
    return out


def run_in(namespace: str, argv: list[str], stdin: str | None = None) -> str:
    """Run a command inside a network namespace; return its stdout, raising on failure."""
    result = subprocess.run(["ip", "netns", "exec", namespace, *argv], input=stdin,
                            capture_output=True, text=True, check=False, timeout=60)
    assert 0 == result.returncode, (argv, result.stderr)
    return result.stdout


@pytest.mark.netns
@pytest.mark.parametrize("family", list(IPFamily), ids=[f.value for f in IPFamily])
def test_kernel_prints_the_canonical_forms(family: IPFamily) -> None:
    """After iptables-restore (nft and legacy; ip6tables-restore for the IPv6 scenarios), the
    family's save shows exactly the canonical rules."""
    rulesets = {name: render_family(name, family) for name, f in FAMILY_SCENARIOS
                if f is family}
    tool = "iptables" if family is IPFamily.IPV4 else "ip6tables"
    for backend in ("nft", "legacy"):
        namespace = f"iptsync-canon-{os.getpid()}-{family.value}-{backend}"
        subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True)
        try:
            for name, desired in rulesets.items():
                run_in(namespace, [f"{tool}-{backend}-restore"], desired.payload())
                saved = parse_save(run_in(namespace, [f"{tool}-{backend}-save"]), family=family)
                assert (backend, name, desired_live(desired)) == (
                    backend, name, live_chains(saved))
        finally:
            subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
