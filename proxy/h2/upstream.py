"""HTTP/2 towards origins: multiplexed connections, dialled through the session's connector.

Chosen by measurement over httpcore's HTTP/2 (h2-facts §2, §3): httpcore drops response
trailers (gRPC's status lives there), has no DNS phase of its own and no event for a pool
wait, and overwrites the ALPN list of the caller's SSL context. Dialling through the
session's own ``CheckedConnector`` instead keeps everything the HTTP/1.1 path has: the
destination check before the lookup and on every address, the DNS cache, the per-host
limits and their timed wait, and the dns/connect/tls phases (trace signals and the timed
handshake). Once connected, the transport is taken from aiohttp's protocol and given to an
``H2Client`` (h2-facts §3: bytes aiohttp read meanwhile are replayed; its connection_lost is
forwarded so the connector's bookkeeping ends).

Phases stay disjoint: queue is the wait for a connection being dialled or for a stream slot
(the peer's SETTINGS_MAX_CONCURRENT_STREAMS); dns, connect and tls belong to the request that
dialled; ttfb runs from the request's HEADERS sent to the response's received; the forwarder
measures total to the end of the stream, trailers included. A request carried on an existing
connection counts as reused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import Any, Final

import aiohttp
from aiohttp.connector import Connection
from aiohttp.http import HttpVersion, HttpVersion11
from aiohttp.http_parser import RawResponseMessage
from aiohttp.tracing import Trace
from h2.errors import ErrorCodes
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.h2 import core
from proxy.h2.core import Fields, H2Core, Limits, StreamGone
from proxy.h2.streams import READER_LIMIT, BodyReader, H2Connection
from proxy.observe.tracing import Timings
from proxy.rules.errors import PoolWaitExceeded
from proxy.tls.connector import AlpnProbe
from proxy.wire.interim import INTERIM_SINK

HTTP2: Final = HttpVersion(2, 0)
# The request's trailers, asked for once its body has ended (they come after it).
TrailersOf = Callable[[], Fields] | None
_KEPT: Final = 4096  # origins whose ALPN answer is remembered at once
_CONNECTIONS_PER_ORIGIN: Final = 8  # at most (H2Upstream._most)
_INTERIM_KEPT: Final = 8  # 1xx heads relayed per stream; more from an origin are dropped
# Requests are framed by HTTP/2 itself (RFC 9113 §8.2.2): these never go upstream.
_NOT_FORWARDED: Final = frozenset({"host", "connection", "transfer-encoding", "te", "upgrade"})


@dataclass(frozen=True, slots=True)
class Http1:
    """The origin speaks HTTP/1.1 only: send through the session with this ``ssl``.

    A dial whose ALPN answer was http/1.1 puts its connection in the session's pool under
    the context that offered h2; requests from HTTP/2 clients to that origin name the same
    context, so they reuse it. A new connection the session dials under it offers
    http/1.1 alone (``proxy.tls.connector``): an origin that starts choosing h2 while it is
    remembered as HTTP/1.1-only still gets HTTP/1.1 it can read.
    """

    ssl: ssl.SSLContext | bool = True
    dialled: bool = False  # this request made the connection it will reuse


HTTP1: Final = Http1()


class H2Response:
    """An upstream HTTP/2 response, shaped as the forwarder reads an aiohttp response."""

    version = HTTP2
    connection = None  # no aiohttp connection: the stream's idle timer is ours

    def __init__(
        self, client: H2Client, stream_id: int, head: core.Head, pending: _Pending
    ) -> None:
        self._client = client
        self._pending = pending
        self._stream_id = stream_id
        status = b"0"
        raw: list[tuple[bytes, bytes]] = []
        for name, value in head.fields:
            if name == b":status":
                status = value
            elif name[:1] != b":":
                raw.append((name, value))
        self.status = int(status)
        self.reason: str | None = None
        self.raw_headers = tuple(raw)
        self.headers = CIMultiDictProxy(
            CIMultiDict((n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw)
        )
        self.content = pending.body
        transport = client.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.peer = (str(peer[0]), int(peer[1])) if peer else None

    @property
    def trailers(self) -> Fields:
        """The trailer fields, once the stream has ended with them (RFC 9113 §8.1)."""
        return self._pending.trailers

    def release(self) -> None:
        """Done with the response: a stream not yet at its end is cancelled."""
        if not self.content.is_eof():
            self.close()

    def close(self) -> None:
        self._client.reset(self._stream_id, ErrorCodes.CANCEL)

    def __repr__(self) -> str:
        return f"<H2Response {self.status} stream={self._stream_id}>"


class _Pending:
    """One stream's state; its events may all arrive before the caller resumes.

    ``heads`` has the 1xx heads (at most ``_INTERIM_KEPT``), then the final head, or the
    failure that came instead of it.
    """

    __slots__ = ("body", "got_head", "heads", "idle", "interim", "trailers")

    def __init__(self, body: BodyReader) -> None:
        self.heads: asyncio.Queue[core.Head | core.Interim | Exception] = asyncio.Queue()
        self.got_head = False  # the final head came (it may still wait in ``heads``)
        self.interim = 0  # 1xx heads put in ``heads``
        self.body = body
        self.trailers: Fields = ()
        self.idle: asyncio.TimerHandle | None = None


class H2Client(H2Connection):
    """One multiplexed connection to an origin."""

    def __init__(
        self,
        connection: Connection,
        old: asyncio.BaseProtocol,
        *,
        limits: Limits,
        idle: float,
        keepalive: float,
    ) -> None:
        super().__init__(H2Core(client_side=True, limits=limits))
        self._connection = connection  # holds the connector's slot until closed
        self._old = old  # aiohttp's protocol: told of the close, as the connector expects
        self._idle = idle  # --read-idle-timeout, between frames of one response
        # --upstream-keepalive-timeout: with no stream for this long the connection closes
        # (it holds a slot of the connector, as an idle pooled HTTP/1.1 connection does).
        self._keepalive = keepalive
        self._unused: asyncio.TimerHandle | None = None
        self._streams: dict[int, _Pending] = {}
        self.slot_freed: asyncio.Event = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_unused()  # until its first stream (the dialler's, unless that one failed)

    @property
    def usable(self) -> bool:
        return self.transport is not None and self.core.error is None and not self.core.going_away

    def can_open(self) -> bool:
        return self.usable and self.core.can_open()

    async def request(
        self,
        fields: Fields,
        body: AsyncIterable[bytes] | None,
        timings: Timings,
        headers_timeout: float | None,
        trailers_of: TrailersOf = None,
    ) -> H2Response:
        core_ = self.core
        sid = core_.next_stream_id()
        pending = self._streams[sid] = _Pending(self.body_reader(sid, READER_LIMIT))
        if self._unused is not None:
            self._unused.cancel()
            self._unused = None
        try:
            core_.send_head(sid, fields, end=body is None)
            self.flush()
        except StreamGone as exc:
            self._streams.pop(sid, None)
            raise aiohttp.ServerDisconnectedError("the HTTP/2 connection closed") from exc
        timings.sent_at = perf_counter()
        pump = None
        if body is not None:
            pump = asyncio.ensure_future(self._pump(sid, body, trailers_of))
        try:
            async with asyncio.timeout(headers_timeout):
                head = await _final_head(pending)
        except TimeoutError as exc:
            self.reset(sid, ErrorCodes.CANCEL)
            raise aiohttp.SocketTimeoutError("no response headers in time") from exc
        except BaseException:
            self.reset(sid, ErrorCodes.CANCEL)
            raise
        finally:
            if pump is not None and not pending.got_head:
                pump.cancel()
        timings.response_at = perf_counter()
        response = H2Response(self, sid, head, pending)
        if head.end:
            if not pending.body.is_eof():
                pending.body.feed_eof()
            self._finish(sid)
        elif sid in self._streams:  # not ended while we waited to resume
            self._arm(sid, pending)
        return response

    async def _pump(self, sid: int, body: AsyncIterable[bytes], trailers_of: TrailersOf) -> None:
        """The request body, as the origin's window allows; ends the stream at its end, with
        the request's trailers when it had some (RFC 9113 §8.1)."""
        try:
            async for chunk in body:
                await self.send_body(sid, chunk, False)
            trailers = trailers_of() if trailers_of is not None else ()
            if trailers:
                self.core.send_head(sid, trailers, end=True)
                self.flush()
            else:
                await self.send_body(sid, b"", True)
        except StreamGone:
            pass  # the stream ended first (an early answer, a reset): nothing more to send
        except Exception:
            self.reset(sid, ErrorCodes.CANCEL)  # the client's body failed: so does the request

    def on_event(self, event: core.Event) -> None:
        pending = self._streams.get(getattr(event, "stream_id", 0))
        if isinstance(event, core.GoneAway):
            self._gone_away(event.last_stream_id)
            return
        if isinstance(event, core.Window):
            if event.stream_id == 0:
                self._freed()  # new SETTINGS may allow more streams
            return
        if pending is None:
            if isinstance(event, core.Data):
                self.core.ack(event.stream_id, len(event.data))
            return
        if isinstance(event, core.Data):
            pending.body.feed_data(event.data)
            self._arm(event.stream_id, pending)
        elif isinstance(event, core.Head):
            if not pending.got_head:
                pending.got_head = True
                pending.heads.put_nowait(event)
        elif isinstance(event, core.Interim):
            if not pending.got_head and pending.interim < _INTERIM_KEPT:
                pending.interim += 1
                pending.heads.put_nowait(event)
        elif isinstance(event, core.Trailers):
            pending.trailers = event.fields
        elif isinstance(event, core.End):
            if pending.got_head and not pending.body.is_eof():
                pending.body.feed_eof()
            self._finish(event.stream_id)
        elif isinstance(event, core.Reset):
            self._fail(
                event.stream_id, aiohttp.ServerDisconnectedError("the origin reset the stream")
            )

    def _arm(self, sid: int, pending: _Pending) -> None:
        if pending.idle is not None:
            pending.idle.cancel()
        pending.idle = self._loop.call_later(self._idle, self._idled, sid)

    def _idled(self, sid: int) -> None:
        self._fail(sid, aiohttp.SocketTimeoutError("upstream went quiet in the middle of the body"))
        self.reset(sid, ErrorCodes.CANCEL)

    def _fail(self, sid: int, exc: Exception) -> None:
        pending = self._streams.get(sid)
        if pending is None:
            return
        if not pending.got_head:
            pending.got_head = True
            pending.heads.put_nowait(exc)
        elif not pending.body.is_eof():
            pending.body.set_exception(
                exc
                if isinstance(exc, aiohttp.SocketTimeoutError)
                else aiohttp.ClientPayloadError(str(exc))
            )
        self._finish(sid)

    def _finish(self, sid: int) -> None:
        pending = self._streams.pop(sid, None)
        if pending is not None and pending.idle is not None:
            pending.idle.cancel()
        self.stream_gone(sid)
        self._freed()
        if self._streams:
            return
        if self.core.going_away:
            self.close()  # the origin's GOAWAY, and its last stream is done
        else:
            self._arm_unused()

    def _arm_unused(self) -> None:
        if self._unused is None and self.transport is not None:
            self._unused = self._loop.call_later(self._keepalive, self._retire)

    def _retire(self) -> None:
        """Unused for --upstream-keepalive-timeout: GOAWAY (RFC 9113 §6.8), then close."""
        self._unused = None
        if not self._streams:
            self.core.go_away()
            self.close()

    def _freed(self) -> None:
        """Wake whoever waits for a stream slot (or for this connection to stop counting)."""
        self.slot_freed.set()
        self.slot_freed = asyncio.Event()

    def _gone_away(self, last: int) -> None:
        """RFC 9113 §6.8: streams up to ``last`` still finish here; those above it were not
        processed; no new stream goes on this connection."""
        for sid in [sid for sid in self._streams if sid > last]:
            self._fail(sid, aiohttp.ServerDisconnectedError("the origin went away (GOAWAY)"))
        self._freed()  # a waiter may dial a new connection now
        if not self._streams:
            self.close()

    def reset(self, sid: int, code: int) -> None:
        self.core.reset(sid, code)
        self.flush()
        self._finish(sid)

    def on_lost(self, exc: Exception | None) -> None:
        if self._unused is not None:
            self._unused.cancel()
        for sid in list(self._streams):
            self._fail(sid, aiohttp.ServerDisconnectedError("the HTTP/2 connection closed"))
        self._old.connection_lost(exc)
        self._connection.close()  # the connector's slot is free again
        self.slot_freed.set()

    def __repr__(self) -> str:
        return f"<H2Client streams={len(self._streams)} {self.core!r}>"


