"""CONNECT tunnels (RFC 9110 §9.3.6): dial the target, answer 200, relay bytes until closed.

A tunnel is timed and counted like a forwarded request: its lookup goes through the
upstream session's resolver and DNS cache, its TCP connect is timed apart from DNS, and
one ``TunnelRecord`` per tunnel feeds the metrics and one ``tunnel`` log line at its end.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Final, cast

import aiohttp
from aiohttp import web
from aiohttp.abc import ResolveResult
from aiohttp.http import WebSocketReader
from aiohttp.tracing import Trace
from yarl import URL

from proxy.observe.live import Call
from proxy.observe.metrics import ExemplarIds, Metrics, exemplar_ids
from proxy.observe.outcome import milliseconds
from proxy.observe.spans import SpanRecorder
from proxy.observe.tracing import Timings
from proxy.rules import errors, policy
from proxy.rules.connect import ConnectMode
from proxy.rules.errors import ProxyError
from proxy.rules.request_id import (
    TraceContext,
    choose_request_id,
    choose_trace_context,
    parse_traceparent,
)
from proxy.rules.target import host_label
from proxy.rules.tls_timing import TunnelTls, sni_differs
from proxy.wire.relay import ClientProtocol, Relay

BAD_AUTHORITY: Final = ProxyError(
    400, "http_request_error", "CONNECT takes a target of the form host:port"
)
PORT_DENIED: Final = ProxyError(403, "http_request_denied", "CONNECT to this port is not allowed")


class TunnelTargetError(ValueError):
    """A CONNECT target the proxy will not dial; ``error`` is the answer, ``details`` why,
    ``reason`` the refusal's label in ``proxy_denied_total``."""

    def __init__(self, error: ProxyError, reason: str, details: str | None = None) -> None:
        super().__init__(error.text)
        self.error = error
        self.reason = reason
        self.details = details


@dataclass(frozen=True, slots=True)
class TunnelTarget:
    host: str  # as dialled: a lower-case name or an IP address (IPv6 without brackets)
    port: int
    label: str  # metric host label: ":port" only when it is not 443

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# RFC 9112 §3.2.3: authority-form is uri-host ":" port, nothing else (no userinfo).
_AUTHORITY: Final = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+)):(?P<port>[0-9]{1,5})"
)
_DOTTED_NUMBER: Final = re.compile(r"[0-9.]+")


def tunnel_target(
    authority: str, allowed_ports: Collection[int], http_ports: Collection[int] = ()
) -> TunnelTarget:
    """The checked target of ``CONNECT authority``.

    Raises ``TunnelTargetError``: 400 for anything but host:port, 403 for a port that is
    in neither ``allowed_ports`` nor ``http_ports`` (plain HTTP only; RFC 9110 §9.3.6 warns
    against tunnels to arbitrary ports).
    """
    match = _AUTHORITY.fullmatch(authority)
    if match is None or not _valid_host(match["ipv6"], match["name"]):
        raise TunnelTargetError(BAD_AUTHORITY, "connect_target")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise TunnelTargetError(BAD_AUTHORITY, "connect_target")
    if port not in allowed_ports and port not in http_ports:
        # Name the setting: the operator's fix is there, and the client shows only this.
        allowed = ",".join(map(str, allowed_ports)) or "none"
        reason = f"CONNECT to port {port} is not allowed (--connect-ports: {allowed})"
        raise TunnelTargetError(PORT_DENIED.with_text(reason), "connect_port", details=reason)
    host = match["ipv6"] or match["name"].lower()
    # 443 is to CONNECT what it is to https: the default, left out of the label.
    return TunnelTarget(host, port, host_label(URL.build(scheme="https", host=host, port=port)))


def _valid_host(ipv6: str | None, name: str | None) -> bool:
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            return False
        return True
    assert name is not None
    if _DOTTED_NUMBER.fullmatch(name):
        # Only the canonical dotted quad: 127.1 or 0177.0.0.1 would dodge address checks.
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
        return True
    return all(name.rstrip(".").split("."))  # no empty label


