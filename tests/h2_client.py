"""A small HTTP/2 client for the tests, on h2: through a CONNECT, h2c or TLS (ALPN h2).

Real clients (curl, httpx, grpcio) cover the usual paths; this one shows what they hide:
trailers byte for byte, several streams on one connection, and frames written by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
from hyperframe.frame import HeadersFrame

Fields = list[tuple[bytes, bytes]]


@dataclass
class Answer:
    status: int = 0
    headers: Fields = field(default_factory=list)
    body: bytes = b""
    trailers: Fields = field(default_factory=list)
    interim: list[Fields] = field(default_factory=list)  # 1xx heads, :status first
    reset: int | None = None  # RST_STREAM error code, when the stream was reset

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class H2TestClient:
    """One HTTP/2 connection through the proxy; every wait is bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.answers: dict[int, Answer] = {}
        self.ended: set[int] = set()
        self.goaways: list[tuple[int, int]] = []  # (last_stream_id, error code) of each GOAWAY
        self.closed = False
        self._partial = b""  # the start of a frame not yet whole
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def start(self, headers: Fields, body: bytes = b"", *, end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=end and not body)
        self.answers[sid] = Answer()
        if body:
            self.h2.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    async def pump(self) -> None:
        """Read once (at most 10 s) and apply what came."""
        data = await asyncio.wait_for(self.reader.read(65536), 10)
        if not data:
            self.closed = True
            return
        for event in self.h2.receive_data(self._without_goaway(data)):
            sid = getattr(event, "stream_id", None)
            answer = self.answers.get(sid) if sid is not None else None
            if isinstance(event, h2.events.ResponseReceived) and answer is not None:
                for name, value in event.headers:
                    if name == b":status":
                        answer.status = int(value)
                    else:
                        answer.headers.append((name, value))
            elif isinstance(event, h2.events.InformationalResponseReceived) and answer:
                answer.interim.append(list(event.headers))
            elif isinstance(event, h2.events.DataReceived) and answer is not None:
                answer.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
                answer.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset) and answer is not None:
                answer.reset = event.error_code
                self.ended.add(event.stream_id)
        self.flush()

    def _without_goaway(self, data: bytes) -> bytes:
        """The whole frames in what came, GOAWAYs kept aside: h2 ends its state machine on a
        GOAWAY, after which it could not read the streams the proxy still finishes."""
        buffer = self._partial + data
        frames: list[bytes] = []
        at = 0
        while len(buffer) - at >= 9:
            end = at + 9 + int.from_bytes(buffer[at : at + 3], "big")
            if end > len(buffer):
                break
            if buffer[at + 3] == 7:  # GOAWAY (RFC 9113 §6.8)
                payload = buffer[at + 9 : end]
                last = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
                self.goaways.append((last, int.from_bytes(payload[4:8], "big")))
            else:
                frames.append(buffer[at:end])
            at = end
        self._partial = buffer[at:]
        return b"".join(frames)

    async def wait(self, sid: int) -> Answer:
        """The answer on ``sid`` once the stream has ended (at most 10 s)."""
        async with asyncio.timeout(10):
            while sid not in self.ended:
                if self.closed:
                    raise ConnectionError("closed before the stream ended")
                await self.pump()
        return self.answers[sid]

    async def fetch(self, headers: Fields, body: bytes = b"") -> Answer:
        return await self.wait(self.start(headers, body))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


async def connect(
    proxy_port: int, authority: str, context: ssl.SSLContext | None = None
) -> H2TestClient:
    """CONNECT ``authority`` through the proxy, then h2c, or TLS with ALPN h2 when given a
    context (its server name is the authority's host)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy_port), 5)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    if context is not None:
        context.set_alpn_protocols(["h2"])
        host = authority.rsplit(":", 1)[0]
        await asyncio.wait_for(writer.start_tls(context, server_hostname=host), 5)
    return H2TestClient(reader, writer)


@contextlib.asynccontextmanager
async def connected(
    proxy_port: int, authority: str, context: ssl.SSLContext | None = None
) -> AsyncIterator[H2TestClient]:
    """``connect``, closed on the way out."""
    client = await connect(proxy_port, authority, context)
    try:
        yield client
    finally:
        await client.close()


def get(authority: str, path: str, scheme: str = "https", *extra: tuple[bytes, bytes]) -> Fields:
    return [
        (b":method", b"GET"),
        (b":scheme", scheme.encode()),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        *extra,
    ]


# A header block for GET / that decodes the same whatever the HPACK state: static table
# indexes 2, 4 and 7 (:method GET, :path /, :scheme https; RFC 7541 §6.1, Appendix A), then
# :authority "x" as a literal with indexing (§6.2.1).
GET_BLOCK = b"\x82\x84\x87\x41\x01x"


def headers_frame(stream_id: int, block: bytes = GET_BLOCK, *, end_stream: bool = True) -> bytes:
    """A HEADERS frame written by hand: the whole ``block`` (END_HEADERS), and END_STREAM
    unless a body follows."""
    frame = HeadersFrame(stream_id, data=block)
    frame.flags.add("END_HEADERS")
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame.serialize()
