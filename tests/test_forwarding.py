"""Forwarding through the real listener with the clients people point at a proxy."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

import aiohttp
import httpx
import pytest
import requests

from benchmarks.processes import communicate
from tests.conftest import (
    GZIP_BODY,
    LogCapture,
    Origin,
    RawOrigin,
    RunningProxy,
    answer,
    http_request,
    pattern,
    read_head,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def seen_headers(echo: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in echo["headers"]]


def seen_names(echo: dict[str, Any]) -> list[str]:
    return [k.lower() for k, _ in echo["headers"]]


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--noproxy",
        "",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ["PATH"]},
    )
    out, err = await communicate(proc, 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


# -- real clients ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
async def test_curl_forwards_method_body_and_headers(
    proxy: RunningProxy, origin: Origin, method: str
) -> None:
    """curl -x sends each method with its body through the proxy and gets the origin's answer."""
    body_args = [] if method == "GET" else ["--data-binary", "payload-" + method]
    code, out, err = await curl(
        "-x", proxy.url, "-X", method, "-H", "X-Custom: yes", *body_args, origin.url("/echo?q=1")
    )
    assert code == 0, err
    echo = json.loads(out)
    assert echo["method"] == method
    assert echo["target"] == "/echo?q=1"
    assert ("X-Custom", "yes") in seen_headers(echo)
    expected = b"" if method == "GET" else ("payload-" + method).encode()
    assert echo["body_sha256"] == hashlib.sha256(expected).hexdigest()


async def test_requests_with_proxies_argument(proxy: RunningProxy, origin: Origin) -> None:
    """requests with proxies= posts a body and reads the echo."""

    def call() -> requests.Response:
        with requests.Session() as session:
            session.trust_env = False
            return session.post(
                origin.url("/echo"), data=b"from-requests", proxies={"http": proxy.url}, timeout=10
            )

    response = await asyncio.to_thread(call)
    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(b"from-requests").hexdigest()
    assert response.headers["Via"] == "1.1 tracing-proxy"