class SessionResolver:
    """Name lookups through the upstream session's connector, sharing its DNS cache.

    aiohttp has no public call for this. ``TCPConnector._resolve_host`` is what the
    connector itself runs before a new connection, so a tunnel's lookup uses the same
    cache, joins a lookup already in flight for the same name, and fires the same trace
    signals, which ``proxy.observe.tracing`` turns into DNS timings. aiohttp is pinned below 3.15
    and tests/test_tunnelling.py exercises this call.
    """

    def __init__(self, session: aiohttp.ClientSession) -> None:
        connector = session.connector
        if not isinstance(connector, aiohttp.TCPConnector):
            raise TypeError("tunnels need the session's TCPConnector for DNS")
        self._session = session
        self._connector = connector

    async def resolve(self, host: str, port: int, timings: Timings) -> list[ResolveResult]:
        traces = [
            Trace(self._session, config, config.trace_config_ctx(trace_request_ctx=timings))
            for config in self._session.trace_configs
        ]
        return await self._connector._resolve_host(host, port, traces=traces)


class TunnelRecord:
    """What happened to one CONNECT; filled in by the tunneller as it goes."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client",
        "closed_by",
        "duration",
        "error",
        "exc",
        "kind",
        "peer",
        "relay",
        "request_id",
        "served",
        "status",
        "target",
        "timings",
        "tls",
        "trace",
        "trace_id",
    )

    def __init__(
        self,
        client: str | None,
        target: TunnelTarget,
        request_id: str,
        timings: Timings,
        trace: TraceContext | None = None,
        *,
        kind: str = "tunnel",
        status: int = 200,
        trace_id: str | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.request_id = request_id
        self.timings = timings
        self.kind = kind  # the log event: "tunnel" (CONNECT) or "websocket" (after a 101)
        self.status = status
        # The trace id exemplars cite: the span's, else one the client sent (if valid).
        self.trace_id = trace.trace_id if trace is not None else trace_id
        self.error: ProxyError | None = None  # why the tunnel was never established
        self.exc: BaseException | None = None
        self.relay: Relay | None = None  # set once the 200 is out
        self.served: str | None = None  # the outcome of a stream the proxy read itself
        # A stream the proxy served itself: what the client sent and received on it, who ended it.
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed_by: str | None = None
        self.duration = 0.0
        self.trace = trace  # only when spans are exported
        self.peer: tuple[str, int] | None = None  # the address dialled, for the span
        self.tls: TunnelTls | None = None  # what the relayed TLS showed, when observed

    def fail(self, error: ProxyError, exc: BaseException) -> None:
        self.error = error
        self.exc = exc
        self.status = error.status

    @property
    def outcome(self) -> str:
        if self.served is not None:
            return self.served
        if self.relay is None or self.relay.outcome is None:
            return "failed"
        return self.relay.outcome

    def __repr__(self) -> str:
        return (
            f"<TunnelRecord {self.kind} {self.target.authority} status={self.status} "
            f"{self.outcome}>"
        )


class TunnelObserver:
    """Records a finished tunnel in the metrics and writes its ``tunnel`` log line."""

    def __init__(self, metrics: Metrics, logger: Any, *, exemplars: bool = True) -> None:
        self._metrics = metrics
        self._logger = logger
        self._exemplars = exemplars

    def opened(self) -> None:
        self._metrics.tunnels_open += 1

    def watch(self, record: TunnelRecord) -> TunnelTls:
        """A reader for the TLS ``record``'s relay will carry; each exchange's first byte is
        observed as soon as it is known (a tunnel may carry requests for hours)."""

        def first_byte(seconds: float) -> None:
            ids = self._ids(record)
            self._metrics.host(record.target.label).tunnel_ttfb.observe(seconds, ids)

        record.tls = TunnelTls(first_byte)
        return record.tls

    def _ids(self, record: TunnelRecord) -> ExemplarIds | None:
        return exemplar_ids(record.trace_id, record.request_id) if self._exemplars else None

    def __call__(self, record: TunnelRecord) -> None:
        t = record.timings
        tls = record.tls
        if tls is not None:
            tls.finish()  # before the host's stats are taken: it may observe a first byte
        stats = self._metrics.host(record.target.label)
        ids = self._ids(record)
        handshake = tls.handshake if tls is not None else None
        stats.observe_dial(t.dns, t.dns_cache, t.connect, handshake, ids=ids)
        outcome = record.outcome
        stats.tunnels[outcome] = stats.tunnels.get(outcome, 0) + 1
        relay = record.relay
        sent, received, closed_by = record.bytes_in, record.bytes_out, record.closed_by
        error: str | None = None
        exc = record.exc
        if record.error is not None:
            error = record.error.error
            stats.errors[error] = stats.errors.get(error, 0) + 1
            if stats.live is not None:  # the live page lists it with the failed calls
                stats.live.keep(
                    Call(
                        stats.last_used,
                        record.target.label,
                        "CONNECT" if record.kind == "tunnel" else "GET",
                        record.target.authority,  # a CONNECT's request target
                        record.status,
                        error,
                        record.request_id,
                        record.trace_id,
                        record.duration,
                        (None, t.dns, t.connect, None, None),
                    )
                )
        if relay is not None:
            self._metrics.tunnels_open -= 1
            sent, received = relay.received["client"], relay.received["upstream"]
            closed_by = relay.closed_by
            stats.tunnel_seconds.observe(record.duration, ids)
            stats.tunnel_bytes_sent += sent
            stats.tunnel_bytes_received += received
            exc = relay.error
            relay_error = _RELAY_ERRORS.get(outcome)
            error = relay_error.error if relay_error is not None else None
        hello = tls.client_hello if tls is not None else None
        sni = hello.sni if hello is not None else None
        # Only logged and counted: the CONNECT host is what was checked and dialled.
        mismatch = sni_differs(sni, record.target.host)
        stats.tunnel_sni_mismatches += mismatch
        trace = record.trace
        self._logger.info(
            record.kind,
            request_id=record.request_id,
            trace_id=trace.trace_id if trace is not None else None,
            span_id=trace.span_id if trace is not None else None,
            client=record.client,
            host=record.target.label,
            target=record.target.authority,
            status=record.status,
            outcome=outcome,
            closed_by=closed_by,
            dns_ms=milliseconds(t.dns),
            connect_ms=milliseconds(t.connect),
            duration_ms=milliseconds(record.duration),
            bytes_in=sent,
            bytes_out=received,
            **_tls_fields(tls, mismatch),
            error=error,
            details=errors.describe(exc) if exc is not None else None,
        )


def _tls_fields(tls: TunnelTls | None, sni_mismatch: bool) -> dict[str, Any]:
    """The tunnel line's TLS fields (all None for a tunnel that carried no TLS handshake)."""
    hello = tls.client_hello if tls is not None else None
    if tls is None or hello is None:
        return dict.fromkeys(_TLS_FIELDS)
    answer = tls.server_hello
    return {
        "sni": hello.sni,
        "sni_mismatch": sni_mismatch,
        "tls_version": tls.version,
        "alpn_offered": list(hello.alpn),
        "alpn": answer.alpn if answer is not None else None,
        "tls_ms": milliseconds(tls.handshake),
        "ttfb_ms": milliseconds(tls.ttfb),
        "exchanges": tls.exchanges if tls.counting else None,
        "exchange_ttfb_ms": [milliseconds(s) for s in tls.first_bytes] if tls.counting else None,
    }


