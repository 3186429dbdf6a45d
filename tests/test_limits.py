"""Limits on the proxy listener and the upstream pool: head deadline, connection cap, pool wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.config import SettingError, parse_positive_count
from tests.conftest import LogCapture, Origin, RawOrigin, RunningProxy
from tests.test_bad_input import OK_RESPONSE, record_and_answer, send_and_read, status_lines

StartProxy = Callable[..., Awaitable[RunningProxy]]

TIMEOUT_LINE = b"HTTP/1.0 408 Request Timeout"


async def read_to_close(reader: asyncio.StreamReader, wait: float = 5.0) -> bytes:
    """Everything the proxy sends until it closes; fails if it has not closed within ``wait``."""
    try:
        return await asyncio.wait_for(reader.read(-1), wait)
    except ConnectionResetError:
        return b""


async def until(condition: Callable[[], bool], wait: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms, at most ``wait`` seconds."""
    for _ in range(int(wait / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# -- the request head deadline (slowloris) -----------------------------------------------------


async def test_partial_head_gets_408_and_a_close(start_proxy: StartProxy, origin: Origin) -> None:
    """A head that stops before its blank line is answered 408 at the deadline, then closed."""
    proxy = await start_proxy(request_header_timeout=0.3)
    reader, writer = await proxy.connect()
    writer.write(f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\n".encode())
    data = await read_to_close(reader)
    writer.close()
    assert status_lines(data) == [TIMEOUT_LINE]
    assert proxy.sample("proxy_request_header_timeouts_total") == 1


async def test_head_sent_one_byte_at_a_time_is_cut_off(start_proxy: StartProxy) -> None:
    """Trickling a head byte by byte does not keep the connection past the deadline."""
    proxy = await start_proxy(request_header_timeout=0.3)
    assert proxy.server.proxy_address is not None
    loop = asyncio.get_running_loop()
    received = bytearray()
    # Plain socket calls: a write failing after the close must not discard what was read.
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.setblocking(False)

        async def collect() -> None:
            with contextlib.suppress(ConnectionResetError):
                while chunk := await loop.sock_recv(sock, 65536):
                    received.extend(chunk)

        collector = asyncio.ensure_future(collect())
        head = b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"
        sent = 0
        for byte in head:  # at most len(head) steps of 20 ms
            if collector.done():
                break
            try:
                await loop.sock_sendall(sock, bytes([byte]))
            except ConnectionError:
                break
            sent += 1
            await asyncio.sleep(0.02)
        await asyncio.wait_for(collector, 5)
    assert sent < len(head)
    assert status_lines(bytes(received)) == [TIMEOUT_LINE]
    assert proxy.sample("proxy_request_header_timeouts_total") == 1


async def test_silent_connection_is_closed_at_the_deadline(start_proxy: StartProxy) -> None:
    """A connection that never sends a byte is answered 408 and closed at the deadline."""
    proxy = await start_proxy(request_header_timeout=0.3)
    reader, writer = await proxy.connect()
    data = await read_to_close(reader)
    writer.close()
    assert status_lines(data) == [TIMEOUT_LINE]
    assert proxy.sample("proxy_request_header_timeouts_total") == 1


async def test_keep_alive_idle_time_is_not_head_time(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """Idle time between keep-alive requests is not counted; the next head gets its own deadline."""
    proxy = await start_proxy(request_header_timeout=0.3)
    reader, writer = await proxy.connect()
    writer.write(f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), 5)
    await asyncio.sleep(0.8)  # idle well past the head deadline: still open
    writer.write(f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\n".encode())
    data = await read_to_close(reader)
    writer.close()
    assert status_lines(head) == [b"HTTP/1.1 200 OK"]
    assert status_lines(data) == [TIMEOUT_LINE]
    assert proxy.sample("proxy_request_header_timeouts_total") == 1


async def test_slow_body_is_not_cut_by_the_head_deadline(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """Once the head is complete, a body slower than the head deadline still goes through."""
    proxy = await start_proxy(request_header_timeout=0.3)
    reader, writer = await proxy.connect()
    writer.write(
        f"POST {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    for _ in range(10):  # 10 bytes over about a second
        writer.write(b"b")
        await writer.drain()
        await asyncio.sleep(0.1)
    data = await read_to_close(reader)
    writer.close()
    assert status_lines(data) == [b"HTTP/1.1 200 OK"]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["body_len"] == 10
    assert proxy.sample("proxy_request_header_timeouts_total") == 0


# -- the cap on client connections -------------------------------------------------------------


async def test_connections_over_the_cap_are_closed_and_counted(start_proxy: StartProxy) -> None:
    """Past --max-client-connections a new connection is closed at once; a freed slot is reused."""
    proxy = await start_proxy(max_client_connections=2)
    held = [await proxy.connect() for _ in range(2)]
    await until(lambda: proxy.sample("proxy_client_connections_open") == 2)
    reader, writer = await proxy.connect()
    assert await read_to_close(reader) == b""
    writer.close()
    assert proxy.sample("proxy_client_connections_rejected_total") == 1

    held[0][1].close()
    await until(lambda: proxy.sample("proxy_client_connections_open") == 1)
    data, _ = await send_and_read(
        proxy, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status_lines(data) == [b"HTTP/1.1 200 OK"]
    held[1][1].close()


# -- sizes: the settings move the limits -------------------------------------------------------


async def test_raised_limits_let_a_bigger_head_and_target_through(
    start_proxy: StartProxy, raw_origin: Callable[[Any], Awaitable[RawOrigin]]
) -> None:
    """An 80 KB head and a 9000-byte target pass once the limits are raised above them."""
    proxy = await start_proxy(max_request_header_size=200_000, max_request_target_length=20_000)

    async def record_big_head(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        data = b""
        for _ in range(100):  # readuntil() would stop at its 64 KiB buffer limit
            data += await reader.read(65536)
            if b"\r\n\r\n" in data:
                break
        state.received.append(data)
        writer.write(OK_RESPONSE)
        await writer.drain()

    origin = await raw_origin(record_big_head)
    fill = "".join(f"X-Fill-{i}: {'f' * 2000}\r\n" for i in range(40))
    target = origin.url("/p?") + "q" * 9000
    data, _ = await send_and_read(
        proxy, f"GET {target} HTTP/1.1\r\nHost: x\r\n{fill}Connection: close\r\n\r\n".encode()
    )
    assert status_lines(data) == [b"HTTP/1.1 200 OK"]
    assert b"q" * 9000 in origin.received[0]
    assert origin.received[0].count(b"X-Fill-") == 40


@pytest.mark.parametrize("complete", [True, False])
async def test_head_over_the_limit_is_431_complete_or_not(
    start_proxy: StartProxy, origin: Origin, complete: bool
) -> None:
    """Many small fields past the head limit get 431 at once, whether the head ended or not."""
    proxy = await start_proxy(max_request_header_size=1000)
    fields = "".join(f"X-Small-{i:02}: {'s' * 40}\r\n" for i in range(30))  # about 1.6 KB
    head = f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\n{fields}"
    # Not waiting for the head deadline (10 s): the close comes well within the read's 5 s.
    data, closed = await send_and_read(proxy, (head + ("\r\n" if complete else "")).encode())
    assert closed
    assert status_lines(data) == [b"HTTP/1.0 431 Request Header Fields Too Large"]
    assert proxy.sample("proxy_request_header_timeouts_total") == 0


def test_sizes_must_be_positive() -> None:
    """A size limit of 0 is a setting error, not 'unlimited'."""
    assert parse_positive_count("65536") == 65536
    with pytest.raises(SettingError):
        parse_positive_count("0")


# -- the upstream pool wait --------------------------------------------------------------------


@pytest.mark.parametrize("observe", [True, False])
async def test_full_pool_past_the_wait_limit_is_503_with_retry_after(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture, observe: bool
) -> None:
    """With the one pooled connection busy past --pool-wait-timeout, the next request gets 503."""
    proxy = await start_proxy(pool_limit_per_host=1, pool_wait_timeout=0.2, observe=observe)
    async with aiohttp.ClientSession() as session:

        async def get(path: str) -> tuple[int, Any]:
            async with session.get(origin.url(path), proxy=proxy.url) as resp:
                await resp.read()
                return resp.status, resp.headers

        busy = asyncio.ensure_future(get("/slow-headers?ms=1500"))
        await until(lambda: proxy.server.lifecycle.in_flight == 1)
        status, headers = await get("/echo")
        assert (await asyncio.wait_for(busy, 10))[0] == 200
    assert status == 503
    assert headers["Proxy-Status"].startswith("tracing-proxy; error=connection_limit_reached")
    assert headers["Retry-After"] == "1"
    if observe:
        errors = proxy.sample(
            "proxy_upstream_errors_total", host=origin.authority, error="connection_limit_reached"
        )
        assert errors == 1
        await until(lambda: len(logs.events("access")) == 2)
        refused = [line for line in logs.events("access") if line["status"] == 503]
        assert [line["error"] for line in refused] == ["connection_limit_reached"]


async def test_request_timed_out_waiting_for_the_pool_is_in_the_queue_histogram(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """The 503 after --pool-wait-timeout shows its whole wait in queue_ms and the histogram."""
    proxy = await start_proxy(pool_limit_per_host=1, pool_wait_timeout=0.2)
    async with aiohttp.ClientSession() as session:

        async def get(path: str) -> int:
            async with session.get(origin.url(path), proxy=proxy.url) as resp:
                await resp.read()
                return resp.status

        busy = asyncio.ensure_future(get("/slow-headers?ms=1500"))
        await until(lambda: proxy.server.lifecycle.in_flight == 1)
        assert await get("/echo") == 503
        assert await asyncio.wait_for(busy, 10) == 200
    await until(lambda: len(logs.events("access")) == 2)
    (refused,) = [line for line in logs.events("access") if line["status"] == 503]
    # The wait ends when the limit expires: never before it.
    assert refused["queue_ms"] is not None
    assert refused["queue_ms"] >= 199
    host = origin.authority
    assert proxy.sample("proxy_upstream_queue_seconds_count", host=host) == 2
    queue_sum = proxy.sample("proxy_upstream_queue_seconds_sum", host=host)
    assert queue_sum is not None
    assert queue_sum >= 0.199  # the refused wait is in the sum (the other one waited 0)


# -- Upgrade tokens the proxy does not take (RFC 9110 §7.8) ------------------------------------


async def test_request_pipelined_behind_upgrade_h2c_is_not_lost(
    proxy: RunningProxy, raw_origin: Callable[[Any], Awaitable[RawOrigin]]
) -> None:
    """Behind `Upgrade: h2c` the first answer says `Connection: close` and the connection ends."""
    upstream = await raw_origin(record_and_answer)
    first = (
        f"GET {upstream.url('/a')} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    second = f"GET {upstream.url('/b')} HTTP/1.1\r\nHost: x\r\n\r\n"
    data, closed = await send_and_read(proxy, (first + second).encode())
    assert status_lines(data) == [b"HTTP/1.1 200 OK"]
    assert b"\r\nConnection: close\r\n" in data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert closed
    assert len(upstream.received) == 1
    assert b"upgrade" not in upstream.received[0].lower()  # h2c is not passed on
