"""Clear stale UDP conntrack entries over ctnetlink, asking the kernel only for the candidates.

Which entries are stale is decided by :mod:`iptsync.core.flows` (pure). This module asks the
current network namespace's conntrack table for the flows of one IP family that go to the
destinations a sync changed, with ctnetlink's kernel-side dump filters (``CTA_FILTER`` on the
original tuple: protocol, destination address, destination port, Linux 5.8 and later; the
status filter, DNATed or unanswered, 5.15 and later; :func:`iptsync.core.flows.flow_queries`
says which), and deletes the stale ones by tuple, zone and entry id, so that an entry created
meanwhile for the same tuple is never hit. A kernel without the filters returns every entry of
the family; each one is still judged by :func:`iptsync.core.flows.stale`, so only the cost
changes.

The messages are packed and parsed here with :mod:`struct`, in pyroute2's layout
(``pyroute2.netlink.nfnetlink.nfctsocket``, which the tests use to check them): pyroute2's
generic codec costs about 1 ms of CPU per conntrack message on these machines, 90 s for a
table of 100,000 flows, where this parser reads one in 15 to 25 us (docs/performance.md).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from iptsync.core.flows import Flow, FlowQuery, FlowTargets, flow_queries, stale
from iptsync.core.model import IPFamily

log = logging.getLogger(__name__)

# linux/netlink.h, linux/netfilter/nfnetlink.h and nfnetlink_conntrack.h
NETLINK_NETFILTER = 12
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLA_F_NESTED, NLA_TYPE_MASK = 0x8000, 0x3FFF
CT_NEW, CT_GET, CT_DELETE = (1 << 8 | kind for kind in range(3))  # NFNL_SUBSYS_CTNETLINK = 1
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMEOUT, CTA_ID = 1, 2, 3, 7, 12
CTA_ZONE, CTA_FILTER, CTA_STATUS_MASK = 18, 25, 26
# linux/netfilter/nf_conntrack_common.h
IPS_SEEN_REPLY, IPS_CONFIRMED, IPS_DST_NAT = 1 << 1, 1 << 3, 1 << 5
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_FILTER_ORIG_FLAGS = 1
FILTER_IP_DST, FILTER_PROTO_NUM, FILTER_PROTO_DST_PORT = 1 << 1, 1 << 3, 1 << 5
# CTA_IP_V4_SRC, _DST = 1, 2 and CTA_IP_V6_SRC, _DST = 3, 4
IP_ATTRS = {IPFamily.IPV4: (1, 2), IPFamily.IPV6: (3, 4)}
AF = {IPFamily.IPV4: socket.AF_INET, IPFamily.IPV6: socket.AF_INET6}

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NFGEN = struct.Struct("=BBH")  # family, version, resource id
_NLA = struct.Struct("=HH")  # length, type
_PORT = struct.Struct("!H")
RECV_SIZE = 1 << 17  # dumps come in skbs of at most 32 KiB; a reply never truncates
BATCH = 256  # messages sent before their acknowledgements are read


@dataclass(frozen=True)
class NewEntry:
    """An entry to create: ``client``:``client_port`` sent ``flow``, whose reply source says
    where it went (without the DNAT status bit: only NAT itself sets that)."""

    flow: Flow
    client: str
    client_port: int
    replied: bool = False  # the entry has seen a reply (IPS_SEEN_REPLY)


@dataclass(frozen=True)
class _Entry:
    """A dumped entry: its flow, and its attributes as the kernel sent them."""

    flow: Flow
    attrs: bytes

    @property
    def key(self) -> bytes:
        """What a deletion names the entry by: CTA_TUPLE_ORIG, CTA_ZONE and CTA_ID."""
        return b"".join(self.attrs[first - _NLA.size:first + ((last - first + 3) & ~3)]
                        for kind, first, last in _attrs(self.attrs, 0, len(self.attrs))
                        if kind in (CTA_TUPLE_ORIG, CTA_ID, CTA_ZONE))


def clear_stale_flows(targets: FlowTargets) -> int:
    """Delete the stale entries of ``targets``' family from this network namespace's
    conntrack table; returns the count. A failure is logged, never raised: the rules are
    in place, and a stale flow only lasts until conntrack times it out."""
    if not targets:
        return 0
    # The kernel's IPv6 address filter is inverted (ctnetlink_filter_match_tuple tests
    # `!ipv6_addr_cmp`, true when the addresses are equal; Linux 5.8 to 6.18 at least): IPv6
    # queries name the port only, and the address is checked here.
    queries = flow_queries(targets, by_address=targets.family is IPFamily.IPV4)
    try:
        with _socket() as sock:
            doomed = [entry for query in queries for entry in _dump(sock, targets.family, query)
                      if stale(entry.flow, targets)]
            deleted = _delete(sock, targets.family, doomed)
    except OSError as err:
        log.warning("conntrack cleanup failed (%s): stale UDP flows stay until they time out",
                    err.strerror or err)
        return 0
    for flow in deleted:
        log.info("deleted stale conntrack entry udp %s -> %s (not a serving endpoint)",
                 _host_port(flow.orig_dst, flow.orig_dport),
                 _host_port(flow.reply_src, flow.reply_sport))
    return len(deleted)


def list_flows(family: IPFamily, query: FlowQuery | None = None) -> list[Flow]:
    """The flows of ``family`` in this namespace's table (with ``query``, those it matches)."""
    with _socket() as sock:
        return [entry.flow for entry in _dump(sock, family, query)]


