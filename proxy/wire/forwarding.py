"""Forward one request through the traced upstream session, over TCP or verified TLS.

The target is an absolute URL: ``http://`` goes upstream in the clear, ``https://`` over
TLS from the same pool (origination). Whatever the request came in as (absolute-form in
the clear, or a request inside a CONNECT), this is the one path it takes.

Bodies stream in both directions (bounded by aiohttp's read buffers); every request ends
in exactly one ``Outcome`` that feeds the metrics and the access log.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator
from time import perf_counter
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.h2.core import Fields
from proxy.h2.server import CLIENT_RESET, StreamHandle, StreamWriter
from proxy.h2.upstream import HTTP1, H2Response, H2Upstream, Http1
from proxy.observe import log
from proxy.observe.outcome import Observer, Outcome
from proxy.observe.spans import SpanRecorder
from proxy.observe.tracing import Timings, timing
from proxy.rules import errors, headers, policy
from proxy.rules import response as response_rules
from proxy.rules.errors import Http2Required, ProxyError
from proxy.rules.request_id import choose_request_id, choose_trace_context
from proxy.rules.response import InvalidResponse
from proxy.rules.target import Target
from proxy.wire.interim import INTERIM_SINK, Continue, InterimRelay
from proxy.wire.relay import Relay, UpstreamProtocol
from proxy.wire.tunnelling import Relays, TunnelRecord, TunnelTarget

# aiohttp's client would otherwise add these (RFC 9110 §7.6: a proxy forwards, it does
# not invent request fields).
SKIP_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# RFC 9110 §9.3.8: a TRACE echo should leave out fields likely to hold credentials.
_TRACE_ECHO_HIDDEN: Final = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"}
)
_ALLOWED_METHODS: Final = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"

# What the forwarder relays: aiohttp's HTTP/1.1 response, or a stream of an HTTP/2 origin.
Upstream = aiohttp.ClientResponse | H2Response


class CountedBody:
    """The client's body as the upstream request's payload, counted in ``bytes_in`` as sent.

    A chunk counts once aiohttp asks for the next one, that is once it has been written;
    so the count holds on every path, a failure after the response headers included.
    """

    __slots__ = ("_chunks", "_outcome")

    def __init__(self, chunks: AsyncIterable[bytes], outcome: Outcome) -> None:
        self._chunks = chunks
        self._outcome = outcome

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk
            self._outcome.bytes_in += len(chunk)

    def __repr__(self) -> str:
        return f"<CountedBody sent={self._outcome.bytes_in}>"


class ForwardedResponse(web.StreamResponse):
    """A response relayed from an upstream; remembers which defaults aiohttp must not add."""

    def __init__(self, up: Upstream, fields: CIMultiDict[str]) -> None:
        super().__init__(status=up.status, reason=up.reason, headers=fields)
        self.upstream_had_content_type = "Content-Type" in fields
        self.upstream_had_server = "Server" in fields


class ReadyForwardedResponse(ForwardedResponse):
    """For a body whose first bytes have already arrived: the headers leave with them.

    One write (one system call) instead of two. When the body is not there yet, the plain
    class sends the headers at once, so a slow stream still shows its headers early.
    """

    _send_headers_immediately = False


def check_upstream(up: Upstream) -> InvalidResponse | None:
    """Why an upstream response head must not be relayed, or None when it may be.

    Called for every upstream response before anything reaches the client; aiohttp's
    client parser is lenient, so this is where RFC 9110/9112 are held (proxy.rules.response).
    An HTTP/2 head (its version checked by h2) is held to the same field rules.
    """
    if isinstance(up, H2Response):
        key = (1, 1)  # h2 checked the framing and version; the field rules are the same
    else:
        version = up.version
        key = (version.major, version.minor) if version is not None else (1, 1)
    return response_rules.check(key, up.status, up.reason, up.raw_headers)


def discard_upstream(up: Upstream) -> None:
    """Close the connection ``up`` came on, even if aiohttp has already pooled it.

    When the whole response arrives with its head, aiohttp hands the connection back to
    the pool before ``request()`` returns (``up.connection`` is then None), so
    ``up.close()`` alone would leave it there for the next request. The protocol is
    still reachable as ``up._protocol`` (private: see docs/aiohttp-internals.md); closing
    its transport makes the pool drop it. No await lies between the release and this.
    """
    if isinstance(up, H2Response):
        up.close()  # a stream: its connection carries on (HTTP/2 framing is per stream)
        return
    protocol = up._protocol
    up.close()
    if protocol is not None:
        protocol.close()


def strip_added_defaults(response: web.StreamResponse) -> None:
    """Remove the Content-Type and Server aiohttp adds when the upstream sent none.

    Date stays: RFC 9110 §6.6.1 asks a forwarding recipient to add one when missing.
    """
    if isinstance(response, ForwardedResponse):
        if not response.upstream_had_content_type:
            response.headers.popall("Content-Type", None)
        if not response.upstream_had_server:
            response.headers.popall("Server", None)


class SwitchedResponse(ForwardedResponse):
    """The upstream's 101 to a WebSocket handshake; the relay carries the connection after it."""

    def __init__(self, up: aiohttp.ClientResponse, fields: CIMultiDict[str], relay: Relay) -> None:
        super().__init__(up, fields)
        self.upstream = up
        self.relay = relay


