"""grpcio clients and a grpcio server through the proxy (issue 21).

Every call runs in a thread (grpcio's blocking API) bounded by ``asyncio.wait_for``, and each
RPC has its own deadline. The server speaks TLS on one port and h2c on another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
import grpc
import pytest
import trustme
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests import otlp, test_intercept
from tests.conftest import LogCapture, RunningProxy, pattern
from tests.otlp import StartReceiver, attributes
from tests.test_intercept import CAFiles, intercepting_proxy
from tests.tls import TLSOrigin

StartProxy = Callable[..., Awaitable[RunningProxy]]
ca_files = test_intercept.ca_files
otlp_receiver = otlp.otlp_receiver
T = TypeVar("T")

BIG: Final = 4 << 20  # the issue's 4 MiB message
# grpcio refuses a message over 4 MiB by default; the frame header makes ours a little more.
_MESSAGE_LIMITS: Final = [
    ("grpc.max_receive_message_length", 2 * BIG),
    ("grpc.max_send_message_length", 2 * BIG),
]


def _unary(request: bytes, context: Any) -> bytes:
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b"hello " + request


def _stream(request: bytes, context: Any) -> Iterator[bytes]:
    for n in range(5):
        if n:
            time.sleep(0.1)
        yield f"message {n}".encode()


def _collect(requests: Iterator[bytes], context: Any) -> bytes:
    return b",".join(requests)


def _chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    for request in requests:
        yield b"re: " + request


def _echo(request: bytes, context: Any) -> bytes:
    return request


def _slow(request: bytes, context: Any) -> bytes:
    time.sleep(1.0)  # past the client's deadline
    return b"late"


@dataclass
class GrpcOrigin:
    tls_port: int  # TLS, a leaf for localhost from the tests' origin CA
    plain_port: int  # h2c: what an insecure channel speaks


@pytest.fixture
def grpc_origin(tls_ca: trustme.CA) -> Iterator[GrpcOrigin]:
    """A grpcio server (bytes in, bytes out) for ``pkg.Svc`` on a TLS and a plain port."""
    leaf = tls_ca.issue_cert("localhost")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_MESSAGE_LIMITS)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Collect": grpc.stream_unary_rpc_method_handler(_collect),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("pkg.Svc", handlers)])
    credentials = grpc.ssl_server_credentials(
        [(leaf.private_key_pem.bytes(), b"".join(p.bytes() for p in leaf.cert_chain_pems))]
    )
    tls_port = server.add_secure_port("127.0.0.1:0", credentials)
    plain_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield GrpcOrigin(tls_port, plain_port)
    finally:
        server.stop(0).wait(5)


def tls_channel(proxy: RunningProxy, port: int, *roots: str) -> grpc.Channel:
    """A TLS channel to localhost:``port`` through the proxy, trusting the CA files ``roots``."""
    pem = b"".join(Path(root).read_bytes() for root in roots)
    return grpc.secure_channel(
        f"localhost:{port}",
        grpc.ssl_channel_credentials(root_certificates=pem),
        options=[("grpc.http_proxy", proxy.url), ("grpc.enable_retries", 0), *_MESSAGE_LIMITS],
    )


def insecure_channel(proxy: RunningProxy, port: int) -> grpc.Channel:
    """An insecure channel through the proxy: the h2c preface inside a CONNECT."""
    return grpc.insecure_channel(
        f"localhost:{port}",
        options=[("grpc.http_proxy", proxy.url), ("grpc.enable_retries", 0), *_MESSAGE_LIMITS],
    )


async def in_thread(work: Callable[[], T]) -> T:
    return await asyncio.wait_for(asyncio.to_thread(work), 30)


async def every_kind_of_call(open_channel: Callable[[], grpc.Channel]) -> list[Any]:
    """Unary, NOT_FOUND, server-, client- and bidi-streaming on a channel of their own (in a
    thread, at most 30 s): what each answered."""

    def calls() -> list[Any]:
        with open_channel() as channel:
            unary = channel.unary_unary("/pkg.Svc/Unary")
            answers: list[Any] = [unary(b"world", timeout=10)]
            try:
                unary(b"missing", timeout=10)
                answers.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                answers.append(exc.code())
            answers.append(list(channel.unary_stream("/pkg.Svc/Stream")(b"", timeout=10)))
            answers.append(
                channel.stream_unary("/pkg.Svc/Collect")(iter([b"a", b"b", b"c"]), timeout=10)
            )
            answers.append(
                list(channel.stream_stream("/pkg.Svc/Chat")(iter([b"x", b"y"]), timeout=10))
            )
            return answers

    return await in_thread(calls)


EVERY_ANSWER: Final = [
    b"hello world",
    grpc.StatusCode.NOT_FOUND,
    [f"message {n}".encode() for n in range(5)],
    b"a,b,c",
    [b"re: x", b"re: y"],
]
EVERY_LINE: Final = [
    ("/pkg.Svc/Unary", 0),
    ("/pkg.Svc/Unary", 5),
    ("/pkg.Svc/Stream", 0),
    ("/pkg.Svc/Collect", 0),
    ("/pkg.Svc/Chat", 0),
]


@dataclass
class Served:
    """A proxy serving a gRPC channel's calls, and how to open that channel."""

    proxy: RunningProxy
    channel: Callable[[], grpc.Channel]
    host: str


