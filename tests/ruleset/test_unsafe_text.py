"""Text that must never reach iptables-restore as written, and comments the kernel shortens.

The restore writer is the last line of defence behind the model's name checks: whatever a
buggy or hostile source gets past them, no argument or chain name may end a restore line
early (newline, carriage return) or cut it (NUL). And a comment longer than the kernel keeps
(255 bytes) must compare equal to its stored form, or every full sync rewrites its chain.
"""

from __future__ import annotations

import ipaddress

import pytest

from iptsync.core.model import (
    Endpoint,
    EndpointSliceInfo,
    IPFamily,
    Protocol,
    ServiceInfo,
    ServicePort,
    ServicePortName,
    SlicePort,
)
from iptsync.core.plan import ChainContent, DesiredTables, make_plan
from iptsync.core.policy import Settings
from iptsync.core.ruleset import (
    MAX_COMMENT_BYTES,
    Rule,
    RulesetError,
    UnsafeRestoreText,
    canonical,
    chain_line,
    join_args,
    kernel_comment,
    parse_save,
    split_args,
)
from iptsync.engine.apply import apply_plan
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter

SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))
INJECTED = "x\n-A KUBE-SERVICES -d 192.0.2.99/32 -j DNAT --to-destination 10.0.9.9:80"
UNSAFE = [INJECTED, "x\r-A KUBE-SERVICES -j ACCEPT", "x\x00", "\n", "a b\nc"]


@pytest.mark.parametrize("bad", UNSAFE)
@pytest.mark.parametrize("args", [
    pytest.param(lambda bad: ("-m", "comment", "--comment", bad, "-j", "RETURN"), id="comment"),
    pytest.param(lambda bad: ("-j", bad), id="target"),
    pytest.param(lambda bad: ("-m", "comment", "--comment", "a b", "-j", bad), id="after-comment"),
    pytest.param(lambda bad: ("", bad), id="with-empty"),
])
def test_join_args_refuses_line_breaking_characters(bad: str, args: object) -> None:
    """A newline, carriage return or NUL in any argument raises instead of being written."""
    assert callable(args)
    with pytest.raises(UnsafeRestoreText, match="newline, carriage return or NUL"):
        join_args(args(bad))
    with pytest.raises(UnsafeRestoreText):
        Rule("KUBE-SERVICES", args(bad)).restore_line()


@pytest.mark.parametrize("bad", [*UNSAFE, "KUBE SVC", ""])
def test_chain_names_that_break_a_line_are_refused(bad: str) -> None:
    """A chain declaration (and so its -A, -F and -X lines) never holds a bad chain name."""
    with pytest.raises(UnsafeRestoreText, match="chain name"):
        chain_line(bad)
    desired = DesiredTables({"nat": {bad: ChainContent((f"-A {bad} -j RETURN",))}}, [])
    with pytest.raises(UnsafeRestoreText):
        make_plan(desired, {}).payload_lines()


def test_ordinary_arguments_are_still_written() -> None:
    """Blanks, quotes and backslashes are quoted as before, not refused."""
    assert '-m comment --comment "a \\"b\\" c\\\\" -j KUBE-SVC-X' == join_args(
        ("-m", "comment", "--comment", 'a "b" c\\', "-j", "KUBE-SVC-X"))


def test_canonical_comment_is_what_the_kernel_keeps() -> None:
    """A comment over 255 bytes compares as its first 255 bytes, as iptables-save prints it."""
    long = "a" * 200 + " " + "b" * 100
    assert MAX_COMMENT_BYTES == len(kernel_comment(long).encode())
    assert canonical(("-m", "comment", "--comment", long[:255], "-j", "X")) == canonical(
        ("-m", "comment", "--comment", long, "-j", "X"))
    assert "short one" == kernel_comment("short one")
    assert "é" * 127 == kernel_comment("é" * 200)  # never half a character


def long_named_objects() -> tuple[list[ServiceInfo | EndpointSliceInfo], str]:
    """A service whose names are far longer than the model admits (as a buggy source might
    build them), so its comments pass 255 bytes."""
    namespace, name, port_name = "n" * 120, "s" * 120, "p" * 15
    spn = ServicePortName(namespace, name, port_name)
    return [ServiceInfo(namespace, name, (ServicePort(
        spn, Protocol.TCP, IPFamily.IPV4, ipaddress.ip_address("10.96.0.10"), 80,
        node_port=30080),)),
            EndpointSliceInfo(namespace, "slice", name, IPFamily.IPV4,
                              (SlicePort(port_name, Protocol.TCP, 8080),),
                              (Endpoint(ipaddress.ip_address("10.0.1.1"), 0),
                               Endpoint(ipaddress.ip_address("10.0.1.2"), 0)))], str(spn)


@pytest.mark.netns
def test_long_comments_do_not_make_every_full_sync_rewrite(netfilter: Netfilter) -> None:
    """After a sync of rules with comments over 255 bytes, the next full plan is empty."""
    objects, spn = long_named_objects()
    engine = Engine(None, SETTINGS)
    for obj in objects:
        engine.add(obj)
    desired = engine.desired()
    assert any(len(arg.encode()) > MAX_COMMENT_BYTES for content in desired.tables["nat"].values()
               for line in content.lines for arg in split_args(line))
    apply_plan(netfilter, make_plan(desired, netfilter.save()))
    live = netfilter.save()
    stored = [rule for rules in live["nat"].chains.values() for rule in rules if spn[:100] in rule]
    assert [] != stored
    plan = make_plan(desired, live)
    assert ([], []) == ([t.written for t in plan.tables if t.written],
                        [t.deleted for t in plan.tables if t.deleted])
    assert plan.empty


def test_a_rule_printed_over_two_lines_is_read_as_one() -> None:
    """A comment holding a newline (iptables-save prints it raw) continues the rule on the
    next line; an escaped quote does not open one."""
    text = ('*nat\n:PREROUTING ACCEPT [0:0]\n'
            '-A PREROUTING -m comment --comment "a\nb" -j ACCEPT\n'
            '-A PREROUTING -m comment --comment "say \\"hi\\"" -j ACCEPT\n'
            'COMMIT\n')
    for verbatim in (False, True):
        assert ['-m comment --comment "a\nb" -j ACCEPT',
                '-m comment --comment "say \\"hi\\"" -j ACCEPT'] == parse_save(
                    text, verbatim=verbatim)["nat"].chains["PREROUTING"]


def test_a_quote_never_closed_is_an_error_naming_its_line() -> None:
    """A save whose quote never closes is refused with the line it opened on."""
    with pytest.raises(RulesetError, match="line 3: a quote opened"):
        parse_save('*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m comment --comment "a\n')
