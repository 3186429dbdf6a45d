"""Upstream and client failures: the status, Proxy-Status, counter and log line of each."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from benchmarks.resets import reset
from tests.conftest import LogCapture, Origin, RawOrigin, RunningProxy, Script, read_head
from tests.dns import DnsServer, start_dns, stop_dns
from tests.test_forwarding import curl, raw_exchange

StartRaw = Callable[[Any], Awaitable[RawOrigin]]


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get(proxy: RunningProxy, url: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, proxy=proxy.url) as resp,
    ):
        return resp.status, resp.headers.get("Proxy-Status", ""), await resp.text()


async def expect_failure(
    proxy: RunningProxy, logs: LogCapture, url: str, status: int, error: str
) -> str:
    """GET url through the proxy; check status, Proxy-Status, counters and log; return the body."""
    code, proxy_status, body = await get(proxy, url)
    assert code == status
    assert proxy_status.startswith(f"tracing-proxy; error={error}")
    host = url.split("/")[2]
    assert proxy.sample("proxy_upstream_errors_total", host=host, error=error) == 1
    requests = proxy.sample(
        "proxy_upstream_requests_total", host=host, method="GET", code=str(status)
    )
    assert requests == 1
    (line,) = logs.events("access")
    assert (line["status"], line["error"], line["host"]) == (status, error, host)
    return body


async def serve_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on the connection with a small 200 and keep it open."""
    while True:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


def then_healthy(fault: Script, faulty: int = 1) -> Script:
    """``fault`` on the origin's first ``faulty`` connections; every later one is healthy."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        if state.connections <= faulty:
            await fault(reader, writer, state)
        else:
            await serve_ok(reader, writer)

    return script


async def expect_fresh_connection(
    proxy: RunningProxy, upstream: RawOrigin, accepted: int = 2
) -> None:
    """The next request to the origin succeeds on a new connection: the bad one was not pooled."""
    status, _, body = await get(proxy, upstream.url())
    assert (status, body) == (200, "ok")
    assert upstream.connections == accepted
    host = f"127.0.0.1:{upstream.port}"
    assert proxy.sample("proxy_upstream_connections_total", host=host, kind="new") == 2
    assert proxy.sample("proxy_upstream_connections_total", host=host, kind="reused") == 0


async def test_connection_refused(proxy: RunningProxy, logs: LogCapture) -> None:
    """A closed port answers 502 with Proxy-Status error=connection_refused."""
    port = closed_port()
    body = await expect_failure(proxy, logs, f"http://127.0.0.1:{port}/", 502, "connection_refused")
    assert "refused" in body


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    server = await start_dns({"slow.test": None, "app.test": "127.0.0.1"})
    try:
        yield server
    finally:
        stop_dns(server)


async def test_dns_failure(start_proxy: Any, dns: DnsServer, logs: LogCapture) -> None:
    """A name the DNS server does not know answers 502 dns_error."""
    proxy = await start_proxy(dns_servers=(dns.address,))
    await expect_failure(proxy, logs, "http://missing.test/", 502, "dns_error")
    assert "missing.test" in dns.queries


async def test_dns_timeout(start_proxy: Any, dns: DnsServer, logs: LogCapture) -> None:
    """A DNS server that never answers gives 504 dns_timeout."""
    proxy = await start_proxy(dns_servers=(dns.address,), dns_timeout=0.3)
    await expect_failure(proxy, logs, "http://slow.test/", 504, "dns_timeout")


async def test_names_from_the_configured_dns_server_are_forwarded(
    start_proxy: Any, dns: DnsServer, origin: Origin, logs: LogCapture
) -> None:
    """A name answered by --dns-servers is looked up there and the request is forwarded."""
    proxy = await start_proxy(dns_servers=(dns.address,))
    status, _, _ = await get(proxy, f"http://app.test:{origin.port}/echo")
    assert status == 200
    assert "app.test" in dns.queries
    assert proxy.sample("proxy_upstream_dns_seconds_count", host=f"app.test:{origin.port}") == 1


@pytest.fixture
def unanswered_port() -> Any:
    """A listener whose accept queue is full, so a further connect hangs in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    try:
        yield listener.getsockname()[1]
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout(start_proxy: Any, unanswered_port: int, logs: LogCapture) -> None:
    """A connection that is never accepted answers 504 connection_timeout."""
    proxy = await start_proxy(connect_timeout=0.3)
    await expect_failure(
        proxy, logs, f"http://127.0.0.1:{unanswered_port}/", 504, "connection_timeout"
    )


