"""The stream inside a CONNECT: read its first bytes, then hand it to whoever serves it.

After the proxy has answered a CONNECT itself, the client connection no longer belongs to
the CONNECT's ``RequestHandler``. ``Opener`` reads the first bytes (to tell a TLS ClientHello
from an HTTP/1.x request line, and to read the ClientHello whole) and stops reading;
``HandOver`` then carries every event to the protocol serving that stream (a second
``RequestHandler`` for HTTP/1.1, plain or over TLS), and the lost connection back to the
first one. The CONNECT handler must keep awaiting ``HandOver.closed``: once it returns,
aiohttp closes the connection under the stream (tls-facts, Q1).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp.http import WebSocketReader
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from proxy.rules.connect import Opening, classify_opening
from proxy.rules.tls_hello import (
    CLIENT_HELLO,
    ClientHello,
    HandshakeReader,
    HelloError,
    parse_client_hello,
)


@dataclass(frozen=True, slots=True)
class InnerStream:
    """A stream inside a CONNECT: every request on it goes to ``origin``."""

    origin: URL  # scheme://host:port of the CONNECT target ("https" once TLS is terminated)
    connect_id: str  # the CONNECT's request id, for the log

    def __repr__(self) -> str:
        return f"<InnerStream {self.origin}>"


class Opener(asyncio.Protocol):
    """Collects a stream's first bytes until ``classify_opening`` can tell what they start,
    and for TLS, when ``hello_limit`` is set, until the whole ClientHello has come.

    The interception decision reads the client's ALPN offer, and no certificate is minted
    for bytes that only look like TLS. A ClientHello may span several records and reads;
    ``hello_limit`` bounds the bytes read for it. ``hello`` is then the parsed offer, or
    the ``HelloError`` that stopped the reading.

    It is also the payload sink for ``RequestHandler.set_parser``, which flushes the bytes
    that arrived behind the CONNECT head (a client that did not wait for the 200).
    """

    def __init__(self, transport: asyncio.Transport, limit: int, hello_limit: int = 0) -> None:
        self._transport = transport
        self._limit = limit
        self._hello_limit = hello_limit
        self._handshake: HandshakeReader | None = None
        self._server_protocol: asyncio.BaseProtocol | None = None
        self.data = bytearray()
        self.hello: ClientHello | HelloError | None = None
        self.opening: asyncio.Future[Opening] = asyncio.get_running_loop().create_future()

    def take_over(self, server_protocol: RequestHandler) -> None:
        """Become the connection's protocol; the bytes aiohttp kept come first."""
        self._server_protocol = server_protocol
        self._transport.set_protocol(self)
        # set_parser is typed for aiohttp's WebSocket reader; it only calls feed_data/feed_eof.
        server_protocol.set_parser(cast(WebSocketReader, self))

    def data_received(self, data: bytes) -> None:
        if self.opening.done():
            return  # cannot happen: reading stops at the verdict
        self.data += data
        if self._handshake is not None:
            self._read_hello(data)
            return
        verdict = classify_opening(bytes(self.data), self._limit)
        if verdict is Opening.TLS and self._hello_limit:
            self._handshake = HandshakeReader(self._hello_limit)
            self._read_hello(bytes(self.data))
        elif verdict is not None:
            self._settle(verdict)

    def _read_hello(self, data: bytes) -> None:
        """Feed the handshake reader; settle once the first message is whole, or cannot be."""
        assert self._handshake is not None
        try:
            if len(self.data) > self._hello_limit:
                raise HelloError("too_large")
            messages = self._handshake.feed(data)
            if messages:
                if messages[0].type != CLIENT_HELLO:
                    raise HelloError("not_client_hello")
                self.hello = parse_client_hello(messages[0].body)
            elif self._handshake.stopped:  # a record other than handshake came first
                raise HelloError("not_client_hello")
            else:
                return
        except HelloError as exc:
            self.hello = exc
        self._settle(Opening.TLS)

    def eof_received(self) -> bool:
        self._settle(Opening.OTHER)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(Opening.OTHER)
        if self._server_protocol is not None:  # its bookkeeping (connection count) ends too
            self._server_protocol.connection_lost(exc)

    def _settle(self, verdict: Opening) -> None:
        if not self.opening.done():
            self._transport.pause_reading()  # the rest is for whoever serves the stream
            self.opening.set_result(verdict)

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data_received(data)
        return False, b""  # (not at EOF, no unparsed tail)

    def feed_eof(self) -> None:
        """The server protocol's connection_lost: already seen through connection_lost."""

    def __repr__(self) -> str:
        return f"<Opener bytes={len(self.data)} done={self.opening.done()}>"