def insert_flows(family: IPFamily, entries: Iterable[NewEntry], timeout: int = 600) -> None:
    """Create entries in this namespace's table, many per message batch (the tests and the
    bench build tables of a given size with it)."""
    with _socket() as sock:
        batch: list[bytes] = []
        for new in entries:
            flow = new.flow
            orig = _tuple(family, flow.proto, src=new.client, dst=flow.orig_dst,
                          sport=new.client_port, dport=flow.orig_dport)
            reply = _tuple(family, flow.proto, src=flow.reply_src, dst=new.client,
                           sport=flow.reply_sport, dport=new.client_port)
            batch.append(_message(
                CT_NEW, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, len(batch), family,
                _attr(CTA_TUPLE_ORIG, orig, nested=True)
                + _attr(CTA_TUPLE_REPLY, reply, nested=True)
                # A created entry is confirmed already: a status without the bit is refused.
                + (_attr(CTA_STATUS, struct.pack("!I", IPS_SEEN_REPLY | IPS_CONFIRMED))
                   if new.replied else b"")
                + _attr(CTA_TIMEOUT, struct.pack("!I", timeout))))
            if len(batch) == BATCH:
                _acknowledged(sock, batch)
                batch = []
        _acknowledged(sock, batch)


def _socket() -> socket.socket:
    """A ctnetlink socket of the current network namespace (of the calling thread)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


def dump_request(family: IPFamily, query: FlowQuery | None) -> bytes:
    """The ctnetlink message asking for the flows of ``family`` that ``query`` names."""
    attrs = b""
    if query is not None:
        flags = FILTER_PROTO_NUM
        flags |= FILTER_IP_DST if query.address is not None else 0
        flags |= FILTER_PROTO_DST_PORT if query.port is not None else 0
        attrs = (_attr(CTA_TUPLE_ORIG, _tuple(family, query.proto, dst=query.address,
                                              dport=query.port), nested=True)
                 + _attr(CTA_FILTER, _attr(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", flags)),
                         nested=True))
        if query.dnat is not None:  # the status filter: Linux 5.15 and later
            status, mask = ((IPS_DST_NAT, IPS_DST_NAT) if query.dnat
                            else (0, IPS_DST_NAT | IPS_SEEN_REPLY))
            attrs += (_attr(CTA_STATUS, struct.pack("!I", status))
                      + _attr(CTA_STATUS_MASK, struct.pack("!I", mask)))
    return _message(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, family, attrs)


def _dump(sock: socket.socket, family: IPFamily, query: FlowQuery | None) -> Iterator[_Entry]:
    sock.send(dump_request(family, query))
    while True:
        data = sock.recv(RECV_SIZE)
        for kind, start, end in _messages(data):
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                _error(data, start)
                continue
            entry = _parse_entry(data, start + _NFGEN.size, end)
            if entry is not None:
                yield entry


def _delete(sock: socket.socket, family: IPFamily, entries: list[_Entry]) -> list[Flow]:
    """Delete ``entries`` in batches; returns the flows deleted (not those already gone)."""
    deleted: list[Flow] = []
    for first in range(0, len(entries), BATCH):
        batch = entries[first:first + BATCH]
        codes = _acknowledged(sock, [
            _message(CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, family, entry.key)
            for seq, entry in enumerate(batch)], tolerated=(errno.ENOENT,))
        deleted += [entry.flow for entry, code in zip(batch, codes, strict=True) if not code]
    return deleted


def _acknowledged(sock: socket.socket, batch: list[bytes],
                  tolerated: tuple[int, ...] = ()) -> list[int]:
    """Send ``batch`` (sequence numbers from 0) and read each message's acknowledgement;
    returns the error code of each (0: done). An error other than ``tolerated`` is raised."""
    codes: dict[int, int] = {}
    sock.sendall(b"".join(batch))
    while len(codes) < len(batch):
        data = sock.recv(RECV_SIZE)
        for kind, start, _end in _messages(data):
            if kind == NLMSG_ERROR:
                codes[_NLMSG.unpack_from(data, start - _NLMSG.size)[3]] = _error(
                    data, start, tolerated)
    return [codes[seq] for seq in range(len(batch))]


def _error(data: bytes, start: int, tolerated: tuple[int, ...] = ()) -> int:
    """The code of an NLMSG_ERROR message (0: an acknowledgement); an error other than
    ``tolerated`` is raised."""
    code: int = -struct.unpack_from("=i", data, start)[0]
    if code and code not in tolerated:
        raise OSError(code, os.strerror(code))
    return code


# --- the wire format ------------------------------------------------------------------------

def _message(kind: int, flags: int, seq: int, family: IPFamily, attrs: bytes) -> bytes:
    body = _NFGEN.pack(AF[family], 0, 0) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body


def _attr(kind: int, payload: bytes, *, nested: bool = False) -> bytes:
    length = _NLA.size + len(payload)
    padding = b"\0" * (-length % 4)
    return _NLA.pack(length, kind | (NLA_F_NESTED if nested else 0)) + payload + padding


def _tuple(family: IPFamily, proto: int, *, src: str | None = None, dst: str | None = None,
           sport: int | None = None, dport: int | None = None) -> bytes:
    src_attr, dst_attr = IP_ATTRS[family]
    ips = b"".join(_attr(kind, socket.inet_pton(AF[family], address))
                   for kind, address in ((src_attr, src), (dst_attr, dst)) if address)
    ports = b"".join(_attr(kind, _PORT.pack(port)) for kind, port in (
        (CTA_PROTO_SRC_PORT, sport), (CTA_PROTO_DST_PORT, dport)) if port is not None)
    return (_attr(CTA_TUPLE_IP, ips, nested=True) if ips else b"") + _attr(
        CTA_TUPLE_PROTO, _attr(CTA_PROTO_NUM, bytes([proto])) + ports, nested=True)


def _messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, end) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind = _NLMSG.unpack_from(data, offset)[:2]
        if length < _NLMSG.size:
            return
        yield kind, offset + _NLMSG.size, offset + length
        offset += (length + 3) & ~3


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, end) of each attribute between ``start`` and ``end``."""
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < _NLA.size:
            return
        yield kind & NLA_TYPE_MASK, start + _NLA.size, start + length
        start += (length + 3) & ~3


