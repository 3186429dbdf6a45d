"""CONNECT tunnels through the real listener: clients, the byte relay, failures, metrics, drain."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
import trustme
from aiohttp import web

from benchmarks.processes import stop
from proxy import config
from proxy.config import SettingError
from proxy.rules import errors
from proxy.wire.tunnelling import TunnelTargetError, tunnel_target
from tests.conftest import LogCapture, Origin, RawOrigin, RunningProxy, pattern, read_head
from tests.dns import start_dns, stop_dns
from tests.test_cli import start_cli
from tests.test_failures import closed_port
from tests.test_forwarding import curl

StartRaw = Callable[[Any], Awaitable[RawOrigin]]
StartProxy = Callable[..., Awaitable[RunningProxy]]
MIB = 1 << 20


# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Tunnel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    head: bytes

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    def field(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def open_tunnel(proxy_url: str, authority: str, early: bytes = b"") -> Tunnel:
    """Send ``CONNECT authority`` (plus ``early`` bytes in the same write); read the answer head."""
    host, _, port = proxy_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + early
    writer.write(request)
    head = await asyncio.wait_for(read_head(reader), 10)
    return Tunnel(reader, writer, head)


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
) -> None:
    while data := await reader.read(65536):
        state.received.append(data)
        writer.write(data)
        await writer.drain()


async def send_pattern(writer: asyncio.StreamWriter, size: int, seed: int) -> str:
    """Write ``size`` pattern bytes then a FIN; the sha256 of what was written."""
    block = pattern(MIB, seed)
    digest = hashlib.sha256()
    for _ in range(size // MIB):
        writer.write(block)
        digest.update(block)
        await writer.drain()
    writer.write_eof()
    return digest.hexdigest()


async def read_all(reader: asyncio.StreamReader, delay: float = 0.0) -> tuple[int, str]:
    """Everything up to EOF, after waiting ``delay`` s first: (length, sha256)."""
    await asyncio.sleep(delay)
    digest = hashlib.sha256()
    size = 0
    while chunk := await reader.read(MIB):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


# -- real clients over TLS ---------------------------------------------------------------------


@dataclass
class TlsOrigin:
    port: int
    ca_file: Path

    def url(self) -> str:
        return f"https://localhost:{self.port}/"


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello over TLS")


@pytest.fixture
async def tls_origin(tmp_path: Path) -> AsyncIterator[TlsOrigin]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    app = web.Application()
    app.router.add_get("/", _hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield TlsOrigin(runner.addresses[0][1], ca_file)
    finally:
        await runner.cleanup()


@pytest.fixture
def https_proxy_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[RunningProxy], None]:
    def point_at(proxy: RunningProxy) -> None:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        for name in ("https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)

    return point_at


async def assert_tls_tunnel_logged(logs: LogCapture, origin: TlsOrigin) -> None:
    (line,) = await logs.wait_for("tunnel")
    assert line["host"] == f"localhost:{origin.port}"
    assert line["target"] == f"localhost:{origin.port}"
    assert line["status"] == 200
    assert line["outcome"] == "closed"
    assert line["bytes_in"] > 0
    assert line["bytes_out"] > 0


async def test_curl_https_through_connect(
    start_proxy: StartProxy, tls_origin: TlsOrigin, logs: LogCapture
) -> None:
    """curl -x fetches an https URL through the tunnel and verifies the origin's certificate."""
    proxy = await start_proxy(connect_ports=(tls_origin.port,))
    code, out, err = await curl(
        "-x", proxy.url, "--cacert", str(tls_origin.ca_file), tls_origin.url()
    )
    assert code == 0, err
    assert out == b"hello over TLS"
    await assert_tls_tunnel_logged(logs, tls_origin)


def fetch_with_requests(origin: TlsOrigin) -> str:
    # Only the text leaves: the response holds the pooled connection (and so the tunnel).
    with requests.Session() as session:
        return session.get(origin.url(), verify=str(origin.ca_file), timeout=10).text


def fetch_with_httpx(origin: TlsOrigin) -> str:
    context = ssl.create_default_context(cafile=str(origin.ca_file))
    with httpx.Client(verify=context) as client:
        return client.get(origin.url()).text