_TLS_FIELDS: Final = (
    "sni",
    "sni_mismatch",
    "tls_version",
    "alpn_offered",
    "alpn",
    "tls_ms",
    "ttfb_ms",
    "exchanges",
    "exchange_ttfb_ms",
)


# An established tunnel that ended badly; RFC 9209 has no type for a reset mid-tunnel.
_RELAY_ERRORS: Final = {
    "reset": ProxyError(502, "connection_reset", "the tunnel was reset"),
    "error": errors.INTERNAL_ERROR,
}


class Relays:
    """The relays running on client connections: handed over from aiohttp, then tracked.

    CONNECT tunnels and WebSockets after their 101 both end up here, so both are counted,
    observed and closed at shutdown the same way.
    """

    def __init__(self, observer: TunnelObserver | None) -> None:
        self._observer = observer
        self._open: set[Relay] = set()

    def watch(self, record: TunnelRecord) -> TunnelTls | None:
        """What reads the TLS a tunnel carries, when tunnels are observed."""
        return self._observer.watch(record) if self._observer is not None else None

    def record(self, record: TunnelRecord) -> None:
        """A relay (or an attempt at one) has ended: its metrics and log line."""
        if self._observer is not None:
            self._observer(record)

    async def run(
        self,
        request: web.BaseRequest,
        transport: asyncio.Transport,
        relay: Relay,
        record: TunnelRecord,
        early: bytes | None = None,
    ) -> None:
        """Hand the client connection over to ``relay`` and wait until the relay ends.

        The response that switched the connection (200, 101) is already out. ``early``: the
        client's first bytes, for a stream that was read already (a splice after inspection);
        otherwise the bytes aiohttp kept behind the request head go first.
        """
        try:
            # From aiohttp to the relay with no await in between: no bytes slip by.
            record.relay = relay
            self._open.add(relay)
            if self._observer is not None:
                self._observer.opened()
            protocol = ClientProtocol(relay, request.protocol)
            transport.set_protocol(protocol)  # first, so flow control already reaches the relay
            relay.start(transport)
            if early is None:
                # The bytes that came behind the request head (aiohttp keeps them) go upstream
                # first. set_parser is typed for aiohttp's WebSocket reader; it only calls
                # feed_data/feed_eof.
                request.protocol.set_parser(cast(WebSocketReader, protocol))
            else:
                relay.feed("client", early)
                transport.resume_reading()  # the inspector stopped reading at its verdict
            # Shielded: a cancelled handler must not cancel ``done``; it closes the relay.
            await asyncio.shield(relay.done)
        except asyncio.CancelledError:
            relay.close("shutdown")
            raise
        except Exception as exc:
            relay.close("error", exc)
            raise
        finally:
            self._open.discard(relay)

    def close_all(self) -> None:
        """Shutdown: end every open relay now (the drain has already waited for them)."""
        for relay in list(self._open):
            relay.close("shutdown")

    def __repr__(self) -> str:
        return f"<Relays open={len(self._open)}>"


