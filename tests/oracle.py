"""Shared pieces of the property tests: h11 as a strict reference parser, a proxy and origins
on an event loop of their own (so hypothesis drives them from plain synchronous tests), and
the documented differences from h11.

One proxy and one set of origins serve a whole test module: an example costs one or two
loopback round trips, not a server start.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import h11
from prometheus_client import CollectorRegistry

from proxy import config
from proxy.observe import log
from proxy.server import ProxyServer
from tests.conftest import TEST_SETTINGS

T = TypeVar("T")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Loop:
    """An event loop in a daemon thread; ``run`` waits for a coroutine from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __repr__(self) -> str:
        return f"<Loop running={self.loop.is_running()}>"


class Stack:
    """One proxy plus any number of TCP origins, all on a ``Loop``."""

    def __init__(self, **settings: Any) -> None:
        self._settings = settings
        self._loop = Loop()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.logs = io.StringIO()
        self.registry = CollectorRegistry()
        self.proxy: ProxyServer | None = None

    def __enter__(self) -> Stack:
        log.configure("json", "info", stream=self.logs)
        self.proxy = self._loop.run(self._start_proxy())
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.run(self._stop())
        self._loop.close()

    async def _start_proxy(self) -> ProxyServer:
        server = ProxyServer(config.replace(TEST_SETTINGS, **self._settings), self.registry)
        await server.start()
        return server

    async def _stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers:
            server.close()
        if self.proxy is not None:
            await self.proxy.close()

    def origin(self, handler: Handler, port: int = 0) -> int:
        """Start a TCP origin running ``handler`` per connection; return its port."""

        async def start() -> int:
            async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                task = asyncio.current_task()
                assert task is not None
                self._tasks.add(task)
                try:
                    await handler(reader, writer)
                except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                    pass  # a peer gone, or the stack closing: nothing left to check
                finally:
                    writer.close()
                    self._tasks.discard(task)

            server = await asyncio.start_server(handle, "127.0.0.1", port)
            self._servers.append(server)
            bound: int = server.sockets[0].getsockname()[1]
            return bound

        return self._loop.run(start())

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the stack's loop (asyncio objects there are not thread-safe)."""
        self._loop.loop.call_soon_threadsafe(fn)

    @property
    def port(self) -> int:
        assert self.proxy is not None
        assert self.proxy.proxy_address is not None
        return self.proxy.proxy_address.port

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def __repr__(self) -> str:
        return f"<Stack proxy_port={self.port} origins={len(self._servers)}>"


# -- h11 as the client: what a strict parser reads from the proxy ---------------------------


@dataclass
class Received:
    """One response as h11 (client role) read it from the proxy."""

    status: int
    reason: bytes
    fields: list[tuple[bytes, bytes]]
    body: bytes

    def field(self, name: bytes) -> list[bytes]:
        """The values of field ``name``, in any case (RFC 9110 §5.1); ``fields`` keep theirs."""
        return [value for key, value in self.fields if key.lower() == name.lower()]


@dataclass
class ClientView:
    """Every response read on one client connection, and whether the proxy then closed it."""

    responses: list[Received] = field(default_factory=list)
    closed: bool = False


class ResponseReading:
    """h11's events on a client ``conn`` up to one whole response (1xx skipped), taken a step
    at a time, so one reading serves a blocking socket and an asyncio stream alike."""

    def __init__(self, conn: h11.Connection) -> None:
        self._conn = conn
        self._body = bytearray()
        self.response: Received | None = None  # once whole; None when the peer closed first

    def step(self) -> bool:
        """Take events until h11 needs bytes (False: feed ``conn`` and step again) or the
        response is settled (True)."""
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.ConnectionClosed):
                self.response = None
                return True
            if isinstance(event, h11.Response):
                fields = list(event.headers.raw_items())
                self.response = Received(event.status_code, bytes(event.reason), fields, b"")
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self.response is not None
                self.response.body = bytes(self._body)
                return True
            elif not isinstance(event, h11.InformationalResponse):
                raise AssertionError(f"h11 gave {event!r} before the response ended")


def _one_response(conn: h11.Connection, more: Callable[[], bytes]) -> Received | None:
    """One whole response (``ResponseReading``); ``more`` gives the next bytes whenever h11
    needs them."""
    reading = ResponseReading(conn)
    while not reading.step():
        conn.receive_data(more())
    return reading.response


def _asked(conn: h11.Connection, method: bytes) -> None:
    # h11 must know the request (HEAD has no body); the bytes it would send are ignored.
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())


