"""HTTP/2 towards a client: each stream becomes one aiohttp request on the proxy's one path.

``H2Server`` serves an HTTP/2 connection (h2 after ALPN on an intercepted CONNECT, or h2c
with prior knowledge inside a CONNECT to an http port). Every stream it opens is turned into
an aiohttp ``BaseRequest`` and handed to the same handler and request factory as an HTTP/1.1
request (``ProxyHandler``: the client ACL, limits, destination policy, loop detection, the
forwarder, its outcome, log line and span). What differs lives here:

- ``StreamWriter``: aiohttp's response head, body and end become HEADERS, DATA and
  END_STREAM (trailers too); it waits for the client's window;
- the request body is a ``BodyReader``: acknowledged to the client only as it is read;
- ``H2StreamTransport``: what the request sees as its transport. Closing it resets the stream
  (a response cut short must not look complete, RFC 9113 §8.1), not the connection.

An answer the proxy gives itself goes out as an HTTP/2 response while the head can still be
sent; after that, a failure resets the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler
from h2.errors import ErrorCodes
from multidict import CIMultiDict, CIMultiDictProxy
from structlog.typing import FilteringBoundLogger
from yarl import URL

from proxy.h2 import core
from proxy.h2.core import Fields, H2Core, Limits, StreamGone
from proxy.h2.streams import READER_LIMIT, H2Connection
from proxy.observe import log
from proxy.wire.inner import InnerStream

HTTP2: Final = HttpVersion(2, 0)
# What a stream's handler is cancelled with when its client resets the stream or its
# connection is lost: the request is over (RFC 9113 §8.1), so the forwarder stops, logs a 499
# and resets its upstream stream.
CLIENT_RESET: Final = "the client reset the stream"

# RFC 9113 §8.2.2: connection-specific fields never appear in HTTP/2 (TE only as "trailers").
CONNECTION_SPECIFIC: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)

RequestFactory = Callable[..., web.BaseRequest]
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Told of every connection closed by the core (reason) and of each connection's start and end.
ErrorSink = Callable[[str], None]


def request_message(fields: Fields) -> RawRequestMessage:
    """An aiohttp request message from an HTTP/2 request header section (RFC 9113 §8.3.1).

    :authority becomes Host when the client sent none; cookie fields are joined with "; "
    as a message for HTTP/1.1 needs (§8.2.3). h2 has checked the pseudo-fields already.
    """
    pseudo: dict[bytes, bytes] = {}
    raw: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    has_host = False
    for name, value in fields:
        if name[:1] == b":":
            pseudo[name] = value
        elif name == b"cookie":
            cookies.append(value)
        else:
            has_host = has_host or name == b"host"
            raw.append((name, value))
    if cookies:
        raw.append((b"cookie", b"; ".join(cookies)))
    authority = pseudo.get(b":authority")
    if authority is not None and not has_host:
        raw.insert(0, (b"host", authority))
    method = pseudo.get(b":method", b"GET").decode("ascii")
    target = (pseudo.get(b":path") or authority or b"").decode("utf-8", "surrogateescape")
    path, _, query = target.partition("?")
    url = URL.build(path=path, query_string=query, encoded=True)
    headers = CIMultiDict(
        (name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in raw
    )
    return RawRequestMessage(
        method,
        target,
        HTTP2,
        CIMultiDictProxy(headers),
        tuple(raw),
        False,  # should_close: HTTP/2 has no per-request close
        None,
        False,
        False,
        url,
    )


def response_fields(status: int, headers: CIMultiDict[str]) -> list[tuple[bytes, bytes]]:
    """:status, then aiohttp's response fields, lower-cased, without connection-specific ones."""
    out = [(b":status", str(status).encode("ascii"))]
    for name, value in headers.items():
        key = name.lower().encode("latin-1")
        if key not in CONNECTION_SPECIFIC:
            out.append((key, value.encode("utf-8", "surrogateescape")))
    return out