def _parse_entry(data: bytes, start: int, end: int) -> _Entry | None:
    # The kernel sends the original tuple first and the reply tuple second (ctnetlink_fill_info);
    # the rest of the entry is read only if it is to be deleted (_Entry.key).
    tuples = []
    pos = start
    for kind in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
        if pos + _NLA.size > end:
            return None
        length, found = _NLA.unpack_from(data, pos)
        if found & NLA_TYPE_MASK != kind or length < _NLA.size:
            return None
        tuples.append(_parse_tuple(data, pos + _NLA.size, pos + length))
        pos += (length + 3) & ~3
    (_, orig_dst, proto, _, dport), (reply_src, _, _, sport, _) = tuples
    if orig_dst is None or reply_src is None:
        return None
    return _Entry(Flow(proto, orig_dst, dport, reply_src, sport), data[start:end])


# A TCP or UDP tuple without a zone, as the kernel lays it out: the nested headers (length and
# type) and the values at fixed places. Read in one unpack, it costs a fifth of the general walk.
_FIXED_BY_SIZE = {
    layout.size: (layout, family, shape) for layout, family, shape in (
        (struct.Struct("=HHHH4sHH4sHHHHB3xHHH2xHHH2x"), socket.AF_INET,
         (20, 1, 8, 1, 8, 2, 28, 2, 5, 1, 6, 2, 6, 3)),
        (struct.Struct("=HHHH16sHH16sHHHHB3xHHH2xHHH2x"), socket.AF_INET6,
         (44, 1, 20, 3, 20, 4, 28, 2, 5, 1, 6, 2, 6, 3)))}


