"""kube-proxy's real invocations start iptsync unchanged: each comes up, syncs and serves
/healthz, on both backends.

The invocations are the fixtures' (fixtures/*, each file says where it comes from): kubeadm's
DaemonSet and ConfigMap as ``kubeadm init`` writes them, GKE's static Pod (a ``sh -c "exec
kube-proxy ..."`` line), EKS's DaemonSet and kube-proxy-config ConfigMap, and k3s/RKE2's
argument list. The test plays kubelet: the kube-proxy container's arguments are taken from the
manifest as ``iptsync check-config`` takes them (the binary and the shell redirections left
out), ``$(NODE_NAME)`` is the node's name, ConfigMap volumes become files, and every
``/var/lib/`` path moves under the test's directory. The kubeconfig files (the service
account's, on a real node) are the fake API server's; GKE's points at a dead address, so
only its ``--master`` reaches the server. The one flag added is iptsync's own
``--iptables-backend``.

Everything runs inside the namespace the test creates: the fake API server (listening on the
namespace's loopback), the agent process (``ip netns exec``), its rules and its listeners.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent.waiting import eventually
from apiserver import FakeApiServer, manifest
from processes import reaped

from iptsync import checkconfig
from iptsync.core import names
from iptsync.kernel.netfilter import Netfilter
from iptsync.lab.netns import thread_in_netns

pytestmark = pytest.mark.netns

FIXTURES = Path(__file__).with_name("fixtures")
NODE_IP = "10.100.0.2"


@pytest.fixture
def apiserver_in(netfilter: Netfilter) -> Iterator[FakeApiServer]:
    """A fake API server on the node namespace's loopback, with the web Service and its
    endpoint already there (the first sync programs them)."""
    server = FakeApiServer(bookmark_interval=0.5)
    with thread_in_netns(str(netfilter.netns)):
        server.start()
    try:
        server.create(manifest("Service", "web", "default", spec={
            "clusterIP": "10.96.0.50",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}))
        server.create(manifest(
            "EndpointSlice", "web-1", "default",
            metadata={"labels": {"kubernetes.io/service-name": "web"}}, addressType="IPv4",
            ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
            endpoints=[{"addresses": ["10.0.1.10"], "conditions": {"ready": True}}]))
        yield server
    finally:
        server.stop()
    assert [] == server.handler_errors


class Kubelet:
    """What kubelet does for a kube-proxy container, under ``root`` instead of ``/``."""

    def __init__(self, root: Path, server: FakeApiServer, node: str) -> None:
        self.root, self.server, self.node = root, server, node
        server.create(manifest("Node", node, spec={"podCIDR": "10.0.1.0/24"}, status={
            "addresses": [{"type": "InternalIP", "address": NODE_IP}]}))

    def path(self, text: str) -> str:
        return text.replace("/var/lib/", f"{self.root}/var/lib/")

    def args(self, args: list[str]) -> list[str]:
        return [self.path(arg).replace("$(NODE_NAME)", self.node) for arg in args]

    def mount(self, objects: list[dict[str, Any]]) -> None:
        """Each ConfigMap volume of the manifests, as files at its mount path."""
        maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        for workload in (o for o in objects if o["kind"] in ("DaemonSet", "Pod")):
            pod = workload["spec"].get("template", {}).get("spec") or workload["spec"]
            volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"]
                       if "configMap" in v}
            for mount in pod["containers"][0]["volumeMounts"]:
                for key, text in maps.get(volumes.get(mount["name"], ""), {}).get(
                        "data", {}).items():
                    target = Path(self.path(mount["mountPath"])) / key
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(self.path(text))

    def kubeconfig(self, path: str, server: str | None = None) -> None:
        """The fake API server's kubeconfig at ``path`` (``server``: another address in it)."""
        target = Path(self.path(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        self.server.write_kubeconfig(target)
        if server is not None:
            config = yaml.safe_load(target.read_text())
            config["clusters"][0]["cluster"]["server"] = server
            target.write_text(yaml.safe_dump(config))


def manifests(*files: str) -> list[dict[str, Any]]:
    return [obj for name in files
            for obj in checkconfig.documents((FIXTURES / name).read_text(), name)]


def kube_proxy_args(objects: list[dict[str, Any]]) -> list[str]:
    return checkconfig.invocation(objects, []).args


def kubeadm(kubelet: Kubelet) -> list[str]:
    objects = manifests("kubeadm-daemonset.yaml", "kubeadm-configmap.yaml")
    kubelet.mount(objects)
    kubelet.kubeconfig("/var/lib/kube-proxy/kubeconfig.conf")
    return kubelet.args(kube_proxy_args(objects))


def gke(kubelet: Kubelet) -> list[str]:
    """GKE's line, its --master being the fake API server's address."""
    kubelet.kubeconfig("/var/lib/kube-proxy/kubeconfig", server="http://127.0.0.1:9")
    return [f"--master={kubelet.server.url}" if arg.startswith("--master=") else arg
            for arg in kubelet.args(kube_proxy_args(manifests("gke-kube-proxy-pod.yaml")))]


def eks(kubelet: Kubelet) -> list[str]:
    objects = manifests("eks-kube-proxy.yaml")
    kubelet.mount(objects)
    kubelet.kubeconfig("/var/lib/kube-proxy/kubeconfig")
    return kubelet.args(kube_proxy_args(objects))


def k3s(kubelet: Kubelet) -> list[str]:
    args = [line for line in (FIXTURES / "k3s-args.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    kubelet.kubeconfig("/var/lib/rancher/k3s/agent/kubeproxy.kubeconfig")
    return kubelet.args(args)


def http_status(netns: str, url: str) -> int:
    """The status of a GET from inside ``netns`` (0: nothing answers)."""
    with thread_in_netns(netns):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0


# Each invocation, the node name it runs as (GKE passes no --hostname-override: the host's
# name), and what it sets that iptsync ignores (an INFO line each; EKS's udpIdleTimeout, a
# field kube-proxy no longer has, a warning). /healthz is on port 10256 of the namespace's
# loopback for all: 0.0.0.0:10256, and 127.0.0.1 for k3s/RKE2.
INVOCATIONS = {
    "kubeadm": (kubeadm, "node1", []),
    "gke": (gke, socket.gethostname().lower(),
            ["--feature-gates", "--oom-score-adj", "--ipvs-sync-period",
             "--ipvs-min-sync-period"]),
    "eks": (eks, "node1", ["oomScoreAdj", "udpIdleTimeout"]),
    "k3s-rke2": (k3s, "node1", []),
}
HEALTHZ = "http://127.0.0.1:10256/healthz"


@pytest.mark.parametrize("name", list(INVOCATIONS))
def test_kube_proxys_invocation_starts_syncs_and_serves_healthz(
        netfilter: Netfilter, apiserver_in: FakeApiServer, tmp_path: Path, name: str) -> None:
    """The invocation starts iptsync, which lists the API, programs the Service and answers
    /healthz 200; SIGTERM stops it with status 0."""
    build, node, ignored = INVOCATIONS[name]
    kubelet = Kubelet(tmp_path, apiserver_in, node)
    args = build(kubelet)
    netns = str(netfilter.netns)
    agent = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "iptsync.cli", "run", *args,
         "--iptables-backend", netfilter.backend.value],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with reaped(agent):
        svc = names.svc_chain("default/web:http", "tcp")
        eventually(lambda: agent.poll() is not None or svc in netfilter.save()["nat"].chains,
                   30.0)
        assert agent.poll() is None, agent.communicate()[1]
        assert 200 == eventually(lambda: http_status(netns, HEALTHZ) == 200 and 200, 10.0)
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=15)
    assert 0 == agent.returncode, err
    assert f"starting on node {node}" in err
    assert ignored == [match[1] for line in err.splitlines()
                       if (match := re.search(r" (\S+?)=\S* is ignored: ", line))]
