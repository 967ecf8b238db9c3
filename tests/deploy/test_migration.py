"""docs/migration.md stays true: kube-proxy's own config file works as iptsync's, and the node
label the guide uses is the one the DaemonSet obeys."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from iptsync.options import read_config

from .conftest import DEPLOY, ROOT

GUIDE = ROOT / "docs" / "migration.md"


def test_kubeadms_kube_proxy_config_is_read_unchanged() -> None:
    """kubeadm's config.conf parses; its zero durations and nulls mean "the default", and
    nothing in it is refused or unknown."""
    config = read_config(Path(__file__).with_name("kubeadm-kube-proxy-config.yaml"))
    assert ("10.244.0.0/16", False, 1.0, 30.0, "/var/lib/kube-proxy/kubeconfig.conf") == (
        config.cluster_cidr, config.masquerade_all, config.min_sync_period,
        config.sync_period, config.kubeconfig)
    assert [] == [v.name for v in config.verdicts if v.handling == "refused" or v.suspicious]


def daemonset_affinity() -> dict[str, Any]:
    daemonset = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    terms = daemonset["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    [term] = terms
    [expression] = term["matchExpressions"]
    result: dict[str, Any] = expression
    return result


def test_guide_uses_the_label_the_daemonset_obeys() -> None:
    """The label that keeps a node on kube-proxy is the one iptsync's affinity excludes."""
    expression = daemonset_affinity()
    assert "NotIn" == expression["operator"]
    [value] = expression["values"]
    label = f"{expression['key']}={value}"
    guide = GUIDE.read_text()
    assert f"kubectl label nodes --all {label}" in guide
    assert f"kubectl label node NODE {label} --overwrite" in guide
    assert f"kubectl label nodes --all {expression['key']}-" in guide


def test_guide_pins_kube_proxy_to_that_label_and_unpins_it() -> None:
    """The kube-proxy patches select the label, and the rollback removes exactly that key."""
    expression = daemonset_affinity()
    guide = GUIDE.read_text()
    patches = [json.loads(p) for p in re.findall(r"--type merge \\\n\s+-p '(.+?)'", guide)]
    assert patches
    for patch in patches:
        selector = patch["spec"]["template"]["spec"]["nodeSelector"]
        assert {expression["key"]: expression["values"][0]} == selector
    [removal] = re.findall(r"--type json \\\n\s+-p '(.+?)'", guide)
    escaped = expression["key"].replace("~", "~0").replace("/", "~1")
    assert [{"op": "remove", "path": f"/spec/template/spec/nodeSelector/{escaped}"}] == \
        json.loads(removal)