def _parse_tuple(data: bytes, start: int, end: int
                 ) -> tuple[str | None, str | None, int, int, int]:
    """(source, destination, protocol, source port, destination port) of a CTA_TUPLE_*."""
    fixed = _FIXED_BY_SIZE.get(end - start)
    if fixed is not None:
        layout, family, shape = fixed
        (ip_len, ip_kind, src_len, src_kind, src, dst_len, dst_kind, dst, proto_len,
         proto_kind, num_len, num_kind, proto, sport_len, sport_kind, sport, dport_len,
         dport_kind, dport) = layout.unpack_from(data, start)
        if (ip_len, ip_kind & NLA_TYPE_MASK, src_len, src_kind, dst_len, dst_kind, proto_len,
                proto_kind & NLA_TYPE_MASK, num_len, num_kind, sport_len, sport_kind,
                dport_len, dport_kind) == shape:
            return (socket.inet_ntop(family, src), socket.inet_ntop(family, dst), proto,
                    socket.ntohs(sport), socket.ntohs(dport))
    return _walk_tuple(data, start, end)


def _walk_tuple(data: bytes, start: int, end: int
                ) -> tuple[str | None, str | None, int, int, int]:
    src = dst = None
    proto = sport = dport = 0
    for kind, first, last in _attrs(data, start, end):
        if kind == CTA_TUPLE_IP:
            for ip_kind, a, b in _attrs(data, first, last):
                address = socket.inet_ntop(socket.AF_INET if b - a == 4 else socket.AF_INET6,
                                           data[a:b])
                if ip_kind & 1:  # CTA_IP_V4_SRC = 1, CTA_IP_V6_SRC = 3
                    src = address
                else:
                    dst = address
        elif kind == CTA_TUPLE_PROTO:
            for proto_kind, a, _b in _attrs(data, first, last):
                if proto_kind == CTA_PROTO_NUM:
                    proto = data[a]
                elif proto_kind == CTA_PROTO_SRC_PORT:
                    sport = _PORT.unpack_from(data, a)[0]
                elif proto_kind == CTA_PROTO_DST_PORT:
                    dport = _PORT.unpack_from(data, a)[0]
    return src, dst, proto, sport, dport


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
