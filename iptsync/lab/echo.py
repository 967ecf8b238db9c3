"""Who-am-I echo server and client for the lab, runnable as ``python -m iptsync.lab.echo``.

Data-plane tests need to know, for each request, *which* backend answered and *which source
address* the backend saw (to check DNAT, SNAT/masquerade and session affinity). So the server
answers every TCP connection and every UDP datagram with one line ``NAME CLIENTIP:CLIENTPORT``
(``NAME [CLIENTIP]:CLIENTPORT`` for IPv6), and the client prints one JSON object per request,
classifying failures the way the rules produce them: an ICMP or ICMPv6 port-unreachable
(iptables ``REJECT``) is ``"refused"`` for TCP and UDP (the UDP socket is connected so
``ECONNREFUSED`` surfaces) and a silent ``DROP`` is ``"timeout"``.

Both IP families: the server listens on every ``--bind`` address (``0.0.0.0`` and ``::`` in a
dual-stack lab, the IPv6 socket IPv6-only so IPv4 clients keep their plain address), and the
client picks the family from the address it is sent to (``--to [fd00::1]:80``).

Only the standard library is used and no name is ever resolved (IP addresses only), so it
starts fast and behaves the same inside an isolated namespace without DNS.

Usage::

    python -m iptsync.lab.echo serve --name NAME [--tcp PORT ...] [--udp PORT ...] [--bind IP ...]
    python -m iptsync.lab.echo ask --proto tcp|udp --to IP:PORT|[IP]:PORT [--count N]
        [--timeout S] [--src-ip IP] [--src-port PORT] [--interval S]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

READY_PREFIX = "READY"
"""First word of the line ``serve`` prints once every socket is bound and listening."""

DEFAULT_PORT = 8080
TCP_READ_TIMEOUT = 0.3
"""How long the server waits for a request line before answering anyway."""

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; missing from some Pythons
_PKTINFO = struct.Struct("@i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)  # Linux values
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_PKTINFO6 = struct.Struct("@16si")  # struct in6_pktinfo: addr, ifindex
_MAX_REQUEST = 4096


def join_host_port(ip: str, port: int) -> str:
    """``IP:PORT``, or ``[IP]:PORT`` for an IPv6 address (as iptsync prints endpoints)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_host_port(text: str) -> tuple[str, str]:
    """``IP:PORT`` or ``[IP]:PORT`` -> (IP, PORT) as text; ``("", "")`` when there is no port."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return "", ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def reply_line(name: str, peer: tuple[str, int]) -> bytes:
    """The server's answer: ``NAME IP:PORT`` (``NAME [IP]:PORT`` for IPv6) of the peer as the
    server sees it, newline-ended."""
    return f"{name} {join_host_port(peer[0], peer[1])}\n".encode()


# --------------------------------------------------------------------------- server


def _handle_tcp(conn: socket.socket, peer: tuple[str, int], name: str) -> None:
    try:
        conn.settimeout(TCP_READ_TIMEOUT)
        data = b""
        try:
            while b"\n" not in data and len(data) < _MAX_REQUEST:
                chunk = conn.recv(_MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        conn.settimeout(2.0)
        conn.sendall(reply_line(name, peer))
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


def _serve_tcp(sock: socket.socket, name: str) -> None:
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            time.sleep(0.01)  # e.g. EMFILE: back off instead of spinning
            continue
        threading.Thread(
            target=_handle_tcp, args=(conn, (peer[0], peer[1]), name), daemon=True
        ).start()


def _serve_udp(sock: socket.socket, name: str) -> None:
    space = socket.CMSG_SPACE(max(_PKTINFO.size, _PKTINFO6.size))
    while True:
        try:
            _data, ancdata, _flags, peer = sock.recvmsg(_MAX_REQUEST, space)
        except OSError:
            time.sleep(0.01)
            continue
        # Answer from the address the datagram was sent to (matters when the namespace has
        # several addresses, e.g. a load-balancer IP on a node's lo), like a real UDP service.
        cmsgs: list[tuple[int, int, bytes]] = []
        for level, kind, payload in ancdata:
            if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(payload) >= _PKTINFO.size:
                _ifindex, _spec_dst, dst = _PKTINFO.unpack(payload[: _PKTINFO.size])
                if not ipaddress.IPv4Address(dst).is_multicast:
                    cmsgs = [(socket.IPPROTO_IP, _IP_PKTINFO, _PKTINFO.pack(0, dst, bytes(4)))]
            elif (level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO
                  and len(payload) >= _PKTINFO6.size):
                dst6, _ifindex = _PKTINFO6.unpack(payload[: _PKTINFO6.size])
                if not ipaddress.IPv6Address(dst6).is_multicast:
                    cmsgs = [(socket.IPPROTO_IPV6, _IPV6_PKTINFO, _PKTINFO6.pack(dst6, 0))]
        with contextlib.suppress(OSError):
            sock.sendmsg([reply_line(name, (peer[0], peer[1]))], cmsgs, 0, peer)


def _watch_parent(parent: int) -> None:
    """Exit when the starting process dies, so a killed test run leaves no server behind."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def _listening(kind: socket.SocketKind, bind: str, port: int) -> socket.socket:
    """A socket bound to ``bind:port``; an IPv6 one takes IPv6 only (IPv4 has its own)."""
    family = _family(bind)
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_DGRAM:
            s.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
    elif kind == socket.SOCK_DGRAM:
        s.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
    s.bind((bind, port))
    if kind == socket.SOCK_STREAM:
        s.listen(256)
    return s


