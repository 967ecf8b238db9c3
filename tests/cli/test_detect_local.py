"""kube-proxy's detect-local flags through the one-shot commands: ``dump`` writes the mode's
match, ``trace`` evaluates it for the packet's origin, ``explain`` names it.

Conventions: Service default/web (10.96.0.10:80) with one endpoint 10.0.1.10:8080 (as in
``test_objects_input``); node1's Node object has the pod CIDR 10.0.1.0/24 and the address
10.100.0.2; the cluster CIDR is 10.0.0.0/14. A pod of node1 is 10.0.1.3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from iptsync.cli import main

from .test_objects_input import GOOD

OBJECTS = """\
apiVersion: v1
kind: Node
metadata: {name: node1}
spec: {podCIDRs: [10.0.1.0/24]}
status: {addresses: [{type: InternalIP, address: 10.100.0.2}]}
---
""" + GOOD
NODE_FLAGS = ("--hostname-override", "node1", "--cluster-cidr", "10.0.0.0/14")
BRIDGE = ("--detect-local-mode", "BridgeInterface", "--pod-bridge-interface", "cbr0")


@pytest.fixture
def objects(tmp_path: Path) -> str:
    path = tmp_path / "objects.yaml"
    path.write_text(OBJECTS)
    return str(path)


def iptsync(objects: str, *args: str) -> Result:
    result = CliRunner().invoke(main, [*args, "--objects", objects, *NODE_FLAGS])
    assert 0 == result.exit_code, result.output
    return result


@pytest.mark.parametrize(("flags", "match"), [
    ((), "! -s 10.0.0.0/14"),
    (("--detect-local-mode", "NodeCIDR"), "! -s 10.0.1.0/24"),
    (BRIDGE, "! -i cbr0"),
    (("--detect-local-mode", "InterfaceNamePrefix", "--pod-interface-name-prefix", "veth"),
     "! -i veth+"),
], ids=["ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"])
def test_dump_writes_the_modes_match(objects: str, flags: tuple[str, ...], match: str) -> None:
    """The cluster IP's masquerade rule carries the mode's match (NodeCIDR: the Node's)."""
    masquerade = [line for line in iptsync(objects, "dump", *flags).output.splitlines()
                  if line.startswith("-A KUBE-SVC-") and "KUBE-MARK-MASQ" in line]
    assert [match] == [line.split("--dport 80 ")[1].split(" -j")[0] for line in masquerade]


def test_trace_evaluates_the_bridge_match_per_origin(objects: str) -> None:
    """BridgeInterface: a pod (by default for a pod address) keeps its source, a packet from
    outside with the same address is masqueraded, and neither warns about the interface."""
    traced = {origin: json.loads(iptsync(objects, "trace", "--src", "10.0.1.3", "--dst",
                                         "10.96.0.10:80", "--json", *BRIDGE,
                                         *(("--from", origin) if origin else ())).output)
              for origin in ("", "external")}
    assert {"": ("pod", False, []), "external": ("external", True, [])} == {
        origin: (t["packet"]["from"], t["masquerade"], t["warnings"])
        for origin, t in traced.items()}


def test_trace_picks_the_pod_origin_from_the_nodes_pod_cidr(objects: str) -> None:
    """NodeCIDR: a source of another node's pod CIDR is not a pod of this node: masqueraded."""
    traced = json.loads(iptsync(objects, "trace", "--src", "10.0.2.3", "--dst", "10.96.0.10:80",
                                "--json", "--detect-local-mode", "NodeCIDR").output)
    assert ("external", True) == (traced["packet"]["from"], traced["masquerade"])


def test_explain_names_the_mode(objects: str) -> None:
    """explain's note says what a pod is under BridgeInterface, and its reasons name it."""
    text = iptsync(objects, "explain", "default/web", *BRIDGE).output
    assert ("IPv4 local traffic detection: detect-local-mode BridgeInterface, pod traffic is "
            "traffic arriving on bridge cbr0 (-i cbr0)") in text
    assert "source kept (a pod on this node: arriving on bridge cbr0)" in text