class HandOver(asyncio.Protocol):
    """The stream's protocol for its whole life: events go to the inner handler once attached,
    buffered until then, and to whoever takes the stream over after it.

    Buffering matters for TLS: the handshake's last flight can carry the first request,
    which reaches this protocol before ``loop.start_tls`` has returned (tls-facts, Q1).
    The inner handler sees a ``StreamTransport``: a WebSocket's relay that takes the stream
    over after its 101 replaces the protocol behind this one, so the end of the stream still
    reaches the CONNECT's handler, however it comes. ``received`` and ``sent`` count the
    stream's bytes as the proxy read and wrote them (decrypted, for TLS); ``closed_by`` says
    who ended it first: ``client`` (EOF, close or reset) or ``proxy``.
    """

    def __init__(self, server_protocol: asyncio.BaseProtocol) -> None:
        self._server_protocol = server_protocol  # the CONNECT's handler, told of the close
        self._inner: asyncio.Protocol | None = None
        self._pending: list[bytes] = []
        self._eof = False
        self.received = 0
        self.sent = 0
        self.closed_by: str | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def attach(self, inner: asyncio.Protocol, transport: asyncio.Transport, early: bytes) -> None:
        """Start ``inner`` on ``transport`` and give it ``early`` plus what was buffered."""
        self._inner = inner
        inner.connection_made(StreamTransport(transport, self))
        for chunk in (early, *self._pending):
            if chunk:
                self.received += len(chunk)
                inner.data_received(chunk)
        self._pending.clear()
        if self._eof:
            inner.eof_received()

    def take_over(self, protocol: asyncio.Protocol) -> None:
        """From now on ``protocol`` gets the stream's events (``StreamTransport.set_protocol``)."""
        self._inner = protocol

    @property
    def inner(self) -> asyncio.Protocol | None:
        return self._inner

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            self._pending.append(data)
        else:
            self.received += len(data)
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        self.ended("client")
        if self._inner is None:
            self._eof = True
            return True
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def ended(self, by: str) -> None:
        """``by`` ended the stream, unless someone did already."""
        if self.closed_by is None:
            self.closed_by = by

    def connection_lost(self, exc: Exception | None) -> None:
        """Also called by the proxy itself after a failed handshake; runs once."""
        if self.closed.done():
            return
        self.ended("client")  # unless the proxy closed it first, the client went away
        try:
            if self._inner is not None:
                self._inner.connection_lost(exc)
            self._server_protocol.connection_lost(exc)
        finally:
            self.closed.set_result(None)

    def __repr__(self) -> str:
        return (
            f"<HandOver inner={self._inner!r} received={self.received} sent={self.sent} "
            f"closed_by={self.closed_by}>"
        )


class StreamTransport(asyncio.Transport):
    """The stream's transport as the handlers on it see it: the real one, with its writes
    counted, its close attributed, and its protocol kept behind the ``HandOver``."""

    __slots__ = ("_handover", "_transport")

    def __init__(self, transport: asyncio.Transport, handover: HandOver) -> None:
        super().__init__()
        self._transport = transport
        self._handover = handover

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._handover.sent += len(data)
        self._transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        chunks = list(list_of_data)
        self._handover.sent += sum(len(chunk) for chunk in chunks)
        self._transport.writelines(chunks)

    def close(self) -> None:
        self._handover.ended("proxy")
        self._transport.close()

    def abort(self) -> None:
        self._handover.ended("proxy")
        self._transport.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._handover.take_over(cast(asyncio.Protocol, protocol))

    def get_protocol(self) -> asyncio.BaseProtocol:
        inner = self._handover.inner
        assert inner is not None  # this transport exists only once a handler is attached
        return inner

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def __repr__(self) -> str:
        return f"<StreamTransport {self._transport!r} sent={self._handover.sent}>"
