"""The lab's scenario is read from examples/lab, and a scenario that does not fit is refused.

Conventions (the address plan of examples/lab, dual-stack): node networks 10.100.0.0/24 and
fd00:100::/64, node1 10.100.0.2 / fd00:100::2 with pods in 10.0.1.0/24 and fd00:10:244:1::/64,
node2 10.100.0.3 / fd00:100::3 with 10.0.2.0/24 and fd00:10:244:2::/64, the external client
10.100.0.100 / fd00:100::100 routing 203.0.113.0/24 and 2001:db8:203::/64 via node1. None of
this needs root: nothing is built.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from iptsync.cli import main
from iptsync.lab.measure import run_lab
from iptsync.lab.scenario import ClientRoute, load_scenario, manifests_dir
from iptsync.lab.topology import LabError, NodeSpec, PodSpec

DUMP_ARGS = ("--hostname-override", "node1", "--cluster-cidr", "10.0.0.0/14")
LAB_ONLY = ("pods.yaml", "lab.yaml")
"""The files only the lab reads (Pods and the LabNetwork document)."""


def lab_copy(tmp_path: Path, file: str = "", old: str = "", new: str = "") -> Path:
    """A copy of examples/lab with ``old`` replaced by ``new`` once in ``file``."""
    copy = tmp_path / "lab"
    shutil.copytree(manifests_dir(), copy)
    if file:
        text = (copy / file).read_text()
        assert old in text, f"{old!r} not in {file}"
        (copy / file).write_text(text.replace(old, new, 1))
    return copy


def test_scenario_is_the_documented_lab() -> None:
    """Dual-stack nodes, client, pods with the service each backs, services by type with
    their families (IPv4-only, IPv6-only, dual-stack), dump, ExternalName."""
    scenario = load_scenario(manifests_dir())
    assert (NodeSpec("node1", "10.100.0.2", "10.0.1.0/24", "fd00:100::2", "fd00:10:244:1::/64"),
            NodeSpec("node2", "10.100.0.3", "10.0.2.0/24", "fd00:100::3",
                     "fd00:10:244:2::/64")) == scenario.nodes
    assert ("10.100.0.0/24", "10.100.0.1", "10.0.0.0/14", "10.100.0.100") == (
        scenario.node_cidr, scenario.gateway_ip, scenario.cluster_cidr, scenario.client_ip)
    assert ("fd00:100::/64", "fd00:100::1", "fd00:10:244::/56", "fd00:100::100") == (
        scenario.node_cidr6, scenario.gateway_ip6, scenario.cluster_cidr6, scenario.client_ip6)
    assert "10.0.0.0/14,fd00:10:244::/56" == scenario.cluster_cidrs
    assert (ClientRoute("203.0.113.0/24", "node1"),
            ClientRoute("2001:db8:203::/64", "node1")) == scenario.client_routes
    assert [("client1", "node1", "10.0.1.3", "fd00:10:244:1::3", None),
            ("server1", "node1", "10.0.1.2", "fd00:10:244:1::2", "server-service"),
            ("server2", "node2", "10.0.2.2", "fd00:10:244:2::2", "server-service"),
            ("deploy-nginx-1", "node1", "10.0.1.10", "fd00:10:244:1::10", "deploy-svc"),
            ("deploy-nginx-2", "node1", "10.0.1.11", "fd00:10:244:1::11", "deploy-svc"),
            ("deploy-nginx-3", "node2", "10.0.2.10", "fd00:10:244:2::10", "deploy-svc"),
            ("server6-1", "node1", "10.0.1.20", "fd00:10:244:1::20", "server6-service"),
            ("server6-2", "node2", "10.0.2.20", "fd00:10:244:2::20", "server6-service")] == [
        (p.name, p.node, p.ip, p.ip6, p.service) for p in scenario.pods]
    assert [("server-service", "ClusterIP", ("IPv4",), "10.3.241.152", None, 80, 8080, None,
             None, None),
            ("server6-service", "ClusterIP", ("IPv6",), None, "fd00:10:96::152", 80, 8080, None,
             None, None),
            ("deploy-svc", "LoadBalancer", ("IPv4", "IPv6"), "10.96.100.100", "fd00:10:96::100",
             80, 8080, 30200, "203.0.113.10", "2001:db8:203::10"),
            ("external-svc", "ExternalName", (), None, None, None, None, None, None, None)] == [
        (s.name, s.kind, s.families, s.cluster_ip, s.cluster_ip6, s.port, s.target_port,
         s.node_port, s.lb_ip, s.lb_ip6)
        for s in scenario.services]
    assert ("client1", "node1", "default/deploy-svc", "default/external-svc") == (
        scenario.client_pod.name, scenario.dump_node, scenario.dump_service.ref,
        scenario.external_name.ref)


def test_cluster_spec_starts_echo_servers_on_the_container_ports() -> None:
    """Each pod gets its Pod's container ports; client1 declares none, so it runs no server."""
    spec = load_scenario(manifests_dir()).cluster_spec()
    assert PodSpec("client1", "node1", "10.0.1.3", (), (), "fd00:10:244:1::3") == spec.pods[0]
    assert {((8080,), ())} == {(pod.tcp_ports, pod.udp_ports) for pod in spec.pods[1:]}
    assert ("10.100.0.0/24", "10.100.0.1", "10.100.0.100", "10.0.0.0/14") == (
        spec.node_cidr, spec.gateway_ip, spec.client_ip, spec.cluster_cidr)
    assert ("fd00:100::/64", "fd00:100::1", "fd00:100::100", "fd00:10:244::/56") == (
        spec.node_cidr6, spec.gateway_ip6, spec.client_ip6, spec.cluster_cidr6)


