"""`iptsync run --once`, `dump`, `diff --live` and `cleanup` on a dual-stack node, on real
iptables and ip6tables, both backends.

Each test's node is a namespace of its own with an interface holding the node's
addresses (IPv6 without duplicate address detection, so usable at once): 10.100.0.2 and, on a
dual-stack node, fd00:100::2. Every command runs inside it (``ip netns exec``). The Service
``default/dual`` has cluster IPs 10.96.0.20 and fd00:96::20 and one endpoint per family.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iptsync.core import names
from iptsync.core.model import IPFamily
from iptsync.kernel.netfilter import Netfilter
from iptsync.lab.netns import ip

pytestmark = pytest.mark.netns

CLUSTER_CIDRS = "10.0.0.0/14,fd00:10:244::/56"
SVC = names.svc_chain("default/dual:http", "tcp")  # the same name in both families
V4_RULE = "-d 10.96.0.20/32 -p tcp -m comment --comment \"default/dual:http cluster IP\""
V6_RULE = "-d fd00:96::20/128 -p tcp -m comment --comment \"default/dual:http cluster IP\""


def dual_stack_objects(path: Path) -> Path:
    """``default/dual`` (both families, an endpoint each) as a manifest file."""
    def endpoint_slice(family: str, address: str) -> dict[str, Any]:
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": "default", "name": f"dual-{family.lower()}",
                             "labels": {"kubernetes.io/service-name": "dual"}},
                "addressType": family,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [address], "nodeName": "node1",
                               "conditions": {"ready": True}}]}

    path.write_text(json.dumps({"kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"namespace": "default", "name": "dual"},
         "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00:96::20"],
                  "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                             "protocol": "TCP"}]}},
        endpoint_slice("IPv4", "10.0.1.20"),
        endpoint_slice("IPv6", "fd00:10:244:1::20"),
    ]}))
    return path


def node_with(netns: str, *addresses: str) -> None:
    """Give the node ``addresses`` on an interface of its own (a veth pair inside the
    namespace: no link leaves it), IPv6 ones usable at once."""
    ip(netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    for name in ("eth0", "eth1"):
        ip(netns, "link", "set", name, "up")
    for address in addresses:
        ip(netns, "addr", "add", address, "dev", "eth0", *(("nodad",) if ":" in address else ()))


def iptsync(netfilter: Netfilter, *args: str, stdin: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """The iptsync command line inside the node's namespace, on the netfilter's backend."""
    argv = ["ip", "netns", "exec", netfilter.netns or "", sys.executable, "-m", "iptsync.cli",
            *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False,
                          timeout=60)


def node_args(objects: Path, netfilter: Netfilter) -> list[str]:
    return ["--objects", str(objects), "--hostname-override", "node1", "--cluster-cidr",
            CLUSTER_CIDRS, "--iptables-backend", netfilter.backend.value]


def ipv6(netfilter: Netfilter) -> Netfilter:
    """The same node and backend, ip6tables."""
    return Netfilter(netfilter.backend, netfilter.netns, family=IPFamily.IPV6)


def nat_rules(netfilter: Netfilter, chain: str = names.KUBE_SERVICES) -> list[str]:
    return netfilter.save(["nat"])["nat"].chains.get(chain, [])


def test_run_once_programs_both_families_and_cleanup_removes_both(
        netfilter: Netfilter, tmp_path: Path) -> None:
    """On a node with an address of each family, run --once writes the IPv4 half of a
    dual-stack Service with iptables and the IPv6 half with ip6tables; cleanup removes both."""
    node_with(netfilter.netns or "", "10.100.0.2/24", "fd00:100::2/64")
    objects = dual_stack_objects(tmp_path / "objects.json")
    synced = iptsync(netfilter, "run", "--once", *node_args(objects, netfilter))
    assert 0 == synced.returncode, synced.stderr
    assert "programming IPv4 and IPv6 (primary IPv4)" in synced.stderr
    v4_rules, v6_rules = nat_rules(netfilter), nat_rules(ipv6(netfilter))
    assert [f"{V4_RULE} -m tcp --dport 80 -j {SVC}"] == [r for r in v4_rules if SVC in r]
    assert [f"{V6_RULE} -m tcp --dport 80 -j {SVC}"] == [r for r in v6_rules if SVC in r]
    assert any("--to-destination [fd00:10:244:1::20]:8080" in rule
               for chain, rules in ipv6(netfilter).save(["nat"])["nat"].chains.items()
               if chain.startswith("KUBE-SEP-") for rule in rules)

    cleaned = iptsync(netfilter, "cleanup", "--iptables-backend", netfilter.backend.value)
    assert 0 == cleaned.returncode, cleaned.stderr
    for family in (netfilter, ipv6(netfilter)):  # kubelet's shared KUBE-FIREWALL stays
        assert [] == [chain for table in family.save().values() for chain in table.chains
                      if chain.startswith("KUBE-") and chain != names.KUBE_FIREWALL]


def test_ipv4_only_node_leaves_ipv6_alone_and_says_so_once(netfilter: Netfilter,
                                                           tmp_path: Path) -> None:
    """A node without an IPv6 address (loopback and link-local aside) programs IPv4 only,
    succeeds, and says once why IPv6 is not programmed; ip6tables holds nothing of ours."""
    node_with(netfilter.netns or "", "10.100.0.2/24")
    objects = dual_stack_objects(tmp_path / "objects.json")
    synced = iptsync(netfilter, "run", "--once", *node_args(objects, netfilter))
    assert 0 == synced.returncode, synced.stderr
    said = [line.split("iptsync: ", 1)[1] for line in synced.stderr.splitlines()
            if "programm" in line]
    assert ["programming IPv4 (primary IPv4)",
            "IPv6 is not programmed: node1 has no IPv6 address (none in --node-ip, the node's "
            "interfaces); the IPv6 addresses of Services get no rules here"] == said
    assert any(SVC in rule for rule in nat_rules(netfilter))
    assert [] == [chain for chain in ipv6(netfilter).save(["nat"])["nat"].chains
                  if chain.startswith("KUBE-")]


def test_dump_ipv6_pipes_into_ip6tables_restore_as_a_sync_writes(netfilter: Netfilter,
                                                                 tmp_path: Path) -> None:
    """`dump --ip-family IPv6` is the IPv6 payload alone: piped into ip6tables-restore (which
    flushes first) over a dual-stack sync's rules, it leaves ip6tables exactly as it was."""
    node_with(netfilter.netns or "", "10.100.0.2/24", "fd00:100::2/64")
    objects = dual_stack_objects(tmp_path / "objects.json")
    synced = iptsync(netfilter, "run", "--once", *node_args(objects, netfilter))
    assert 0 == synced.returncode, synced.stderr
    before = ipv6(netfilter).save()
    dumped = iptsync(netfilter, "dump", "--ip-family", "IPv6", "--node-ip", "fd00:100::2",
                     *node_args(objects, netfilter)[:-2])
    assert 0 == dumped.returncode, dumped.stderr
    assert dumped.stdout.startswith("*filter\n")
    restored = subprocess.run(["ip", "netns", "exec", netfilter.netns or "",
                               f"{ipv6(netfilter).command}-restore"], input=dumped.stdout,
                              capture_output=True, text=True, check=False, timeout=60)
    assert 0 == restored.returncode, restored.stderr
    assert before == ipv6(netfilter).save()


