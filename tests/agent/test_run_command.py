"""`iptsync run` as a process: --objects files watched for changes, SIGTERM leaves the rules.
(The loop itself, in simulated time on every kernel: test_loop.py.)

Everything runs inside a namespace the test creates: the agent process (``ip netns exec``),
its rules and its /healthz and /metrics listeners.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from processes import reaped

from iptsync.core import names
from iptsync.kernel.netfilter import Netfilter
from iptsync.kernel.port import Backend

from .waiting import eventually

pytestmark = pytest.mark.netns


def service(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}}


def endpoint_slice(name: str, *ips: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": f"{name}-1",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}



def test_run_follows_file_changes_and_leaves_rules_on_sigterm(netfilter: Netfilter,
                                                              tmp_path: Path) -> None:
    """Editing a manifest file changes the rules; SIGTERM exits 0 and the rules stay."""
    objects = tmp_path / "objects"
    objects.mkdir()
    (objects / "web.json").write_text(json.dumps(
        {"kind": "List", "items": [service("web", "10.96.0.50"),
                                   endpoint_slice("web", "10.0.1.10")]}))
    argv = ["ip", "netns", "exec", str(netfilter.netns), sys.executable, "-m", "iptsync.cli",
            "run", "--objects", str(objects), "--hostname-override", "node1",
            "--cluster-cidr", "10.0.0.0/14", "--iptables-backend", netfilter.backend.value,
            "--min-sync-period", "100ms", "--sync-period", "1m",
            "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "",
            "--no-conntrack-cleanup", "--log-format", "json"]
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with reaped(agent):
        svc = names.svc_chain("default/web:http", "tcp")
        eventually(lambda: svc in netfilter.save()["nat"].chains)
        assert 1 == sum("DNAT" in rule for chain, rules in netfilter.save()["nat"].chains.items()
                        if chain.startswith("KUBE-SEP-") for rule in rules)
        (objects / "web.json").write_text(json.dumps(
            {"kind": "List", "items": [service("web", "10.96.0.50"),
                                       endpoint_slice("web", "10.0.1.10", "10.0.2.10")]}))
        eventually(lambda: 2 == sum(c.startswith("KUBE-SEP-")
                                    for c in netfilter.save()["nat"].chains))
        healthz = subprocess.run(
            ["ip", "netns", "exec", str(netfilter.netns), sys.executable, "-c",
             "import urllib.request; print(urllib.request.urlopen("
             "'http://127.0.0.1:10256/healthz', timeout=2).status)"],
            capture_output=True, text=True, check=False)
        assert "200" == healthz.stdout.strip(), healthz.stderr
        before = netfilter.save()
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=10)
    assert 0 == agent.returncode, err
    assert {t: s.chains for t, s in before.items()} == {
        t: s.chains for t, s in netfilter.save().items()}
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("partial sync" in entry["msg"] for entry in logs)
    assert any("the rules stay in place" in entry["msg"] for entry in logs)


def run_command(netns: str, *args: str) -> list[str]:
    """``iptsync run`` inside ``netns``, as the tests here start it."""
    return ["ip", "netns", "exec", netns, sys.executable, "-m", "iptsync.cli", "run",
            "--hostname-override", "node1", "--cluster-cidr", "10.0.0.0/14",
            "--no-conntrack-cleanup", *args]


def test_verbose_is_iptsync_debug_and_only_vv_adds_the_libraries(netns: str,
                                                                tmp_path: Path) -> None:
    """``run -v`` (debug for run) shows iptsync's debug lines and no library's; ``-vv`` adds
    the libraries' debug output (pyroute2 here)."""
    objects = tmp_path / "web.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        service("web", "10.96.0.50"), endpoint_slice("web", "10.0.1.10")]}))
    loggers = {}
    for verbose in ("-v", "-vv"):
        result = subprocess.run(
            run_command(netns, verbose, "--once", "--objects", str(objects),
                        "--iptables-backend", "legacy", "--log-format", "json"),
            capture_output=True, text=True, check=False)
        assert 0 == result.returncode, result.stderr
        logs = [json.loads(line) for line in result.stderr.splitlines()]
        loggers[verbose] = {entry["logger"].split(".")[0] for entry in logs
                            if entry["level"] == "debug"}
    assert {"iptsync"} == loggers["-v"]
    assert "pyroute2" in loggers["-vv"]


