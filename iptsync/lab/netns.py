"""Thin primitives over ``ip netns`` for the lab: create, enter, configure and delete namespaces.

Why a module of its own: the lab must never change the host's network namespace, so every
command that configures links, addresses, routes or sysctls goes through one of the helpers
here, and each of them names a target namespace explicitly (``ip -n NS ...`` or
``ip netns exec NS ...``). Veth pairs are created with both ends placed directly in their
namespaces, so not even a transient interface appears in the host namespace.

Failures raise :class:`NetnsError` carrying the command and its stderr, so a broken test-bed
says what went wrong instead of failing later with a confusing timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import iptsync

IFNAMSIZ = 15
"""Longest interface name the kernel accepts (IFNAMSIZ - 1)."""

REQUIRE_NETNS_ENV = "IPTSYNC_REQUIRE_NETNS"
"""When this environment variable is ``1``, tests that cannot use namespaces fail, not skip."""

DEFAULT_TIMEOUT = 60.0

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_NSNAME_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


class NetnsError(RuntimeError):
    """A command run for the lab failed; the message includes the command and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited with status {returncode}"
        detail = stderr.strip() or stdout.strip() or "(no output)"
        super().__init__(f"command {' '.join(self.argv)!r} {status}: {detail}")


def check_ifname(name: str) -> str:
    """Return ``name`` if it is a valid interface name (at most 15 characters), else raise."""
    if not name or len(name) > IFNAMSIZ or not _IFNAME_RE.match(name):
        raise ValueError(f"invalid interface name {name!r} (1-{IFNAMSIZ} chars, [A-Za-z0-9_.-])")
    return name


def check_nsname(name: str) -> str:
    """Return ``name`` if it is a plausible namespace name, else raise ``ValueError``."""
    if not name or len(name) > 200 or not _NSNAME_RE.match(name):
        raise ValueError(f"invalid network namespace name {name!r}")
    return name


def lab_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Python subprocesses of the lab: ``iptsync`` importable via PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(iptsync.__file__).resolve().parent.parent)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not old else f"{root}{os.pathsep}{old}"
    if extra:
        env.update(extra)
    return env


def python_argv(module: str, *args: str) -> list[str]:
    """Command line running ``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` capturing text output; with ``check`` raise :class:`NetnsError` on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        raise NetnsError(argv, None, out, err) from exc
    if check and proc.returncode != 0:
        raise NetnsError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_netns(name: str) -> None:
    """Create the named network namespace and bring its loopback up."""
    check_nsname(name)
    run(["ip", "netns", "add", name])
    try:
        ip(name, "link", "set", "lo", "up")
    except BaseException:
        run(["ip", "netns", "del", name], check=False)
        raise


def netns_pids(name: str) -> list[int]:
    """PIDs of the processes living in the namespace (``ip netns pids``)."""
    out = run(["ip", "netns", "pids", check_nsname(name)], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def kill_netns_processes(name: str) -> None:
    """SIGKILL every process still inside the namespace so deleting it really frees it."""
    for pid in netns_pids(name):
        if pid == os.getpid():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_netns(name: str) -> None:
    """Kill what still runs inside the namespace, then delete it; a missing one is no error."""
    check_nsname(name)
    if name not in list_netns():
        return
    kill_netns_processes(name)
    run(["ip", "netns", "del", name])



@contextlib.contextmanager
def temporary_netns(name: str) -> Iterator[str]:
    """The new namespace ``name`` with loopback up (:func:`add_netns`), deleted on leaving
    whatever happens (:func:`delete_netns`); SIGINT and SIGTERM wait while it is deleted, so a
    second Ctrl-C does not leave it behind."""
    add_netns(name)
    try:
        yield name
    finally:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            delete_netns(name)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip -n NS args...``: an iproute2 command applied inside namespace ``ns`` only."""
    return run(["ip", "-n", check_nsname(ns), *args], check=check)


