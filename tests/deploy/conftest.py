"""Fixtures of the deployment tests: the repository, the tools they run, the rendered manifests.

No root needed, but kubectl, ruby and shellcheck are (scripts/install puts them on a Debian
machine). A missing tool skips its tests on a laptop; with ``IPTSYNC_REQUIRE_NETNS=1`` (set by
.ci/run, after scripts/install) it fails them, so CI cannot pass by skipping.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from iptsync.lab.netns import netns_required

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VAGRANT_SCRIPTS = sorted((DEPLOY / "vagrant").glob("*.sh"))

Objects = dict[tuple[str, str], dict[str, Any]]


def require_tool(name: str) -> str:
    """The tool's path; skip without it, or fail when CI requires every test to run."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (scripts/install installs it)"
    if netns_required():
        pytest.fail(f"IPTSYNC_REQUIRE_NETNS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_tool("kubectl")


@pytest.fixture(scope="session")
def ruby() -> str:
    return require_tool("ruby")


@pytest.fixture(scope="session")
def shellcheck() -> str:
    return require_tool("shellcheck")


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> Objects:
    """``kubectl kustomize deploy/``, by (kind, name)."""
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    by_key = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    assert len(objects) == len(by_key), "two objects of one kind share a name"
    return by_key


@pytest.fixture(scope="session")
def daemonset(rendered: Objects) -> dict[str, Any]:
    return rendered[("DaemonSet", "iptsync")]


@pytest.fixture(scope="session")
def pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="session")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    """The DaemonSet's one container, as rendered."""
    assert 1 == len(pod["containers"])
    spec: dict[str, Any] = pod["containers"][0]
    return spec
