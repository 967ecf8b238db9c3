"""The engine's local traffic detection: the kernel holds each mode's match, NodeCIDR follows
the Node's pod CIDR, and the operator is told how pods are told apart (or why they cannot be).

Conventions as in ``world``: node ``node1``, service ``s0`` (cluster IP 10.96.0.10, port 80)
with one endpoint on this node; each test runs on the fake kernel and both real backends.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import pytest

from engine.world import SETTINGS, endpoint_slice, service
from iptsync.core import names
from iptsync.engine.reconciler import Engine
from iptsync.kernel.port import NetfilterPort

SVC = names.svc_chain("default/s0:p0", "tcp")
EXT = names.ext_chain("default/s0:p0", "tcp")
COMMENT = re.compile(r'-m comment --comment (?:"[^"]*"|\S+) ')


def node(*pod_cidrs: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
            "spec": {"podCIDRs": list(pod_cidrs)},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.100.0.2"}]}}


def local_matches(kernel: NetfilterPort) -> tuple[list[str], list[str]]:
    """The masquerade rule of the SVC chain and the pod rule of the EXT chain, as the kernel
    holds them, without their comments."""
    nat = kernel.save(("nat",))["nat"].chains
    return ([COMMENT.sub("", r) for r in nat.get(SVC, []) if "KUBE-MARK-MASQ" in r],
            [COMMENT.sub("", r) for r in nat.get(EXT, []) if "pod traffic" in r])


def engine_with_service(kernel: NetfilterPort, **settings: Any) -> Engine:
    engine = Engine(kernel, replace(SETTINGS, **settings))
    engine.upsert(service(0, "LoadBalancer", True, 1))
    engine.upsert(endpoint_slice(0, [(0, True, True)]))
    return engine


@pytest.mark.parametrize(("settings", "match"), [
    ({"detect_local_mode": "BridgeInterface", "bridge_interface": "cbr0"}, ("-i", "cbr0")),
    ({"detect_local_mode": "InterfaceNamePrefix", "interface_name_prefix": "veth"},
     ("-i", "veth+")),
], ids=["bridge", "prefix"])
def test_interface_modes_load_and_read_back_unchanged(
        kernel: NetfilterPort, settings: dict[str, Any], match: tuple[str, str]) -> None:
    """The interface matches load into the kernel, and a full sync finds nothing to repair."""
    engine = engine_with_service(kernel, **settings)
    engine.sync()
    option, name = match
    assert ([f"-d 10.96.0.10/32 ! {option} {name} -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ"],
            [f"{option} {name} -j {SVC}"]) == local_matches(kernel)
    report = engine.sync(full=True)
    assert ([], True) == (report.drifted, report.plan.empty)


def test_node_cidr_follows_the_nodes_pod_cidr(kernel: NetfilterPort,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """NodeCIDR: no pod CIDR yet is kube-proxy's no-op detector (a warning, no match); the
    Node's pod CIDR of this family brings the matches, and a new pod CIDR replaces them."""
    caplog.set_level(logging.INFO, "iptsync")
    engine = engine_with_service(kernel, detect_local_mode="NodeCIDR")
    engine.upsert(node())
    engine.sync()
    assert ([], []) == local_matches(kernel)
    assert ["IPv4: detect-local-mode NodeCIDR, but the Node has no IPv4 pod CIDR "
            "(spec.podCIDRs)"] == [r.getMessage().split(": pod traffic")[0]
                                   for r in caplog.records if r.levelno == logging.WARNING]
    caplog.clear()
    engine.upsert(node("fd00:10:0:1::/64", "10.0.1.0/24"))
    engine.sync()
    assert (["! -s 10.0.1.0/24 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ"],
            [f"-s 10.0.1.0/24 -j {SVC}"]) == local_matches(kernel)
    assert ["IPv4 local traffic detection: detect-local-mode NodeCIDR, pod traffic is traffic "
            "source inside the node's pod CIDR 10.0.1.0/24 (-s 10.0.1.0/24)"] == [
        r.getMessage() for r in caplog.records if "local traffic detection" in r.getMessage()]
    engine.upsert(node("10.0.9.0/24"))
    engine.sync()
    assert (["! -s 10.0.9.0/24 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ"],
            [f"-s 10.0.9.0/24 -j {SVC}"]) == local_matches(kernel)
