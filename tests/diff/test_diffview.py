"""`iptsync diff`: what a sync would change, read from iptables-save text (no kernel needed).

The desired rules are the render of ``tests/render/scenarios/clusterip-two-endpoints.yaml``
for node1 (shop/web:http, 10.96.0.10:80 -> 10.0.1.2:8080 and 10.0.2.2:8080). The "live"
rules are what iptables-save prints on a node holding exactly those rules, edited the way
another tool (or a person) would change them.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from iptsync.cli import main
from iptsync.core import names
from iptsync.core.plan import DesiredTables, make_plan
from iptsync.core.policy import Settings
from iptsync.core.ruleset import ordered_tables, parse_save
from iptsync.engine.desired import Desired, desired_from_objects
from iptsync.inspection.diffview import DiffReport, diff_report, render_text, report_json
from iptsync.sources.files import load_objects

SCENARIO = Path(__file__).resolve().parents[1] / "render" / "scenarios" / (
    "clusterip-two-endpoints.yaml")
SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))
SVC = names.svc_chain("shop/web:http", "tcp")
SEP_1 = names.sep_chain("shop/web:http", "tcp", "10.0.1.2:8080")
LABELS = {"live_label": "live rules", "desired_label": "the rules a sync writes"}


def desired() -> Desired:
    return desired_from_objects(load_objects([SCENARIO]).objects, SETTINGS)


def saved_text(desired: DesiredTables) -> str:
    """The ruleset as iptables-save prints it on a node that holds exactly these rules."""
    lines = []
    for table in ordered_tables(desired.tables):
        jumps = [j for j in desired.jumps if j.table == table]
        lines.append(f"*{table}")
        lines += [f":{chain} ACCEPT [0:0]" for chain in dict.fromkeys(j.chain for j in jumps)]
        lines += [f":{chain} - [0:0]" for chain in desired.tables[table]]
        lines += [f"-A {j.chain} {j.rule.canonical}" for j in jumps]
        lines += [f"-A {chain} {rule}".rstrip() for chain, content in desired.tables[table].items()
                  for rule in content.canonical_rules()]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def without(text: str, *fragments: str) -> str:
    """``text`` without the lines that contain every fragment."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not all(fragment in line for fragment in fragments))


def report_for(live_text: str) -> DiffReport:
    wanted = desired().tables
    live = parse_save(live_text)
    return diff_report(make_plan(wanted, live), live, wanted)


def test_a_node_in_sync_has_no_changes() -> None:
    """Live rules equal to the desired ones: nothing to report, and the text says so."""
    report = report_for(saved_text(desired().tables))
    assert (False, (), ()) == (report.changed, report.chains, report.jumps)
    assert ("no changes: the live rules already hold the rules a sync writes\n"
            == render_text(report, **LABELS))
    assert {"changed": False, "summary": "no changes", "tables": {}} == report_json(report)


def test_a_rule_deleted_by_hand_shows_as_added_back() -> None:
    """One endpoint rule missing from the SVC chain: a rewrite adding just that rule."""
    live = without(saved_text(desired().tables), f"-A {SVC} ", "10.0.2.2:8080")
    report = report_for(live)
    [chain] = report.chains
    assert ("nat", SVC, "rewrite") == (chain.table, chain.chain, chain.action)
    assert ([], 1, 2) == (chain.removed, len(chain.added), chain.unchanged)
    text = render_text(report, **LABELS)
    assert f"@@ rewrite {SVC}: 0 removed, 1 added, 2 unchanged @@" in text.splitlines()
    assert (f'+ -A {SVC} -m comment --comment "shop/web:http -> 10.0.2.2:8080" '
            f"-j {names.sep_chain('shop/web:http', 'tcp', '10.0.2.2:8080')}") in text.splitlines()
    assert "summary: nat: 1 chain to rewrite" == text.splitlines()[-1]


