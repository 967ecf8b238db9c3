"""deploy/ as `kubectl apply -k deploy/` sends it: least-privilege RBAC, a DaemonSet that runs
the agent on every node with two capabilities instead of privileged, a read-only root and a
memory limit, and a config it reads."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from iptsync.cli import run
from iptsync.options import ProxyConfig, read_config

from .conftest import DEPLOY, ROOT, Objects


@pytest.fixture
def config_text(rendered: Objects) -> str:
    text: str = rendered[("ConfigMap", "iptsync-config")]["data"]["config.yaml"]
    return text


@pytest.fixture
def config(config_text: str, tmp_path: Path) -> ProxyConfig:
    """The ConfigMap's config.yaml as the agent reads it."""
    path = tmp_path / "config.yaml"
    path.write_text(config_text)
    return read_config(path)


def test_base_holds_exactly_the_agent_objects(rendered: Objects) -> None:
    """Namespace, ServiceAccount, ClusterRole and binding, ConfigMap, DaemonSet; nothing else."""
    assert {
        ("Namespace", "iptsync"), ("ServiceAccount", "iptsync"), ("ClusterRole", "iptsync"),
        ("ClusterRoleBinding", "iptsync"), ("ConfigMap", "iptsync-config"),
        ("DaemonSet", "iptsync"),
    } == set(rendered)
    namespaced = [obj for (kind, _), obj in rendered.items()
                  if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding")]
    assert {"iptsync"} == {obj["metadata"]["namespace"] for obj in namespaced}


def test_cluster_role_only_lists_and_watches_services_endpointslices_nodes(
        rendered: Objects) -> None:
    """Exactly list and watch on services and nodes (core) and endpointslices (discovery)."""
    granted = set()
    for rule in rendered[("ClusterRole", "iptsync")]["rules"]:
        assert {"apiGroups", "resources", "verbs"} == set(rule), "no names, no URLs"
        granted |= {(group, resource, verb) for group in rule["apiGroups"]
                    for resource in rule["resources"] for verb in rule["verbs"]}
    assert {
        (group, resource, verb)
        for group, resource in [("", "services"), ("", "nodes"),
                                ("discovery.k8s.io", "endpointslices")]
        for verb in ("list", "watch")
    } == granted


def test_binding_gives_the_role_to_the_daemonsets_service_account(
        rendered: Objects, pod: dict[str, Any], daemonset: dict[str, Any]) -> None:
    """The ClusterRoleBinding names the ServiceAccount the DaemonSet's pods run as."""
    binding = rendered[("ClusterRoleBinding", "iptsync")]
    account = rendered[("ServiceAccount", "iptsync")]["metadata"]
    assert {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
            "name": "iptsync"} == binding["roleRef"]
    assert [{"kind": "ServiceAccount", "name": account["name"],
             "namespace": account["namespace"]}] == binding["subjects"]
    assert account["name"] == pod["serviceAccountName"]
    assert account["namespace"] == daemonset["metadata"]["namespace"]


def test_pods_use_the_nodes_network_namespace(pod: dict[str, Any]) -> None:
    """hostNetwork, with cluster DNS still usable from it."""
    assert pod["hostNetwork"] is True
    assert "ClusterFirstWithHostNet" == pod["dnsPolicy"]


def test_container_drops_every_capability_but_net_admin_and_net_raw(
        container: dict[str, Any]) -> None:
    """drop ALL, then add back exactly NET_ADMIN and NET_RAW; not privileged."""
    security = container["securityContext"]
    assert security["privileged"] is False
    assert {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]} == security["capabilities"]


def test_container_cannot_gain_privileges_or_write_its_image(container: dict[str, Any]) -> None:
    """No privilege escalation, the runtime's default seccomp profile, a read-only root, root."""
    security = container["securityContext"]
    assert {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "seccompProfile": {"type": "RuntimeDefault"},
        "runAsUser": 0,
    } == {key: security[key] for key in ("allowPrivilegeEscalation", "readOnlyRootFilesystem",
                                         "seccompProfile", "runAsUser")}


def test_pods_run_on_every_node_before_anything_else(pod: dict[str, Any]) -> None:
    """Tolerate every taint; system-node-critical priority."""
    assert [{"operator": "Exists"}] == pod["tolerations"]
    assert "system-node-critical" == pod["priorityClassName"]


def test_node_label_keeps_a_node_on_kube_proxy(pod: dict[str, Any]) -> None:
    """Only iptsync/proxy=kube-proxy excludes a node (docs/migration.md); unlabelled run it."""
    terms = pod["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert [{"matchExpressions": [{"key": "iptsync/proxy", "operator": "NotIn",
                                   "values": ["kube-proxy"]}]}] == terms
    assert {"kubernetes.io/os": "linux"} == pod["nodeSelector"]


def test_rolling_update_replaces_one_node_at_a_time(daemonset: dict[str, Any]) -> None:
    """RollingUpdate with maxUnavailable 1."""
    assert {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}} == \
        daemonset["spec"]["updateStrategy"]


def test_probes_ask_the_agents_health_endpoints(container: dict[str, Any]) -> None:
    """Liveness on /livez, readiness on /healthz, both on kube-proxy's port 10256."""
    assert {"path": "/livez", "port": 10256} == container["livenessProbe"]["httpGet"]
    assert {"path": "/healthz", "port": 10256} == container["readinessProbe"]["httpGet"]