def test_diff_live_shows_each_family(netfilter: Netfilter, tmp_path: Path) -> None:
    """diff --live compares both families: clean after a sync (exit 0, a line each); an IPv6
    rule deleted by hand is reported under the IPv6 rules only (exit 1)."""
    node_with(netfilter.netns or "", "10.100.0.2/24", "fd00:100::2/64")
    objects = dual_stack_objects(tmp_path / "objects.json")
    assert 0 == iptsync(netfilter, "run", "--once", *node_args(objects, netfilter)).returncode
    clean = iptsync(netfilter, "diff", "--live", *node_args(objects, netfilter))
    backend = netfilter.backend.value
    assert (0, f"no changes: the live IPv4 rules ({backend}) already hold the IPv4 rules a "
               f"sync for node1 writes\nno changes: the live IPv6 rules ({backend}) already "
               "hold the IPv6 rules a sync for node1 writes\n") == (clean.returncode,
                                                                   clean.stdout)

    ipv6(netfilter).run("-t", "nat", "-D", SVC, "2")  # the rule to the IPv6 endpoint
    drifted = iptsync(netfilter, "diff", "--live", "--json", *node_args(objects, netfilter))
    assert 1 == drifted.returncode, drifted.stderr
    report = json.loads(drifted.stdout)
    assert (True, [("IPv4", False, {}), ("IPv6", True, {SVC: 1})]) == (
        report["changed"],
        [(entry["family"], entry["changed"],
          {chain: len(change["added"]) for chain, change in
           entry["tables"].get("nat", {}).get("rewrite", {}).items()})
         for entry in report["families"]])
