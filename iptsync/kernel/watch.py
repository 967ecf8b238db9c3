"""Knowing, cheaply, whether another program changed the rules iptsync owns.

A full compare reads and parses every rule of the nat and filter tables: about 3 s of CPU at
10,000 services on nft. Doing that every sync period costs a tenth of a core forever, and
damage between two periods stays unrepaired for up to a period. The kernel can say much
more cheaply whether anything changed, differently per backend:

- **nft** (:class:`NftWatch`): every nftables commit sends notifications to the
  ``NFNLGRP_NFTABLES`` netlink group: one message per table, chain or rule added or removed
  (naming its family, table and chain), then one ``NFT_MSG_NEWGEN`` naming the new ruleset
  generation and the process that committed. Commits by our own iptables-restore runs are
  recognised by their process id and ignored; any other commit that touched one of our
  chains, or a built-in chain our jumps live in, is reported chain by chain, about as soon
  as it happens. When notifications were lost (the socket's buffer overran), we cannot tell
  what changed and say so: a full compare follows.
- **legacy** (:class:`LegacyWatch`): the kernel keeps each table as one blob; its size and
  entry count come back from one ``getsockopt(IPT_SO_GET_INFO)``. Recorded after each of our
  syncs, compared at every check: a difference means someone changed the table (which chain
  cannot be told; a full compare follows). A change that keeps both numbers (a rule
  replaced by one of exactly the same size) is found by the periodic full compare.

Both answer :meth:`changes` with a :class:`KernelChanges`; neither runs a process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from iptsync.core import names
from iptsync.core.model import IPFamily
from iptsync.kernel.port import OWNED_TABLES

log = logging.getLogger(__name__)
T = TypeVar("T")

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33  # not in Python's socket module
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
# nftables message types (linux/netfilter/nf_tables.h)
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE = 0, 2
NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN = 3, 5
NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 6, 8
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFT_MSG_DESTROYTABLE, NFT_MSG_DESTROYCHAIN, NFT_MSG_DESTROYRULE = 26, 27, 28
# Attribute numbers: NFTA_TABLE_NAME; NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME; NFTA_RULE_TABLE,
# NFTA_RULE_CHAIN; NFTA_GEN_ID, NFTA_GEN_PROC_PID.
_TABLE_ATTRS = {"table": 1}
_CHAIN_ATTRS = {"table": 1, "chain": 3}
_RULE_ATTRS = {"table": 1, "chain": 2}
_KIND = {
    NFT_MSG_NEWTABLE: _TABLE_ATTRS, NFT_MSG_DELTABLE: _TABLE_ATTRS,
    NFT_MSG_DESTROYTABLE: _TABLE_ATTRS,
    NFT_MSG_NEWCHAIN: _CHAIN_ATTRS, NFT_MSG_DELCHAIN: _CHAIN_ATTRS,
    NFT_MSG_DESTROYCHAIN: _CHAIN_ATTRS,
    NFT_MSG_NEWRULE: _RULE_ATTRS, NFT_MSG_DELRULE: _RULE_ATTRS,
    NFT_MSG_DESTROYRULE: _RULE_ATTRS,
}
NFPROTO = {IPFamily.IPV4: 2, IPFamily.IPV6: 10}
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
WHOLE_TABLE = "*"  # a change to a table itself (created, flushed away, deleted)
_RECEIVE_BUFFER = 64 << 20  # notifications of one large foreign commit, at least
_FOLLOW_POLL = 0.5  # seconds between the reader thread's looks at whether it must stop
_HEADER = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class KernelChanges:
    """What other programs changed in our tables since the last look."""

    chains: frozenset[tuple[str, str]] = frozenset()  # (table, chain); chain "*": the table
    unknown: str = ""  # why the changes cannot be told chain by chain (compare everything)

    @property
    def any(self) -> bool:
        return bool(self.chains or self.unknown)

    def describe(self) -> str:
        if self.unknown:
            return self.unknown
        return ", ".join(f"{table}/{chain}" for table, chain in sorted(self.chains))


class ChangeWatch(Protocol):
    """A backend's cheap answer to "did another program change our rules?"."""

    def changes(self) -> KernelChanges:
        """Changes by other programs since the last call (or since :meth:`mark`)."""

    def mark(self) -> None:
        """Our sync just ended: what the kernel holds now is ours."""

    def close(self) -> None:
        """Release the kernel resources."""


def owned(table: str, chain: str) -> bool:
    """A chain whose change matters to us: one of ours, or a built-in chain holding our jumps."""
    return table in OWNED_TABLES and (
        chain == WHOLE_TABLE or chain in BUILTIN_CHAINS or names.is_owned_chain(table, chain)
        or names.is_service_chain(chain))


# --- nft -----------------------------------------------------------------------------------

def _attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4:offset + length]
        offset += (length + 3) & ~3


