"""The dual-stack flags as kube-proxy spells them, and which IP families a node programs.

`--cluster-cidr` takes one CIDR per family, `--node-ip` one address per family (repeated or
comma-separated), `--nodeport-addresses` CIDRs of both families or kube-proxy's `primary`.
The flags go through the command line itself (`iptsync dump`, no root needed).
"""

from __future__ import annotations

import ipaddress

import pytest
from click.testing import CliRunner, Result

from iptsync.cli import main
from iptsync.core.model import IPFamily, NodeInfo
from iptsync.core.policy import Settings
from iptsync.engine.families import node_families, offline_families
from iptsync.options import with_node

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {namespace: default, name: web}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  type: NodePort
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: default, name: web-v4, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.0.1.10], conditions: {ready: true}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: default, name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["fd00:10:244:1::10"], conditions: {ready: true}}]
"""


def dump(tmp_path_factory: pytest.TempPathFactory, *flags: str) -> Result:
    objects = tmp_path_factory.mktemp("objects") / "web.yaml"
    objects.write_text(SERVICE)
    return CliRunner().invoke(main, ["dump", "--objects", str(objects), "--hostname-override",
                                     "node1", *flags])


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(("flags", "message"), [
    (("--cluster-cidr", "10.0.0.0/16,10.1.0.0/16"),
     "--cluster-cidr: must be either a single CIDR or a dual-stack pair of CIDRs (e.g. "
     "10.100.0.0/16,fde4:8dba:82e1::/48)"),
    (("--node-ip", "fd00::2", "--node-ip", "fd00::3"),
     "--node-ip: fd00::2 and fd00::3 are both IPv6; give at most one per IP family (IPv4,IPv6)"),
    (("--nodeport-addresses", "primary,10.0.0.0/8"),
     "--nodeport-addresses: can't use both 'primary' and CIDRs"),
])
def test_two_values_of_one_family_are_refused_naming_the_flag(
        tmp_path_factory: pytest.TempPathFactory, flags: tuple[str, ...], message: str) -> None:
    """A second value of one family (or primary among CIDRs) is a usage error naming the
    flag and both values; nothing is printed."""
    result = dump(tmp_path_factory, *flags)
    assert (2, "") == (result.exit_code, result.stdout)
    assert f"Error: {message}" in result.stderr


def test_flags_of_both_families_reach_each_family(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A CIDR pair, node IPs repeated and comma-separated, NodePort CIDRs of both families:
    each family's rules get that family's values only."""
    result = dump(tmp_path_factory, "--cluster-cidr", "10.0.0.0/14,fd00:10:244::/56",
                  "--node-ip", "10.100.0.2,fd00:100::2", "--nodeport-addresses",
                  "10.100.0.0/24,fd00:100::/64")
    assert 0 == result.exit_code, result.stderr
    _, ipv4, ipv6 = result.stdout.split("# ")
    assert "! -s 10.0.0.0/14 -j KUBE-MARK-MASQ" in ipv4
    assert "-d 10.100.0.2 -j KUBE-NODEPORTS" in ipv4
    assert "fd00" not in ipv4
    assert "! -s fd00:10:244::/56 -j KUBE-MARK-MASQ" in ipv6
    assert "-d fd00:100::2 -j KUBE-NODEPORTS" in ipv6
    assert "10.100" not in ipv6


def test_nodeport_addresses_primary_is_each_familys_primary_node_ip() -> None:
    """`primary` is, per family, the first --node-ip (else the Node's first address) of that
    family as a /32 or /128; an interface address is never taken for it, and a family without
    a known node IP is not restricted (kube-proxy: every address of it)."""
    settings = Settings(node_name="node1", nodeport_primary=True,
                        node_ips=(ip("10.100.0.2"), ip("fd00:100::2")))
    node = NodeInfo("node1", addresses=(ip("10.100.0.9"), ip("fd00:100::9")))
    interfaces = [ip("10.200.0.2"), ip("fd00:200::2")]
    resolved = {family: with_node(settings.for_family(family), node, interfaces)
                for family in IPFamily}
    assert ((ipaddress.ip_network("10.100.0.2/32"),), (ipaddress.ip_network("fd00:100::2/128"),)
            ) == tuple(resolved[f].nodeport_addresses for f in IPFamily)
    from_node = with_node(Settings(node_name="node1", nodeport_primary=True,
                                   family=IPFamily.IPV6), node, interfaces)
    assert (ipaddress.ip_network("fd00:100::9/128"),) == from_node.nodeport_addresses
    unknown = with_node(Settings(node_name="node1", nodeport_primary=True), None, interfaces)
    assert () == unknown.nodeport_addresses
    assert (False, True) == (resolved[IPFamily.IPV4].nodeports_on_localhost,
                             unknown.nodeports_on_localhost)


