"""The byte relay inside a CONNECT tunnel: two transports, flow control, half-close, resets.

A side whose transport cannot half-close (TLS) is closed when the other side sends EOF.

It works at the asyncio protocol level. Bytes read from one side are written straight into
the other side's transport; when a transport's write buffer passes its high-water mark,
asyncio's flow-control callbacks pause reading on the other side until the buffer drains.
A tunnel therefore holds at most the two transports' buffers, however slow either side is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import Final, Literal, cast

Side = Literal["client", "upstream"]
_OTHER: Final[dict[Side, Side]] = {"client": "upstream", "upstream": "client"}

# Reads each read as it is relayed (side, bytes, perf_counter time) and says whether it wants
# more (``proxy.rules.tls_timing.TunnelTls``). It only looks: the relay passes every byte on
# as it would without it, and it never raises (tests/test_tls_timing.py's properties).
Tap = Callable[[Side, bytes, float], bool]


class Relay:
    """Copies bytes both ways until both sides have finished, one side resets, or it is closed.

    ``closed_by`` names who ended first: a side ("client", "upstream") or the proxy
    ("idle_timeout", "shutdown", "error"). ``outcome`` says how the relay ended: "closed",
    "reset", "idle_timeout", "shutdown" or "error". ``done`` resolves when it has ended.
    """

    def __init__(self, idle_timeout: float, tap: Tap | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.tap = tap
        self._idle_timeout = idle_timeout
        self._transports: dict[Side, asyncio.Transport] = {}
        self._held: list[bytes] = []  # what the upstream sent before the client was attached
        self._eof: set[Side] = set()
        self.received: dict[Side, int] = {"client": 0, "upstream": 0}
        self.closed_by: str | None = None
        self.outcome: str | None = None
        self.error: BaseException | None = None
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._last_active = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    def upstream_protocol(self) -> UpstreamProtocol:
        """A protocol factory for ``loop.create_connection``."""
        return UpstreamProtocol(self)

    def attach_upstream(self, transport: asyncio.Transport) -> None:
        self._transports["upstream"] = transport

    def start(self, client: asyncio.Transport) -> None:
        """The client is ready for tunnel bytes: release what the upstream sent meanwhile."""
        self._transports["client"] = client
        if self.done.done():  # the upstream reset while the 200 was being sent
            client.abort()
            return
        for chunk in self._held:
            client.write(chunk)
        self._held.clear()
        if "upstream" in self._eof:
            self._pass_eof("client")
        self._set_reading("upstream", True)
        self._idle_timer = self._loop.call_later(self._idle_timeout, self._check_idle)

    def feed(self, side: Side, data: bytes) -> None:
        """Bytes read from ``side``: on to the other side."""
        if self.done.done():
            return
        self.received[side] += len(data)
        self._last_active = self._loop.time()
        if self.tap is not None and not self.tap(side, data, perf_counter()):
            self.tap = None  # it has all it wanted: later reads cost it nothing
        peer = self._transports.get(_OTHER[side])
        if peer is not None:
            peer.write(data)
            return
        # Only the upstream can speak before the 200 is out: keep one read, stop reading.
        self._held.append(data)
        self._transports[side].pause_reading()

    def eof(self, side: Side) -> None:
        """``side`` sends nothing more (a half-close): pass it on; both done ends the relay."""
        if self.done.done() or side in self._eof:
            return
        self._eof.add(side)
        self._first_to_close(side)
        self._last_active = self._loop.time()
        if _OTHER[side] in self._transports:
            self._pass_eof(_OTHER[side])
        if len(self._eof) == 2 and not self.done.done():
            self._end("closed", abort=False)

    def lost(self, side: Side, exc: BaseException | None) -> None:
        """``side``'s connection is gone; a reset mid-stream becomes a prompt close of the other."""
        if self.done.done():
            return
        self._first_to_close(side)
        if exc is not None and not self._eof:
            self.error = exc
            self._end("reset", abort=True)
        else:
            # Once one side has closed, a reset is how a peer that has gone answers bytes
            # still in flight (a TLS close_notify, say): an ordinary end of the tunnel.
            self._end("closed", abort=False)

    def close(
        self,
        reason: Literal["idle_timeout", "shutdown", "error"],
        exc: BaseException | None = None,
    ) -> None:
        """End the relay from the proxy's side (``exc``: what went wrong, for "error")."""
        if self.done.done():
            return
        self._first_to_close(reason)
        self.error = exc
        # Shutdown lets buffered bytes go out; a tunnel idle that long, or broken, need not.
        self._end(reason, abort=reason != "shutdown")

    def writing_paused(self, side: Side) -> None:
        """``side``'s write buffer is full: stop reading from the other side."""
        self._set_reading(_OTHER[side], False)

    def writing_resumed(self, side: Side) -> None:
        self._set_reading(_OTHER[side], True)

    def _set_reading(self, side: Side, on: bool) -> None:
        transport = self._transports.get(side)
        # After its EOF a side has nothing to read; resuming it would report the EOF again.
        if transport is None or side in self._eof or self.done.done():
            return
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _pass_eof(self, to: Side) -> None:
        transport = self._transports[to]
        if not transport.can_write_eof():
            # TLS (an intercepted client, a wss upstream) has no half-close in asyncio or
            # uvloop: write_eof raises. Close that side once its buffer is out instead.
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError as exc:  # asyncio lets shutdown()'s error out when the peer is gone
            self.lost(to, exc)

    def _check_idle(self) -> None:
        remaining = self._last_active + self._idle_timeout - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._check_idle)
        else:
            self.close("idle_timeout")

    def _first_to_close(self, who: str) -> None:
        if self.closed_by is None:
            self.closed_by = who

    def _end(self, outcome: str, *, abort: bool) -> None:
        self.outcome = outcome
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for transport in self._transports.values():
            if abort:
                transport.abort()
            else:
                transport.close()
        self.done.set_result(None)

    def __repr__(self) -> str:
        return (
            f"<Relay sent={self.received['client']} received={self.received['upstream']} "
            f"eof={sorted(self._eof)} outcome={self.outcome} closed_by={self.closed_by}>"
        )