def _text(value: bytes) -> str:
    return value.rstrip(b"\0").decode(errors="replace")


@dataclass
class _Commit:
    touched: set[tuple[str, str]] = field(default_factory=set)


class NftWatch:
    """Follows nftables commits in this network namespace (see the module docstring).

    ``own_pids`` returns the process ids of our own recent iptables-restore runs (each
    recorded as it starts, before it can commit). Create it before the first sync, so that
    every later commit is seen.

    A thread reads the notifications as they come: a first sync at 10,000 services announces
    about 450,000 objects (more than 64 MB), which overran the socket's buffer when read only
    at the next check, and made the agent compare everything once more right after its first
    sync. Our own commits' messages are recognised by the committer's port id in their header
    (iptables-restore's pid) and skipped unread; the ``NFT_MSG_NEWGEN`` closing each commit
    still decides whose it was.
    """

    def __init__(self, family: IPFamily, own_pids: Callable[[], Collection[int]],
                 netns: str | None = None) -> None:
        self.family = family
        self.own_pids = own_pids
        self._nfproto = NFPROTO[family]
        self._events = in_netns(netns, self._subscribe)
        self._lock = threading.Lock()  # the state below, between the reader and changes()
        self._pending: set[tuple[str, str]] = set()  # of the commit still being announced
        self._foreign: set[tuple[str, str]] = set()
        self._lost = ""
        self.generation_seen = -1  # the last generation announced
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._follow, name="iptsync-nft-watch",
                                        daemon=True)
        self._reader.start()

    def _subscribe(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, _RECEIVE_BUFFER)
        except OSError:  # without CAP_NET_ADMIN: as large as the system allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        sock.setblocking(False)
        return sock

    def fileno(self) -> int:
        return self._events.fileno()

    def changes(self) -> KernelChanges:
        with self._lock:
            self._drain()
            found = KernelChanges(frozenset(self._foreign), self._lost)
            self._foreign.clear()
            self._lost = ""
        return found

    def mark(self) -> None:
        # Our own commits are recognised by process id; nothing to record. Notifications
        # of our last commit still queued are read (and dropped) by the reader thread.
        return

    def close(self) -> None:
        self._stopping.set()
        self._reader.join(timeout=5)
        with self._lock:
            self._events.close()

    def _follow(self) -> None:
        """The reader thread: read what comes, until closed. A failure is said, and makes
        the next check compare everything (what it missed is unknown)."""
        poller = select.poll()
        poller.register(self._events.fileno(), select.POLLIN)
        while not self._stopping.is_set():
            try:
                if not poller.poll(_FOLLOW_POLL * 1000):
                    continue
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._drain()
            except Exception as err:
                log.warning("reading nftables notifications failed: %s; the next check "
                            "compares every rule", err)
                with self._lock:
                    self._lost = f"reading nftables notifications failed: {err}"
                return

    def _drain(self) -> None:
        own = self.own_pids()
        while True:
            try:
                data = self._events.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped notifications: what changed, and who did it, is unknown.
                self._pending.clear()
                self._lost = "nftables notifications were lost (receive buffer overrun)"
                continue
            own = self._parse(data, own)

    def _parse(self, data: bytes, own: Collection[int]) -> Collection[int]:
        """Take in one read's messages; returns ``own``, looked at again if it had to be."""
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _flags, _seq, portid = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                return own
            end = offset + length
            if portid not in own:
                # A restore of ours may have started since the snapshot (a staged sync's
                # next batch, while a large commit's backlog was read): look again.
                own = self.own_pids()
            if (kind >> 8 == NFNL_SUBSYS_NFTABLES and end - offset >= 20
                    and (portid not in own or kind & 0xFF == NFT_MSG_NEWGEN)):
                self._message(kind & 0xFF, data[offset + 16], data, offset + 20, end,
                              committer=portid, own=own)
            offset += (length + 3) & ~3
        return own

    def _message(self, kind: int, family: int, data: bytes, start: int, end: int, *,
                 committer: int, own: Collection[int]) -> None:
        if kind == NFT_MSG_NEWGEN:
            attrs = dict(_attributes(data, start, end))
            if 1 in attrs:
                self.generation_seen = struct.unpack(">I", attrs[1][:4])[0]
            # The committing process: its pid as the initial pid namespace numbers it, and
            # the port id of its netlink socket (its pid as our namespace numbers it: what
            # our own records hold when the agent runs in a container's pid namespace).
            pid = struct.unpack(">I", attrs[2][:4])[0] if 2 in attrs else -1
            if self._pending and pid not in own and committer not in own:
                self._foreign |= self._pending
            self._pending.clear()
            return
        wanted = _KIND.get(kind)
        if wanted is None or family != self._nfproto:
            return
        attrs = dict(_attributes(data, start, end))
        table = _text(attrs.get(wanted["table"], b""))
        chain = _text(attrs[wanted["chain"]]) if "chain" in wanted and wanted["chain"] in attrs \
            else WHOLE_TABLE
        if owned(table, chain):
            self._pending.add((table, chain))


