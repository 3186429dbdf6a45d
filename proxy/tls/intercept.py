"""The stream of a CONNECT the proxy answered itself: TLS terminated, plain HTTP served, or
given back to be spliced.

``InterceptPolicy`` decides per CONNECT (``proxy.rules.connect``), remembering hosts whose
clients rejected a minted certificate: like Squid's splice after a failed bump, their next
CONNECTs are plain tunnels for ``--intercept-splice-seconds``, so a client that pins or does
not trust the CA recovers on retry instead of failing until the operator steps in. A client
that closes during our handshake, or right after it without a byte of a request (grpcio
does, with no alert), counts as such a rejection too.

``Inspector`` reads the first bytes: an HTTP/1.x request line or the h2c preface is served on
the raw stream (the preface is spliced to the target where no HTTP/2 server is registered,
``--http2 false``). A ClientHello for an intercepted
host is read whole first; when the client offers no protocol the proxy serves, or no leaf
can be minted, the stream goes back to the tunneller to be spliced to the target untouched.
Otherwise ``loop.start_tls(server_side=True)`` answers it with a leaf for the CONNECT host
(SNI is not consulted: the certificate names what is dialled), and the protocol the
handshake agreed on serves the stream: each request goes through the forwarder as usual.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Collection, Mapping
from time import monotonic
from typing import Any, Final

from aiohttp import web

from proxy.observe import log
from proxy.observe.metrics import Metrics
from proxy.rules.connect import (
    CLEARTEXT_PROTOCOLS,
    HTTP1,
    ConnectMode,
    Opening,
    alpn_choice,
    alpn_offer,
    connect_mode,
)
from proxy.rules.hostpatterns import HostPatterns
from proxy.rules.target import connect_origin
from proxy.rules.tls_hello import ClientHello, HelloError
from proxy.tls.certs import CAError, CertificateAuthority
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
# Reasons that start a splice of the host: the client refused what we presented (an alert,
# or a close without one during or right after our handshake), or no leaf can be minted.
REJECTION_REASONS: Final = frozenset(
    {*_REJECTIONS.values(), "closed", "closed_before_request", "ca_invalid"}
)
# The most bytes read for a ClientHello (records, reads): big post-quantum hellos are ~2 KB.
HELLO_LIMIT: Final = 1 << 16
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
        """A client refused what we presented for ``target`` (or nothing could be minted):
        splice the host for a while."""
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


# Serves the stream inside a CONNECT once its protocol is known: given the CONNECT's handler
# and the stream, the protocol that reads it. Registered by protocol id (``proxy.rules.connect``:
# "http/1.1", "h2", "h2c"); the TLS server offers the ids registered, in their order.
StreamServer = Callable[[GuardedRequestHandler, InnerStream], asyncio.Protocol]


def serve_http1(server_protocol: GuardedRequestHandler, stream: InnerStream) -> asyncio.Protocol:
    """HTTP/1.x on the stream: aiohttp's handler, with the listener's app and limits."""
    return server_protocol.open_inner(stream)


class Inspector:
    """Serves the stream of a CONNECT answered without dialling (``Tunneller``'s inspector).

    ``servers`` maps protocol ids to what serves them; without a ``ca`` nothing is
    intercepted. The call returns the bytes read so far when the stream is to be spliced
    to the target after all, None when it has been served (or closed) here.
    """

    def __init__(
        self,
        ca: CertificateAuthority | None,
        policy: InterceptPolicy,
        metrics: Metrics,
        *,
        servers: Mapping[str, StreamServer],
        head_limit: int,
        head_timeout: float,
    ) -> None:
        self._servers = dict(servers)
        self._contexts = (
            ServerContexts(ca, alpn=alpn_offer(self._servers), on_mint=self._minted)
            if ca is not None
            else None
        )
        self._policy = policy
        self._metrics = metrics
        self._head_limit = head_limit
        self._head_timeout = head_timeout
        self._logger = log.get_logger()

    async def __call__(
        self, request: web.BaseRequest, record: TunnelRecord, mode: ConnectMode
    ) -> bytes | None:
        transport = request.transport
        server_protocol = request.protocol
        if transport is None or not isinstance(server_protocol, GuardedRequestHandler):
            record.served = "closed"
            return None
        intercepting = mode is ConnectMode.INSPECT and self._contexts is not None
        opener = Opener(transport, self._head_limit, HELLO_LIMIT if intercepting else 0)
        opener.take_over(server_protocol)
        try:
            try:
                async with asyncio.timeout(self._head_timeout):
                    opening = await asyncio.shield(opener.opening)
            except TimeoutError:
                opening = None
            early = bytes(opener.data)
            if opening is Opening.TLS and intercepting:
                return await self._tls(server_protocol, transport, opener, record, early)
            protocol = CLEARTEXT_PROTOCOLS.get(opening) if opening is not None else None
            server = self._servers.get(protocol) if protocol is not None else None
            if server is not None:
                origin = connect_origin("http", record.target.host, record.target.port)
                stream = InnerStream(origin, record.request_id)
                inner = server(server_protocol, stream)
                await self._serve(server_protocol, inner, transport, record, early)
                record.served = "http"
            elif protocol is not None:
                # HTTP the proxy does not serve (h2c with --http2 false): the client chose it
                # for this origin, so relayed untouched it still works; on a port open for
                # plain HTTP that is no riskier than serving it.
                return self._splice(record, protocol, early)
            else:
                # Not a protocol this CONNECT may carry: close, nothing was dialled.
                record.served = "timeout" if opening is None else "refused"
                transport.close()
            return None
        except BaseException:
            transport.abort()
            raise

    async def _serve(
        self,
        server_protocol: GuardedRequestHandler,
        inner: asyncio.Protocol,
        transport: asyncio.Transport,
        record: TunnelRecord,
        early: bytes,
    ) -> None:
        handover = HandOver(server_protocol)
        transport.set_protocol(handover)
        handover.attach(inner, transport, early)
        transport.resume_reading()
        await _served(handover, record)

    async def _tls(
        self,
        server_protocol: GuardedRequestHandler,
        transport: asyncio.Transport,
        opener: Opener,
        record: TunnelRecord,
        early: bytes,
    ) -> bytes | None:
        """A whole ClientHello has come: intercept it, or give the stream back to be spliced."""
        assert self._contexts is not None
        hello = opener.hello
        if not isinstance(hello, ClientHello):
            # It started like TLS but is no ClientHello: as a handshake that failed.
            self._failed(record, "tls_protocol_error", hello or HelloError("truncated"))
            transport.abort()
            return None
        if alpn_choice(hello.alpn, self._servers) is None:
            # grpcio offers only h2: a handshake agreeing on nothing would break it, and a
            # plain tunnel keeps it working (as Squid splices what it cannot bump).
            return self._splice(record, "alpn", early)
        try:
            context = self._contexts(record.target.host)
        except CAError as exc:  # the CA expired while the proxy ran
            self._count_failure(record, "ca_invalid")
            self._logger.error(
                "intercept_failed",
                request_id=record.request_id,
                host=record.target.label,
                reason="ca_invalid",
                details=str(exc),
            )
            return self._splice(record, "ca_invalid", early)
        await self._intercept(server_protocol, transport, opener, record, early, context)
        return None

    async def _intercept(
        self,
        server_protocol: GuardedRequestHandler,
        transport: asyncio.Transport,
        opener: Opener,
        record: TunnelRecord,
        early: bytes,
        context: ssl.SSLContext,
    ) -> None:
        target = record.target
        loop = asyncio.get_running_loop()
        handover = HandOver(server_protocol)
        start = asyncio.ensure_future(
            loop.start_tls(
                transport,
                handover,
                context,
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
            self._failed(record, failure_reason(exc), exc)
            transport.abort()
            handover.connection_lost(exc if isinstance(exc, Exception) else None)
            return
        finally:
            if not start.done():
                start.cancel()
        ssl_object = tls.get_extra_info("ssl_object")
        # No ALPN from the client: HTTP/1.1 (alpn_choice made sure it is served then).
        protocol = (ssl_object.selected_alpn_protocol() if ssl_object else None) or HTTP1
        stream = InnerStream(connect_origin("https", target.host, target.port), record.request_id)
        handover.attach(self._servers[protocol](server_protocol, stream), tls, b"")
        record.served = "intercepted"
        await _served(handover, record)
        if handover.received == 0:
            # Not a byte of a request: no intercepted call happened. A client that hung up
            # refused what we presented (grpcio does so without an alert).
            if handover.closed_by == "client":
                closed = ConnectionResetError("closed after the handshake, before a request")
                self._failed(record, "closed_before_request", closed)
            else:
                record.served = "timeout"

    def _count_failure(self, record: TunnelRecord, reason: str) -> None:
        stats = self._metrics.host(record.target.label)
        stats.intercept_failures[reason] = stats.intercept_failures.get(reason, 0) + 1
        if reason in REJECTION_REASONS:
            self._policy.rejected(record.target)

    def _failed(self, record: TunnelRecord, reason: str, exc: BaseException) -> None:
        self._count_failure(record, reason)
        record.served = "tls_failed"
        record.exc = exc  # the tunnel line at the end says why, once per connection

    def _splice(self, record: TunnelRecord, reason: str, early: bytes) -> bytes:
        stats = self._metrics.host(record.target.label)
        stats.intercept_splices[reason] = stats.intercept_splices.get(reason, 0) + 1
        return early

    def _minted(self) -> None:
        self._metrics.certificates_minted += 1

    def __repr__(self) -> str:
        return f"<Inspector {sorted(self._servers)} {self._contexts!r} {self._policy!r}>"


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
