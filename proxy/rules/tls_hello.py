"""TLS hellos read off the wire without keys: records, handshake messages, ClientHello, ServerHello.

Pure code on bytes (no I/O). The interception decision reads the client's ALPN offer and SNI
from its ClientHello before any certificate is minted; the tunnel relay reads both hellos as
they pass to time the handshake. Both feed one ``HandshakeReader`` per direction.

A ClientHello may span several records, and records may be split or merged across reads
(RFC 8446 §5.1: handshake messages may be fragmented across records, and several may share
one). Nothing here trusts a length before checking it against what is there and the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# RFC 8446 §5.1 / RFC 5246 §6.2.1: type (1), legacy_record_version (2), length (2).
RECORD_HEADER: Final = 5
# RFC 8446 §5.1: a plaintext record's fragment is at most 2^14 bytes (TLSPlaintext).
MAX_PLAINTEXT: Final = 1 << 14
# RFC 8446 §5.2: a protected record may carry up to 2^14 + 256 bytes (TLS 1.2 allowed
# 2^14 + 2048, RFC 5246 §6.2.3); a walker that only skips records accepts the larger one.
MAX_RECORD: Final = (1 << 14) + 2048

CHANGE_CIPHER_SPEC: Final = 20
ALERT: Final = 21
HANDSHAKE: Final = 22
APPLICATION_DATA: Final = 23
CONTENT_TYPES: Final = frozenset({CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA})

# RFC 8446 §4: HandshakeType.
CLIENT_HELLO: Final = 1
SERVER_HELLO: Final = 2
_MESSAGE_HEADER: Final = 4  # msg_type (1), length (3)

# RFC 8446 §4.2 ExtensionType (RFC 6066 server_name, RFC 7301 ALPN).
_SERVER_NAME: Final = 0
_ALPN: Final = 16
_SUPPORTED_VERSIONS: Final = 43
_HOST_NAME: Final = 0  # RFC 6066 §3 NameType

# RFC 8446 §4.1.3: a ServerHello with this random is a HelloRetryRequest.
_RETRY_RANDOM: Final = bytes.fromhex(
    "cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c"
)

VERSION_NAMES: Final = {
    0x0300: "SSLv3",
    0x0301: "TLSv1.0",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}


def version_name(version: int) -> str:
    """``TLSv1.3`` for 0x0304; unknown codes as hex, so a log line still says what came."""
    return VERSION_NAMES.get(version, f"0x{version:04x}")


def is_grease(value: int) -> bool:
    """RFC 8701 §2: 0x0A0A, 0x1A1A, ... 0xFAFA are GREASE values, offered to be ignored."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


