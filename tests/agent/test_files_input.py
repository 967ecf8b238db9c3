"""The agent on ``--objects`` files and real netfilter: input it cannot use never removes rules.

Conventions: ``a.yaml`` holds Services web (10.96.0.50) and api (10.96.0.51), ``b.yaml`` holds
db (10.96.0.52), each with one endpoint (10.0.1.10, .11, .12); the source polls every 50 ms.
A test proves a sync happened after breaking a file by changing db's endpoints and waiting
for that change in the kernel: the same sync would have removed the broken file's rules.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from iptsync.agent.loop import Agent, Timing
from iptsync.agent.metrics import Metrics
from iptsync.core import names
from iptsync.core.policy import Settings
from iptsync.engine.reconciler import Engine
from iptsync.kernel.netfilter import Netfilter
from iptsync.sources.files import FilesSource

from .waiting import eventually

pytestmark = pytest.mark.netns

SETTINGS = Settings(node_name="node1", cluster_cidrs=(ipaddress.ip_network("10.0.0.0/14"),),
                    node_ips=(ipaddress.ip_address("10.100.0.2"),))
SERVICES = {"web": ("10.96.0.50", "10.0.1.10"), "api": ("10.96.0.51", "10.0.1.11"),
            "db": ("10.96.0.52", "10.0.1.12")}


def manifests(*service_names: str, db_endpoints: int = 1) -> str:
    """Multi-document YAML: each Service named with its EndpointSlice."""
    documents: list[dict[str, Any]] = []
    for name in service_names:
        cluster_ip, pod_ip = SERVICES[name]
        pods = [pod_ip] if name != "db" else [f"10.0.1.{12 + i}" for i in range(db_endpoints)]
        documents += [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"namespace": "default", "name": name},
             "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"namespace": "default", "name": f"{name}-1",
                          "labels": {"kubernetes.io/service-name": name}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
             "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in pods]}]
    return yaml.safe_dump_all(documents)


def svc(name: str) -> str:
    return names.svc_chain(f"default/{name}:http", "tcp")


def service_rules(netfilter: Netfilter, *service_names: str) -> dict[str, list[str]]:
    """The nat rules of each named service's SVC chain and of the SEP chains they reach."""
    chains = netfilter.save()["nat"].chains
    rules: dict[str, list[str]] = {}
    for name in service_names:
        rules[svc(name)] = list(chains.get(svc(name), []))
        for rule in rules[svc(name)]:
            target = rule.rsplit("-j ", 1)[-1]
            if target.startswith("KUBE-SEP-"):
                rules[target] = list(chains[target])
    return rules


def db_endpoints(netfilter: Netfilter) -> int:
    return sum("KUBE-SEP-" in rule for rule in netfilter.save()["nat"].chains.get(svc("db"), []))


class FilesAgent:
    """The agent for node1 on FilesSource(``paths``), in a thread until :meth:`stop`."""

    def __init__(self, netfilter: Netfilter, *paths: Path) -> None:
        self.metrics = Metrics()
        self.source = FilesSource(paths, poll_interval=0.05)
        self.agent = Agent(Engine(netfilter, SETTINGS), [self.source],
                           timing=Timing(min_sync_period=0.05, sync_period=60.0,
                                         canary_interval=60.0), metrics=self.metrics)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def file_errors(self) -> float | None:
        return self.metrics.registry.get_sample_value("iptsync_objects_file_errors_total")

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=10)


@pytest.fixture
def objects(tmp_path: Path) -> Path:
    """``objects/a.yaml`` (web, api) and ``b.yaml`` (db)."""
    directory = tmp_path / "objects"
    directory.mkdir()
    (directory / "a.yaml").write_text(manifests("web", "api"))
    (directory / "b.yaml").write_text(manifests("db"))
    return directory


@pytest.fixture
def running(netfilter: Netfilter) -> Iterator[list[FilesAgent]]:
    """Agents started by a test, stopped afterwards."""
    agents: list[FilesAgent] = []
    yield agents
    for agent in agents:
        agent.stop()


