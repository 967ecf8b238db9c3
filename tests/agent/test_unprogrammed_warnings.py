"""What iptsync does not program is said on stderr, object by object: FQDN EndpointSlices
(``iptsync dump``, no root needed). IPv6 is programmed: the dump of a dual-stack node prints
both families, each after the restore command it is for, and warns about neither."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any


def slice_of(service: str, name: str, address_type: str, address: str) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "default", "name": name,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": address_type, "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [address]}]}


def service(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "default", "name": name},
            "spec": {"ports": [{"name": "http", "port": 80}], **spec}}


def test_only_unprogrammed_fqdn_slices_are_named(tmp_path: Path) -> None:
    """FQDN slices get one warning each; IPv6 Services and slices none; both families are
    dumped, IPv4 first, each half of the dual-stack Service in its own family."""
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        service("v6", clusterIP="fd00::10", clusterIPs=["fd00::10"], ipFamilies=["IPv6"]),
        service("dual", clusterIP="10.96.0.20", clusterIPs=["10.96.0.20", "fd00::20"],
                ipFamilies=["IPv4", "IPv6"]),
        slice_of("dual", "dual-v4", "IPv4", "10.0.1.20"),
        slice_of("dual", "dual-v6", "IPv6", "fd00:1::20"),
        service("only-v6-slices", clusterIP="10.96.0.30"),
        slice_of("only-v6-slices", "only-v6", "IPv6", "fd00:1::30"),
        slice_of("only-v6-slices", "only-fqdn", "FQDN", "db.example.com"),
    ]}))
    result = subprocess.run(
        [sys.executable, "-m", "iptsync.cli", "dump", "--objects", str(objects),
         "--hostname-override", "node1", "--cluster-cidr", "10.0.0.0/14,fd00:1::/56"],
        capture_output=True, text=True, check=False, timeout=60)
    assert 0 == result.returncode, result.stderr
    warnings = sorted(line.split("iptsync: ", 1)[1] for line in result.stderr.splitlines()
                      if "WARNING" in line)
    assert ["skipping EndpointSlice default/only-fqdn: addressType: FQDN endpoints are never "
            "programmed (kube-proxy ignores them)"] == warnings
    before, first, ipv4, second, ipv6 = re.split(r"^(# ip6?tables-restore --noflush)\n",
                                                 result.stdout, flags=re.MULTILINE)
    assert ("", "# iptables-restore --noflush", "# ip6tables-restore --noflush") == (
        before, first, second)
    assert '"default/dual:http cluster IP" -m tcp -p tcp -d 10.96.0.20 ' in ipv4
    assert '"default/only-v6-slices:http has no endpoints"' in ipv4
    assert "fd00" not in ipv4
    assert '"default/dual:http cluster IP" -m tcp -p tcp -d fd00::20 ' in ipv6
    assert "--to-destination [fd00:1::20]:8080" in ipv6
    assert '"default/v6:http has no endpoints"' in ipv6
    assert "10.96.0.20" not in ipv6
    assert "only-v6-slices" not in ipv6


def test_services_for_another_proxy_are_named_and_left_out(tmp_path: Path) -> None:
    """A Service labelled service.kubernetes.io/service-proxy-name, and the slices of a
    headless Service, are not dumped; the Service is named in one INFO line (``-v``)."""
    other = service("mesh", clusterIP="10.96.0.40")
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other-proxy"}
    headless = slice_of("db", "db-1", "IPv4", "10.0.1.50")
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = ""
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"kind": "List", "items": [
        other, slice_of("mesh", "mesh-1", "IPv4", "10.0.1.40"), headless,
        service("web", clusterIP="10.96.0.41"), slice_of("web", "web-1", "IPv4", "10.0.1.41"),
    ]}))
    result = subprocess.run(
        [sys.executable, "-m", "iptsync.cli", "dump", "-v", "--objects", str(objects),
         "--hostname-override", "node1", "--cluster-cidr", "10.0.0.0/14"],
        capture_output=True, text=True, check=False, timeout=60)
    assert 0 == result.returncode, result.stderr
    notes = [line.split("iptsync.sources.files: ", 1)[1] for line in result.stderr.splitlines()
             if "not programmed" in line]
    assert ["Service default/mesh: not programmed: labelled service.kubernetes.io/"
            "service-proxy-name=other-proxy (left to another proxy, as kube-proxy's label "
            "selector !service.kubernetes.io/headless,!service.kubernetes.io/"
            "service-proxy-name does)"] == notes
    assert '"default/web:http cluster IP"' in result.stdout
    assert [] == [ip for ip in ("10.96.0.40", "10.0.1.40", "10.0.1.50") if ip in result.stdout]