class H2Upstream:
    """HTTP/2 connections per origin; ``request`` gives None for an HTTP/1.1-only origin."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        context: ssl.SSLContext,
        *,
        limits: Limits,
        read_idle_timeout: float,
        headers_timeout: float,
        pool_wait_timeout: float,
        keepalive_timeout: float,
        remember_seconds: float = 300.0,
    ) -> None:
        self._session = session
        self._context = context  # offers h2 and http/1.1
        self._over_http1 = Http1(context)
        self._limits = limits
        self._idle = read_idle_timeout
        self._headers_timeout = headers_timeout
        self._pool_wait = pool_wait_timeout
        self._keepalive = keepalive_timeout
        self._remember = remember_seconds
        self._http1: dict[tuple[str, int], float] = {}  # origin -> until (its ALPN said no)
        # Connections per origin: another is dialled when every one is at the peer's stream
        # limit, up to this many; never more than the connector would let us hold, or the
        # dial would wait for a slot only a connection of ours can give back.
        per_host = session.connector.limit_per_host if session.connector is not None else 0
        self._most = min(_CONNECTIONS_PER_ORIGIN, per_host or _CONNECTIONS_PER_ORIGIN)
        self._clients: dict[tuple[str, str, int], list[H2Client]] = {}
        self._dialling: dict[tuple[str, str, int], asyncio.Future[H2Client | Http1]] = {}

    def speaks_http1_only(self, url: URL) -> bool:
        until = self._http1.get((url.raw_host or "", url.port or 443))
        if until is None:
            return False
        if until <= monotonic():
            del self._http1[(url.raw_host or "", url.port or 443)]
            return False
        return True

    async def request(
        self,
        method: str,
        url: URL,
        fields: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
        timings: Timings,
        *,
        trailers: bool,
        trailers_of: TrailersOf = None,
    ) -> H2Response | Http1:
        """Send on an HTTP/2 connection to ``url``'s origin, or say how to send over HTTP/1.1.

        ``https`` offers h2 in ALPN; ``http`` is h2c with prior knowledge (the client spoke it
        to us inside a CONNECT to that origin). ``trailers``: the client said ``te: trailers``;
        ``trailers_of`` gives the request's own trailers, which follow its body.
        """
        if url.scheme == "https" and self.speaks_http1_only(url):
            return self._over_http1
        client = await self._acquire(url, timings)
        if isinstance(client, Http1):
            return client
        return await client.request(
            _request_fields(method, url, fields, trailers),
            body,
            timings,
            self._headers_timeout,
            trailers_of,
        )

    async def _acquire(self, url: URL, timings: Timings) -> H2Client | Http1:
        key = (url.scheme, url.raw_host or "", url.port or 0)
        started = perf_counter()
        waited = False
        try:
            async with asyncio.timeout(self._pool_wait):
                while True:
                    # Every open connection counts (one going away still holds its slot in
                    # the connector); only those that may open a stream are chosen.
                    clients = [c for c in self._clients.get(key, []) if c.transport is not None]
                    self._clients[key] = clients
                    for client in clients:
                        if client.can_open():
                            if timings.reused is None:
                                timings.reused = True
                            return client
                    dialling = self._dialling.get(key)
                    if dialling is not None:
                        waited = True
                        if isinstance(await asyncio.shield(dialling), Http1):
                            return self._over_http1
                        continue
                    if len(clients) >= self._most:
                        waited = True
                        await _first_freed(clients)
                        continue
                    if waited:
                        timings.queue += perf_counter() - started
                        timings.queued = True
                        waited = False
                    return await self._dial(key, url, timings)
        except TimeoutError as exc:
            raise PoolWaitExceeded(f"no HTTP/2 stream free within {self._pool_wait:g} s") from exc
        finally:
            if waited:
                timings.queue += perf_counter() - started
                timings.queued = True

    async def _dial(
        self, key: tuple[str, str, int], url: URL, timings: Timings
    ) -> H2Client | Http1:
        future: asyncio.Future[H2Client | Http1] = asyncio.get_running_loop().create_future()
        self._dialling[key] = future
        try:
            client = await self._connect(url, timings)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters re-raise it; do not warn when none waits
            raise
        finally:
            del self._dialling[key]
        future.set_result(client)
        if isinstance(client, H2Client):
            self._clients.setdefault(key, []).append(client)
        return client

    async def _connect(self, url: URL, timings: Timings) -> H2Client | Http1:
        session = self._session
        connector = session.connector
        assert connector is not None
        https = url.scheme == "https"
        # h2c dials with ssl=False: a pool key of its own, so an idle HTTP/1.1 connection of
        # the session is never taken for it.
        request = AlpnProbe(
            "GET", url, loop=asyncio.get_running_loop(), ssl=self._context if https else False
        )
        traces = [
            Trace(session, config, config.trace_config_ctx(trace_request_ctx=timings))
            for config in session.trace_configs
        ]
        connection = await connector.connect(request, traces, session.timeout)
        transport = connection.transport
        old = connection.protocol
        assert transport is not None
        assert old is not None
        if https:
            chosen = transport.get_extra_info("ssl_object").selected_alpn_protocol()
            if chosen != "h2":
                connection.release()  # into the session's pool, for this request only
                self._remember_http1(url)
                return Http1(self._context, dialled=True)
        client = H2Client(
            connection, old, limits=self._limits, idle=self._idle, keepalive=self._keepalive
        )
        # No await since connect returned: what aiohttp read meanwhile is in its tail.
        tail: Any = bytes(old._tail)
        transport.set_protocol(client)
        client.connection_made(transport)
        if tail:
            client.data_received(tail)
        return client

    def _remember_http1(self, url: URL) -> None:
        if len(self._http1) >= _KEPT:
            self._http1.clear()
        self._http1[(url.raw_host or "", url.port or 443)] = monotonic() + self._remember

    async def close(self) -> None:
        """Close every connection and wait (bounded) until each has handed its slot back:
        the session's connector must not see a transport that is half gone."""
        clients = [client for clients in self._clients.values() for client in clients]
        self._clients.clear()
        for client in clients:
            client.close()
        if clients:
            await asyncio.wait([client.closed for client in clients], timeout=1.0)

    def __repr__(self) -> str:
        return f"<H2Upstream origins={len(self._clients)} http1_only={len(self._http1)}>"


