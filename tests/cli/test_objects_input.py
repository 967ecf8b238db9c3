"""The one-shot commands on ``--objects`` input they cannot use: a path that cannot be read
or parsed, or yields no Kubernetes object, is an error (non-zero exit, the problem named with
its file, line and column), never "no Services"; every problem is in the JSON ``problems``.

Conventions: ``good.yaml`` holds Service default/web (10.96.0.10:80) and its EndpointSlice
(10.0.1.10:8080); ``broken.yaml`` has a YAML error at line 3, column 1; the node is node1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from iptsync.cli import main
from iptsync.core import names
from iptsync.kernel.netfilter import Netfilter

GOOD = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.1.10], conditions: {ready: true}}]
"""
NODE_FLAGS = ("--hostname-override", "node1", "--cluster-cidr", "10.0.0.0/14")
BROKEN_ERROR = ("broken.yaml:3:1: cannot parse YAML: expected ',' or ']', but got "
                "'<stream end>' (while parsing a flow sequence started at line 2, column 11)")


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """``good.yaml`` and ``broken.yaml`` of the conventions, and an empty ``empty/``."""
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "broken.yaml").write_text("kind: Service\nmetadata: [unclosed\n")
    (tmp_path / "empty").mkdir()
    return tmp_path


def iptsync(*args: str) -> Result:
    return CliRunner().invoke(main, [*args, *NODE_FLAGS])


COMMANDS = {
    "dump": ("dump",),
    "dump-json": ("dump", "--format", "json"),
    "explain": ("explain", "default/web"),
    "explain-json": ("explain", "default/web", "--json"),
    "trace": ("trace", "--src", "10.0.1.3", "--dst", "10.96.0.10:80"),
    "trace-json": ("trace", "--src", "10.0.1.3", "--dst", "10.96.0.10:80", "--json"),
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_broken_file_fails_the_command_and_names_line_and_column(
        inputs: Path, command: tuple[str, ...]) -> None:
    """With a file that does not parse: exit 1, the error with file:line:column, and nothing
    but the problems on stdout (JSON) or nothing at all."""
    result = iptsync(*command, "--objects", str(inputs / "good.yaml"),
                     "--objects", str(inputs / "broken.yaml"))
    assert 1 == result.exit_code
    assert f"ERROR iptsync: {inputs}/{BROKEN_ERROR}\n" in result.stderr
    assert ("Error: --objects: 1 unusable file(s) or path(s), listed above; nothing done\n"
            == result.stderr.splitlines(keepends=True)[-1])
    expected = {"problems": [{"kind": "file", "object": f"{inputs}/broken.yaml:3:1",
                              "field": "", "message": BROKEN_ERROR.split(": ", 1)[1],
                              "dropped": "file"}]} if {"json", "--json"} & set(command) else None
    assert expected == (json.loads(result.stdout) if result.stdout else None)


@pytest.mark.parametrize(("files", "error"), [
    ({}, "holds no .yaml, .yml or .json file"),
    ({"README.md": "x"}, "holds no .yaml, .yml or .json file"),
    ({"later.yaml": "# none yet\n"}, "yields no Kubernetes object"),
], ids=["empty", "no-manifest-file", "no-object"])
def test_a_path_that_yields_nothing_is_an_error(inputs: Path, files: dict[str, str],
                                                error: str) -> None:
    """An empty directory, one of other files, or files without objects: exit 1, named."""
    for name, text in files.items():
        (inputs / "empty" / name).write_text(text)
    result = iptsync("dump", "--objects", str(inputs / "empty"))
    assert (1, True) == (result.exit_code,
                         f"ERROR iptsync: {inputs}/empty: {error}\n" in result.stderr)
    assert "" == result.stdout


def test_a_mistyped_path_is_refused(inputs: Path) -> None:
    """A path that does not exist: exit 2 and the path named (before anything is read)."""
    result = iptsync("dump", "--objects", str(inputs / "good.yml"))
    assert (2, True) == (result.exit_code, f"Path '{inputs}/good.yml' does not exist"
                         in result.stderr)


def test_diff_exits_2_on_a_broken_file(inputs: Path) -> None:
    """`iptsync diff` keeps its exit codes: 2 (error) for unusable input, not 1 (changes)."""
    saved = inputs / "node1.save"
    saved.write_text("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n")
    result = iptsync("diff", "--saved", str(saved), "--json", "--objects", str(inputs))
    assert (2, f"{inputs}/broken.yaml:3:1") == (
        result.exit_code, json.loads(result.stdout)["problems"][0]["object"])


def test_duplicates_and_files_left_out_are_json_problems_and_the_last_wins(
        inputs: Path) -> None:
    """Non-fatal problems (a Service defined twice, a file left out) are warnings and JSON
    problems; the later definition is the one rendered."""
    (inputs / "broken.yaml").unlink()
    (inputs / "notes.txt").write_text("x")
    (inputs / "override.yaml").write_text(GOOD.replace("10.96.0.10", "10.96.0.11"))
    result = iptsync("dump", "--format", "json", "--objects", str(inputs))
    assert 0 == result.exit_code, result.stderr
    dumped = json.loads(result.stdout)
    assert [("file", str(inputs), "ignoring files without a .yaml, .yml or .json suffix: "
             "notes.txt"),
            ("Service", "default/web", f"defined more than once: {inputs}/good.yaml:1, then "
             f"{inputs}/override.yaml:1; the last definition ({inputs}/override.yaml:1) is used"),
            ("EndpointSlice", "default/web-1", f"defined more than once: {inputs}/good.yaml:6, "
             f"then {inputs}/override.yaml:6; the last definition ({inputs}/override.yaml:6) "
             "is used")] == [(p["kind"], p["object"], p["message"]) for p in dumped["problems"]]
    [ipv4] = dumped["families"]
    assert ("IPv4", dumped["problems"]) == (ipv4["family"], ipv4["problems"])
    assert any("-d 10.96.0.11 " in rule["rule"]
               for rule in ipv4["tables"]["nat"][names.KUBE_SERVICES])
    assert "WARNING iptsync: Service default/web: defined more than once" in result.stderr
    explained = iptsync("explain", "default/web", "--json", "--objects", str(inputs))
    assert 3 == len(json.loads(explained.stdout)["problems"])


@pytest.mark.netns
def test_run_once_with_a_broken_file_exits_1_and_leaves_the_rules(
        netfilter: Netfilter, inputs: Path) -> None:
    """`run --once` with a file that does not parse: exit 1, the error named, no rule
    written or removed."""
    args = [sys.executable, "-m", "iptsync.cli", "run", "--once", "--iptables-backend",
            netfilter.backend.value, "--objects", str(inputs / "good.yaml"), *NODE_FLAGS]
    first = subprocess.run(["ip", "netns", "exec", str(netfilter.netns), *args],
                           capture_output=True, text=True, check=False, timeout=60)
    assert 0 == first.returncode, first.stderr
    before = {table: saved.chains for table, saved in netfilter.save().items()}
    broken = subprocess.run(["ip", "netns", "exec", str(netfilter.netns), *args, "--objects",
                             str(inputs / "broken.yaml")],
                            capture_output=True, text=True, check=False, timeout=60)
    assert (1, True) == (broken.returncode, f"{inputs}/{BROKEN_ERROR}" in broken.stderr)
    assert before == {table: saved.chains for table, saved in netfilter.save().items()}