async def test_requests_with_http_proxy_environment(
    proxy: RunningProxy, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests honours HTTP_PROXY from the environment and goes through the proxy."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    response = await asyncio.to_thread(requests.put, origin.url("/echo"), data=b"env", timeout=10)
    assert response.status_code == 200
    assert ("Via", "1.1 tracing-proxy") in seen_headers(response.json())


async def test_httpx_with_proxy_argument(proxy: RunningProxy, origin: Origin) -> None:
    """httpx with proxy= sends a PUT body through the proxy."""

    def call() -> httpx.Response:
        with httpx.Client(proxy=proxy.url, trust_env=False) as session:
            return session.put(origin.url("/echo"), content=b"from-httpx")

    response = await asyncio.to_thread(call)
    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(b"from-httpx").hexdigest()


async def test_aiohttp_with_proxy_argument(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """aiohttp with proxy= posts a body through the proxy."""
    async with client.post(origin.url("/echo"), data=b"from-aiohttp", proxy=proxy.url) as resp:
        echo = await resp.json()
    assert resp.status == 200
    assert echo["body_sha256"] == hashlib.sha256(b"from-aiohttp").hexdigest()


# -- bodies --------------------------------------------------------------------------------------


async def test_five_mib_upload_and_download_are_byte_exact(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """A random 5 MiB body arrives byte-exact in each direction."""
    body = os.urandom(5 * 1024 * 1024)
    async with client.put(origin.url("/echo"), data=body, proxy=proxy.url) as resp:
        echo = await resp.json()
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ("Content-Length", str(len(body))) in seen_headers(echo)

    size = 5 * 1024 * 1024 + 7
    async with client.get(origin.url(f"/stream?size={size}"), proxy=proxy.url) as resp:
        data = await resp.read()
    assert data == pattern(size)


async def test_chunked_upload_is_reframed_and_byte_exact(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """A chunked upload of unknown length arrives whole, sent on with chunked framing."""
    parts = [os.urandom(100_000) for _ in range(20)]

    async def generate() -> Any:
        for part in parts:
            yield part

    async with client.post(origin.url("/echo"), data=generate(), proxy=proxy.url) as resp:
        echo = await resp.json()
    whole = b"".join(parts)
    assert echo["body_sha256"] == hashlib.sha256(whole).hexdigest()
    assert ("Transfer-Encoding", "chunked") in seen_headers(echo)


async def test_download_with_content_length_keeps_it(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """An upstream Content-Length reaches the client unchanged, with no chunking added."""
    async with client.get(origin.url("/stream?size=300000&cl=1"), proxy=proxy.url) as resp:
        data = await resp.read()
        assert resp.headers["Content-Length"] == "300000"
        assert "Transfer-Encoding" not in resp.headers
    assert data == pattern(300000)


# -- transparency ---------------------------------------------------------------------------------


async def test_no_decompression_either_way(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """Gzip bodies pass through compressed, with their Content-Encoding, in both directions."""
    async with client.get(origin.url("/gzip"), proxy=proxy.url) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == GZIP_BODY
    upload = b"\x1f\x8b" + os.urandom(500)  # gzip magic; the proxy must not try to inflate it
    headers = {"Content-Encoding": "gzip"}
    async with client.post(origin.url("/echo"), data=upload, headers=headers, proxy=proxy.url) as r:
        echo = await r.json()
    assert echo["body_sha256"] == hashlib.sha256(upload).hexdigest()


async def test_redirects_are_passed_back_not_followed(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """A 302 from the origin reaches the client as a 302 with its Location."""
    async with client.get(origin.url("/redirect"), proxy=proxy.url, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/echo"


async def test_cookies_are_not_stored_or_replayed(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """Set-Cookie from one response never comes back as Cookie on a later request."""
    localhost = origin.url("/cookies").replace("127.0.0.1", "localhost")
    async with client.get(localhost, proxy=proxy.url) as resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as fresh:
        echo_url = origin.url("/echo").replace("127.0.0.1", "localhost")
        async with fresh.get(echo_url, proxy=proxy.url) as resp:
            echo = await resp.json()
    assert "cookie" not in seen_names(echo)


async def test_proxy_environment_of_the_proxy_is_ignored(
    start_proxy: Any, origin: Origin, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY in the proxy's own environment does not divert its upstream requests."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # discard port: nothing listens
    running = await start_proxy()
    async with client.get(origin.url("/echo"), proxy=running.url) as resp:
        assert resp.status == 200


async def test_nothing_is_added_to_the_request(proxy: RunningProxy, raw_origin: Any) -> None:
    """The proxy adds no Accept, User-Agent, Accept-Encoding or Content-Type of its own."""

    async def read_with_body(reader: asyncio.StreamReader) -> bytes:
        head = await read_head(reader)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)

    upstream = await raw_origin(answer(OK, read=read_with_body))
    request = (
        f"POST {upstream.url('/p')} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
        "Content-Length: 4\r\nConnection: close\r\n\r\nbody"
    ).encode()
    status, _ = await raw_exchange(proxy, request)
    assert status == b"HTTP/1.1 200 OK"
    head = upstream.received[0].lower()
    for name in (b"accept:", b"user-agent:", b"accept-encoding:", b"content-type:"):
        assert name not in head


async def raw_exchange(proxy: RunningProxy, data: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes to the proxy; return the status line and everything read until close."""
    reader, writer = await proxy.connect()
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            await writer.drain()
            received = await reader.read(-1)
    finally:
        writer.close()
    return received.split(b"\r\n", 1)[0], received


async def test_header_case_order_and_duplicates_are_preserved(
    proxy: RunningProxy, origin: Origin
) -> None:
    """Request field spelling, order and duplicates (even differing in case) reach the origin."""
    request = (
        f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
        "X-MiXeD-CaSe: 1\r\nx-dup: a\r\nX-Dup: b\r\nX-Same: 1\r\nX-Same: 2\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    _, received = await raw_exchange(proxy, request)
    echo = json.loads(received.split(b"\r\n\r\n", 1)[1])
    names = [(k, v) for k, v in seen_headers(echo) if k.lower().startswith("x-")]
    assert names[:5] == [
        ("X-MiXeD-CaSe", "1"),
        ("x-dup", "a"),
        ("x-dup", "b"),
        ("X-Same", "1"),
        ("X-Same", "2"),
    ]


async def test_response_duplicates_and_case_are_preserved(
    proxy: RunningProxy, origin: Origin
) -> None:
    """Two Set-Cookie fields stay two, and response field spelling survives."""
    request = (
        f"GET {origin.url('/cookies')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    _, received = await raw_exchange(proxy, request)
    head = received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head.count(b"Set-Cookie: a=1") == 1
    assert head.count(b"Set-Cookie: b=2") == 1
    assert b"X-UPPER: A" in head
    assert b"x-lower: b" in head


async def test_hop_by_hop_request_fields_are_removed(proxy: RunningProxy, origin: Origin) -> None:
    """Connection, the fields it names, Keep-Alive, TE, Proxy-* never reach the origin."""
    request = (
        f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
        "Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "Upgrade: websocket\r\nX-Kept: yes\r\n\r\n"
    ).encode()
    _, received = await raw_exchange(proxy, request)
    names = seen_names(json.loads(received.split(b"\r\n\r\n", 1)[1]))
    for gone in ("connection", "x-hop", "keep-alive", "te", "proxy-connection"):
        assert gone not in names
    assert "proxy-authorization" not in names
    assert "upgrade" not in names
    assert "x-kept" in names


# RFC 9110 §5.5: obs-text (0x80-0xFF) in a field value is opaque data; as latin-1 (a
# filename in Content-Disposition, a cookie) and as UTF-8, next to a byte that is neither.
OBS_TEXT_FIELDS = (
    b"X-Name: caf\xe9\r\n"
    b'Content-Disposition: attachment; filename="r\xe9sum\xe9.pdf"\r\n'
    b"X-Utf8: caf\xc3\xa9\r\n"
    b"X-Lone: \xff\x80 end\r\n"
)


async def test_obs_text_in_fields_and_reason_phrase_is_forwarded_byte_for_byte(
    proxy: RunningProxy, raw_origin: Any
) -> None:
    """Bytes that are not UTF-8 in field values and the reason phrase pass intact, both ways."""

    ok = b"HTTP/1.1 200 Caf\xe9 OK\r\n" + OBS_TEXT_FIELDS + b"Content-Length: 2\r\n\r\nok"
    upstream = await raw_origin(answer(ok))
    request = (
        f"GET {upstream.url()} HTTP/1.1\r\nHost: x\r\n".encode()
        + OBS_TEXT_FIELDS
        + b"Connection: close\r\n\r\n"
    )
    status, received = await raw_exchange(proxy, request)
    assert status == b"HTTP/1.1 200 Caf\xe9 OK"
    for line in OBS_TEXT_FIELDS.split(b"\r\n")[:-1]:
        assert line + b"\r\n" in upstream.received[0], line
        assert line + b"\r\n" in received.split(b"\r\n\r\n", 1)[0], line
    assert received.endswith(b"\r\n\r\nok")


async def test_hop_by_hop_response_fields_are_removed(proxy: RunningProxy, raw_origin: Any) -> None:
    """Fields named by the upstream's Connection, and Keep-Alive, do not reach the client."""

    ok = (
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret-Hop\r\nX-Secret-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok"
    )
    upstream = await raw_origin(answer(ok))
    request = f"GET {upstream.url()} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    _, received = await raw_exchange(proxy, request)
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert b"x-secret-hop" not in head
    assert b"keep-alive" not in head
    assert b"x-kept: 1" in head
    assert received.endswith(b"\r\n\r\nok")


@pytest.mark.parametrize(
    ("upstream_fields", "present", "absent"),
    [
        (b"", [b"date:"], [b"content-type:", b"server:"]),
        (
            b"Content-Type: text/plain\r\nServer: origin/1\r\n",
            [b"content-type: text/plain", b"server: origin/1"],
            [b"application/octet-stream", b"aiohttp"],
        ),
    ],
    ids=["upstream-sent-neither", "upstream-sent-both"],
)
async def test_no_content_type_or_server_of_our_own_on_responses(
    proxy: RunningProxy,
    raw_origin: Any,
    upstream_fields: bytes,
    present: list[bytes],
    absent: list[bytes],
) -> None:
    """aiohttp's default Content-Type and Server are removed; the upstream's own are kept."""

    ok = b"HTTP/1.1 200 OK\r\n" + upstream_fields + b"Content-Length: 2\r\n\r\nok"
    upstream = await raw_origin(answer(ok))
    request = f"GET {upstream.url()} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    _, received = await raw_exchange(proxy, request)
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    for field in present:
        assert field in head
    for field in absent:
        assert field not in head


async def test_via_is_appended_in_both_directions(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """An existing Via is kept and ours follows it, on the request and on the response."""
    headers = {"Via": "1.0 fred"}
    async with client.get(origin.url("/echo"), headers=headers, proxy=proxy.url) as resp:
        echo = await resp.json()
        assert resp.headers.getall("Via")[-1] == "1.1 tracing-proxy"
    vias = [v for k, v in seen_headers(echo) if k.lower() == "via"]
    assert vias == ["1.0 fred", "1.1 tracing-proxy"]


async def test_host_is_taken_from_the_target(proxy: RunningProxy, origin: Origin) -> None:
    """A Host that disagrees with the absolute target is replaced by the target's authority."""
    request = (
        f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: wrong.example\r\nConnection: close\r\n\r\n"
    ).encode()
    _, received = await raw_exchange(proxy, request)
    hosts = [
        v
        for k, v in seen_headers(json.loads(received.split(b"\r\n\r\n", 1)[1]))
        if k.lower() == "host"
    ]
    assert hosts == [origin.authority]


@pytest.mark.parametrize("path", ["/status/204", "/status/304"])
async def test_no_body_for_204_and_304(proxy: RunningProxy, origin: Origin, path: str) -> None:
    """204 and 304 responses reach the client with no body and the connection stays usable."""
    request = http_request("GET", origin.url(path), close=False) + http_request(
        "GET", origin.url("/big")
    )
    _, received = await raw_exchange(proxy, request)
    first, second = received.split(b"HTTP/1.1 200 OK")
    assert first.endswith(b"\r\n\r\n")
    assert second.endswith(b"x" * 1234)


async def test_head_keeps_content_length_without_body(proxy: RunningProxy, origin: Origin) -> None:
    """HEAD gets the upstream's Content-Length and no body bytes."""
    request = (
        f"HEAD {origin.url('/big')} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n"
        f"GET {origin.url('/status/200')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    _, received = await raw_exchange(proxy, request)
    head, rest = received.split(b"\r\n\r\n", 1)
    assert b"Content-Length: 1234" in head
    assert rest.startswith(b"HTTP/1.1 200 OK")


async def test_expect_100_continue_works(proxy: RunningProxy, origin: Origin) -> None:
    """A client that waits for 100 Continue gets it, sends its body, and the origin gets it all."""
    reader, writer = await proxy.connect()
    try:
        writer.write(
            (
                f"PUT {origin.url('/echo')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
                "Content-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        received = await asyncio.wait_for(reader.read(-1), 5)
    finally:
        writer.close()
    echo = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert "expect" not in seen_names(echo)


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS"])
async def test_max_forwards_zero_is_answered_by_the_proxy(
    proxy: RunningProxy, raw_origin: Any, method: str
) -> None:
    """TRACE/OPTIONS with Max-Forwards: 0 are answered locally; the origin sees nothing."""

    async def script(reader: Any, writer: Any, state: RawOrigin) -> None:
        state.received.append(await reader.read(100))

    upstream = await raw_origin(script)
    request = (
        f"{method} {upstream.url('/x')} HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\n"
        "Cookie: secret=1\r\nConnection: close\r\n\r\n"
    ).encode()
    status, received = await raw_exchange(proxy, request)
    assert status == b"HTTP/1.1 200 OK"
    assert upstream.connections == 0
    if method == "TRACE":
        assert b"message/http" in received
        assert received.split(b"\r\n\r\n", 1)[1].startswith(b"TRACE ")
        assert b"secret=1" not in received
    else:
        assert b"Allow: " in received


async def test_max_forwards_above_zero_is_decremented(proxy: RunningProxy, origin: Origin) -> None:
    """OPTIONS with Max-Forwards: 3 reaches the origin with Max-Forwards: 2."""
    request = (
        f"OPTIONS {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nMax-Forwards: 3\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    _, received = await raw_exchange(proxy, request)
    echo = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert [v for k, v in seen_headers(echo) if k.lower() == "max-forwards"] == ["2"]


async def test_client_keep_alive_serves_many_requests_on_one_connection(
    proxy: RunningProxy, origin: Origin
) -> None:
    """Fifty requests pipelined one after another on one client connection all succeed."""
    reader, writer = await proxy.connect()
    try:
        for i in range(50):
            writer.write(http_request("GET", origin.url(f"/echo/{i}"), close=False))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            echo = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
            assert echo["target"] == f"/echo/{i}"
    finally:
        writer.close()
    assert proxy.sample("proxy_upstream_connections_total", host=origin.authority, kind="new") == 1


async def test_gets_with_encoded_path_and_query_are_byte_exact(
    proxy: RunningProxy, origin: Origin
) -> None:
    """Percent-encoded path and query reach the origin exactly as the client wrote them."""
    target = "/echo/p%2Fx/%7Euser?q=%20&a=b"
    request = http_request("GET", origin.url(target))
    _, received = await raw_exchange(proxy, request)
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["target"] == target


# -- local endpoints and request forms ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"), [("/healthz", b"ok"), ("/readyz", b"ready"), ("/metrics", b"# HELP")]
)
async def test_origin_form_local_endpoints_on_the_proxy_port(
    proxy: RunningProxy, path: str, expected: bytes
) -> None:
    """GET /metrics, /healthz and /readyz are answered by the proxy listener itself."""
    status, received = await raw_exchange(
        proxy, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert status == b"HTTP/1.1 200 OK"
    assert expected in received.split(b"\r\n\r\n", 1)[1]


async def test_other_origin_form_requests_get_400(proxy: RunningProxy) -> None:
    """GET /anything on the proxy port is a 400 that explains this is a forward proxy."""
    status, received = await raw_exchange(
        proxy, b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == b"HTTP/1.1 400 Bad Request"
    assert b"forward proxy" in received
    assert b"Proxy-Status: tracing-proxy; error=http_request_error" in received


async def test_absolute_form_metrics_path_is_forwarded(proxy: RunningProxy, origin: Origin) -> None:
    """GET http://other-host/metrics goes to that host, never to our own /metrics."""
    status, received = await raw_exchange(proxy, http_request("GET", origin.url("/echo/metrics")))
    assert status == b"HTTP/1.1 200 OK"
    assert json.loads(received.split(b"\r\n\r\n", 1)[1])["target"] == "/echo/metrics"
    status, received = await raw_exchange(proxy, http_request("GET", origin.url("/metrics")))
    assert status == b"HTTP/1.1 404 Not Found"  # the origin's answer, not ours
    assert b"# HELP" not in received


async def test_admin_listener_serves_metrics_health_and_readiness(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    """The admin listener answers /metrics, /healthz and /readyz."""
    for path, status in (("/metrics", 200), ("/healthz", 200), ("/readyz", 200)):
        async with client.get(proxy.admin_url + path) as resp:
            assert resp.status == status
    headers = {"Accept-Encoding": "identity"}
    async with client.get(proxy.admin_url + "/metrics", headers=headers) as resp:
        assert "proxy_build_info" in await resp.text()


@pytest.mark.parametrize(
    ("scheme", "message"),
    [("ftp", b"only http:// and https:// are forwarded"), ("ws", b"only with Upgrade: websocket")],
)
async def test_non_http_absolute_targets_get_400(
    proxy: RunningProxy, scheme: str, message: bytes
) -> None:
    """An ftp:// target, or ws:// without a WebSocket handshake, is refused with 400 and why."""
    status, received = await raw_exchange(
        proxy,
        f"GET {scheme}://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == b"HTTP/1.1 400 Bad Request"
    assert b"Proxy-Status: tracing-proxy; error=http_request_error" in received
    assert message in received


# Every request on the connection answered with a chunked 200 (length unknown up front).
chunked_ok = answer(
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", times=10
)


async def test_http10_keep_alive_client_waits_for_a_body_of_unknown_length(
    start_proxy: Any, raw_origin: Any
) -> None:
    """HTTP/1.0 keep-alive and a chunked upstream: the body ends with the connection at once."""
    proxy = await start_proxy(client_idle_timeout=3600)
    upstream = await raw_origin(chunked_ok)
    request = f"GET {upstream.url('/t')} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode()
    status, received = await raw_exchange(proxy, request)  # returns at the proxy's close
    assert status == b"HTTP/1.0 200 OK"
    head, body = received.split(b"\r\n\r\n", 1)
    assert body == b"hello"
    assert b"keep-alive" not in head.lower()
    assert b"content-length" not in head.lower()


async def test_http10_keep_alive_with_a_known_length_stays_open(
    start_proxy: Any, raw_origin: Any, origin: Origin
) -> None:
    """HTTP/1.0 keep-alive with a Content-Length upstream answer keeps the connection."""
    proxy = await start_proxy()
    request = f"GET {origin.url('/big')} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode()
    reader, writer = await proxy.connect()
    try:
        for _ in range(2):
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.0 200 OK")
            assert b"Connection: keep-alive" in head
            assert len(await asyncio.wait_for(reader.readexactly(1234), 10)) == 1234
    finally:
        writer.close()


async def test_trailers_are_dropped_even_with_te_trailers(
    proxy: RunningProxy, raw_origin: Any
) -> None:
    """A documented deviation: response trailers and their Trailer field never reach the client."""

    with_trailer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\n\r\n"
    )
    upstream = await raw_origin(answer(with_trailer))
    request = (
        f"GET {upstream.url('/t')} HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n"
        "Connection: TE, close\r\n\r\n"
    ).encode()
    status, received = await raw_exchange(proxy, request)
    assert status == b"HTTP/1.1 200 OK"
    head, body = received.split(b"\r\n\r\n", 1)
    assert b"trailer" not in head.lower()
    assert body == b"5\r\nhello\r\n0\r\n\r\n"  # the last chunk, then no trailer section
    assert b"te: trailers" not in upstream.received[0].lower()  # TE is hop-by-hop


async def test_request_trailers_are_dropped(proxy: RunningProxy, raw_origin: Any) -> None:
    """A chunked upload's trailer section does not reach the origin; the body does."""

    async def read_chunked(reader: asyncio.StreamReader) -> bytes:
        return await read_head(reader) + await reader.readuntil(b"0\r\n\r\n")

    upstream = await raw_origin(answer(OK, read=read_chunked))
    request = (
        f"POST {upstream.url('/up')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        "Trailer: X-Checksum\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
    ).encode()
    status, _ = await raw_exchange(proxy, request)
    assert status == b"HTTP/1.1 200 OK"
    (seen,) = upstream.received
    assert b"x-checksum" not in seen.lower()
    assert seen.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
async def test_access_line_names_the_protocol_the_request_came_in(
    proxy: RunningProxy, origin: Origin, logs: LogCapture, version: str
) -> None:
    """The access line's protocol is the version of the client's request line."""
    request = f"GET {origin.url('/echo')} {version}\r\nHost: {origin.authority}\r\n"
    status, _ = await raw_exchange(proxy, (request + "Connection: close\r\n\r\n").encode())
    assert status.endswith(b" 200 OK")
    (line,) = await logs.wait_for("access")
    assert line["protocol"] == version