class H2StreamTransport(asyncio.Transport):
    """One HTTP/2 stream seen as a transport: closing it resets the stream, not the connection
    (``proxy.wire.inner.StreamTransport`` is another thing: a CONNECT's inner stream)."""

    def __init__(self, connection: H2Server, stream_id: int) -> None:
        super().__init__()
        self._connection = connection
        self._stream_id = stream_id
        self.ended = False  # END_STREAM sent, or the stream was reset

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._connection.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def is_closing(self) -> bool:
        return self.ended or self._connection.transport is None

    def close(self) -> None:
        """The response will not be completed: RST_STREAM after what was written."""
        if not self.ended:
            self.ended = True
            self._connection.reset(self._stream_id, ErrorCodes.INTERNAL_ERROR)

    def abort(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<H2StreamTransport {self._stream_id} ended={self.ended}>"


class StreamHandle:
    """What a request on a stream sees as its protocol (aiohttp reads these attributes)."""

    __slots__ = ("peername", "sockname", "ssl_context", "stream", "trailers", "transport")

    def __init__(self, transport: H2StreamTransport, stream: InnerStream) -> None:
        self.transport = transport
        self.stream = stream
        self.trailers: Fields = ()  # the request's, once its body has ended with them
        self.ssl_context = transport.get_extra_info("sslcontext")
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")

    def __repr__(self) -> str:
        return f"<StreamHandle {self.transport!r} {self.stream!r}>"


class StreamWriter(AbstractStreamWriter):
    """aiohttp's response writer for one stream: head, DATA, trailers, END_STREAM."""

    def __init__(self, connection: H2Server, stream_id: int, transport: H2StreamTransport) -> None:
        self._connection = connection
        self._stream_id = stream_id
        self._transport = transport
        self._head: list[tuple[bytes, bytes]] | None = None  # written, not yet sent
        self.head_sent = False
        self.trailers: Fields = ()  # sent with the end of the stream when set

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        # "HTTP/2.0 200 OK": HTTP/2 carries the code only (RFC 9113 §8.3.2).
        self._head = response_fields(int(status_line.split(" ", 2)[1]), headers)

    def send_headers(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._connection.send_head(self._stream_id, head, end=False)
            self.head_sent = True

    async def write_interim(self, status: int, fields: Fields) -> None:
        """A 1xx ahead of the final response (RFC 9113 §8.1)."""
        head = [(b":status", str(status).encode("ascii")), *fields]
        self._connection.send_head(self._stream_id, head, end=False)

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.send_headers()
        if chunk:
            self.output_size += len(chunk)
            await self._connection.send_body(self._stream_id, chunk, False)

    async def write_eof(self, chunk: bytes = b"") -> None:
        if self._transport.ended:
            return
        if self._head is not None and not chunk and not self.trailers:
            head, self._head = self._head, None
            self._transport.ended = True
            self._connection.send_head(self._stream_id, head, end=True)
            self.head_sent = True
            return
        self.send_headers()
        self.output_size += len(chunk)
        if self.trailers:
            if chunk:
                await self._connection.send_body(self._stream_id, chunk, False)
            self._transport.ended = True
            self._connection.send_head(self._stream_id, self.trailers, end=True)
        else:
            self._transport.ended = True
            await self._connection.send_body(self._stream_id, chunk, True)

    async def drain(self) -> None:
        await self._connection.drain()

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        """The proxy relays bodies as they are; nothing asks for compression here."""

    def enable_chunking(self) -> None:
        """HTTP/2 frames bodies itself (RFC 9113 §8.1): nothing to do."""

    def __repr__(self) -> str:
        return f"<StreamWriter {self._stream_id} sent={self.output_size}>"


class _Stream:
    __slots__ = ("body", "handle", "task", "transport", "writer")

    def __init__(self, handle: StreamHandle, writer: StreamWriter, body: StreamReader) -> None:
        self.handle = handle
        self.transport = handle.transport
        self.writer = writer
        self.body = body
        self.task: asyncio.Task[None] | None = None


class H2Server(H2Connection):
    """Serves one client's HTTP/2 connection inside a CONNECT; ends with it."""

    def __init__(
        self,
        handler: Handler,
        request_factory: RequestFactory,
        stream: InnerStream,
        *,
        limits: Limits,
        on_error: ErrorSink,
    ) -> None:
        super().__init__(H2Core(client_side=False, limits=limits))
        self._handler = handler
        self._factory = request_factory
        self._inner = stream
        self._on_error = on_error
        self._streams: dict[int, _Stream] = {}
        self._draining = False  # our GOAWAY for the shutdown's drain went out
        self._logger: FilteringBoundLogger = log.get_logger()

    # -- events ------------------------------------------------------------------------

    def on_event(self, event: core.Event) -> None:
        if isinstance(event, core.Data):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.body.feed_data(event.data)
            else:
                self.core.ack(event.stream_id, len(event.data))  # nobody reads it
        elif isinstance(event, core.Head):
            self._open(event)
        elif isinstance(event, core.End | core.Trailers):
            stream = self._streams.get(event.stream_id)
            if stream is not None and not stream.body.is_eof():
                if isinstance(event, core.Trailers):  # read by the forwarder at the body's end
                    stream.handle.trailers = event.fields
                stream.body.feed_eof()
        elif isinstance(event, core.Reset):
            self._reset_by_client(event.stream_id)

    def _open(self, head: core.Head) -> None:
        sid = head.stream_id
        transport = H2StreamTransport(self, sid)
        writer = StreamWriter(self, sid, transport)
        body: StreamReader = EMPTY_PAYLOAD
        if not head.end:
            body = self.body_reader(sid, READER_LIMIT)
        handle = StreamHandle(transport, self._inner)
        stream = self._streams[sid] = _Stream(handle, writer, body)
        message = request_message(head.fields)
        stream.task = asyncio.ensure_future(self._serve(sid, stream, message))

    async def _serve(self, sid: int, stream: _Stream, message: RawRequestMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        request = self._factory(
            message, stream.body, cast(RequestHandler, stream.handle), stream.writer, task
        )
        try:
            response = await self._handler(request)
            await response.prepare(request)
            await response.write_eof()
        except (StreamGone, ConnectionError):
            pass  # the client reset the stream or left: nothing more to say
        except Exception as exc:
            # ProxyHandler answers what it can; this is a failure of the proxy itself.
            self._logger.exception("h2_stream_failed", stream=sid, error=type(exc).__name__)
            if not stream.writer.head_sent and not stream.transport.ended:
                fields = [(b":status", b"500"), (b"content-length", b"0")]
                self.send_head(sid, fields, end=True)
                stream.transport.ended = True
        finally:
            if not stream.transport.ended:
                stream.transport.close()  # the handler returned without ending the stream
            self.flush()
            self._forget(sid)

    def _reset_by_client(self, sid: int) -> None:
        self.stream_gone(sid)
        stream = self._streams.get(sid)
        if stream is not None:
            self._cancel(stream, ConnectionResetError(CLIENT_RESET))
            self._forget(sid)

    def _cancel(self, stream: _Stream, exc: ConnectionError, *, by_client: bool = True) -> None:
        """The stream's answer can no longer be given or is no longer wanted: its request is
        cancelled, with ``CLIENT_RESET`` when the client did it (else it is cut at shutdown).

        RST_STREAM means the stream is no longer needed (RFC 9113 §8.7); it must not leave
        the request running: a reset stream no longer counts against the client's stream
        limit, so the requests of reset streams would be unbounded (CVE-2023-44487). A
        stream reset before its task first ran is never forwarded and leaves no access line.
        """
        stream.transport.ended = True
        if not stream.body.is_eof():
            stream.body.set_exception(exc)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel(CLIENT_RESET if by_client else None)

    def _forget(self, sid: int) -> None:
        """The stream is over for this connection, which closes once its last is after a GOAWAY."""
        self._streams.pop(sid, None)
        if self.core.going_away and not self._streams:
            self.close()

    # -- sending (for the stream writers) ----------------------------------------------

    def send_head(self, sid: int, fields: Fields, *, end: bool) -> None:
        self.core.send_head(sid, fields, end=end)
        self.flush()

    def reset(self, sid: int, code: int) -> None:
        self.core.reset(sid, code)
        self.stream_gone(sid)
        self.flush()

    # -- connection ----------------------------------------------------------------------

    def go_away(self) -> bool:
        """Drain: a graceful GOAWAY; closes at once when no stream is open. True if idle."""
        self._draining = True
        self.core.go_away()
        self.flush()
        if not self._streams:
            self.close()
            return True
        return False

    def on_error(self, reason: str) -> None:
        self._on_error(reason)
        self._logger.info(
            "h2_connection_closed",
            reason=reason,
            connect_id=self._inner.connect_id,
            streams=len(self._streams),
        )

    def on_lost(self, exc: Exception | None) -> None:
        """No stream can be answered any more: every request still running is cancelled.
        After our drain's GOAWAY, the connection is closed by the shutdown's backstop."""
        gone = ConnectionResetError("the HTTP/2 connection closed")
        for stream in list(self._streams.values()):
            self._cancel(stream, gone, by_client=not self._draining)

    def __repr__(self) -> str:
        return f"<H2Server {self._inner!r} streams={len(self._streams)} {self.core!r}>"
