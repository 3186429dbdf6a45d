"""Guards for the private aiohttp APIs in docs/aiohttp-internals.md, against the real library.

Each test pins one assumption that the proxy's behaviour tests would not catch on their
own (a fallback that still works, only slower), or states the shape a subclass relies on.
Moving to a new aiohttp: run this file first.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_parser import RawResponseMessage
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.wire.forwarding import ReadyForwardedResponse
from tests.conftest import Origin

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """Start a low-level aiohttp server with a given handler on loopback; yields its port."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(web.Server(handler), "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


async def _raw_get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


class _Deferred(web.StreamResponse):
    _send_headers_immediately = False


@pytest.mark.parametrize(
    ("response_class", "headers_first"), [(web.StreamResponse, True), (_Deferred, False)]
)
async def test_send_headers_immediately_false_holds_headers_until_the_first_write(
    serve: Callable[[Handler], Awaitable[int]],
    response_class: type[web.StreamResponse],
    headers_first: bool,
) -> None:
    """With the flag off, prepare() writes nothing: a byte written around it arrives first."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = response_class()
        response.content_length = 4
        await response.prepare(request)
        assert request.transport is not None
        request.transport.write(b"MARK")  # straight to the socket, past the response writer
        await response.write(b"body")
        await response.write_eof()
        return response

    received = await _raw_get(await serve(handler))
    assert received.startswith(b"HTTP/1.1 200") is headers_first
    assert received.startswith(b"MARK") is not headers_first
    assert ReadyForwardedResponse._send_headers_immediately is False


async def test_read_timeout_restarted_mid_body_cuts_a_quiet_upstream(origin: Origin) -> None:
    """Setting ResponseHandler.read_timeout and calling start_timeout() bounds the next read."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
        session.get(origin.url("/stream?size=1048576&delay_ms=60000")) as resp,
    ):
        await asyncio.wait_for(resp.content.readany(), 10)  # the first chunk; then quiet
        assert resp.connection is not None
        protocol = resp.connection.protocol
        assert protocol is not None
        protocol.read_timeout = 0.05
        protocol.start_timeout()
        with pytest.raises(aiohttp.ServerTimeoutError):  # not wait_for's own TimeoutError
            await asyncio.wait_for(resp.content.read(), 10)


async def test_resolve_host_takes_host_port_traces_and_returns_results() -> None:
    """TCPConnector._resolve_host(host, port, traces=) answers with ResolveResult dicts."""
    connector = aiohttp.TCPConnector()
    try:
        results = await connector._resolve_host("localhost", 8080, traces=None)
    finally:
        await connector.close()
    assert {r["host"] for r in results} & {"127.0.0.1", "::1"}
    assert {r["port"] for r in results} == {8080}
    assert {r["family"] for r in results} <= {socket.AF_INET, socket.AF_INET6}


def test_wait_for_available_connection_has_the_signature_we_override() -> None:
    """BaseConnector._wait_for_available_connection(key, traces) is a coroutine function."""
    method = aiohttp.TCPConnector._wait_for_available_connection
    assert inspect.iscoroutinefunction(method)
    assert list(inspect.signature(method).parameters) == ["self", "key", "traces"]


async def test_request_handler_state_that_the_listener_guard_reads(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    """_messages is a deque, _waiter a future slot, _request_count an int, _close a bool."""
    seen: list[RequestHandler] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        assert isinstance(request.protocol, RequestHandler)
        seen.append(request.protocol)
        return web.Response(text="ok")

    await _raw_get(await serve(handler))
    protocol = seen[0]
    assert isinstance(protocol._messages, collections.deque)
    assert protocol._request_count == 1
    assert isinstance(protocol._close, bool)
    assert hasattr(protocol, "_waiter")
    assert isinstance(protocol._loop, asyncio.AbstractEventLoop)


def test_err_info_and_handle_error_have_the_shapes_we_build_and_override() -> None:
    """_ErrInfo(status, exc, message) and handle_error(request, status, exc, message)."""
    exc = ValueError("x")
    info = _ErrInfo(status=400, exc=exc, message="m")
    assert (info.status, info.exc, info.message) == (400, exc, "m")
    parameters = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"]


def test_server_and_runner_hooks_that_the_guarded_runner_uses() -> None:
    """web.Server keeps request_handler, request_factory, _loop; ServerRunner has shutdown()."""
    server = web.Server(lambda request: None, loop=asyncio.new_event_loop())  # type: ignore[arg-type, return-value]
    try:
        assert callable(server.request_handler)
        assert callable(server.request_factory)
        assert isinstance(server._loop, asyncio.AbstractEventLoop)
    finally:
        server._loop.close()
    assert inspect.iscoroutinefunction(web.ServerRunner.shutdown)
    assert inspect.iscoroutinefunction(web.BaseRequest._prepare_hook)
    assert "_prepare_hook" in web.BaseRequest.__dict__  # what ProxyRequest overrides


async def test_prepare_hook_of_a_request_factory_sees_every_response_head() -> None:
    """A BaseRequest subclass's _prepare_hook runs before a handler's response and before the
    500 aiohttp writes for a handler that raised, and may still change the head."""
    seen: list[int] = []

    class Hooked(web.BaseRequest):
        async def _prepare_hook(self, response: web.StreamResponse) -> None:
            seen.append(response.status)
            response.headers["X-Hooked"] = "yes"

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/raise":
            raise RuntimeError("handler failed")
        return web.Response(text="ok")

    loop = asyncio.get_running_loop()
    server = web.Server(
        handler,
        request_factory=lambda message, payload, protocol, writer, task: Hooked(
            message, payload, protocol, writer, task, loop
        ),
        access_log=None,
    )
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("/", "/raise"):
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.headers["X-Hooked"] == "yes"
    finally:
        await runner.cleanup()
    assert seen == [200, 500]


def test_raw_response_message_has_the_fields_an_http2_interim_is_built_with() -> None:
    """proxy.h2.upstream builds an origin's 1xx as a RawResponseMessage, its fields in order
    (the C parser's class when it is in use, a NamedTuple otherwise)."""
    fields = CIMultiDictProxy(CIMultiDict(Link="</a>"))
    raw = ((b"link", b"</a>"),)
    message = RawResponseMessage(HttpVersion11, 103, "", fields, raw, False, None, False, False)
    assert (message.version, message.code, message.reason) == (HttpVersion11, 103, "")
    assert (message.headers, message.raw_headers) == (fields, raw)
    assert (message.should_close, message.compression, message.upgrade, message.chunked) == (
        False,
        None,
        False,
        False,
    )
