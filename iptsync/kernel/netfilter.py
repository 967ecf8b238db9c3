"""The only module that runs iptables binaries (or python-iptables): save, restore, backend.

Two kernel backends exist and do not see each other's rules: nft (``iptables-nft-*``) and
legacy (``iptables-legacy-*``). :func:`detect_backend` picks the one the node uses, the way
kubernetes-sigs/iptables-wrappers does: kubelet's hint chains first, then the backend that
holds kube chains, then whichever holds more rules, nft by default. Every later read and write
uses that backend's binaries.

With ``netns`` set, commands run inside that named network namespace (``ip netns exec``),
which is how the tests and the lab drive a node namespace from outside.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from iptsync.core import names
from iptsync.core.model import IPFamily
from iptsync.core.ruleset import RulesetError, SavedTable, parse_save
from iptsync.kernel.port import (
    OWNED_TABLES,
    Backend,
    NetfilterError,
    RestoreError,
    RuleStreamBase,
    excerpt,
)
from iptsync.kernel.watch import ChangeWatch, LegacyWatch, NftWatch, OwnPids

log = logging.getLogger(__name__)

HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
_ERROR_LINE = re.compile(r"(?:Error occurred at line|line):? (\d+)", re.IGNORECASE)
_CHUNK_LINES = 4_000  # small enough that iptables-restore starts on the first services
_LOCK_MESSAGES = ("xtables lock", "Resource temporarily unavailable", "holding the xtables")
XTABLES_LOCK = "/run/xtables.lock"  # iptables' default; XTABLES_LOCKFILE overrides it
_LOCK_POLL = 0.02
LOCK_WAIT_NOTICE = 0.1  # a shorter wait for the xtables lock is not worth a log line
RESTORE_SECONDS = 600  # longest an iptables-legacy-restore may run (see restore_stream)


class XtablesLockError(NetfilterError):
    """Another program held the xtables lock for longer than we waited; retried."""


@dataclass
class Netfilter:
    """Runs one backend's iptables-save/-restore, optionally inside a named netns (the real
    :class:`iptsync.kernel.port.NetfilterPort`)."""

    backend: Backend
    netns: str | None = None
    lock_wait_seconds: int = 5
    family: IPFamily = IPFamily.IPV4  # iptables-* for IPv4, ip6tables-* for IPv6
    # Our recent iptables-restore runs, by process id: the nft change watch tells our
    # commits from other programs' with it (iptsync.kernel.watch).
    own_pids: OwnPids = field(default_factory=OwnPids)

    def _argv(self, tool: str, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, f"{self.command}-{tool}", *args]

    @property
    def command(self) -> str:
        """The plain command: ``iptables-nft``, ``ip6tables-legacy``, ..."""
        tool = "iptables" if self.family is IPFamily.IPV4 else "ip6tables"
        return f"{tool}-{self.backend.value}"

    def present(self) -> bool:
        """Whether this family's restore command is installed (kube-proxy's check before it
        programs a family)."""
        return shutil.which(f"{self.command}-restore") is not None

    def _run(self, argv: Sequence[str]) -> str:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            self._raise(argv, result.stderr, result.returncode)
        return result.stdout

    @staticmethod
    def _raise(argv: Sequence[str], stderr: str, returncode: int) -> NoReturn:
        message = stderr.strip() or f"exit status {returncode}"
        # A failure at a line came after the lock was taken (and maybe after a table
        # committed): a rejected batch to undo, never a lock wait to retry as it is.
        if any(text in message for text in _LOCK_MESSAGES) and _failed_line(message) is None:
            raise XtablesLockError(message)
        raise NetfilterError(f"{_tool(argv)}: {message}")

    @retry(retry=retry_if_exception_type(XtablesLockError), stop=stop_after_attempt(5),
           wait=wait_random_exponential(multiplier=0.2, max=3), reraise=True)
    def save(self, tables: Iterable[str] = OWNED_TABLES) -> dict[str, SavedTable]:
        """The live state of ``tables`` (missing tables come back empty)."""
        wanted = list(tables)
        # One iptables-save for every table: on nft each call fetches the whole ruleset
        # whatever -t says (10k services: 3.5 s for nat alone, 3.9 s for everything).
        argv = self._argv("save") if len(wanted) > 1 else self._argv("save", "-t", wanted[0])
        saved = self._parse_output(argv)
        return {table: saved.get(table, SavedTable(table)) for table in wanted}

    def _parse_output(self, argv: Sequence[str]) -> dict[str, SavedTable]:
        """Parse iptables-save's output line by line as it arrives on the pipe."""
        with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              bufsize=0) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            _widen_pipe(proc.stdout.fileno())
            lines = _pipe_lines(proc.stdout.fileno())
            failure: RulesetError | None = None
            try:
                saved = parse_save(lines, verbatim=True)
            except RulesetError as err:
                failure, saved = err, {}
                for _ in lines:  # let the command finish
                    pass
            error = proc.stderr.read().decode(errors="replace")
            proc.wait()
        if proc.returncode != 0:
            self._raise(argv, error, proc.returncode)
        if failure is not None:
            raise failure
        return saved

    def change_watch(self) -> ChangeWatch:
        """The cheapest sound way to learn of other programs' changes on this backend."""
        if self.backend is Backend.NFT:
            return NftWatch(self.family, self.own_pids, self.netns)
        return LegacyWatch(self.family, self.netns)

    def save_text(self, table: str) -> str:
        return self._run(self._argv("save", "-t", table))

    @retry(retry=retry_if_exception_type(XtablesLockError), stop=stop_after_attempt(5),
           wait=wait_random_exponential(multiplier=0.2, max=3), reraise=True)
    def restore(self, payload: str | Sequence[str], *, noflush: bool = True) -> None:
        """Feed ``payload`` (text, or its lines) to iptables-restore; each table's COMMIT is
        atomic."""
        with self.restore_stream(noflush=noflush) as stream:
            stream.write(payload.splitlines() if isinstance(payload, str) else payload)

    def restore_stream(self, *, noflush: bool = True) -> RestoreStream:
        """An iptables-restore to write a payload to while it is still being produced."""
        # iptables-legacy-restore -w N also ends a run still reading its input N seconds after
        # it took the lock (an alarm it never cancels; "COMMIT expected at line ..."), which
        # killed streamed full syncs slower than 5 s. So the lock is waited for here, with
        # lock_wait_seconds, and -w only bounds a wait for a program that grabs the lock
        # between that wait and the restore. nft takes no xtables lock and ignores -w.
        args = ["-w", str(max(self.lock_wait_seconds, RESTORE_SECONDS))]
        if noflush:
            args.append("--noflush")
        lock_wait = self.lock_wait_seconds if self.backend is Backend.LEGACY else None
        return RestoreStream(self._argv("restore", *args), lock_wait=lock_wait,
                             on_start=self.own_pids.add)

    def rule_count(self) -> int:
        """Rules in every table (a full iptables-save); -1 when this backend is unusable."""
        try:
            text = self._run(self._argv("save"))
        except (NetfilterError, FileNotFoundError) as err:
            log.debug("iptables backend %s unusable: %s", self.backend.value, err)
            return -1
        return sum(1 for line in text.splitlines() if line.startswith("-"))

    def chain_exists(self, table: str, chain: str) -> bool:
        """Cheap existence check (the agent's canary), without saving the whole table."""
        if self.backend is Backend.LEGACY and self.netns is None:
            try:
                return chain in legacy_chain_names(table)
            except Exception as err:
                log.debug("python-iptables unavailable, using iptables: %s", err)
        try:
            self.run("-t", table, "-S", chain)
        except XtablesLockError:
            raise  # the chain may well be there: the caller must not act as if it were gone
        except NetfilterError:
            return False
        return True

    def run(self, *args: str) -> str:
        """Run the backend's plain ``iptables`` command (the canary check, reading one chain).

        On legacy, iptables 1.8.9 without ``-w`` waits for a held xtables lock without limit,
        which would stall the agent's loop for as long as another program holds it. So the
        lock is waited for here (timed, logged, :class:`XtablesLockError` after
        ``lock_wait_seconds``) and ``-w`` bounds a wait for a program that grabs the lock in
        between by what is left of that time. nft takes no xtables lock.
        """
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        wait: list[str] = []
        if self.backend is Backend.LEGACY:
            left = self.lock_wait_seconds - wait_for_xtables_lock(self.lock_wait_seconds)
            wait = ["-w", str(max(1, math.ceil(left)))]
        return self._run([*prefix, self.command, *wait, *args])


