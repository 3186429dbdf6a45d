"""proxy.h2.streams and proxy.h2.server's pieces against the real aiohttp they lean on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict
from yarl import URL

from proxy.h2.server import CONNECTION_SPECIFIC, request_message, response_fields
from proxy.h2.streams import BodyReader
from proxy.wire.inner import InnerStream

Read = Callable[[BodyReader], Awaitable[bytes]]


async def _readany(reader: BodyReader) -> bytes:
    out = b""
    while chunk := await reader.readany():
        out += chunk
    return out


async def _read_n(reader: BodyReader) -> bytes:
    out = b""
    while chunk := await reader.read(7):
        out += chunk
    return out


async def _readexactly(reader: BodyReader) -> bytes:
    return await reader.readexactly(29)


async def _iter_chunked(reader: BodyReader) -> bytes:
    return b"".join([chunk async for chunk in reader.iter_chunked(5)])


async def _readline(reader: BodyReader) -> bytes:
    return b"".join([line async for line in reader])


async def _read_all(reader: BodyReader) -> bytes:
    return await reader.read()


class _Connected(BaseProtocol):
    @property
    def connected(self) -> bool:
        return True


@pytest.mark.parametrize(
    "read", [_readany, _read_n, _readexactly, _iter_chunked, _readline, _read_all]
)
async def test_every_read_acknowledges_what_it_took(read: Read) -> None:
    """Whatever StreamReader method reads the body, each byte read is acknowledged once
    (all of them end in ``_read_nowait_chunk``, docs/aiohttp-internals.md)."""
    loop = asyncio.get_running_loop()
    acked: list[int] = []
    reader = BodyReader(acked.append, 2**16, _Connected(loop), loop)
    data = b"line one\nline two\nline three\n"  # 29 bytes
    reader.feed_data(data[:11])
    reader.feed_data(data[11:])
    reader.feed_eof()
    assert acked == []  # nothing is returned to the peer before it is read
    assert await asyncio.wait_for(read(reader), 5) == data
    assert sum(acked) == len(data)


async def test_a_stream_handle_stands_in_for_the_request_handler() -> None:
    """aiohttp's BaseRequest reads only ssl_context, peername, sockname and transport from its
    protocol: an HTTP/2 stream's handle gives the client address and the stream's transport."""
    from proxy.h2.server import StreamHandle

    class _Transport(asyncio.Transport):
        def get_extra_info(self, name: str, default: object = None) -> object:
            return {"peername": ("127.0.0.9", 5555), "sockname": ("127.0.0.1", 3128)}.get(
                name, default
            )

    transport = _Transport()
    handle = StreamHandle(transport, InnerStream(URL("https://x:443"), "id"))  # type: ignore[arg-type]
    message = request_message([(b":method", b"GET"), (b":path", b"/a?b=1"), (b":authority", b"x")])
    loop = asyncio.get_running_loop()
    request = web.BaseRequest(
        message,
        BodyReader(lambda n: None, 1, _Connected(loop), loop),
        handle,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        loop,
    )
    assert request.remote == "127.0.0.9"
    assert request.transport is transport
    assert request.secure is False
    assert (request.method, request.path, request.query_string) == ("GET", "/a", "b=1")
    assert request.version == (2, 0)
    assert request.headers["Host"] == "x"


def test_request_message_joins_cookies_and_keeps_an_explicit_host() -> None:
    """RFC 9113 §8.2.3: cookie fields become one; §8.3.1: Host wins over :authority."""
    message = request_message(
        [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", b"a.test"),
            (b":path", b"/p"),
            (b"cookie", b"a=1"),
            (b"host", b"b.test"),
            (b"cookie", b"b=2"),
        ]
    )
    assert message.raw_headers == ((b"host", b"b.test"), (b"cookie", b"a=1; b=2"))
    assert (message.method, message.path, message.should_close) == ("POST", "/p", False)


def test_response_fields_drop_connection_specific_fields() -> None:
    """RFC 9113 §8.2.2: none of the HTTP/1.1 connection fields go into an HTTP/2 response."""
    headers = CIMultiDict(
        [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked"), ("Connection", "close")]
    )
    assert response_fields(200, headers) == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
    ]
    assert {b"connection", b"transfer-encoding", b"te"} <= CONNECTION_SPECIFIC
