"""grpcio client and server over TLS, through interception with the CA trusted (issue 21)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import trustme

from tests import test_intercept
from tests.conftest import LogCapture, RunningProxy
from tests.test_intercept import CAFiles

StartProxy = Callable[..., Awaitable[RunningProxy]]
ca_files = test_intercept.ca_files


def _unary(request: bytes, context: Any) -> bytes:
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b"hello " + request


def _stream(request: bytes, context: Any) -> Iterator[bytes]:
    for n in range(5):
        if n:
            time.sleep(0.1)
        yield f"message {n}".encode()


@pytest.fixture
def grpc_origin(tls_ca: trustme.CA) -> Iterator[int]:
    """A grpcio server (bytes in, bytes out) on a TLS port for ``localhost``."""
    leaf = tls_ca.issue_cert("localhost")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("pkg.Svc", handlers)])
    credentials = grpc.ssl_server_credentials(
        [(leaf.private_key_pem.bytes(), b"".join(p.bytes() for p in leaf.cert_chain_pems))]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait(5)


@pytest.fixture
async def grpc_proxy(
    start_proxy: StartProxy, ca_files: CAFiles, tls_ca_file: str, grpc_origin: int
) -> RunningProxy:
    return await start_proxy(
        intercept=("localhost",),
        ca_cert=ca_files.cert,
        ca_key=ca_files.key,
        upstream_ca_file=tls_ca_file,
        connect_ports=(grpc_origin,),
    )


def _channel(proxy: RunningProxy, ca_files: CAFiles, port: int) -> grpc.Channel:
    with open(ca_files.cert, "rb") as file:
        roots = file.read()
    return grpc.secure_channel(
        f"localhost:{port}",
        grpc.ssl_channel_credentials(root_certificates=roots),
        options=[("grpc.http_proxy", proxy.url), ("grpc.enable_retries", 0)],
    )


async def test_grpcio_calls_through_interception_are_each_visible(
    grpc_proxy: RunningProxy, ca_files: CAFiles, grpc_origin: int, logs: LogCapture
) -> None:
    """Unary, NOT_FOUND and server-streaming calls get their answers; each call has an access
    line with its path, protocol, grpc_status and phases, and counts in the histograms."""

    def calls() -> tuple[bytes, grpc.StatusCode, list[bytes]]:
        with _channel(grpc_proxy, ca_files, grpc_origin) as channel:
            unary = channel.unary_unary("/pkg.Svc/Unary")
            answer = unary(b"world", timeout=10)
            try:
                unary(b"missing", timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            stream = list(channel.unary_stream("/pkg.Svc/Stream")(b"", timeout=10))
        return answer, code, stream

    answer, code, stream = await asyncio.wait_for(asyncio.to_thread(calls), 30)
    assert answer == b"hello world"
    assert code is grpc.StatusCode.NOT_FOUND
    assert stream == [f"message {n}".encode() for n in range(5)]

    lines = await logs.wait_for("access", 3)
    assert [(line["path"], line["grpc_status"]) for line in lines] == [
        ("/pkg.Svc/Unary", 0),
        ("/pkg.Svc/Unary", 5),
        ("/pkg.Svc/Stream", 0),
    ]
    assert {line["protocol"] for line in lines} == {"HTTP/2"}
    assert all(line["ttfb_ms"] is not None and line["total_ms"] for line in lines)
    assert lines[0]["tls_ms"] is not None  # the first call dialled the origin
    assert lines[2]["total_ms"] - lines[2]["ttfb_ms"] >= 400  # 5 messages, 100 ms apart
    host = f"localhost:{grpc_origin}"
    assert grpc_proxy.sample("proxy_upstream_ttfb_seconds_count", host=host) == 3
    assert grpc_proxy.sample("proxy_upstream_grpc_total", host=host, code="OK") == 2
    assert grpc_proxy.sample("proxy_upstream_grpc_total", host=host, code="NOT_FOUND") == 1
