"""Property tests for iptsync.core.model and the renderer fed by it (hypothesis).

Strategies build random *valid* Service and EndpointSlice manifests, and *invalid* ones made by
corrupting exactly one field of a valid manifest. The properties: parsing never raises, valid
objects parse cleanly, every corruption is reported at its exact path, rendering any mix never
raises and keeps the valid services, and the statistic rules of every service chain give each
endpoint the same share of new connections.
"""

from __future__ import annotations

import copy
import ipaddress
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iptsync.core.model import (
    SERVICE_NAME_LABEL,
    EndpointSliceInfo,
    Parsed,
    Problem,
    ServiceInfo,
    parse_object,
)
from iptsync.core.policy import Settings
from iptsync.core.ruleset import canonical, split_args
from iptsync.engine.desired import Desired, desired_from_objects

Manifest = dict[str, Any]
Draw = Callable[[st.SearchStrategy[Any]], Any]

SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),))
PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
KINDS = ("Service", "EndpointSlice", "Node")
PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")

# --- building blocks --------------------------------------------------------------------

NAMES = st.text(string.ascii_lowercase + string.digits + "-", max_size=10).map(lambda s: f"n{s}0")
PORT_NAMES = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=6)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
CIDR4 = st.builds(lambda ip, prefix: str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False)),
                  IPV4, st.integers(0, 32))
PORTS = st.integers(1, 65535)
NODE_PORTS = st.integers(30000, 32767)
NODES = st.sampled_from(["node1", "node2", "node3"])
ZONES = st.sampled_from(["z1", "z2", "z3"])

# Values that are certainly not IPv4 addresses or CIDRs, whatever the parser tolerates.
BAD_IPS = st.one_of(
    st.sampled_from(["10.96.0.300", "nope", "1.2.3", "1.2.3.4.5", "10.0.0.-1", "0x0a.0.0.1",
                     "10.0.0.1/32", "256.256.256.256", "::g", "10.0.0.1:80"]),
    st.builds("{}.{}.{}.{}".format, st.integers(256, 999), st.integers(0, 255),
              st.integers(0, 255), st.integers(0, 255)),
)
BAD_CIDRS = st.one_of(
    st.sampled_from(["10.0.0.0/33", "300.0.0.0/8", "abc", "10.0.0.0/-1", "10.0.0.0/8/8",
                     "10.0.0.0/x", "/8", "10.0.0.0 /8 8"]),
    st.builds("{}/{}".format, IPV4, st.integers(33, 999)),
)
OUT_OF_RANGE_PORTS = st.integers(max_value=0) | st.integers(min_value=65536)
BAD_NODE_PORTS = st.integers(max_value=-1) | st.integers(min_value=65536)
BAD_PROTOCOLS = st.text(min_size=1, max_size=8).filter(lambda t: t not in PROTOCOLS)
BAD_POLICIES = st.text(min_size=1, max_size=8).filter(lambda t: t not in ("Cluster", "Local"))
BAD_TIMEOUTS = st.integers(max_value=0) | st.integers(min_value=86401)

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
KEYS = st.sampled_from([
    "kind", "metadata", "name", "namespace", "labels", "annotations", "spec", "status",
    "type", "clusterIP", "ports", "port", "nodePort", "protocol", "externalIPs",
    "loadBalancerSourceRanges", "sessionAffinity", "sessionAffinityConfig", "clientIP",
    "timeoutSeconds", "externalTrafficPolicy", "internalTrafficPolicy", "healthCheckNodePort",
    "loadBalancer", "ingress", "ip", "ipMode", "addressType", "endpoints", "addresses",
    "conditions", "ready", "serving", "terminating", "hints", "forZones", "nodeName", "zone",
    SERVICE_NAME_LABEL, "address",
]) | st.text(max_size=8)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children,
                                                                      max_size=5),
    max_leaves=20,
)
NON_LISTS = JSON.filter(lambda v: v is not None and not isinstance(v, list))
NON_MAPPINGS = JSON.filter(lambda v: v is not None and not isinstance(v, dict))


# --- valid objects ----------------------------------------------------------------------

def draw_port(draw: Draw, port_name: str) -> Manifest:
    """A service or slice port: a number, the name when non-empty, maybe a protocol."""
    port: Manifest = {"port": draw(PORTS)}
    if port_name:
        port["name"] = port_name
    protocol = draw(st.sampled_from((*PROTOCOLS, None)))
    if protocol is not None:
        port["protocol"] = protocol
    return port


