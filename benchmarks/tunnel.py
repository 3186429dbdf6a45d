"""CONNECT tunnel throughput: MB/s through the proxy's tunnel vs straight to the same TCP sink.

The sink (benchmarks/sink.py) and the proxy each run in their own process; the client
uses blocking sockets in this one. Each figure is the median of ``runs`` transfers of
``size`` bytes, timed from the first byte sent to the last byte confirmed (for an upload,
the sink's byte count; for a download, the EOF after the last byte). Loopback only.

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

MIB = 1 << 20
Address = tuple[str, int]


def _open(sink: Address, proxy: Address | None) -> socket.socket:
    """A connection to the sink, straight or through ``CONNECT`` at ``proxy``."""
    if proxy is None:
        return socket.create_connection(sink)
    sock = socket.create_connection(proxy)
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
    return sock  # the sink says nothing until asked, so no tunnel bytes came with the head


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RuntimeError("connection closed early")
        data += chunk
    return data


def _upload(sock: socket.socket, size: int) -> float:
    """Seconds to send ``size`` bytes and have the sink confirm them all."""
    block = bytes(MIB)
    whole, rest = divmod(size, MIB)
    started = perf_counter()
    sock.sendall(b"U")
    for _ in range(whole):
        sock.sendall(block)
    sock.sendall(block[:rest])
    sock.shutdown(socket.SHUT_WR)
    count = int.from_bytes(_recv_exactly(sock, 8), "big")
    elapsed = perf_counter() - started
    if count != size:
        raise RuntimeError(f"sink received {count} of {size} bytes")
    return elapsed


def _download(sock: socket.socket, size: int) -> float:
    """Seconds to receive ``size`` bytes from the sink, up to its EOF."""
    buffer = bytearray(MIB)
    received = 0
    started = perf_counter()
    sock.sendall(b"D" + size.to_bytes(8, "big"))
    while count := sock.recv_into(buffer):
        received += count
    elapsed = perf_counter() - started
    if received != size:
        raise RuntimeError(f"received {received} of {size} bytes")
    return elapsed


def _median_mb_s(
    transfer: Callable[[socket.socket, int], float],
    sink: Address,
    proxy: Address | None,
    size: int,
    runs: int,
) -> float:
    rates = []
    for _ in range(runs):
        with _open(sink, proxy) as sock:
            rates.append(size / transfer(sock, size) / 1e6)
    return statistics.median(rates)


def tunnel_throughput(
    size: int = 100 * MIB, runs: int = 3, loop: str = "uvloop"
) -> dict[str, float]:
    """MB/s (10^6 bytes/s) each way, straight to the sink and through a CONNECT tunnel."""
    with ready_process([sys.executable, "-m", "benchmarks.sink"]) as (_, sink_line):
        sink = ("127.0.0.1", int(sink_line))
        command = proxy_command(
            "--admin-listen", "off", "--event-loop", loop, "--connect-ports", str(sink[1])
        )
        with ready_process(command) as (_, listening):
            host, _, port = json.loads(listening)["proxy"].removeprefix("http://").rpartition(":")
            proxy = (host, int(port))
            figures: dict[str, float] = {}
            for direction, transfer in (("upload", _upload), ("download", _download)):
                figures[f"{direction}, direct"] = _median_mb_s(transfer, sink, None, size, runs)
                figures[f"{direction}, through the tunnel"] = _median_mb_s(
                    transfer, sink, proxy, size, runs
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
        print(f"  {key:<34}{value:>10.1f} MB/s")


if __name__ == "__main__":
    main()
