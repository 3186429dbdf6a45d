"""TLS interception and plain HTTP inside CONNECT, with real clients and real TLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import signal
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx
import pytest
import requests
import trustme
import websockets
import websockets.asyncio.client
import websockets.asyncio.server

from benchmarks.processes import STOP_WAIT, stop
from benchmarks.procfs import rss_mb
from proxy.app import STREAM_SERVERS
from proxy.rules.connect import (
    H2_PREFACE,
    ConnectMode,
    Opening,
    alpn_choice,
    alpn_offer,
    classify_opening,
    connect_mode,
)
from proxy.rules.hostpatterns import HostPatterns
from proxy.tls.certs import CA_DAYS, CertificateAuthority, write_ca
from proxy.tls.intercept import InterceptPolicy, StreamServer, failure_reason
from proxy.wire.tunnelling import tunnel_target
from tests.conftest import LogCapture, Origin, RunningProxy, pattern, read_head
from tests.test_cli import start_cli
from tests.test_forwarding import curl
from tests.test_limits import until
from tests.test_tunnelling import Tunnel, echo, open_tunnel
from tests.tls import TLSOrigin, server_context

StartProxy = Callable[..., Awaitable[RunningProxy]]
MIB = 1 << 20


@dataclass
class CAFiles:
    ca: CertificateAuthority
    cert: str
    key: str

    def client_context(self) -> ssl.SSLContext:
        """A client that trusts only our CA (the environment's bundles are ignored)."""
        return ssl.create_default_context(cafile=self.cert)


@pytest.fixture
def ca_files(tmp_path: Path) -> CAFiles:
    ca = CertificateAuthority.create()
    cert, key = write_ca(str(tmp_path / "ca"), ca)
    return CAFiles(ca, str(cert), str(key))


async def intercepting_proxy(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca_file: str, port: int, **changes: Any
) -> RunningProxy:
    """A proxy intercepting localhost on ``port`` (a --connect-ports port) with our CA, trusting
    the origins' CA; ``changes`` add settings or override these."""
    settings: dict[str, Any] = {
        "intercept": ("localhost",),
        "ca_cert": ca_files.cert,
        "ca_key": ca_files.key,
        "upstream_ca_file": tls_ca_file,
        "connect_ports": (port,),
    }
    return await start_proxy(**(settings | changes))


def intercept_flags(ca_files: CAFiles, tls_ca_file: str, port: int) -> tuple[str, ...]:
    """The same as ``intercepting_proxy``'s settings, as ``python -m proxy`` flags."""
    return (
        *("--intercept", "localhost", "--ca-cert", ca_files.cert, "--ca-key", ca_files.key),
        *("--upstream-ca-file", tls_ca_file, "--connect-ports", str(port)),
    )


@pytest.fixture
async def intercepting(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca_file: str, secure_origin: TLSOrigin
) -> RunningProxy:
    """A proxy intercepting localhost and 127.0.0.1 on the TLS origin's port."""
    return await intercepting_proxy(
        start_proxy,
        ca_files,
        tls_ca_file,
        secure_origin.port,
        intercept=("localhost", "127.0.0.1"),
    )


def access_lines(logs: LogCapture) -> list[dict[str, Any]]:
    return logs.events("access")


async def one_tunnel_intercepted(proxy: RunningProxy, origin: TLSOrigin) -> None:
    """Until the proxy has counted one CONNECT to the origin, intercepted (counted as the
    client closes it)."""
    host = f"localhost:{origin.port}"
    await until(lambda: proxy.sample("proxy_tunnels_total", host=host, outcome="intercepted") == 1)


# -- real clients through interception --------------------------------------------------------


async def test_curl_through_interception_is_a_forwarded_request(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """curl --cacert gets the origin's answer; the proxy logs and times it as a request."""
    url = f"https://localhost:{secure_origin.port}/echo/x?q=1"
    code, out, err = await curl("--cacert", ca_files.cert, "-x", intercepting.url, url, url)
    assert code == 0, err
    assert out.count(b'"target": "/echo/x?q=1"') == 2
    await until(lambda: len(access_lines(logs)) == 2)
    line = access_lines(logs)[0]
    assert (line["host"], line["path"], line["status"], line["scheme"]) == (
        f"localhost:{secure_origin.port}",
        "/echo/x",
        200,
        "https",
    )
    host = f"localhost:{secure_origin.port}"
    assert intercepting.sample("proxy_upstream_ttfb_seconds_count", host=host) == 2
    assert intercepting.sample("proxy_upstream_tls_seconds_count", host=host) == 1
    assert len(secure_origin.peers) == 1  # two requests, one pooled upstream connection

    assert intercepting.sample("proxy_tunnels_total", host=host, outcome="intercepted") == 1


def _requests_session(proxy: RunningProxy) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # this machine exports REQUESTS_CA_BUNDLE (tls-facts, Q2)
    session.proxies = {"https": proxy.url, "http": proxy.url}
    return session


async def test_requests_keeps_one_intercepted_connection_for_big_bodies(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """requests (verify=our CA): 5 MiB down and up byte-exact, four requests, one CONNECT."""
    base = f"https://localhost:{secure_origin.port}"
    body = pattern(5 * MIB, seed=3)

    def run() -> list[Any]:
        with _requests_session(intercepting) as session:
            small = session.get(f"{base}/echo", verify=ca_files.cert, timeout=30)
            down = session.get(
                f"{base}/stream?size={5 * MIB}&cl=1", verify=ca_files.cert, timeout=30
            )
            up = session.post(f"{base}/echo", data=body, verify=ca_files.cert, timeout=30)
            again = session.get(f"{base}/echo", verify=ca_files.cert, timeout=30)
            return [small.status_code, down.content, up.json(), again.status_code]

    small, down, up, again = await asyncio.to_thread(run)
    assert (small, again) == (200, 200)
    assert hashlib.sha256(down).digest() == hashlib.sha256(pattern(5 * MIB)).digest()
    assert (up["body_len"], up["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    await until(lambda: len(access_lines(logs)) == 4)
    assert [line["bytes_in"] for line in access_lines(logs)][2] == len(body)
    await one_tunnel_intercepted(intercepting, secure_origin)


async def test_httpx_through_interception(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin
) -> None:
    """httpx (verify=SSLContext) speaks HTTP/1.1 through it: 5 MiB both ways, keep-alive."""
    base = f"https://localhost:{secure_origin.port}"
    body = pattern(5 * MIB, seed=4)

    def run() -> tuple[str, bytes, dict[str, Any]]:
        with httpx.Client(
            proxy=intercepting.url, verify=ca_files.client_context(), trust_env=False
        ) as client:
            first = client.get(f"{base}/echo")
            down = client.get(f"{base}/stream?size={5 * MIB}")
            up = client.post(f"{base}/echo", content=body)
            return first.http_version, down.content, up.json()

    version, down, up = await asyncio.to_thread(run)
    assert version == "HTTP/1.1"
    assert down == pattern(5 * MIB)
    assert up["body_sha256"] == hashlib.sha256(body).hexdigest()
    await one_tunnel_intercepted(intercepting, secure_origin)


async def test_aiohttp_chunked_upload_through_interception(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin
) -> None:
    """An aiohttp client's chunked upload arrives chunked and byte-exact at the TLS origin."""
    body = pattern(MIB + 17, seed=5)

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(body), 100_000):
            yield body[offset : offset + 100_000]

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"https://localhost:{secure_origin.port}/echo",
            data=chunks(),
            proxy=intercepting.url,
            ssl=ca_files.client_context(),
        ) as response,
    ):
        echoed = await response.json()
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    fields = {name.lower(): value for name, value in echoed["headers"]}
    assert fields["transfer-encoding"] == "chunked"
    assert "traceparent" in fields  # the proxy's per-request view reached the origin
    assert "x-request-id" in fields


async def test_ip_literal_without_sni_gets_an_ip_leaf(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin
) -> None:
    """curl to https://127.0.0.1:PORT sends no SNI; the leaf names the IP and verifies."""
    url = f"https://127.0.0.1:{secure_origin.port}/echo"
    code, out, err = await curl("--cacert", ca_files.cert, "-x", intercepting.url, url, "-v")
    assert code == 0, err
    assert b"IP address" in err or b"127.0.0.1" in err
    assert json.loads(out)["target"] == "/echo"


# -- refusals and failures ---------------------------------------------------------------------


async def test_client_that_does_not_trust_the_ca_is_counted_then_spliced(
    intercepting: RunningProxy, tls_ca_file: str, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """A client trusting only the origin's CA fails once (unknown_ca), then gets a tunnel."""
    url = f"https://localhost:{secure_origin.port}/echo"
    host = f"localhost:{secure_origin.port}"
    code, _, err = await curl("--cacert", tls_ca_file, "-x", intercepting.url, url)
    assert code == 60, err  # curl: peer certificate cannot be authenticated
    await until(
        lambda: (
            intercepting.sample("proxy_intercept_failures_total", host=host, reason="unknown_ca")
            == 1
        )
    )
    (line,) = [t for t in logs.events("tunnel") if t["outcome"] == "tls_failed"]
    assert "UNKNOWN_CA" in line["details"]
    # The retry is spliced: the origin's own certificate reaches the client untouched.
    code, out, err = await curl("--cacert", tls_ca_file, "-x", intercepting.url, url)
    assert code == 0, err
    assert json.loads(out)["target"] == "/echo"
    await until(
        lambda: intercepting.sample("proxy_tunnels_total", host=host, outcome="closed") == 1
    )
    assert not access_lines(logs)  # nothing was decrypted


async def test_host_outside_intercept_stays_a_plain_tunnel(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    secure_origin: TLSOrigin,
    logs: LogCapture,
) -> None:
    """Only the listed hosts are intercepted: the others see the origin's certificate."""
    proxy = await start_proxy(
        intercept=("other.example",),
        ca_cert=ca_files.cert,
        ca_key=ca_files.key,
        connect_ports=(secure_origin.port,),
    )
    url = f"https://localhost:{secure_origin.port}/echo"
    code, out, err = await curl("--cacert", tls_ca_file, "-x", proxy.url, url)
    assert code == 0, err
    assert json.loads(out)["target"] == "/echo"
    assert not access_lines(logs)
    (line,) = await logs.wait_for("tunnel")
    assert line["outcome"] == "closed"


class MemoryTLS:
    """A TLS client driven by hand over an asyncio stream (to control what goes in each write)."""

    def __init__(self, context: ssl.SSLContext, name: str | None) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname=name)

    def client_hello(self) -> bytes:
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.do_handshake()
        return self.outgoing.read()

    async def finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                writer.write(self.outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 10)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.incoming.write(data)
                continue
            writer.write(self.outgoing.read())
            return

    async def request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
    ) -> bytes:
        """Send ``raw``; return one response with a Content-Length body."""
        self.obj.write(raw)
        writer.write(self.outgoing.read())
        answer = b""
        while not _complete(answer):
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            self.incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                while chunk := self.obj.read(65536):
                    answer += chunk
        return answer


def _complete(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    raise AssertionError("the test expects a Content-Length")


async def _exchange_in_tls(
    proxy: RunningProxy,
    ca_files: CAFiles,
    authority: str,
    writes: Callable[[bytes], list[bytes]] = lambda hello: [hello],
    in_connect: bool = False,
) -> bytes:
    """One GET on an intercepted stream, the ClientHello sent as ``writes`` cuts it; with
    ``in_connect`` the first piece goes in the CONNECT's own write."""
    tls = MemoryTLS(ca_files.client_context(), authority.rpartition(":")[0])
    pieces = writes(tls.client_hello())
    tunnel = await open_tunnel(proxy.url, authority, early=pieces.pop(0) if in_connect else b"")
    assert tunnel.status == 200
    for piece in pieces:
        tunnel.writer.write(piece)
        await asyncio.sleep(0.02)  # a read of its own for each
    await tls.finish(tunnel.reader, tunnel.writer)
    answer = await tls.request(tunnel.reader, tunnel.writer, _get(authority, "/echo", close=True))
    tunnel.writer.close()
    return answer


async def test_client_hello_in_the_connect_segment_does_not_hang(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin
) -> None:
    """CONNECT and the ClientHello in one write: the proxy still completes the handshake."""
    authority = f"localhost:{secure_origin.port}"
    answer = await _exchange_in_tls(intercepting, ca_files, authority, in_connect=True)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"target": "/echo"' in answer


async def test_no_sni_for_an_ip_literal_still_gets_the_ip_leaf(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin
) -> None:
    """Python sends no SNI for an IP; the certificate it verifies carries IP:127.0.0.1."""
    authority = f"127.0.0.1:{secure_origin.port}"
    tls = MemoryTLS(ca_files.client_context(), "127.0.0.1")
    tunnel = await open_tunnel(intercepting.url, authority)
    tunnel.writer.write(tls.client_hello())
    await tls.finish(tunnel.reader, tunnel.writer)
    peer = tls.obj.getpeercert()
    tunnel.writer.close()
    assert peer is not None
    assert peer["subjectAltName"] == (("IP Address", "127.0.0.1"),)


# -- plain HTTP inside CONNECT (2b) ------------------------------------------------------------


async def _exchange_in_tunnel(
    proxy: RunningProxy, authority: str, *requests_: bytes, early: bytes = b""
) -> bytes:
    tunnel = await open_tunnel(proxy.url, authority, early=early)
    assert tunnel.status == 200, tunnel.head
    for raw in requests_:
        tunnel.writer.write(raw)
    answer = await asyncio.wait_for(tunnel.reader.read(), 10)
    tunnel.writer.close()
    return answer


def _get(authority: str, path: str, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()


async def test_plain_http_inside_connect_is_served_per_request(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """Two keep-alive requests in a CONNECT to an HTTP port: two access lines, full view."""
    proxy = await start_proxy(connect_http_ports=(origin.port,))
    answer = await _exchange_in_tunnel(
        proxy,
        origin.authority,
        _get(origin.authority, "/echo/a"),
        _get(origin.authority, "/echo/b", close=True),
    )
    assert answer.count(b"HTTP/1.1 200") == 2
    assert b'"target": "/echo/a"' in answer
    assert b'"target": "/echo/b"' in answer
    assert b"traceparent" in answer
    await until(lambda: len(access_lines(logs)) == 2)
    assert [(line["path"], line["scheme"]) for line in access_lines(logs)] == [
        ("/echo/a", "http"),
        ("/echo/b", "http"),
    ]
    host = origin.authority
    assert proxy.sample("proxy_upstream_requests_total", host=host, method="GET", code="200") == 2
    (line,) = await logs.wait_for("tunnel")
    assert line["outcome"] == "http"


async def test_plain_http_pipelined_behind_the_connect(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """A request sent in the CONNECT's own segment is served too."""
    proxy = await start_proxy(connect_http_ports=(origin.port,))
    answer = await _exchange_in_tunnel(
        proxy, origin.authority, early=_get(origin.authority, "/echo/early", close=True)
    )
    assert b'"target": "/echo/early"' in answer


async def test_non_http_bytes_on_an_http_only_port_are_closed(
    start_proxy: StartProxy, raw_origin: Any, logs: LogCapture
) -> None:
    """Outside --connect-ports, a stream that is not HTTP is closed and nothing is dialled."""

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Any) -> None:
        await reader.read()

    target = await raw_origin(never)
    proxy = await start_proxy(connect_http_ports=(target.port,))
    for opening in (b"\x16\x03\x01\x00\x05hello", b"SSH-2.0-OpenSSH_9.2\r\n"):
        tunnel = await open_tunnel(proxy.url, f"127.0.0.1:{target.port}", early=opening)
        assert tunnel.status == 200
        assert await asyncio.wait_for(tunnel.reader.read(), 10) == b""
        tunnel.writer.close()
    assert target.connections == 0
    lines = await logs.wait_for("tunnel", 2)
    assert [line["outcome"] for line in lines] == ["refused", "refused"]


async def test_request_for_another_host_inside_connect_is_400(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """Absolute-form naming another target inside a CONNECT is refused, not forwarded."""
    proxy = await start_proxy(connect_http_ports=(origin.port,))
    raw = b"GET http://other.example/x HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"
    answer = await _exchange_in_tunnel(proxy, origin.authority, raw)
    assert answer.startswith(b"HTTP/1.1 400")
    assert not access_lines(logs)


async def test_denied_destination_is_refused_before_the_200(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """The destination rules run before the proxy answers a CONNECT it will read itself."""
    proxy = await start_proxy(connect_http_ports=(origin.port,), deny_destinations=("127.0.0.2",))
    tunnel = await open_tunnel(proxy.url, f"127.0.0.2:{origin.port}")
    assert tunnel.status == 403
    assert "destination_ip_prohibited" in (tunnel.field("Proxy-Status") or "")
    tunnel.writer.close()


# -- pure rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("intercepted", "port", "mode"),
    [
        (False, 443, ConnectMode.TUNNEL),
        (True, 443, ConnectMode.INSPECT),
        (False, 80, ConnectMode.HTTP_ONLY),
        (True, 80, ConnectMode.HTTP_ONLY),  # no TLS on an HTTP-only port
        (False, 22, ConnectMode.REFUSE),
        (True, 22, ConnectMode.REFUSE),
    ],
)
def test_connect_mode_table(intercepted: bool, port: int, mode: ConnectMode) -> None:
    """Defaults: 443 tunnels (or is intercepted), 80 carries plain HTTP, others are refused."""
    assert (
        connect_mode(intercepted=intercepted, port=port, connect_ports=(443,), http_ports=(80,))
        is mode
    )


@pytest.mark.parametrize(
    ("data", "opening"),
    [
        (b"", None),
        (b"\x16", None),
        (b"\x16\x03\x01\x02\x00\x01", Opening.TLS),
        (b"\x16\x02", Opening.OTHER),
        (b"GET / HTTP/1.1", None),
        (b"GET / HTTP/1.1\r\n", Opening.HTTP),
        (b"POST http://h/x HTTP/1.0\n", Opening.HTTP),
        (b"GET / HTTP/2.0\r\n", Opening.OTHER),
        (b"PRI * HTTP/2.0\r\n", None),  # the start of the h2c preface
        (H2_PREFACE, Opening.H2C),
        (H2_PREFACE + b"\x00\x00\x12\x04\x00", Opening.H2C),  # SETTINGS follows at once
        (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", Opening.OTHER),
        (b"PRI * HTTP/1.1\r\n", Opening.HTTP),  # PRI is a token like any method
        (b"GET  / HTTP/1.1\r\n", Opening.OTHER),
        (b"SSH-2.0-OpenSSH\r\n", Opening.OTHER),
        (b"\x00\x00\x00", Opening.OTHER),
        (b"GET /" + b"a" * 200, Opening.OTHER),  # past the limit without a line end
    ],
)
def test_classify_opening(data: bytes, opening: Opening | None) -> None:
    """A ClientHello record, an HTTP/1.x request line, the h2c preface, something else, or
    not yet known."""
    assert classify_opening(data, limit=100) is opening


@pytest.mark.parametrize(
    ("offered", "served", "offer", "choice"),
    [
        ((), ("http/1.1",), ("http/1.1",), "http/1.1"),  # no ALPN: HTTP/1.1
        (("h2", "http/1.1"), ("http/1.1",), ("http/1.1",), "http/1.1"),
        (("h2",), ("http/1.1",), ("http/1.1",), None),  # grpcio: nothing in common
        (("h2",), ("h2", "http/1.1", "h2c"), ("h2", "http/1.1"), "h2"),
        (("http/1.1", "h2"), ("h2", "http/1.1"), ("h2", "http/1.1"), "h2"),  # our order wins
        (("h2c",), ("h2c", "http/1.1"), ("http/1.1",), None),  # h2c is never TLS ALPN
        (("spdy/3",), ("http/1.1",), ("http/1.1",), None),
        ((), ("h2",), ("h2",), None),  # no ALPN, and no HTTP/1.1 served
    ],
)
def test_alpn_offer_and_choice(
    offered: tuple[str, ...], served: tuple[str, ...], offer: tuple[str, ...], choice: str | None
) -> None:
    """The server offers what it serves (h2c left out); the choice follows the server's order."""
    assert alpn_offer(served) == offer
    assert alpn_choice(offered, served) == choice


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"), "unknown_ca"),
        (ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] bad certificate"), "bad_certificate"),
        (ssl.SSLError(1, "[SSL: NO_SHARED_CIPHER] no shared cipher"), "tls_protocol_error"),
        (TimeoutError(), "timeout"),
        (ConnectionResetError(), "closed"),
    ],
)
def test_failure_reason(exc: BaseException, reason: str) -> None:
    """Alerts that mean 'your certificate' are told apart from other handshake failures."""
    assert failure_reason(exc) == reason


def test_splice_after_rejection_expires() -> None:
    """After a rejection the host is tunnelled for the splice period, then intercepted again."""
    now = [0.0]
    policy = InterceptPolicy(
        HostPatterns(["*.example"]),
        enabled=True,
        connect_ports=(443,),
        http_ports=(80,),
        splice_seconds=300,
        clock=lambda: now[0],
    )
    target = tunnel_target("api.example:443", (443,))
    assert policy.mode(target) is ConnectMode.INSPECT
    policy.rejected(target)
    assert policy.mode(target) is ConnectMode.TUNNEL
    assert policy.mode(tunnel_target("other.example:443", (443,))) is ConnectMode.INSPECT
    now[0] = 301
    assert policy.mode(target) is ConnectMode.INSPECT


# -- the CLI on uvloop: the ClientHello replay, and the drain -----------------------------------


@dataclass
class Child:
    proxy: str
    metrics: str
    process: asyncio.subprocess.Process
    lines: list[dict[str, Any]]  # its log so far, read as it comes (a full pipe would stall it)


@contextlib.asynccontextmanager
async def intercepting_cli(
    ca_files: CAFiles, tls_ca_file: str, origin: TLSOrigin, *extra: str
) -> AsyncIterator[Child]:
    """``python -m proxy`` (uvloop, the default loop) intercepting localhost."""
    running = await start_cli(*intercept_flags(ca_files, tls_ca_file, origin.port), *extra)
    child = Child(running.proxy, running.metrics, running.process, [])

    async def read_log() -> None:
        assert running.process.stdout is not None
        async for line in running.process.stdout:
            if not line.endswith(b"\n"):
                break  # the kill below cut the last line short (block-buffered pipe)
            child.lines.append(json.loads(line))

    reading = asyncio.ensure_future(read_log())
    try:
        yield child
    finally:
        await stop(running.process, signal.SIGKILL)
        await asyncio.wait_for(reading, STOP_WAIT)


async def test_client_hello_with_the_connect_on_uvloop(
    ca_files: CAFiles, tls_ca_file: str, secure_origin: TLSOrigin
) -> None:
    """The replay of an early ClientHello works on uvloop's TLS layer too."""
    async with intercepting_cli(ca_files, tls_ca_file, secure_origin) as running:
        authority = f"localhost:{secure_origin.port}"
        tls = MemoryTLS(ca_files.client_context(), "localhost")
        tunnel = await open_tunnel(running.proxy, authority, early=tls.client_hello())
        assert tunnel.status == 200
        await tls.finish(tunnel.reader, tunnel.writer)
        answer = await tls.request(
            tunnel.reader, tunnel.writer, _get(authority, "/echo/uvloop", close=True)
        )
        tunnel.writer.close()
    assert b'"target": "/echo/uvloop"' in answer


async def test_sigterm_lets_an_intercepted_request_finish(
    ca_files: CAFiles, tls_ca_file: str, secure_origin: TLSOrigin
) -> None:
    """SIGTERM: a slow request on an intercepted connection completes; an idle one is closed."""
    url = f"https://localhost:{secure_origin.port}"
    context = ca_files.client_context()
    async with (
        intercepting_cli(
            ca_files, tls_ca_file, secure_origin, "--shutdown-grace", "0", "--drain-timeout", "10"
        ) as running,
        aiohttp.ClientSession() as idle,
        aiohttp.ClientSession() as busy,
    ):
        async with idle.get(f"{url}/echo", proxy=running.proxy, ssl=context) as response:
            assert response.status == 200  # its intercepted connection now sits in the pool
        slow = asyncio.ensure_future(
            busy.get(f"{url}/slow-headers?ms=1500", proxy=running.proxy, ssl=context)
        )
        in_flight = "proxy_requests_in_flight 1.0"
        for _ in range(500):
            async with idle.get(running.metrics) as metrics:
                if in_flight in await metrics.text():
                    break
            await asyncio.sleep(0.01)
        running.process.send_signal(signal.SIGTERM)
        response = await asyncio.wait_for(slow, 10)
        assert response.status == 200
        assert await response.text() == "slow"
        response.release()
        assert await asyncio.wait_for(running.process.wait(), 20) == 0
    events = [line["event"] for line in running.lines]
    assert events.count("access") == 2
    assert events[-1] == "stopped"


IDLE_CONNECTIONS = 500


async def _open_intercepted(proxy_url: str, authority: str, context: ssl.SSLContext) -> Tunnel:
    """CONNECT, TLS with the minted leaf, one request answered; left open and idle."""
    tunnel = await open_tunnel(proxy_url, authority)
    assert tunnel.status == 200
    await tunnel.writer.start_tls(context, server_hostname="localhost")
    tunnel.writer.write(_get(authority, "/status/204"))
    head = await asyncio.wait_for(read_head(tunnel.reader), 30)
    assert head.startswith(b"HTTP/1.1 204")
    return tunnel


async def _metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url) as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_idle_intercepted_connections_count_once_against_the_limit(
    ca_files: CAFiles, tls_ca_file: str, secure_origin: TLSOrigin, loop: str
) -> None:
    """500 idle intercepted connections fill --max-client-connections 500 exactly; one more
    is turned away. The proxy's RSS with them open is reported (-s shows it)."""
    authority = f"localhost:{secure_origin.port}"
    context = ca_files.client_context()
    tunnels: list[Tunnel] = []
    async with (
        intercepting_cli(
            ca_files,
            tls_ca_file,
            secure_origin,
            "--event-loop",
            loop,
            "--max-client-connections",
            str(IDLE_CONNECTIONS),
        ) as running,
        aiohttp.ClientSession() as session,
    ):
        pid = running.process.pid
        tunnels.append(await _open_intercepted(running.proxy, authority, context))
        baseline = rss_mb(pid)
        try:
            for _ in range(0, IDLE_CONNECTIONS - 1, 50):
                batch = min(50, IDLE_CONNECTIONS - len(tunnels))
                tunnels += await asyncio.gather(
                    *(_open_intercepted(running.proxy, authority, context) for _ in range(batch))
                )
            opened = await _metric(session, running.metrics, "proxy_client_connections_open")
            loaded = rss_mb(pid)
            host, _, port = running.proxy.removeprefix("http://").rpartition(":")
            reader, extra = await asyncio.open_connection(host, int(port))
            turned_away = await asyncio.wait_for(reader.read(), 10)
            extra.close()
            rejected = await _metric(
                session, running.metrics, "proxy_client_connections_rejected_total"
            )
        finally:
            for tunnel in tunnels:
                tunnel.writer.close()
    print(
        f"\n{loop}: {len(tunnels)} idle intercepted connections, proxy RSS "
        f"{baseline:.1f} -> {loaded:.1f} MiB, "
        f"{(loaded - baseline) * 1024 / (len(tunnels) - 1):.0f} KiB per connection"
    )
    assert opened == IDLE_CONNECTIONS
    assert turned_away == b""
    assert rejected == 1


# -- the listener's limits hold inside a CONNECT ------------------------------------------------


async def test_head_too_large_inside_connect_gets_431(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """--max-request-header-size applies to the requests inside a CONNECT too."""
    proxy = await start_proxy(connect_http_ports=(origin.port,), max_request_header_size=2048)
    raw = _get(origin.authority, "/echo").replace(
        b"\r\n\r\n", b"\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
    )
    answer = await _exchange_in_tunnel(proxy, origin.authority, raw)
    assert answer.startswith(b"HTTP/1.1 431") or answer.startswith(b"HTTP/1.0 431")


async def test_slow_head_inside_an_intercepted_connection_gets_408(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    secure_origin: TLSOrigin,
) -> None:
    """--request-header-timeout runs on an intercepted stream: half a head, then 408 and close."""
    proxy = await intercepting_proxy(
        start_proxy, ca_files, tls_ca_file, secure_origin.port, request_header_timeout=0.5
    )
    authority = f"localhost:{secure_origin.port}"
    tunnel = await open_tunnel(proxy.url, authority)
    await tunnel.writer.start_tls(ca_files.client_context(), server_hostname="localhost")
    tunnel.writer.write(b"GET /echo HTTP/1.1\r\nHost: ")
    answer = await asyncio.wait_for(tunnel.reader.read(), 10)
    tunnel.writer.close()
    assert answer.startswith(b"HTTP/1.0 408") or answer.startswith(b"HTTP/1.1 408")
    assert not secure_origin.peers  # nothing reached the origin


async def test_silent_stream_inside_connect_is_closed_at_the_head_deadline(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """A CONNECT the proxy answered itself and then hears nothing on is closed, undialled."""
    proxy = await start_proxy(connect_http_ports=(origin.port,), request_header_timeout=0.3)
    tunnel = await open_tunnel(proxy.url, origin.authority)
    assert tunnel.status == 200
    assert await asyncio.wait_for(tunnel.reader.read(), 10) == b""
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert line["outcome"] == "timeout"


async def test_drain_closes_an_idle_intercepted_connection_at_once(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin
) -> None:
    """When the drain starts, an idle intercepted keep-alive connection is closed, grace or not."""
    authority = f"localhost:{secure_origin.port}"
    tunnel = await _open_intercepted(intercepting.url, authority, ca_files.client_context())
    draining = asyncio.ensure_future(intercepting.server.drain(grace=5, drain_timeout=5))
    try:
        assert await asyncio.wait_for(tunnel.reader.read(), 10) == b""
        assert not draining.done()  # closed within the grace, not at its end
    finally:
        draining.cancel()
        tunnel.writer.close()


# -- every way a stream inside a CONNECT ends, ends the CONNECT --------------------------------


async def _echo_until_bye(connection: websockets.asyncio.server.ServerConnection) -> None:
    """Echo each message; on "bye" the origin closes the WebSocket itself."""
    async for message in connection:
        if message == "bye":
            await connection.close()
            return
        await connection.send(message)


@contextlib.asynccontextmanager
async def ws_server(context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A WebSocket origin (the websockets library), over TLS with ``context``; yields its port."""
    async with websockets.asyncio.server.serve(
        _echo_until_bye, "127.0.0.1", 0, compression=None, ssl=context
    ) as server:
        yield next(iter(server.sockets)).getsockname()[1]


# How a WebSocket inside a CONNECT can end.
WS_ENDINGS = ["client_closes", "origin_closes", "client_resets"]


async def _websocket_once(
    url: str, proxy_url: str, ending: str, context: ssl.SSLContext | None = None
) -> None:
    """One WebSocket through the proxy: an echo, then the end named by ``ending``."""
    async with websockets.asyncio.client.connect(
        url, proxy=proxy_url, ssl=context, compression=None, open_timeout=10, close_timeout=2
    ) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello"
        if ending == "origin_closes":
            await ws.send("bye")
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        elif ending == "client_resets":
            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.transport.abort()


@pytest.mark.parametrize("ending", WS_ENDINGS)
async def test_websocket_inside_connect_never_releases_the_connect(
    start_proxy: StartProxy, logs: LogCapture, ending: str
) -> None:
    """Four ws:// WebSockets in turn through CONNECT host:port (--max-client-connections 3):
    each end writes the CONNECT's tunnel line and gives its connection back."""
    async with ws_server() as port:
        proxy = await start_proxy(connect_http_ports=(port,), max_client_connections=3)
        for count in range(1, 5):
            await _websocket_once(f"ws://127.0.0.1:{port}/", proxy.url, ending)
            await logs.wait_for("tunnel", count)
        await until(lambda: proxy.sample("proxy_client_connections_open") == 0)
    assert [line["outcome"] for line in logs.events("tunnel")] == ["http"] * 4
    assert len(logs.events("websocket")) == 4
    assert proxy.sample("proxy_client_connections_rejected_total") == 0


@pytest.mark.parametrize("ending", WS_ENDINGS)
async def test_intercepted_websocket_never_releases_the_connect(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca: trustme.CA,
    tls_ca_file: str,
    logs: LogCapture,
    ending: str,
) -> None:
    """Four wss:// WebSockets in turn through interception (--max-client-connections 3): each
    end writes the CONNECT's tunnel line and gives its connection back."""
    async with ws_server(server_context(tls_ca, "localhost")) as port:
        proxy = await intercepting_proxy(
            start_proxy, ca_files, tls_ca_file, port, max_client_connections=3
        )
        for count in range(1, 5):
            await _websocket_once(
                f"wss://localhost:{port}/", proxy.url, ending, ca_files.client_context()
            )
            await logs.wait_for("tunnel", count)
        await until(lambda: proxy.sample("proxy_client_connections_open") == 0)
    assert [line["outcome"] for line in logs.events("tunnel")] == ["intercepted"] * 4
    assert len(logs.events("websocket")) == 4
    assert proxy.sample("proxy_client_connections_rejected_total") == 0


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    """One response with a Content-Length body, head and body as they came."""
    head = await asyncio.wait_for(read_head(reader), 10)
    length = next(
        int(line.partition(b":")[2])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 30)


@pytest.mark.parametrize("closer", ["client", "proxy"])
@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_served_connect_line_shows_no_bytes_and_no_closer(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    secure_origin: TLSOrigin,
    origin: Origin,
    logs: LogCapture,
    scheme: str,
    closer: str,
) -> None:
    """5 MiB up and 5 MiB down inside an intercepted (or plain HTTP) CONNECT: its tunnel line
    counts every byte the client sent and received on the stream, and names who closed."""
    authority = secure_origin.authority if scheme == "https" else origin.authority
    proxy = await start_proxy(
        intercept=("127.0.0.1",),
        ca_cert=ca_files.cert,
        ca_key=ca_files.key,
        upstream_ca_file=tls_ca_file,
        connect_ports=(secure_origin.port,),
        connect_http_ports=(origin.port,),
    )
    tunnel = await open_tunnel(proxy.url, authority)
    if scheme == "https":
        await tunnel.writer.start_tls(ca_files.client_context(), server_hostname="127.0.0.1")
    body = pattern(5 * MIB, seed=9)
    upload = (
        f"POST /echo HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    # Connection: close on the last request: the proxy ends the stream after its answer.
    download = _get(authority, f"/stream?size={5 * MIB}&cl=1", close=closer == "proxy")
    tunnel.writer.write(upload)
    received = await _read_response(tunnel.reader)
    tunnel.writer.write(download)
    received += await _read_response(tunnel.reader)
    if closer == "proxy":
        assert await asyncio.wait_for(tunnel.reader.read(), 10) == b""
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert line["outcome"] == ("intercepted" if scheme == "https" else "http")
    assert (line["bytes_in"], line["bytes_out"]) == (len(upload) + len(download), len(received))
    assert line["closed_by"] == closer


async def _child_lines(child: Child, event: str, count: int = 1) -> list[dict[str, Any]]:
    """The child proxy's ``event`` lines once ``count`` have come (its log comes in batches)."""
    for _ in range(1000):
        found = [line for line in child.lines if line.get("event") == event]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} {event} lines, got {child.lines}")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_origin_closing_an_intercepted_websocket_logs_a_traceback(
    ca_files: CAFiles, tls_ca: trustme.CA, tls_ca_file: str, loop: str
) -> None:
    """A wss origin ends an intercepted WebSocket: TLS has no half-close, so the client side is
    closed; the relay ends as closed by the upstream, and nothing is logged as an error."""
    async with (
        ws_server(server_context(tls_ca, "localhost")) as port,
        intercepting_cli(
            ca_files, tls_ca_file, TLSOrigin("127.0.0.1", port), "--event-loop", loop
        ) as running,
    ):
        url = f"wss://localhost:{port}/"
        await _websocket_once(url, running.proxy, "origin_closes", ca_files.client_context())
        (relayed,) = await _child_lines(running, "websocket")
        await _child_lines(running, "tunnel")
    assert (relayed["outcome"], relayed["closed_by"]) == ("closed", "upstream")
    assert [line for line in running.lines if line.get("level") == "error"] == []


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_stalled_handshake_is_counted_as_closed(
    ca_files: CAFiles, tls_ca_file: str, secure_origin: TLSOrigin, loop: str
) -> None:
    """A client that sends its ClientHello and then nothing: at --request-header-timeout the
    handshake is given up, counted and logged as a timeout."""
    async with (
        intercepting_cli(
            ca_files,
            tls_ca_file,
            secure_origin,
            "--event-loop",
            loop,
            "--request-header-timeout",
            "0.5",
        ) as running,
        aiohttp.ClientSession() as session,
    ):
        authority = f"localhost:{secure_origin.port}"
        tunnel = await open_tunnel(running.proxy, authority)
        assert tunnel.status == 200
        tunnel.writer.write(MemoryTLS(ca_files.client_context(), "localhost").client_hello())
        while await asyncio.wait_for(tunnel.reader.read(65536), 10):
            pass  # the server's flight, unanswered; then the proxy gives up
        tunnel.writer.close()
        (line,) = await _child_lines(running, "tunnel")
        text = await (await session.get(running.metrics)).text()
    assert line["outcome"] == "tls_failed"
    failures = f'proxy_intercept_failures_total{{host="{authority}",reason="timeout"}} 1.0'
    assert failures in text, [x for x in text.splitlines() if "intercept_failures" in x]
    assert [line for line in running.lines if line.get("level") == "error"] == []


async def test_connect_inside_a_stream_is_forwarded_and_pooled(
    start_proxy: StartProxy, raw_origin: Any, logs: LogCapture
) -> None:
    """A CONNECT sent on the stream of a CONNECT carries no content (RFC 9110 §9.3.6) and is
    not forwarded: 403 with Proxy-Status, counted, logged, the stream closed, nothing dialled."""
    target = await raw_origin(echo)  # never dialled: it only gives the CONNECT a port
    proxy = await start_proxy(connect_http_ports=(target.port,))
    authority = f"127.0.0.1:{target.port}"
    nested = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    answer = await _exchange_in_tunnel(proxy, authority, nested + b"tunnel bytes")
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 403 Forbidden\r\n")
    assert "Proxy-Status: tracing-proxy; error=http_request_denied" in head
    assert "Connection: close" in head
    assert target.connections == 0
    assert proxy.sample("proxy_denied_total", reason="nested_connect") == 1
    (line,) = logs.events("rejected")
    assert (line["method"], line["refused"], line["status"]) == ("CONNECT", "nested_connect", 403)


# -- the decision after a whole ClientHello: intercept, splice, or refuse ----------------------


@contextlib.asynccontextmanager
async def alpn_origin(context: ssl.SSLContext) -> AsyncIterator[int]:
    """A TLS origin that writes the ALPN protocol it agreed on, then closes; yields its port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        writer.write((ssl_object.selected_alpn_protocol() or "none").encode())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_h2_only_client_gets_no_alpn_and_hangs_up(
    ca_files: CAFiles, tls_ca: trustme.CA, tls_ca_file: str, loop: str
) -> None:
    """With HTTP/2 serving off, a client offering only h2 (grpcio's ClientHello) is spliced:
    it reaches the TLS origin itself, agrees on h2 with it, and the proxy counts the splice and
    mints nothing."""
    context = server_context(tls_ca, "localhost")
    context.set_alpn_protocols(["h2", "http/1.1"])
    async with (
        alpn_origin(context) as port,
        intercepting_cli(
            ca_files,
            tls_ca_file,
            TLSOrigin("127.0.0.1", port),
            *("--event-loop", loop, "--http2", "false"),
        ) as running,
        aiohttp.ClientSession() as session,
    ):
        client = ssl.create_default_context(cafile=tls_ca_file)  # the origin's CA, not ours
        client.set_alpn_protocols(["h2"])
        tunnel = await open_tunnel(running.proxy, f"localhost:{port}")
        assert tunnel.status == 200
        await tunnel.writer.start_tls(client, server_hostname="localhost")
        agreed = tunnel.writer.get_extra_info("ssl_object").selected_alpn_protocol()
        said = await asyncio.wait_for(tunnel.reader.read(), 10)
        tunnel.writer.close()
        (line,) = await _child_lines(running, "tunnel")
        text = await (await session.get(running.metrics)).text()
    assert (agreed, said) == ("h2", b"h2")
    assert f'proxy_intercept_splices_total{{host="localhost:{port}",reason="alpn"}} 1.0' in text
    assert "proxy_intercept_certificates_minted_total 0.0" in text
    assert line["outcome"] == "closed"
    assert line["bytes_out"] > 0  # the origin's own handshake came through the relay
    # A splice is a tunnel: its TLS is read from the bytes, its hello passed on after the dial.
    assert (line["sni"], line["alpn_offered"], line["tls_version"]) == (
        "localhost",
        ["h2"],
        "TLSv1.3",
    )
    assert line["tls_ms"] > 0
    assert line["exchanges"] is None  # h2: not counted


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("when", ["during_handshake", "after_handshake"])
async def test_client_that_hangs_up_without_an_alert_is_never_spliced(
    ca_files: CAFiles, tls_ca_file: str, secure_origin: TLSOrigin, when: str, loop: str
) -> None:
    """A client that closes during our handshake, or right after it without a byte of a
    request (grpcio, with no alert), has refused us: counted, and its retry is spliced."""
    authority = f"localhost:{secure_origin.port}"
    async with (
        intercepting_cli(ca_files, tls_ca_file, secure_origin, "--event-loop", loop) as running,
        aiohttp.ClientSession() as session,
    ):
        tls = MemoryTLS(ca_files.client_context(), "localhost")
        tunnel = await open_tunnel(running.proxy, authority, early=tls.client_hello())
        assert tunnel.status == 200
        if when == "after_handshake":
            await tls.finish(tunnel.reader, tunnel.writer)
        tunnel.writer.close()
        (line,) = await _child_lines(running, "tunnel")
        text = await (await session.get(running.metrics)).text()
        # The retry trusts only the origin's CA: it works because it is spliced.
        url = f"https://{authority}/echo"
        code, out, err = await curl("--cacert", tls_ca_file, "-x", running.proxy, url)
    assert line["outcome"] == "tls_failed"  # never "intercepted": it carried no request
    reason = "closed" if when == "during_handshake" else "closed_before_request"
    assert f'proxy_intercept_failures_total{{host="{authority}",reason="{reason}"}} 1.0' in text
    assert code == 0, err
    assert json.loads(out)["target"] == "/echo"


async def test_two_tls_bytes_mint_a_leaf(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """Bytes that only start like TLS mint nothing: a leaf waits for a whole ClientHello."""
    authority = f"localhost:{secure_origin.port}"
    for opening in (b"\x16\x03", b"\x16\x03\x01\x00\x05hello", b"\x16\x03\x01\x00\x02\x01\x00"):
        tunnel = await open_tunnel(intercepting.url, authority, early=opening)
        assert tunnel.status == 200
        tunnel.writer.write_eof()
        assert await asyncio.wait_for(tunnel.reader.read(), 10) == b""
        tunnel.writer.close()
    await logs.wait_for("tunnel", 3)
    assert intercepting.sample("proxy_intercept_certificates_minted_total") == 0
    answer = await _exchange_in_tls(intercepting, ca_files, authority)
    assert answer.startswith(b"HTTP/1.1 200")
    assert intercepting.sample("proxy_intercept_certificates_minted_total") == 1


def _recut(hello: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    """The ClientHello's handshake message re-cut into records of ``sizes`` bytes (the last takes
    the rest), each record then split in two writes (RFC 8446 §5.1 allows both)."""
    assert hello[0] == 0x16  # one handshake record
    assert int.from_bytes(hello[3:5], "big") == len(hello) - 5
    message, version = hello[5:], hello[1:3]
    writes: list[bytes] = []
    for size in (*sizes, len(message)):
        fragment, message = message[:size], message[size:]
        if fragment:
            record = b"\x16" + version + len(fragment).to_bytes(2, "big") + fragment
            writes += [record[:3], record[3:]]
    return writes


async def test_client_hello_over_several_records_and_reads_is_intercepted(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin
) -> None:
    """A ClientHello in three records over six writes is read whole, then intercepted."""
    authority = f"localhost:{secure_origin.port}"
    answer = await _exchange_in_tls(
        intercepting, ca_files, authority, lambda hello: _recut(hello, (100, 200))
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"target": "/echo"' in answer


async def test_client_hello_past_the_bound_is_refused_unminted(
    intercepting: RunningProxy, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """A ClientHello that says it is 1 MiB is refused at its header: counted, nothing minted."""
    authority = f"localhost:{secure_origin.port}"
    start = b"\x01" + (1 << 20).to_bytes(3, "big") + b"\x00" * 100  # ClientHello, 1 MiB long
    record = b"\x16\x03\x01" + len(start).to_bytes(2, "big") + start
    tunnel = await open_tunnel(intercepting.url, authority, early=record)
    assert tunnel.status == 200
    assert await asyncio.wait_for(tunnel.reader.read(), 10) == b""
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert line["outcome"] == "tls_failed"
    assert "too_large" in line["details"]
    failures = intercepting.sample(
        "proxy_intercept_failures_total", host=authority, reason="tls_protocol_error"
    )
    assert failures == 1
    assert intercepting.sample("proxy_intercept_certificates_minted_total") == 0


async def test_spellings_of_one_address_each_mint_a_leaf(
    start_proxy: StartProxy, ca_files: CAFiles
) -> None:
    """CONNECTs to [::1], [0:0::1], [0000::0001]...: one leaf serves them all, minted once."""
    proxy = await start_proxy(
        intercept=("[::1]",),
        ca_cert=ca_files.cert,
        ca_key=ca_files.key,
        connect_ports=(8443,),
        intercept_splice_seconds=0,  # each closes after its handshake: no splice meanwhile
    )
    spellings = ["::1", "0::1", "0:0::1", "0000::0001", "0:0:0:0:0:0:0:1", "::0:1", "0::0:1"]
    for spelling in spellings:
        tls = MemoryTLS(ca_files.client_context(), "::1")
        tunnel = await open_tunnel(proxy.url, f"[{spelling}]:8443", early=tls.client_hello())
        assert tunnel.status == 200
        await tls.finish(tunnel.reader, tunnel.writer)  # the leaf names IP ::1: it verifies
        tunnel.writer.close()
    assert proxy.sample("proxy_intercept_certificates_minted_total") == 1


async def test_ca_that_expires_while_running_raises_a_traceback(
    start_proxy: StartProxy,
    tmp_path: Path,
    tls_ca_file: str,
    secure_origin: TLSOrigin,
    logs: LogCapture,
) -> None:
    """A CA that expires while the proxy runs: the next intercepted CONNECT is counted, logged
    once, and spliced, so the client reaches the origin; no traceback."""
    lifetime = datetime.timedelta(days=CA_DAYS) - datetime.timedelta(seconds=2)
    ca = CertificateAuthority.create(now=datetime.datetime.now(datetime.UTC) - lifetime)
    cert, key = write_ca(str(tmp_path / "expiring"), ca)
    proxy = await start_proxy(
        intercept=("localhost",),
        ca_cert=str(cert),
        ca_key=str(key),
        upstream_ca_file=tls_ca_file,
        connect_ports=(secure_origin.port,),
    )
    left = ca.cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    await asyncio.sleep(max(left.total_seconds(), 0) + 0.1)  # two seconds at most
    url = f"https://localhost:{secure_origin.port}/echo"
    for _ in range(2):  # the first is spliced at once, the second as a spliced host
        code, out, err = await curl("--cacert", tls_ca_file, "-x", proxy.url, url)
        assert code == 0, err
        assert json.loads(out)["target"] == "/echo"
    host = f"localhost:{secure_origin.port}"
    assert proxy.sample("proxy_intercept_failures_total", host=host, reason="ca_invalid") == 1
    assert proxy.sample("proxy_intercept_splices_total", host=host, reason="ca_invalid") == 1
    (failed,) = logs.events("intercept_failed")
    assert (failed["reason"], failed["level"]) == ("ca_invalid", "error")
    assert "expired on" in failed["details"]
    assert [line for line in logs.lines() if line["level"] == "error"] == [failed]
    assert [line["outcome"] for line in await logs.wait_for("tunnel", 2)] == ["closed"] * 2


async def test_h2c_preface_is_spliced_when_http2_is_off(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """HTTP/2 with prior knowledge inside a CONNECT, with no h2c server registered (HTTP/2
    serving off): relayed to the target untouched (this origin, HTTP/1.1 only, answers it
    itself), counted as a splice, nothing forwarded."""
    proxy = await start_proxy(connect_http_ports=(origin.port,), http2=False)
    answer = await _exchange_in_tunnel(proxy, origin.authority, H2_PREFACE)
    # aiohttp's own answer to the preface, not one of ours:
    assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert b"Pause on PRI/Upgrade" in answer
    assert b"Proxy-Status" not in answer
    (line,) = await logs.wait_for("tunnel")
    assert (line["outcome"], line["bytes_in"]) == ("closed", len(H2_PREFACE))
    host = origin.authority
    assert proxy.sample("proxy_intercept_splices_total", host=host, reason="h2c") == 1
    assert logs.events("access") == []


class _Toy(asyncio.Protocol):
    """A stand-in server for a protocol id: answers "<id>:" and the first bytes, then closes."""

    def __init__(self, protocol: str) -> None:
        self._protocol = protocol
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(self._protocol.encode() + b":" + data)
        self._transport.close()


def _toy(protocol: str) -> StreamServer:
    return lambda server_protocol, stream: _Toy(protocol)


async def test_registered_stream_servers_get_their_streams(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    secure_origin: TLSOrigin,
    origin: Origin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plug-in point: a server registered for "h2" is offered in ALPN and gets an h2-only
    client's stream; one registered for "h2c" gets the prior-knowledge preface."""
    monkeypatch.setitem(STREAM_SERVERS, "h2", _toy("h2"))
    monkeypatch.setitem(STREAM_SERVERS, "h2c", _toy("h2c"))
    proxy = await intercepting_proxy(
        start_proxy, ca_files, tls_ca_file, secure_origin.port, connect_http_ports=(origin.port,)
    )
    client = ca_files.client_context()
    client.set_alpn_protocols(["h2"])
    tunnel = await open_tunnel(proxy.url, f"localhost:{secure_origin.port}")
    await tunnel.writer.start_tls(client, server_hostname="localhost")
    assert tunnel.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    tunnel.writer.write(H2_PREFACE)
    assert await asyncio.wait_for(tunnel.reader.read(), 10) == b"h2:" + H2_PREFACE
    tunnel.writer.close()
    answer = await _exchange_in_tunnel(proxy, origin.authority, H2_PREFACE)
    assert answer == b"h2c:" + H2_PREFACE
