"""The Containerfile, linted without a container engine: it is parsed into instructions the
way Docker and Buildah read it, then held to the rules an image of a node agent needs."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass

import pytest

from .conftest import ROOT

KEYWORDS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
            "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
            "WORKDIR"}


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    arguments: str


def parse_containerfile(text: str) -> list[Instruction]:
    """Instructions with their first line; continuations joined, comment lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # a comment inside a continued instruction is dropped too
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, arguments = " ".join(part for part in pending if part).partition(" ")
            instructions.append(Instruction(start, keyword, arguments.strip()))
            pending = []
    assert not pending, "the last instruction ends with a line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_containerfile((ROOT / "Containerfile").read_text())


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Instructions grouped by build stage, each starting with its FROM."""
    grouped: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            grouped.append([])
        assert grouped, f"line {instruction.line}: {instruction.keyword} before the first FROM"
        grouped[-1].append(instruction)
    return grouped


def installed_packages(run: Instruction) -> set[str]:
    """The packages of `apt-get install` commands in one RUN."""
    packages: set[str] = set()
    for command in re.split(r"&&|;", run.arguments):
        words = shlex.split(command)
        if words[:2] == ["apt-get", "install"]:
            packages |= {word for word in words[2:] if not word.startswith("-")}
    return packages


def test_parser_joins_continuations_and_skips_comments() -> None:
    """The parser reads continued lines, inner comments and blank lines as Docker does."""
    text = "# c\nFROM a:1 AS b\n\nRUN x \\\n    # inner\n    && y\nENTRYPOINT [\"z\"]\n"
    assert [Instruction(2, "FROM", "a:1 AS b"), Instruction(4, "RUN", "x && y"),
            Instruction(7, "ENTRYPOINT", '["z"]')] == parse_containerfile(text)


def test_every_instruction_is_a_known_keyword(instructions: list[Instruction]) -> None:
    """Only Dockerfile instructions, spelled in upper case, each with arguments."""
    assert [] == [(i.line, i.keyword) for i in instructions
                  if i.keyword not in KEYWORDS or not i.arguments]


def test_base_images_are_pinned_to_a_tag(instructions: list[Instruction]) -> None:
    """Every FROM names an earlier stage or a fully qualified image with a version tag."""
    aliases: set[str] = set()
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        words = [w for w in instruction.arguments.split() if not w.startswith("--")]
        image = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            aliases.add(words[2])
        if image in aliases:
            continue
        name, _, tag = image.rpartition(":")
        assert tag, f"line {instruction.line}: {image} has no tag"
        assert "/" not in tag, f"line {instruction.line}: {image} has no tag"
        assert "latest" != tag, f"line {instruction.line}: {image}"
        assert name.startswith("docker.io/"), f"line {instruction.line}: short name {name}"
    from_images = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    assert {"docker.io/library/python:3.11-slim-bookworm"} == set(from_images)


def test_nothing_says_latest() -> None:
    """No floating tags anywhere in the file."""
    assert not re.search(r"\blatest\b", (ROOT / "Containerfile").read_text(), re.I)


def test_apt_installs_are_minimal_and_leave_no_lists(instructions: list[Instruction]) -> None:
    """apt-get update, install -y --no-install-recommends and list cleanup in one RUN."""
    runs = [i for i in instructions if i.keyword == "RUN" and "apt-get install" in i.arguments]
    assert runs
    for run in runs:
        text = run.arguments
        assert text.startswith("apt-get update"), f"line {run.line}: update in the same layer"
        assert "-y" in text.split()
        assert "--no-install-recommends" in text
        assert text.endswith("rm -rf /var/lib/apt/lists/*"), f"line {run.line}"


def test_final_image_has_iptables_and_the_netfilter_tools(
        instructions: list[Instruction]) -> None:
    """The runtime stage installs iptables (both backends), conntrack and iproute2; no kmod,
    since the container has no CAP_SYS_MODULE to load modules with."""
    final = stages(instructions)[-1]
    packages = set().union(*(installed_packages(i) for i in final if i.keyword == "RUN"))
    assert {"iptables", "conntrack", "iproute2"} == packages


def test_package_is_installed_without_test_dependencies(
        instructions: list[Instruction]) -> None:
    """pip builds and installs iptsync with no extras; the image installs only built wheels."""
    pips = [i for i in instructions
            if i.keyword == "RUN" and re.search(r"\bpip (install|wheel)\b", i.arguments)]
    assert [] == [i.line for i in pips if "[" in i.arguments]
    final = [i.arguments for i in stages(instructions)[-1] if i in pips]
    assert 1 == len(final)
    assert "--no-index" in final[0].split()
    assert "iptsync" in final[0].split()


def test_entrypoint_is_iptsync_run_as_root(instructions: list[Instruction]) -> None:
    """ENTRYPOINT ["iptsync"] in exec form; no USER, since the agent needs root's capabilities."""
    entrypoints = [i for i in instructions if i.keyword == "ENTRYPOINT"]
    assert ["iptsync"] == json.loads(entrypoints[-1].arguments)
    assert [] == [i.line for i in instructions if i.keyword == "USER"]


def test_python_writes_no_bytecode_into_the_read_only_image(
        instructions: list[Instruction]) -> None:
    """The final stage sets PYTHONDONTWRITEBYTECODE=1: the DaemonSet's root is read-only."""
    envs = " ".join(i.arguments for i in stages(instructions)[-1] if i.keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in envs.split()


def ignore_patterns(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_ignore_files_agree_and_keep_local_state_out() -> None:
    """.containerignore (podman, buildah) and .dockerignore list the same local clutter."""
    patterns = ignore_patterns(".containerignore")
    assert patterns == ignore_patterns(".dockerignore")
    assert {".git", ".venv", ".pytest_cache", ".mypy_cache", ".ruff_cache", "tests"} <= \
        set(patterns)


def test_copied_sources_exist_and_are_not_ignored(instructions: list[Instruction]) -> None:
    """Every COPY from the build context names a file that exists and is sent to the engine."""
    patterns = ignore_patterns(".containerignore")
    for copy in (i for i in instructions if i.keyword == "COPY"):
        words = copy.arguments.split()
        if any(w.startswith("--from") for w in words):
            continue
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"line {copy.line}: {source}"
            assert not any(fnmatch.fnmatch(source, p) for p in patterns), source