@st.composite
def services(draw: Draw, svc_type: str | None = None) -> Manifest:
    """A valid IPv4 Service of ClusterIP, NodePort or LoadBalancer type, with ports."""
    svc_type = svc_type or draw(st.sampled_from(SERVICE_TYPES[:3]))
    port_names = draw(st.lists(PORT_NAMES, min_size=1, max_size=4, unique=True))
    if len(port_names) == 1 and draw(st.booleans()):
        port_names = [""]
    ports = []
    for port_name in port_names:
        port = draw_port(draw, port_name)
        if svc_type != "ClusterIP" and draw(st.booleans()):
            port["nodePort"] = draw(NODE_PORTS)
        if draw(st.booleans()):
            port["targetPort"] = draw(PORTS | PORT_NAMES)
        ports.append(port)
    spec: Manifest = {"type": svc_type, "clusterIP": draw(IPV4), "ports": ports}
    if draw(st.booleans()):
        spec["externalIPs"] = draw(st.lists(IPV4, max_size=3))
    for policy in ("externalTrafficPolicy", "internalTrafficPolicy"):
        value = draw(st.sampled_from([None, "Cluster", "Local"]))
        if value is not None:
            spec[policy] = value
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
        if draw(st.booleans()):
            spec["sessionAffinityConfig"] = {
                "clientIP": {"timeoutSeconds": draw(st.integers(1, 86400))}}
    manifest: Manifest = {"apiVersion": "v1", "kind": "Service",
                          "metadata": {"name": draw(NAMES)}, "spec": spec}
    if draw(st.booleans()):
        manifest["metadata"]["namespace"] = draw(NAMES)
    if svc_type == "LoadBalancer":
        if draw(st.booleans()):
            spec["loadBalancerSourceRanges"] = draw(st.lists(CIDR4, max_size=3))
        ingress = draw(st.lists(st.one_of(
            st.builds(lambda ip: {"ip": ip}, IPV4),
            st.builds(lambda ip, mode: {"ip": ip, "ipMode": mode}, IPV4,
                      st.sampled_from(["VIP", "Proxy"])),
            st.just({"hostname": "lb.example.com"}),
        ), max_size=3))
        manifest["status"] = {"loadBalancer": {"ingress": ingress}}
        if spec.get("externalTrafficPolicy") == "Local" and draw(st.booleans()):
            spec["healthCheckNodePort"] = draw(NODE_PORTS)
    return manifest


@st.composite
def rule_less_services(draw: Draw) -> Manifest:
    """A valid Service that gets no rules: headless or ExternalName."""
    manifest: Manifest = draw(services(svc_type="ClusterIP"))
    if draw(st.booleans()):
        manifest["spec"]["clusterIP"] = "None"
    else:
        manifest["spec"] = {"type": "ExternalName", "externalName": "db.example.com"}
    return manifest


@st.composite
def endpoints(draw: Draw, family: str = "IPv4") -> Manifest:
    """A valid endpoint with random conditions and topology."""
    endpoint: Manifest = {"addresses": [draw(IPV4 if family == "IPv4" else IPV6)]}
    conditions = {key: draw(st.booleans()) for key in ("ready", "serving", "terminating")
                  if draw(st.booleans())}
    if conditions or draw(st.booleans()):
        endpoint["conditions"] = conditions
    if draw(st.booleans()):
        endpoint["nodeName"] = draw(NODES)
    if draw(st.booleans()):
        endpoint["zone"] = draw(ZONES)
    if draw(st.booleans()):
        zones = draw(st.lists(ZONES, min_size=1, max_size=2, unique=True))
        endpoint["hints"] = {"forZones": [{"name": zone} for zone in zones]}
    return endpoint


@st.composite
def endpoint_slices(draw: Draw, service: str | None = None, namespace: str | None = None,
                    port_names: list[str] | None = None) -> Manifest:
    """A valid IPv4 EndpointSlice with 1-3 ports and 0-8 endpoints."""
    names = port_names if port_names else draw(st.lists(PORT_NAMES, min_size=1, max_size=3,
                                                        unique=True))
    ports = []
    for port_name in names:
        ports.append(draw_port(draw, port_name))
    metadata: Manifest = {"name": draw(NAMES),
                          "labels": {SERVICE_NAME_LABEL: service or draw(NAMES)}}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": metadata,
        "addressType": "IPv4", "ports": ports,
        "endpoints": draw(st.lists(endpoints(), max_size=8)),
    }