def read_responses(sock: socket.socket, methods: list[bytes]) -> ClientView:
    """Read one response per request method sent, with h11 as the client.

    h11 raising here means the proxy sent something a strict client cannot parse; that is
    a failure of the property under test, so it propagates.
    """

    def more() -> bytes:
        try:
            return sock.recv(65536)
        except ConnectionResetError:
            return b""

    conn = h11.Connection(h11.CLIENT)
    view = ClientView()
    for method in methods:
        _asked(conn, method)
        response = _one_response(conn, more)
        if response is None:
            view.closed = True
            return view
        view.responses.append(response)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            view.closed = True
            return view
        conn.start_next_cycle()
    return view


# -- h11 as the server: what a strict origin reads from the proxy ---------------------------


@dataclass(frozen=True)
class Parsed:
    """One request as h11 (server role) read it."""

    method: bytes
    target: bytes
    fields: tuple[tuple[bytes, bytes], ...]
    body: bytes
    trailers: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class Rejected:
    """h11 refused the bytes; ``why`` is its message (which rule broke)."""

    why: str


def parse_request(raw: bytes) -> Parsed | Rejected:
    """h11's verdict on one complete request (what the client sent, before the proxy)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    conn.receive_data(b"")  # nothing follows: a body short of its framing is incomplete
    request: h11.Request | None = None
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return Parsed(
                    bytes(request.method),
                    bytes(request.target),
                    tuple(request.headers.raw_items()),
                    bytes(body),
                    tuple(event.headers.raw_items()),
                )
            else:
                return Rejected(f"incomplete: {event!r}")
    except h11.RemoteProtocolError as exc:
        return Rejected(str(exc))


class RecordingOrigin:
    """An origin that parses every request with h11 and answers ``answer(parsed)``.

    Each connection may carry many requests (the proxy pools); an h11 error is recorded
    and ends that connection.
    """

    def __init__(self, answer: Callable[[Parsed], tuple[int, bytes]]) -> None:
        self.answer = answer
        self.seen: list[Parsed | Rejected] = []
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.seen.append(Rejected(str(exc)))
                return
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.ConnectionClosed):
                return
            elif isinstance(event, h11.Request):
                request, body = event, bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                parsed = Parsed(
                    bytes(request.method),
                    bytes(request.target),
                    tuple(request.headers.raw_items()),
                    bytes(body),
                    tuple(event.headers.raw_items()),
                )
                self.seen.append(parsed)
                status, content = self.answer(parsed)
                out = conn.send(
                    h11.Response(
                        status_code=status, headers=[("Content-Length", str(len(content)))]
                    )
                )
                if parsed.method != b"HEAD":
                    out = (out or b"") + (conn.send(h11.Data(data=content)) or b"")
                out += conn.send(h11.EndOfMessage()) or b""
                writer.write(out)
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()

    def __repr__(self) -> str:
        return f"<RecordingOrigin seen={len(self.seen)} connections={self.connections}>"


# -- what the proxy adds and removes (RFC 9110 §7.6.1, §7.6.3; README "Trace context") ---------

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Framing and routing the proxy owns, and the fields it stamps on every message.
PROXY_OWNED = frozenset(
    {b"host", b"content-length", b"expect", b"via", b"x-request-id", b"traceparent"}
)


Fields = tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]]


def end_to_end(fields: Fields, also: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """Fields a proxy passes on as they are: lower-cased names, values without outer OWS.

    ``also`` names more fields the caller knows the proxy may drop.
    """
    named = {
        part.strip().lower()
        for name, value in fields
        if name.lower() == b"connection"
        for part in value.split(b",")
    }
    drop = HOP_BY_HOP | PROXY_OWNED | named | also
    return [
        (name.lower(), value.strip(b" \t")) for name, value in fields if name.lower() not in drop
    ]


# RFC 9110 §5.1, §5.5 and §5.6.2, held strictly: h11 itself lets some control characters
# through in values, so what the proxy emits is checked against the grammar as well.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def strictly_valid_fields(fields: list[tuple[bytes, bytes]]) -> bool:
    return all(
        _TOKEN.fullmatch(name) is not None and _VALUE.fullmatch(value) is not None
        for name, value in fields
    )


@contextlib.contextmanager
def closing_socket(sock: socket.socket) -> Iterator[socket.socket]:
    try:
        yield sock
    finally:
        sock.close()


def parse_response(raw: bytes, method: bytes) -> Received | Rejected:
    """h11's verdict on one response to ``method`` that ends where ``raw`` ends (then EOF)."""

    def more() -> bytes:
        raise AssertionError("h11 asked for bytes after the end of the stream")

    conn = h11.Connection(h11.CLIENT)
    _asked(conn, method)
    conn.receive_data(raw)
    conn.receive_data(b"")
    try:
        response = _one_response(conn, more)
    except h11.RemoteProtocolError as exc:
        return Rejected(str(exc))
    return response if response is not None else Rejected("incomplete: closed before a response")
