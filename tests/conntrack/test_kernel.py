"""Conntrack cleanup against the real kernel, in a namespace of the test's own.

Real flows: the namespace holds the node's and the pods' addresses on a veth pair inside it, a
DNAT rule (both backends, both families) sends the service's traffic to one pod address, and
UDP datagrams sent from inside it to the cluster IP and the external IP leave real conntrack
entries; each sync then runs the real cleanup with the engine's view of the objects. (The
rules the engine renders are tested with real packets in tests/dataplane.) Synthetic tables
(the kernel-side filter, NodePorts, counts among unrelated flows) are created over ctnetlink.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from conntrack.objects import (
    CLUSTER_IP,
    EXTERNAL_IP,
    NODE_IP,
    NODE_PORT,
    PORT,
    TARGET_PORT,
    dns_service,
    dns_slice,
    endpoint,
    pod_ip,
    settings,
)
from iptsync.core.flows import UDP, Flow, FlowQuery, FlowTargets, flow_targets
from iptsync.core.model import IPFamily
from iptsync.engine.reconciler import Engine
from iptsync.kernel.conntrack import NewEntry, clear_stale_flows, insert_flows, list_flows
from iptsync.kernel.netfilter import Netfilter
from iptsync.lab.netns import ip, ns_exec, thread_in_netns

FAMILIES = pytest.mark.parametrize("family", list(IPFamily), ids=lambda f: f.value)
PREFIX = {IPFamily.IPV4: 32, IPFamily.IPV6: 128}
ROUTED = {IPFamily.IPV4: ("10.96.0.0/12", "198.51.100.0/24"),
          IPFamily.IPV6: ("fd00:96::/108", "2001:db8:51::/64")}


class Node:
    """A namespace holding the node and pod addresses; a plain DNAT rule (on one backend)
    sends the service's traffic to one endpoint, and :meth:`sync` runs the cleanup a sync
    runs (:func:`flow_targets` of the engine's state, then :func:`clear_stale_flows`)."""

    def __init__(self, netfilter: Netfilter, family: IPFamily) -> None:
        assert netfilter.netns is not None
        self.netns, self.family = netfilter.netns, family
        self.netfilter = replace(netfilter, family=family)
        self.engine = Engine(None, settings(family))
        # A veth pair with both ends inside (no dummy module on every machine): the node.
        ip(self.netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        for link in ("eth0", "eth1"):
            ip(self.netns, "link", "set", link, "up")
        nodad = ["nodad"] if family is IPFamily.IPV6 else []
        for address in (NODE_IP[family], *(pod_ip(family, i) for i in (1, 2))):
            ip(self.netns, "addr", "add", f"{address}/{PREFIX[family]}", "dev", "eth0", *nodad)
        for cidr in ROUTED[family]:
            ip(self.netns, "route", "add", cidr, "dev", "eth0")
        self.netfilter.run("-t", "nat", "-N", "SERVICE")
        self.netfilter.run("-t", "nat", "-A", "OUTPUT", "-j", "SERVICE")

    def route_to(self, index: int) -> None:
        """New flows to the cluster IP and the external IP go to endpoint ``index``."""
        self.netfilter.run("-t", "nat", "-F", "SERVICE")
        host = pod_ip(self.family, index)
        target = f"[{host}]" if self.family is IPFamily.IPV6 else host
        for address in (CLUSTER_IP[self.family], EXTERNAL_IP[self.family]):
            self.netfilter.run("-t", "nat", "-A", "SERVICE", "-p", "udp", "-d", address,
                               "--dport", str(PORT), "-j", "DNAT", "--to-destination",
                               f"{target}:{TARGET_PORT}")

    def sync(self, *objects: dict[str, Any]) -> int:
        """Take the objects and clean up as a partial sync of the service does; returns the
        flows deleted."""
        for obj in objects:
            self.engine.upsert(obj)
        with thread_in_netns(self.netns):
            return clear_stale_flows(flow_targets(self.engine.state, self.engine.settings,
                                                  {("default", "dns")}))

    def send(self, address: str, port: int, client_port: int) -> None:
        """One datagram from the node's address and ``client_port``."""
        with thread_in_netns(self.netns), socket.socket(
                socket.AF_INET if self.family is IPFamily.IPV4 else socket.AF_INET6,
                socket.SOCK_DGRAM) as sock:
            sock.bind((NODE_IP[self.family], client_port))
            sock.sendto(b"ping", (address, port))

    def flows(self) -> set[tuple[str, int, str]]:
        """(original destination, port, reply source) of the UDP flows in the table."""
        with thread_in_netns(self.netns):
            return {(f.orig_dst, f.orig_dport, f.reply_src)
                    for f in list_flows(self.family, FlowQuery(UDP))}


@FAMILIES
def test_flows_to_a_terminating_but_serving_endpoint_survive_until_it_goes(
        netfilter: Netfilter, family: IPFamily) -> None:
    """UDP flows pinned to an endpoint survive a sync while it terminates but still serves
    (cluster IP and external IP), and are deleted by the sync after it is gone; the flow to
    the new endpoint stays."""
    node = Node(netfilter, family)
    old, new = pod_ip(family, 1), pod_ip(family, 2)
    node.route_to(1)
    node.sync(dns_service(family, kind="ClusterIP"), dns_slice(family, endpoint(family, 1)))
    destinations = [(CLUSTER_IP[family], PORT), (EXTERNAL_IP[family], PORT)]
    for client_port, (address, port) in enumerate(destinations, 40001):
        node.send(address, port, client_port)
    pinned = {(address, port, old) for address, port in destinations}
    assert pinned == node.flows()

    node.route_to(2)
    deleted = node.sync(dns_slice(family, endpoint(family, 1, ready=False, serving=True,
                                                   terminating=True), endpoint(family, 2)))
    node.send(CLUSTER_IP[family], PORT, 40009)
    assert (0, pinned | {(CLUSTER_IP[family], PORT, new)}) == (deleted, node.flows())

    deleted = node.sync(dns_slice(family, endpoint(family, 2)))
    assert (2, {(CLUSTER_IP[family], PORT, new)}) == (deleted, node.flows())


def unrelated(family: IPFamily, count: int) -> Iterator[NewEntry]:
    """``count`` UDP flows to DNS servers outside the cluster, answered, never DNATed."""
    for index in range(count):
        server = (f"192.0.2.{index % 250 + 1}" if family is IPFamily.IPV4
                  else f"2001:db8:53::{index % 250 + 1:x}")
        client = (f"10.1.{index // 250 % 250}.{index % 250 + 1}" if family is IPFamily.IPV4
                  else f"fd00:2::{index + 1:x}")
        yield NewEntry(Flow(UDP, server, PORT, server, PORT), client, 20000 + index % 40000,
                       replied=True)


@FAMILIES
def test_cleanup_deletes_only_stale_entries_among_unrelated_ones(
        netns: str, family: IPFamily) -> None:
    """Among 2,000 unrelated UDP flows to port 53 elsewhere, only the flows to the service
    (cluster IP, NodePort on the node's address) that no serving endpoint answers are
    deleted, those to a serving endpoint stay; in a full sync and in a partial one."""
    client = NODE_IP[family]
    serving, gone = pod_ip(family, 1), pod_ip(family, 9)
    service_flows = [
        NewEntry(Flow(UDP, CLUSTER_IP[family], PORT, serving, TARGET_PORT), client, 40001),
        NewEntry(Flow(UDP, CLUSTER_IP[family], PORT, gone, TARGET_PORT), client, 40002),
        NewEntry(Flow(UDP, NODE_IP[family], NODE_PORT, gone, TARGET_PORT), client, 40003),
        NewEntry(Flow(UDP, CLUSTER_IP[family], PORT, CLUSTER_IP[family], PORT), client, 40004),
    ]
    for partial in (False, True):
        targets = FlowTargets(family, {(CLUSTER_IP[family], PORT): frozenset({serving})},
                              {NODE_PORT: frozenset({serving})}, partial=partial)
        with thread_in_netns(netns):
            insert_flows(family, [*unrelated(family, 2000), *service_flows])
            deleted = clear_stale_flows(targets)
            left = list_flows(family)
        ns_exec(netns, ["conntrack", "-F", "-f", family.value.lower()])
        assert 3 == deleted
        assert 2001 == len(left)
        assert [Flow(UDP, CLUSTER_IP[family], PORT, serving, TARGET_PORT)] == [
            flow for flow in left
            if flow.orig_dport != PORT or flow.orig_dst == CLUSTER_IP[family]]


def test_the_kernel_returns_only_the_flows_a_query_names(netns: str) -> None:
    """The kernel-side filter by address, port and protocol returns exactly the matching
    IPv4 flows; by port alone, the IPv6 ones; by status, the DNATed flows or those neither
    DNATed nor answered."""
    v4 = [NewEntry(Flow(UDP, dst, port, dst, port), "10.1.0.1", 40000 + i, replied=i == 0)
          for i, (dst, port) in enumerate([("10.96.0.10", 53), ("10.96.0.10", 54),
                                           ("10.96.0.11", 53)])]
    v6 = [NewEntry(Flow(UDP, dst, port, dst, port), "fd00:2::1", 40000 + i)
          for i, (dst, port) in enumerate([("fd00:96::10", 53), ("fd00:96::11", 54)])]
    with thread_in_netns(netns):
        insert_flows(IPFamily.IPV4, v4)
        insert_flows(IPFamily.IPV6, v6)
        by_address = list_flows(IPFamily.IPV4, FlowQuery(UDP, "10.96.0.10", 53))
        by_port = list_flows(IPFamily.IPV4, FlowQuery(UDP, None, 53))
        v6_by_port = list_flows(IPFamily.IPV6, FlowQuery(UDP, None, 53))
        tcp = list_flows(IPFamily.IPV4, FlowQuery(6))
        dnat = list_flows(IPFamily.IPV4, FlowQuery(UDP, None, 53, dnat=True))
        unanswered = list_flows(IPFamily.IPV4, FlowQuery(UDP, None, 53, dnat=False))
    assert [v4[0].flow] == by_address
    assert {v4[0].flow, v4[2].flow} == set(by_port)
    assert [v6[0].flow] == v6_by_port
    assert [] == tcp
    assert ([], [v4[2].flow]) == (dnat, unanswered)  # v4[0] was answered
