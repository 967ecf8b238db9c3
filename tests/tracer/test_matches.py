"""The tracer's matches, targets and chain walking, on small hand-written rulesets.

Rules are written as iptables-save prints them (canonical spelling) and fed through the live
adapter (:func:`iptsync.inspection.trace.from_saved`), so every test also exercises the rule parser.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from iptsync.core.plan import ChainContent, DesiredTables
from iptsync.core.render import probability
from iptsync.core.ruleset import Jump, SavedTable, canonical
from iptsync.inspection.trace import (
    Step,
    TraceError,
    TraceResult,
    default_origin,
    from_desired,
    from_saved,
    make_packet,
    parse_rule,
    render_text,
    result_json,
    trace,
)

NODE_IP = ipaddress.ip_address("10.100.0.2")
CLUSTER = ipaddress.ip_network("10.0.0.0/14")
MASQ = "-m mark --mark 0x4000/0x4000"


def run(nat: dict[str, list[str]] | None = None, filt: dict[str, list[str]] | None = None,
        *, src: str = "10.0.1.3", dst: str = "10.96.0.10:80", proto: str = "tcp",
        origin: str = "pod", policies: dict[str, str] | None = None,
        sport: int | None = None, pod_interface: str | None = None) -> TraceResult:
    """Trace one packet through the given nat and filter chains (canonical rule text)."""
    tables = {"nat": SavedTable("nat", dict(nat or {})),
              "filter": SavedTable("filter", dict(filt or {}), dict(policies or {}))}
    packet = make_packet(src, dst, proto, sport)
    return trace(from_saved(tables), packet, origin=origin, node_ips=(NODE_IP,),
                 pod_interface=pod_interface)


def dnat(to: str) -> str:
    return f"-p tcp -m tcp -j DNAT --to-destination {to}"


def only(result: TraceResult) -> Any:
    """The single outcome of a result without random forks."""
    assert 1 == len(result.outcomes)
    return result.outcomes[0]


# --- the parser ------------------------------------------------------------------------------

def test_parse_rule_reads_addresses_matches_and_target() -> None:
    """A canonical rule is split into negated addresses, protocol, matches and target."""
    rule = parse_rule('! -s 10.0.0.0/14 -d 10.96.0.10/32 -p tcp -m comment --comment "a b" '
                      '-m tcp --dport 80 -j DNAT --to-destination 10.0.1.2:8080')
    assert (True, CLUSTER) == rule.source
    assert (False, ipaddress.ip_network("10.96.0.10/32")) == rule.destination
    assert (False, "tcp") == rule.protocol
    assert ["comment", "tcp"] == [m.name for m in rule.matches]
    assert "a b" == rule.comment
    assert ("DNAT", False) == (rule.target, rule.goto)
    assert ((False, "--to-destination", ("10.0.1.2:8080",)),) == rule.target_options


def test_parse_rule_keeps_interfaces_and_unreadable_tokens() -> None:
    """Interfaces are kept as text (not modelled); tokens it cannot read are remembered."""
    rule = parse_rule("! -i eth0 -o lo weird -g KUBE-X")
    assert ("! -i eth0", "-o lo") == rule.interfaces
    assert ("weird",) == rule.unreadable
    assert ("KUBE-X", True) == (rule.target, rule.goto)


def test_comment_is_removed_from_the_displayed_rule() -> None:
    """The text shown for a step is the rule without its -m comment part."""
    rule = parse_rule('-m comment --comment "x y" -m tcp -p tcp -j ACCEPT')
    assert "-m tcp -p tcp -j ACCEPT" == rule.text_without_comment


# --- addresses, protocols, ports -------------------------------------------------------------

def test_negated_source_matches_only_outside_the_cidr() -> None:
    """`! -s CIDR` matches a source outside the CIDR and not one inside it."""
    nat = {"PREROUTING": [f"! -s 10.0.0.0/14 {dnat('10.0.9.9:1')}"]}
    assert "DNAT" == run(nat, src="10.100.0.100").verdict
    assert "ACCEPT" == run(nat, src="10.0.1.3").verdict


def test_destination_cidr_and_its_negation() -> None:
    """`-d CIDR` matches addresses inside it; `! -d` those outside."""
    nat = {"PREROUTING": [f"-d 10.96.0.0/12 {dnat('10.0.9.9:1')}"]}
    assert "DNAT" == run(nat, dst="10.96.0.10:80").verdict
    assert "ACCEPT" == run(nat, dst="10.200.0.1:80").verdict
    negated = {"PREROUTING": [f"! -d 10.96.0.0/12 {dnat('10.0.9.9:1')}"]}
    assert "ACCEPT" == run(negated, dst="10.96.0.10:80").verdict


def test_protocol_and_its_negation() -> None:
    """`-p tcp` matches TCP only; `! -p tcp` everything else."""
    filt = {"FORWARD": ["-p udp -j DROP"]}
    assert "DROP" == run(filt=filt, proto="udp").verdict
    assert "ACCEPT" == run(filt=filt, proto="tcp").verdict
    assert "DROP" == run(filt={"FORWARD": ["! -p tcp -j DROP"]}, proto="sctp").verdict


@pytest.mark.parametrize(("spec", "port", "matched"), [
    ("80", 80, True), ("80", 81, False), ("30000:32767", 30200, True),
    ("30000:32767", 29999, False), (":1024", 80, True), ("1024:", 80, False)])
def test_destination_port_and_ranges(spec: str, port: int, matched: bool) -> None:
    """`-m tcp --dport` matches one port or an a:b range (open ends allowed)."""
    filt = {"FORWARD": [f"-p tcp -m tcp --dport {spec} -j REJECT --reject-with tcp-reset"]}
    assert ("REJECT" if matched else "ACCEPT") == run(filt=filt, dst=f"10.0.1.2:{port}").verdict


def test_negated_port_and_other_protocol_matches() -> None:
    """`! --dport` inverts; a -m udp match never matches a TCP packet."""
    filt = {"FORWARD": ["-p tcp -m tcp ! --dport 80 -j DROP", "-m udp --dport 80 -j DROP"]}
    assert "ACCEPT" == run(filt=filt, dst="10.0.1.2:80").verdict
    assert "DROP" == run(filt=filt, dst="10.0.1.2:81").verdict


def test_sctp_and_multiport_matches() -> None:
    """SCTP ports and multiport lists with ranges are matched."""
    filt = {"FORWARD": ["-p sctp -m sctp --dport 9000 -j DROP",
                        "-p tcp -m multiport --dports 22,8000:8100 -j REJECT"]}
    assert "DROP" == run(filt=filt, proto="sctp", dst="10.0.1.2:9000").verdict
    assert "REJECT" == run(filt=filt, dst="10.0.1.2:8080").verdict
    assert "ACCEPT" == run(filt=filt, dst="10.0.1.2:443").verdict


def test_source_port_is_unknown_unless_given() -> None:
    """--sport with no source port given is assumed to match, with a warning."""
    filt = {"FORWARD": ["-p tcp -m tcp --sport 1000:2000 -j DROP"]}
    unknown = run(filt=filt)
    assert "DROP" == unknown.verdict
    assert 1 == len(unknown.warnings)
    assert "ACCEPT" == run(filt=filt, sport=40000).verdict
    assert "DROP" == run(filt=filt, sport=1500).verdict


def test_tcp_flags_of_a_first_packet_are_syn() -> None:
    """`--tcp-flags FIN,SYN,RST,ACK SYN` (--syn) matches the first packet of a connection."""
    filt = {"FORWARD": ["-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j DROP"]}
    assert "DROP" == run(filt=filt).verdict


# --- addrtype, mark, conntrack, recent, comment ----------------------------------------------

def test_addrtype_local_is_the_node_addresses_and_loopback() -> None:
    """--dst-type LOCAL matches the node's addresses and 127/8, nothing else."""
    nat = {"PREROUTING": [f"-m addrtype --dst-type LOCAL {dnat('10.0.9.9:1')}"]}
    assert "DNAT" == run(nat, dst="10.100.0.2:30000").verdict
    assert "DNAT" == run(nat, dst="127.0.0.1:30000").verdict
    assert "ACCEPT" == run(nat, dst="10.100.0.3:30000").verdict