async def _final_head(pending: _Pending) -> core.Head:
    """The stream's final head; each 1xx before it goes to the request's ``INTERIM_SINK``
    (the forwarder relays it to the client, RFC 9113 §8.1)."""
    sink = INTERIM_SINK.get()
    while True:
        head = await pending.heads.get()
        if isinstance(head, Exception):
            raise head
        if isinstance(head, core.Head):
            return head
        if sink is not None:
            await sink(_interim_message(head))


def _interim_message(head: core.Interim) -> RawResponseMessage:
    """A 1xx as aiohttp's parser would give it; HTTP/1.1's field rules hold for it (h2 has
    checked the framing and the pseudo-fields, as for a final head: ``check_upstream``)."""
    status = 0
    raw: list[tuple[bytes, bytes]] = []
    for name, value in head.fields:
        if name == b":status":
            status = int(value)
        elif name[:1] != b":":
            raw.append((name, value))
    fields = CIMultiDict(
        (n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw
    )
    return RawResponseMessage(
        HttpVersion11, status, "", CIMultiDictProxy(fields), tuple(raw), False, None, False, False
    )


async def _first_freed(clients: list[H2Client]) -> None:
    """Until a stream slot frees on one of ``clients`` (or one closes or goes away)."""
    waits = [asyncio.ensure_future(client.slot_freed.wait()) for client in clients]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _request_fields(
    method: str, url: URL, fields: CIMultiDict[str], trailers: bool
) -> list[tuple[bytes, bytes]]:
    """Pseudo-fields first (RFC 9113 §8.3.1), then the forwarder's fields, lower-cased."""
    out = [
        (b":method", method.encode("ascii")),
        (b":scheme", url.scheme.encode("ascii")),
        (b":authority", url.raw_authority.encode("ascii")),
        (b":path", (url.raw_path_qs or "/").encode("ascii")),
    ]
    for name, value in fields.items():
        lowered = name.lower()
        if lowered not in _NOT_FORWARDED:
            out.append((lowered.encode("latin-1"), value.encode("utf-8", "surrogateescape")))
    if trailers:
        out.append((b"te", b"trailers"))  # the only TE HTTP/2 allows (RFC 9113 §8.2.2)
    return out