def ref(manifest: Manifest) -> str:
    """``namespace/name`` of a valid manifest."""
    meta = manifest["metadata"]
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


# --- invalid objects --------------------------------------------------------------------

@dataclass
class Corrupted:
    """A manifest with one bad field: where it is, and whether only an endpoint is dropped."""

    manifest: Manifest
    ref: str
    field: str
    dropped_endpoint: int | None = None
    valid: Manifest | None = None  # the manifest before corruption


def _port_index(draw: Draw, manifest: Manifest, key: str = "ports") -> int:
    ports = manifest["spec"][key] if "spec" in manifest else manifest[key]
    return int(draw(st.integers(0, len(ports) - 1)))


def _insert(draw: Draw, items: list[Any], bad: Any) -> int:
    index = int(draw(st.integers(0, len(items))))
    items.insert(index, bad)
    return index


@st.composite
def corrupted_services(draw: Draw) -> Corrupted:
    """A valid Service with exactly one field made invalid."""
    valid = draw(services())
    m = copy.deepcopy(valid)
    spec = m["spec"]
    kind = draw(st.sampled_from([
        "cluster-ip", "cluster-ip-junk", "port-range", "port-string", "port-junk", "node-port",
        "protocol", "protocol-junk", "external-ip", "source-range", "affinity-timeout",
        "policy", "type-junk", "ports-not-list", "external-ips-not-list", "spec-not-mapping",
        "annotations-not-mapping", "affinity-config-not-mapping", "missing-name", "spec-none",
        "port-none", "port-entry-junk",
    ]))
    obj = ref(m)
    field: str
    if kind == "cluster-ip":
        spec["clusterIP"], field = draw(BAD_IPS), "spec.clusterIP"
    elif kind == "cluster-ip-junk":
        spec["clusterIP"] = draw(JSON.filter(lambda v: not isinstance(v, str)))
        field = "spec.clusterIP"
    elif kind in ("port-range", "port-string", "port-junk"):
        i = _port_index(draw, m)
        port = spec["ports"][i]
        if kind == "port-range":
            port["port"] = draw(OUT_OF_RANGE_PORTS)
        elif kind == "port-string":
            port["port"] = str(port["port"])
        else:
            port["port"] = draw(JSON.filter(
                lambda v: isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536))
        field = f"spec.ports[{i}].port"
    elif kind == "node-port":
        i = _port_index(draw, m)
        spec["ports"][i]["nodePort"] = draw(BAD_NODE_PORTS)
        field = f"spec.ports[{i}].nodePort"
    elif kind in ("protocol", "protocol-junk"):
        i = _port_index(draw, m)
        spec["ports"][i]["protocol"] = draw(BAD_PROTOCOLS if kind == "protocol" else JSON.filter(
            lambda v: v is not None and v not in PROTOCOLS))
        field = f"spec.ports[{i}].protocol"
    elif kind == "external-ip":
        index = _insert(draw, spec.setdefault("externalIPs", []), draw(BAD_IPS))
        field = f"spec.externalIPs[{index}]"
    elif kind == "source-range":
        spec["type"] = "LoadBalancer"
        index = _insert(draw, spec.setdefault("loadBalancerSourceRanges", []), draw(BAD_CIDRS))
        field = f"spec.loadBalancerSourceRanges[{index}]"
    elif kind == "affinity-timeout":
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": draw(BAD_TIMEOUTS)}}
        field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    elif kind == "policy":
        key = draw(st.sampled_from(["externalTrafficPolicy", "internalTrafficPolicy"]))
        spec[key], field = draw(BAD_POLICIES), f"spec.{key}"
    elif kind == "type-junk":
        spec["type"] = draw(JSON.filter(lambda v: v not in (None, "", *SERVICE_TYPES)))
        field = "spec.type"
    elif kind == "ports-not-list":
        spec["ports"], field = draw(NON_LISTS), "spec.ports"
    elif kind == "external-ips-not-list":
        spec["externalIPs"], field = draw(NON_LISTS), "spec.externalIPs"
    elif kind == "spec-not-mapping":
        m["spec"], field = draw(NON_MAPPINGS), "spec"
    elif kind == "annotations-not-mapping":
        m["metadata"]["annotations"], field = draw(NON_MAPPINGS), "metadata.annotations"
    elif kind == "affinity-config-not-mapping":
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = draw(NON_MAPPINGS)
        field = "spec.sessionAffinityConfig"
    elif kind == "missing-name":
        del m["metadata"]["name"]
        obj = obj.rsplit("/", 1)[0] + "/<unnamed>"
        field = "metadata.name"
    elif kind == "spec-none":
        m["spec"], field = None, "spec"
    else:  # port-none, port-entry-junk
        i = _port_index(draw, m)
        spec["ports"][i] = None if kind == "port-none" else draw(NON_MAPPINGS)
        field = f"spec.ports[{i}]"
    return Corrupted(m, obj, field, valid=valid)