def test_negated_addrtype_source() -> None:
    """`-m addrtype ! --src-type LOCAL` matches a packet from elsewhere, not from the node."""
    nat = {"OUTPUT": [f"-m addrtype ! --src-type LOCAL {dnat('10.0.9.9:1')}"],
           "PREROUTING": [f"-m addrtype ! --src-type LOCAL {dnat('10.0.9.9:1')}"]}
    assert "ACCEPT" == run(nat, src="10.100.0.2", origin="node").verdict
    assert "DNAT" == run(nat, src="10.100.0.100", origin="external").verdict


def test_mark_set_then_checked_in_a_later_table() -> None:
    """MARK --set-xmark in nat is seen by `-m mark --mark` in filter."""
    nat = {"PREROUTING": ["-j MARK --set-xmark 0x4000/0x4000"]}
    filt = {"FORWARD": [f"{MASQ} -j ACCEPT", "-j DROP"]}
    assert "ACCEPT" == run(nat, filt).verdict
    assert "DROP" == run({}, filt).verdict


def test_mark_xor_clears_the_bit_and_negated_mark() -> None:
    """--set-xmark 0x4000/0x0 flips the bit back; `! --mark` matches an unmarked packet."""
    nat = {"PREROUTING": ["-j MARK --set-xmark 0x4000/0x4000",
                          "-j MARK --set-xmark 0x4000/0x0"]}
    filt = {"FORWARD": ["-m mark ! --mark 0x4000/0x4000 -j DROP"]}
    assert "DROP" == run(nat, filt).verdict


