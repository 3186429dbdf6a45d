"""Interim (1xx) responses to the client: our own 100 Continue and the upstream's 1xx.

aiohttp's client reads and discards 1xx responses inside ``ClientResponse.start``; it
has no public hook for them. ``InterimResponse``, the session's response class, lets a
per-request ``InterimSink`` (set in a context variable around the upstream request) see
each one first, so 103 Early Hints and the like reach the client (RFC 9110 §15.2).

aiohttp's router answers ``Expect: 100-continue`` before any middleware runs, that is
before the proxy has looked at credentials, the client, the destination or a loop. Every
admin route therefore gets ``defer_expectation`` as its expect handler (the proxy
listener's handler calls it first, as the router would), and ``Continue`` sends
the 100 when the upstream starts reading the body: after those checks and after the
upstream connection is made (RFC 9110 §10.1.1). Both kinds of interim response are written
straight to the request's stream writer, ahead of the final response, as aiohttp's own
expect handler does.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import aiohttp
from aiohttp import web
from aiohttp.connector import Connection
from aiohttp.http import HttpVersion11, RawResponseMessage

from proxy.rules import headers
from proxy.rules import response as response_rules


def expects_continue(request: web.BaseRequest) -> bool:
    """The request waits for 100 Continue (RFC 9110 §10.1.1 ignores it from HTTP/1.0)."""
    expect = request.headers.get("Expect")
    return (
        expect is not None and request.version >= HttpVersion11 and expect.lower() == "100-continue"
    )


async def defer_expectation(request: web.BaseRequest) -> None:
    """The routes' expect handler: 417 for an unknown expectation, nothing for 100-continue."""
    if request.version >= HttpVersion11 and not expects_continue(request):
        # Our own text: aiohttp's quotes the client's field value back.
        raise web.HTTPExpectationFailed(text="only Expect: 100-continue is supported\n")


@runtime_checkable
class InterimWriter(Protocol):
    """A writer that frames a 1xx itself (HTTP/2: a HEADERS frame, RFC 9113 §8.1)."""

    async def write_interim(self, status: int, fields: Sequence[tuple[bytes, bytes]]) -> None: ...


async def write_interim(
    request: web.BaseRequest, status: int, reason: str, fields: Sequence[tuple[bytes, bytes]]
) -> None:
    """Send a 1xx ahead of the final response, in the framing of the request's protocol."""
    writer = request.writer
    if isinstance(writer, InterimWriter):
        await writer.write_interim(status, fields)
    else:
        await writer.write(interim_head(status, reason, fields))


class Continue:
    """The 100 Continue one request may still be owed; sent at most once, never late."""

    __slots__ = ("_request", "pending")

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request
        self.pending = expects_continue(request)

    async def send(self) -> None:
        """The body is about to be read: invite it."""
        if self.pending:
            self.pending = False
            await write_interim(self._request, 100, "Continue", ())

    def withdraw(self, response: web.StreamResponse) -> None:
        """A final response goes out first: no 100 after it, and close if the body is unread.

        Call before ``response`` is prepared. The client is waiting for a 100, so its body may
        never come; ``Connection: close`` lets aiohttp end the connection after reading
        whatever the client sends anyway, instead of waiting for the next request.
        """
        if self.pending:
            self.pending = False
            if not self._request.content.is_eof():
                response.force_close()

    async def body(self) -> AsyncIterator[bytes]:
        """The request body for the upstream session, sending the 100 on its first read."""
        await self.send()
        async for chunk in self._request.content.iter_any():
            yield chunk

    def __repr__(self) -> str:
        return f"<Continue pending={self.pending}>"


def interim_head(status: int, reason: str, raw: Iterable[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 1xx response head; field bytes are copied as they are."""
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in raw)
    return f"HTTP/1.1 {status} {reason}\r\n".encode("utf-8", "surrogateescape") + lines + b"\r\n"


InterimSink = Callable[[RawResponseMessage], Awaitable[None]]

# The sink of the upstream request being sent by the current task; ``None``: discard.
INTERIM_SINK: Final[contextvars.ContextVar[InterimSink | None]] = contextvars.ContextVar(
    "interim_sink", default=None
)


class InterimResponse(aiohttp.ClientResponse):
    """A client response that shows each 1xx it skips to the current ``INTERIM_SINK``.

    ``start`` loops over ``connection.protocol.read()`` until a final response; reading
    through a wrapper on that one protocol, for that one call, is the narrowest way in
    (aiohttp is pinned below 3.15, and tests/test_interim.py holds it to this).
    """

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        sink = INTERIM_SINK.get()
        protocol: Any = connection.protocol
        if sink is None or protocol is None:
            return await super().start(connection)
        read = protocol.read

        async def read_showing_interim() -> Any:
            message, payload = await read()
            if 100 <= message.code < 200 and message.code != 101:
                await sink(message)
            return message, payload

        protocol.read = read_showing_interim
        try:
            return await super().start(connection)
        finally:
            del protocol.read  # the pooled protocol reads as before


class InterimRelay:
    """Writes an upstream 1xx to the client: hop-by-hop fields out, our Via in."""

    def __init__(self, request: web.BaseRequest, request_id_header: bytes, via: str) -> None:
        self._request = request
        self._rid_key = request_id_header
        self._via = via.encode("latin-1")

    async def __call__(self, message: RawResponseMessage) -> None:
        # RFC 9110 §15.2: never to an HTTP/1.0 client. A 100 answers an Expect the proxy
        # did not forward; the client's own 100 comes from ``Continue``.
        if message.code == 100 or self._request.version < HttpVersion11:
            return
        raw = message.raw_headers
        drop = headers.response_drop_set(raw, self._rid_key)
        # Same rules as a final head (proxy.rules.response): raising here ends the upstream
        # request (aiohttp closes that connection) and the forwarder answers 502.
        version = (message.version.major, message.version.minor)
        invalid = response_rules.check(version, message.code, message.reason, raw)
        if invalid is not None:
            raise invalid
        kept = headers.kept_fields(raw, drop)
        kept.append((b"Via", self._via))
        await write_interim(self._request, message.code, message.reason, kept)

    def __repr__(self) -> str:
        return f"<InterimRelay {self._request.method} {self._request.path}>"