@pytest.mark.parametrize(("node_ips", "interfaces", "families", "left_out"), [
    ((), ["127.0.0.1", "::1", "10.100.0.2", "fe80::1"], ("IPv4",),
     "node1 has no IPv6 address (none in --node-ip, the node's interfaces)"),
    ((), ["::1", "fd00:100::2", "fe80::1"], ("IPv6",),
     "node1 has no IPv4 address (none in --node-ip, the node's interfaces)"),
    ((), ["10.100.0.2", "fd00:100::2"], ("IPv4", "IPv6"), None),
    (("fd00:100::2",), ["10.100.0.2"], ("IPv6", "IPv4"), None),
    ((), [], ("IPv4",),
     "node1 has no IPv6 address (none in --node-ip, the node's interfaces)"),
])
def test_a_node_programs_the_families_it_has_an_address_of(
        node_ips: tuple[str, ...], interfaces: list[str], families: tuple[str, ...],
        left_out: str | None) -> None:
    """The primary family is --node-ip's, else the first usable interface address's (IPv4
    without any); the other family only with a usable address of it (loopback and link-local
    addresses do not count)."""
    choice = node_families(Settings(node_name="node1", node_ips=tuple(map(ip, node_ips))),
                           [ip(a) for a in interfaces])
    assert (families, left_out) == (tuple(f.value for f in choice.families),
                                    next(iter(choice.left_out.values()), None))


def test_off_the_node_the_node_object_or_else_the_cluster_cidrs_decide() -> None:
    """dump and diff --saved see no interfaces: --node-ip and the Node object's addresses
    decide; when neither names an address, --cluster-cidr's families do."""
    pair = (ipaddress.ip_network("10.0.0.0/14"), ipaddress.ip_network("fd00:10::/56"))
    settings = Settings(node_name="node1", cluster_cidrs=pair)
    ipv4_node = NodeInfo("node1", addresses=(ip("10.100.0.2"),))
    assert ((IPFamily.IPV4,), "node1 has no IPv6 address (none in --node-ip, the Node node1)"
            ) == (offline_families(settings, ipv4_node).families,
                  offline_families(settings, ipv4_node).left_out[IPFamily.IPV6])
    assert (IPFamily.IPV4, IPFamily.IPV6) == offline_families(settings, None).families
    assert (IPFamily.IPV4,) == offline_families(Settings(node_name="node1"), None).families


def test_the_config_file_takes_the_same_per_family_values(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A KubeProxyConfiguration's clusterCIDR pair and nodePortAddresses [primary] act as the
    flags do: each family gets its CIDR, and NodePorts only the node's primary address of
    each family (from the Node object)."""
    config = tmp_path_factory.mktemp("config") / "config.yaml"
    config.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
                      "kind: KubeProxyConfiguration\n"
                      "clusterCIDR: 10.0.0.0/14,fd00:10:244::/56\n"
                      "nodePortAddresses: [primary]\n")
    objects = tmp_path_factory.mktemp("objects") / "node.yaml"
    objects.write_text(SERVICE + "---\napiVersion: v1\nkind: Node\nmetadata: {name: node1}\n"
                       "status: {addresses: [{type: InternalIP, address: 10.100.0.2}, "
                       "{type: InternalIP, address: 'fd00:100::2'}]}\n")
    result = CliRunner().invoke(main, ["dump", "--objects", str(objects), "--config",
                                       str(config), "--hostname-override", "node1"])
    assert 0 == result.exit_code, result.stderr
    _, ipv4, ipv6 = result.stdout.split("# ")
    nodeports = ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
                 'this must be the last rule in this chain" -d {} -j KUBE-NODEPORTS')
    for payload, address, cidr in ((ipv4, "10.100.0.2", "10.0.0.0/14"),
                                   (ipv6, "fd00:100::2", "fd00:10:244::/56")):
        assert [nodeports.format(address)] == [
            line for line in payload.splitlines() if line.startswith("-A KUBE-SERVICES")
            and line.endswith("-j KUBE-NODEPORTS")]
        assert f"! -s {cidr} -j KUBE-MARK-MASQ" in payload
