"""An HTTP/2 origin on loopback for the tests: hypercorn serving a small ASGI app.

hypercorn speaks h2 (TLS, ALPN), h2c with prior knowledge and HTTP/1.1 on one bind. Routes:

- ``/echo``: JSON of the method, path, fields, body length and sha256, and HTTP version;
- ``/stream?size=N``: N pattern bytes;
- ``/grpc?status=S&messages=N&gap_ms=G&head_ms=H``: gRPC-shaped: head after H ms (a client
  that resets the stream meanwhile is counted in ``disconnects``), N messages G ms apart,
  then trailers ``grpc-status: S`` (sent only to a request with ``te: trailers``, as
  hypercorn does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.events
import pytest
import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hyperframe.frame import GoAwayFrame

from tests.conftest import pattern
from tests.h2_client import Fields

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class H2Origin:
    port: int
    versions: list[str] = field(default_factory=list)  # HTTP version of each request
    peers: set[int] = field(default_factory=set)  # client ports: one per connection
    disconnects: int = 0  # requests whose client went (reset the stream) while held

    @property
    def authority(self) -> str:
        return f"localhost:{self.port}"

    def url(self, path: str, scheme: str = "https") -> str:
        return f"{scheme}://{self.authority}{path}"


def _app(state: H2Origin) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        state.versions.append(scope["http_version"])
        state.peers.add(scope["client"][1])
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        digest, size = hashlib.sha256(), 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            if not message.get("more_body"):
                break
        path = scope["path"]
        if path == "/stream":
            body = pattern(int(query["size"]))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
        elif path == "/grpc":
            try:  # the head is held back, unless the client goes first
                gone = await asyncio.wait_for(receive(), int(query.get("head_ms", "0")) / 1000)
            except TimeoutError:
                pass
            else:
                if gone["type"] == "http.disconnect":
                    state.disconnects += 1
                    return
            headers = [(b"content-type", b"application/grpc")]
            await send(
                {"type": "http.response.start", "status": 200, "headers": headers, "trailers": True}
            )
            for n in range(int(query.get("messages", "1"))):
                if n:
                    await asyncio.sleep(int(query.get("gap_ms", "0")) / 1000)
                frame = b"\x00" + (5).to_bytes(4, "big") + b"hello"
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            trailers = [(b"grpc-status", query.get("status", "0").encode())]
            trailers.append((b"grpc-message", b"caf\xc3\xa9 %20 ok"))
            await send({"type": "http.response.trailers", "headers": trailers})
        else:
            answer = {
                "method": scope["method"],
                "path": scope["raw_path"].decode()
                + ("?" if scope["query_string"] else "")
                + scope["query_string"].decode(),
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "body_len": size,
                "body_sha256": digest.hexdigest(),
                "version": scope["http_version"],
            }
            body = json.dumps(answer).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    return app


@contextlib.asynccontextmanager
async def h2_origin(
    ca: trustme.CA | None,
    max_streams: int = 100,
    *,
    alpn: tuple[str, ...] = ("h2", "http/1.1"),
    port: int = 0,
) -> AsyncIterator[H2Origin]:
    """hypercorn on 127.0.0.1 (TLS with a ``localhost`` certificate from ``ca``, or plain),
    allowing ``max_streams`` concurrent streams per connection, offering ``alpn``; on
    ``port`` when given (an origin restarted where another was)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last one's may linger
    sock.bind(("127.0.0.1", port))
    state = H2Origin(sock.getsockname()[1])
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket now
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    config.h2_max_concurrent_streams = max_streams
    config.alpn_protocols = list(alpn)
    files: list[Any] = []
    if ca is not None:
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert = leaf.cert_chain_pems[0].tempfile()
        key = leaf.private_key_pem.tempfile()
        files = [cert, key]
        config.certfile = cert.__enter__()
        config.keyfile = key.__enter__()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve(_app(state), config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        for _ in range(500):  # bounded: 5 s until it accepts
            with contextlib.suppress(OSError):  # TimeoutError included
                opening = asyncio.open_connection("127.0.0.1", state.port)
                _, writer = await asyncio.wait_for(opening, 1)
                writer.close()
                break
            await asyncio.sleep(0.01)
        yield state
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        for file in files:
            file.__exit__(None, None, None)


@pytest.fixture
async def tls_h2_origin(tls_ca: trustme.CA) -> AsyncIterator[H2Origin]:
    """hypercorn over TLS (h2 by ALPN), certified for localhost by ``tls_ca``."""
    async with h2_origin(tls_ca) as origin:
        yield origin


@pytest.fixture
async def h2c_origin() -> AsyncIterator[H2Origin]:
    """hypercorn in the clear: h2c with prior knowledge (and HTTP/1.1)."""
    async with h2_origin(None) as origin:
        yield origin


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


EARLY_HINT = (b"link", b"</style.css>; rel=preload; as=style")


@dataclass
class RawH2Origin:
    port: int
    connections: int = 0  # accepted
    closed_by_client: int = 0  # ended by the client (EOF), not by the origin
    bodies: list[bytes] = field(default_factory=list)  # each request's body, as it came
    trailers: list[Fields] = field(default_factory=list)  # each request's trailers

    @property
    def authority(self) -> str:
        return f"localhost:{self.port}"


@contextlib.asynccontextmanager
async def raw_h2_origin(
    ca: trustme.CA, *, goaway: bool = False, hints: bool = False
) -> AsyncIterator[RawH2Origin]:
    """An h2 origin on h2 itself (TLS, a leaf for ``localhost``): once a request has ended
    (its body and trailers kept), its response is a head,
    ``before ``, 100 ms, ``after`` and trailers ``grpc-status: 0``; with ``hints``, a
    ``103 Early Hints`` with a ``link`` field comes first (RFC 8297).

    With ``goaway`` it shuts each connection down gracefully in the middle of its first
    response: a GOAWAY naming that stream (RFC 9113 §6.8) goes out after ``before``, and
    the connection closes once the response is done. Without, it serves until the client
    closes (counted) or 10 s pass.
    """
    state = RawH2Origin(0)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    context.set_alpn_protocols(["h2"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        connection = h2.connection.H2Connection(config)
        connection.initiate_connection()
        writer.write(connection.data_to_send())
        bodies: dict[int, bytes] = {}
        trailers: dict[int, Fields] = {}
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), 10)
                if not data:
                    state.closed_by_client += 1
                    return
                for event in connection.receive_data(data):
                    sid = getattr(event, "stream_id", 0)
                    if isinstance(event, h2.events.RequestReceived):
                        bodies[sid], trailers[sid] = b"", []
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[sid] += event.data
                        connection.acknowledge_received_data(event.flow_controlled_length, sid)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers[sid] = list(event.headers)
                    if isinstance(event, h2.events.StreamEnded):
                        state.bodies.append(bodies.pop(sid))
                        state.trailers.append(trailers.pop(sid))
                        if hints:
                            connection.send_headers(sid, [(b":status", b"103"), EARLY_HINT])
                        connection.send_headers(sid, [(b":status", b"200")])
                        connection.send_data(sid, b"before ")
                        writer.write(connection.data_to_send())
                        if goaway:
                            # By hand: h2's close_connection would end its state machine.
                            writer.write(GoAwayFrame(0, last_stream_id=sid).serialize())
                        await asyncio.sleep(0.1)
                        connection.send_data(sid, b"after")
                        connection.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                        writer.write(connection.data_to_send())
                        await writer.drain()
                        if goaway:
                            return
                writer.write(connection.data_to_send())
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