def serve(
    name: str, tcp_ports: Sequence[int], udp_ports: Sequence[int],
    binds: Sequence[str] = ("0.0.0.0",),
) -> None:
    """Bind all sockets (each port on each of ``binds``), print the ready line, then answer
    requests until killed."""
    sockets: list[tuple[str, socket.socket]] = []
    for bind in binds:
        sockets += [("tcp", _listening(socket.SOCK_STREAM, bind, port)) for port in tcp_ports]
        sockets += [("udp", _listening(socket.SOCK_DGRAM, bind, port)) for port in udp_ports]
    for proto, s in sockets:
        target = _serve_tcp if proto == "tcp" else _serve_udp
        threading.Thread(target=target, args=(s, name), daemon=True).start()
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    tcp = ",".join(str(p) for p in tcp_ports) or "-"
    udp = ",".join(str(p) for p in udp_ports) or "-"
    sys.stdout.write(f"{READY_PREFIX} {name} tcp={tcp} udp={udp}\n")
    sys.stdout.flush()
    threading.Event().wait()


# --------------------------------------------------------------------------- client


def classify_error(exc: OSError) -> str:
    """Map a socket error to the client's error word: refused, timeout, unreachable, reset, ..."""
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "refused"
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return "timeout"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if isinstance(exc, ConnectionResetError) or exc.errno == errno.ECONNRESET:
        return "reset"
    if exc.errno is not None and exc.errno in errno.errorcode:
        return errno.errorcode[exc.errno].lower()
    return str(exc) or type(exc).__name__


def parse_reply(data: bytes) -> dict[str, Any]:
    """Turn the server's line into the JSON result object (``ok`` false if it is malformed)."""
    text = data.decode(errors="replace").strip()
    if not text:
        return {"ok": False, "error": "empty"}
    parts = text.split()
    if len(parts) != 2:
        return {"ok": False, "error": f"bad-reply: {text[:80]}"}
    host, port = split_host_port(parts[1])
    if not host or not port.isdigit():
        return {"ok": False, "error": f"bad-reply: {text[:80]}"}
    return {"ok": True, "server": parts[0], "seen_as": join_host_port(host, int(port))}