def test_command_runs_the_agent_as_this_node(container: dict[str, Any]) -> None:
    """iptsync run with the mounted config, named after the node the pod is scheduled on."""
    assert ["iptsync", "run", "--config", "/etc/iptsync/config.yaml",
            "--hostname-override", "$(NODE_NAME)"] == container["command"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in \
        container["env"]


def test_command_flags_exist_in_the_cli(container: dict[str, Any]) -> None:
    """Every flag the DaemonSet passes is an option of `iptsync run`."""
    known = {opt for param in run.params for opt in param.opts}
    flags = [arg for arg in container["command"] if arg.startswith("--")]
    assert [] == [flag for flag in flags if flag not in known]


def test_api_server_address_can_be_given_without_a_service(container: dict[str, Any]) -> None:
    """An optional ConfigMap may set KUBERNETES_SERVICE_HOST/PORT (no Service works yet)."""
    assert [{"configMapRef": {"name": "iptsync-apiserver", "optional": True}}] == \
        container["envFrom"]


def test_node_paths_are_mounted(container: dict[str, Any], pod: dict[str, Any]) -> None:
    """The host's xtables lock (created if missing) is the only host path."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    lock = mounts["/run/xtables.lock"]
    assert {"path": "/run/xtables.lock", "type": "FileOrCreate"} == \
        volumes[lock["name"]]["hostPath"]
    assert not lock.get("readOnly", False)
    assert [lock["name"]] == [name for name, volume in volumes.items() if "hostPath" in volume]


def test_only_the_lock_and_tmp_are_writable(container: dict[str, Any],
                                            pod: dict[str, Any]) -> None:
    """Besides the read-only root: the lock file and a size-limited emptyDir at /tmp, which
    also holds the renderings kept for the next start."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    writable = {mount["mountPath"] for mount in container["volumeMounts"]
                if not mount.get("readOnly", False)}
    assert {"/run/xtables.lock", "/tmp"} == writable
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert {"sizeLimit": "320Mi"} == volumes[tmp["name"]]["emptyDir"]
    environment = {item["name"]: item.get("value") for item in container["env"]}
    assert environment["IPTSYNC_RENDER_CACHE_DIR"].startswith("/tmp/")


def test_config_file_comes_from_the_configmap(container: dict[str, Any], pod: dict[str, Any],
                                              rendered: Objects) -> None:
    """--config names a key of the ConfigMap mounted at /etc/iptsync."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/iptsync")
    configmap = volumes[mount["name"]]["configMap"]["name"]
    config_path = Path(container["command"][container["command"].index("--config") + 1])
    assert Path("/etc/iptsync") == config_path.parent
    assert config_path.name in rendered[("ConfigMap", configmap)]["data"]


def test_memory_is_limited_with_headroom_over_the_measured_peak(
        container: dict[str, Any]) -> None:
    """A memory limit (1Gi) above the measured 10,000-service peak; requests; no CPU limit."""
    assert {"requests": {"cpu": "100m", "memory": "320Mi"}, "limits": {"memory": "1Gi"}} == \
        container["resources"]


def test_image_is_pinned_and_named_once(container: dict[str, Any]) -> None:
    """A versioned image, on the one `image:` line deploy/vagrant/deploy.sh reads."""
    assert "ghcr.io/iptsync/iptsync:0.1.0" == container["image"]
    lines = re.findall(r"^ *image: *(.+)$", (DEPLOY / "daemonset.yaml").read_text(), re.M)
    assert [container["image"]] == lines


def test_configmap_is_a_kube_proxy_configuration_iptsync_reads(config_text: str,
                                                               config: ProxyConfig) -> None:
    """read_config takes the ConfigMap's config.yaml and finds kube-proxy's defaults in it."""
    assert "mode: iptables" in config_text
    assert ("", "10.244.0.0/16", False, 14, (), True, 1.0, 30.0) == (
        config.hostname_override,  # --hostname-override $(NODE_NAME) gives it
        config.cluster_cidr, config.masquerade_all, config.masquerade_bit,
        config.nodeport_addresses, config.localhost_nodeports, config.min_sync_period,
        config.sync_period)
    assert ("0.0.0.0:10256", "127.0.0.1:10249") == (config.healthz_address(),
                                                    config.metrics_address())
    assert [] == [v for v in config.verdicts if v.handling != "same"]


def test_config_cluster_cidr_is_the_vagrant_labs_pod_cidr(config: ProxyConfig) -> None:
    """The lab applies deploy/ unchanged, so its pod CIDR is the config's clusterCIDR."""
    vagrantfile = (ROOT / "Vagrantfile").read_text()
    assert [config.cluster_cidr] == re.findall(r'^POD_CIDR = "(.+)"$', vagrantfile, re.M)


def test_probes_ask_the_configured_health_port(container: dict[str, Any],
                                               config: ProxyConfig) -> None:
    """The probes ask the port healthzBindAddress binds."""
    port = int(config.healthz_address().rsplit(":", 1)[1])
    assert port == container["livenessProbe"]["httpGet"]["port"]
    assert port == container["readinessProbe"]["httpGet"]["port"]
