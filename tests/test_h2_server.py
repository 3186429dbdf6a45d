"""HTTP/2 towards the client: h2c inside a CONNECT and h2 through interception, real clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trustme
from h2.errors import ErrorCodes
from yarl import URL

from tests import h2_client, test_intercept
from tests.conftest import LogCapture, Origin, RunningProxy, pattern, proxy_process
from tests.h2_origin import EARLY_HINT, H2Origin, h2_origin, raw_h2_origin
from tests.test_forwarding import curl
from tests.test_intercept import (
    CAFiles,
    intercept_flags,
    intercepting_proxy,
    one_tunnel_intercepted,
)
from tests.test_limits import until
from tests.tls import TLSOrigin

StartProxy = Callable[..., Awaitable[RunningProxy]]
TE_TRAILERS = (b"te", b"trailers")

# The interception fixtures: a CA, a proxy intercepting the TLS origin.
ca_files = test_intercept.ca_files
intercepting = test_intercept.intercepting


def http2_httpx(proxy: RunningProxy, ca_files: CAFiles) -> httpx.AsyncClient:
    """httpx offering HTTP/2 through ``proxy``, trusting only our CA, every wait 10 s at most."""
    return httpx.AsyncClient(
        http2=True,
        proxy=proxy.url,
        verify=ca_files.client_context(),
        trust_env=False,
        timeout=10,
    )


async def h2c_proxy(
    start_proxy: StartProxy, origin: Origin | H2Origin, **changes: object
) -> RunningProxy:
    """A proxy whose CONNECT to the origin's port may carry plain HTTP only (h2c included)."""
    return await start_proxy(connect_http_ports=(origin.port,), **changes)


async def test_curl_h2c_prior_knowledge_inside_connect_is_forwarded(
    start_proxy: StartProxy, h2c_origin: H2Origin, logs: LogCapture
) -> None:
    """curl --http2-prior-knowledge -p: HTTP/2 to the proxy, the request forwarded and logged.

    One URL per curl: curl 7.88 fails its second request on a reused h2c tunnel before
    sending a byte of it ("Error in the HTTP2 framing layer"); streams on one connection are
    tested with an h2 client below.
    """
    proxy = await h2c_proxy(start_proxy, h2c_origin)
    url = f"http://127.0.0.1:{h2c_origin.port}/echo/a?q=1"
    code, out, err = await curl(
        "--http2-prior-knowledge", "-p", "-x", proxy.url, "-w", "\n%{http_version}", url
    )
    assert code == 0, err
    first = out.partition(b"\n")[0]
    echoed = json.loads(first)
    assert echoed["path"] == "/echo/a?q=1"
    assert echoed["version"] == "2"  # h2c in, h2c with prior knowledge out
    fields = dict(echoed["headers"])
    assert fields["via"] == "2 tracing-proxy"
    assert out.endswith(b"\n2")
    lines = await logs.wait_for("access", 1)
    assert [(line["path"], line["status"]) for line in lines] == [("/echo/a", 200)]
    host = f"127.0.0.1:{h2c_origin.port}"
    assert proxy.sample("proxy_upstream_ttfb_seconds_count", host=host) == 1


