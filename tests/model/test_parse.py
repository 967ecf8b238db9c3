"""Table-driven unit tests for iptsync.core.model: invalid fields, defaults, skips and client
objects.

Every invalid field must be reported as a Problem naming the object (``namespace/name``) and
the exact field path; a bad endpoint address drops only that endpoint. Valid but unprogrammable
services (headless, ExternalName, IPv6) parse to no ports with a reason.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import ipaddress
from collections.abc import Callable
from typing import Any

import kubernetes.client as k8s
import pytest

from iptsync.core.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    SERVICE_NAME_LABEL,
    SOURCE_RANGES_ANNOTATION,
    Endpoint,
    EndpointSliceInfo,
    IPFamily,
    NodeInfo,
    Parsed,
    Problem,
    Protocol,
    ServiceInfo,
    ServicePortName,
    SlicePort,
    endpoint_of,
    other_proxy_label,
    parse_all,
    parse_endpoint_slice,
    parse_node,
    parse_object,
    parse_service,
    to_manifest,
)

Manifest = dict[str, Any]


def service(spec: Manifest | None = None, *, status: Manifest | None = None,
            metadata: Manifest | None = None) -> Manifest:
    """A valid two-port ClusterIP Service ns1/web, with ``spec`` keys overridden."""
    manifest: Manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "ns1"} if metadata is None else metadata,
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                      {"name": "https", "port": 443, "protocol": "TCP"}],
            **(spec or {}),
        },
    }
    if status is not None:
        manifest["status"] = status
    return manifest


def endpoint_slice(**overrides: Any) -> Manifest:
    """A valid IPv4 EndpointSlice ns1/web-abc of service web, with top-level keys overridden."""
    manifest: Manifest = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "ns1",
                     "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.1.1"], "conditions": {"ready": True}, "nodeName": "node1"},
            {"addresses": ["10.0.1.2"], "conditions": {"ready": True}, "nodeName": "node2"},
            {"addresses": ["10.0.1.3"], "conditions": {"ready": True}, "nodeName": "node3"},
        ],
    }
    manifest.update(overrides)
    return manifest


def node(**overrides: Any) -> Manifest:
    """A valid Node node1 in zone z1 with one internal and one external address."""
    manifest: Manifest = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.100.0.2"},
                                 {"type": "Hostname", "address": "node1"},
                                 {"type": "ExternalIP", "address": "203.0.113.7"}]},
    }
    manifest.update(overrides)
    return manifest


def problem_fields(parsed: Parsed) -> list[tuple[str, str, str]]:
    """(kind, ref, field) of each problem, the parts tests pin down exactly."""
    return [(p.kind, p.ref, p.field) for p in parsed.problems]


def service_info(manifest: Manifest) -> ServiceInfo:
    """Parse a manifest that must be a valid Service."""
    parsed = parse_object(manifest)
    assert () == parsed.problems
    assert isinstance(parsed.value, ServiceInfo)
    return parsed.value


def slice_info(manifest: Manifest) -> EndpointSliceInfo:
    """Parse a manifest that must be an accepted EndpointSlice (problems allowed)."""
    parsed = parse_object(manifest)
    assert isinstance(parsed.value, EndpointSliceInfo)
    return parsed.value


MISSING = ...  # as a value for set_path: remove the item instead


def set_path(manifest: Manifest, path: tuple[Any, ...], value: Any) -> Manifest:
    """A deep copy of ``manifest`` with the item at ``path`` replaced, or removed (MISSING)."""
    out = copy.deepcopy(manifest)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is MISSING:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


# --- invalid Service fields ---------------------------------------------------------------

BAD_SERVICES: list[Any] = [
    pytest.param(("spec", "clusterIP"), "10.96.0.300", "spec.clusterIP", id="cluster-ip-octet"),
    pytest.param(("spec", "clusterIP"), "nope", "spec.clusterIP", id="cluster-ip-word"),
    pytest.param(("spec", "clusterIP"), 167772161, "spec.clusterIP", id="cluster-ip-int"),
    pytest.param(("spec", "clusterIP"), MISSING, "spec.clusterIP", id="cluster-ip-missing"),
    pytest.param(("spec", "ports", 1, "port"), 70000, "spec.ports[1].port", id="port-70000"),
    pytest.param(("spec", "ports", 1, "port"), 0, "spec.ports[1].port", id="port-0"),
    pytest.param(("spec", "ports", 1, "port"), -1, "spec.ports[1].port", id="port-negative"),
    pytest.param(("spec", "ports", 1, "port"), "80", "spec.ports[1].port", id="port-string"),
    pytest.param(("spec", "ports", 1, "port"), True, "spec.ports[1].port", id="port-bool"),
    pytest.param(("spec", "ports", 1, "port"), 80.0, "spec.ports[1].port", id="port-float"),
    pytest.param(("spec", "ports", 1, "port"), MISSING, "spec.ports[1].port", id="port-missing"),
    pytest.param(("spec", "ports", 0, "protocol"), "ICMP", "spec.ports[0].protocol",
                 id="protocol-icmp"),
    pytest.param(("spec", "ports", 0, "protocol"), "tcp", "spec.ports[0].protocol",
                 id="protocol-lowercase"),
    pytest.param(("spec", "ports", 0, "protocol"), ["TCP"], "spec.ports[0].protocol",
                 id="protocol-list"),
    pytest.param(("spec", "ports", 0, "name"), 7, "spec.ports[0].name", id="port-name-int"),
    pytest.param(("spec", "ports", 1, "name"), "http", "spec.ports[1].name",
                 id="port-name-duplicate"),
    pytest.param(("spec", "ports", 0), None, "spec.ports[0]", id="port-none"),
    pytest.param(("spec", "ports", 0), "80/TCP", "spec.ports[0]", id="port-entry-string"),
    pytest.param(("spec", "ports"), [], "spec.ports", id="ports-empty"),
    pytest.param(("spec", "ports"), {"name": "http", "port": 80}, "spec.ports",
                 id="ports-mapping"),
    pytest.param(("spec", "ports", 0, "nodePort"), 70000, "spec.ports[0].nodePort",
                 id="node-port-70000"),
    pytest.param(("spec", "ports", 0, "nodePort"), "30080", "spec.ports[0].nodePort",
                 id="node-port-string"),
    pytest.param(("spec", "externalIPs"), ["nope"], "spec.externalIPs[0]", id="external-ip"),
    pytest.param(("spec", "externalIPs"), ["192.0.2.1", "192.0.2.256"], "spec.externalIPs[1]",
                 id="external-ip-second"),
    pytest.param(("spec", "externalIPs"), "192.0.2.1", "spec.externalIPs",
                 id="external-ips-string"),
    pytest.param(("spec", "externalTrafficPolicy"), "Nowhere", "spec.externalTrafficPolicy",
                 id="etp-unknown"),
    pytest.param(("spec", "internalTrafficPolicy"), "Nowhere", "spec.internalTrafficPolicy",
                 id="itp-unknown"),
    pytest.param(("spec", "sessionAffinity"), "Cookie", "spec.sessionAffinity",
                 id="affinity-unknown"),
    pytest.param(("spec", "type"), "Ingress", "spec.type", id="type-unknown"),
    pytest.param(("spec",), None, "spec", id="spec-none"),
    pytest.param(("spec",), [], "spec", id="spec-list"),
    pytest.param(("metadata", "annotations"), ["a"], "metadata.annotations",
                 id="annotations-list"),
    pytest.param(("metadata", "annotations"), {"a": 1}, "metadata.annotations[a]",
                 id="annotation-value-int"),
]


@pytest.mark.parametrize(("path", "value", "field"), BAD_SERVICES)
def test_invalid_service_field_is_reported_by_path(path: tuple[Any, ...], value: Any,
                                                    field: str) -> None:
    """A Service with one bad field is rejected whole, with a Problem naming ns/name and field."""
    parsed = parse_object(set_path(service(), path, value))
    assert [("Service", "ns1/web", field)] == problem_fields(parsed)
    assert "object" == parsed.problems[0].dropped
    assert parsed.value is None


@pytest.mark.parametrize(("spec", "field"), [
    pytest.param({"sessionAffinity": "ClientIP",
                  "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
                 "spec.sessionAffinityConfig.clientIP.timeoutSeconds", id="timeout-0"),
    pytest.param({"sessionAffinity": "ClientIP",
                  "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}},
                 "spec.sessionAffinityConfig.clientIP.timeoutSeconds", id="timeout-86401"),
    pytest.param({"sessionAffinity": "ClientIP",
                  "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": "600"}}},
                 "spec.sessionAffinityConfig.clientIP.timeoutSeconds", id="timeout-string"),
    pytest.param({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": 600}},
                 "spec.sessionAffinityConfig.clientIP", id="client-ip-config-int"),
    pytest.param({"sessionAffinity": "ClientIP", "sessionAffinityConfig": "600"},
                 "spec.sessionAffinityConfig", id="affinity-config-string"),
    pytest.param({"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/33"]},
                 "spec.loadBalancerSourceRanges[0]", id="source-range-prefix"),
    pytest.param({"type": "LoadBalancer",
                  "loadBalancerSourceRanges": ["10.0.0.0/8", "300.0.0.0/8"]},
                 "spec.loadBalancerSourceRanges[1]", id="source-range-second"),
    pytest.param({"type": "LoadBalancer", "loadBalancerSourceRanges": "10.0.0.0/8"},
                 "spec.loadBalancerSourceRanges", id="source-ranges-string"),
    pytest.param({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                  "healthCheckNodePort": 70000},
                 "spec.healthCheckNodePort", id="health-check-node-port"),
])
def test_invalid_service_spec_is_reported_by_path(spec: Manifest, field: str) -> None:
    """Affinity, source-range and health-check fields are validated with their exact path."""
    parsed = parse_object(service(spec))
    assert [("Service", "ns1/web", field)] == problem_fields(parsed)
    assert parsed.value is None


@pytest.mark.parametrize(("ingress", "field"), [
    pytest.param([{"ip": "198.51.100.300"}], "status.loadBalancer.ingress[0].ip", id="ip"),
    pytest.param([{"ip": "198.51.100.1"}, "x"], "status.loadBalancer.ingress[1]", id="entry"),
    pytest.param({"ip": "198.51.100.1"}, "status.loadBalancer.ingress", id="not-a-list"),
])
def test_invalid_load_balancer_ingress_is_reported_by_path(ingress: Any, field: str) -> None:
    """A bad LoadBalancer status ingress rejects the Service naming the ingress field."""
    parsed = parse_object(service({"type": "LoadBalancer"},
                                  status={"loadBalancer": {"ingress": ingress}}))
    assert [("Service", "ns1/web", field)] == problem_fields(parsed)
    assert parsed.value is None


def test_source_range_annotation_error_names_the_annotation() -> None:
    """A bad CIDR in the source-ranges annotation is reported under that annotation."""
    meta = {"name": "web", "namespace": "ns1",
            "annotations": {SOURCE_RANGES_ANNOTATION: "10.0.0.0/8,bogus"}}
    parsed = parse_object(service({"type": "LoadBalancer"}, metadata=meta))
    expected = [("Service", "ns1/web", f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]")]
    assert expected == problem_fields(parsed)
    assert parsed.value is None


def test_non_string_namespace_is_reported() -> None:
    """A namespace that is not a string rejects the object; the ref shows the raw value."""
    parsed = parse_object(service(metadata={"name": "web", "namespace": 5}))
    assert [("Service", "5/web", "metadata.namespace")] == problem_fields(parsed)
    assert parsed.value is None


def test_missing_name_is_reported_with_placeholder_ref() -> None:
    """A Service without metadata.name is rejected; the ref keeps its namespace."""
    parsed = parse_object(service(metadata={"namespace": "ns1"}))
    assert [("Service", "ns1/<unnamed>", "metadata.name")] == problem_fields(parsed)
    assert parsed.value is None


def test_missing_metadata_is_reported() -> None:
    """A Service without metadata at all is rejected with field ``metadata``."""
    manifest = service()
    del manifest["metadata"]
    parsed = parse_object(manifest)
    assert [("Service", "default/<unnamed>", "metadata")] == problem_fields(parsed)


def test_problem_str_names_kind_object_and_field() -> None:
    """A Problem prints as the warning kube-proxy users expect to grep for."""
    parsed = parse_object(service({"clusterIP": "10.96.0.300"}))
    expected = "skipping Service ns1/web: spec.clusterIP: '10.96.0.300' is not a valid IP address"
    assert expected == str(parsed.problems[0])


# --- names, as the API server checks them -------------------------------------------------

INJECTION = "web\n-A KUBE-SERVICES -d 192.0.2.99/32 -j DNAT --to-destination 10.0.9.9:80"
BAD_LABELS = [INJECTION, "web app", 'we"b', "Web", "-web", "web-", "web.app", "x" * 64, "",
              "we\rb", "we\x00b", "w\u00e9b"]


@pytest.mark.parametrize("bad", [b for b in BAD_LABELS if b])
def test_service_name_must_be_a_dns_label(bad: str) -> None:
    """A Service name the API server would refuse rejects the Service, naming metadata.name."""
    parsed = parse_object(service(metadata={"name": bad, "namespace": "ns1"}))
    assert ["metadata.name"] == [p.field for p in parsed.problems]
    assert parsed.value is None


@pytest.mark.parametrize("bad", [b for b in BAD_LABELS if b])
def test_namespace_must_be_a_dns_label(bad: str) -> None:
    """A namespace that is not a DNS-1123 label rejects Services and EndpointSlices."""
    meta = {"name": "web", "namespace": bad}
    slice_meta = {**meta, "labels": {SERVICE_NAME_LABEL: "web"}}
    for parsed in (parse_object(service(metadata=meta)),
                   parse_object(endpoint_slice(metadata=slice_meta))):
        assert ["metadata.namespace"] == [p.field for p in parsed.problems]
        assert parsed.value is None


@pytest.mark.parametrize("bad", [b for b in BAD_LABELS if b])
def test_port_names_must_be_dns_labels(bad: str) -> None:
    """A Service or EndpointSlice port name that is not a DNS-1123 label rejects the object."""
    svc = service({"ports": [{"name": "http", "port": 80}, {"name": bad, "port": 81}]})
    assert ["spec.ports[1].name"] == [p.field for p in parse_object(svc).problems]
    sl = endpoint_slice(ports=[{"name": bad, "port": 8080}])
    assert ["ports[0].name"] == [p.field for p in parse_object(sl).problems]


@pytest.mark.parametrize("good", ["1web", "a", "x" * 63, "web-1--b"])
def test_dns_label_names_are_accepted(good: str) -> None:
    """Names any API server accepts (a leading digit since RelaxedServiceNameValidation) parse."""
    manifest = service({"ports": [{"name": good, "port": 80}]},
                       metadata={"name": good, "namespace": good})
    assert ServicePortName(good, good, good) == service_info(manifest).ports[0].name


@pytest.mark.parametrize(("bad", "good"), [
    (INJECTION, "web.app-1.x"), ("web..app", "a" * 63 + "." + "b" * 63),
    ("Web.app", "1.2.3"), ("a" * 254, "a" * 63 + ".b"),
])
def test_slice_and_node_names_must_be_dns_subdomains(bad: str, good: str) -> None:
    """EndpointSlice and Node names are DNS-1123 subdomains: at most 253, dotted labels."""
    slice_meta = {"namespace": "ns1", "labels": {SERVICE_NAME_LABEL: "web"}}
    assert ["metadata.name"] == [p.field for p in parse_object(
        endpoint_slice(metadata={**slice_meta, "name": bad})).problems]
    assert ["metadata.name"] == [p.field for p in parse_object(
        node(metadata={"name": bad})).problems]
    assert () == parse_object(endpoint_slice(metadata={**slice_meta, "name": good})).problems
    assert () == parse_object(node(metadata={"name": good})).problems


@pytest.mark.parametrize("bad", [INJECTION, "web app", "-web", "x" * 64, "web/app"])
def test_service_name_label_must_be_a_label_value(bad: str) -> None:
    """The kubernetes.io/service-name label is checked as a label value."""
    meta = {"name": "web-abc", "namespace": "ns1", "labels": {SERVICE_NAME_LABEL: bad}}
    parsed = parse_object(endpoint_slice(metadata=meta))
    assert [f"metadata.labels[{SERVICE_NAME_LABEL}]"] == [p.field for p in parsed.problems]
    assert parsed.value is None


def test_warning_for_a_hostile_name_is_one_escaped_line() -> None:
    """A newline in a name is escaped in the warning, which names the object and field."""
    parsed = parse_object(service(metadata={"name": INJECTION, "namespace": "ns1"}))
    text = str(parsed.problems[0])
    assert "\n" not in text
    assert text.startswith("skipping Service ns1/web\\n-A KUBE-SERVICES -d 192.0.2.99/32 -j ")
    assert ": metadata.name: 'web\\n-A KUBE-SERVICES" in text


def test_overlong_name_is_cut_in_the_warning() -> None:
    """A 10,000-character name is reported with its length, not printed in full."""
    parsed = parse_object(service(metadata={"name": "x" * 10000, "namespace": "ns1"}))
    assert ["metadata.name"] == [p.field for p in parsed.problems]
    assert "...(10000 characters)" in parsed.problems[0].ref
    assert len(str(parsed.problems[0])) < 400


# --- invalid EndpointSlice fields ---------------------------------------------------------

BAD_SLICES: list[Any] = [
    pytest.param({"metadata": {"name": "web-abc", "namespace": "ns1"}},
                 "ns1/web-abc", f"metadata.labels[{SERVICE_NAME_LABEL}]", id="no-service-label"),
    pytest.param({"metadata": {"name": "web-abc", "namespace": "ns1",
                               "labels": {SERVICE_NAME_LABEL: ""}}},
                 "ns1/web-abc", f"metadata.labels[{SERVICE_NAME_LABEL}]",
                 id="empty-service-label"),
    pytest.param({"metadata": {"namespace": "ns1", "labels": {SERVICE_NAME_LABEL: "web"}}},
                 "ns1/<unnamed>", "metadata.name", id="no-name"),
    pytest.param({"metadata": {"name": "web-abc", "namespace": "ns1", "labels": ["web"]}},
                 "ns1/web-abc", "metadata.labels", id="labels-list"),
    pytest.param({"addressType": "IPv5"}, "ns1/web-abc", "addressType", id="address-type"),
    pytest.param({"addressType": None}, "ns1/web-abc", "addressType", id="address-type-none"),
    pytest.param({"addressType": 4}, "ns1/web-abc", "addressType", id="address-type-int"),
    pytest.param({"ports": [{"name": "http", "port": 70000}]}, "ns1/web-abc", "ports[0].port",
                 id="port-70000"),
    pytest.param({"ports": [{"name": "http", "port": "8080"}]}, "ns1/web-abc", "ports[0].port",
                 id="port-string"),
    pytest.param({"ports": [{"name": "http", "port": 8080, "protocol": "ICMP"}]},
                 "ns1/web-abc", "ports[0].protocol", id="protocol"),
    pytest.param({"ports": [None]}, "ns1/web-abc", "ports[0]", id="port-none"),
    pytest.param({"ports": {"http": 8080}}, "ns1/web-abc", "ports", id="ports-mapping"),
    pytest.param({"endpoints": {"addresses": ["10.0.1.1"]}}, "ns1/web-abc", "endpoints",
                 id="endpoints-mapping"),
]


@pytest.mark.parametrize(("overrides", "ref", "field"), BAD_SLICES)
def test_invalid_slice_field_is_reported_by_path(overrides: Manifest, ref: str,
                                                 field: str) -> None:
    """An EndpointSlice with one bad field is rejected whole, naming ns/name and the field."""
    parsed = parse_object(endpoint_slice(**overrides))
    assert [("EndpointSlice", ref, field)] == problem_fields(parsed)
    assert "object" == parsed.problems[0].dropped
    assert parsed.value is None


BAD_ENDPOINTS: list[Any] = [
    pytest.param({"addresses": ["10.0.0.999"]}, "endpoints[1].addresses[0]", id="bad-octet"),
    pytest.param({"addresses": ["fd00::1"]}, "endpoints[1].addresses[0]", id="ipv6-in-ipv4"),
    pytest.param({"addresses": [10]}, "endpoints[1].addresses[0]", id="address-int"),
    pytest.param({"addresses": []}, "endpoints[1].addresses", id="no-addresses"),
    pytest.param({"addresses": "10.0.1.9"}, "endpoints[1].addresses", id="addresses-string"),
    pytest.param({"addresses": ["10.0.1.9"], "conditions": {"ready": "yes"}},
                 "endpoints[1].conditions.ready", id="ready-string"),
    pytest.param({"addresses": ["10.0.1.9"], "conditions": []}, "endpoints[1].conditions",
                 id="conditions-list"),
    pytest.param({"addresses": ["10.0.1.9"], "hints": {"forZones": [{}]}},
                 "endpoints[1].hints.forZones[0].name", id="hint-without-name"),
    pytest.param(None, "endpoints[1]", id="endpoint-none"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_ENDPOINTS)
def test_bad_endpoint_drops_only_that_endpoint(bad: Any, field: str) -> None:
    """A bad endpoint is dropped, the slice keeps the others, and the Problem says which."""
    manifest = endpoint_slice()
    manifest["endpoints"][1] = bad
    parsed = parse_object(manifest)
    assert [("EndpointSlice", "ns1/web-abc", field)] == problem_fields(parsed)
    assert "endpoint 1" == parsed.problems[0].dropped
    assert isinstance(parsed.value, EndpointSliceInfo)
    addresses = [str(ep.ip) for ep in parsed.value.endpoints]
    assert ["10.0.1.1", "10.0.1.3"] == addresses


def test_ipv4_address_in_ipv6_slice_is_dropped() -> None:
    """An IPv6 slice drops an IPv4 endpoint, naming it, and keeps the IPv6 ones."""
    manifest = endpoint_slice(addressType="IPv6", endpoints=[
        {"addresses": ["fd00::1"]}, {"addresses": ["10.0.1.1"]}, {"addresses": ["fd00::2"]}])
    parsed = parse_object(manifest)
    assert [("EndpointSlice", "ns1/web-abc", "endpoints[1].addresses[0]")] == \
        problem_fields(parsed)
    assert isinstance(parsed.value, EndpointSliceInfo)
    expected = [ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2")]
    assert expected == [ep.ip for ep in parsed.value.endpoints]
    assert ["[fd00::1]:0", "[fd00::2]:0"] == [ep.key for ep in parsed.value.endpoints]


def test_every_bad_endpoint_gets_its_own_problem() -> None:
    """Two bad endpoints yield two problems, each naming its own endpoint index."""
    manifest = endpoint_slice()
    manifest["endpoints"][0]["addresses"] = ["bogus"]
    manifest["endpoints"][2]["addresses"] = ["fd00::3"]
    parsed = parse_object(manifest)
    assert ["endpoint 0", "endpoint 2"] == [p.dropped for p in parsed.problems]
    assert ["10.0.1.2"] == [str(ep.ip) for ep in slice_info(manifest).endpoints]


def test_dropped_endpoint_problem_str_says_dropping() -> None:
    """A dropped endpoint's Problem reads as a drop, not as skipping the slice."""
    manifest = endpoint_slice()
    manifest["endpoints"][1] = {"addresses": ["10.0.0.999"]}
    problem = parse_object(manifest).problems[0]
    expected = ("EndpointSlice ns1/web-abc: dropping endpoint 1: endpoints[1].addresses[0]: "
                "'10.0.0.999' is not a valid IP address")
    assert expected == str(problem)