def test_progress_interval_flag_reaches_the_sync(netns: str, tmp_path: Path) -> None:
    """``--progress-interval 0`` makes even a one-service sync report its progress."""
    objects = tmp_path / "web.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        service("web", "10.96.0.50"), endpoint_slice("web", "10.0.1.10")]}))
    result = subprocess.run(
        run_command(netns, "--once", "--objects", str(objects), "--iptables-backend", "legacy",
                    "--progress-interval", "0"), capture_output=True, text=True, check=False)
    assert 0 == result.returncode, result.stderr
    assert "full sync in progress: 0 of 1 services sent to iptables-restore" in result.stderr


def hold_port(netns: str, port: int) -> subprocess.Popen[str]:
    """A process in ``netns`` listening on 127.0.0.1:``port`` until killed."""
    holder = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen();"
         "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert "ready" == holder.stdout.readline().strip()
    return holder


@pytest.mark.parametrize("flag", ["--healthz-bind-address", "--metrics-bind-address"])
def test_busy_port_with_hard_fail_names_the_flag_and_the_address(netns: str, tmp_path: Path,
                                                                 flag: str) -> None:
    """With --bind-address-hard-fail, a health or metrics address already in use: a message
    naming the flag and address, exit status 1, no traceback."""
    objects = tmp_path / "web.json"
    objects.write_text(json.dumps(service("web", "10.96.0.50")))
    holder = hold_port(netns, 10999)
    try:
        others = [f for f in ("--healthz-bind-address", "--metrics-bind-address") if f != flag]
        result = subprocess.run(
            run_command(netns, "--objects", str(objects), "--iptables-backend", "legacy",
                        "--bind-address-hard-fail", flag, "127.0.0.1:10999", *others, ""),
            capture_output=True, text=True, check=False, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert 1 == result.returncode
    assert "Traceback" not in result.stderr
    assert (f"Error: {flag} 127.0.0.1:10999: cannot listen there: Address already in use"
            in result.stderr)


def test_busy_healthz_port_is_taken_once_free(netns: str, tmp_path: Path) -> None:
    """Without --bind-address-hard-fail (kube-proxy's default), a busy /healthz address is
    an error line: the agent syncs all the same, and serves /healthz within 5 s of the port
    coming free (an old kube-proxy still on the node while iptsync starts)."""
    objects = tmp_path / "web.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        service("web", "10.96.0.50"), endpoint_slice("web", "10.0.1.10")]}))
    holder = hold_port(netns, 10256)
    agent = subprocess.Popen(
        run_command(netns, "--objects", str(objects), "--iptables-backend", "legacy",
                    "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", ""),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with reaped(agent):
        try:
            netfilter = Netfilter(Backend.LEGACY, netns=netns)
            svc = names.svc_chain("default/web:http", "tcp")
            eventually(lambda: svc in netfilter.save()["nat"].chains)
        finally:
            holder.kill()
            holder.wait()
        freed = time.monotonic()
        eventually(lambda: "200" == healthz(netns, 10256), timeout=10.0)
        took = time.monotonic() - freed
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=10)
    assert 0 == agent.returncode, err
    assert took < 6.5
    assert ("--healthz-bind-address 127.0.0.1:10256: cannot listen there: Address already in "
            "use") in err
    assert "--healthz-bind-address 127.0.0.1:10256: listening now" in err


def healthz(netns: str, port: int) -> str:
    """The status of GET /healthz on 127.0.0.1:``port`` inside ``netns`` ("" if none)."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import urllib.request; print(urllib.request.urlopen("
         f"'http://127.0.0.1:{port}/healthz', timeout=2).status)"],
        capture_output=True, text=True, check=False)
    return result.stdout.strip()