@pytest.fixture(params=["tls", "h2c"])
async def served(
    request: pytest.FixtureRequest,
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    grpc_origin: GrpcOrigin,
) -> Served:
    """TLS through interception with our CA trusted, or insecure (h2c) to an http port."""
    if request.param == "tls":
        port = grpc_origin.tls_port
        proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, port)
        return Served(proxy, lambda: tls_channel(proxy, port, ca_files.cert), f"localhost:{port}")
    port = grpc_origin.plain_port
    proxy = await start_proxy(connect_http_ports=(port,))
    return Served(proxy, lambda: insecure_channel(proxy, port), f"localhost:{port}")


async def test_grpcio_calls_are_each_visible(served: Served, logs: LogCapture) -> None:
    """Unary, NOT_FOUND, server-, client- and bidi-streaming calls get their answers; each has
    an access line with its path, protocol, grpc_status and phases, and is counted."""
    assert await every_kind_of_call(served.channel) == EVERY_ANSWER
    lines = await logs.wait_for("access", len(EVERY_LINE))
    assert [(line["path"], line["grpc_status"]) for line in lines] == EVERY_LINE
    assert {line["protocol"] for line in lines} == {"HTTP/2"}
    assert all(line["ttfb_ms"] is not None and line["total_ms"] for line in lines)
    assert lines[0]["connect_ms"] is not None  # the first call dialled the origin
    assert [line["reused"] for line in lines] == [False] + [True] * (len(lines) - 1)
    assert lines[2]["total_ms"] - lines[2]["ttfb_ms"] >= 400  # 5 messages, 100 ms apart
    proxy, host = served.proxy, served.host
    assert proxy.sample("proxy_upstream_ttfb_seconds_count", host=host) == len(EVERY_LINE)
    assert proxy.sample("proxy_upstream_grpc_total", host=host, code="OK") == 4
    assert proxy.sample("proxy_upstream_grpc_total", host=host, code="NOT_FOUND") == 1


async def test_grpc_deadline_exceeded(served: Served, logs: LogCapture) -> None:
    """A call past its deadline ends DEADLINE_EXCEEDED for the client and is logged as the
    end that gave up first ended it; the next call on the channel works."""

    def calls() -> tuple[grpc.StatusCode, bytes]:
        with served.channel() as channel:
            try:
                channel.unary_unary("/pkg.Svc/Slow")(b"", timeout=0.3)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            return code, channel.unary_unary("/pkg.Svc/Unary")(b"again", timeout=10)

    assert await in_thread(calls) == (grpc.StatusCode.DEADLINE_EXCEEDED, b"hello again")
    lines = {line["path"]: line for line in await logs.wait_for("access", 2)}
    slow, unary = lines["/pkg.Svc/Slow"], lines["/pkg.Svc/Unary"]
    # Both ends time the call (the server from grpc-timeout): whichever gives up first.
    assert (slow["status"], slow["error"], slow["grpc_status"]) in (
        (200, None, 4),  # the server's DEADLINE_EXCEEDED, relayed
        (499, "client_disconnected", None),  # the client's RST_STREAM came first
    )
    assert unary["grpc_status"] == 0