def test_an_altered_rule_shows_as_removed_and_added() -> None:
    """A DNAT target changed by hand: the live rule is removed (-), the desired one added (+)."""
    live = saved_text(desired().tables).replace("--to-destination 10.0.1.2:8080",
                                                 "--to-destination 10.0.1.99:8080")
    [chain] = report_for(live).chains
    assert (SEP_1, "rewrite") == (chain.chain, chain.action)
    assert ['-p tcp -m comment --comment "shop/web:http" -m tcp -j DNAT --to-destination '
            "10.0.1.99:8080"] == chain.removed
    assert ['-p tcp -m comment --comment "shop/web:http" -m tcp -j DNAT --to-destination '
            "10.0.1.2:8080"] == chain.added
    lines = render_text(report_for(live), **LABELS).splitlines()
    removed = lines.index(f"- -A {SEP_1} {chain.removed[0]}")
    assert f"+ -A {SEP_1} {chain.added[0]}" == lines[removed + 1]
    assert (f'  -A {SEP_1} -s 10.0.1.2/32 -m comment --comment "shop/web:http" '
            "-j KUBE-MARK-MASQ") == lines[removed - 1]


def test_a_missing_chain_is_created_and_a_stale_one_deleted() -> None:
    """A service chain the node lacks is created; an old one of ours is deleted with its rules."""
    live = without(without(saved_text(desired().tables), f":{SEP_1} "), f"-A {SEP_1} ")
    live = live.replace("*nat\n", "*nat\n:KUBE-SEP-OLDOLDOLDOLDOLD - [0:0]\n")
    live = live.removesuffix("COMMIT\n") + (
        "-A KUBE-SEP-OLDOLDOLDOLDOLD -j DNAT --to-destination 10.0.9.9:80\nCOMMIT\n")
    report = report_for(live)
    assert [("create", SEP_1), ("delete", "KUBE-SEP-OLDOLDOLDOLDOLD")] == [
        (c.action, c.chain) for c in report.chains]
    text = render_text(report, **LABELS)
    assert f"@@ create {SEP_1} (2 rules) @@" in text
    assert ("@@ delete KUBE-SEP-OLDOLDOLDOLDOLD (1 rule) @@\n"
            "- -A KUBE-SEP-OLDOLDOLDOLDOLD -j DNAT --to-destination 10.0.9.9:80\n") in text
    assert "summary: nat: 1 chain to create, 1 chain to delete" == text.splitlines()[-1]


def test_a_missing_jump_is_inserted() -> None:
    """A jump from a built-in chain removed by hand is reported as a jump to insert."""
    live = without(saved_text(desired().tables), "-A PREROUTING ", "-j KUBE-SERVICES")
    report = report_for(live)
    assert () == report.chains
    assert [("nat", "PREROUTING")] == [(j.table, j.chain) for j in report.jumps]
    text = render_text(report, **LABELS)
    assert ("@@ insert 1 jump at the top of built-in chains @@\n"
            '+ -I PREROUTING -m comment --comment "kubernetes service portals" '
            "-j KUBE-SERVICES\n") in text


def test_rules_of_other_tools_are_not_reported() -> None:
    """Chains iptsync does not own, and rules in built-in chains, are left out of the diff."""
    live = saved_text(desired().tables).replace(
        "*filter\n", "*filter\n:DOCKER-USER - [0:0]\n-A DOCKER-USER -j RETURN\n"
        "-A FORWARD -j DOCKER-USER\n", 1)
    assert not report_for(live).changed


def test_an_empty_node_gets_every_chain_and_jump() -> None:
    """Nothing live (a fresh node): every chain is created and every jump inserted."""
    report = report_for("")
    wanted = desired().tables
    assert sum(len(chains) for chains in wanted.tables.values()) == len(report.chains)
    assert {"create"} == {c.action for c in report.chains}
    assert len(wanted.jumps) == len(report.jumps)
    assert ("filter: 7 chains to create, 11 jumps to insert; "
            "nat: 8 chains to create, 3 jumps to insert") == render_text(
        report, **LABELS).splitlines()[-1].removeprefix("summary: ")