# --- defaults -----------------------------------------------------------------------------

def test_missing_namespace_defaults_to_default() -> None:
    """A Service without a namespace lives in ``default``."""
    info = service_info(service(metadata={"name": "web"}))
    assert ("default", "web") == info.key
    assert ServicePortName("default", "web", "http") == info.ports[0].name


def test_missing_slice_namespace_defaults_to_default() -> None:
    """An EndpointSlice without a namespace lives in ``default``."""
    manifest = endpoint_slice(metadata={"name": "web-abc",
                                        "labels": {SERVICE_NAME_LABEL: "web"}})
    assert ("default", "web-abc") == slice_info(manifest).key


def test_missing_protocol_defaults_to_tcp() -> None:
    """A service port and a slice port without a protocol are TCP."""
    info = service_info(service({"ports": [{"name": "dns", "port": 53}]}))
    assert [Protocol.TCP] == [p.protocol for p in info.ports]
    sl = slice_info(endpoint_slice(ports=[{"name": "dns", "port": 53}]))
    assert (SlicePort("dns", Protocol.TCP, 53),) == sl.ports


def test_service_port_fields_are_parsed() -> None:
    """A plain ClusterIP service yields one ServicePort per port with kube-proxy's fields."""
    info = service_info(service({"ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                                           {"name": "sctp", "port": 9, "protocol": "SCTP"}]}))
    port = info.ports[0]
    assert ServicePortName("ns1", "web", "dns") == port.name
    assert "ns1/web:dns" == str(port.name)
    assert (Protocol.UDP, 53, 0) == (port.protocol, port.port, port.node_port)
    assert IPFamily.IPV4 == port.family
    assert ipaddress.ip_address("10.96.0.10") == port.cluster_ip
    assert Protocol.SCTP == info.ports[1].protocol
    assert (None, False, False) == (port.affinity_timeout, port.external_policy_local,
                                    port.internal_policy_local)


def test_unnamed_single_port_has_empty_port_name() -> None:
    """A single unnamed port is keyed ``namespace/name`` with no ``:port`` suffix."""
    info = service_info(service({"ports": [{"port": 80}]}))
    assert "ns1/web" == str(info.ports[0].name)


def test_same_port_name_with_different_protocols_is_valid() -> None:
    """A port name may repeat across protocols (DNS on TCP and UDP)."""
    info = service_info(service({"ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                                           {"name": "dns", "port": 53, "protocol": "TCP"}]}))
    assert [Protocol.UDP, Protocol.TCP] == [p.protocol for p in info.ports]


def test_missing_endpoint_conditions_mean_ready_serving_not_terminating() -> None:
    """Without conditions an endpoint is ready and serving and not terminating."""
    sl = slice_info(endpoint_slice(endpoints=[{"addresses": ["10.0.1.1"]},
                                              {"addresses": ["10.0.1.2"], "conditions": {}}]))
    expected = [(True, True, False), (True, True, False)]
    assert expected == [(ep.ready, ep.serving, ep.terminating) for ep in sl.endpoints]


def test_explicit_endpoint_conditions_are_kept() -> None:
    """Explicit conditions, node name, zone and hints are carried to the Endpoint."""
    sl = slice_info(endpoint_slice(endpoints=[{
        "addresses": ["10.0.1.1", "10.0.1.99"],
        "conditions": {"ready": False, "serving": True, "terminating": True},
        "nodeName": "node2", "zone": "z2", "hints": {"forZones": [{"name": "z1"}]},
    }]))
    expected = Endpoint(ip=ipaddress.ip_address("10.0.1.1"), port=0, node_name="node2",
                        zone="z2", zone_hints=frozenset({"z1"}), ready=False, serving=True,
                        terminating=True)
    assert (expected,) == sl.endpoints


def test_slice_port_without_number_is_ignored_with_a_warning() -> None:
    """A slice port with no port number is skipped, as kube-proxy does, and reported."""
    parsed = parse_object(endpoint_slice(ports=[{"name": "none"},
                                                {"name": "http", "port": 8080}]))
    assert [("EndpointSlice", "ns1/web-abc", "ports[0].port")] == problem_fields(parsed)
    assert "EndpointSlice ns1/web-abc: dropping port 0: ports[0].port: no port number (all " \
        "ports) is not programmed" == str(parsed.problems[0])
    assert isinstance(parsed.value, EndpointSliceInfo)
    assert (SlicePort("http", Protocol.TCP, 8080),) == parsed.value.ports


def test_fqdn_slice_has_no_family_and_no_endpoints() -> None:
    """FQDN slices are kept but carry no endpoints (kube-proxy ignores them), with a note."""
    parsed = parse_object(endpoint_slice(addressType="FQDN",
                                         endpoints=[{"addresses": ["db.example.com"]}]))
    assert "skipping EndpointSlice ns1/web-abc: addressType: FQDN endpoints are never " \
        "programmed (kube-proxy ignores them)" == "; ".join(map(str, parsed.problems))
    assert isinstance(parsed.value, EndpointSliceInfo)
    assert (None, ()) == (parsed.value.family, parsed.value.endpoints)


def test_ipv6_slice_is_parsed_without_problems() -> None:
    """An IPv6 slice parses with its family and endpoints, and no warning."""
    parsed = parse_object(endpoint_slice(addressType="IPv6",
                                         endpoints=[{"addresses": ["fd00::1"]}]))
    assert () == parsed.problems
    assert isinstance(parsed.value, EndpointSliceInfo)
    assert IPFamily.IPV6 == parsed.value.family
    assert [ipaddress.ip_address("fd00::1")] == [ep.ip for ep in parsed.value.endpoints]


@pytest.mark.parametrize("text", [
    "fd00::1", "fd00:10:1::5", "2001:db8::", "::", "::1", "1::", "1:0:0:2::3",
    "2001:db8:0:0:1:0:0:1", "fd00:10:1::0:5", "FD00::1", "fd00:0::1", "fd00::01",
    "::ffff:10.1.0.1", "::10.1.0.1", "::ffff:a01:1", "fe80::1%eth0", "fd00::1 ", "10.1.0.1",
])
def test_ipv6_endpoint_reads_as_the_validating_reader_reads_it(text: str) -> None:
    """The fast reader of the common, canonical IPv6 endpoint agrees with the validating one
    on every spelling: the same address, problem and text (rules and hashes use the text)."""
    def read(spec: Manifest) -> tuple[object, ...]:
        parsed = parse_object(endpoint_slice(addressType="IPv6", endpoints=[spec]))
        assert isinstance(parsed.value, EndpointSliceInfo)
        return (tuple(str(p) for p in parsed.problems),
                tuple((ep.ip, ep.address, ep.key) for ep in parsed.value.endpoints))

    plain = read({"addresses": [text]})  # the fast path's shape
    validated = read({"addresses": [text], "hints": {}})  # hints: always the validating reader
    assert validated == plain
    for _ip, address, key in plain[1]:
        assert str(ipaddress.ip_address(address)) == address
        assert f"[{address}]:0" == key


def test_an_address_in_other_scripts_digits_is_refused() -> None:
    """int() reads Arabic-Indic digits too: "1\u0660.0.0.1" must not pass for 10.0.0.1 (its
    text would reach a rule and fail the whole restore); the endpoint is dropped, named."""
    parsed = parse_object(endpoint_slice(endpoints=[{"addresses": ["1\u0660.0.0.1"]},
                                                    {"addresses": ["10.0.0.2"]}]))
    assert isinstance(parsed.value, EndpointSliceInfo)
    assert ["10.0.0.2"] == [ep.address for ep in parsed.value.endpoints]
    assert ["endpoints[0].addresses[0]"] == [p.field for p in parsed.problems]


def test_trigger_time_annotation_is_parsed() -> None:
    """The last-change-trigger-time annotation becomes a timezone-aware datetime."""
    meta = {"name": "web-abc", "namespace": "ns1", "labels": {SERVICE_NAME_LABEL: "web"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                            "2024-05-01T10:20:30Z"}}
    sl = slice_info(endpoint_slice(metadata=meta))
    assert sl.trigger_time is not None
    assert "2024-05-01T10:20:30+00:00" == sl.trigger_time.isoformat()


def test_session_affinity_without_config_uses_default_timeout() -> None:
    """sessionAffinity ClientIP without a config means 10800 seconds."""
    info = service_info(service({"sessionAffinity": "ClientIP"}))
    assert [DEFAULT_AFFINITY_TIMEOUT] * 2 == [p.affinity_timeout for p in info.ports]
    assert 10800 == DEFAULT_AFFINITY_TIMEOUT


@pytest.mark.parametrize("timeout", [1, 600, 86400])
def test_session_affinity_timeout_in_range_is_kept(timeout: int) -> None:
    """Any timeout in 1..86400 is used as given."""
    info = service_info(service({
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": timeout}}}))
    assert timeout == info.ports[0].affinity_timeout


def test_session_affinity_none_has_no_timeout() -> None:
    """sessionAffinity None ignores any config."""
    info = service_info(service({"sessionAffinity": "None", "sessionAffinityConfig": {
        "clientIP": {"timeoutSeconds": 0}}}))
    assert info.ports[0].affinity_timeout is None


# --- services that get no rules -----------------------------------------------------------

@pytest.mark.parametrize(("spec", "reason"), [
    pytest.param({"clusterIP": "None", "ports": [{"port": 80}]},
                 "headless services get no rules", id="headless"),
    pytest.param({"type": "ExternalName", "externalName": "db.example.com"},
                 "ExternalName services get no rules", id="external-name"),
    pytest.param({"type": "ExternalName", "clusterIP": "garbage", "ports": "junk"},
                 "ExternalName services get no rules", id="external-name-unchecked"),
])
def test_service_without_rules_has_no_ports_and_a_reason(spec: Manifest, reason: str) -> None:
    """Headless and ExternalName services parse to no ports and say why."""
    manifest = service()
    manifest["spec"] = spec
    info = service_info(manifest)
    assert ((), reason) == (info.ports, info.skipped_reason)


@pytest.mark.parametrize("spec", [
    pytest.param({"clusterIP": "fd00::10", "ports": [{"port": 80}]}, id="cluster-ip"),
    pytest.param({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"], "ipFamilies": ["IPv6"],
                  "ports": [{"port": 80}]}, id="single-stack"),
])
def test_ipv6_service_has_ipv6_ports(spec: Manifest) -> None:
    """An IPv6 Service parses to IPv6 ports with no problem."""
    manifest = service()
    manifest["spec"] = spec
    parsed = parse_object(manifest)
    assert () == parsed.problems
    assert isinstance(parsed.value, ServiceInfo)
    assert [(IPFamily.IPV6, ipaddress.ip_address("fd00::10"))] == [
        (p.family, p.cluster_ip) for p in parsed.value.ports]


def test_ipv6_primary_dual_stack_service_has_ports_of_both_families() -> None:
    """With ipFamilies [IPv6, IPv4] each port exists once per family, IPv6 first."""
    parsed = parse_object(service({"clusterIP": "fd00::10",
                                   "clusterIPs": ["fd00::10", "10.96.0.10"],
                                   "ipFamilies": ["IPv6", "IPv4"],
                                   "ipFamilyPolicy": "RequireDualStack"}))
    assert () == parsed.problems
    assert isinstance(parsed.value, ServiceInfo)
    assert [("http", "fd00::10"), ("https", "fd00::10"), ("http", "10.96.0.10"),
            ("https", "10.96.0.10")] == [(p.name.port, str(p.cluster_ip))
                                         for p in parsed.value.ports]


def test_dual_stack_service_splits_every_address_by_family() -> None:
    """External, load-balancer IPs and source ranges go to the port of their family."""
    parsed = parse_object(service({
        "type": "LoadBalancer", "clusterIPs": ["10.96.0.10", "fd00::10"],
        "ipFamilies": ["IPv4", "IPv6"], "externalIPs": ["192.0.2.1", "2001:db8::1"],
        "loadBalancerSourceRanges": ["2001:db8::/32", "203.0.113.0/24"]},
        status={"loadBalancer": {"ingress": [{"ip": "2001:db8::5"}, {"ip": "198.51.100.1"}]}}))
    assert () == parsed.problems
    assert isinstance(parsed.value, ServiceInfo)
    by_family = {p.family: p for p in parsed.value.ports if p.name.port == "http"}
    assert (["192.0.2.1"], ["198.51.100.1"], ["203.0.113.0/24"]) == (
        [str(ip) for ip in by_family[IPFamily.IPV4].external_ips],
        [str(ip) for ip in by_family[IPFamily.IPV4].load_balancer_ips],
        [str(n) for n in by_family[IPFamily.IPV4].load_balancer_source_ranges])
    assert (["2001:db8::1"], ["2001:db8::5"], ["2001:db8::/32"]) == (
        [str(ip) for ip in by_family[IPFamily.IPV6].external_ips],
        [str(ip) for ip in by_family[IPFamily.IPV6].load_balancer_ips],
        [str(n) for n in by_family[IPFamily.IPV6].load_balancer_source_ranges])


def test_zero_source_range_allows_everyone_of_its_family() -> None:
    """A 0.0.0.0/0 or ::/0 source range means no restriction, as kube-proxy reads it."""
    parsed = parse_object(service({
        "type": "LoadBalancer", "clusterIPs": ["10.96.0.10", "fd00::10"],
        "ipFamilies": ["IPv4", "IPv6"],
        "loadBalancerSourceRanges": ["0.0.0.0/0", "192.0.2.0/24", "2001:db8::/32"]}))
    assert isinstance(parsed.value, ServiceInfo)
    assert {IPFamily.IPV4: [], IPFamily.IPV6: ["2001:db8::/32"]} == {
        p.family: [str(n) for n in p.load_balancer_source_ranges] for p in parsed.value.ports}


@pytest.mark.parametrize(("spec", "field", "message"), [
    pytest.param({"clusterIPs": ["10.96.0.10", "10.96.0.11"]}, "spec.clusterIPs",
                 "must hold one address, or one IPv4 and one IPv6 address", id="same-family"),
    pytest.param({"clusterIPs": ["10.96.0.11"]}, "spec.clusterIPs[0]",
                 "10.96.0.11 differs from spec.clusterIP 10.96.0.10", id="first-differs"),
    pytest.param({"clusterIPs": ["10.96.0.10", "fd00::10"], "ipFamilies": ["IPv6", "IPv4"]},
                 "spec.ipFamilies[0]",
                 "IPv6 does not match the cluster IP 10.96.0.10 (spec.clusterIPs[0])",
                 id="family-mismatch"),
    pytest.param({"clusterIPs": ["10.96.0.10", "fd00::10"], "ipFamilyPolicy": "SingleStack"},
                 "spec.clusterIPs", "two addresses with ipFamilyPolicy SingleStack",
                 id="single-stack-with-two"),
    pytest.param({"ipFamilies": ["IPv5"]}, "spec.ipFamilies[0]",
                 "must be IPv4 or IPv6, not 'IPv5'", id="bad-family"),
    pytest.param({"ipFamilyPolicy": "Sometimes"}, "spec.ipFamilyPolicy",
                 "must be SingleStack, PreferDualStack or RequireDualStack, not 'Sometimes'",
                 id="bad-policy"),
])
def test_inconsistent_families_are_refused_naming_the_field(spec: Manifest, field: str,
                                                            message: str) -> None:
    """Cluster IPs and families that disagree reject the Service, naming the field."""
    parsed = parse_object(service(spec))
    assert parsed.value is None
    assert [f"skipping Service ns1/web: {field}: {message}"] == [str(p) for p in parsed.problems]


def test_single_stack_service_reports_other_family_addresses() -> None:
    """An IPv4-only Service names each IPv6 address it cannot program."""
    parsed = parse_object(service({"type": "LoadBalancer", "externalIPs": ["2001:db8::1"]},
                                  status={"loadBalancer": {"ingress": [{"ip": "2001:db8::5"}]}}))
    assert [
        "Service ns1/web: dropping IPv6 address: spec.externalIPs[0]: 2001:db8::1: the Service "
        "has no IPv6 cluster IP (spec.ipFamilies), so its IPv6 addresses are not programmed",
        "Service ns1/web: dropping IPv6 address: status.loadBalancer.ingress[0].ip: 2001:db8::5: "
        "the Service has no IPv6 cluster IP (spec.ipFamilies), so its IPv6 addresses are not "
        "programmed",
    ] == [str(p) for p in parsed.problems]


def test_valid_service_has_no_skipped_reason() -> None:
    """A normal service is not marked as skipped."""
    assert service_info(service()).skipped_reason is None


# --- external addresses and policies ------------------------------------------------------

def test_external_ips_of_other_family_are_dropped_and_reported() -> None:
    """IPv6 external IPs of an IPv4 service are dropped with a warning, IPv4 ones kept."""
    parsed = parse_object(service({"externalIPs": ["192.0.2.2", "2001:db8::1", "192.0.2.1"]}))
    assert [("Service", "ns1/web", "spec.externalIPs[1]")] == problem_fields(parsed)
    assert isinstance(parsed.value, ServiceInfo)
    expected = (ipaddress.ip_address("192.0.2.2"), ipaddress.ip_address("192.0.2.1"))
    assert expected == parsed.value.ports[0].external_ips


def test_load_balancer_ingress_skips_proxy_mode_and_hostnames() -> None:
    """Ingress with ipMode Proxy, hostname-only and other-family ingress are not captured."""
    parsed = parse_object(service({"type": "LoadBalancer"}, status={"loadBalancer": {"ingress": [
        {"ip": "198.51.100.1"},
        {"hostname": "lb.example.com"},
        {"ip": "198.51.100.2", "ipMode": "Proxy"},
        {"ip": "198.51.100.3", "ipMode": "VIP"},
        {"ip": "2001:db8::5"},
    ]}}))
    assert [("Service", "ns1/web", "status.loadBalancer.ingress[4].ip")] == \
        problem_fields(parsed)
    assert isinstance(parsed.value, ServiceInfo)
    expected = (ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("198.51.100.3"))
    assert expected == parsed.value.ports[0].load_balancer_ips


def test_load_balancer_ingress_is_ignored_for_other_types() -> None:
    """A ClusterIP service's load-balancer status is not used."""
    info = service_info(service({}, status={"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}))
    assert () == info.ports[0].load_balancer_ips


def test_source_ranges_are_parsed_and_masked() -> None:
    """Source ranges tolerate blanks and host bits, as kube-proxy does."""
    info = service_info(service({"type": "LoadBalancer", "loadBalancerSourceRanges": [
        " 203.0.113.7/24 ", "10.0.0.0/8"]}))
    expected = (ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("10.0.0.0/8"))
    assert expected == info.ports[0].load_balancer_source_ranges


def test_source_ranges_fall_back_to_annotation() -> None:
    """Without spec.loadBalancerSourceRanges the beta annotation is used."""
    meta = {"name": "web", "namespace": "ns1",
            "annotations": {SOURCE_RANGES_ANNOTATION: "192.0.2.0/24, 198.51.100.0/25"}}
    info = service_info(service({"type": "LoadBalancer"}, metadata=meta))
    expected = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.51.100.0/25"))
    assert expected == info.ports[0].load_balancer_source_ranges


def test_spec_source_ranges_win_over_annotation() -> None:
    """When both are set, spec.loadBalancerSourceRanges is used and the annotation ignored."""
    meta = {"name": "web", "namespace": "ns1",
            "annotations": {SOURCE_RANGES_ANNOTATION: "192.0.2.0/24"}}
    info = service_info(service({"type": "LoadBalancer",
                                 "loadBalancerSourceRanges": ["10.1.0.0/16"]}, metadata=meta))
    assert (ipaddress.ip_network("10.1.0.0/16"),) == info.ports[0].load_balancer_source_ranges


def test_source_ranges_are_ignored_for_non_load_balancers() -> None:
    """Source ranges of a NodePort service are not read at all."""
    info = service_info(service({"type": "NodePort", "loadBalancerSourceRanges": ["bogus"]}))
    assert () == info.ports[0].load_balancer_source_ranges


@pytest.mark.parametrize(("svc_type", "local"), [
    ("ClusterIP", False), ("NodePort", True), ("LoadBalancer", True)])
def test_external_traffic_policy_local_needs_external_type(svc_type: str, local: bool) -> None:
    """externalTrafficPolicy Local is ignored on a ClusterIP service."""
    info = service_info(service({"type": svc_type, "externalTrafficPolicy": "Local"}))
    assert [local, local] == [p.external_policy_local for p in info.ports]


def test_internal_traffic_policy_local_is_kept() -> None:
    """internalTrafficPolicy Local applies to every service type."""
    info = service_info(service({"internalTrafficPolicy": "Local"}))
    assert [True, True] == [p.internal_policy_local for p in info.ports]


@pytest.mark.parametrize(("svc_type", "policy", "expected"), [
    ("LoadBalancer", "Local", 32100),
    ("LoadBalancer", "Cluster", 0),
    ("NodePort", "Local", 0),
    ("ClusterIP", "Local", 0),
])
def test_health_check_node_port_only_for_local_load_balancers(svc_type: str, policy: str,
                                                              expected: int) -> None:
    """healthCheckNodePort is used only for a LoadBalancer with externalTrafficPolicy Local."""
    info = service_info(service({"type": svc_type, "externalTrafficPolicy": policy,
                                 "healthCheckNodePort": 32100}))
    assert [expected, expected] == [p.health_check_node_port for p in info.ports]


def test_node_ports_are_parsed() -> None:
    """nodePort is carried per port; a missing nodePort is 0."""
    info = service_info(service({"type": "NodePort", "ports": [
        {"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81}]}))
    assert [30080, 0] == [p.node_port for p in info.ports]


# --- Node and parse_all -------------------------------------------------------------------

def test_node_is_parsed() -> None:
    """A Node yields its name, labels (zone) and internal/external addresses."""
    parsed = parse_object(node())
    expected = NodeInfo(name="node1", labels={"topology.kubernetes.io/zone": "z1"},
                        addresses=(ipaddress.ip_address("10.100.0.2"),
                                   ipaddress.ip_address("203.0.113.7")))
    assert Parsed(expected) == parsed
    assert "z1" == expected.zone


def test_node_with_bad_address_is_reported() -> None:
    """A Node with a bad address is rejected naming the address field."""
    parsed = parse_object(node(status={"addresses": [{"type": "InternalIP", "address": "x"}]}))
    assert [("Node", "default/node1", "status.addresses[0].address")] == problem_fields(parsed)


def test_node_draining_reads_deletion_timestamp_and_autoscaler_taint() -> None:
    """A Node is draining while it has a deletionTimestamp or the cluster autoscaler's
    ToBeDeletedByClusterAutoscaler taint (any effect); other taints do not count."""
    def draining(**overrides: Any) -> str | None:
        parsed = parse_object(node(**overrides))
        assert isinstance(parsed.value, NodeInfo)
        return parsed.value.draining

    tainted = {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000",
                           "effect": "NoSchedule"}]}
    deleting = {"name": "node1", "deletionTimestamp": "2026-12-01T12:00:00Z"}
    other = {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}
    assert [None, None, "it has the ToBeDeletedByClusterAutoscaler taint",
            "it is being deleted (metadata.deletionTimestamp is set)"] == [
        draining(), draining(spec=other), draining(spec=tainted), draining(metadata=deleting)]


def test_node_with_a_taint_without_key_is_reported() -> None:
    """A taint without a key rejects the Node naming the field."""
    parsed = parse_object(node(spec={"taints": [{"effect": "NoSchedule"}]}))
    assert [("Node", "default/node1", "spec.taints[0].key")] == problem_fields(parsed)


def test_other_proxy_label_names_the_label() -> None:
    """Objects kube-proxy's label selector leaves out are named with the label and value."""
    labelled = service()
    labelled["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "cilium"}
    headless_slice = endpoint_slice()
    headless_slice["metadata"]["labels"]["service.kubernetes.io/headless"] = ""
    assert [None, "service.kubernetes.io/service-proxy-name=cilium",
            "service.kubernetes.io/headless="] == [
        other_proxy_label(o) for o in (service(), labelled, headless_slice)]


def test_unknown_kinds_are_ignored_silently() -> None:
    """Objects of other kinds (Pods, ConfigMaps, no kind) parse to nothing, without problems."""
    for obj in ({"kind": "Pod", "metadata": {"name": "p"}}, {"metadata": {"name": "x"}},
                {"kind": 5}):
        assert Parsed(None) == parse_object(obj)


@pytest.mark.parametrize("obj", [None, 5, "Service", ["Service"]])
def test_non_mapping_is_a_problem(obj: Any) -> None:
    """Something that is not a mapping is reported, not raised."""
    parsed = parse_object(obj)
    assert [("object", "<unknown>", "")] == problem_fields(parsed)
    assert parsed.value is None


def test_direct_parsers_agree_with_parse_object() -> None:
    """parse_service/parse_endpoint_slice/parse_node are what parse_object dispatches to."""
    assert parse_object(service()) == parse_service(service())
    assert parse_object(endpoint_slice()) == parse_endpoint_slice(endpoint_slice())
    assert parse_object(node()) == parse_node(node())


def test_parse_all_keeps_accepted_objects_and_collects_problems() -> None:
    """parse_all returns accepted objects in order and every problem, rejected or dropped."""
    bad_service = service({"clusterIP": "10.96.0.300"})
    dropping_slice = endpoint_slice()
    dropping_slice["endpoints"][0]["addresses"] = ["10.0.0.999"]
    accepted, problems = parse_all([service(), bad_service, {"kind": "Pod"}, dropping_slice,
                                    node()])
    kinds = [type(p.value) for p in accepted]
    assert [ServiceInfo, EndpointSliceInfo, NodeInfo] == kinds
    expected = [Problem("Service", "ns1/web", "spec.clusterIP",
                        "'10.96.0.300' is not a valid IP address"),
                Problem("EndpointSlice", "ns1/web-abc", "endpoints[0].addresses[0]",
                        "'10.0.0.999' is not a valid IP address", dropped="endpoint 0")]
    assert expected == problems


# --- objects of the official kubernetes client --------------------------------------------

def client_service() -> Any:
    """A NodePort V1Service with affinity, ETP Local and two ports, as the client builds it."""
    return k8s.V1Service(
        api_version="v1", kind="Service",
        metadata=k8s.V1ObjectMeta(name="web", namespace="ns1", labels={"app": "web"}),
        spec=k8s.V1ServiceSpec(
            type="NodePort", cluster_ip="10.96.0.10", cluster_ips=["10.96.0.10"],
            external_ips=["192.0.2.10"], external_traffic_policy="Local",
            internal_traffic_policy="Cluster", session_affinity="ClientIP",
            session_affinity_config=k8s.V1SessionAffinityConfig(
                client_ip=k8s.V1ClientIPConfig(timeout_seconds=600)),
            ports=[k8s.V1ServicePort(name="http", port=80, protocol="TCP", node_port=30080,
                                     target_port=8080),
                   k8s.V1ServicePort(name="dns", port=53, protocol="UDP", node_port=30053)],
        ),
    )


def dict_service() -> Manifest:
    """The manifest equivalent of :func:`client_service`."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "ns1", "labels": {"app": "web"}},
        "spec": {
            "type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "externalIPs": ["192.0.2.10"], "externalTrafficPolicy": "Local",
            "internalTrafficPolicy": "Cluster", "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080,
                       "targetPort": 8080},
                      {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
        },
    }


def client_slice() -> Any:
    """A V1EndpointSlice with conditions, topology and hints, as the client builds it."""
    return k8s.V1EndpointSlice(
        api_version="discovery.k8s.io/v1", kind="EndpointSlice", address_type="IPv4",
        metadata=k8s.V1ObjectMeta(name="web-abc", namespace="ns1",
                                  labels={SERVICE_NAME_LABEL: "web"}),
        endpoints=[
            k8s.V1Endpoint(addresses=["10.0.1.1"], node_name="node1", zone="z1",
                           conditions=k8s.V1EndpointConditions(ready=True, serving=True,
                                                               terminating=False),
                           hints=k8s.V1EndpointHints(for_zones=[k8s.V1ForZone(name="z1")])),
            k8s.V1Endpoint(addresses=["10.0.1.2"], node_name="node2",
                           conditions=k8s.V1EndpointConditions(ready=False, serving=True,
                                                               terminating=True)),
            k8s.V1Endpoint(addresses=["10.0.1.3"]),
        ],
        ports=[k8s.DiscoveryV1EndpointPort(name="http", port=8080, protocol="TCP"),
               k8s.DiscoveryV1EndpointPort(name="dns", port=5353, protocol="UDP")],
    )


def dict_slice() -> Manifest:
    """The manifest equivalent of :func:`client_slice`."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "web-abc", "namespace": "ns1",
                     "labels": {SERVICE_NAME_LABEL: "web"}},
        "endpoints": [
            {"addresses": ["10.0.1.1"], "nodeName": "node1", "zone": "z1",
             "conditions": {"ready": True, "serving": True, "terminating": False},
             "hints": {"forZones": [{"name": "z1"}]}},
            {"addresses": ["10.0.1.2"], "nodeName": "node2",
             "conditions": {"ready": False, "serving": True, "terminating": True}},
            {"addresses": ["10.0.1.3"]},
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                  {"name": "dns", "port": 5353, "protocol": "UDP"}],
    }


@pytest.mark.parametrize(("client", "manifest"), [
    pytest.param(client_service, dict_service, id="service"),
    pytest.param(client_slice, dict_slice, id="endpoint-slice"),
])
def test_client_objects_parse_like_manifests(client: Callable[[], Any],
                                             manifest: Callable[[], Manifest]) -> None:
    """A kubernetes client model parses exactly like the equivalent manifest dict."""
    expected = parse_object(manifest())
    assert () == expected.problems
    assert expected.value is not None
    assert expected == parse_object(client())


def test_client_objects_convert_to_camel_case_manifests() -> None:
    """to_manifest turns client models into the camelCase manifest, dropping unset fields."""
    assert dict_service() == to_manifest(client_service())
    assert dict_slice() == to_manifest(client_slice())


def test_client_service_fields_are_used() -> None:
    """Affinity, ETP Local, external IPs and node ports survive the client conversion."""
    info = parse_object(client_service()).value
    assert isinstance(info, ServiceInfo)
    first = info.ports[0]
    assert (600, True, 30080) == (first.affinity_timeout, first.external_policy_local,
                                  first.node_port)
    assert (ipaddress.ip_address("192.0.2.10"),) == first.external_ips


def test_invalid_client_object_is_reported_by_path() -> None:
    """A client model with a bad field is reported with the manifest (camelCase) path."""
    svc = client_service()
    svc.spec.cluster_ip = "10.96.0.300"
    parsed = parse_object(svc)
    assert [("Service", "ns1/web", "spec.clusterIP")] == problem_fields(parsed)


def test_client_timestamps_become_strings() -> None:
    """Datetimes in client models (creationTimestamp) become ISO strings, not errors."""
    svc = client_service()
    svc.metadata.creation_timestamp = dt.datetime(2024, 5, 1, 10, 20, 30, tzinfo=dt.UTC)
    manifest = to_manifest(svc)
    assert "2024-05-01T10:20:30+00:00" == manifest["metadata"]["creationTimestamp"]
    assert parse_object(dict_service()) == parse_object(svc)


def test_leading_zero_addresses_are_read_as_decimal() -> None:
    """Addresses stored before the API server's stricter validation (10.96.0.010) are read as
    kube-proxy's ParseIPSloppy reads them: each part decimal, so 010 is 10."""
    parsed = parse_object(service({
        "type": "LoadBalancer", "clusterIP": "10.96.0.010", "clusterIPs": ["10.96.0.010"],
        "externalIPs": ["192.0.2.001"], "loadBalancerSourceRanges": ["203.0.113.000/24"]},
        status={"loadBalancer": {"ingress": [{"ip": "198.051.100.1"}]}}))
    assert () == parsed.problems
    assert isinstance(parsed.value, ServiceInfo)
    port = parsed.value.ports[0]
    assert ("10.96.0.10", ["192.0.2.1"], ["198.51.100.1"], ["203.0.113.0/24"]) == (
        str(port.cluster_ip), [str(ip) for ip in port.external_ips],
        [str(ip) for ip in port.load_balancer_ips],
        [str(net) for net in port.load_balancer_source_ranges])
    endpoints = slice_info(endpoint_slice(endpoints=[{"addresses": ["10.0.1.010"]}])).endpoints
    assert ["10.0.1.10:0"] == [ep.key for ep in endpoints]


@pytest.mark.parametrize("text", ["10.0.0.1", "fd00:10:1::5"])
@pytest.mark.parametrize("port", [0, 8080])
def test_the_fast_endpoint_constructor_builds_what_endpoint_builds(text: str, port: int) -> None:
    """endpoint_of skips the dataclass's __init__: every field, the derived ones (address,
    key) included, equality and hashing must come out as from Endpoint(...)."""
    ip = ipaddress.ip_address(text)
    hints = frozenset({"zone-a", "zone-b"})
    built = Endpoint(ip, port, "node-1", "zone-a", hints, False, True, True, frozenset({"n"}))
    fast = endpoint_of(ip, port, node_name="node-1", zone="zone-a", ready=False, serving=True,
                       terminating=True, address=text, zone_hints=hints,
                       node_hints=frozenset({"n"}))
    assert [getattr(fast, name) for name in Endpoint.__slots__ if name != "__weakref__"] == [
        getattr(built, name) for name in Endpoint.__slots__ if name != "__weakref__"]
    assert (fast, hash(fast)) == (built, hash(built))
    assert fast.key == (f"[{text}]:{port}" if ip.version == 6 else f"{text}:{port}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.port = 1  # type: ignore[misc]