class UpstreamProtocol(asyncio.Protocol):
    """The upstream connection: every event goes to the relay.

    For a connection taken over from aiohttp's client (a WebSocket after its 101),
    ``previous`` is that client's protocol: it still hears of the lost connection, so the
    connector's bookkeeping ends as usual, and ``feed_data`` makes this a payload sink for
    its ``set_parser``, which hands over the bytes that came right behind the 101.
    """

    def __init__(self, relay: Relay, previous: asyncio.BaseProtocol | None = None) -> None:
        self._relay = relay
        self._previous = previous

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._relay.attach_upstream(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._relay.feed("upstream", data)

    def eof_received(self) -> bool:
        self._relay.eof("upstream")
        return True  # keep sending to the upstream after its half-close

    def pause_writing(self) -> None:
        self._relay.writing_paused("upstream")

    def resume_writing(self) -> None:
        self._relay.writing_resumed("upstream")

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.lost("upstream", exc)
        if self._previous is not None:
            self._previous.connection_lost(exc)

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._relay.feed("upstream", data)
        return False, b""  # (no protocol error, no unparsed tail)


class ClientProtocol(asyncio.Protocol):
    """Takes the client connection over from the HTTP server's protocol once the 200 is out.

    aiohttp's protocol closes the whole connection when the client half-closes; this one
    passes the half-close on instead. It still reports the lost connection to the server
    protocol, so the server's own bookkeeping ends as usual. ``feed_data``/``feed_eof``
    make it a payload sink for aiohttp's ``RequestHandler.set_parser``, which hands over
    the bytes the client sent right behind the CONNECT header.
    """

    def __init__(self, relay: Relay, server_protocol: asyncio.BaseProtocol) -> None:
        self._relay = relay
        self._server_protocol = server_protocol

    def data_received(self, data: bytes) -> None:
        self._relay.feed("client", data)

    def eof_received(self) -> bool:
        self._relay.eof("client")
        return True  # keep sending to the client after its half-close

    def pause_writing(self) -> None:
        self._relay.writing_paused("client")

    def resume_writing(self) -> None:
        self._relay.writing_resumed("client")

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.lost("client", exc)
        self._server_protocol.connection_lost(exc)

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._relay.feed("client", data)
        return False, b""  # (not at EOF, no unparsed tail)

    def feed_eof(self) -> None:
        """Called by the server protocol's connection_lost, which reached the relay first."""