class Forwarder:
    """Forwards requests to ``http://`` and ``https://`` targets, WebSocket handshakes included."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        observer: Observer | None,
        relays: Relays,
        *,
        request_id_header: str,
        via_pseudonym: str,
        read_idle_timeout: float,
        tunnel_idle_timeout: float,
        spans: SpanRecorder | None = None,
        h2: H2Upstream | None = None,
    ) -> None:
        self._session = session
        self._h2 = h2  # HTTP/2 upstream for requests that came in over HTTP/2
        self._observer = observer
        self._relays = relays
        self._tunnel_idle_timeout = tunnel_idle_timeout
        self._spans = spans  # None when span export is off: no span work at all
        self._record_new = spans.sampler if spans is not None else None
        self._rid_header = request_id_header
        self._rid_key = request_id_header.lower().encode("latin-1")
        self._pseudonym = via_pseudonym
        self._read_idle_timeout = read_idle_timeout
        self._via = {
            version: headers.via_value(version, via_pseudonym)
            for version in ((1, 1), (1, 0), (2, 0))
        }
        self._logger = log.get_logger()

    async def __call__(
        self, request: web.BaseRequest, target: Target, expect: Continue
    ) -> web.StreamResponse:
        """Forward ``request`` to ``target`` (as ``proxy.rules.target.forward_target`` made it).

        The same path for every request that reaches the proxy, however it came in
        (absolute-form in the clear, or inside a CONNECT). The response is the upstream's,
        relayed, or the proxy's own error answer; one ``Outcome`` either way.
        """
        start = perf_counter()
        request_id = choose_request_id(request.headers.get(self._rid_header))
        trace = choose_trace_context(request.headers.get("traceparent"), self._record_new)
        outcome = Outcome(request, target.url, target.host, request_id, trace, Timings(start))
        try:
            response = await self._forward(request, target, outcome, expect)
        except asyncio.CancelledError as exc:
            # An HTTP/2 client's RST_STREAM cancels its stream's handler. Otherwise shutdown
            # cancels handlers still running after its backstop (the drain was skipped or
            # timed out): whatever the client got is cut short.
            outcome.timings.settle(perf_counter())
            reset = exc.args == (CLIENT_RESET,)
            outcome.fail(errors.CLIENT_DISCONNECTED if reset else errors.CUT_AT_SHUTDOWN, exc)
            raise
        finally:
            # A WebSocket's handshake ends at its 101: that is the request logged here.
            outcome.total = perf_counter() - start
            if self._observer is not None:
                self._observer(outcome)
            if trace.span_id is not None and self._spans is not None:
                self._spans.forwarded(outcome)
        if isinstance(response, SwitchedResponse):
            await self._carry(request, response, target, outcome)
        return response

    async def _forward(
        self,
        request: web.BaseRequest,
        target: Target,
        outcome: Outcome,
        expect: Continue,
    ) -> web.StreamResponse:
        if policy.via_loops(request.headers.getall("Via", ()), self._pseudonym):
            loop = policy.LoopDetected(f"Via already holds {self._pseudonym}")
            return self._fail_before_response(request, outcome, loop)
        raw = request.raw_headers
        fields = headers.filter_fields(raw, headers.request_drop_set(raw, self._rid_key))
        if not outcome.trace.kept:
            fields.popall("tracestate", None)  # it belonged to the trace we replaced
        version = (request.version.major, request.version.minor)
        via = self._via.get(version) or headers.via_value(version, self._pseudonym)
        fields.add("Via", via)
        self._stamp(fields, outcome)
        if target.websocket:
            fields.extend(headers.WEBSOCKET_UPGRADE)

        max_forwards = headers.max_forwards(request.method, request.headers.get("Max-Forwards"))
        if max_forwards == 0:
            return self._answer_locally(request, outcome)
        if max_forwards is not None:
            fields["Max-Forwards"] = str(max_forwards - 1)

        body: CountedBody | None = None
        if request.body_exists:
            # A client waiting for 100 Continue gets it when the upstream reads the body.
            chunks = expect.body() if expect.pending else request.content.iter_any()
            body = CountedBody(chunks, outcome)
            length = request.headers.get("Content-Length")
            if length is not None:
                fields["Content-Length"] = length  # keeps the client's framing choice

        sink = INTERIM_SINK.set(InterimRelay(request, self._rid_key, via))
        try:
            with timing(outcome.timings):  # the connector's TLS clock finds it there
                up: Upstream | None = None
                h1 = HTTP1
                if request.version.major == 2 and self._h2 is not None:
                    sent = await self._h2_request(request, target, fields, body, outcome)
                    if isinstance(sent, H2Response):
                        up = sent
                    else:
                        h1 = sent
                if up is None:
                    up = await self._session.request(
                        request.method,
                        target.url,
                        headers=fields,
                        data=body,
                        allow_redirects=False,
                        trace_request_ctx=outcome.timings,
                        ssl=h1.ssl,
                    )
                    if h1.dialled:  # it reused the connection this request dialled
                        outcome.timings.reused = False
        except InvalidResponse as exc:  # a 1xx head that breaks a rule (InterimRelay)
            return self._refuse_upstream(request, outcome, exc)
        except Exception as exc:
            return self._fail_before_response(request, outcome, exc)
        finally:
            INTERIM_SINK.reset(sink)

        invalid = check_upstream(up)
        if invalid is not None:
            discard_upstream(up)  # RFC 9112 §6.3: that connection is never used again
            up.release()
            return self._refuse_upstream(request, outcome, invalid)
        if up.status == 101 and isinstance(up, aiohttp.ClientResponse):
            try:
                return await self._switch(request, up, outcome, target.websocket)
            except BaseException:
                up.close()
                raise
        try:
            return await self._relay(request, up, outcome, expect)
        finally:
            up.release()

    async def _h2_request(
        self,
        request: web.BaseRequest,
        target: Target,
        fields: CIMultiDict[str],
        body: CountedBody | None,
        outcome: Outcome,
    ) -> H2Response | Http1:
        """Over HTTP/2 when the origin speaks it; else how to go over HTTP/1.1 (the session).

        A request that needs HTTP/2 (gRPC) is refused rather than sent to an HTTP/1.1 origin.
        """
        assert self._h2 is not None
        raw = request.raw_headers
        up = await self._h2.request(
            request.method,
            target.url,
            fields,
            body,
            outcome.timings,
            trailers=headers.accepts_trailers(raw),
            trailers_of=functools.partial(request_trailers, request, self._rid_key),
        )
        if isinstance(up, Http1) and headers.needs_http2(raw):
            raise Http2Required(f"{target.host} offers no h2 in ALPN")
        return up

    def _response_fields(self, up: Upstream, outcome: Outcome) -> CIMultiDict[str]:
        raw = up.raw_headers
        fields = headers.filter_fields(raw, headers.response_drop_set(raw, self._rid_key))
        version = up.version
        key = (version.major, version.minor) if version is not None else (1, 1)
        fields.add("Via", self._via.get(key) or headers.via_value(key, self._pseudonym))
        self._stamp(fields, outcome)
        return fields

    async def _relay(
        self,
        request: web.BaseRequest,
        up: Upstream,
        outcome: Outcome,
        expect: Continue,
    ) -> web.StreamResponse:
        fields = self._response_fields(up, outcome)
        content = up.content
        ready = content.is_eof() or content.total_bytes > 0
        response = (ReadyForwardedResponse if ready else ForwardedResponse)(up, fields)
        outcome.status = up.status
        client_version = (request.version.major, request.version.minor)
        if headers.ends_at_close(
            client_version, request.method, up.status, fields.get("Content-Length")
        ):
            # aiohttp leaves such a connection open (it omits only Connection: keep-alive).
            response.force_close()
        expect.withdraw(response)  # the upstream answered before it read the body
        connection = up.connection
        if self._spans is not None:
            outcome.peer = upstream_peer(up)
        if connection is not None and connection.protocol is not None and not up.content.is_eof():
            # The session's sock_read bounded the wait for headers; the body gets its own
            # idle limit. Restarting the timer is safe only while the body is unfinished:
            # aiohttp drops it at end of body, and a timer left on a pooled connection
            # would break it later.
            connection.protocol.read_timeout = self._read_idle_timeout
            connection.protocol.start_timeout()

        await response.prepare(request)
        while True:
            try:
                chunk = await content.readany()
            except Exception as exc:
                outcome.fail(errors.classify(exc, errors.DURING_BODY), exc)
                up.close()  # never pool a connection whose body is not complete
                _close_incomplete(request)
                return response
            if not chunk:
                break
            try:
                await response.write(chunk)
            except ConnectionError as exc:
                outcome.fail(errors.CLIENT_DISCONNECTED, exc)
                up.close()
                return response
            outcome.bytes_out += len(chunk)
        if isinstance(up, H2Response):
            # gRPC's status: in the trailers, or in the head of a trailers-only answer.
            outcome.grpc_status = headers.grpc_status(up.trailers or up.raw_headers)
            if up.trailers:
                relay_trailers(request, up.trailers, self._rid_key)
        await response.write_eof()
        return response

    async def _switch(
        self, request: web.BaseRequest, up: aiohttp.ClientResponse, outcome: Outcome, asked: bool
    ) -> web.StreamResponse:
        """The upstream's 101: take its connection over for a relay and send the 101 on.

        From here on neither side speaks HTTP, so the connection is never pooled again; it
        still counts against the host's pool limits until the relay ends and ``_carry``
        closes it.
        """
        connection = up.connection
        transport = request.transport
        if not asked or connection is None or connection.protocol is None:
            up.close()  # a 101 to a request that asked for no upgrade is not HTTP we relay
            unasked = aiohttp.ClientResponseError(
                up.request_info, (), status=101, message="switched protocols unasked"
            )
            return self._fail_before_response(request, outcome, unasked)
        relay = Relay(self._tunnel_idle_timeout)
        upstream = connection.protocol
        upstream_transport = connection.transport
        assert upstream_transport is not None  # a connected protocol has its transport
        sink = UpstreamProtocol(relay, upstream)
        upstream_transport.set_protocol(sink)
        relay.attach_upstream(upstream_transport)
        upstream.read_timeout = None  # the relay's idle limit applies from now on
        # The bytes that came right behind the 101 (aiohttp held them) are the first relayed.
        upstream.set_parser(sink, None)
        fields = self._response_fields(up, outcome)
        fields.extend(headers.WEBSOCKET_UPGRADE)
        response = SwitchedResponse(up, fields, relay)
        outcome.status = 101
        try:
            if transport is None:
                raise ConnectionResetError("the client has gone")
            await response.prepare(request)
        except ConnectionError as exc:
            relay.close("error")
            up.close()
            return self._fail_before_response(request, outcome, exc)
        response.force_close()  # only after prepare: before, the 101 would say Connection: close
        return response

    async def _carry(
        self, request: web.BaseRequest, response: SwitchedResponse, target: Target, outcome: Outcome
    ) -> None:
        """Relay the switched connection until it ends, timed and counted like a tunnel."""
        transport = request.transport
        url = target.url
        host, port = url.host, url.port
        assert host is not None  # forward_target refuses a target without a host
        assert port is not None  # http has a default port
        record = TunnelRecord(
            request.remote,
            TunnelTarget(host, port, target.host),
            outcome.request_id,
            Timings(outcome.timings.start),
            kind="websocket",
            status=101,
            trace_id=outcome.trace.trace_id,
        )
        try:
            if transport is None:  # the client left as the 101 went out
                response.relay.close("error")
                return
            await self._relays.run(request, transport, response.relay, record)
        finally:
            record.duration = perf_counter() - record.timings.start
            response.upstream.close()
            self._relays.record(record)

    def _fail_before_response(
        self, request: web.BaseRequest, outcome: Outcome, exc: Exception
    ) -> web.StreamResponse:
        outcome.timings.settle(perf_counter())
        if _client_gone(request):
            err: ProxyError = errors.CLIENT_DISCONNECTED
        else:
            err = errors.classify(exc, errors.BEFORE_RESPONSE)
        outcome.fail(err, exc)
        outcome.status = err.status
        response = errors.error_response(err, self._pseudonym, details=errors.describe(exc))
        self._stamp(response.headers, outcome)
        return response

    def _refuse_upstream(
        self, request: web.BaseRequest, outcome: Outcome, invalid: InvalidResponse
    ) -> web.StreamResponse:
        """502 ``http_protocol_error`` for a response head that breaks a rule."""
        err = errors.PROTOCOL_ERROR
        outcome.fail(err, invalid)
        outcome.status = err.status
        self._logger.info(
            "invalid_response",
            request_id=outcome.request_id,
            host=outcome.host,
            rule=invalid.rule.name,
            cite=invalid.rule.cite,
        )
        response = errors.error_response(err, self._pseudonym, details=invalid.rule.details)
        self._stamp(response.headers, outcome)
        return response

    def _answer_locally(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        """Max-Forwards reached 0: this proxy is the final recipient (RFC 9110 §7.6.2)."""
        outcome.status = 200
        if request.method == "OPTIONS":
            response = web.Response(status=200, headers={"Allow": _ALLOWED_METHODS})
        else:
            lines = [
                f"TRACE {request.raw_path} HTTP/{request.version.major}.{request.version.minor}"
            ]
            lines += [
                f"{name.decode('latin-1')}: {value.decode('latin-1')}"
                for name, value in request.raw_headers
                if name.lower() not in _TRACE_ECHO_HIDDEN
            ]
            response = web.Response(
                status=200, body="\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
            )
            response.content_type = "message/http"
        self._stamp(response.headers, outcome)
        return response

    def _stamp(self, fields: CIMultiDict[str], outcome: Outcome) -> None:
        """The request id and trace context go on every message we send, both ways."""
        fields[self._rid_header] = outcome.request_id
        fields["traceparent"] = outcome.trace.traceparent


def relay_trailers(request: web.BaseRequest, trailers: Fields, request_id_header: bytes) -> None:
    """Trailers go to a client that can take them (an HTTP/2 stream), byte for byte; hop-by-hop
    fields stay behind (RFC 9110 §6.5.1)."""
    writer = request.writer
    if isinstance(writer, StreamWriter):
        drop = headers.response_drop_set(trailers, request_id_header)
        writer.trailers = headers.kept_fields(trailers, drop)


def request_trailers(request: web.BaseRequest, request_id_header: bytes) -> Fields:
    """The trailers an HTTP/2 client sent after its request body, for an HTTP/2 origin,
    without what the proxy owns or what is hop-by-hop (RFC 9110 §6.5.1). (aiohttp's client
    cannot send trailers: an HTTP/1.1 origin never gets them.)"""
    handle = request.protocol
    if not isinstance(handle, StreamHandle) or not handle.trailers:
        return ()
    drop = headers.request_drop_set(handle.trailers, request_id_header)
    return headers.kept_fields(handle.trailers, drop)


def upstream_peer(up: Upstream) -> tuple[str, int] | None:
    """The address the response came from, for the span's network.peer.*.

    An HTTP/2 stream knows its connection's peer. ``up.connection`` is already None when
    the whole body came with the headers (the
    connection went back to the pool), so this reads the private ``_protocol`` aiohttp
    keeps on the response (pinned below 3.15; docs/aiohttp-internals.md; tests/test_spans.py).
    """
    if isinstance(up, H2Response):
        return up.peer
    protocol = getattr(up, "_protocol", None)
    transport = getattr(protocol, "transport", None)
    peer = transport.get_extra_info("peername") if transport is not None else None
    return (str(peer[0]), int(peer[1])) if peer else None


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing() or request.content.exception() is not None


def _close_incomplete(request: web.BaseRequest) -> None:
    """Close the client connection so the partial body cannot look complete.

    The bytes already written are flushed first; what the client then sees is a body short
    of its Content-Length, or chunked framing without the last chunk.
    """
    transport = request.transport
    if transport is not None:
        transport.close()
