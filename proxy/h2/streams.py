"""The asyncio side shared by both ends: one HTTP/2 connection on a transport, and its bodies.

``H2Connection`` feeds what it reads to the core (``proxy.h2.core``), hands the events to its
subclass (``proxy.h2.server`` towards a client, ``proxy.h2.upstream`` towards an origin) and
writes what the core queues. Back-pressure runs both ways:

- receiving: a stream's body goes into a ``BodyReader``; its bytes are acknowledged to the
  peer only as they are read out of it, that is once they were passed on, so what one
  stream buffers is bounded by its receive window (``Limits.stream_window``);
- sending: ``send_body`` waits for the peer's window and for the transport to drain; while
  the transport is paused for writing, nothing more is read (a peer that does not read our
  answers cannot make us queue more of them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, cast

from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader

from proxy.h2 import core
from proxy.h2.core import H2Core, StreamGone


class _WindowGoverned(BaseProtocol):
    """A ``StreamReader``'s protocol that never pauses the connection: windows bound the body.

    ``StreamReader`` refuses to wait for data once its protocol is not ``connected``.
    """

    def __init__(self, connection: H2Connection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._connection = connection

    @property
    def connected(self) -> bool:
        return self._connection.transport is not None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


class BodyReader(StreamReader):
    """A stream's body as aiohttp reads bodies; every read acknowledges the bytes it took.

    ``_read_nowait_chunk`` is the one step every read method of ``StreamReader`` ends in
    (private: docs/aiohttp-internals.md; tests/test_h2_streams.py holds it to that).
    """

    __slots__ = ("_ack",)

    def __init__(
        self,
        ack: Callable[[int], None],
        limit: int,
        protocol: BaseProtocol,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(protocol, limit, loop=loop)
        self._ack = ack

    def _read_nowait_chunk(self, n: int) -> bytes:
        data = super()._read_nowait_chunk(n)
        self._ack(len(data))
        return data


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection; subclasses act on its events (``on_event``)."""

    def __init__(self, h2core: H2Core) -> None:
        self.core = h2core
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._windows: dict[int, asyncio.Future[None]] = {}  # stream -> waiting to send
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._readers = _WindowGoverned(self, self._loop)

    # -- transport events --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not a check: uvloop's transports are no asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.core.start()
        self.flush()

    def data_received(self, data: bytes) -> None:
        h2core = self.core
        for event in h2core.receive(data):
            if isinstance(event, core.Window):
                self._wake(event.stream_id)
            self.on_event(event)
        self.flush()
        if h2core.error is not None:
            self.on_error(h2core.error)
            self.close()

    def eof_received(self) -> bool | None:
        return False  # the peer is done: close our side too

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()  # read no more while our answers pile up

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        gone = StreamGone("the HTTP/2 connection closed")
        for waiter in self._windows.values():
            if not waiter.done():
                waiter.set_exception(gone)
        self._windows.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(gone)
        self.on_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    # -- for subclasses ----------------------------------------------------------------

    def on_event(self, event: core.Event) -> None:
        raise NotImplementedError

    def on_error(self, reason: str) -> None:
        """The core ended the connection for ``reason`` (its GOAWAY is being flushed)."""

    def on_lost(self, exc: Exception | None) -> None:
        """The transport is gone: fail what is still open."""

    # -- sending -----------------------------------------------------------------------

    def flush(self) -> None:
        data = self.core.outbound()
        if data and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        """Flush and close (aborts nothing: a GOAWAY queued last still leaves)."""
        self.flush()
        if self.transport is not None:
            self.transport.close()

    async def send_body(
        self, stream_id: int, data: bytes | bytearray | memoryview, end: bool
    ) -> None:
        """Send ``data`` on ``stream_id`` as the peer's windows open; wait while the
        transport drains. Raises ``StreamGone`` when the stream or connection ends first."""
        view = memoryview(data)
        h2core = self.core
        while True:
            if self.transport is None:
                raise StreamGone("the HTTP/2 connection closed")
            sent = h2core.send_body(stream_id, view, end=end)
            self.flush()
            view = view[sent:]
            if not view:
                break
            await self._window(stream_id)
        if self._write_paused:
            await self.drain()

    async def drain(self) -> None:
        if not self._write_paused:
            return
        if self._drained is None:
            self._drained = self._loop.create_future()
        await asyncio.shield(self._drained)

    async def _window(self, stream_id: int) -> None:
        waiter = self._windows.get(stream_id)
        if waiter is None:
            waiter = self._windows[stream_id] = self._loop.create_future()
        try:
            await waiter
        finally:
            if self._windows.get(stream_id) is waiter:
                del self._windows[stream_id]

    def _wake(self, stream_id: int) -> None:
        if stream_id == 0:
            waiters = list(self._windows.values())
            self._windows.clear()
        else:
            waiter = self._windows.pop(stream_id, None)
            waiters = [waiter] if waiter is not None else []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def stream_gone(self, stream_id: int) -> None:
        """A stream was reset: whoever waits to send on it learns at once."""
        waiter = self._windows.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(StreamGone(f"stream {stream_id} was reset"))

    def body_reader(self, stream_id: int, limit: int) -> BodyReader:
        h2core = self.core

        def ack(size: int) -> None:
            h2core.ack(stream_id, size)
            self.flush()

        return BodyReader(ack, limit, self._readers, self._loop)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.core!r}>"


# Reader buffer limit: the windows bound what arrives; this only sizes aiohttp's bookkeeping.
READER_LIMIT: Final = 2**16
