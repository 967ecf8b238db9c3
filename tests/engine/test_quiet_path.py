"""The quiet path: other programs' changes are noticed cheaply and repaired, ours ignored.

On nft the change watch names the chains another program touched and only they are read
and repaired; on legacy a table whose size changed gets a full compare. Changes to chains
and tables that are not ours are left alone. Real netfilter on both backends.
"""

from __future__ import annotations

import subprocess

import pytest

from engine.world import SETTINGS, endpoint_slice, owned, service
from iptsync.core import names
from iptsync.engine.reconciler import Engine
from iptsync.kernel import watch
from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.port import Backend

pytestmark = pytest.mark.netns


def iptables(netfilter: Netfilter, *args: str) -> None:
    """A change by another program: the plain iptables command, in the test's namespace."""
    assert netfilter.netns is not None
    subprocess.run(["ip", "netns", "exec", netfilter.netns, netfilter.command, *args],
                   check=True, capture_output=True)


def synced_engine(netfilter: Netfilter) -> Engine:
    engine = Engine(netfilter, SETTINGS, watch=netfilter.change_watch())
    for index in range(2):
        engine.upsert(service(index, "NodePort", False, 1))
        engine.upsert(endpoint_slice(index, [(0, True, True), (1, True, False)]))
    engine.sync(full=True)
    return engine


def test_our_own_syncs_are_not_reported(netfilter: Netfilter) -> None:
    """A partial sync of ours after the first leaves the watch with nothing to report."""
    engine = synced_engine(netfilter)
    engine.upsert(endpoint_slice(0, [(0, True, True), (2, True, False)]))
    engine.sync()
    assert engine.check() is None


def test_flushed_service_chain_is_repaired(netfilter: Netfilter) -> None:
    """A service chain flushed by another program is rewritten; on nft, alone."""
    engine = synced_engine(netfilter)
    before = owned(netfilter)
    svc = names.svc_chain("default/s0:p0", "tcp")
    iptables(netfilter, "-t", "nat", "-F", svc)
    report = engine.check()
    assert report is not None
    assert before == owned(netfilter)
    assert f"nat/{svc}" in report.drifted
    if netfilter.backend is Backend.NFT:
        assert (False, ["nat"], [svc]) == (report.full, [t.table for t in report.plan.tables],
                                           report.plan.tables[0].written)
    assert engine.check() is None


def test_jump_removed_from_a_built_in_chain_is_reinserted(netfilter: Netfilter) -> None:
    """Our jump deleted from nat PREROUTING comes back; the chain's other rules stay."""
    engine = synced_engine(netfilter)
    iptables(netfilter, "-t", "nat", "-A", "PREROUTING", "-s", "192.0.2.1/32", "-j", "RETURN")
    iptables(netfilter, "-t", "nat", "-D", "PREROUTING", "-m", "comment", "--comment",
             "kubernetes service portals", "-j", names.KUBE_SERVICES)
    report = engine.check()
    assert report is not None
    rules = netfilter.save(["nat"])["nat"].chains["PREROUTING"]
    assert names.KUBE_SERVICES in rules[0]
    assert ["-s 192.0.2.1/32 -j RETURN"] == rules[1:]


def test_foreign_chains_and_tables_are_left_alone(netfilter: Netfilter) -> None:
    """A CNI's own nat chain and a mangle rule change nothing of ours and are kept."""
    engine = synced_engine(netfilter)
    before = owned(netfilter)
    iptables(netfilter, "-t", "nat", "-N", "CNI-TEST")
    iptables(netfilter, "-t", "nat", "-A", "CNI-TEST", "-j", "RETURN")
    iptables(netfilter, "-t", "mangle", "-A", "PREROUTING", "-j", "RETURN")
    report = engine.check()
    if netfilter.backend is Backend.NFT:
        assert report is None  # nothing of ours was touched: nothing read
    else:
        assert report is not None  # nat grew: compared everything ...
        assert report.plan.empty  # ... and found nothing to do
    assert before == owned(netfilter)
    assert ["-j RETURN"] == netfilter.save(["nat"])["nat"].chains["CNI-TEST"]


def test_a_first_sync_larger_than_the_watchs_buffer_is_not_taken_for_damage(
        netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first sync announcing more than the notification socket holds (at 10,000 services,
    more than its 64 MB) leaves nothing to report when its batches are read as they come:
    before, the overrun was taken for lost foreign changes and a full compare followed.
    Here the buffer is cut to 256 KB and 120 services are written in batches of 200 lines."""
    monkeypatch.setattr(watch, "_RECEIVE_BUFFER", 128 << 10)  # the kernel doubles it
    netfilter = Netfilter(Backend.NFT, netns=netns)
    engine = Engine(netfilter, SETTINGS, watch=netfilter.change_watch(), stage_lines=200)
    for index in range(120):
        engine.upsert(service(index, "NodePort", False, 2))
        engine.upsert(endpoint_slice(index, [(0, True, True), (1, True, False),
                                             (2, True, False)]))
    report = engine.sync(full=True)
    assert len(report.plan.stages()) > 3  # each batch announced well under the buffer
    assert sum(len(t.written) for t in report.plan.tables) > 1000
    assert engine.check() is None
