"""The timings are true: each phase shows up where it happens and nowhere else."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import trustme

from tests.conftest import LogCapture, Origin, RunningProxy
from tests.tls import TLSOrigin, delayed_handshake, server_context


def hist(proxy: RunningProxy, phase: str, host: str, suffix: str = "sum") -> float:
    value = proxy.sample(f"proxy_upstream_{phase}_seconds_{suffix}", host=host)
    assert value is not None, f"no {phase} series for {host}"
    return value


async def test_slow_headers_show_in_ttfb_only(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession, logs: LogCapture
) -> None:
    """An origin that holds its headers 200 ms gives ttfb near 200 ms and not the other phases."""
    async with client.get(origin.url("/slow-headers?ms=200"), proxy=proxy.url) as resp:
        assert await resp.text() == "slow"
    host = origin.authority
    assert 0.19 <= hist(proxy, "ttfb", host) < 1.0
    assert hist(proxy, "queue", host) < 0.05
    assert hist(proxy, "connect", host) < 0.05
    assert hist(proxy, "request", host) >= hist(proxy, "ttfb", host)
    assert hist(proxy, "dns", host, "count") == 0  # an IP literal needs no lookup
    (line,) = logs.events("access")
    assert line["ttfb_ms"] == round(hist(proxy, "ttfb", host) * 1000, 3)
    assert line["total_ms"] == round(hist(proxy, "request", host) * 1000, 3)
    assert line["dns_ms"] is None
    assert line["reused"] is False


async def test_request_behind_a_slow_one_shows_the_wait_in_queue(
    start_proxy: Any, origin: Origin, client: aiohttp.ClientSession, logs: LogCapture
) -> None:
    """With one connection per host, a request behind a 300 ms one waits about 300 ms in queue."""
    proxy = await start_proxy(pool_limit_per_host=1)

    async def fetch(path: str) -> None:
        async with client.get(origin.url(path), proxy=proxy.url) as resp:
            await resp.read()

    slow = asyncio.create_task(fetch("/slow-headers?ms=300"))
    await asyncio.sleep(0.05)  # let the slow one take the only connection first
    await fetch("/echo")
    await asyncio.wait_for(slow, 10)
    lines = {line["path"]: line for line in logs.events("access")}
    assert lines["/echo"]["queue_ms"] >= 200
    assert lines["/echo"]["ttfb_ms"] < 100
    assert lines["/echo"]["reused"] is True
    assert lines["/slow-headers"]["queue_ms"] < 50
    assert hist(proxy, "queue", origin.authority) >= 0.2


async def test_localhost_is_looked_up_once_then_served_from_cache(
    proxy: RunningProxy, origin: Origin, logs: LogCapture
) -> None:
    """The first request to localhost runs one DNS lookup; later ones are cache hits."""
    url = origin.url("/echo").replace("127.0.0.1", "localhost")
    for _ in range(3):
        # A new client connection each time, and a closed upstream connection, so every
        # request needs a new upstream connection and therefore an address.
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, proxy=proxy.url, headers={"Connection": "close"}) as resp,
        ):
            assert resp.status == 200
    host = f"localhost:{origin.port}"
    assert proxy.sample("proxy_upstream_dns_cache_total", host=host, result="miss") == 1
    assert proxy.sample("proxy_upstream_dns_seconds_count", host=host) == 1
    lines = logs.events("access")
    assert lines[0]["dns_ms"] is not None
    assert all(line["host"] == host for line in lines)


async def test_first_request_makes_a_connection_and_the_next_reuses_it(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession, logs: LogCapture
) -> None:
    """The first request opens a new upstream connection; the second reuses it from the pool."""
    for _ in range(2):
        async with client.get(origin.url("/echo"), proxy=proxy.url) as resp:
            await resp.read()
    host = origin.authority
    assert proxy.sample("proxy_upstream_connections_total", host=host, kind="new") == 1
    assert proxy.sample("proxy_upstream_connections_total", host=host, kind="reused") == 1
    assert hist(proxy, "connect", host, "count") == 1
    assert hist(proxy, "queue", host, "count") == 2
    first, second = logs.events("access")
    assert (first["reused"], second["reused"]) == (False, True)
    assert first["connect_ms"] is not None
    assert second["connect_ms"] is None


async def test_counters_and_bytes_follow_each_request(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession, logs: LogCapture
) -> None:
    """Requests are counted by method and code, and body bytes by direction."""
    async with client.post(origin.url("/echo"), data=b"x" * 1000, proxy=proxy.url) as resp:
        body = await resp.read()
    async with client.request("PURGE", origin.url("/echo"), proxy=proxy.url) as resp:
        await resp.read()
    host = origin.authority
    assert proxy.sample("proxy_upstream_requests_total", host=host, method="POST", code="200") == 1
    assert (
        proxy.sample("proxy_upstream_requests_total", host=host, method="_OTHER", code="200") == 1
    )
    assert proxy.sample("proxy_upstream_bytes_total", host=host, direction="sent") == 1000
    received = proxy.sample("proxy_upstream_bytes_total", host=host, direction="received")
    assert received is not None
    assert received > len(body)
    line = logs.events("access")[0]
    assert (line["bytes_in"], line["bytes_out"]) == (1000, len(body))
    assert proxy.sample("proxy_requests_in_flight") == 0


async def test_retry_after_a_handshake_then_close_gives_no_negative_connect(
    start_proxy: Any,
    tls_ca: trustme.CA,
    tls_ca_file: str,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """An origin that completes TLS then closes is dialled twice; every phase stays >= 0."""
    dials = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dials
        dials += 1
        writer.close()  # as an h2-only server does to an HTTP/1.1 client

    server = await asyncio.start_server(
        hang_up, "127.0.0.1", 0, ssl=server_context(tls_ca, "localhost")
    )
    target = TLSOrigin("127.0.0.1", server.sockets[0].getsockname()[1])
    proxy = await start_proxy(upstream_ca_file=tls_ca_file, upgrade_to_https=("localhost",))
    try:
        # Each handshake held 100 ms: far longer than a loopback TCP connect.
        async with delayed_handshake(target, 0.1) as port:
            url = f"http://localhost:{port}/"  # goes upstream as https
            async with client.get(url, proxy=proxy.url) as resp:
                assert resp.status == 502
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
    assert dials == 2  # aiohttp retried the idempotent GET once on a fresh connection
    (line,) = logs.events("access")
    assert line["connect_ms"] >= 0
    assert line["tls_ms"] >= 200  # both handshakes: where the time went
    host = f"localhost:{port}"
    for phase in ("dns", "connect", "tls"):
        assert hist(proxy, phase, host, "count") == 1  # one request, counted once
        assert round(hist(proxy, phase, host) * 1000, 3) == line[f"{phase}_ms"] >= 0