def test_iptsync_passes_over_the_documents_only_the_lab_reads(tmp_path: Path) -> None:
    """`iptsync dump --objects examples/lab` prints the same, and warns of nothing, as without
    the Pods and the LabNetwork document."""
    without = lab_copy(tmp_path)
    for name in LAB_ONLY:
        (without / name).unlink()
    runner = CliRunner()
    full = runner.invoke(main, ["dump", "--objects", str(manifests_dir()), *DUMP_ARGS])
    bare = runner.invoke(main, ["dump", "--objects", str(without), *DUMP_ARGS])
    assert (0, "") == (full.exit_code, full.stderr)
    assert bare.stdout == full.stdout


@pytest.mark.parametrize(("file", "old", "new", "message"), [
    ("pods.yaml", 'status: {podIP: 10.0.1.2, podIPs: [{ip: 10.0.1.2}, {ip: "fd00:10:244:1::2"}]}',
     "status: {}", "Pod default/server1: status.podIP: missing"),
    ("pods.yaml", "{ip: 10.0.1.2}", "{ip: 10.0.1.999}",
     "Pod default/server1: status.podIPs[0].ip: not an IP address: '10.0.1.999'"),
    ("pods.yaml", "{ip: 10.0.1.2}", "{ip: 10.0.2.50}",
     "Pod default/server1: status.podIPs: 10.0.2.50 is not in node1's pod CIDR 10.0.1.0/24"),
    ("pods.yaml", '{ip: "fd00:10:244:1::2"}', '{ip: "fd00:10:244:2::2"}',
     "Pod default/server1: status.podIPs: fd00:10:244:2::2 is not in node1's pod CIDR "
     "fd00:10:244:1::/64"),
    ("pods.yaml", '{ip: "fd00:10:244:1::2"}', "{ip: 10.0.1.5}",
     "Pod default/server1: status.podIPs: holds more than one address of a family: "
     "['10.0.1.2', '10.0.1.5']"),
    ("pods.yaml", "nodeName: node2", "nodeName: node3",
     "Pod default/server2: spec.nodeName: no Node 'node3' in the manifests"),
    ("pods.yaml", "containerPort: 8080", "containerPort: http",
     "Pod default/server1: spec.containers[0].ports[0].containerPort: must be a number, "
     "not 'http'"),
    ("nodes.yaml", '  podCIDR: 10.0.1.0/24\n  podCIDRs: [10.0.1.0/24, "fd00:10:244:1::/64"]\n', "",
     "Node node1: spec.podCIDR: missing"),
    ("nodes.yaml", '  podCIDRs: [10.0.1.0/24, "fd00:10:244:1::/64"]\n', "",
     "Node node1: spec.podCIDRs: a node with an IPv6 InternalIP address needs an IPv6 pod "
     "CIDR, and one without needs none"),
    ("nodes.yaml", "type: InternalIP, address: 10.100.0.3", "type: ExternalIP, address: 1.2.3.4",
     "Node node2: status.addresses: needs one IPv4 InternalIP address and at most one IPv6 "
     "one"),
    ("lab.yaml", "via: node1", "via: node9",
     "LabNetwork lab: spec.externalClient.routes[0].via: no Node 'node9' in the manifests"),
    ("lab.yaml", "service: default/deploy-svc", "service: default/nope",
     "the lab needs exactly one Service default/nope (spec.dump.service), found 0"),
    ("lab.yaml", "kind: LabNetwork", "kind: Other",
     "the lab needs exactly one LabNetwork document, found 0"),
    ("lab.yaml", 'clusterCIDRs: [10.0.0.0/14, "fd00:10:244::/56"]', "clusterCIDRs: [10.0.0.0/14]",
     "LabNetwork lab: spec.clusterCIDRs: needs one IPv4 and one IPv6 entry"),
    ("lab.yaml", '"fd00:100::100"]', '"fd00:100::zz"]',
     "LabNetwork lab: spec.externalClient.ips[1]: not an IP address: 'fd00:100::zz'"),
    ("server6-service.yaml", 'clusterIPs: ["fd00:10:96::152"]',
     'clusterIPs: ["fd00:10:96::152", "fd00:10:96::153"]',
     "Service default/server6-service: spec.clusterIPs: holds more than one address of a "
     "family: ['fd00:10:96::152', 'fd00:10:96::153']"),
    ("external-svc.yaml", "type: ExternalName", "type: Magic",
     "Service default/external-svc: spec.type: unknown service type 'Magic'"),
])
def test_a_scenario_that_does_not_fit_names_the_object_and_field(
        tmp_path: Path, file: str, old: str, new: str, message: str) -> None:
    """A missing or wrong field: LabError naming the file (and line), object and field."""
    copy = lab_copy(tmp_path, file, old, new)
    with pytest.raises(LabError) as raised:
        load_scenario(copy)
    assert message == str(raised.value)[-len(message):]
    assert str(raised.value).startswith(str(copy))