def read_generation(netns: str | None = None) -> int:
    """The nftables ruleset generation of this network namespace (one netlink round trip)."""
    def ask() -> int:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
            sock.bind((0, 0))
            body = struct.pack("=BBH", 0, 0, 0)
            request = _HEADER.pack(_HEADER.size + len(body),
                                   (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
                                   NLM_F_REQUEST, 1, 0) + body
            sock.send(request)
            data = sock.recv(65536)
        length, kind, *_ = _HEADER.unpack_from(data, 0)
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, 16)[0]
            raise OSError(code, f"NFT_MSG_GETGEN: {os.strerror(code)}")
        attrs = dict(_attributes(data, 20, length))
        return int(struct.unpack(">I", attrs[1][:4])[0])

    return in_netns(netns, ask)


# --- legacy --------------------------------------------------------------------------------

IPT_SO_GET_INFO = 64  # the same number for IPv6 (IP6T_SO_GET_INFO)
_LEVEL = {IPFamily.IPV4: (socket.AF_INET, socket.IPPROTO_IP),
          IPFamily.IPV6: (socket.AF_INET6, socket.IPPROTO_IPV6)}
# struct ipt_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size
_GETINFO = struct.Struct("=32sI5I5III")


class LegacyWatch:
    """Table size and entry count from the kernel, compared with what our last sync left."""

    def __init__(self, family: IPFamily, netns: str | None = None,
                 tables: Collection[str] = OWNED_TABLES) -> None:
        self.family = family
        self.netns = netns
        self.tables = tuple(tables)
        self._marked: dict[str, tuple[int, int]] | None = None

    def info(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) of each table; a table not loaded reads (0, 0)."""
        return in_netns(self.netns, self._info)

    def _info(self) -> dict[str, tuple[int, int]]:
        domain, level = _LEVEL[self.family]
        found: dict[str, tuple[int, int]] = {}
        with socket.socket(domain, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            for table in self.tables:
                found[table] = _getinfo(sock.fileno(), level, table)
        return found

    def mark(self) -> None:
        self._marked = self.info()

    def changes(self) -> KernelChanges:
        if self._marked is None:
            return KernelChanges()
        now = self.info()
        differ = [t for t in self.tables if now.get(t) != self._marked.get(t)]
        if not differ:
            return KernelChanges()
        self._marked = now  # reported once; the full compare that follows marks again
        return KernelChanges(frozenset((t, WHOLE_TABLE) for t in differ),
                             f"the {', '.join(differ)} table changed size "
                             "(legacy tables cannot tell which chain)")

    def close(self) -> None:
        return


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once: getsockopt and setns have no Python binding here."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _getinfo(fd: int, level: int, table: str) -> tuple[int, int]:
    # socket.getsockopt() caps its buffer at 1024 bytes but needs the struct passed in
    # (the table name is an input), which only the C call allows.
    buffer = ctypes.create_string_buffer(_GETINFO.pack(table.encode(), 0, *[0] * 10, 0, 0),
                                         _GETINFO.size)
    size = ctypes.c_uint32(_GETINFO.size)
    if _libc().getsockopt(fd, level, IPT_SO_GET_INFO, buffer, ctypes.byref(size)) != 0:
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            return (0, 0)  # the table is not loaded
        raise OSError(code, f"IPT_SO_GET_INFO {table}: {os.strerror(code)}")
    fields = _GETINFO.unpack(buffer.raw)
    return (fields[-2], fields[-1])


# --- network namespaces --------------------------------------------------------------------

def in_netns(netns: str | None, action: Callable[[], T]) -> T:
    """Run ``action`` in network namespace ``netns`` (None: this one).

    Sockets keep the namespace they were created in, so a socket made here serves the
    namespace for good. setns() changes only the calling thread: a short-lived thread enters
    the namespace, so the rest of the process never moves.
    """
    if netns is None:
        return action()
    result: list[T] = []
    failure: list[BaseException] = []

    def enter() -> None:
        libc = _libc()
        try:
            with open(f"/run/netns/{netns}", "rb") as handle:
                if libc.setns(handle.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns {netns}: {os.strerror(code)}")
            result.append(action())
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    thread = threading.Thread(target=enter, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class OwnPids:
    """Process ids of our recent iptables-restore runs (a short memory: pids are reused)."""

    def __init__(self, keep: int = 64) -> None:
        self._pids: deque[int] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, pid: int) -> None:
        with self._lock:
            self._pids.append(pid)

    def __call__(self) -> Collection[int]:
        with self._lock:
            return frozenset(self._pids)
