"""``iptsync check-config``: what iptsync would do with an existing kube-proxy's configuration.

Reads what an operator has: kube-proxy's DaemonSet (or static Pod) manifest, whose kube-proxy
container's command and args are taken (also from a ``sh -c "exec kube-proxy ..."`` line, as
GKE writes it), with the ConfigMap its ``--config`` file is mounted from when that is given
alongside; a ConfigMap holding a KubeProxyConfiguration (``data["config.conf"]``, as kubeadm
writes it); a KubeProxyConfiguration file; or a plain argument list. Every flag and field is
then judged through :func:`iptsync.options.resolve`, exactly as ``iptsync run`` would take it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml

from iptsync.kubeproxy import OptionError, split_args
from iptsync.options import ProxyConfig, Verdict, check_document, resolve

_SHELLS = ("sh", "bash", "ash", "dash")
_SHELL_OPERATORS = ("&&", "||", ";", "|", "&")


class InputError(ValueError):
    """Input check-config cannot read (names the file and what is missing)."""


@dataclass(frozen=True)
class Invocation:
    """kube-proxy's arguments and the configuration file it reads (None: none given)."""

    args: list[str]
    document: Mapping[str, Any] | None
    where: str  # names the configuration file in messages


def documents(text: str, source: str) -> list[Mapping[str, Any]]:
    """The objects of a YAML or JSON file (multi-document, ``kind: List``)."""
    try:
        loaded = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        raise InputError(f"{source}: {err}") from None
    objects: list[Mapping[str, Any]] = []
    for doc in loaded:
        if not isinstance(doc, Mapping):
            raise InputError(f"{source}: not a Kubernetes object or KubeProxyConfiguration")
        items = doc.get("items") if doc.get("kind") == "List" else None
        objects.extend(items if isinstance(items, list) else [doc])
    return objects


def invocation(objects: Sequence[Mapping[str, Any]], args: Sequence[str]) -> Invocation:
    """kube-proxy's invocation from the objects given and a plain argument list."""
    workloads = [o for o in objects if o.get("kind") in ("DaemonSet", "Pod")]
    configs = [o for o in objects if o.get("kind") == "KubeProxyConfiguration"]
    maps = [o for o in objects if o.get("kind") == "ConfigMap"]
    argv = list(args)
    mounts: dict[str, tuple[str, Mapping[str, str]]] = {}
    for workload in workloads:
        found, mounts = _container_args(workload)
        argv = found + argv
    flags, _others = split_args(argv)
    path = next((raw for name, raw in flags if name == "config"), None)
    if configs:
        return Invocation(argv, configs[0], f"--config {path or 'KubeProxyConfiguration'}")
    if path and workloads:
        return Invocation(argv, *_mounted(path, mounts, maps))
    if maps:
        name, document = _from_configmap(maps[0])
        return Invocation(argv, document, f"--config {name}")
    return Invocation(argv, None, "--config")


def _container_args(workload: Mapping[str, Any],
                    ) -> tuple[list[str], dict[str, tuple[str, Mapping[str, str]]]]:
    """The kube-proxy container's arguments, and its volume mounts (mount path -> the
    ConfigMap and the item paths it maps)."""
    spec = workload.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {} if workload.get("kind") != "Pod" \
        else spec
    containers = pod.get("containers") or []
    kind_name = f"{workload.get('kind')} {(workload.get('metadata') or {}).get('name')}"
    container = next((c for c in containers if c.get("name") == "kube-proxy"), None) or next(
        (c for c in containers if "kube-proxy" in " ".join(
            [*(c.get("command") or []), *(c.get("args") or [])])), None)
    if container is None:
        raise InputError(f"{kind_name}: no kube-proxy container")
    volumes = {v.get("name"): v.get("configMap") for v in pod.get("volumes") or []
               if v.get("configMap")}
    mounts: dict[str, tuple[str, Mapping[str, str]]] = {
        m["mountPath"]: (volumes[m["name"]]["name"], {
            i["path"]: i["key"] for i in volumes[m["name"]].get("items") or []})
        for m in container.get("volumeMounts") or [] if m.get("name") in volumes}
    return _kube_proxy_args([*(container.get("command") or []),
                             *(container.get("args") or [])]), mounts