async def test_grpc_4mib_message_both_ways(served: Served, logs: LogCapture) -> None:
    """A 4 MiB request comes back as a 4 MiB answer, byte for byte."""
    message = pattern(BIG, seed=3)

    def call() -> bytes:
        with served.channel() as channel:
            answer: bytes = channel.unary_unary("/pkg.Svc/Echo")(message, timeout=20)
            return answer

    assert await in_thread(call) == message
    (line,) = await logs.wait_for("access")
    assert line["grpc_status"] == 0
    assert line["bytes_in"] > BIG
    assert line["bytes_out"] > BIG


# -- HTTP/2 serving off: every gRPC client is spliced, and still works ------------------------


async def every_kind_of_call_is_spliced(
    proxy: RunningProxy,
    logs: LogCapture,
    channel: Callable[[], grpc.Channel],
    port: int,
    reason: str,
) -> None:
    """Every kind of call on ``channel`` works, and the proxy only spliced its connection:
    one tunnel line, the splice counted under ``reason``, no access line."""
    assert await every_kind_of_call(channel) == EVERY_ANSWER
    (line,) = await logs.wait_for("tunnel")
    assert line["bytes_out"] > 0
    host = f"localhost:{port}"
    assert proxy.sample("proxy_intercept_splices_total", host=host, reason=reason) == 1
    assert logs.events("access") == []


async def test_tls_grpc_with_http2_off_is_spliced(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    grpc_origin: GrpcOrigin,
    logs: LogCapture,
) -> None:
    """--http2 false: grpcio's h2-only ClientHello is spliced (ALPN) to the origin, whose own
    certificate it trusts, and every kind of call works."""
    port = grpc_origin.tls_port
    proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, port, http2=False)
    channel = partial(tls_channel, proxy, port, ca_files.cert, tls_ca_file)
    await every_kind_of_call_is_spliced(proxy, logs, channel, port, "alpn")
    assert proxy.sample("proxy_intercept_certificates_minted_total") == 0


@pytest.mark.parametrize("port_is", ["connect_http_port", "intercepted_connect_port"])
async def test_insecure_grpc_with_http2_off_is_refused(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    grpc_origin: GrpcOrigin,
    logs: LogCapture,
    port_is: str,
) -> None:
    """--http2 false: an insecure channel's h2c preface is spliced to the origin (an http port,
    or an intercepted host's port), and every kind of call works."""
    port = grpc_origin.plain_port
    if port_is == "connect_http_port":
        proxy = await start_proxy(connect_http_ports=(port,), http2=False)
    else:
        proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, port, http2=False)
    channel = partial(insecure_channel, proxy, port)
    await every_kind_of_call_is_spliced(proxy, logs, channel, port, "h2c")


