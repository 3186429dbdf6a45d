"""CONNECT tunnel throughput: MB/s through the proxy's tunnel vs straight to the same TCP sink.

The sink (benchmarks/sink.py) and the proxy each run in their own process; the client
uses blocking sockets in this one. Each figure is the median of ``runs`` transfers of
``size`` bytes, timed from the first byte sent to the last byte confirmed (for an upload,
the sink's byte count; for a download, the EOF after the last byte). Loopback only.

The plain bytes are not TLS, so the proxy's TLS reader stops at the first byte. The "in
TLS records" rows carry the same bytes framed as TLS 1.2 (a ClientHello and a ServerHello
record, then 16 KiB application-data records, no encryption), so the reader walks every
record header of the transfer: its whole cost, with the TLS crypto left out.

``python -m benchmarks.tunnel [--size-mib N] [--runs N] [--loop uvloop|asyncio]``
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
from collections.abc import Callable
from time import perf_counter

from benchmarks.processes import proxy_command, ready_process
from benchmarks.sink import APPLICATION_DATA, FRAMED_BLOCK, SERVER_HELLO, record, records

MIB = 1 << 20
Address = tuple[str, int]


# A TLS 1.2 ClientHello (RFC 5246 §7.4.1.2): no session id, one suite, no compression, and
# ALPN (RFC 7301) offering http/1.1, so that the proxy reads the exchanges as for HTTPS.
_HELLO_BODY = (
    b"\x03\x03"
    + bytes(32)
    + b"\x00"
    + b"\x00\x02\xc0\x2f"
    + b"\x01\x00"
    + b"\x00\x0f"  # extensions: 15 bytes
    + b"\x00\x10\x00\x0b\x00\x09\x08http/1.1"
)
CLIENT_HELLO = record(0x16, b"\x01" + len(_HELLO_BODY).to_bytes(3, "big") + _HELLO_BODY)


def _open(sink: Address, proxy: Address | None, framed: bool) -> socket.socket:
    """A connection to the sink, straight or through ``CONNECT`` at ``proxy``; ``framed``:
    after a ClientHello record and the sink's ServerHello record."""
    sock = socket.create_connection(sink if proxy is None else proxy)
    if proxy is not None:
        _connect(sock, sink)
    if framed:
        sock.sendall(CLIENT_HELLO)
        _recv_exactly(sock, len(SERVER_HELLO))
    return sock


def _connect(sock: socket.socket, sink: Address) -> None:
    authority = f"{sink[0]}:{sink[1]}"
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"proxy closed during CONNECT: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"CONNECT refused: {head.splitlines()[0]!r}")
    # The sink says nothing until asked, so no tunnel bytes came with the head.


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RuntimeError("connection closed early")
        data += chunk
    return data


def _upload(sock: socket.socket, size: int, framed: bool) -> float:
    """Seconds to send ``size`` bytes and have the sink confirm them all."""
    block = FRAMED_BLOCK if framed else bytes(MIB)
    whole, rest = divmod(size, MIB)
    tail = records(bytes(rest)) if framed else bytes(rest)
    started = perf_counter()
    sock.sendall(record(APPLICATION_DATA, b"U") if framed else b"U")
    for _ in range(whole):
        sock.sendall(block)
    sock.sendall(tail)
    sock.shutdown(socket.SHUT_WR)
    answer = _recv_exactly(sock, 13 if framed else 8)
    elapsed = perf_counter() - started
    count = int.from_bytes(answer[-8:], "big")
    expected = whole * len(block) + len(tail)
    if count != expected:
        raise RuntimeError(f"sink received {count} of {expected} bytes")
    return elapsed


def _download(sock: socket.socket, size: int, framed: bool) -> float:
    """Seconds to receive ``size`` bytes (framed: their records) from the sink, up to its EOF."""
    buffer = bytearray(MIB)
    received = 0
    started = perf_counter()
    command = b"D" + size.to_bytes(8, "big")
    sock.sendall(record(APPLICATION_DATA, command) if framed else command)
    while count := sock.recv_into(buffer):
        received += count
    elapsed = perf_counter() - started
    whole, rest = divmod(size, MIB)
    expected = whole * len(FRAMED_BLOCK) + len(records(bytes(rest))) if framed else size
    if received != expected:
        raise RuntimeError(f"received {received} of {expected} bytes")
    return elapsed


def _median_mb_s(
    transfer: Callable[[socket.socket, int, bool], float],
    sink: Address,
    proxy: Address | None,
    size: int,
    runs: int,
    framed: bool,
) -> float:
    rates = []
    for _ in range(runs):
        with _open(sink, proxy, framed) as sock:
            rates.append(size / transfer(sock, size, framed) / 1e6)
    return statistics.median(rates)


def tunnel_throughput(
    size: int = 100 * MIB, runs: int = 3, loop: str = "uvloop"
) -> dict[str, float]:
    """MB/s (10^6 payload bytes/s) each way, straight to the sink and through a CONNECT
    tunnel, as plain bytes and in TLS records."""
    with ready_process([sys.executable, "-m", "benchmarks.sink"]) as (_, sink_line):
        sink = ("127.0.0.1", int(sink_line))
        command = proxy_command(
            "--admin-listen", "off", "--event-loop", loop, "--connect-ports", str(sink[1])
        )
        with ready_process(command) as (_, listening):
            host, _, port = json.loads(listening)["proxy"].removeprefix("http://").rpartition(":")
            proxy = (host, int(port))
            figures: dict[str, float] = {}
            for framed, framing in ((False, ""), (True, " in TLS records")):
                for direction, transfer in (("upload", _upload), ("download", _download)):
                    name = direction + framing
                    figures[f"{name}, direct"] = _median_mb_s(
                        transfer, sink, None, size, runs, framed
                    )
                    figures[f"{name}, through the tunnel"] = _median_mb_s(
                        transfer, sink, proxy, size, runs, framed
                    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=100, help="bytes per transfer, in MiB")
    parser.add_argument("--runs", type=int, default=3, help="transfers per figure (median)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    figures = tunnel_throughput(args.size_mib * MIB, args.runs, args.loop)
    print(f"CONNECT tunnel throughput, {args.size_mib} MiB x {args.runs}, proxy on {args.loop}")
    for key, value in figures.items():
        print(f"  {key:<50}{value:>10.1f} MB/s")


if __name__ == "__main__":
    main()