@st.composite
def corrupted_slices(draw: Draw) -> Corrupted:
    """A valid EndpointSlice with exactly one field made invalid (or one endpoint)."""
    valid = draw(endpoint_slices())
    m = copy.deepcopy(valid)
    kind = draw(st.sampled_from([
        "no-label", "address-type", "port-range", "port-string", "protocol", "port-none",
        "endpoints-not-list", "labels-not-mapping", "missing-name", "endpoint-address",
        "endpoint-ipv6", "endpoint-none", "endpoint-ready", "endpoint-addresses-not-list",
    ]))
    obj = ref(m)
    if kind.startswith("endpoint-"):
        if not m["endpoints"]:
            m["endpoints"].append(draw(endpoints()))
            valid = copy.deepcopy(m)
        i = int(draw(st.integers(0, len(m["endpoints"]) - 1)))
        endpoint = m["endpoints"][i]
        field = f"endpoints[{i}].addresses[0]"
        if kind == "endpoint-address":
            endpoint["addresses"][0] = draw(BAD_IPS | JSON.filter(
                lambda v: not isinstance(v, str)))
        elif kind == "endpoint-ipv6":
            endpoint["addresses"][0] = draw(IPV6)
        elif kind == "endpoint-none":
            m["endpoints"][i], field = None, f"endpoints[{i}]"
        elif kind == "endpoint-ready":
            endpoint.setdefault("conditions", {})["ready"] = draw(JSON.filter(
                lambda v: v is not None and not isinstance(v, bool)))
            field = f"endpoints[{i}].conditions.ready"
        else:
            endpoint["addresses"] = draw(NON_LISTS)
            field = f"endpoints[{i}].addresses"
        return Corrupted(m, obj, field, dropped_endpoint=i, valid=valid)
    if kind == "no-label":
        del m["metadata"]["labels"][SERVICE_NAME_LABEL]
        field = f"metadata.labels[{SERVICE_NAME_LABEL}]"
    elif kind == "address-type":
        m["addressType"] = draw(JSON.filter(lambda v: v not in ("IPv4", "IPv6", "FQDN")))
        field = "addressType"
    elif kind in ("port-range", "port-string", "protocol", "port-none"):
        i = _port_index(draw, m)
        port = m["ports"][i]
        field = f"ports[{i}].port"
        if kind == "port-range":
            port["port"] = draw(OUT_OF_RANGE_PORTS)
        elif kind == "port-string":
            port["port"] = str(port["port"])
        elif kind == "protocol":
            port["protocol"], field = draw(BAD_PROTOCOLS), f"ports[{i}].protocol"
        else:
            m["ports"][i], field = None, f"ports[{i}]"
    elif kind == "endpoints-not-list":
        m["endpoints"], field = draw(NON_LISTS), "endpoints"
    elif kind == "labels-not-mapping":
        m["metadata"]["labels"], field = draw(NON_MAPPINGS), "metadata.labels"
    else:  # missing-name
        del m["metadata"]["name"]
        obj = obj.rsplit("/", 1)[0] + "/<unnamed>"
        field = "metadata.name"
    return Corrupted(m, obj, field, valid=valid)


CORRUPTED = st.one_of(corrupted_services(), corrupted_slices())


# --- properties: parsing ----------------------------------------------------------------