def test_conntrack_established_does_not_match_a_new_packet() -> None:
    """`--ctstate RELATED,ESTABLISHED` does not match; `--ctstate NEW` does."""
    filt = {"FORWARD": ["-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                        "-m conntrack --ctstate NEW -j REJECT"]}
    assert "REJECT" == run(filt=filt).verdict


def test_negated_ctstate_dnat_depends_on_a_nat_rewrite() -> None:
    """`! --ctstate RELATED,ESTABLISHED,DNAT` drops raw 127/8 traffic, not DNATed traffic."""
    guard = ("-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
             "-j DROP")
    filt = {"INPUT": [guard]}
    assert "DROP" == run(filt=filt, src="10.100.0.100", dst="127.0.0.1:8080",
                         origin="external").verdict
    nat = {"PREROUTING": [dnat("127.0.0.1:8080")]}
    rewritten = run(nat, filt, src="10.100.0.100", dst="10.100.0.2:30000", origin="external")
    assert ("DNAT", "127.0.0.1:8080") == (rewritten.verdict, only(rewritten).endpoint)


def test_recent_rcheck_misses_and_set_matches() -> None:
    """-m recent --rcheck never matches a first packet, ! --rcheck does, --set always does."""
    nat = {"PREROUTING": [
        f"-m recent --rcheck --seconds 10800 --reap --name A --mask 255.255.255.255 --rsource "
        f"{dnat('10.0.9.1:1')}",
        "-m recent ! --rcheck --name B --mask 255.255.255.255 --rsource -j MARK "
        "--set-xmark 0x1/0x1",
        f"-m mark --mark 0x1/0x1 -m recent --set --name C --mask 255.255.255.255 --rsource "
        f"{dnat('10.0.9.2:1')}"]}
    assert {"10.0.9.2:1": 1.0} == run(nat).endpoints


def test_comment_is_kept_on_the_step() -> None:
    """A comment always matches and is shown on the step of its rule."""
    nat = {"PREROUTING": ['-m comment --comment "svc a" -j KUBE-SVC'],
           "KUBE-SVC": [dnat("10.0.1.2:8080")]}
    path = only(run(nat)).path
    assert Step("nat", "PREROUTING", 1, '-m comment --comment "svc a" -j KUBE-SVC',
                "svc a") == path[0]
    assert (None, "10.0.1.2:8080") == (path[1].comment, only(run(nat)).endpoint)


@pytest.mark.parametrize("pattern", ["cbr0", "veth+"])
def test_pod_interface_matches_pods_only(pattern: str) -> None:
    """With the interface pods arrive on known (BridgeInterface, InterfaceNamePrefix), a pod
    matches ``-i`` on it, an outside client does not, and the node's own traffic has no input
    interface: ``! -i`` matches it. No warning."""
    nat = {"PREROUTING": [f"! -i {pattern} -j KUBE-MARK-MASQ", f"-i {pattern} -j POD",
                          dnat("10.0.2.2:8080")],
           "OUTPUT": [f"-i {pattern} -j POD", f"! -i {pattern} -j KUBE-MARK-MASQ",
                      dnat("10.0.2.2:8080")],
           "POD": [dnat("10.0.1.2:8080")],
           "KUBE-MARK-MASQ": ["-j MARK --set-xmark 0x4000/0x4000"],
           "POSTROUTING": [f"{MASQ} -j MASQUERADE"]}
    results = {origin: run(nat, origin=origin, pod_interface=pattern,
                           src="10.100.0.2" if origin == "node" else "10.0.1.3")
               for origin in ("pod", "external", "node")}
    assert {"pod": ("10.0.1.2:8080", False), "external": ("10.0.2.2:8080", True),
            "node": ("10.0.2.2:8080", True)} == {
        origin: (only(r).endpoint, only(r).masquerade) for origin, r in results.items()}
    assert [(), (), ()] == [r.warnings for r in results.values()]


def test_other_interfaces_stay_unmodelled_with_a_pod_interface() -> None:
    """An interface other than the pods' (or -o) is still assumed to match, with a warning."""
    result = run(filt={"FORWARD": ["-i eth0 -j DROP"]}, pod_interface="cbr0")
    assert ("DROP", 1) == (result.verdict, len(result.warnings))


def test_unknown_match_and_interface_match_with_warnings() -> None:
    """A match or interface the tracer does not model is assumed to match and reported."""
    filt = {"FORWARD": ["-i eth0 -j ACCEPT"], "INPUT": ["-m set --match-set bad src -j DROP"]}
    forward = run(filt=filt)
    assert "ACCEPT" == forward.verdict
    assert 1 == len(forward.warnings)
    assert "interface -i eth0 not modelled" in forward.warnings[0]
    local = run(filt=filt, dst="10.100.0.2:22", src="10.100.0.100", origin="external")
    assert "DROP" == local.verdict
    assert 1 == len(local.warnings)
    assert "-m set" in local.warnings[0]


def test_statistic_match_forks_the_walk() -> None:
    """A random match splits the walk; each branch carries its share of the probability."""
    filt = {"FORWARD": ["-m statistic --mode random --probability 0.25000000000 -j DROP"]}
    result = run(filt=filt)
    assert "MIXED" == result.verdict
    assert [("DROP", 0.25), ("ACCEPT", 0.75)] == [(o.verdict, o.probability)
                                                  for o in result.outcomes]


@pytest.mark.parametrize("n", range(1, 7))
def test_kube_proxy_probability_chain_gives_each_endpoint_one_nth(n: int) -> None:
    """Rule i with probability 1/(n-i) and an unconditional last rule: each endpoint gets 1/n."""
    rules = []
    for i in range(n):
        chance = ("-m", "statistic", "--mode", "random", "--probability",
                  probability(n - i)) if i < n - 1 else ()
        rules.append(canonical((*chance, "-j", f"SEP{i}")))
    chains = {"PREROUTING": ["-j SVC"], "SVC": rules}
    chains.update({f"SEP{i}": [dnat(f"10.0.1.{i + 10}:8080")] for i in range(n)})
    result = run(chains)
    assert n == len(result.endpoints)
    for share in result.endpoints.values():
        assert 1 / n == pytest.approx(share, abs=1e-9)
    assert 1.0 == pytest.approx(sum(o.probability for o in result.outcomes), abs=1e-9)


# --- targets and chain walking ---------------------------------------------------------------

def test_jump_returns_to_the_caller_but_goto_does_not() -> None:
    """After -j X falls off X's end the caller goes on; after -g X the caller returns too."""
    jump = {"PREROUTING": ["-j A"], "A": ["-j B", dnat("10.0.9.1:1")], "B": []}
    assert "DNAT" == run(jump).verdict
    goto = {"PREROUTING": ["-j A", dnat("10.0.9.2:2")], "A": ["-g B", dnat("10.0.9.1:1")],
            "B": []}
    assert {"10.0.9.2:2": 1.0} == run(goto).endpoints


def test_return_leaves_the_chain_early() -> None:
    """-j RETURN skips the rest of the chain; the caller continues after its jump."""
    nat = {"PREROUTING": ["-j A", dnat("10.0.9.2:2")], "A": ["-j RETURN", dnat("10.0.9.1:1")]}
    assert {"10.0.9.2:2": 1.0} == run(nat).endpoints


def test_policy_applies_at_the_end_of_a_builtin_chain() -> None:
    """A packet falling off filter FORWARD gets the chain's policy, shown as the last step."""
    result = run(filt={"FORWARD": ["-p udp -j ACCEPT"]}, policies={"FORWARD": "DROP"})
    assert "DROP" == result.verdict
    assert Step("filter", "FORWARD", None, "-P FORWARD DROP", "policy") == only(result).path[-1]
    assert "ACCEPT" == run(filt={"FORWARD": []}).verdict


def test_dnat_ends_the_nat_hook_and_rewrites_the_destination() -> None:
    """DNAT sets the endpoint and stops the nat chain; filter then sees the new destination."""
    nat = {"PREROUTING": [dnat("10.0.1.2:8080"), dnat("10.0.9.9:1")]}
    filt = {"FORWARD": ["-d 10.0.1.2/32 -p tcp -m tcp --dport 8080 -j ACCEPT", "-j DROP"]}
    result = run(nat, filt)
    assert ("DNAT", {"10.0.1.2:8080": 1.0}) == (result.verdict, result.endpoints)


def test_dnat_to_a_node_address_goes_to_input_not_forward() -> None:
    """Routing after DNAT: a local destination crosses filter INPUT, anything else FORWARD."""
    filt = {"INPUT": ["-j DROP"], "FORWARD": ["-j REJECT --reject-with icmp-port-unreachable"]}
    assert "DROP" == run({"PREROUTING": [dnat("10.100.0.2:10250")]}, filt).verdict
    assert "REJECT" == run({"PREROUTING": [dnat("10.0.2.2:80")]}, filt).verdict


def test_masquerade_in_postrouting_marks_the_outcome() -> None:
    """MASQUERADE (here behind a mark check, as kube-proxy does) makes the outcome masqueraded."""
    nat = {"PREROUTING": ["-j MARK --set-xmark 0x4000/0x4000", dnat("10.0.2.2:80")],
           "POSTROUTING": [f"{MASQ} -j MASQUERADE --random-fully"]}
    result = run(nat)
    assert (True, True) == (result.masquerade, only(result).masquerade)
    unmarked = {"PREROUTING": [dnat("10.0.2.2:80")], "POSTROUTING": nat["POSTROUTING"]}
    assert False is run(unmarked).masquerade


def test_mixed_masquerade_is_none() -> None:
    """When only some delivered outcomes are masqueraded, masquerade is None."""
    nat = {"PREROUTING": ["-m statistic --mode random --probability 0.50000000000 -j MARK "
                          "--set-xmark 0x4000/0x4000"],
           "POSTROUTING": [f"{MASQ} -j MASQUERADE"]}
    result = run(nat)
    assert (None, 0.5) == (result.masquerade, result.masquerade_probability)


def test_reject_and_drop_are_terminal() -> None:
    """Nothing after REJECT or DROP is evaluated."""
    filt = {"FORWARD": ["-j REJECT --reject-with icmp-port-unreachable", "-j DROP"]}
    assert "REJECT" == run(filt=filt).verdict
    assert "DROP" == run(filt={"FORWARD": ["-j DROP", "-j REJECT"]}).verdict


def test_unknown_target_is_reported_and_walked_past() -> None:
    """A target that is neither built in nor a chain is skipped with a warning."""
    result = run(filt={"FORWARD": ["-j NOSUCHCHAIN", "-j DROP"]})
    assert "DROP" == result.verdict
    assert 1 == len(result.warnings)


def test_node_origin_uses_nat_output_not_prerouting() -> None:
    """Locally generated packets cross nat OUTPUT and filter OUTPUT, never nat PREROUTING."""
    nat = {"PREROUTING": [dnat("10.0.9.1:1")], "OUTPUT": [dnat("10.0.9.2:2")]}
    filt = {"OUTPUT": ["-d 10.0.9.2/32 -j ACCEPT", "-j DROP"]}
    assert {"10.0.9.2:2": 1.0} == run(nat, filt, src="10.100.0.2", origin="node").endpoints


def test_node_origin_to_a_local_address_crosses_filter_input() -> None:
    """A node's connection to its own address goes out via lo and through filter INPUT."""
    filt = {"INPUT": ["-p tcp -m tcp --dport 22 -j DROP"]}
    assert "DROP" == run(filt=filt, src="10.100.0.2", dst="10.100.0.2:22",
                         origin="node").verdict


# --- adapters, inputs and output forms -------------------------------------------------------

def test_rendered_jumps_sit_at_the_top_of_builtin_chains_in_order() -> None:
    """from_desired puts the jumps first in each built-in chain, in listed order."""
    desired = DesiredTables({"nat": {"PREROUTING": ChainContent(("-A PREROUTING -j LATER",))}},
                            [Jump("nat", "PREROUTING", ("-j", "FIRST")),
                             Jump("nat", "PREROUTING", ("-j", "SECOND"))])
    chains = from_desired(desired).chains
    assert ["FIRST", "SECOND", "LATER"] == [r.target for r in chains["nat"]["PREROUTING"]]
    assert () == chains["filter"]["FORWARD"]


def test_bad_packets_are_refused() -> None:
    """A destination without a port, a bad address or protocol raises TraceError."""
    for args in (("10.0.0.1", "10.0.0.2"), ("x", "10.0.0.2:80"), ("10.0.0.1", "10.0.0.2:0"),
                 ("10.0.0.1", "10.0.0.2:80", "icmp")):
        with pytest.raises(TraceError):
            make_packet(*args)
    with pytest.raises(TraceError):
        run(origin="moon")


def test_default_origin_follows_the_source() -> None:
    """Node addresses are `node`, the cluster CIDR `pod`, anything else `external`."""
    for src, expected in (("10.100.0.2", "node"), ("10.0.1.3", "pod"),
                          ("192.0.2.1", "external")):
        assert expected == default_origin(ipaddress.ip_address(src), (CLUSTER,), (NODE_IP,))


def test_json_and_text_forms() -> None:
    """The JSON holds verdict, endpoints, masquerade and the likeliest path; text shows odds."""
    nat = {"PREROUTING": ["-m statistic --mode random --probability 0.25000000000 -j A", "-j B"],
           "A": [dnat("10.0.1.2:8080")], "B": [dnat("10.0.2.2:8080")]}
    result = run(nat)
    data = result_json(result)
    assert "DNAT" == data["verdict"]
    assert {"10.0.1.2:8080": 0.25, "10.0.2.2:8080": 0.75} == data["endpoints"]
    assert data["masquerade"] is False
    assert ["PREROUTING", "B", "FORWARD"] == [s["chain"] for s in data["path"]][:3]
    assert 2 == len(data["outcomes"])
    text = render_text(result)
    assert "25%  DNAT to 10.0.1.2:8080" in text
    assert "75%  DNAT to 10.0.2.2:8080" in text
    assert "masquerade: no" in text
