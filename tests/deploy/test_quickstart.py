"""The README's quick start works as written in a root shell on a fresh Debian machine, which
has no sudo: each command is a script of the checkout, run as it is."""

from __future__ import annotations

import os
import re

from .conftest import ROOT


def quick_start_commands() -> list[str]:
    """The code spans in the command column of the README's quick-start table."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # no header
    return [span for row in rows for span in re.findall(r"`([^`]+)`", row.split(" | ")[-1])]


def test_quick_start_runs_the_lab_and_the_suite() -> None:
    """The table names the lab and the CI entry point."""
    assert ["scripts/lab", ".ci/run"] == quick_start_commands()


def test_quick_start_commands_need_no_sudo() -> None:
    """Each command is an executable script of the checkout with a shebang, not `sudo ...`."""
    for command in quick_start_commands():
        script = ROOT / command.split()[0]
        assert script.is_file(), command
        assert os.access(script, os.X_OK), command
        assert script.read_text().startswith("#!/usr/bin/env bash\n"), command
        assert "sudo" not in script.read_text().split(), command