def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value nested in dicts and lists (the root excluded)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(
        value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from paths(child, (*prefix, key))


def replaced(manifest: Manifest, path: tuple[Any, ...], value: Any) -> Manifest:
    """A deep copy of ``manifest`` with the value at ``path`` replaced."""
    out = copy.deepcopy(manifest)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


def check_parsed(parsed: Parsed) -> None:
    """The invariants of any parse result."""
    assert isinstance(parsed, Parsed)
    assert isinstance(parsed.problems, tuple)
    for problem in parsed.problems:
        assert isinstance(problem, Problem)
        assert isinstance(problem.ref, str)
        assert isinstance(problem.field, str)
        str(problem)


@PROPERTY
@given(JSON)
def test_parse_object_never_raises_on_json(value: Any) -> None:
    """Any JSON-like value parses to a Parsed (possibly with problems), never an exception."""
    check_parsed(parse_object(value))


@PROPERTY
@given(st.sampled_from(KINDS), st.dictionaries(KEYS, JSON, max_size=6))
def test_parse_object_never_raises_for_known_kinds(kind: str, body: Manifest) -> None:
    """Random bodies of a known kind never raise, and a rejected one always says why."""
    parsed = parse_object({**body, "kind": kind})
    check_parsed(parsed)
    if parsed.value is None:
        assert [] != list(parsed.problems)


@PROPERTY
@given(st.one_of(services(), rule_less_services(), endpoint_slices()), st.data())
def test_parse_object_never_raises_with_junk_inside_valid_skeleton(manifest: Manifest,
                                                                   data: st.DataObject) -> None:
    """Junk anywhere inside a valid manifest never raises; a rejection always says why."""
    path = data.draw(st.sampled_from([p for p in paths(manifest) if p != ("kind",)]))
    junk = data.draw(JSON)
    parsed = parse_object(replaced(manifest, path, junk))
    check_parsed(parsed)
    if parsed.value is None:
        assert [] != list(parsed.problems)


@PROPERTY
@given(st.one_of(services(), rule_less_services()))
def test_valid_services_parse_without_problems(manifest: Manifest) -> None:
    """Every valid Service parses with no problems, one port per spec port (if any rules)."""
    parsed = parse_object(manifest)
    assert () == parsed.problems
    assert isinstance(parsed.value, ServiceInfo)
    assert ref(manifest) == "/".join(parsed.value.key)
    expected_ports = 0 if parsed.value.skipped_reason else len(manifest["spec"]["ports"])
    assert expected_ports == len(parsed.value.ports)


@PROPERTY
@given(endpoint_slices())
def test_valid_slices_parse_without_problems(manifest: Manifest) -> None:
    """Every valid EndpointSlice parses with no problems and keeps every endpoint and port."""
    parsed = parse_object(manifest)
    assert () == parsed.problems
    assert isinstance(parsed.value, EndpointSliceInfo)
    expected = [e["addresses"][0] for e in manifest["endpoints"]]
    assert expected == [str(ep.ip) for ep in parsed.value.endpoints]
    assert len(manifest["ports"]) == len(parsed.value.ports)


@PROPERTY
@given(CORRUPTED)
def test_corruption_is_reported_at_its_path(bad: Corrupted) -> None:
    """One corrupted field yields a Problem naming the object and exactly that field."""
    parsed = parse_object(bad.manifest)
    check_parsed(parsed)
    expected = (bad.ref, bad.field, "object" if bad.dropped_endpoint is None
                else f"endpoint {bad.dropped_endpoint}")
    assert [expected] == [(p.ref, p.field, p.dropped) for p in parsed.problems]
    if bad.dropped_endpoint is None:
        assert parsed.value is None
        return
    assert isinstance(parsed.value, EndpointSliceInfo)
    assert bad.valid is not None
    whole = parse_object(bad.valid).value
    assert isinstance(whole, EndpointSliceInfo)
    kept = tuple(ep for i, ep in enumerate(whole.endpoints) if i != bad.dropped_endpoint)
    assert kept == parsed.value.endpoints


# --- properties: rendering --------------------------------------------------------------

@dataclass
class Mix:
    """Objects to render: the valid services among them and everything in input order."""

    valid_services: list[Manifest]
    objects: list[Any]


@st.composite
def clusters(draw: Draw, *, invalid: bool = True) -> Mix:
    """Valid services with slices, plus (if ``invalid``) rejected objects and junk, shuffled."""
    valid = draw(st.lists(services(), max_size=3))
    objects: list[Any] = []
    for i, svc in enumerate(valid):
        svc["metadata"]["name"] = f"svc{i}"
        names = [p.get("name", "") for p in svc["spec"]["ports"]]
        for j in range(draw(st.integers(0, 2))):
            subset = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
            eps = draw(endpoint_slices(service=f"svc{i}", namespace=svc["metadata"].get(
                "namespace"), port_names=subset))
            eps["metadata"]["name"] = f"svc{i}-{j}"
            objects.append(eps)
    objects.extend(valid)
    if invalid:
        objects.extend(draw(st.lists(rule_less_services(), max_size=1)))
        for i, bad in enumerate(draw(st.lists(CORRUPTED, max_size=2))):
            meta = bad.manifest.get("metadata")
            if isinstance(meta, dict) and "name" in meta:
                meta["name"] = f"bad{i}"
            objects.append(bad.manifest)
        objects.extend(draw(st.lists(JSON, max_size=1)))
    return Mix(valid, draw(st.permutations(objects)))


def render_mix(mix: Mix) -> Desired:
    """The desired ruleset for the mix with the suite's settings."""
    return desired_from_objects(mix.objects, SETTINGS)


def chain_args(desired: Desired, table: str) -> dict[str, list[tuple[str, ...]]]:
    """Each chain of ``table`` with its rules' arguments (restore spelling)."""
    return {chain: [tuple(split_args(line)[2:]) for line in content.lines]
            for chain, content in desired.tables.tables.get(table, {}).items()}


def rule_target(args: tuple[str, ...]) -> str:
    """The ``-j`` target of a rule, or '' when it has none."""
    return args[args.index("-j") + 1] if "-j" in args else ""


def option(args: tuple[str, ...], name: str) -> str | None:
    """The value following ``name`` in a rule, or None."""
    return args[args.index(name) + 1] if name in args else None


@PROPERTY
@given(clusters())
def test_render_of_any_mix_keeps_valid_services(mix: Mix) -> None:
    """Rendering never raises and every valid service port gets its cluster-IP rule."""
    desired = render_mix(mix)
    text = desired.payload()
    dispatch: dict[tuple[str, str | None], set[str]] = {}
    for table in ("nat", "filter"):
        for args in chain_args(desired, table).get("KUBE-SERVICES", []):
            destination = option(args, "-d")
            if destination is not None:
                dispatch.setdefault((destination, option(args, "--dport")), set()).add(
                    rule_target(args))
    for svc in mix.valid_services:
        cluster_ip = svc["spec"]["clusterIP"]
        assert f"-d {cluster_ip} " in text
        for port in svc["spec"]["ports"]:
            targets = dispatch.get((cluster_ip, str(port["port"])), set())
            assert any(t.startswith(("KUBE-SVC-", "KUBE-SVL-")) or t in ("REJECT", "DROP")
                       for t in targets), (cluster_ip, port, targets)
    for table in desired.tables.tables:
        for rules in chain_args(desired, table).values():
            for args in rules:
                canonical(args)


def endpoint_shares(probabilities: list[float]) -> list[float]:
    """Each rule takes p_i of what reaches it; the last rule takes all that is left."""
    shares, remaining = [], 1.0
    for p in probabilities:
        shares.append(remaining * p)
        remaining *= 1.0 - p
    return [*shares, remaining]


def check_equal_shares(desired: Desired) -> int:
    """Assert the statistic rules of every SVC/SVL chain split traffic evenly; count chains."""
    checked = 0
    for chain, rules in chain_args(desired, "nat").items():
        if not chain.startswith(("KUBE-SVC-", "KUBE-SVL-")):
            continue
        picks = [args for args in rules
                 if rule_target(args).startswith("KUBE-SEP-") and "recent" not in args]
        if not picks:
            continue
        n = len(picks)
        assert n == len({rule_target(args) for args in picks})
        assert option(picks[-1], "--probability") is None
        probabilities = [float(option(args, "--probability") or "nan") for args in picks[:-1]]
        for share in endpoint_shares(probabilities):
            assert abs(1.0 / n - share) < 1e-9, (chain, probabilities)
        checked += 1
    return checked


@PROPERTY
@given(clusters(invalid=False))
def test_statistic_rules_give_every_endpoint_an_equal_share(mix: Mix) -> None:
    """In every SVC/SVL chain the probabilities combine to 1/n per endpoint."""
    check_equal_shares(render_mix(mix))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.booleans())
def test_equal_shares_hold_for_many_endpoints(count: int, affinity: bool) -> None:
    """Up to 300 ready endpoints still get 1/n each within 1e-9 (probability rounding)."""
    spec: Manifest = {"clusterIP": "10.96.0.10", "ports": [{"name": "p", "port": 80}]}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    svc = {"kind": "Service", "metadata": {"name": "big", "namespace": "ns"}, "spec": spec}
    addresses = [str(ipaddress.ip_address("10.1.0.1") + i) for i in range(count)]
    eps = {"kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": "big-1", "namespace": "ns",
                        "labels": {SERVICE_NAME_LABEL: "big"}},
           "ports": [{"name": "p", "port": 8080}],
           "endpoints": [{"addresses": [a]} for a in addresses]}
    assert 1 == check_equal_shares(desired_from_objects([svc, eps], SETTINGS))
