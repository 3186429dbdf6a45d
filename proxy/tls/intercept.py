"""The stream of a CONNECT the proxy answered itself: TLS terminated, or plain HTTP served.

``InterceptPolicy`` decides per CONNECT (``proxy.rules.connect``), remembering hosts whose
clients rejected a minted certificate: like Squid's splice after a failed bump, their next
CONNECTs are plain tunnels for ``--intercept-splice-seconds``, so a client that pins or does
not trust the CA recovers on retry instead of failing until the operator steps in.

``Inspector`` reads the first bytes; an HTTP/1.x request line is served on the raw stream,
a ClientHello for an intercepted host is answered by ``loop.start_tls(server_side=True)``
with a leaf for the CONNECT host (SNI is not consulted: the certificate names what is
dialled), and each request on either stream goes through the forwarder as usual.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Collection
from time import monotonic
from typing import Any, Final

from aiohttp import web

from proxy.observe.metrics import Metrics
from proxy.rules.connect import ConnectMode, Opening, connect_mode
from proxy.rules.hostpatterns import HostPatterns
from proxy.rules.target import connect_origin
from proxy.tls.contexts import ServerContexts
from proxy.wire.inner import HandOver, InnerStream, Opener
from proxy.wire.limits import GuardedRequestHandler
from proxy.wire.tunnelling import TunnelRecord, TunnelTarget

# The TLS alerts (RFC 8446 §6.2) a client sends when it refuses our certificate.
_REJECTIONS: Final = {
    "ALERT_UNKNOWN_CA": "unknown_ca",
    "ALERT_BAD_CERTIFICATE": "bad_certificate",
    "ALERT_CERTIFICATE_UNKNOWN": "certificate_unknown",
    "ALERT_UNSUPPORTED_CERTIFICATE": "unsupported_certificate",
}
REJECTION_REASONS: Final = frozenset(_REJECTIONS.values())
# Loop turns to wait for start_tls to swap its protocol in: it does so on its first step.
_SWAP_WAIT_STEPS: Final = 8
# Seconds past --request-header-timeout before the loop's own handshake timer would fire.
_HANDSHAKE_BACKSTOP: Final = 1.0
_SPLICED_KEPT: Final = 4096  # hosts remembered at once; a scan of names cannot grow it further


def failure_reason(exc: BaseException) -> str:
    """The ``reason`` label of ``proxy_intercept_failures_total`` for a failed handshake."""
    if isinstance(exc, ssl.SSLError):
        text = f"{getattr(exc, 'reason', None) or ''} {exc}"
        for alert, reason in _REJECTIONS.items():
            if alert in text:
                return reason
        return "tls_protocol_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "closed"


class InterceptPolicy:
    """Which mode a CONNECT gets; hosts whose clients rejected us are tunnelled for a while."""

    def __init__(
        self,
        intercept: HostPatterns,
        *,
        enabled: bool,
        connect_ports: Collection[int],
        http_ports: Collection[int],
        splice_seconds: float,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._intercept = intercept
        self._enabled = enabled
        self._connect_ports = frozenset(connect_ports)
        self._http_ports = frozenset(http_ports)
        self._splice_seconds = splice_seconds
        self._clock = clock
        self._spliced: dict[str, float] = {}  # label -> until

    def mode(self, target: TunnelTarget) -> ConnectMode:
        intercepted = self._enabled and self._intercept.matches(target.label)
        if intercepted and self._is_spliced(target.label):
            intercepted = False
        return connect_mode(
            intercepted=intercepted,
            port=target.port,
            connect_ports=self._connect_ports,
            http_ports=self._http_ports,
        )

    def rejected(self, target: TunnelTarget) -> None:
        """A client refused the minted certificate for ``target``: splice it for a while."""
        if self._splice_seconds <= 0:
            return
        if len(self._spliced) >= _SPLICED_KEPT:
            now = self._clock()
            self._spliced = {k: v for k, v in self._spliced.items() if v > now}
            if len(self._spliced) >= _SPLICED_KEPT:
                self._spliced.clear()
        self._spliced[target.label] = self._clock() + self._splice_seconds

    def _is_spliced(self, label: str) -> bool:
        until = self._spliced.get(label)
        if until is None:
            return False
        if until <= self._clock():
            del self._spliced[label]
            return False
        return True

    def __repr__(self) -> str:
        return f"<InterceptPolicy {self._intercept!r} spliced={len(self._spliced)}>"


class Inspector:
    """Serves the stream of a CONNECT answered without dialling (``Tunneller``'s inspector)."""

    def __init__(
        self,
        contexts: ServerContexts | None,
        policy: InterceptPolicy,
        metrics: Metrics,
        *,
        head_limit: int,
        head_timeout: float,
    ) -> None:
        self._contexts = contexts
        self._policy = policy
        self._metrics = metrics
        self._head_limit = head_limit
        self._head_timeout = head_timeout

    async def __call__(
        self, request: web.BaseRequest, record: TunnelRecord, mode: ConnectMode
    ) -> None:
        transport = request.transport
        server_protocol = request.protocol
        if transport is None or not isinstance(server_protocol, GuardedRequestHandler):
            record.served = "closed"
            return
        opener = Opener(transport, self._head_limit)
        opener.take_over(server_protocol)
        try:
            try:
                async with asyncio.timeout(self._head_timeout):
                    opening = await asyncio.shield(opener.opening)
            except TimeoutError:
                opening = None
            early = bytes(opener.data)
            target = record.target
            if opening is Opening.HTTP:
                origin = connect_origin("http", target.host, target.port)
                await self._serve(server_protocol, transport, origin, record, early)
                record.served = "http"
            elif (
                opening is Opening.TLS
                and mode is ConnectMode.INSPECT
                and self._contexts is not None
            ):
                await self._intercept(server_protocol, transport, opener, record, early)
            else:
                # Not a protocol this CONNECT may carry: close, nothing was dialled.
                record.served = "timeout" if opening is None else "refused"
                transport.close()
        except BaseException:
            transport.abort()
            raise

    async def _serve(
        self,
        server_protocol: GuardedRequestHandler,
        transport: asyncio.Transport,
        origin: Any,
        record: TunnelRecord,
        early: bytes,
    ) -> None:
        handover = HandOver(server_protocol)
        transport.set_protocol(handover)
        inner = server_protocol.open_inner(InnerStream(origin, record.request_id))
        handover.attach(inner, transport, early)
        transport.resume_reading()
        await _served(handover, record)

    async def _intercept(
        self,
        server_protocol: GuardedRequestHandler,
        transport: asyncio.Transport,
        opener: Opener,
        record: TunnelRecord,
        early: bytes,
    ) -> None:
        assert self._contexts is not None
        target = record.target
        loop = asyncio.get_running_loop()
        handover = HandOver(server_protocol)
        start = asyncio.ensure_future(
            loop.start_tls(
                transport,
                handover,
                self._contexts(target.host),
                server_side=True,
                # A backstop only: its ConnectionAbortedError does not say it was a timeout.
                ssl_handshake_timeout=self._head_timeout + _HANDSHAKE_BACKSTOP,
            )
        )
        try:
            async with asyncio.timeout(self._head_timeout):
                await _replay(transport, opener, early, start)
                tls = await start
            assert tls is not None  # None only for a transport that has no TLS to start
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._rejected(record, exc)
            transport.abort()
            handover.connection_lost(exc if isinstance(exc, Exception) else None)
            return
        finally:
            if not start.done():
                start.cancel()
        origin = connect_origin("https", target.host, target.port)
        inner = server_protocol.open_inner(InnerStream(origin, record.request_id))
        handover.attach(inner, tls, b"")
        record.served = "intercepted"
        await _served(handover, record)

    def _rejected(self, record: TunnelRecord, exc: BaseException) -> None:
        reason = failure_reason(exc)
        stats = self._metrics.host(record.target.label)
        stats.intercept_failures[reason] = stats.intercept_failures.get(reason, 0) + 1
        if reason in REJECTION_REASONS:
            self._policy.rejected(record.target)
        record.served = "tls_failed"
        record.exc = exc  # the tunnel line at the end says why, once per connection

    def __repr__(self) -> str:
        return f"<Inspector {self._contexts!r} {self._policy!r}>"


async def _served(handover: HandOver, record: TunnelRecord) -> None:
    """Wait for the end of a stream the proxy serves; its bytes and closer go on the record."""
    try:
        await handover.closed
    finally:
        record.bytes_in, record.bytes_out = handover.received, handover.sent
        record.closed_by = handover.closed_by


async def _replay(
    transport: asyncio.Transport, opener: Opener, early: bytes, start: asyncio.Future[Any]
) -> None:
    """Give the TLS layer the ClientHello bytes the opener already read from the socket.

    ``loop.start_tls`` swaps its SSL protocol in before its first await (asyncio and uvloop);
    once it is there, the bytes go in through the buffered-protocol calls a transport would
    make. Before its ``connection_made`` they wait in the incoming BIO; after it, they start
    the handshake. tests/test_intercept.py runs this on both loops.
    """
    for _ in range(_SWAP_WAIT_STEPS):
        if transport.get_protocol() is not opener or start.done():
            break
        await asyncio.sleep(0)
    if start.done() or transport.get_protocol() is opener:
        return  # failed already, or (never seen) not swapped: the handshake times out
    protocol: Any = transport.get_protocol()
    view = memoryview(early)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