async def test_h2c_request_body_reaches_the_origin_byte_exact(
    start_proxy: StartProxy, h2c_origin: H2Origin, tmp_path: Path
) -> None:
    """A 3 MiB upload over h2c (more than any window) arrives whole at the origin."""
    proxy = await h2c_proxy(start_proxy, h2c_origin)
    body = pattern(3 << 20, seed=7)
    path = tmp_path / "body"
    path.write_bytes(body)
    code, out, err = await curl(
        "--http2-prior-knowledge",
        "-p",
        "-x",
        proxy.url,
        "--data-binary",
        f"@{path}",
        f"http://127.0.0.1:{h2c_origin.port}/echo",
    )
    assert code == 0, err
    echoed = json.loads(out)
    assert echoed["body_len"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_h2c_download_is_byte_exact(start_proxy: StartProxy, h2c_origin: H2Origin) -> None:
    """5 MiB down over h2c arrive whole."""
    proxy = await h2c_proxy(start_proxy, h2c_origin)
    url = f"http://127.0.0.1:{h2c_origin.port}/stream?size=5242880"
    code, out, err = await curl("--http2-prior-knowledge", "-p", "-x", proxy.url, url)
    assert code == 0, err
    assert out == pattern(5 << 20)


async def test_h2c_with_http2_off_is_spliced(
    start_proxy: StartProxy, h2c_origin: H2Origin, logs: LogCapture
) -> None:
    """With --http2 false curl's h2c preface is relayed untouched: the h2c origin answers it,
    the proxy shows a tunnel, no request."""
    proxy = await h2c_proxy(start_proxy, h2c_origin, http2=False)
    url = f"http://127.0.0.1:{h2c_origin.port}/echo"
    code, out, err = await curl("--http2-prior-knowledge", "-p", "-x", proxy.url, url)
    assert code == 0, err
    assert json.loads(out)["version"] == "2"
    (line,) = await logs.wait_for("tunnel")
    assert line["bytes_out"] > 0
    assert logs.events("access") == []
    host = f"127.0.0.1:{h2c_origin.port}"
    assert proxy.sample("proxy_intercept_splices_total", host=host, reason="h2c") == 1


async def test_httpx_http2_through_interception(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """httpx http2=True through interception speaks HTTP/2 to the proxy (ALPN h2)."""
    async with http2_httpx(intercepting, ca_files) as client:
        responses = [
            await client.get(f"https://localhost:{secure_origin.port}/echo/{i}") for i in range(3)
        ]
    assert [r.http_version for r in responses] == ["HTTP/2"] * 3
    assert [r.json()["target"] for r in responses] == ["/echo/0", "/echo/1", "/echo/2"]
    lines = await logs.wait_for("access", 3)
    assert {line["status"] for line in lines} == {200}
    await one_tunnel_intercepted(intercepting, secure_origin)


async def test_h2c_to_an_http1_origin_is_a_502(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """The client chose h2c for an origin that speaks only HTTP/1.1: a clear 502, not a hang."""
    proxy = await h2c_proxy(start_proxy, origin)
    code, out, err = await curl(
        "--http2-prior-knowledge", "-p", "-x", proxy.url, "-w", "%{http_code}", origin.url("/echo")
    )
    assert code == 0, err
    assert out.endswith(b"502")
    (line,) = await logs.wait_for("access")
    assert line["error"] == "connection_terminated"


# -- HTTP/2 upstream: an h2 origin over TLS, through interception ---------------------------


@pytest.fixture
async def intercepting_h2(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca_file: str, tls_h2_origin: H2Origin
) -> RunningProxy:
    return await intercepting_proxy(start_proxy, ca_files, tls_ca_file, tls_h2_origin.port)


async def test_curl_and_httpx_get_http2_end_to_end(
    intercepting_h2: RunningProxy, ca_files: CAFiles, tls_h2_origin: H2Origin, logs: LogCapture
) -> None:
    """curl --http2 and httpx http2=True through interception: HTTP/2 on both legs."""
    url = tls_h2_origin.url("/echo")
    code, out, err = await curl(
        "--http2",
        "--cacert",
        ca_files.cert,
        "-x",
        intercepting_h2.url,
        "-w",
        "\n%{http_version}",
        url,
    )
    assert code == 0, err
    assert out.endswith(b"\n2")
    async with http2_httpx(intercepting_h2, ca_files) as client:
        response = await client.get(url)
    assert response.http_version == "HTTP/2"
    assert response.json()["version"] == "2"
    assert tls_h2_origin.versions == ["2", "2"]
    host = tls_h2_origin.authority
    await logs.wait_for("access", 2)
    # Two client connections, one upstream HTTP/2 connection carrying both streams.
    assert intercepting_h2.sample("proxy_upstream_tls_seconds_count", host=host) == 1
    assert len(tls_h2_origin.peers) == 1


async def test_trailers_are_relayed_byte_exact(
    intercepting_h2: RunningProxy, ca_files: CAFiles, tls_h2_origin: H2Origin
) -> None:
    """grpc-status and grpc-message reach the client as the origin sent them."""
    async with h2_client.connected(
        intercepting_h2.port, tls_h2_origin.authority, ca_files.client_context()
    ) as client:
        answer = await client.fetch(
            h2_client.get(
                tls_h2_origin.authority,
                "/grpc?status=5&messages=2",
                "https",
                TE_TRAILERS,
                (b"content-type", b"application/grpc"),
            )
        )
    assert answer.status == 200
    assert answer.body == (b"\x00\x00\x00\x00\x05hello") * 2
    assert answer.trailers == [(b"grpc-status", b"5"), (b"grpc-message", b"caf\xc3\xa9 %20 ok")]


async def test_timings_are_true_over_http2(
    intercepting_h2: RunningProxy, ca_files: CAFiles, tls_h2_origin: H2Origin, logs: LogCapture
) -> None:
    """Headers held 300 ms land in ttfb; 5 messages 100 ms apart in total, not ttfb; the
    second call on the connection is reused, with no connect or tls of its own."""
    path = "/grpc?head_ms=300&messages=5&gap_ms=100"
    async with h2_client.connected(
        intercepting_h2.port, tls_h2_origin.authority, ca_files.client_context()
    ) as client:
        for _ in range(2):
            answer = await client.fetch(
                h2_client.get(tls_h2_origin.authority, path, "https", TE_TRAILERS)
            )
            assert answer.trailers[0] == (b"grpc-status", b"0")
    first, second = await logs.wait_for("access", 2)
    for line in (first, second):
        assert line["ttfb_ms"] >= 300
        assert line["total_ms"] - line["ttfb_ms"] >= 400
        assert line["ttfb_ms"] < line["total_ms"]
    assert first["reused"] is False
    assert first["tls_ms"] is not None
    assert first["connect_ms"] is not None
    assert second["reused"] is True
    assert (second["connect_ms"], second["tls_ms"], second["dns_ms"]) == (None, None, None)
    host = tls_h2_origin.authority
    assert intercepting_h2.sample("proxy_upstream_connections_total", host=host, kind="new") == 1
    assert intercepting_h2.sample("proxy_upstream_connections_total", host=host, kind="reused") == 1
    assert len(tls_h2_origin.peers) == 1


async def test_grpc_to_an_http1_only_origin_is_a_clear_502(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """A gRPC request to an origin whose ALPN offers no h2: 502 with a Proxy-Status reason."""
    async with h2_client.connected(
        intercepting.port, f"localhost:{secure_origin.port}", ca_files.client_context()
    ) as client:
        answer = await client.fetch(
            h2_client.get(
                f"localhost:{secure_origin.port}",
                "/echo",
                "https",
                TE_TRAILERS,
                (b"content-type", b"application/grpc"),
            )
        )
    assert answer.status == 502
    status = answer.header(b"proxy-status") or b""
    assert b"error=http_protocol_error" in status
    (line,) = await logs.wait_for("access")
    assert line["error"] == "http_protocol_error"


async def test_origin_that_starts_choosing_h2_while_remembered_as_http1_gets_502s(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca: trustme.CA, tls_ca_file: str
) -> None:
    """An origin that chose http/1.1, restarted on its port choosing h2: the HTTP/2 client's
    requests go on over HTTP/1.1 while the proxy remembers it so, and every one is answered."""
    statuses: list[int] = []

    async def fetch(proxy: RunningProxy, authority: str) -> None:
        async with h2_client.connected(proxy.port, authority, ca_files.client_context()) as c:
            for _ in range(2):
                statuses.append((await c.fetch(h2_client.get(authority, "/echo"))).status)

    async with h2_origin(tls_ca, alpn=("http/1.1",)) as before:
        proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, before.port)
        await fetch(proxy, before.authority)
    async with h2_origin(tls_ca, port=before.port) as after:
        await fetch(proxy, after.authority)
    assert statuses == [200] * 4
    assert (before.versions, after.versions) == (["1.1"] * 2, ["1.1"] * 2)


async def test_request_trailers_are_dropped_on_the_way_to_an_http2_origin(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca: trustme.CA, tls_ca_file: str
) -> None:
    """A request's trailers reach an HTTP/2 origin after its body, byte for byte; fields
    the proxy owns or that are hop-by-hop stay behind (RFC 9110 §6.5.1)."""
    sent = [
        (b"x-checksum", b"sha256=abc"),
        (b"x-odd", b"caf\xc3\xa9 %20"),
        (b"proxy-authorization", b"Basic dTpw"),  # the proxy's, never the origin's
    ]
    async with raw_h2_origin(tls_ca) as origin:
        proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, origin.port)
        context = ca_files.client_context()
        async with h2_client.connected(proxy.port, origin.authority, context) as client:
            head = h2_client.get(origin.authority, "/upload")
            head[0] = (b":method", b"POST")
            sid = client.start(head, pattern(16_000), end=False)
            client.h2.send_headers(sid, sent, end_stream=True)
            client.flush()
            answer = await client.wait(sid)
    assert answer.status == 200
    assert origin.bodies == [pattern(16_000)]
    assert origin.trailers == [sent[:2]]


async def test_client_reset_before_the_answer_leaves_the_upstream_stream_waiting(
    intercepting_h2: RunningProxy, ca_files: CAFiles, tls_h2_origin: H2Origin, logs: LogCapture
) -> None:
    """A client that resets its stream while the origin holds the head back: the upstream
    stream is reset at once (the origin sees the client go) and the call is logged 499."""
    async with h2_client.connected(
        intercepting_h2.port, tls_h2_origin.authority, ca_files.client_context()
    ) as client:
        sid = client.start(
            h2_client.get(tls_h2_origin.authority, "/grpc?head_ms=8000", "https", TE_TRAILERS)
        )
        await until(lambda: len(tls_h2_origin.versions) == 1)  # the origin holds it now
        client.h2.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        (line,) = await logs.wait_for("access")
        await until(lambda: tls_h2_origin.disconnects == 1)
    assert (line["status"], line["error"]) == (499, "client_disconnected")
    assert line["ttfb_ms"] is None


async def test_origin_goaway_kills_the_streams_it_promised_to_finish(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca: trustme.CA, tls_ca_file: str
) -> None:
    """An origin's graceful GOAWAY in the middle of a response: that stream (named in it)
    still ends whole, trailers included (RFC 9113 §6.8); the next request gets a new
    connection."""
    async with raw_h2_origin(tls_ca, goaway=True) as origin:
        proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, origin.port)
        async with h2_client.connected(
            proxy.port, origin.authority, ca_files.client_context()
        ) as client:
            answers = [
                await client.fetch(h2_client.get(origin.authority, "/", "https", TE_TRAILERS))
                for _ in range(2)
            ]
    for answer in answers:
        assert (answer.status, answer.reset) == (200, None)
        assert answer.body == b"before after"
        assert answer.trailers == [(b"grpc-status", b"0")]
    assert origin.connections == 2


async def test_stream_waiting_for_a_slot_under_a_stream_limit_of_one_deadlocks(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca: trustme.CA,
    tls_ca_file: str,
    logs: LogCapture,
) -> None:
    """The origin allows one stream at a time, the proxy one connection to it: a second call
    waits for the first one's slot (not for a dial the pool limit forbids), and that wait is
    its queue phase; it rides the same connection."""
    async with h2_origin(tls_ca, max_streams=1) as origin:
        proxy = await intercepting_proxy(
            start_proxy,
            ca_files,
            tls_ca_file,
            origin.port,
            pool_limit_per_host=1,
            pool_wait_timeout=5.0,
        )
        async with h2_client.connected(
            proxy.port, origin.authority, ca_files.client_context()
        ) as client:
            held = client.start(
                h2_client.get(origin.authority, "/grpc?head_ms=300", "https", TE_TRAILERS)
            )
            second = client.start(h2_client.get(origin.authority, "/grpc", "https", TE_TRAILERS))
            answers = [await client.wait(held), await client.wait(second)]
    assert [(a.status, a.trailers[:1]) for a in answers] == [(200, [(b"grpc-status", b"0")])] * 2
    first, waited = await logs.wait_for("access", 2)  # in the order they ended
    assert first["reused"] is False
    assert waited["queue_ms"] >= 300  # the first held its head (and its slot) 300 ms
    assert waited["reused"] is True
    assert (waited["dns_ms"], waited["connect_ms"], waited["tls_ms"]) == (None, None, None)
    assert len(origin.peers) == 1
    queued = proxy.sample("proxy_upstream_queue_seconds_sum", host=origin.authority)
    assert queued is not None
    assert queued >= 0.3


async def test_idle_upstream_http2_connection_is_kept_forever(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca: trustme.CA, tls_ca_file: str
) -> None:
    """An upstream HTTP/2 connection with no stream is closed after
    --upstream-keepalive-timeout, as an idle HTTP/1.1 one is: it holds a pool slot."""
    async with raw_h2_origin(tls_ca, goaway=False) as origin:
        proxy = await intercepting_proxy(
            start_proxy, ca_files, tls_ca_file, origin.port, upstream_keepalive_timeout=0.3
        )
        async with h2_client.connected(
            proxy.port, origin.authority, ca_files.client_context()
        ) as client:
            answer = await client.fetch(h2_client.get(origin.authority, "/", "https", TE_TRAILERS))
            assert answer.body == b"before after"
            await until(lambda: origin.closed_by_client == 1)
            again = await client.fetch(h2_client.get(origin.authority, "/", "https", TE_TRAILERS))
    assert again.body == b"before after"
    assert origin.connections == 2


async def test_sigterm_sends_goaway_finishes_streams_in_flight_and_refuses_new_ones(
    ca_files: CAFiles, tls_ca_file: str, tls_h2_origin: H2Origin
) -> None:
    """SIGTERM to the CLI: each HTTP/2 client connection gets a graceful GOAWAY naming its
    last stream; that stream (5 messages 100 ms apart) still ends whole, a stream opened
    after the GOAWAY is refused (REFUSED_STREAM) without reaching the origin, and the proxy
    exits 0 once the connection is done, well inside the drain timeout."""
    origin = tls_h2_origin
    async with proxy_process(
        *("--admin-listen", "off", "--shutdown-grace", "0.2", "--drain-timeout", "30"),
        *intercept_flags(ca_files, tls_ca_file, origin.port),
    ) as (process, proxy_url):
        async with h2_client.connected(
            URL(proxy_url).port or 0, origin.authority, ca_files.client_context()
        ) as client:
            path = "/grpc?head_ms=100&messages=5&gap_ms=100"
            in_flight = client.start(h2_client.get(origin.authority, path, "https", TE_TRAILERS))
            await until(lambda: len(origin.versions) == 1)  # it reached the origin
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                while not client.goaways:
                    await client.pump()
            late = client.start(h2_client.get(origin.authority, "/echo"))
            answer = await client.wait(in_flight)
            refused = await client.wait(late)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    assert client.goaways == [(in_flight, ErrorCodes.NO_ERROR)]
    assert (answer.status, answer.reset) == (200, None)
    assert answer.body == b"\x00\x00\x00\x00\x05hello" * 5
    assert answer.trailers[0] == (b"grpc-status", b"0")
    assert refused.reset == ErrorCodes.REFUSED_STREAM
    assert origin.versions == ["2"]  # the refused stream never went upstream


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_http2_upstream_on_uvloop_is_a_502(
    ca_files: CAFiles, tls_ca_file: str, tls_h2_origin: H2Origin, loop: str
) -> None:
    """The CLI on either event loop: curl --http2 through interception gets HTTP/2 from the h2
    origin, over HTTP/2 both ways, and curl's h2c inside a CONNECT does too."""
    origin = tls_h2_origin
    async with (
        h2_origin(None) as plain,
        proxy_process(
            *("--admin-listen", "off", "--event-loop", loop),
            *intercept_flags(ca_files, tls_ca_file, origin.port),
            *("--connect-http-ports", str(plain.port)),
        ) as (_, proxy_url),
    ):
        answers = [
            await curl("--http2", "--cacert", ca_files.cert, "-x", proxy_url, origin.url("/echo")),
            await curl(
                *("--http2-prior-knowledge", "-p", "-x", proxy_url),
                f"http://127.0.0.1:{plain.port}/echo",
            ),
        ]
    for code, out, err in answers:
        assert code == 0, err
        assert json.loads(out)["version"] == "2", out


async def test_early_hints_from_an_http2_origin_are_dropped(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca: trustme.CA, tls_ca_file: str
) -> None:
    """An h2 origin's 103 Early Hints reaches the HTTP/2 client ahead of the final response,
    as an informational HEADERS with the origin's fields and our Via (RFC 9113 §8.1)."""
    async with raw_h2_origin(tls_ca, hints=True) as origin:
        proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, origin.port)
        async with h2_client.connected(
            proxy.port, origin.authority, ca_files.client_context()
        ) as client:
            answer = await client.fetch(h2_client.get(origin.authority, "/", "https", TE_TRAILERS))
    assert answer.interim == [[(b":status", b"103"), EARLY_HINT, (b"via", b"2 tracing-proxy")]]
    assert (answer.status, answer.body) == (200, b"before after")
