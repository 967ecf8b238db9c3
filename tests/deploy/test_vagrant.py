"""The Vagrant lab, checked statically (no VMs here): the Vagrantfile is valid Ruby and, run
against a stand-in for Vagrant's API, defines the cluster it documents; the provisioning
scripts pass bash -n and shellcheck and get every variable they require."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import DEPLOY, ROOT, VAGRANT_SCRIPTS

STUB = Path(__file__).with_name("vagrant_stub.rb")
TOKEN = "abcdef.0123456789abcdef"


def evaluate_vagrantfile(ruby: str, vagrantfile: Path, token: str | None) -> dict[str, Any]:
    """What the Vagrantfile configures, read through vagrant_stub.rb."""
    env = {key: value for key, value in os.environ.items() if key != "IPTSYNC_LAB_TOKEN"}
    if token is not None:
        env["IPTSYNC_LAB_TOKEN"] = token
    result = subprocess.run([ruby, str(STUB), str(vagrantfile)], capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    configs = json.loads(result.stdout)
    assert 1 == len(configs)
    config: dict[str, Any] = configs[0]["vm"]
    return config


@pytest.fixture(scope="module")
def lab(ruby: str) -> dict[str, Any]:
    return evaluate_vagrantfile(ruby, ROOT / "Vagrantfile", TOKEN)


def provisioners(lab: dict[str, Any], machine: str) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = lab["machines"][machine]["config"]["vm"]["provisioners"]
    return steps


def test_vagrantfile_is_valid_ruby(ruby: str) -> None:
    """ruby -c accepts the Vagrantfile."""
    result = subprocess.run([ruby, "-c", str(ROOT / "Vagrantfile")], capture_output=True,
                            text=True, check=False)
    assert (0, "Syntax OK\n") == (result.returncode, result.stdout), result.stderr


def test_lab_is_one_control_plane_and_two_workers(lab: dict[str, Any]) -> None:
    """cp, worker1, worker2 on one private network, each with its own address."""
    assert ["cp", "worker1", "worker2"] == list(lab["machines"])
    addresses = {}
    for name, machine in lab["machines"].items():
        vm = machine["config"]["vm"]
        assert name == vm["hostname"]
        assert [net["type"] for net in vm["networks"]] == ["private_network"]
        addresses[name] = vm["networks"][0]["ip"]
    assert 3 == len(set(addresses.values()))
    assert {ip.rsplit(".", 1)[0] for ip in addresses.values()} == {"192.168.56"}
    assert lab["box"] in ("debian/bookworm64", "generic/debian12")


def test_checkout_is_copied_without_local_state(lab: dict[str, Any]) -> None:
    """/vagrant is an rsync copy (any provider, no guest additions) without .git or .venv."""
    [folder] = lab["synced_folders"]
    assert ("rsync", ".", "/vagrant") == (folder["type"], folder["source"],
                                          folder["destination"])
    assert {".git/", ".venv/", ".vagrant/"} <= set(folder["rsync__exclude"])


def test_provisioning_order(lab: dict[str, Any]) -> None:
    """Each node gets Kubernetes, its pod network and the image; cp inits, then deploys
    iptsync; workers join last, so their agent's image is already there."""
    names = {machine: [step["name"] for step in provisioners(lab, machine)]
             for machine in lab["machines"]}
    base = ["common.sh", "pod-network.sh", "deploy.sh image"]
    assert {
        "cp": [*base, "control-plane.sh", "deploy.sh apply"],
        "worker1": [*base, "worker.sh"],
        "worker2": [*base, "worker.sh"],
    } == names


def test_provisioners_run_existing_scripts_with_the_variables_they_require(
        lab: dict[str, Any]) -> None:
    """Every `${VAR:?}` a provisioning script insists on is in the environment it gets."""
    for machine in lab["machines"]:
        for step in provisioners(lab, machine):
            script = ROOT / step["path"]
            assert script.is_file(), step["path"]
            required = set(re.findall(r"\$\{([A-Z_]+):\?\}", script.read_text()))
            assert set() == required - set(step["env"]), f"{machine}: {step['name']}"
            assert step["env"]["NODE_NAME"] == machine


