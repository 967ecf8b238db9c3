"""The ``iptsync lab`` demo: real traffic through the rules, its report, and its teardown.

The namespace tests run the command as a user would (a subprocess, as root) and read its JSON
or text output; the others check the pure parts (the dump excerpt, the EndpointSlices matching
the lab's pods, the root check) and run anywhere. The scenario itself: test_scenario.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from processes import reaped

from iptsync.lab import demo, netns
from iptsync.lab.checks import evaluate
from iptsync.lab.readback import (
    ExternalNameResult,
    ReadBack,
    dump_service,
    other_family_result,
)
from iptsync.lab.scenario import load_scenario, manifests_dir
from iptsync.sources.files import load_objects

ROOT = Path(__file__).resolve().parents[2]
NODE_IPS = {"IPv4": {"10.100.0.2", "10.100.0.3"}, "IPv6": {"fd00:100::2", "fd00:100::3"}}
CLIENT_POD_IPS = {"IPv4": "10.0.1.3", "IPv6": "fd00:10:244:1::3"}
CLUSTER_CIDRS = "10.0.0.0/14,fd00:10:244::/56"


def lab_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "iptsync.cli", "lab", *args]


def lab_namespaces(prefix: str) -> list[str]:
    return [name for name in netns.list_netns() if name.startswith(prefix)]


def pods_by_service(report: dict[str, Any]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, pod in report["topology"]["pods"].items():
        if pod["service"]:
            found.setdefault(pod["service"], set()).add(name)
    return found


@pytest.mark.netns
def test_json_report_shows_every_expectation_met_and_leaves_no_namespace() -> None:
    """--json: every pod answers in both families, sources kept/masqueraded as expected, the
    dumped service's rules are the node's in iptables and ip6tables, no namespace left."""
    proc = subprocess.run(lab_argv("--json", "--requests", "40"), capture_output=True,
                          text=True, timeout=180, cwd=ROOT, check=False)
    assert 0 == proc.returncode, proc.stderr + proc.stdout
    report = json.loads(proc.stdout)
    pods = pods_by_service(report)
    probes = report["probes"]
    assert [("cluster-ip", "IPv4", "server-service"), ("cluster-ip", "IPv6", "server6-service"),
            ("cluster-ip", "IPv4", "deploy-svc"), ("cluster-ip", "IPv6", "deploy-svc"),
            *[("nodeport", family, "deploy-svc") for family in ("IPv4", "IPv4", "IPv6", "IPv6")],
            ("load-balancer", "IPv4", "deploy-svc"), ("load-balancer", "IPv6", "deploy-svc")
            ] == [(p["section"], p["family"], p["service"]) for p in probes]
    for p in probes:
        assert pods[p["service"]] == set(p["answered"]), p
        assert 40 == sum(p["answered"].values()), p
    for p in probes:
        if p["section"] == "cluster-ip":
            assert {CLIENT_POD_IPS[p["family"]]} == set(p["seen_as"]), p
        elif p["section"] == "nodeport":
            assert set(p["seen_as"]) <= NODE_IPS[p["family"]], p
    lb = [p for p in probes if p["section"] == "load-balancer"]
    assert ["203.0.113.10:80", "[2001:db8:203::10]:80"] == [p["target"] for p in lb]
    assert [("IPv4", True), ("IPv6", True)] == [(live["family"], live["matches"])
                                                for live in report["lives"]]
    assert [] == [c["name"] for c in report["checks"] if not c["passed"]]
    assert 0 == report["failed"]
    assert report["prefix"].startswith("ipts")
    assert [] == lab_namespaces(report["prefix"])


@pytest.mark.netns
def test_text_report_has_its_sections_the_dump_and_the_summary() -> None:
    """The text report shows every section, a KUBE-SVC chain of the dump and 0 failed."""
    proc = subprocess.run(lab_argv("--requests", "40"), capture_output=True, text=True,
                          timeout=180, cwd=ROOT, check=False)
    assert 0 == proc.returncode, proc.stderr + proc.stdout
    out = proc.stdout
    for title in ("Topology", "Connections spreading over pods",
                  "NodePort from outside on every node", "Load-balancer IP from outside",
                  "What `iptsync dump` prints for deploy-svc", "Checks"):
        assert f"== {title} ==" in out
    assert re.search(r"^\s*:KUBE-SVC-[A-Z2-7]{16} - \[0:0\]$", out, re.MULTILINE)
    assert re.fullmatch(r"lab: \d+ checks passed, 0 failed", out.splitlines()[-1])
    prefix = re.search(r"namespaces (ipts\d+x\d+-)\*", out)
    assert prefix is not None
    assert [] == lab_namespaces(prefix.group(1))


@pytest.mark.netns
def test_sigterm_while_kept_up_tears_the_lab_down() -> None:
    """--keep holds the namespaces up after the report; SIGTERM then removes them all."""
    proc = subprocess.Popen(lab_argv("--keep", "--json", "--requests", "40"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, bufsize=0)
    with reaped(proc):
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 60
        while b"stays up until" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""
            if ready and not chunk:
                break
            seen += chunk
        prefix = re.search(r"namespaces (ipts\d+x\d+-)\*", seen.decode())
        assert prefix is not None, seen.decode()
        assert 12 == len(lab_namespaces(prefix.group(1))), seen.decode()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert 0 == proc.returncode, (seen + err).decode()
    assert 0 == json.loads(out)["failed"]
    assert [] == lab_namespaces(prefix.group(1))


@pytest.mark.parametrize(("family", "others", "address"), [
    ("IPv4", "default/server-service", "10.0.1.10:8080"),
    ("IPv6", "default/server6-service", "[fd00:10:244:1::10]:8080"),
])
def test_dump_excerpt_holds_only_the_chains_of_one_service(family: str, others: str,
                                                            address: str) -> None:
    """The dump excerpt of deploy-svc in each family: its entry rules and its SVC, EXT and
    three SEP chains, with that family's addresses; the single-stack service of the family
    has the only other KUBE-SVC chain."""
    excerpt = dump_service(manifests_dir(), "node1", "default/deploy-svc", CLUSTER_CIDRS, family)
    kinds = [re.sub(r"[A-Z2-7]{16}$", "", chain) for chain in excerpt.chains]
    assert ["KUBE-NODEPORTS", "KUBE-SERVICES", "KUBE-SVC-", "KUBE-EXT-", "KUBE-SEP-",
            "KUBE-SEP-", "KUBE-SEP-"] == kinds
    assert 3 == len(excerpt.chains["KUBE-SERVICES"]) + len(excerpt.chains["KUBE-NODEPORTS"])
    assert not any("server-service" in line or "server6" in line for line in excerpt.lines)
    assert any(f"--to-destination {address}" in line for line in excerpt.lines)
    assert ("default/deploy-svc", others) == excerpt.services_with_svc_chain
    assert excerpt.command.endswith(f"--cluster-cidr {CLUSTER_CIDRS} --ip-family {family}")


def test_a_single_stack_service_in_the_other_family_fails_its_check() -> None:
    """The check that an IPv6-only Service has no iptables rule fails when a node's iptables
    names it, and passes when only ip6tables does."""
    scenario = load_scenario(manifests_dir())
    (server6,) = [s for s in scenario.services if s.name == "server6-service"]
    rule = ('-A KUBE-SERVICES -m comment --comment "default/server6-service cluster IP" '
            "-j KUBE-SVC-X\n")
    empty = {"nat": "", "filter": "", "ip6 nat": "", "ip6 filter": ""}

    def verdict(where: str) -> bool:
        live = {"node1": {**empty, where: rule}, "node2": empty}
        result = other_family_result(server6, live, {"IPv4": "", "IPv6": "ip6 "})
        rules = ReadBack((), (), ExternalNameResult("default/external-svc", False, {}, {}),
                         (result,))
        (check,) = [c for c in evaluate(scenario, (), (), rules) if "IPv6 only" in c.name]
        return check.passed

    assert (False, True) == (verdict("nat"), verdict("ip6 nat"))


def test_bundled_manifests_match_the_lab_pods() -> None:
    """examples/lab's EndpointSlices, one per family of each service, list exactly its Pods
    (by selector), their addresses of that family and nodes, on 8080."""
    objects = load_objects([manifests_dir()]).objects
    endpoints = set()
    for obj in objects:
        if obj["kind"] == "EndpointSlice":
            service = obj["metadata"]["labels"]["kubernetes.io/service-name"]
            assert [8080] == [port["port"] for port in obj["ports"]]
            endpoints |= {(e["targetRef"]["name"], e["nodeName"], e["addresses"][0], service)
                          for e in obj["endpoints"]}
    scenario = load_scenario(manifests_dir())
    families = {s.name: s.families for s in scenario.services}
    expected = {(p.name, p.node, p.ip6 if family == "IPv6" else p.ip, p.service)
                for p in scenario.pods if p.service for family in families[p.service]}
    assert expected == endpoints


@pytest.mark.netns
def test_refuses_to_run_without_ip6tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lab is dual-stack: without ip6tables-nft-restore it says so, exit status 2."""
    real_which = shutil.which
    monkeypatch.setattr(demo.shutil, "which",
                        lambda tool: None if tool.startswith("ip6tables") else real_which(tool))
    out, err = io.StringIO(), io.StringIO()
    assert 2 == demo.run_command(out=out, err=err)
    assert "iptsync lab needs ip6tables-nft-restore (Debian package iptables)\n" == err.getvalue()
    assert "" == out.getvalue()


def test_refuses_to_run_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root: a clear message, exit status 2, nothing built."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out, err = io.StringIO(), io.StringIO()
    assert 2 == demo.run_command(out=out, err=err)
    assert "iptsync lab needs root (network namespaces)\n" == err.getvalue()
    assert "" == out.getvalue()
