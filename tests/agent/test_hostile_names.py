"""`iptsync run --once --objects` with names a real API server would refuse.

A Service name holding a newline once wrote a DNAT rule of its author's choosing into the node
(nft), or made every sync fail (legacy); a long name made every full sync rewrite its chains.
Now such an object is skipped with a one-line warning naming it and the field, the other
Services are synced, and a second sync finds nothing to change. Everything runs inside a
namespace the test creates, on both backends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iptsync.core import names
from iptsync.kernel.netfilter import Netfilter

pytestmark = pytest.mark.netns

INJECTION = ("x\n-A KUBE-SERVICES -d 192.0.2.99/32 -p tcp -m tcp --dport 80 -j DNAT "
             "--to-destination 10.0.9.9:80\n#")


def service(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}}


def endpoint_slice(service_name: str, slice_name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": slice_name,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}]}


def run_once(netfilter: Netfilter, objects: Path) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", str(netfilter.netns), sys.executable, "-m", "iptsync.cli",
            "run", "--once", "--objects", str(objects), "--hostname-override", "node1",
            "--cluster-cidr", "10.0.0.0/14", "--iptables-backend", netfilter.backend.value,
            "--no-conntrack-cleanup"]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize(("hostile", "shown"), [
    pytest.param(INJECTION, "x\\n-A KUBE-SERVICES -d 192.0.2.99/32", id="newline-injection"),
    pytest.param("x\nbogus", "x\\nbogus", id="newline-breaks-restore"),
    pytest.param("x\rbogus", "x\\rbogus", id="carriage-return"),
    pytest.param("a\x00b", "a\\x00b", id="nul"),
    pytest.param("x" * 300, "x" * 100 + "...(300 characters)", id="too-long"),
    pytest.param('we "b', 'we "b', id="blank-and-quote"),
])
def test_hostile_service_name_is_skipped_and_the_rest_synced(
        netfilter: Netfilter, tmp_path: Path, hostile: str, shown: str) -> None:
    """The hostile Service and its slice are skipped with warnings; web is synced; nothing
    injected; a second sync changes nothing."""
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        service("web", "10.96.0.50"), endpoint_slice("web", "web-1", "10.0.1.10"),
        service(hostile, "10.96.0.60"), endpoint_slice(hostile, "evil-1", "10.0.1.66")]}))
    first = run_once(netfilter, objects)
    assert 0 == first.returncode, first.stderr
    # A wait for the host's xtables lock (another program on the machine) is not about input.
    warnings = [line for line in first.stderr.splitlines()
                if "WARNING" in line and "for the xtables lock" not in line]
    assert 2 == len(warnings), first.stderr
    assert f"skipping Service default/{shown}" in warnings[0]
    assert ": metadata.name: " in warnings[0]
    assert "skipping EndpointSlice default/evil-1: metadata.labels[kubernetes.io/service-name]" \
        in warnings[1]

    saved = netfilter.save_text("nat") + netfilter.save_text("filter")
    assert ("192.0.2.99" in saved, "10.0.9.9" in saved, "10.96.0.60" in saved,
            "10.0.1.66" in saved) == (False, False, False, False)
    web = names.svc_chain("default/web:http", "tcp")
    assert web in netfilter.save()["nat"].chains
    assert "--to-destination 10.0.1.10:8080" in saved

    second = run_once(netfilter, objects)
    assert 0 == second.returncode, second.stderr
    assert "chains written" not in second.stderr


def test_foreign_rule_with_a_newline_in_its_comment_does_not_stop_syncs(
        netfilter: Netfilter, tmp_path: Path) -> None:
    """Another program's rule whose comment holds a newline (iptables-save prints it on two
    lines) is read past: the sync succeeds, the rule stays, and a second sync changes nothing."""
    netfilter.run("-t", "nat", "-A", "PREROUTING", "-s", "192.0.2.7/32", "-m", "comment",
                  "--comment", "line one\nline two", "-j", "ACCEPT")
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        service("web", "10.96.0.50"), endpoint_slice("web", "web-1", "10.0.1.10")]}))
    first = run_once(netfilter, objects)
    assert 0 == first.returncode, first.stderr
    assert "Traceback" not in first.stderr
    foreign = [rule for rule in netfilter.save()["nat"].chains["PREROUTING"] if "192.0.2.7" in rule]
    assert ['-s 192.0.2.7/32 -m comment --comment "line one\nline two" -j ACCEPT'] == foreign
    assert names.svc_chain("default/web:http", "tcp") in netfilter.save()["nat"].chains
    second = run_once(netfilter, objects)
    assert 0 == second.returncode, second.stderr
    assert "chains written" not in second.stderr