def ip_batch(ns: str, commands: Iterable[str]) -> None:
    """Run several iproute2 commands in namespace ``ns`` with one process (``ip -n NS -b -``)."""
    lines = [c.strip() for c in commands if c.strip()]
    if lines:
        run(["ip", "-n", check_nsname(ns), "-batch", "-"], input="\n".join(lines) + "\n")


def ns_exec(
    ns: str,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` (``ip netns exec``), capturing its text output."""
    return run(
        ["ip", "netns", "exec", check_nsname(ns), *argv],
        check=check,
        timeout=timeout,
        input=input,
        env=env,
    )


def ns_popen(
    ns: str,
    argv: Sequence[str],
    *,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the background inside namespace ``ns``; the caller must stop it.

    ``ip netns exec`` execs the command in place, so the returned process *is* the command and
    signalling it reaches the command directly.
    """
    return subprocess.Popen(
        ["ip", "netns", "exec", check_nsname(ns), *argv],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=None if env is None else dict(env),
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 2.0) -> None:
    """Terminate ``proc`` (SIGTERM, then SIGKILL after ``timeout``) and reap it."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def set_sysctls(ns: str, values: Mapping[str, str | int], *, ignore_missing: bool = False) -> None:
    """Set sysctls inside namespace ``ns`` in one ``sysctl -w`` call.

    ``ignore_missing`` tolerates keys the kernel does not have (e.g. IPv6 ones when IPv6 is
    compiled out).
    """
    if not values:
        return
    flags = "-qew" if ignore_missing else "-qw"
    ns_exec(ns, ["sysctl", flags, *(f"{k}={v}" for k, v in values.items())])


def set_sysctl(ns: str, key: str, value: str | int) -> None:
    """Set one sysctl inside namespace ``ns`` (``ip netns exec NS sysctl -qw key=value``)."""
    set_sysctls(ns, {key: value})


def get_sysctl(ns: str, key: str) -> str:
    """Read one sysctl inside namespace ``ns``."""
    return ns_exec(ns, ["sysctl", "-n", key]).stdout.strip()


def add_veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    """Create a veth pair with end ``name_a`` in ``ns_a`` and ``name_b`` in ``ns_b`` (both down).

    The pair is created from inside ``ns_a`` with the peer placed straight into ``ns_b``, so it
    never exists in the host namespace, and the two names only need to be free in their own
    namespaces.
    """
    check_ifname(name_a)
    check_ifname(name_b)
    ip(
        ns_a,
        "link",
        "add",
        name_a,
        "type",
        "veth",
        "peer",
        "name",
        name_b,
        "netns",
        check_nsname(ns_b),
    )


CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextlib.contextmanager
def thread_in_netns(name: str) -> Iterator[None]:
    """Move the calling thread (only it) into namespace ``name`` for the block, then back.

    For in-process servers and clients: a socket belongs to the namespace of the thread that
    creates it, and a thread started inside the block (and every thread it starts) stays in
    ``name`` for its whole life. Keep the block short: the caller's own thread is moved.
    """
    with open("/proc/thread-self/ns/net", "rb") as home, \
            open(f"/run/netns/{check_nsname(name)}", "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def netns_required() -> bool:
    """True when ``IPTSYNC_REQUIRE_NETNS=1``: missing namespace support must fail the tests."""
    return os.environ.get(REQUIRE_NETNS_ENV, "") == "1"


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why this machine cannot run the lab (not root, no ``ip``, no netns/veth), or ``None``.

    The probe creates and deletes one throw-away namespace; the result is cached per process.
    """
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    for tool in ("ip", "sysctl"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed"
    probe = f"iptsprobe-{os.getpid()}"
    try:
        run(["ip", "netns", "add", probe], timeout=10)
    except (NetnsError, OSError) as exc:
        return f"'ip netns add' does not work here: {exc}"
    try:
        ns_exec(probe, ["ip", "link", "set", "lo", "up"], timeout=10)
        ip(probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
    except (NetnsError, OSError) as exc:
        return f"network namespaces are not usable here: {exc}"
    finally:
        run(["ip", "netns", "del", probe], check=False, timeout=10)
    return None
