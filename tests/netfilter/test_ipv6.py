"""IPv6 rules applied to real netfilter (ip6tables, both backends) in a private namespace.

ip6tables-save prints some rules differently from what kube-proxy (and iptsync) write: a bare
``-j REJECT`` comes back as ``-j REJECT --reject-with icmp6-port-unreachable``, the recent
match's mask as ``ffff:...:ffff``. Each family's engine compares in its own family's spelling,
so a resync of an unchanged IPv6 ruleset changes nothing, and the two families' tables (which
hold the same chain names for a dual-stack Service) are kept apart.
"""

from __future__ import annotations

from typing import Any

from render.golden import SCENARIOS, scenario_settings

from iptsync.core import names
from iptsync.core.model import IPFamily
from iptsync.core.plan import cleanup_plan, comparable
from iptsync.engine.apply import apply_plan
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.port import NetfilterPort
from iptsync.sources.files import load_objects

# Every rule shape on IPv6: affinity (recent), REJECT on each entry point, DROP for no local
# endpoint, the load-balancer firewall, ITP Local, the terminating fallback, UDP and TCP.
OBJECTS = [*load_objects([SCENARIOS / f"{name}.yaml" for name in (
    "dualstack-clusterip-affinity", "dualstack-nodeport-externalip",
    "dualstack-loadbalancer-etp-local", "dualstack-no-endpoints",
    "ipv6-etp-local-without-local", "ipv6-itp-local", "ipv6-terminating-only")]).objects]
GONE_SLICE: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": "gone-1", "namespace": "default",
                 "labels": {"kubernetes.io/service-name": "gone"}},
    "addressType": "IPv6", "ports": [{"port": 80}],
    "endpoints": [{"addresses": ["fd00:10:0:2::50"], "nodeName": "node2"}]}


def engine(netfilter: NetfilterPort, family: IPFamily = IPFamily.IPV6) -> Engine:
    """An engine for ``family`` holding OBJECTS, as the agent builds one per family."""
    built = Engine(netfilter, scenario_settings("dualstack", family))
    for obj in OBJECTS:
        built.upsert(obj)
    return built


def live(netfilter: NetfilterPort) -> dict[str, dict[str, list[str]]]:
    return {table: saved.chains for table, saved in netfilter.save().items()}


def assert_kernel_holds_desired(netfilter: NetfilterPort, synced: Engine) -> None:
    """The kernel's save equals the desired rules in their family's canonical spelling (in
    order, but for the services' rules of a top-level chain: see ChainContent)."""
    tables = live(netfilter)
    desired = synced.desired()
    for table, chains in desired.tables.items():
        for chain, content in chains.items():
            assert (table, chain, comparable(content.canonical_rules(), content.free)) == (
                table, chain, comparable(tables[table].get(chain, []), content.free))


def test_ipv6_rules_read_back_in_the_ip6tables_spelling(kernel6: NetfilterPort) -> None:
    """After one IPv6 sync ip6tables-save (and the fake kernel as ip6tables) shows exactly the
    rendered rules, REJECT with icmp6-port-unreachable and the recent match with the IPv6
    mask."""
    synced = engine(kernel6)
    assert not synced.sync().plan.empty
    assert_kernel_holds_desired(kernel6, synced)
    rules = [rule for chains in live(kernel6).values() for rules in chains.values()
             for rule in rules]
    assert 5 == sum("-j REJECT --reject-with icmp6-port-unreachable" in r for r in rules)
    assert 4 == sum("--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" in r for r in rules)


def test_ipv6_resync_and_restart_change_nothing(kernel6: NetfilterPort) -> None:
    """A full resync of unchanged IPv6 state, and a restarted engine's first sync onto the
    rules it left, plan no change and report no drift."""
    synced = engine(kernel6)
    synced.sync()
    again = synced.sync(full=True)
    assert ("no changes", []) == (again.plan.summary(), again.drifted)
    restarted = engine(kernel6).sync()
    assert "no changes" == restarted.plan.summary()


def test_ipv6_partial_syncs_leave_nothing_for_a_full_sync(kernel6: NetfilterPort) -> None:
    """A Service gaining endpoints (its REJECTs deleted, chains added) and losing them again,
    synced partially, leaves the kernel as a full sync would write it."""
    synced = engine(kernel6)
    synced.sync()
    for change in (synced.upsert, synced.delete):
        change(GONE_SLICE)
        partial = synced.sync()
        assert (False, ["filter", "nat"]) == (partial.full, [t.table for t in partial.plan.tables])
        assert "no changes" == synced.sync(full=True).plan.summary()
        assert_kernel_holds_desired(kernel6, synced)


def test_each_family_keeps_its_own_tables(netfilter6: Netfilter) -> None:
    """Both families' engines on one node: the same chain names live in iptables and in
    ip6tables, each resync changes nothing, a chain gone stale in one family is deleted from
    that family's table only, and removing the IPv6 rules leaves IPv4 alone."""
    netfilter4 = Netfilter(netfilter6.backend, netns=netfilter6.netns)
    ipv4, ipv6 = engine(netfilter4, IPFamily.IPV4), engine(netfilter6)
    ipv4.sync()
    ipv6.sync()
    shared = set(live(netfilter4)["nat"]) & set(live(netfilter6)["nat"])
    assert {names.svc_chain("prod/web:http", "tcp"),
            names.fw_chain("prod/shop:https", "tcp")} <= shared
    assert "no changes" == ipv4.sync(full=True).plan.summary()
    assert "no changes" == ipv6.sync(full=True).plan.summary()
    web = names.svc_chain("prod/web:http", "tcp")
    ipv6.delete(next(o for o in OBJECTS if o["metadata"]["name"] == "web-v6"))  # no endpoints
    deleted = {t.table: t.deleted for t in ipv6.sync(full=True).plan.tables}
    assert web in deleted["nat"]
    assert (web in live(netfilter4)["nat"], web in live(netfilter6)["nat"]) == (True, False)
    assert "no changes" == ipv4.sync(full=True).plan.summary()
    before = live(netfilter4)
    apply_plan(netfilter6, cleanup_plan(netfilter6.save(), IPFamily.IPV6))
    assert [] == [c for t, chains in live(netfilter6).items() for c in chains
                  if names.is_deletable_chain(t, c)]
    assert before == live(netfilter4)
