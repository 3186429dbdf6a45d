"""Load: a short soak with aborts and resets leaves nothing behind; bursts of connects queue."""

from __future__ import annotations

import select
import socket
import time

from benchmarks.soak import Plan, soak
from tests.conftest import RunningProxy


async def test_short_soak_leaks_nothing_and_counts_everything() -> None:
    """50 clients for 4 s: no leaked fds or tasks, exact bodies, and every request counted."""
    # Two seconds of warm-up leave memory short of its working size: a wider margin.
    report = await soak(Plan(clients=50, seconds=4, warm_up=2, rss_margin_mb=50))
    print("\n".join(report.lines()))
    assert report.problems() == []
    outcomes = report.tally.outcomes
    # Every kind of fault was exercised, not only clean traffic.
    for kind in (
        "abandoned download aborted",
        "abandoned upload aborted",
        "abandoned tunnel aborted",
        "reset before headers status 502",
        "reset mid-body visibly incomplete",
        "download ok",
        "upload ok",
        "tunnel ok",
    ):
        assert outcomes[kind] > 0, kind


def handshakes_completed(address: tuple[str, int], count: int) -> int:
    """Open ``count`` connections without waiting for them; how many the kernel completed."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.setblocking(False)
            sock.connect_ex(address)
        poller = select.poll()  # not select(): the suite's process may hold fds past 1024
        for sock in sockets:
            poller.register(sock, select.POLLOUT)
        done: set[int] = set()
        deadline = time.monotonic() + 1.0
        while len(done) < count and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                done.add(fd)
                poller.unregister(fd)
        return len(done)
    finally:
        for sock in sockets:
            sock.close()


async def test_a_burst_of_connections_waits_in_the_backlog(proxy: RunningProxy) -> None:
    """Hundreds of connections opened while the proxy is busy are all queued, none dropped."""
    assert proxy.server.proxy_address is not None
    address = ("127.0.0.1", proxy.port)
    # Called without an await, so the event loop accepts nothing while this runs.
    assert handshakes_completed(address, 600) == 600  # aiohttp's default backlog: 129