async def test_grpc_client_that_rejects_the_ca_without_an_alert_is_spliced_on_its_retry(
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    grpc_origin: GrpcOrigin,
    logs: LogCapture,
) -> None:
    """A channel that trusts only the origin's CA hangs up on our leaf without an alert: its
    first call fails, the rejection is counted, and its reconnect is spliced and works."""
    port = grpc_origin.tls_port
    proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, port)

    def calls() -> tuple[grpc.StatusCode, bytes]:
        with tls_channel(proxy, port, tls_ca_file) as channel:
            unary = channel.unary_unary("/pkg.Svc/Unary")
            try:
                unary(b"first", timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            # The channel reconnects after its backoff (about a second): wait for it.
            return code, unary(b"again", timeout=20, wait_for_ready=True)

    assert await in_thread(calls) == (grpc.StatusCode.UNAVAILABLE, b"hello again")
    rejected, spliced = await logs.wait_for("tunnel", 2)
    assert rejected["outcome"] == "tls_failed"
    assert spliced["outcome"] == "closed"
    assert spliced["bytes_out"] > 0
    host = f"localhost:{port}"
    # It checks our certificate before its Finished: it hangs up during our handshake.
    assert proxy.sample("proxy_intercept_failures_total", host=host, reason="closed") == 1
    assert logs.events("access") == []


# -- spans -------------------------------------------------------------------------------------


async def test_grpc_error_status_leaves_the_client_span_unset(
    start_proxy: StartProxy,
    otlp_receiver: StartReceiver,
    ca_files: CAFiles,
    tls_ca_file: str,
    grpc_origin: GrpcOrigin,
) -> None:
    """Each call is a CLIENT span named service/method with the RPC attributes; a status
    other than OK fails it with error.type the code's name (OTel gRPC client span)."""
    receiver = await otlp_receiver()
    port = grpc_origin.tls_port
    proxy = await intercepting_proxy(
        start_proxy,
        ca_files,
        tls_ca_file,
        port,
        otlp_endpoint=receiver.endpoint,
        otlp_batch_size=1,
    )

    def calls() -> grpc.StatusCode:
        with tls_channel(proxy, port, ca_files.cert) as channel:
            unary = channel.unary_unary("/pkg.Svc/Unary")
            assert unary(b"world", timeout=10) == b"hello world"
            try:
                unary(b"missing", timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    assert await in_thread(calls) is grpc.StatusCode.NOT_FOUND
    spans = [span for span in await receiver.wait_for_spans(2) if span.name != "CONNECT"]
    assert [span.name for span in spans] == ["pkg.Svc/Unary"] * 2
    ok, missing = spans
    for span, code in ((ok, 0), (missing, 5)):
        assert span.kind == Span.SPAN_KIND_CLIENT
        got = attributes(span)
        assert (got["rpc.system"], got["rpc.service"], got["rpc.method"]) == (
            "grpc",
            "pkg.Svc",
            "Unary",
        )
        assert got["rpc.grpc.status_code"] == code
        assert got["http.response.status_code"] == 200
        assert "ttfb" in {event.name for event in span.events}
    assert ok.status.code == Status.STATUS_CODE_UNSET
    assert "error.type" not in attributes(ok)
    assert missing.status.code == Status.STATUS_CODE_ERROR
    assert attributes(missing)["error.type"] == "NOT_FOUND"


# -- the issue's "done when", through the CLI (uvloop) -----------------------------------------


async def test_grpcio_with_grpc_proxy_through_the_cli_is_seen_call_by_call(
    ca_files: CAFiles,
    tls_ca_file: str,
    grpc_origin: GrpcOrigin,
    otlp_receiver: StartReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """grpcio with ``grpc_proxy`` set (the variable it reads), its host intercepted and the CA
    trusted, against ``python -m proxy``: it gets its answers, and each call is an access line
    with its path, grpc_status and every phase, counts in the ttfb histogram, and is a span."""
    receiver = await otlp_receiver()
    port = grpc_origin.tls_port
    async with test_intercept.intercepting_cli(
        ca_files,
        tls_ca_file,
        TLSOrigin("127.0.0.1", port),
        *("--otlp-endpoint", receiver.endpoint, "--otlp-batch-size", "1"),
    ) as running:
        monkeypatch.setenv("grpc_proxy", running.proxy)

        def calls() -> tuple[bytes, list[bytes]]:
            roots = grpc.ssl_channel_credentials(Path(ca_files.cert).read_bytes())
            with grpc.secure_channel(f"localhost:{port}", roots) as channel:
                unary = channel.unary_unary("/pkg.Svc/Unary")(b"world", timeout=10)
                return unary, list(channel.unary_stream("/pkg.Svc/Stream")(b"", timeout=10))

        assert await in_thread(calls) == (b"hello world", EVERY_ANSWER[2])
        lines = await test_intercept._child_lines(running, "access", 2)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(10)) as session,
            session.get(running.metrics) as response,
        ):
            text = await response.text()
        spans = await receiver.wait_for_spans(2)
    assert [(line["path"], line["grpc_status"]) for line in lines] == [
        ("/pkg.Svc/Unary", 0),
        ("/pkg.Svc/Stream", 0),
    ]
    first, second = lines
    for phase in ("queue", "connect", "tls", "ttfb", "total"):
        assert first[f"{phase}_ms"] is not None, first
    assert first["reused"] is False
    assert second["reused"] is True
    assert second["total_ms"] - second["ttfb_ms"] >= 400  # 5 messages, 100 ms apart
    host = f"localhost:{port}"
    assert f'proxy_upstream_ttfb_seconds_count{{host="{host}"}} 2.0' in text
    # The CONNECT looked the name up before its 200: the dial found it in the cache.
    assert f'proxy_upstream_dns_cache_total{{host="{host}",result="hit"}} 1.0' in text
    names = {span.name for span in spans}
    assert {"pkg.Svc/Unary", "pkg.Svc/Stream"} <= names