async def test_no_response_headers_in_time(
    start_proxy: Any, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """An upstream silent after the request gives 504 http_response_timeout and is not reused."""

    async def silent(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)
        await asyncio.sleep(5)

    upstream = await raw_origin(then_healthy(silent))
    proxy = await start_proxy(response_headers_timeout=0.3)
    await expect_failure(proxy, logs, upstream.url(), 504, "http_response_timeout")
    await expect_fresh_connection(proxy, upstream)


async def test_upstream_disconnect_before_response_headers(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """An upstream that closes after reading the request answers 502 connection_terminated."""

    async def hang_up(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)

    # aiohttp retries an idempotent request once on a new connection (RFC 9110 §9.2.2).
    upstream = await raw_origin(then_healthy(hang_up, faulty=2))
    await expect_failure(proxy, logs, upstream.url(), 502, "connection_terminated")
    await expect_fresh_connection(proxy, upstream, accepted=3)


async def test_upstream_reset_before_response_headers(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """An upstream that resets the connection after the request gives 502 connection_terminated."""

    async def rst(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)
        reset(writer.transport)

    upstream = await raw_origin(then_healthy(rst, faulty=2))  # the retry meets a reset too
    body = await expect_failure(proxy, logs, upstream.url(), 502, "connection_terminated")
    assert "closed the connection" in body
    await expect_fresh_connection(proxy, upstream, accepted=3)


async def test_upstream_sends_garbage_instead_of_a_response(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """An upstream that answers with non-HTTP bytes gives 502 http_protocol_error, not reused."""

    async def garbage(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    upstream = await raw_origin(then_healthy(garbage))
    await expect_failure(proxy, logs, upstream.url(), 502, "http_protocol_error")
    await expect_fresh_connection(proxy, upstream)


CUT_FRAMINGS = pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 100000\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n4000\r\n",
    ],
    ids=["content-length", "chunked"],
)


def cut_body(framing: bytes, *, rst: bool, upload: int = 0) -> Any:
    """An origin script that sends 16 KiB of a longer body, then closes (or resets).

    It first reads the request head and an ``upload``-byte body, recorded in ``received``.
    """

    async def cut(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)
        if upload:
            state.received.append(await reader.readexactly(upload))
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"x" * 0x4000)
        await writer.drain()
        if rst:
            await asyncio.sleep(0.1)  # the proxy relays the first part before the reset
            reset(writer.transport)

    return cut


@CUT_FRAMINGS
async def test_upstream_disconnect_before_response_complete(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture, framing: bytes
) -> None:
    """A body cut by the upstream reaches the client visibly incomplete, never clean."""
    upstream = await raw_origin(then_healthy(cut_body(framing, rst=False)))
    await expect_incomplete_body(proxy, upstream, logs)


@CUT_FRAMINGS
async def test_upstream_reset_before_response_complete(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture, framing: bytes
) -> None:
    """A body cut by an upstream RST reaches the client visibly incomplete, never clean."""
    upstream = await raw_origin(then_healthy(cut_body(framing, rst=True)))
    await expect_incomplete_body(proxy, upstream, logs)


async def expect_incomplete_body(
    proxy: RunningProxy, upstream: RawOrigin, logs: LogCapture
) -> None:
    """curl gets the 0x4000 bytes sent and an error; counted and logged; not pooled."""
    code, out, err = await curl("-x", proxy.url, upstream.url())
    assert code == 18, err  # curl: "Transferred a partial file"
    assert out == b"x" * 0x4000
    host = f"127.0.0.1:{upstream.port}"
    await logs.wait_for("access")
    assert (
        proxy.sample("proxy_upstream_errors_total", host=host, error="http_response_incomplete")
        == 1
    )
    assert proxy.sample("proxy_upstream_requests_total", host=host, method="GET", code="200") == 1
    (line,) = logs.events("access")
    assert (line["status"], line["error"]) == (200, "http_response_incomplete")
    assert line["bytes_out"] == 0x4000
    await expect_fresh_connection(proxy, upstream)


async def test_upstream_quiet_mid_body_hits_the_read_idle_timeout(
    start_proxy: Any, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """An upstream that stops sending mid-body is cut after the read-idle timeout, not reused."""

    async def stall(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(5)

    upstream = await raw_origin(then_healthy(stall))
    proxy = await start_proxy(read_idle_timeout=0.3)
    code, out, _ = await curl("-x", proxy.url, upstream.url())
    assert code == 18
    assert out == b"abc"
    (line,) = await logs.wait_for("access")
    assert (line["status"], line["error"]) == (200, "connection_read_timeout")
    host = f"127.0.0.1:{upstream.port}"
    assert (
        proxy.sample("proxy_upstream_errors_total", host=host, error="connection_read_timeout") == 1
    )
    await expect_fresh_connection(proxy, upstream)


async def test_client_disconnect_during_download(
    proxy: RunningProxy, origin: Origin, logs: LogCapture
) -> None:
    """A client that leaves mid-download is logged as 499 and the upstream connection dropped."""
    reader, writer = await proxy.connect()
    url = origin.url("/stream?size=50000000&delay_ms=5")
    writer.write(f"GET {url} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode())
    await asyncio.wait_for(reader.readexactly(100_000), 10)
    writer.transport.abort()
    (line,) = await logs.wait_for("access")
    assert (line["status"], line["error"]) == (499, "client_disconnected")
    host = origin.authority
    assert proxy.sample("proxy_upstream_errors_total", host=host, error="client_disconnected") == 1
    assert proxy.sample("proxy_upstream_requests_total", host=host, method="GET", code="499") == 1
    # The next request cannot have been given the abandoned connection.
    status, _, _ = await get(proxy, origin.url("/echo"))
    assert status == 200
    assert proxy.sample("proxy_upstream_connections_total", host=host, kind="new") == 2


async def test_client_disconnect_during_upload(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """A client that leaves mid-upload gets the upstream request aborted, never completed."""
    got_all = asyncio.Event()

    async def slurp(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)
        try:
            await reader.readexactly(1_000_000)
            got_all.set()
        finally:
            state.received.append(b"closed")

    upstream = await raw_origin(slurp)
    _, writer = await proxy.connect()
    writer.write(
        f"PUT {upstream.url()} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode()
        + b"y" * 1000
    )
    await writer.drain()
    for _ in range(100):
        if upstream.connections:
            break
        await asyncio.sleep(0.02)
    writer.transport.abort()
    await logs.wait_for("access")
    for _ in range(100):
        if upstream.received:
            break
        await asyncio.sleep(0.02)
    assert upstream.received == [b"closed"]  # the upstream saw the connection end early
    assert not got_all.is_set()
    (line,) = logs.events("access")
    assert (line["status"], line["error"]) == (499, "client_disconnected")
    host = f"127.0.0.1:{upstream.port}"
    assert proxy.sample("proxy_upstream_errors_total", host=host, error="client_disconnected") == 1
    assert proxy.sample("proxy_upstream_requests_total", host=host, method="PUT", code="499") == 1


async def test_client_disconnect_while_waiting_for_response_headers(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """A client that leaves before the upstream answers is logged and counted as 499."""
    answered = asyncio.Event()

    async def late(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        answered.set()
        await asyncio.sleep(1)

    upstream = await raw_origin(late)
    _, writer = await proxy.connect()
    writer.write(f"GET {upstream.url()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    await asyncio.wait_for(answered.wait(), 5)
    (line,) = await logs.wait_for("access")
    assert (line["status"], line["error"]) == (499, "client_disconnected")
    host = f"127.0.0.1:{upstream.port}"
    assert proxy.sample("proxy_upstream_errors_total", host=host, error="client_disconnected") == 1
    assert proxy.sample("proxy_upstream_requests_total", host=host, method="GET", code="499") == 1


async def test_error_responses_carry_request_id_and_traceparent(proxy: RunningProxy) -> None:
    """A proxy-generated 502 still carries the request id and traceparent."""
    request = (
        f"GET http://127.0.0.1:{closed_port()}/ HTTP/1.1\r\nHost: x\r\n"
        "X-Request-ID: abc-123\r\nConnection: close\r\n\r\n"
    ).encode()
    status, received = await raw_exchange(proxy, request)
    assert status == b"HTTP/1.1 502 Bad Gateway"
    assert b"\r\nX-Request-ID: abc-123\r\n" in received
    assert b"\r\ntraceparent: 00-" in received


async def test_a_slow_failing_lookup_is_timed_in_the_dns_phase(
    start_proxy: Any, logs: LogCapture
) -> None:
    """A resolver that answers NXDOMAIN after 200 ms shows that time as dns, not only in total."""
    slow = await start_dns({}, delay=0.2)
    try:
        proxy = await start_proxy(dns_servers=(slow.address,))
        await expect_failure(proxy, logs, "http://gone.test/", 502, "dns_error")
    finally:
        stop_dns(slow)
    (line,) = logs.events("access")
    assert line["dns_ms"] >= 200
    assert line["connect_ms"] is None
    assert proxy.sample("proxy_upstream_dns_seconds_count", host="gone.test") == 1
    dns_sum = proxy.sample("proxy_upstream_dns_seconds_sum", host="gone.test")
    assert dns_sum is not None
    assert dns_sum >= 0.2


async def test_a_dns_timeout_is_timed_in_the_dns_phase(
    start_proxy: Any, dns: DnsServer, logs: LogCapture
) -> None:
    """A lookup given up after --dns-timeout is observed with its time to failure."""
    proxy = await start_proxy(dns_servers=(dns.address,), dns_timeout=0.3)
    await expect_failure(proxy, logs, "http://slow.test/", 504, "dns_timeout")
    (line,) = logs.events("access")
    assert line["dns_ms"] >= 300
    assert proxy.sample("proxy_upstream_dns_seconds_count", host="slow.test") == 1


async def test_a_refused_dial_is_timed_in_the_connect_phase(
    proxy: RunningProxy, logs: LogCapture
) -> None:
    """A refused connection is observed in the connect histogram and logged as connect_ms."""
    host = f"127.0.0.1:{closed_port()}"
    await expect_failure(proxy, logs, f"http://{host}/", 502, "connection_refused")
    (line,) = logs.events("access")
    assert line["connect_ms"] is not None
    assert line["dns_ms"] is None  # an IP literal needs no lookup
    assert proxy.sample("proxy_upstream_connect_seconds_count", host=host) == 1


async def test_a_connect_timeout_is_timed_in_the_connect_phase(
    start_proxy: Any, unanswered_port: int, logs: LogCapture
) -> None:
    """A dial given up after --connect-timeout is observed with its time to failure."""
    proxy = await start_proxy(connect_timeout=0.3)
    host = f"127.0.0.1:{unanswered_port}"
    await expect_failure(proxy, logs, f"http://{host}/", 504, "connection_timeout")
    (line,) = logs.events("access")
    assert line["connect_ms"] >= 300
    assert proxy.sample("proxy_upstream_connect_seconds_count", host=host) == 1


async def post_raw(proxy: RunningProxy, url: str, size: int, read: int | None = None) -> bytes:
    """POST ``size`` bytes; read until the proxy closes, or abort after ``read`` bytes."""
    reader, writer = await proxy.connect()
    writer.write(
        f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + b"u" * size
    )
    if read is not None:
        received = await asyncio.wait_for(reader.readexactly(read), 10)
        writer.transport.abort()
        return received
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return received


async def expect_bytes_in(proxy: RunningProxy, logs: LogCapture, host: str, size: int) -> None:
    """The access line and proxy_upstream_bytes_total{direction="sent"} both count ``size``."""
    (line,) = await logs.wait_for("access")
    assert line["bytes_in"] == size
    assert proxy.sample("proxy_upstream_bytes_total", host=host, direction="sent") == size


async def test_upload_bytes_are_counted_when_the_upstream_resets_mid_response(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """A 5,000-byte POST whose response is cut by a reset still counts its 5,000 bytes in."""
    framing = b"Content-Length: 100000\r\n\r\n"
    upstream = await raw_origin(cut_body(framing, rst=True, upload=5000))
    answer = await post_raw(proxy, upstream.url(), 5000)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert upstream.received == [b"u" * 5000]
    host = f"127.0.0.1:{upstream.port}"
    await expect_bytes_in(proxy, logs, host, 5000)
    (line,) = logs.events("access")
    assert line["error"] == "http_response_incomplete"


async def test_upload_bytes_are_counted_when_the_client_leaves_mid_download(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """A 7,000-byte POST whose client leaves during the download still counts 7,000 bytes in."""

    async def endless(reader: Any, writer: Any, state: RawOrigin) -> None:
        await read_head(reader)
        await reader.readexactly(7000)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(2000):  # bounded: 128 MB at most, and the proxy stops reading first
            writer.write(b"d" * 65536)
            await writer.drain()

    upstream = await raw_origin(endless)
    await post_raw(proxy, upstream.url(), 7000, read=100_000)
    host = f"127.0.0.1:{upstream.port}"
    await expect_bytes_in(proxy, logs, host, 7000)
    (line,) = logs.events("access")
    assert (line["status"], line["error"]) == (499, "client_disconnected")
