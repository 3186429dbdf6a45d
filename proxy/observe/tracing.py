"""aiohttp trace signals -> one ``Timings`` record per forwarded request.

The phases are disjoint (see README "Timings"):

- queue: the sum of every wait for a pooled connection; 0 when a slot was free.
- dns: the lookup, only when one ran (a cache miss), failed lookups included.
- connect: a new connection's TCP connect, DNS and TLS excluded, failed dials included.
- tls: a new https connection's TLS handshake (``proxy.tls.connector`` times it), failed
  handshakes included.
- ttfb: request headers sent upstream -> response headers received.
- total: request reached the proxy -> last response byte written (the handler's clock;
  no signal marks the end of a streamed body).

When aiohttp sends an idempotent request again on a fresh connection (the first one
closed before any answer, RFC 9112 §9.3.1), each dial adds its own lookup, TCP connect
and handshake to dns, connect and tls; ttfb and reused are the last attempt's. Each phase
is then still >= 0 and observed once per request.

Signals are delivered with the ``Timings`` object as ``trace_request_ctx``; the callbacks
only record clock readings, so they stay cheap on the request path. aiohttp has no signal
for the handshake, so the connector finds the request's ``Timings`` through a context
variable instead (``timing``): it runs in the task that sent the request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from time import perf_counter
from types import SimpleNamespace
from typing import Any

import aiohttp


class Timings:
    """Clock readings and derived phase durations (seconds) of one request."""

    __slots__ = (
        "_connect_end",
        "_connect_start",
        "_dial_dns",
        "_dial_tls",
        "_dialling",
        "_dns_start",
        "_queue_start",
        "_queue_waiting",
        "_resolving",
        "_tls_start",
        "connect",
        "dns",
        "dns_cache",
        "queue",
        "queued",
        "response_at",
        "reused",
        "sent_at",
        "start",
        "tls",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.queue = 0.0
        self.queued = False  # waited in the pool's queue at least once
        self.dns: float | None = None
        self.dns_cache: str | None = None  # "hit" | "miss" | None (IP literal, reused conn)
        self.connect: float | None = None
        self.tls: float | None = None
        self.reused: bool | None = None
        self.sent_at: float | None = None
        self.response_at: float | None = None
        self._queue_start = 0.0  # when the last wait began
        self._queue_waiting = False
        self._dns_start = 0.0
        self._resolving = False  # a lookup began and has not ended
        self._connect_start = 0.0
        self._connect_end = 0.0
        self._dialling = False  # a dial began and has not ended
        self._dial_dns = 0.0  # dns and tls before the current dial began
        self._dial_tls = 0.0
        self._tls_start = 0.0

    @property
    def waited(self) -> bool:
        """Whether the request reached the pool: its queue time (maybe 0) is a measurement."""
        return self.reused is not None or self.queued

    def end_queue_wait(self, now: float) -> None:
        if self._queue_waiting:
            self._queue_waiting = False
            self.queue += now - self._queue_start

    @property
    def ttfb(self) -> float | None:
        if self.sent_at is None or self.response_at is None:
            return None
        return self.response_at - self.sent_at

    def settle(self, now: float) -> None:
        """A wait, lookup or dial that began but never ended failed at ``now``: time it too.

        aiohttp signals only the end of a lookup or a dial that succeeded, so without this a
        slow resolver that then fails would show in the total alone; nor does it end a queue
        wait that was cancelled (``--pool-wait-timeout``), the wait that matters most.
        """
        self.end_queue_wait(now)
        if self._resolving:
            self.end_lookup(now)  # the dial failed in its lookup: it has no connect time
        elif self._dialling:
            self.end_dial(now)

    def begin_lookup(self, now: float) -> None:
        self._dns_start = now
        self._resolving = True

    def end_lookup(self, now: float) -> None:
        self._resolving = False
        self.dns = (self.dns or 0.0) + (now - self._dns_start)

    def begin_dial(self, now: float) -> None:
        self._connect_start = now
        self._dialling = True
        self._dial_dns = self.dns or 0.0
        self._dial_tls = self.tls or 0.0
        self.reused = False

    def end_dial(self, now: float) -> None:
        """A dial ended: its TCP part is its span minus its own lookup and handshake.

        Only this dial's: a retry's dial must not subtract the previous attempt's handshake
        (that made connect negative). The clamp absorbs float rounding, nothing more.
        """
        self._dialling = False
        self._connect_end = now
        own_dns = (self.dns or 0.0) - self._dial_dns
        own_tls = (self.tls or 0.0) - self._dial_tls
        tcp = max(now - self._connect_start - own_dns - own_tls, 0.0)
        self.connect = (self.connect or 0.0) + tcp

    def connected(self, started: float) -> None:
        """A connection opened outside the connector (a tunnel's dial), begun at ``started``."""
        self._connect_end = perf_counter()
        self.connect = self._connect_end - started

    def handshook(self, started: float) -> None:
        """A TLS handshake begun at ``started`` ended now (``proxy.tls.connector``).

        Summed: when one address fails its handshake, the connector tries the next one, and
        a retried request makes a new connection.
        """
        self._tls_start = started
        self.tls = (self.tls or 0.0) + (perf_counter() - started)

    def phases(self) -> list[tuple[str, float, float]]:
        """(phase, start, duration) of each phase that ran, in perf_counter seconds.

        For span events. queue starts at the last wait's start (the sum of waits is its
        duration); connect ends where the handshake began, or where aiohttp's create
        signal ended for plain http, and starts no earlier than the lookup's end; tls
        starts where the connector began the handshake.
        """
        out: list[tuple[str, float, float]] = []
        if self.queue > 0.0:
            out.append(("queue", self._queue_start, self.queue))
        if self.dns is not None:
            out.append(("dns", self._dns_start, self.dns))
        if self.connect is not None:
            connect_end = self._tls_start if self.tls is not None else self._connect_end
            # connect also holds the connector's own steps around the lookup, so counted
            # back from its end it could start before the lookup did: never before DNS ends.
            dns_end = self._dns_start + self.dns if self.dns is not None else 0.0
            out.append(("connect", max(connect_end - self.connect, dns_end), self.connect))
        if self.tls is not None:
            out.append(("tls", self._tls_start, self.tls))
        ttfb = self.ttfb
        if ttfb is not None and self.sent_at is not None:
            out.append(("ttfb", self.sent_at, ttfb))
        return out

    def __repr__(self) -> str:
        fields = ("queue", "dns", "connect", "tls", "ttfb", "reused", "dns_cache")
        return "<Timings " + " ".join(f"{f}={getattr(self, f)!r}" for f in fields) + ">"


_CURRENT: ContextVar[Timings | None] = ContextVar("timings", default=None)


@contextmanager
def timing(timings: Timings) -> Iterator[None]:
    """Make ``timings`` the current request's, for code that gets no trace context."""
    token = _CURRENT.set(timings)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_timings() -> Timings | None:
    return _CURRENT.get()


def _timings(ctx: SimpleNamespace) -> Timings | None:
    timings = ctx.trace_request_ctx
    return timings if isinstance(timings, Timings) else None


async def _queued_start(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t._queue_start = perf_counter()
        t.queued = t._queue_waiting = True


async def _queued_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.end_queue_wait(perf_counter())


async def _create_start(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.begin_dial(perf_counter())


async def _create_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.end_dial(perf_counter())


async def _reuseconn(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.reused = True


async def _dns_start(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.begin_lookup(perf_counter())


async def _dns_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.end_lookup(perf_counter())


async def _dns_hit(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.dns_cache = "hit"


async def _dns_miss(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.dns_cache = "miss"


async def _headers_sent(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.sent_at = perf_counter()


async def _request_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    if (t := _timings(ctx)) is not None:
        t.response_at = perf_counter()


def trace_config() -> aiohttp.TraceConfig:
    """A TraceConfig that fills the ``Timings`` passed as ``trace_request_ctx``."""
    config = aiohttp.TraceConfig()
    config.on_connection_queued_start.append(_queued_start)
    config.on_connection_queued_end.append(_queued_end)
    config.on_connection_create_start.append(_create_start)
    config.on_connection_create_end.append(_create_end)
    config.on_connection_reuseconn.append(_reuseconn)
    config.on_dns_resolvehost_start.append(_dns_start)
    config.on_dns_resolvehost_end.append(_dns_end)
    config.on_dns_cache_hit.append(_dns_hit)
    config.on_dns_cache_miss.append(_dns_miss)
    config.on_request_headers_sent.append(_headers_sent)
    config.on_request_end.append(_request_end)
    config.freeze()
    return config