class RestoreStream(RuleStreamBase):
    """One iptables-restore run, fed a chunk at a time while its payload is produced.

    A first sync at 10,000 services is 40 MB of restore text. Streamed, it never sits in
    memory as one string (and its encoded copy), and iptables-restore parses the first
    services' chains while later ones are still being rendered. The command starts with the
    first write; its messages go to a file, so a failing command never blocks on a full pipe
    while we are still writing. With ``lock_wait``, the command starts only once the xtables
    lock is free (see :func:`wait_for_xtables_lock`).
    """

    def __init__(self, argv: Sequence[str], *, lock_wait: float | None = None,
                 on_start: Callable[[int], None] | None = None) -> None:
        self.argv = list(argv)
        self.lock_wait = lock_wait
        self.on_start = on_start  # told the command's process id as it starts
        self._started = 0.0
        self.lines: list[str] = []  # everything written, to quote the failing line
        self._pending = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._errors: IO[bytes] | None = None
        self._broken = False

    def abort(self) -> None:
        """Stop without committing (the payload never reaches its COMMIT)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            with contextlib.suppress(BrokenPipeError), self._proc:
                pass
        if self._errors is not None:
            self._errors.close()

    def write(self, lines: Sequence[str]) -> None:
        self.lines.extend(lines)
        self._pending += len(lines)
        if self._pending >= _CHUNK_LINES:
            self._flush()

    def close(self) -> None:
        """Finish the batch (once); raises :class:`RestoreError` if it was rejected."""
        self._flush()
        if self._proc is None or self._errors is None or self._errors.closed:
            return
        with self._proc as proc, self._errors as errors:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.wait()
            errors.seek(0)
            message = errors.read().decode(errors="replace")
        if proc.returncode == 0:
            log.debug("%s: %d lines in %.3fs", _tool(self.argv), len(self.lines),
                      time.monotonic() - self._started)
            return
        try:
            Netfilter._raise(self.argv, message, proc.returncode)
        except XtablesLockError:
            raise
        except NetfilterError as err:
            line = _failed_line(str(err))
            raise RestoreError(str(err), line, excerpt(self.lines, line)) from None

    def _flush(self) -> None:
        if not self._pending:
            return
        chunk = "\n".join(self.lines[len(self.lines) - self._pending:]) + "\n"
        self._pending = 0
        if self._proc is None:
            if self.lock_wait is not None:
                wait_for_xtables_lock(self.lock_wait)
            self._started = time.monotonic()
            # Closed by close() or abort(), whichever ends the stream.
            self._errors = tempfile.TemporaryFile()  # noqa: SIM115
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=self._errors)
            if self.on_start is not None:
                self.on_start(self._proc.pid)
        if self._broken:
            return
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(chunk.encode())
        except BrokenPipeError:
            self._broken = True  # it stopped reading (a bad line): close() says why


def wait_for_xtables_lock(timeout: float) -> float:
    """Wait until no other program holds the xtables lock; the seconds waited.

    iptables-legacy-restore -w waits for the lock without a word, so a sync held up by
    another program (a firewall daemon, a CNI plugin, a stuck iptables) would only look slow.
    Waiting here first, where it can be timed, tells the operator who is waiting for what;
    the lock is released at once for the restore, which takes it right after (its own -w
    covers a program that grabs the lock in between). Raises :class:`XtablesLockError` when
    the lock is still held after ``timeout`` seconds.
    """
    path = os.environ.get("XTABLES_LOCKFILE") or XTABLES_LOCK
    started = time.monotonic()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError as err:
        log.debug("cannot open the xtables lock %s (iptables-restore will say more): %s",
                  path, err)
        return 0.0
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - started >= timeout:
                    raise XtablesLockError(
                        f"the xtables lock {path} was held by another program for more than "
                        f"{timeout}s") from None
                time.sleep(_LOCK_POLL)
    finally:
        os.close(fd)  # releases the lock
    waited = time.monotonic() - started
    if waited >= LOCK_WAIT_NOTICE:
        log.log(logging.WARNING if waited >= 1.0 else logging.INFO,
                "waited %.1fs for the xtables lock %s (held by another program)", waited, path)
    return waited


def _tool(argv: Sequence[str]) -> str:
    return next((a for a in argv if a.startswith(("iptables", "ip6tables"))), argv[0])


def _failed_line(message: str) -> int | None:
    match = _ERROR_LINE.search(message)
    return int(match.group(1)) if match else None


# --- backend detection -----------------------------------------------------------------------

# Chains that say a backend holds Kubernetes rules: kubelet's hint chains, then the canary
# kube-proxy (and iptsync) keeps in filter. mangle and filter are small on a loaded node; nat,
# which holds the services, is never read.
KUBE_CHAINS = (("mangle", "KUBE-IPTABLES-HINT"), ("mangle", "KUBE-KUBELET-CANARY"),
               ("filter", names.KUBE_PROXY_CANARY))
Found = Mapping[Backend, Sequence[tuple[str, str]]]  # backend -> (table, chain) present


def choose_backend(found: Found, count_rules: Callable[[Backend], int]) -> tuple[Backend, str]:
    """Pure decision, and why: a hint chain (nft first), then the only backend with kube
    chains, then the backend with more rules (``count_rules``, asked only then; nft on a
    tie)."""
    for backend in (Backend.NFT, Backend.LEGACY):
        hints = [(table, chain) for table, chain in found[backend] if chain in HINT_CHAINS]
        if hints:
            return backend, f"found {_where(hints)}"
    kube = [backend for backend in Backend if found[backend]]
    if len(kube) == 1:
        return kube[0], f"found {_where(found[kube[0]])}"
    counts = {backend: count_rules(backend) for backend in Backend}
    chosen = Backend.LEGACY if counts[Backend.LEGACY] > counts[Backend.NFT] else Backend.NFT
    situation = "kube chains in both, no hint chain" if kube else "no kube chains in either"
    return chosen, (f"{situation}; it holds more rules (nft {counts[Backend.NFT]}, legacy "
                    f"{counts[Backend.LEGACY]})")


def _where(found: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{chain} in {table}" for table, chain in found)


def detect_backend(netns: str | None = None) -> Backend:
    """Pick the backend this node uses from a few chains, without reading whole tables.

    Listing one chain costs milliseconds on a loaded node: nft dumps only that chain; legacy
    loads only that chain's table, and KUBE_CHAINS live in the small ones: 16 ms at 10,000
    services, where saving every table of both backends took 7 s (16 s on a busy machine).
    Rules are counted (a full iptables-save) only when no hint chain decides and not exactly
    one backend holds kube chains.
    """
    found: dict[Backend, list[tuple[str, str]]] = {}
    for backend in Backend:
        nf = Netfilter(backend, netns)
        try:
            found[backend] = [(table, chain) for table, chain in KUBE_CHAINS
                              if nf.chain_exists(table, chain)]
        except FileNotFoundError as err:
            log.info("iptables backend %s unavailable: %s", backend.value, err)
            found[backend] = []
    chosen, reason = choose_backend(found, lambda backend: Netfilter(backend, netns).rule_count())
    log.info("iptables backend %s: %s", chosen.value, reason)
    if all(found.values()):
        other = Backend.LEGACY if chosen is Backend.NFT else Backend.NFT
        log.warning("both iptables backends hold kube chains (nft: %s; legacy: %s); using %s. "
                    "The %s rules still apply to every packet: stop what writes them, then "
                    "remove them with `iptsync cleanup --iptables-backend %s`",
                    _where(found[Backend.NFT]), _where(found[Backend.LEGACY]), chosen.value,
                    other.value, other.value)
    return chosen


def legacy_chain_names(table: str) -> list[str]:
    """Chain names of a legacy table through libiptc (python-iptables), in this netns.

    python-iptables only sees the legacy backend, so it is used only there.
    """
    iptc = _import_iptc()
    return [chain.name for chain in iptc.Table(table).chains]


def _import_iptc() -> Any:
    """python-iptables, imported without distutils.

    It asks distutils for a path it can also get from sysconfig (and does, when distutils is
    missing). Where setuptools is installed, asking imports all of setuptools through its
    distutils shim: half a second of every start with ``--iptables-backend auto``, which
    looks for kube chains in the legacy backend first. So distutils reads as missing while
    python-iptables loads (unless something imported it already).
    """
    if "iptc" in sys.modules:
        return sys.modules["iptc"]
    hide = "distutils" not in sys.modules
    if hide:
        sys.modules["distutils"] = None  # type: ignore[assignment]  # import raises
    try:
        import iptc  # noqa: PLC0415  (libiptc loads at import; only legacy nodes need it)
    finally:
        if hide:
            sys.modules.pop("distutils", None)
    return iptc


# A read ahead parses iptables-save's output in a thread while the main thread works. Each
# read from the pipe gives the GIL up, and the thread waits up to the interpreter's switch
# interval (5 ms) to get it back: read 8 KB at a time (a text pipe's way), then every 64 KB
# (the pipe's default size, where iptables-save stops until it is read), reading 10,000
# services' rules took 7.9 s instead of 4.7 s. So the pipe holds 1 MB and is read 1 MB at a
# time.
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _widen_pipe(fd: int) -> None:
    """Give the pipe ``fd`` reads from a 1 MB buffer (Linux allows that much to anyone);
    kept as it is where it cannot grow."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)


def _pipe_lines(fd: int) -> Iterator[str]:
    """The lines (without their newline) of what arrives on the pipe ``fd``, read a
    megabyte at a time; UTF-8, as iptables-save writes (for what we write)."""
    # Another program's comment may hold any bytes: such a rule reads with U+FFFD in place
    # of them (only our own chains are ever compared or written back).
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""
    while chunk := os.read(fd, _PIPE_BYTES):
        lines = (tail + decoder.decode(chunk)).split("\n")
        tail = lines.pop()
        yield from lines
    tail += decoder.decode(b"", final=True)
    if tail:
        yield tail