def _bind_source(sock: socket.socket, src_ip: str | None, src_port: int | None) -> None:
    if src_ip is None and src_port is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wildcard = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
    sock.bind((src_ip or wildcard, src_port or 0))


def ask_tcp(
    ip: str, port: int, timeout: float, src_ip: str | None = None, src_port: int | None = None
) -> dict[str, Any]:
    """One request over a new TCP connection; returns the JSON result object."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        _bind_source(sock, src_ip, src_port)
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.sendall(b"hello\n")
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(remaining)
            chunk = sock.recv(_MAX_REQUEST)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        return {"ok": False, "error": classify_error(exc)}
    finally:
        sock.close()
    return parse_reply(data)


def ask_udp(
    ip: str, port: int, timeout: float, src_ip: str | None = None, src_port: int | None = None
) -> dict[str, Any]:
    """One request as a datagram from a new, connected UDP socket; returns the result object."""
    sock = socket.socket(_family(ip), socket.SOCK_DGRAM)
    try:
        _bind_source(sock, src_ip, src_port)
        sock.settimeout(timeout)
        sock.connect((ip, port))  # connected: an ICMP port-unreachable becomes ECONNREFUSED
        sock.send(b"hello\n")
        data = sock.recv(_MAX_REQUEST)
    except OSError as exc:
        return {"ok": False, "error": classify_error(exc)}
    finally:
        sock.close()
    return parse_reply(data)


def ask(
    proto: str,
    ip: str,
    port: int,
    *,
    count: int,
    timeout: float,
    src_ip: str | None = None,
    src_port: int | None = None,
    interval: float = 0.0,
) -> None:
    """Make ``count`` independent requests and print one JSON line for each."""
    once = ask_tcp if proto == "tcp" else ask_udp
    for i in range(count):
        if i and interval > 0:
            time.sleep(interval)
        result = once(ip, port, timeout, src_ip, src_port)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------- command line


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IP address: {text}") from exc


def _endpoint(text: str) -> tuple[str, int]:
    host, port = split_host_port(text)
    if not port:
        raise argparse.ArgumentTypeError(f"expected IP:PORT or [IP]:PORT, got {text!r}")
    return _ip(host), _port(port)


def build_parser() -> argparse.ArgumentParser:
    """The ``serve`` / ``ask`` command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m iptsync.lab.echo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="answer TCP/UDP requests with 'NAME CLIENTIP:PORT'")
    srv.add_argument("--name", required=True)
    srv.add_argument("--tcp", type=_port, action="append", default=[], metavar="PORT")
    srv.add_argument("--udp", type=_port, action="append", default=[], metavar="PORT")
    srv.add_argument("--bind", type=_ip, action="append", default=[], metavar="IP",
                     help="address to listen on, repeatable (default 0.0.0.0)")
    cli = sub.add_parser("ask", help="send requests, print one JSON line per request")
    cli.add_argument("--proto", choices=("tcp", "udp"), required=True)
    cli.add_argument("--to", type=_endpoint, required=True, metavar="IP:PORT|[IP]:PORT")
    cli.add_argument("--count", type=int, default=1)
    cli.add_argument("--timeout", type=float, default=1.0)
    cli.add_argument("--src-ip", type=_ip, default=None)
    cli.add_argument("--src-port", type=_port, default=None)
    cli.add_argument("--interval", type=float, default=0.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m iptsync.lab.echo``."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        tcp: list[int] = args.tcp
        udp: list[int] = args.udp
        if not tcp and not udp:
            tcp, udp = [DEFAULT_PORT], [DEFAULT_PORT]
        try:
            serve(args.name, tcp, udp, args.bind or ["0.0.0.0"])
        except KeyboardInterrupt:
            return 0
        return 0
    ip, port = args.to
    ask(
        args.proto,
        ip,
        port,
        count=max(args.count, 0),
        timeout=args.timeout,
        src_ip=args.src_ip,
        src_port=args.src_port,
        interval=args.interval,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