def test_nodes_route_each_others_pod_subnets(lab: dict[str, Any]) -> None:
    """LAB_NODES pairs each node with its address and a distinct /24 of POD_CIDR."""
    env = provisioners(lab, "cp")[0]["env"]
    entries = [entry.split("=") for entry in env["LAB_NODES"].split()]
    assert list(lab["machines"]) == [name for name, _, _ in entries]
    assert 3 == len({subnet for _, _, subnet in entries})
    prefix = env["POD_CIDR"].split(".0.0/16")[0]
    assert all(subnet.startswith(prefix + ".") and subnet.endswith(".0/24")
               for _, _, subnet in entries)


def test_bootstrap_token_is_made_once_in_kubeadms_format(ruby: str, tmp_path: Path) -> None:
    """Without IPTSYNC_LAB_TOKEN a token is generated, kept in .vagrant/ and reused."""
    shutil.copy(ROOT / "Vagrantfile", tmp_path / "Vagrantfile")
    first = evaluate_vagrantfile(ruby, tmp_path / "Vagrantfile", None)
    second = evaluate_vagrantfile(ruby, tmp_path / "Vagrantfile", None)
    token = provisioners(first, "cp")[0]["env"]["LAB_TOKEN"]
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token)
    assert token == provisioners(second, "worker2")[0]["env"]["LAB_TOKEN"]
    assert token + "\n" == (tmp_path / ".vagrant" / "iptsync-lab-token").read_text()


def test_there_are_provisioning_scripts() -> None:
    """The lab's scripts, each an executable bash script that stops at the first error."""
    names = {script.name for script in VAGRANT_SCRIPTS}
    assert {"common.sh", "pod-network.sh", "control-plane.sh", "worker.sh", "deploy.sh",
            "smoke-test.sh"} == names
    for script in VAGRANT_SCRIPTS:
        lines = script.read_text().splitlines()
        assert "#!/usr/bin/env bash" == lines[0], script.name
        assert "set -euo pipefail" in lines, script.name
        assert os.access(script, os.X_OK), script.name


@pytest.mark.parametrize("script", VAGRANT_SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    """bash -n accepts the script."""
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                            check=False)
    assert (0, "") == (result.returncode, result.stderr)


@pytest.mark.parametrize("script", VAGRANT_SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(shellcheck: str, script: Path) -> None:
    """shellcheck finds nothing, at any severity."""
    result = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True,
                            text=True, check=False)
    assert 0 == result.returncode, result.stdout


def test_smoke_test_objects_match_what_the_script_checks() -> None:
    """NodePort 30080 over three pods; ETP=Local NodePort 30081 with its pod on local_node."""
    docs = {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all((DEPLOY / "vagrant" / "smoke-test.yaml").read_text())}
    script = (DEPLOY / "vagrant" / "smoke-test.sh").read_text()
    [local_node] = re.findall(r"^local_node=(\S+)", script, re.M)
    echo, local = docs[("Service", "echo")]["spec"], docs[("Service", "echo-local")]["spec"]
    assert ("NodePort", 30080) == (echo["type"], echo["ports"][0]["nodePort"])
    assert ("NodePort", 30081, "Local") == (local["type"], local["ports"][0]["nodePort"],
                                            local["externalTrafficPolicy"])
    assert 3 == docs[("Deployment", "echo")]["spec"]["replicas"]
    pinned = docs[("Deployment", "echo-local")]["spec"]
    assert 1 == pinned["replicas"]
    assert {"kubernetes.io/hostname": local_node} == pinned["template"]["spec"]["nodeSelector"]
    assert ":30080/" in script
    assert ":30081/" in script