@pytest.mark.parametrize(
    "fetch", [fetch_with_requests, fetch_with_httpx], ids=["requests", "httpx"]
)
async def test_client_honours_https_proxy_environment(
    start_proxy: StartProxy,
    tls_origin: TlsOrigin,
    logs: LogCapture,
    https_proxy_env: Callable[[RunningProxy], None],
    fetch: Callable[[TlsOrigin], str],
) -> None:
    """The client honours HTTPS_PROXY and fetches the https URL through a tunnel."""
    proxy = await start_proxy(connect_ports=(tls_origin.port,))
    https_proxy_env(proxy)
    assert await asyncio.to_thread(fetch, tls_origin) == "hello over TLS"
    await assert_tls_tunnel_logged(logs, tls_origin)


# -- the byte relay ----------------------------------------------------------------------------


async def test_echo_including_bytes_sent_with_the_connect_header(
    start_proxy: StartProxy, raw_origin: StartRaw
) -> None:
    """Bytes in the same write as the CONNECT header reach the origin first, then the rest."""
    origin = await raw_origin(echo)
    proxy = await start_proxy(connect_ports=(origin.port,))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}", early=b"EARLY;")
    assert tunnel.head.startswith(b"HTTP/1.1 200 Connection Established\r\n")
    # RFC 9110 §9.3.6: no body framing on a 2xx answer to CONNECT.
    assert tunnel.field("Content-Length") is None
    assert tunnel.field("Transfer-Encoding") is None
    assert tunnel.field("X-Request-ID")
    assert await asyncio.wait_for(tunnel.reader.readexactly(6), 5) == b"EARLY;"
    tunnel.writer.write(b"LATER;")
    assert await asyncio.wait_for(tunnel.reader.readexactly(6), 5) == b"LATER;"
    assert b"".join(origin.received) == b"EARLY;LATER;"
    tunnel.writer.close()


async def test_upstream_that_speaks_first_is_heard(
    start_proxy: StartProxy, raw_origin: StartRaw
) -> None:
    """A banner the origin sends as soon as it accepts reaches the client, after the 200."""

    async def banner_then_echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        writer.write(b"220 ready\r\n")
        await echo(reader, writer, state)

    origin = await raw_origin(banner_then_echo)
    proxy = await start_proxy(connect_ports=(origin.port,))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    assert tunnel.status == 200
    assert await asyncio.wait_for(tunnel.reader.readexactly(11), 5) == b"220 ready\r\n"
    tunnel.writer.close()


