"""Addresses with leading zeros, as API servers stored them before their stricter validation,
are programmed the way kube-proxy reads them (each part decimal), on real netfilter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iptsync.core import names
from iptsync.kernel.netfilter import Netfilter

pytestmark = pytest.mark.netns


def test_leading_zero_service_and_endpoint_addresses_are_programmed(netfilter: Netfilter,
                                                                    tmp_path: Path) -> None:
    """10.96.0.050 and 10.0.1.010 become rules for 10.96.0.50 and 10.0.1.10."""
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"namespace": "default", "name": "web"},
         "spec": {"clusterIP": "10.96.0.050", "clusterIPs": ["10.96.0.050"],
                  "externalIPs": ["192.0.2.007"], "ports": [{"name": "http", "port": 80}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"namespace": "default", "name": "web-1",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
         "endpoints": [{"addresses": ["10.0.1.010"]}]},
    ]}))
    result = subprocess.run(
        ["ip", "netns", "exec", str(netfilter.netns), sys.executable, "-m", "iptsync.cli",
         "run", "--once", "--objects", str(objects), "--hostname-override", "node1",
         "--cluster-cidr", "10.0.0.0/14", "--iptables-backend", netfilter.backend.value,
         "--no-conntrack-cleanup"], capture_output=True, text=True, check=False, timeout=120)
    assert 0 == result.returncode, result.stderr
    nat = netfilter.save(["nat"])["nat"]
    svc = names.svc_chain("default/web:http", "tcp")
    sep = names.sep_chain("default/web:http", "tcp", "10.0.1.10:8080")
    services = nat.chains["KUBE-SERVICES"]
    assert any("-d 10.96.0.50/32" in rule and svc in rule for rule in services), services
    assert any("-d 192.0.2.7/32" in rule for rule in services), services
    assert any("--to-destination 10.0.1.10:8080" in rule for rule in nat.chains[sep]), \
        nat.chains.get(sep)