def test_a_yaml_error_keeps_the_files_rules_until_fixed(
        netfilter: Netfilter, objects: Path, running: list[FilesAgent],
        caplog: pytest.LogCaptureFixture) -> None:
    """A YAML error in one file: its services' rules stay through later syncs, the warning
    names file:line:column, the error is counted; once fixed, its new content is applied."""
    caplog.set_level(logging.INFO)
    agent = FilesAgent(netfilter, objects)
    running.append(agent)
    eventually(lambda: all(svc(n) in netfilter.save()["nat"].chains for n in SERVICES))
    before = service_rules(netfilter, "web", "api")
    broken = objects / "a.yaml"
    broken.write_text(manifests("web", "api") + "spec: [\n")
    eventually(lambda: 1.0 == agent.file_errors())
    (objects / "b.yaml").write_text(manifests("db", db_endpoints=2))
    eventually(lambda: 2 == db_endpoints(netfilter))
    assert before == service_rules(netfilter, "web", "api")
    line = len(manifests("web", "api").splitlines()) + 2
    assert [f"{broken}:{line}:1: cannot parse YAML"] == [
        r.getMessage()[:len(f"{broken}:{line}:1: cannot parse YAML")] for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(str(broken))]
    assert 0.0 == agent.metrics.registry.get_sample_value("iptsync_source_connected")

    broken.write_text(manifests("web"))
    eventually(lambda: svc("api") not in netfilter.save()["nat"].chains)
    assert before[svc("web")] == service_rules(netfilter, "web")[svc("web")]
    assert any(r.getMessage().startswith(f"{broken}: loads again") for r in caplog.records)
    assert 1.0 == agent.file_errors()


def test_a_removed_or_emptied_directory_keeps_its_rules(
        netfilter: Netfilter, tmp_path: Path, running: list[FilesAgent],
        caplog: pytest.LogCaptureFixture) -> None:
    """A directory given that disappears, then comes back empty: each time a warning and a
    count, and its services' rules stay while other files still sync."""
    directory, other = tmp_path / "web", tmp_path / "db.yaml"
    directory.mkdir()
    (directory / "a.yaml").write_text(manifests("web", "api"))
    other.write_text(manifests("db"))
    agent = FilesAgent(netfilter, directory, other)
    running.append(agent)
    eventually(lambda: all(svc(n) in netfilter.save()["nat"].chains for n in SERVICES))
    before = service_rules(netfilter, "web", "api")

    directory.rename(tmp_path / "moved")
    eventually(lambda: 1.0 == agent.file_errors())
    other.write_text(manifests("db", db_endpoints=2))
    eventually(lambda: 2 == db_endpoints(netfilter))
    assert before == service_rules(netfilter, "web", "api")

    directory.mkdir()
    eventually(lambda: 2.0 == agent.file_errors())
    other.write_text(manifests("db", db_endpoints=3))
    eventually(lambda: 3 == db_endpoints(netfilter))
    assert before == service_rules(netfilter, "web", "api")
    assert [f"{directory}: cannot read: No such file or directory; keeping the objects last "
            "loaded from it (4)", f"{directory}: holds no .yaml, .yml or .json file; keeping "
            "the objects last loaded from it (4)"] == [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_restart_with_a_broken_file_leaves_the_rules_alone(
        netfilter: Netfilter, objects: Path, running: list[FilesAgent]) -> None:
    """An agent started while a file is broken writes nothing (the rules of the previous run
    stay as they are) until every file loads; then it syncs."""
    first = FilesAgent(netfilter, objects)
    eventually(lambda: all(svc(n) in netfilter.save()["nat"].chains for n in SERVICES))
    first.stop()
    before = {table: saved.chains for table, saved in netfilter.save().items()}
    (objects / "a.yaml").write_text("kind: Service\nmetadata: [unclosed\n")
    (objects / "b.yaml").write_text(manifests("db", db_endpoints=2))
    second = FilesAgent(netfilter, objects)
    running.append(second)
    eventually(lambda: 1.0 == second.file_errors())
    second.thread.join(timeout=1.0)  # a second of polls and loop turns: nothing may be written
    assert before == {table: saved.chains for table, saved in netfilter.save().items()}
    assert False is second.agent.ready

    (objects / "a.yaml").write_text(manifests("web"))
    eventually(lambda: 2 == db_endpoints(netfilter))
    eventually(lambda: svc("api") not in netfilter.save()["nat"].chains)