class HelloError(ValueError):
    """Bytes that are not the TLS the reader expected; ``reason`` is a short, fixed label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """One whole handshake message: its type and its body (the length prefix removed)."""

    type: int
    body: bytes

    def __repr__(self) -> str:
        return f"<Message type={self.type} {len(self.body)} B>"


class HandshakeReader:
    """Reassembles the handshake messages of one direction of a TLS connection.

    ``feed`` takes the bytes as they were read and returns the messages completed by them.
    Reading ends (``stopped``) at the first record that is not a plaintext handshake record
    (ChangeCipherSpec, an alert, application data): from there on a handshake record may
    be encrypted. ``rest`` then holds the bytes from that record's header on, taken from
    the read that reached it, for whoever walks the records next. Bytes that cannot be
    TLS raise ``HelloError``; so does a message over ``limit`` bytes, before it is held.
    It holds at most one partial record and one partial message.
    """

    __slots__ = ("_buffer", "_limit", "_message", "_records", "rest", "stopped")

    def __init__(self, limit: int = 1 << 16) -> None:
        self._limit = limit
        self._buffer = bytearray()  # a record not yet complete (header included)
        self._message = bytearray()  # handshake bytes not yet a whole message
        self._records = 0
        self.stopped = False
        self.rest = b""

    @property
    def records(self) -> int:
        """Handshake records read whole so far."""
        return self._records

    @property
    def pending(self) -> int:
        """Bytes held: a partial record plus a partial message."""
        return len(self._buffer) + len(self._message)

    def feed(self, data: bytes) -> list[Message]:
        if self.stopped:
            return []
        self._buffer += data
        messages: list[Message] = []
        buffer = self._buffer
        offset = 0
        while offset < len(buffer):
            if buffer[offset] != HANDSHAKE:
                if buffer[offset] not in CONTENT_TYPES:
                    raise HelloError("not_tls")
                self.stopped = True
                self.rest = bytes(buffer[offset:])
                buffer.clear()
                return messages
            if len(buffer) - offset < RECORD_HEADER:
                break
            length = _handshake_length(buffer, offset)
            end = offset + RECORD_HEADER + length
            if end > len(buffer):
                break
            self._message += buffer[offset + RECORD_HEADER : end]
            self._records += 1
            offset = end
            messages.extend(self._complete_messages())
        del buffer[:offset]
        return messages

    def _complete_messages(self) -> list[Message]:
        out: list[Message] = []
        message = self._message
        while len(message) >= _MESSAGE_HEADER:
            size = int.from_bytes(message[1:4], "big")
            if size > self._limit:
                raise HelloError("too_large")
            end = _MESSAGE_HEADER + size
            if len(message) < end:
                break
            out.append(Message(message[0], bytes(message[_MESSAGE_HEADER:end])))
            del message[:end]
        return out

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else f"pending={self.pending}"
        return f"<HandshakeReader records={self._records} {state}>"


def _handshake_length(buffer: bytearray, offset: int) -> int:
    """The length of the handshake record whose header starts at ``offset``."""
    if buffer[offset + 1] != 3:
        # RFC 8446 §5.1: legacy_record_version is 0x0301 or 0x0303; 3.x in practice.
        raise HelloError("not_tls")
    length = int.from_bytes(buffer[offset + 3 : offset + 5], "big")
    if length > MAX_PLAINTEXT or length == 0:
        # RFC 8446 §5.1: no zero-length handshake fragments, none over 2^14.
        raise HelloError("record_length")
    return length


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a client offers in the clear (RFC 8446 §4.1.2)."""

    legacy_version: int
    versions: tuple[int, ...]  # supported_versions, GREASE left out; () when absent
    sni: str | None  # the host_name, lower case; None when absent
    alpn: tuple[str, ...]  # protocol ids in the client's order; () when no ALPN extension

    @property
    def max_version(self) -> int:
        """The highest version offered: supported_versions, else legacy_version (TLS 1.2)."""
        return max(self.versions) if self.versions else self.legacy_version


@dataclass(frozen=True, slots=True)
class ServerHello:
    """What a server chose in the clear (RFC 8446 §4.1.3)."""

    legacy_version: int
    version: int  # supported_versions when present (TLS 1.3), else legacy_version
    cipher: int
    alpn: str | None  # visible here only below TLS 1.3 (RFC 7301 §3.1); 1.3 encrypts it
    retry: bool  # a HelloRetryRequest: a second ClientHello follows