def _kube_proxy_args(argv: list[str]) -> list[str]:
    """The arguments after the kube-proxy binary: from a shell line (``sh -c "exec
    kube-proxy ... 1>>/var/log/kube-proxy.log 2>&1"``) up to its redirections."""
    if len(argv) >= 3 and PurePosixPath(argv[0]).name in _SHELLS and argv[1] == "-c":
        words = shlex.split(argv[2])
        start = next((i for i, w in enumerate(words) if PurePosixPath(w).name == "kube-proxy"),
                     None)
        if start is None:
            raise InputError(f"the shell line {argv[2]!r} does not run kube-proxy")
        rest = words[start + 1:]
        end = next((i for i, w in enumerate(rest)
                    if w in _SHELL_OPERATORS or w.lstrip("0123456789")[:1] in ("<", ">")),
                   len(rest))
        return rest[:end]
    if argv and not argv[0].startswith("-"):
        return argv[1:]  # the binary; args alone (the image's entrypoint) are all flags
    return argv


def _mounted(path: str, mounts: Mapping[str, tuple[str, Mapping[str, str]]],
             maps: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], str]:
    """The --config file from the ConfigMap mounted where it lies."""
    for mount, (configmap, items) in mounts.items():
        relative = str(PurePosixPath(path).relative_to(mount)) \
            if PurePosixPath(path).is_relative_to(mount) else None
        if relative is None:
            continue
        key = items.get(relative, relative)
        found = next((m for m in maps if (m.get("metadata") or {}).get("name") == configmap),
                     None)
        if found is None:
            raise InputError(f"--config {path} is key {key!r} of ConfigMap {configmap}: give "
                             "that ConfigMap too (-f configmap.yaml)")
        data = found.get("data") or {}
        if key not in data:
            raise InputError(f"--config {path}: ConfigMap {configmap} has no key {key!r}")
        return _parse_config(data[key], f"ConfigMap {configmap} {key}"), f"--config {path}"
    raise InputError(f"--config {path} is not on a ConfigMap volume of the kube-proxy "
                     "container: give the file itself (-f)")


def _from_configmap(configmap: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The KubeProxyConfiguration of a ConfigMap: ``config.conf`` (kubeadm's key), else the
    one value that is one."""
    name = (configmap.get("metadata") or {}).get("name")
    data = configmap.get("data") or {}
    keys = ["config.conf"] if "config.conf" in data else [
        k for k, v in data.items() if "KubeProxyConfiguration" in str(v)]
    if not keys:
        raise InputError(f"ConfigMap {name}: no KubeProxyConfiguration in its data")
    where = f"ConfigMap {name} {keys[0]}"
    return where, _parse_config(data[keys[0]], where)


def _parse_config(text: str, where: str) -> Mapping[str, Any]:
    try:
        document = yaml.safe_load(text)
        check_document(document, where)
    except (yaml.YAMLError, OptionError) as err:
        raise InputError(f"{where}: {err}") from None
    assert isinstance(document, Mapping)
    return document


def judge(call: Invocation) -> ProxyConfig:
    """The verdict on every flag and field, as ``iptsync run`` would take them; what is not a
    kube-proxy flag is refused (kube-proxy refuses it too)."""
    flags, others = split_args(call.args)
    config = resolve(flags, call.document, call.where)
    refused = tuple(Verdict(arg, "", "refused", "not a kube-proxy flag (kube-proxy refuses it "
                            "too)" if arg.startswith("-") else "kube-proxy takes no arguments")
                    for arg in others)
    return ProxyConfig(config.values, refused + config.verdicts, config.ignored)


def report(config: ProxyConfig) -> Iterable[str]:
    """One line per flag and field, then the counts."""
    for verdict in config.verdicts:
        label = (verdict.name if not verdict.value
                 else f"{verdict.name}={verdict.value}" if verdict.name.startswith("-")
                 else f"{verdict.name}: {verdict.value}")
        default = " (kube-proxy's default)" if verdict.default else ""
        yield f"{verdict.handling:<8} {label}{default}: {verdict.reason}"
    counts = {h: sum(v.handling == h for v in config.verdicts)
              for h in ("same", "ignored", "refused")}
    yield (f"{counts['same']} same, {counts['ignored']} ignored, {counts['refused']} refused"
           + ("; iptsync would not start" if counts["refused"] else ""))