def test_long_rewrites_show_only_context_around_changes() -> None:
    """Unchanged rules far from any change collapse into '...' between hunks."""
    wanted = desired().tables
    live = saved_text(wanted)
    rules = wanted.tables["nat"]["KUBE-POSTROUTING"].canonical_rules()
    first, last = (f"-A KUBE-POSTROUTING {rules[i]}" for i in (0, -1))
    live = live.replace(first + "\n", "").replace(last + "\n", "")
    live = live.replace("-A KUBE-MARK-MASQ ", "-A KUBE-POSTROUTING -j RETURN\n"
                        "-A KUBE-POSTROUTING -j RETURN\n-A KUBE-POSTROUTING -j RETURN\n"
                        "-A KUBE-MARK-MASQ ", 1)
    text = render_text(report_for(live), **LABELS, context=0)
    assert "@@ rewrite KUBE-POSTROUTING: 3 removed, 2 added, 1 unchanged @@" in text
    assert "  ..." in text.splitlines()


def test_json_lists_changes_per_table_and_action() -> None:
    """JSON: changed, summary, and per table create/rewrite/delete/jumps."""
    live = without(saved_text(desired().tables), f"-A {SVC} ", "10.0.2.2:8080")
    live = without(live, "-A OUTPUT ", "-j KUBE-FIREWALL")
    data = json.loads(json.dumps(report_json(report_for(live))))
    assert {"changed": True, "summary": "filter: 1 jump to insert; nat: 1 chain to rewrite",
            "tables": {
                "filter": {"create": {}, "rewrite": {}, "delete": {},
                           "jumps": [{"chain": "OUTPUT", "rule": "-j KUBE-FIREWALL"}]},
                "nat": {"create": {}, "delete": {}, "jumps": [], "rewrite": {SVC: {
                    "removed": [],
                    "added": ['-m comment --comment "shop/web:http -> 10.0.2.2:8080" '
                              f"-j {names.sep_chain('shop/web:http', 'tcp', '10.0.2.2:8080')}"],
                    "unchanged": 2}}}}} == data


@pytest.fixture
def saved_in_sync(tmp_path: Path) -> Path:
    path = tmp_path / "node1.save"
    path.write_text(saved_text(desired().tables))
    return path


def diff_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["diff", "--objects", str(SCENARIO), "--hostname-override",
                                       "node1", "--cluster-cidr", "10.0.0.0/14", "--node-ip",
                                       "10.100.0.2", *args])
    return result.exit_code, result.output


def test_cli_exits_0_when_nothing_would_change(saved_in_sync: Path) -> None:
    """`iptsync diff --saved FILE` on an in-sync copy: exit 0 and 'no changes'."""
    assert (0, f"no changes: the rules in {saved_in_sync} already hold the rules a sync for "
               "node1 writes\n") == diff_cli("--saved", str(saved_in_sync))


def test_cli_exits_1_and_names_the_chain_when_something_would(saved_in_sync: Path) -> None:
    """A rule missing in the saved copy: exit 1, the chain and the rule in the report."""
    saved_in_sync.write_text(without(saved_in_sync.read_text(), f"-A {SVC} ", "10.0.2.2"))
    status, output = diff_cli("--saved", str(saved_in_sync))
    assert 1 == status
    assert f"@@ rewrite {SVC}: 0 removed, 1 added, 2 unchanged @@" in output
    status, output = diff_cli("--saved", str(saved_in_sync), "--json")
    [entry] = json.loads(output)["families"]  # a saved file holds one family's rules
    assert (1, "IPv4", "nat: 1 chain to rewrite") == (status, entry["family"], entry["summary"])


def test_cli_exits_2_on_errors(tmp_path: Path) -> None:
    """Unreadable iptables-save text, a missing file, or no rule source: exit 2."""
    broken = tmp_path / "broken.save"
    broken.write_text("*nat\n:KUBE-SERVICES - [0:0]\n")
    status, output = diff_cli("--saved", str(broken))
    assert (2, True) == (status, "table nat has no COMMIT" in output)
    assert 2 == diff_cli("--saved", str(tmp_path / "missing.save"))[0]
    assert 2 == diff_cli()[0]