class _Cursor:
    """Reads length-prefixed fields, raising ``HelloError`` instead of running off the end."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end

    @property
    def left(self) -> int:
        return self._end - self._pos

    def take(self, size: int) -> bytes:
        if size > self.left:
            raise HelloError("truncated")
        start = self._pos
        self._pos += size
        return self._data[start : self._pos]

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def rest(self) -> bytes:
        return self.take(self.left)

    def vector(self, length_size: int) -> _Cursor:
        """A cursor over the next ``<length>``-prefixed vector, which this one skips."""
        size = self.number(length_size)
        if size > self.left:
            raise HelloError("truncated")
        inner = _Cursor(self._data, self._pos, self._pos + size)
        self._pos += size
        return inner


def _extensions(cursor: _Cursor) -> dict[int, bytes]:
    """The extensions block (absent in a bare TLS 1.2 hello: RFC 5246 §7.4.1.2)."""
    if cursor.left == 0:
        return {}
    block = cursor.vector(2)
    if cursor.left:
        raise HelloError("trailing_bytes")
    found: dict[int, bytes] = {}
    while block.left:
        kind = block.number(2)
        data = block.vector(2).rest()
        if kind in found:  # RFC 8446 §4.2: at most one extension of each type
            raise HelloError("duplicate_extension")
        found[kind] = data
    return found


def parse_client_hello(body: bytes) -> ClientHello:
    """The offer in a ClientHello's body (``Message.body`` of type ``CLIENT_HELLO``)."""
    cursor = _Cursor(body)
    legacy_version = cursor.number(2)
    cursor.take(32)  # random
    if cursor.vector(1).left > 32:  # legacy_session_id<0..32>
        raise HelloError("session_id")
    if cursor.vector(2).left < 2:  # cipher_suites<2..2^16-2>
        raise HelloError("cipher_suites")
    if cursor.vector(1).left < 1:  # legacy_compression_methods<1..2^8-1>
        raise HelloError("compression_methods")
    extensions = _extensions(cursor)
    versions: tuple[int, ...] = ()
    if (data := extensions.get(_SUPPORTED_VERSIONS)) is not None:
        listed = _Cursor(data).vector(1)
        offered = [listed.number(2) for _ in range(listed.left // 2)]
        if listed.left:
            raise HelloError("supported_versions")
        versions = tuple(v for v in offered if not is_grease(v))
    return ClientHello(
        legacy_version=legacy_version,
        versions=versions,
        sni=_server_name(extensions.get(_SERVER_NAME)),
        alpn=_alpn(extensions.get(_ALPN)),
    )


def parse_server_hello(body: bytes) -> ServerHello:
    """The choice in a ServerHello's body (``Message.body`` of type ``SERVER_HELLO``)."""
    cursor = _Cursor(body)
    legacy_version = cursor.number(2)
    random = cursor.take(32)
    if cursor.vector(1).left > 32:  # legacy_session_id_echo<0..32>
        raise HelloError("session_id")
    cipher = cursor.number(2)
    cursor.take(1)  # legacy_compression_method
    extensions = _extensions(cursor)
    version = legacy_version
    if (data := extensions.get(_SUPPORTED_VERSIONS)) is not None:
        if len(data) != 2:  # RFC 8446 §4.2.1: the ServerHello names one version
            raise HelloError("supported_versions")
        version = int.from_bytes(data, "big")
    alpn = _alpn(extensions.get(_ALPN))
    if len(alpn) > 1:  # RFC 7301 §3.1: the server names exactly one protocol
        raise HelloError("alpn")
    return ServerHello(
        legacy_version=legacy_version,
        version=version,
        cipher=cipher,
        alpn=alpn[0] if alpn else None,
        retry=random == _RETRY_RANDOM,
    )


def _server_name(data: bytes | None) -> str | None:
    """RFC 6066 §3: the host_name entry, ASCII, without a trailing dot, lower case."""
    if data is None:
        return None
    names = _Cursor(data).vector(2)
    while names.left:
        kind = names.number(1)
        name = names.vector(2).rest()
        if kind == _HOST_NAME:
            if not name or not name.isascii():
                raise HelloError("server_name")
            return name.decode("ascii").rstrip(".").lower()
    return None


def _alpn(data: bytes | None) -> tuple[str, ...]:
    """RFC 7301 §3.1: a list of non-empty protocol ids; kept as text byte for byte."""
    if data is None:
        return ()
    listed = _Cursor(data).vector(2)
    protocols: list[str] = []
    while listed.left:
        protocol = listed.vector(1).rest()
        if not protocol:
            raise HelloError("alpn")
        protocols.append(protocol.decode("latin-1"))
    return tuple(protocols)