# Reads the stream of a CONNECT the proxy answered itself (``proxy.tls.intercept``); returns
# the bytes it read when the stream is to be spliced to the target after all.
StreamInspector = Callable[[web.BaseRequest, TunnelRecord, ConnectMode], Awaitable[bytes | None]]


class Tunneller:
    """The handler for CONNECT with a checked target.

    In ``ConnectMode.TUNNEL`` it dials, answers 200 and relays bytes. In the other modes it
    checks the destination the same way (the name's every address), answers 200 without
    dialling, and gives the stream to the ``inspector``; a stream the inspector gives back
    is spliced: it dials those addresses then, and relays the bytes read so far first.
    """

    def __init__(
        self,
        resolver: SessionResolver,
        relays: Relays,
        *,
        request_id_header: str,
        via_pseudonym: str,
        connect_timeout: float,
        idle_timeout: float,
        spans: SpanRecorder | None = None,
        inspector: StreamInspector | None = None,
    ) -> None:
        self._resolver = resolver
        self._relays = relays
        self._spans = spans
        self._inspector = inspector
        self._rid_header = request_id_header
        self._pseudonym = via_pseudonym
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout

    async def __call__(
        self, request: web.BaseRequest, target: TunnelTarget, mode: ConnectMode = ConnectMode.TUNNEL
    ) -> web.StreamResponse:
        start = perf_counter()
        request_id = choose_request_id(request.headers.get(self._rid_header))
        spans = self._spans
        trace = (
            choose_trace_context(request.headers.get("traceparent"), spans.sampler)
            if spans is not None
            else None
        )
        record = TunnelRecord(
            request.remote,
            target,
            request_id,
            Timings(start),
            trace,
            trace_id=parse_traceparent(request.headers.get("traceparent")),
        )
        try:
            return await self._tunnel(request, record, mode)
        finally:
            record.duration = perf_counter() - start
            self._relays.record(record)
            if spans is not None and trace is not None and trace.span_id is not None:
                error = record.error or _RELAY_ERRORS.get(record.outcome)
                spans.tunnel(
                    trace,
                    host=target.host,
                    port=target.port,
                    request_id=request_id,
                    timings=record.timings,
                    duration=record.duration,
                    outcome=record.outcome,
                    error=error,
                    peer=record.peer,
                    tracestate=request.headers.get("tracestate"),
                )

    def close_all(self) -> None:
        """Shutdown: end every open tunnel and WebSocket now."""
        self._relays.close_all()

    async def _tunnel(
        self, request: web.BaseRequest, record: TunnelRecord, mode: ConnectMode
    ) -> web.StreamResponse:
        target = record.target
        if policy.via_loops(request.headers.getall("Via", ()), self._pseudonym):
            loop = policy.LoopDetected(f"Via already holds {self._pseudonym}")
            return self._fail(record, errors.LOOP_DETECTED, loop)
        try:
            addresses = await self._resolver.resolve(target.host, target.port, record.timings)
        except Exception as exc:
            record.timings.settle(perf_counter())  # a failed lookup is timed too
            return self._fail(record, errors.classify(exc, errors.LOOKUP), exc)
        if mode is not ConnectMode.TUNNEL and self._inspector is not None:
            return await self._answer_and_inspect(request, record, mode, addresses)
        relay = Relay(self._idle_timeout, self._relays.watch(record))
        try:
            record.peer = await self._dial(addresses, relay, record.timings)
        except Exception as exc:
            return self._fail(record, errors.classify(exc, errors.DIAL), exc)
        return await self._answer_and_relay(request, relay, record)

    async def _answer(
        self, request: web.BaseRequest, record: TunnelRecord
    ) -> tuple[web.StreamResponse, asyncio.Transport] | web.Response:
        """Send the 200; the failure response instead if the client has gone."""
        response = web.StreamResponse(status=200, reason="Connection Established")
        response.headers[self._rid_header] = record.request_id
        transport = request.transport
        try:
            if transport is None:
                raise ConnectionResetError("the client has gone")
            await response.prepare(request)
        except ConnectionError as exc:
            return self._fail(record, errors.CLIENT_DISCONNECTED, exc)
        response.force_close()  # only after prepare: before, the 200 would say Connection: close
        return response, transport

    async def _answer_and_inspect(
        self,
        request: web.BaseRequest,
        record: TunnelRecord,
        mode: ConnectMode,
        addresses: list[ResolveResult],
    ) -> web.StreamResponse:
        assert self._inspector is not None
        answered = await self._answer(request, record)
        if isinstance(answered, web.Response):
            return answered
        response, transport = answered
        early = await self._inspector(request, record, mode)
        if early is not None:
            await self._splice(request, transport, addresses, record, early)
        return response

    async def _splice(
        self,
        request: web.BaseRequest,
        transport: asyncio.Transport,
        addresses: list[ResolveResult],
        record: TunnelRecord,
        early: bytes,
    ) -> None:
        """Dial the checked addresses now and relay, ``early`` first. The 200 is out already:
        a failure can only close the client connection."""
        relay = Relay(self._idle_timeout, self._relays.watch(record))
        try:
            record.peer = await self._dial(addresses, relay, record.timings)
        except Exception as exc:
            record.error, record.exc = errors.classify(exc, errors.DIAL), exc
            transport.abort()
            return
        if transport.is_closing():  # the client left while the target was dialled
            gone = ConnectionResetError("the client has gone")
            record.error, record.exc = errors.CLIENT_DISCONNECTED, gone
            relay.close("error")
            return
        await self._relays.run(request, transport, relay, record, early)

    async def _answer_and_relay(
        self, request: web.BaseRequest, relay: Relay, record: TunnelRecord
    ) -> web.StreamResponse:
        answered = await self._answer(request, record)
        if isinstance(answered, web.Response):
            relay.close("error")
            return answered
        response, transport = answered
        await self._relays.run(request, transport, relay, record)
        return response

    async def _dial(
        self, addresses: list[ResolveResult], relay: Relay, timings: Timings
    ) -> tuple[str, int]:
        """Connect to the first address that accepts, all within ``connect_timeout``."""
        loop = asyncio.get_running_loop()
        started = perf_counter()
        failure = OSError("the name resolved to no address")
        try:
            async with asyncio.timeout(self._connect_timeout):
                for address in addresses:
                    try:
                        await loop.create_connection(
                            relay.upstream_protocol,
                            address["host"],
                            address["port"],
                            family=address["family"],
                        )
                    except OSError as exc:
                        failure = exc
                    else:
                        return address["host"], address["port"]
            raise failure
        finally:
            timings.connected(started)  # failed dials are timed too

    def _fail(self, record: TunnelRecord, err: ProxyError, exc: BaseException) -> web.Response:
        record.fail(err, exc)
        # Closed: after a refused CONNECT, what the client sends next is not HTTP.
        response = errors.error_response(
            err, self._pseudonym, details=errors.describe(exc), close=True
        )
        response.headers[self._rid_header] = record.request_id
        return response

    def __repr__(self) -> str:
        return f"<Tunneller {self._relays!r}>"