def test_a_pod_backing_two_services_is_refused(tmp_path: Path) -> None:
    """A pod whose labels match two selectors: the report gives each pod one service."""
    copy = lab_copy(tmp_path, "pods.yaml", "labels: {app: server}",
                    "labels: {app: server, also: deploy}")
    (copy / "deploy-svc.yaml").write_text((copy / "deploy-svc.yaml").read_text().replace(
        "app: deploy-nginx", "also: deploy"))
    with pytest.raises(LabError) as raised:
        load_scenario(copy)
    assert str(raised.value).endswith(
        "Pod default/server1: metadata.labels: match the selectors of server-service, "
        "deploy-svc; the lab's report gives each pod one service")


def test_addresses_that_do_not_fit_together_stop_the_lab_before_it_builds(
        tmp_path: Path) -> None:
    """Overlapping pod CIDRs: run_lab raises LabError naming the manifests, builds nothing."""
    copy = lab_copy(tmp_path, "nodes.yaml", "[10.0.2.0/24,", "[10.0.0.0/16,")
    with pytest.raises(LabError) as raised:
        run_lab(manifests=copy)
    assert (f"{copy}: node node2: pod CIDR 10.0.0.0/16 outside 10.0.0.0/14 or overlapping "
            "another node's") == str(raised.value)
