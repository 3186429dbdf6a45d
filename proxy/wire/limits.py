"""What one client may hold and send on the proxy listener, and how a bad request head is answered.

aiohttp's ``RequestHandler`` has no deadline for a request head, no cap on connections and
no limit on a head's total size, answers every parse failure with a 400 that quotes the
offending bytes, and forwards a well-formed ``HTTP/2.0`` request line as if it were 1.1.
``GuardedRequestHandler`` closes those gaps; ``GuardedServer`` makes the listener use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.config import Settings
from proxy.observe import log
from proxy.observe.metrics import ClientStats, Refusals
from proxy.rules import errors, headers
from proxy.rules.errors import ProxyError
from proxy.rules.request_id import new_request_id
from proxy.wire.inner import InnerStream

# llhttp reports too many fields as a plain BadHttpMessage; this is its text (aiohttp 3.14).
_TOO_MANY_FIELDS: Final = "Too many headers received"


class HeadTooLarge(BadHttpMessage):
    """The request head grew past ``--max-request-header-size``."""


class HeadTimeout(BadHttpMessage):
    """The request head did not arrive within ``--request-header-timeout``."""


class VersionNotSupported(BadHttpMessage):
    """A well-formed request line with a major version other than 1."""


class CodingNotImplemented(BadHttpMessage):
    """Transfer-Encoding other than one ``chunked``, which llhttp accepts (``gzip, chunked``)."""


@dataclass(frozen=True, slots=True)
class ClientLimits:
    max_connections: int  # 0: unlimited
    header_bytes: int
    target_bytes: int
    header_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientLimits:
        return cls(
            settings.max_client_connections,
            settings.max_request_header_size,
            settings.max_request_target_length,
            settings.request_header_timeout,
        )

    def handler_kwargs(self) -> dict[str, Any]:
        """llhttp's own limits: the target is the request line's URL, a field is name + value."""
        return {"max_line_size": self.target_bytes, "max_field_size": self.header_bytes}


class Drainable(Protocol):
    """A connection serving many requests at once (HTTP/2), told when the drain begins."""

    def go_away(self) -> bool:
        """Refuse new requests, finish those in flight, then close; True if it was idle."""
        ...


# The proxy_denied_total reason of each answer to a head that is refused here.
REASONS: Final = {
    errors.REQUEST_TIMEOUT: "header_timeout",
    errors.VERSION_NOT_SUPPORTED: "version_not_supported",
    errors.HEADERS_TOO_LARGE: "headers_too_large",
    errors.TARGET_TOO_LONG: "target_too_long",
    errors.MALFORMED_REQUEST: "malformed_request",
    errors.CODING_NOT_IMPLEMENTED: "unsupported_transfer_coding",
}


class ListenerGuard:
    """Admits connections up to the cap and answers the request heads the proxy refuses."""

    def __init__(
        self,
        limits: ClientLimits,
        stats: ClientStats,
        refusals: Refusals,
        *,
        pseudonym: str,
        request_id_header: str,
    ) -> None:
        self.limits = limits
        self.stats = stats
        self.refusals = refusals
        self._pseudonym = pseudonym
        self._rid_header = request_id_header
        self._logger = log.get_logger()
        self._connections: set[GuardedRequestHandler] = set()
        self._sessions: set[Drainable] = set()

    def admit(self, connection: GuardedRequestHandler) -> bool:
        cap = self.limits.max_connections
        if cap and self.stats.open >= cap:
            self.stats.rejected += 1
            return False
        self.stats.open += 1
        self._connections.add(connection)
        return True

    def release(self, connection: GuardedRequestHandler) -> None:
        self.stats.open -= 1
        self._connections.discard(connection)

    def attach(self, stream: GuardedRequestHandler) -> None:
        """A stream inside an admitted CONNECT: closed when idle at the drain, not counted."""
        self._connections.add(stream)

    def detach(self, stream: GuardedRequestHandler) -> None:
        self._connections.discard(stream)

    def track(self, session: Drainable) -> None:
        """An HTTP/2 connection inside an admitted CONNECT: told of the drain, not counted."""
        self._sessions.add(session)

    def untrack(self, session: Drainable) -> None:
        self._sessions.discard(session)

    def close_idle(self) -> int:
        """Close every keep-alive connection waiting between requests; return how many.

        For the drain (RFC 9112 §9.6): a busy connection closes after the response it is
        sending, which says ``Connection: close``; an idle one would otherwise carry its
        client's next request into the refusals after the grace period. An HTTP/2
        connection gets a GOAWAY (RFC 9113 §6.8) and closes once its streams are done.
        """
        idle = [connection for connection in self._connections if connection.between_requests()]
        for connection in idle:
            # Not close(): that only ends the wait for a next request, leaving the socket
            # open until aiohttp's own shutdown. Nothing is in flight on these.
            connection.force_close()
        return len(idle) + sum(session.go_away() for session in list(self._sessions))

    def classify(self, exc: BaseException | None) -> ProxyError | None:
        """The answer to a head that failed to parse or was refused; None for other failures."""
        if isinstance(exc, HeadTimeout):
            return errors.REQUEST_TIMEOUT
        if isinstance(exc, VersionNotSupported):
            return errors.VERSION_NOT_SUPPORTED
        if isinstance(exc, CodingNotImplemented):
            return errors.CODING_NOT_IMPLEMENTED
        if isinstance(exc, HeadTooLarge) or (
            isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_FIELDS
        ):
            return errors.HEADERS_TOO_LARGE
        if isinstance(exc, LineTooLong):
            # The limit in its args tells a field (max_field_size) from the target.
            too_long_field = exc.args[1] == self.limits.header_bytes
            return errors.HEADERS_TOO_LARGE if too_long_field else errors.TARGET_TOO_LONG
        if isinstance(exc, HttpProcessingError):
            return errors.MALFORMED_REQUEST
        return None

    def answer(
        self, request: web.BaseRequest, err: ProxyError, exc: BaseException
    ) -> web.StreamResponse:
        """Our short text, never the parser's message: that quotes the client's bytes."""
        refused = REASONS[err]
        self.refusals(refused)
        request_id = new_request_id()
        response = errors.error_response(err, self._pseudonym, close=True)
        response.headers[self._rid_header] = request_id
        self._logger.info(
            "rejected",
            request_id=request_id,
            client=request.remote,
            status=err.status,
            error=err.error,
            refused=refused,
            reason=err.text,
            cause=type(exc).__name__,
        )
        return response


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol plus the connection cap, the head deadline and head checks.

    A head is awaited from the moment the connection opens until the first request is
    parsed, and again from the first byte of each keep-alive request; the idle time in
    between is ``--client-idle-timeout``'s business.
    """

    def __init__(
        self,
        manager: GuardedServer,
        guard: ListenerGuard,
        stream: InnerStream | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager
        self._guard = guard
        # Set on a handler serving a stream inside a CONNECT; its requests go to stream.origin.
        self.stream = stream
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def open_inner(self, stream: InnerStream) -> GuardedRequestHandler:
        """A handler for the stream inside this connection's CONNECT (same app and limits)."""
        return self._server.handler(stream)

    @property
    def guard(self) -> ListenerGuard:
        return self._guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.stream is not None:
            # A stream inside a CONNECT rides on a connection that was admitted already.
            self._guard.attach(self)
        elif not self._guard.admit(self):
            self.force_close()
            return
        else:
            self._admitted = True
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._admitted:
            self._admitted = False
            self._guard.release(self)
        elif self.stream is not None:
            self._guard.detach(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        parsed = len(self._messages) - queued
        if parsed > 0:
            self._disarm()
            self._check_parsed(parsed)
        elif data and self._awaiting_head():
            self._head_bytes += len(data)
            if self._head_bytes > self._guard.limits.header_bytes:
                self._refuse(HeadTooLarge("request head too large"))
            elif self._head_timer is None:
                self._arm()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        err = self._guard.classify(exc)
        if err is None or exc is None:  # a handler failure, not a bad head: aiohttp's 500
            return super().handle_error(request, status, exc, message)
        return self._guard.answer(request, err, exc)

    def between_requests(self) -> bool:
        """Served a request already and no byte of the next one has come: idle keep-alive."""
        return self._request_count > 0 and self._head_bytes == 0 and self._awaiting_head()

    def _awaiting_head(self) -> bool:
        # start() waits on _waiter only between requests; a body arrives while it does not.
        waiting = self._waiter is not None and not self._waiter.done()
        return not self._messages and (waiting or self._request_count == 0)

    def _check_parsed(self, count: int) -> None:
        """Refuse the first new request llhttp let through that we do not take."""
        for index in range(len(self._messages) - count, len(self._messages)):
            message, payload = self._messages[index]
            refusal = self._refusal(message)
            if refusal is not None:
                self._refuse(refusal, index)
                return
            if isinstance(message, RawRequestMessage) and _tail_lost(message):
                # Its answer says Connection: close and ends the connection; a client
                # that pipelined behind it retries on a new one (RFC 9112 §9.3.2).
                self._messages[index] = (message._replace(should_close=True), payload)

    def _refusal(self, message: RawRequestMessage | _ErrInfo) -> BadHttpMessage | None:
        if not isinstance(message, RawRequestMessage):
            return None  # already an error llhttp reported
        if message.version.major != 1:  # RFC 9112 §2.3: 505 for a version we do not speak
            return VersionNotSupported("not HTTP/1")
        if _head_size(message) > self._guard.limits.header_bytes:
            return HeadTooLarge("request head too large")
        if headers.codings_other_than_chunked(message.raw_headers):
            return CodingNotImplemented("transfer coding other than chunked")
        return None

    def _refuse(self, exc: BadHttpMessage, index: int | None = None) -> None:
        """Answer ``exc`` in place of the request at ``index`` (or next), then close."""
        entry = (_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)
        if index is None:
            self._messages.append(entry)
        else:
            self._messages[index] = entry
            while len(self._messages) > index + 1:
                self._messages.pop()  # pipelined after a refused head: never answered
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self.close()  # parse nothing more on this connection

    def _arm(self) -> None:
        timeout = self._guard.limits.header_timeout
        self._head_timer = self._loop.call_later(timeout, self._head_timed_out)

    def _disarm(self) -> None:
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._close or not self._awaiting_head():
            return  # gone, closing (shutdown, refusal), or a request is being served
        self._guard.stats.header_timeouts += 1
        self._refuse(HeadTimeout("request head not received in time"))


def _tail_lost(message: RawRequestMessage) -> bool:
    """An Upgrade the parser does not switch on: what the client sent behind it is gone.

    llhttp pauses after any request with ``Connection: upgrade`` and an Upgrade field;
    aiohttp's C parser keeps the bytes behind it only for a WebSocket upgrade (and
    CONNECT), and drops the rest of that read for any other token, such as h2c.
    """
    return (
        message.upgrade
        and message.method != "CONNECT"
        and not headers.is_websocket(message.headers.get("Upgrade"))
    )


def inner_stream(request: web.BaseRequest) -> InnerStream | None:
    """The stream inside a CONNECT that ``request`` arrived on, if it came on one.

    An HTTP/1 request's protocol is its ``GuardedRequestHandler``; an HTTP/2 stream's is a
    ``proxy.h2.server.StreamHandle``: both carry ``stream``.
    """
    stream = getattr(request.protocol, "stream", None)
    return stream if isinstance(stream, InnerStream) else None


def _head_size(message: RawRequestMessage) -> int:
    """The head's size on the wire, near enough: the request line, then each field line."""
    line = len(f"{message.method} {message.path} HTTP/1.1\r\n")
    return line + sum(
        len(name) + len(value) + len(b": \r\n") for name, value in message.raw_headers
    )


class GuardedServer(web.Server):
    """aiohttp's low-level server, handing each connection to a ``GuardedRequestHandler``."""

    def __init__(
        self, handler: Any, *, request_factory: Any, guard: ListenerGuard, **kwargs: Any
    ) -> None:
        super().__init__(handler, request_factory=request_factory, **kwargs)
        self._guard = guard
        self._handler_kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return self.handler()

    def handler(self, stream: InnerStream | None = None) -> GuardedRequestHandler:
        return GuardedRequestHandler(
            self, self._guard, stream, loop=self._loop, **self._handler_kwargs
        )


class GuardedRunner(web.ServerRunner):
    """Runs a ``GuardedServer``; ``on_shutdown`` runs between closing idle connections and
    waiting for the busy ones, where ``web.Application.on_shutdown`` would."""

    def __init__(
        self,
        server: GuardedServer,
        *,
        on_shutdown: Callable[[], None],
        handle_signals: bool,
        shutdown_timeout: float,
    ) -> None:
        super().__init__(server, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout)
        self._on_shutdown = on_shutdown

    async def shutdown(self) -> None:
        self._on_shutdown()

    def __repr__(self) -> str:
        return f"<GuardedRunner server={self.server!r}>"