async def test_client_half_close_then_the_answer_still_arrives(
    start_proxy: StartProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """After the client's FIN the origin sees EOF, and its answer still reaches the client."""

    async def answer_after_eof(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        question = await reader.read()  # until EOF
        writer.write(b"got " + question)
        await writer.drain()

    origin = await raw_origin(answer_after_eof)
    proxy = await start_proxy(connect_ports=(origin.port,))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    tunnel.writer.write(b"question")
    tunnel.writer.write_eof()
    assert await asyncio.wait_for(tunnel.reader.read(), 5) == b"got question"
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert (line["outcome"], line["closed_by"]) == ("closed", "client")
    assert (line["bytes_in"], line["bytes_out"]) == (8, 12)


async def test_upstream_reset_closes_the_client_promptly(
    start_proxy: StartProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """An RST from the origin closes the client's connection at once."""

    async def reset_after_hello(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    origin = await raw_origin(reset_after_hello)
    proxy = await start_proxy(connect_ports=(origin.port,))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    tunnel.writer.write(b"hello")
    try:
        rest = await asyncio.wait_for(tunnel.reader.read(), 3)
    except ConnectionResetError:
        rest = b""
    assert rest == b""
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert (line["outcome"], line["closed_by"], line["error"]) == (
        "reset",
        "upstream",
        "connection_reset",
    )
    assert proxy.sample("proxy_tunnels_total", host=f"127.0.0.1:{origin.port}", outcome="reset")


async def test_client_reset_closes_the_upstream_promptly(
    start_proxy: StartProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """An RST from the client closes the origin's connection at once."""
    upstream_closed = asyncio.Event()

    async def wait_for_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        state.received.append(await reader.readexactly(5))
        try:
            await reader.read()
        finally:
            upstream_closed.set()

    origin = await raw_origin(wait_for_close)
    proxy = await start_proxy(connect_ports=(origin.port,))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    tunnel.writer.write(b"hello")
    for _ in range(100):
        if origin.received:
            break
        await asyncio.sleep(0.02)
    tunnel.reset()
    await asyncio.wait_for(upstream_closed.wait(), 3)
    (line,) = await logs.wait_for("tunnel")
    assert (line["outcome"], line["closed_by"]) == ("reset", "client")


async def test_100_mib_each_way_byte_exact_with_bounded_memory(raw_origin: StartRaw) -> None:
    """100 MiB each way arrives intact through a proxy process whose peak RSS stays < 100 MB.

    Each reader starts a second late, so without back-pressure the proxy would buffer.
    """
    size = 100 * MIB
    origin_saw: list[tuple[int, str]] = []

    async def both_ways(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        sent, got = await asyncio.gather(send_pattern(writer, size, 2), read_all(reader, 1.0))
        origin_saw.append(got)
        state.received.append(sent.encode())

    origin = await raw_origin(both_ways)
    cli = await start_cli("--admin-listen", "off", "--connect-ports", str(origin.port))
    try:
        tunnel = await open_tunnel(cli.proxy, f"127.0.0.1:{origin.port}")
        assert tunnel.status == 200
        sent, got = await asyncio.wait_for(
            asyncio.gather(send_pattern(tunnel.writer, size, 1), read_all(tunnel.reader, 1.0)), 50
        )
        tunnel.writer.close()
        # The origin finishes its side once our close reaches it: wait (bounded) for that.
        for _ in range(500):
            if origin_saw and origin.received:
                break
            await asyncio.sleep(0.01)
        assert got == (size, origin.received[0].decode())
        assert origin_saw == [(size, sent)]
        peak_kb = peak_rss_kb(cli.process.pid)
        assert peak_kb * 1024 < 100_000_000, f"proxy peak RSS {peak_kb} kB"
    finally:
        await stop(cli.process, signal.SIGKILL)


# -- refusals and failures ---------------------------------------------------------------------


async def test_disallowed_port_gets_403_and_nothing_is_dialled(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """A port outside --connect-ports (default 443) is refused before any connection is made."""
    origin = await raw_origin(echo)
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}", early=b"\x16\x03\x01")
    assert tunnel.status == 403
    reason = f"CONNECT to port {origin.port} is not allowed (--connect-ports: 443)"
    assert tunnel.field("Proxy-Status") == (
        f'tracing-proxy; error=http_request_denied; details="{reason}"'
    )
    assert tunnel.field("Connection") == "close"
    body = await asyncio.wait_for(tunnel.reader.read(), 5)  # the body, then the close
    assert reason in body.decode()
    assert origin.connections == 0
    (line,) = logs.events("rejected")
    assert (line["status"], line["error"]) == (403, "http_request_denied")
    assert proxy.sample("proxy_denied_total", reason="connect_port") == 1


@pytest.mark.parametrize(
    "authority", ["example.test", "example.test:", "user@example.test:443", "127.1:443", "*"]
)
async def test_connect_without_host_and_port_gets_400(proxy: RunningProxy, authority: str) -> None:
    """A CONNECT target that is not host:port is answered 400 http_request_error, and counted."""
    tunnel = await open_tunnel(proxy.url, authority)
    assert tunnel.status == 400
    assert tunnel.field("Proxy-Status") == "tracing-proxy; error=http_request_error"
    tunnel.writer.close()
    assert proxy.sample("proxy_denied_total", reason="connect_target") == 1


async def test_refused_target_gets_502_with_proxy_status(
    start_proxy: StartProxy, logs: LogCapture
) -> None:
    """A closed port answers 502 connection_refused, counted as a failed tunnel."""
    port = closed_port()
    proxy = await start_proxy(connect_ports=(port,))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{port}")
    assert tunnel.status == 502
    proxy_status = tunnel.field("Proxy-Status") or ""
    assert proxy_status.startswith("tracing-proxy; error=connection_refused; details=")
    tunnel.writer.close()
    host = f"127.0.0.1:{port}"
    assert proxy.sample("proxy_tunnels_total", host=host, outcome="failed") == 1
    assert proxy.sample("proxy_upstream_errors_total", host=host, error="connection_refused") == 1
    assert proxy.sample("proxy_tunnels_open") == 0
    (line,) = await logs.wait_for("tunnel")
    assert (line["status"], line["outcome"], line["error"]) == (502, "failed", "connection_refused")
    assert line["closed_by"] is None
    assert line["connect_ms"] is not None  # the failed dial is timed
    assert proxy.sample("proxy_upstream_connect_seconds_count", host=host) == 1


async def test_unknown_name_gets_502_dns_error(start_proxy: StartProxy, logs: LogCapture) -> None:
    """A name the DNS server does not know answers 502 dns_error."""
    dns = await start_dns({})
    try:
        proxy = await start_proxy(dns_servers=(dns.address,))
        tunnel = await open_tunnel(proxy.url, "missing.test:443")
        assert tunnel.status == 502
        assert (tunnel.field("Proxy-Status") or "").startswith("tracing-proxy; error=dns_error")
        tunnel.writer.close()
    finally:
        stop_dns(dns)
    assert "missing.test" in dns.queries
    assert proxy.sample("proxy_upstream_errors_total", host="missing.test", error="dns_error") == 1


async def test_dns_timeout_gets_504(start_proxy: StartProxy, logs: LogCapture) -> None:
    """A DNS server that never answers gives 504 dns_timeout."""
    dns = await start_dns({"slow.test": None})
    try:
        proxy = await start_proxy(dns_servers=(dns.address,), dns_timeout=0.3)
        tunnel = await open_tunnel(proxy.url, "slow.test:443")
        assert tunnel.status == 504
        assert (tunnel.field("Proxy-Status") or "").startswith("tracing-proxy; error=dns_timeout")
        tunnel.writer.close()
    finally:
        stop_dns(dns)
    (line,) = await logs.wait_for("tunnel")
    assert (line["host"], line["outcome"], line["error"]) == ("slow.test", "failed", "dns_timeout")
    assert line["dns_ms"] >= 300  # the failed lookup is timed
    assert proxy.sample("proxy_upstream_dns_seconds_count", host="slow.test") == 1


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connection_refused"),
        (TimeoutError(), "connection_timeout"),
        (OSError(113, "No route to host"), "destination_unavailable"),
    ],
)
def test_dial_failures_map_to_proxy_status(exc: OSError, error: str) -> None:
    """Each way a tunnel's TCP connect fails has its own Proxy-Status error type."""
    assert errors.classify(exc, errors.DIAL).error == error


# -- metrics, log, timeouts, shutdown -----------------------------------------------------------


async def test_metrics_and_log_line_after_a_tunnel_closes(
    start_proxy: StartProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """Counters, bytes, connect and lifetime histograms and one log line describe the tunnel."""
    origin = await raw_origin(echo)
    proxy = await start_proxy(connect_ports=(origin.port,))
    host = f"127.0.0.1:{origin.port}"
    tunnel = await open_tunnel(proxy.url, host, early=b"ab")
    tunnel.writer.write(b"cde")
    assert await asyncio.wait_for(tunnel.reader.readexactly(5), 5) == b"abcde"
    assert proxy.sample("proxy_tunnels_open") == 1
    assert proxy.sample("proxy_requests_in_flight") == 1
    tunnel.writer.write_eof()
    assert await asyncio.wait_for(tunnel.reader.read(), 5) == b""
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")

    assert proxy.sample("proxy_tunnels_open") == 0
    assert proxy.sample("proxy_requests_in_flight") == 0
    assert proxy.sample("proxy_tunnels_total", host=host, outcome="closed") == 1
    assert proxy.sample("proxy_tunnel_bytes_total", host=host, direction="sent") == 5
    assert proxy.sample("proxy_tunnel_bytes_total", host=host, direction="received") == 5
    assert proxy.sample("proxy_upstream_connect_seconds_count", host=host) == 1
    assert proxy.sample("proxy_tunnel_seconds_count", host=host) == 1
    lifetime = proxy.sample("proxy_tunnel_seconds_sum", host=host)
    assert lifetime is not None
    assert lifetime > 0
    assert proxy.sample("proxy_upstream_dns_seconds_count", host=host) == 0  # an IP literal

    assert line["request_id"] == tunnel.field("X-Request-ID")
    assert line["client"] == "127.0.0.1"
    assert (line["host"], line["target"], line["status"]) == (host, host, 200)
    assert (line["outcome"], line["closed_by"], line["error"]) == ("closed", "client", None)
    assert (line["bytes_in"], line["bytes_out"]) == (5, 5)
    assert line["connect_ms"] > 0
    assert line["dns_ms"] is None
    assert line["duration_ms"] == pytest.approx(lifetime * 1000, abs=0.01)


async def test_tunnel_lookups_share_the_upstream_dns_cache(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """A forwarded request's lookup is reused by a tunnel to the same name: one miss, one hit."""
    dns = await start_dns({"app.test": "127.0.0.1"})
    try:
        proxy = await start_proxy(dns_servers=(dns.address,), connect_ports=(origin.port,))
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://app.test:{origin.port}/echo", proxy=proxy.url) as resp,
        ):
            assert resp.status == 200
        queries = len(dns.queries)
        tunnel = await open_tunnel(proxy.url, f"app.test:{origin.port}")
        assert tunnel.status == 200
        tunnel.writer.close()
        (line,) = await logs.wait_for("tunnel")
    finally:
        stop_dns(dns)
    assert len(dns.queries) == queries
    host = f"app.test:{origin.port}"
    assert proxy.sample("proxy_upstream_dns_cache_total", host=host, result="miss") == 1
    assert proxy.sample("proxy_upstream_dns_cache_total", host=host, result="hit") == 1
    assert proxy.sample("proxy_upstream_connect_seconds_count", host=host) == 2
    assert line["dns_ms"] is None  # served from the cache


async def test_tunnel_lookup_miss_is_timed(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """A tunnel's own lookup is a cache miss with a DNS duration in the histogram and the log."""
    dns = await start_dns({"app.test": "127.0.0.1"})
    try:
        proxy = await start_proxy(dns_servers=(dns.address,), connect_ports=(origin.port,))
        tunnel = await open_tunnel(proxy.url, f"app.test:{origin.port}")
        assert tunnel.status == 200
        tunnel.writer.close()
        (line,) = await logs.wait_for("tunnel")
    finally:
        stop_dns(dns)
    host = f"app.test:{origin.port}"
    assert proxy.sample("proxy_upstream_dns_cache_total", host=host, result="miss") == 1
    assert proxy.sample("proxy_upstream_dns_seconds_count", host=host) == 1
    assert line["dns_ms"] > 0


async def test_idle_tunnel_is_closed_and_counted(
    start_proxy: StartProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """A tunnel with no bytes either way for --tunnel-idle-timeout is closed and counted."""
    origin = await raw_origin(echo)
    proxy = await start_proxy(connect_ports=(origin.port,), tunnel_idle_timeout=0.3)
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    assert await asyncio.wait_for(tunnel.reader.read(), 5) == b""
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert (line["outcome"], line["closed_by"]) == ("idle_timeout", "idle_timeout")
    host = f"127.0.0.1:{origin.port}"
    assert proxy.sample("proxy_tunnels_total", host=host, outcome="idle_timeout") == 1


async def test_traffic_keeps_a_tunnel_from_idling_out(
    start_proxy: StartProxy, raw_origin: StartRaw
) -> None:
    """Bytes more often than the idle timeout keep the tunnel open past it."""
    origin = await raw_origin(echo)
    proxy = await start_proxy(connect_ports=(origin.port,), tunnel_idle_timeout=0.4)
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    for _ in range(6):  # 6 x 0.15 s = 0.9 s, more than twice the timeout
        await asyncio.sleep(0.15)
        tunnel.writer.write(b"x")
        assert await asyncio.wait_for(tunnel.reader.readexactly(1), 2) == b"x"
    tunnel.writer.close()


async def test_drain_keeps_an_open_tunnel_working(
    start_proxy: StartProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """During the grace period and the drain an open tunnel still relays both ways."""
    origin = await raw_origin(echo)
    proxy = await start_proxy(connect_ports=(origin.port,))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    drain = asyncio.create_task(proxy.server.drain(0.3, 10))
    for message in (b"in-grace", b"draining"):
        await asyncio.sleep(0.2)
        tunnel.writer.write(message)
        assert await asyncio.wait_for(tunnel.reader.readexactly(8), 5) == message
    assert proxy.server.lifecycle.refusing
    late = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    assert late.status == 503
    late.writer.close()
    assert not drain.done()
    tunnel.writer.write_eof()
    assert await asyncio.wait_for(tunnel.reader.read(), 5) == b""
    assert await asyncio.wait_for(drain, 5) is True
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert (line["outcome"], line["closed_by"]) == ("closed", "client")


async def test_tunnel_open_after_the_drain_is_closed_at_shutdown(
    start_proxy: StartProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """A tunnel still open when the drain times out is closed by shutdown and logged so."""
    origin = await raw_origin(echo)
    proxy = await start_proxy(connect_ports=(origin.port,))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{origin.port}")
    assert await proxy.server.drain(0, 0.1) is False
    await asyncio.wait_for(proxy.server.close(), 5)
    assert await asyncio.wait_for(tunnel.reader.read(), 5) == b""
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert (line["outcome"], line["closed_by"]) == ("shutdown", "shutdown")


# -- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "host", "port", "label"),
    [
        ("Example.COM:443", "example.com", 443, "example.com"),
        ("api.example.com:8443", "api.example.com", 8443, "api.example.com:8443"),
        ("127.0.0.1:443", "127.0.0.1", 443, "127.0.0.1"),
        ("[::1]:443", "::1", 443, "[::1]"),
        ("[::1]:8443", "::1", 8443, "[::1]:8443"),
    ],
)
def test_tunnel_target_and_label(authority: str, host: str, port: int, label: str) -> None:
    """host:port parses to the dialled host and port; the label leaves out :443 only."""
    target = tunnel_target(authority, (443, 8443))
    assert (target.host, target.port, target.label) == (host, port, label)


@pytest.mark.parametrize(
    "authority",
    [
        "example.com",
        "example.com:",
        ":443",
        "user@example.com:443",
        "example.com:443/path",
        "a..b:443",
        "127.1:443",
        "0177.0.0.1:443",
        "[::g]:443",
        "[::1]",
        "ex%41mple.com:443",
        "example.com:0",
        "example.com:99999",
        "*",
    ],
)
def test_tunnel_target_rejects_what_is_not_host_port(authority: str) -> None:
    """Anything but a plain host:port with a valid port is a 400."""
    with pytest.raises(TunnelTargetError) as caught:
        tunnel_target(authority, range(65536))
    assert caught.value.error.status == 400


def test_tunnel_target_port_outside_the_allowed_set_is_403() -> None:
    """A port that is not allowed is a 403 naming the port."""
    with pytest.raises(TunnelTargetError) as caught:
        tunnel_target("example.com:22", (443,))
    assert (caught.value.error.status, caught.value.error.error) == (403, "http_request_denied")
    assert "22" in caught.value.error.text


@pytest.mark.parametrize(
    ("text", "ports"), [("443", (443,)), ("8443, 443,443", (443, 8443)), ("", ())]
)
def test_connect_ports_parse(text: str, ports: tuple[int, ...]) -> None:
    """--connect-ports takes a comma list, sorted and without repeats."""
    assert config.parse_ports(text) == ports


@pytest.mark.parametrize("text", ["0", "65536", "https", "44 3", "\u00b2"])
def test_connect_ports_rejects_non_ports(text: str) -> None:
    """Anything but ports 1-65535 is a setting error."""
    with pytest.raises(SettingError):
        config.parse_ports(text)


def test_tunnel_settings_have_env_twins_and_defaults() -> None:
    """PROXY_CONNECT_PORTS and PROXY_TUNNEL_IDLE_TIMEOUT set the two tunnel settings."""
    assert (config.Settings().connect_ports, config.Settings().tunnel_idle_timeout) == (
        (443,),
        900.0,
    )
    settings = config.load(
        [], {"PROXY_CONNECT_PORTS": "443,563", "PROXY_TUNNEL_IDLE_TIMEOUT": "60"}
    )
    assert (settings.connect_ports, settings.tunnel_idle_timeout) == ((443, 563), 60.0)
