"""The fault suite at toy size: two quick faults on both backends, and how it reports.

It checks the suite, not the agent's robustness: the faults chosen here (an API outage with
resets, an external flush of the nat table) are ones the agent handles, so each row must say
converged, nothing lost, ``diff --live`` clean; and a fault that is not handled must come out
as a result in the table, not as a crash.
"""

from __future__ import annotations

import pytest

from bench.faults import (
    INJECTED_RULE,
    Expect,
    NatView,
    Options,
    Row,
    Svc,
    run_suite,
    service_ports,
    table,
)
from bench.generate import cluster
from iptsync.kernel.netfilter import Backend

QUICK = ("outage-rst", "flush-nat")
SAVED_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-AAAA - [0:0]
:KUBE-SVC-BBBB - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAAA
-A KUBE-SERVICES -d 10.96.0.2/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-BBBB
-A KUBE-SVC-AAAA -j KUBE-SEP-AAAA
COMMIT
"""
A, B = Svc("ns", "a", "KUBE-SVC-AAAA"), Svc("ns", "b", "KUBE-SVC-BBBB")


@pytest.fixture(scope="module")
def rows(netns_available: None) -> list[Row]:
    opts = Options(services=6, endpoints=1, sync_period=2.0, timeout=30.0, outage=1.0)
    return run_suite(opts, [Backend.NFT, Backend.LEGACY], QUICK)


@pytest.mark.netns
def test_quick_faults_converge_and_lose_nothing(rows: list[Row]) -> None:
    """An outage with resets and a nat flush converge on both backends, nothing lost, and
    ``iptsync diff --live`` finds the kernel as a full sync would leave it."""
    assert [(name, backend, "ok", 0, True) for backend in ("nft", "legacy")
            for name in QUICK] == [
        (r.fault, r.backend, r.result, r.lost, r.converge is not None
         and "diff --live: clean" in r.notes) for r in rows]


@pytest.mark.netns
def test_table_has_one_row_per_fault_and_backend(rows: list[Row]) -> None:
    """The Markdown table has the documented columns and one row per fault and backend."""
    lines = table(rows).splitlines()
    assert ["fault", "backend", "converge (s)", "lost services", "result", "notes"] == [
        cell.strip() for cell in lines[0].strip("|").split("|")]
    assert [f"{r.fault} {r.backend}" for r in rows] == [
        " ".join(cell.strip() for cell in line.strip("|").split("|")[:2])
        for line in lines[2:]]


def test_a_fault_not_handled_is_a_result() -> None:
    """Not converged, lost services and an injected rule all show in the result column."""
    row = Row("partition", "nft", converge=None, timeout=90.0, lost=3)
    row.judge(injected=True)
    assert "not converged within 90 s; LOST 3; INJECTED" == row.result


def test_a_service_counts_when_its_chain_has_rules_and_is_reached() -> None:
    """A service is programmed only when its SVC chain holds rules and KUBE-SERVICES jumps
    to it (an empty, flushed chain is missing), and only while nat's hooks reach
    KUBE-SERVICES."""
    view = NatView.parse(SAVED_NAT)
    unhooked = NatView.parse(SAVED_NAT.replace("-A OUTPUT ", "-A NOWHERE "))
    assert ([B], [A, B], False) == (view.missing([A, B]), unhooked.missing([A, B]),
                                    Expect([A]).met(unhooked))


def test_injected_rule_is_seen() -> None:
    """The hostile name's DNAT rule, once in the nat table, is reported as injected."""
    assert (False, True) == (NatView.parse(SAVED_NAT).injected,
                             NatView.parse(SAVED_NAT + INJECTED_RULE + "\n").injected)


def test_service_ports_name_the_chains_the_agent_writes() -> None:
    """Every generated Service gives one SVC chain, named as kube-proxy names it."""
    objects = cluster(3, 1)["items"]
    assert ["KUBE-SVC-7PT6TG7SOSJ53WSD", "KUBE-SVC-I2LYYY7PAQCH4WVM",
            "KUBE-SVC-SL7O7TX3RJBYGQLN"] == [s.chain for s in service_ports(objects)]
