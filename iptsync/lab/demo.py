"""``iptsync lab``: a two-node cluster of network namespaces, with real traffic through iptsync.

Why: the rules iptsync writes are easiest to believe when you watch packets go through them.
The lab builds the scenario of ``examples/lab`` (:mod:`iptsync.lab.scenario`: nodes, pods
running echo servers, an external client), runs ``iptsync run --once`` inside each node
namespace against those manifests, then measures what a person wants to see: how connections
spread over the pods, which source address the pods saw (kept for pod -> ClusterIP,
masqueraded to a node address for NodePort and load-balancer traffic), what ``iptsync dump``
prints for one service and that the node holds exactly that, and that the ExternalName
service produced no rules at all.

The lab in modules: :mod:`~iptsync.lab.scenario` reads the scenario,
:mod:`~iptsync.lab.traffic` syncs the nodes and sends requests, :mod:`~iptsync.lab.readback`
compares the dump with the live rules, :mod:`~iptsync.lab.checks` judges,
:mod:`~iptsync.lab.measure` runs it all around the cluster's lifetime and
:mod:`~iptsync.lab.report` presents the result. This module is the command: it checks the
machine can run the lab, prints the report, holds the lab up for ``--keep`` and turns signals
into a clean teardown. Everything happens in namespaces the lab creates and deletes again
(also on Ctrl-C and SIGTERM); the host's own network namespace is never changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from types import FrameType, TracebackType
from typing import Any, Self, TextIO

from iptsync.lab import netns
from iptsync.lab.measure import DEFAULT_REQUESTS, LabResult, run_lab
from iptsync.lab.report import keep_hint, render_text, result_json
from iptsync.lab.topology import LabError

NEEDS_ROOT = "iptsync lab needs root (network namespaces)"


def cannot_run_reason(backend: str) -> str | None:
    """Why the lab cannot run on this machine (not root, no namespaces, no iptables), or None."""
    if os.geteuid() != 0:
        return NEEDS_ROOT
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        return f"iptsync lab cannot run here: {reason}"
    for tool in (f"{family}-{backend}-{what}" for family in ("iptables", "ip6tables")
                 for what in ("restore", "save")):
        if shutil.which(tool) is None:
            return f"iptsync lab needs {tool} (Debian package iptables)"
    return None


class SignalGuard:
    """Turns SIGINT, SIGTERM and SIGHUP into one KeyboardInterrupt, then defers the rest.

    The first signal raises ``KeyboardInterrupt`` wherever the lab is, so the cluster's context
    manager deletes every namespace. Once :meth:`defer` was called (teardown has begun) or a
    signal was already taken, SIGINT is ignored and SIGTERM/SIGHUP only print a note: the
    cleanup must not be cut short. The previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def defer(self) -> None:
        """From now on signals no longer interrupt (teardown in progress).

        SIGINT is ignored outright rather than handled: a Ctrl-C in the terminal reaches the
        whole process group, and the ``ip netns del`` commands of the teardown inherit an
        ignored SIGINT, so a second Ctrl-C cannot kill them halfway either.
        """
        self.deferring = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferring:
            self.signum = self.signum or signum
            self.err.write("lab: removing the namespaces, please wait\n")
            self.err.flush()
            return
        self.signum = signum
        self.defer()
        raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_for_enter(stdin: TextIO) -> None:
    """Block until a line (Enter), end of input, Ctrl-C or SIGTERM."""
    with contextlib.suppress(KeyboardInterrupt):
        stdin.readline()


def run_command(*, backend: str = "nft", requests: int = DEFAULT_REQUESTS, keep: bool = False,
                as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                stdin: TextIO | None = None) -> int:
    """``iptsync lab``: run the lab, print the report; the exit status (0: every check passed,
    1: a check failed, 2: the lab could not run, 128+N: stopped by signal N)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    stdin = stdin if stdin is not None else sys.stdin
    reason = cannot_run_reason(backend)
    if reason is not None:
        err.write(f"{reason}\n")
        return 2

    def progress(message: str) -> None:
        err.write(f"lab: {message}\n")
        err.flush()

    shown: list[LabResult] = []

    def show(result: LabResult) -> None:
        if as_json:
            json.dump(result_json(result), out, indent=2)
            out.write("\n")
        else:
            out.write(render_text(result))
        out.flush()
        shown.append(result)  # from here on, a signal only ends the lab early
        if keep:  # on stderr: stdout stays the report (or the JSON) alone
            err.write(keep_hint(result) + "\n")
            err.flush()
            wait_for_enter(stdin)

    result: LabResult | None = None
    with SignalGuard(err) as guard:
        try:
            result = run_lab(backend, requests, while_up=show, before_teardown=guard.defer,
                             progress=progress)
        except KeyboardInterrupt:
            result = shown[0] if shown else None
        except (LabError, netns.NetnsError, OSError) as exc:
            err.write(f"iptsync lab: {exc}\n")
            return 2
    if result is None:
        name = signal.Signals(guard.signum).name if guard.signum else "interrupt"
        err.write(f"lab: stopped by {name}; all namespaces removed\n")
        return 128 + (guard.signum or signal.SIGINT)
    return 0 if result.ok else 1
