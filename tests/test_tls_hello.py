"""TLS hellos read off the wire: real hellos from Python's ssl, re-cut, and broken on purpose."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trustme

from proxy.rules.tls_hello import (
    ALERT,
    APPLICATION_DATA,
    CHANGE_CIPHER_SPEC,
    CLIENT_HELLO,
    HANDSHAKE,
    SERVER_HELLO,
    HandshakeReader,
    HelloError,
    Message,
    is_grease,
    parse_client_hello,
    parse_server_hello,
    version_name,
)
from tests.tls import MemoryPeers


@dataclass
class Flight:
    """The first bytes each side of a real handshake writes, taken from memory BIOs."""

    client_hello: bytes  # the client's first flight: its ClientHello records
    server_flight: bytes  # the server's answer to it


def handshake_bytes(
    ca: trustme.CA,
    *,
    sni: str | None = "api.test",
    client_alpn: list[str] | None = None,
    server_alpn: list[str] | None = None,
    maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> Flight:
    """The ClientHello and the server's answer to it, from a real handshake over memory BIOs."""
    peers = MemoryPeers(
        ca, sni=sni, client_alpn=client_alpn, server_alpn=server_alpn, maximum=maximum
    )
    (_, hello), (_, answer), *_ = peers.handshake()
    return Flight(hello, answer)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def read_all(reader: HandshakeReader, data: bytes, step: int) -> list[Message]:
    messages: list[Message] = []
    for at in range(0, len(data), step):
        messages += reader.feed(data[at : at + step])
    return messages


def recut(data: bytes, fragment: int) -> bytes:
    """The same handshake messages in records of at most ``fragment`` bytes (RFC 8446 §5.1)."""
    payload = bytearray()
    at = 0
    while at < len(data):
        length = int.from_bytes(data[at + 3 : at + 5], "big")
        payload += data[at + 5 : at + 5 + length]
        at += 5 + length
    out = bytearray()
    for start in range(0, len(payload), fragment):
        piece = payload[start : start + fragment]
        out += bytes([HANDSHAKE, 3, 1]) + len(piece).to_bytes(2, "big") + piece
    return bytes(out)


@pytest.mark.parametrize("step", [1, 3, 7, 100, 1 << 16])
@pytest.mark.parametrize("fragment", [1, 50, 1 << 14])
def test_client_hello_is_read_however_it_is_cut(ca: trustme.CA, step: int, fragment: int) -> None:
    """A ClientHello split over records and reads gives the same one message."""
    flight = handshake_bytes(ca, client_alpn=["h2", "http/1.1"])
    reader = HandshakeReader()
    messages = read_all(reader, recut(flight.client_hello, fragment), step)
    assert [m.type for m in messages] == [CLIENT_HELLO]
    hello = parse_client_hello(messages[0].body)
    assert (hello.sni, hello.alpn) == ("api.test", ("h2", "http/1.1"))
    assert reader.pending == 0
    assert not reader.stopped


@pytest.mark.parametrize(
    ("kwargs", "sni", "alpn", "max_version"),
    [
        ({"client_alpn": ["h2"]}, "api.test", ("h2",), "TLSv1.3"),
        ({"client_alpn": None}, "api.test", (), "TLSv1.3"),
        ({"sni": None}, None, (), "TLSv1.3"),
        ({"maximum": ssl.TLSVersion.TLSv1_2}, "api.test", (), "TLSv1.2"),
    ],
)
def test_client_hello_fields(
    ca: trustme.CA,
    kwargs: dict[str, object],
    sni: str | None,
    alpn: tuple[str, ...],
    max_version: str,
) -> None:
    """SNI, the ALPN offer and the highest version are what the client was set up to send."""
    flight = handshake_bytes(ca, **kwargs)  # type: ignore[arg-type]
    (message,) = HandshakeReader().feed(flight.client_hello)
    hello = parse_client_hello(message.body)
    assert (hello.sni, hello.alpn, version_name(hello.max_version)) == (sni, alpn, max_version)


@pytest.mark.parametrize(
    ("maximum", "server_alpn", "version", "alpn", "stop"),
    [
        # TLS 1.3: ServerHello, then ChangeCipherSpec; ALPN is in the encrypted extensions.
        (ssl.TLSVersion.TLSv1_3, ["h2"], "TLSv1.3", None, CHANGE_CIPHER_SPEC),
        # TLS 1.2: the whole flight is plaintext handshake, ALPN in the ServerHello.
        (ssl.TLSVersion.TLSv1_2, ["h2"], "TLSv1.2", "h2", None),
        (ssl.TLSVersion.TLSv1_2, None, "TLSv1.2", None, None),
    ],
)
def test_server_hello_fields(
    ca: trustme.CA,
    maximum: ssl.TLSVersion,
    server_alpn: list[str] | None,
    version: str,
    alpn: str | None,
    stop: int | None,
) -> None:
    """The chosen version comes from supported_versions in 1.3; ALPN shows only below 1.3."""
    flight = handshake_bytes(
        ca, client_alpn=["h2", "http/1.1"], server_alpn=server_alpn, maximum=maximum
    )
    reader = HandshakeReader()
    messages = read_all(reader, flight.server_flight, 5)
    assert messages[0].type == SERVER_HELLO
    hello = parse_server_hello(messages[0].body)
    assert (version_name(hello.version), hello.alpn, hello.retry) == (version, alpn, False)
    assert hello.legacy_version == 0x0303  # RFC 8446 §4.1.3: 1.3 hides behind 1.2 here
    if stop is None:
        assert not reader.stopped
        assert len(messages) >= 3  # ServerHello .. ServerHelloDone
    else:
        assert reader.rest[0] == stop
        after_hello = 5 + int.from_bytes(flight.server_flight[3:5], "big")
        assert flight.server_flight[after_hello : after_hello + len(reader.rest)] == reader.rest


@pytest.mark.parametrize("content_type", [CHANGE_CIPHER_SPEC, ALERT, APPLICATION_DATA])
def test_reading_stops_at_the_first_record_that_is_not_handshake(content_type: int) -> None:
    """What follows the stop is handed back whole, from its record header on."""
    message = bytes([CLIENT_HELLO]) + (3).to_bytes(3, "big") + b"abc"
    record = bytes([HANDSHAKE, 3, 3, 0, len(message)]) + message
    other = bytes([content_type, 3, 3, 0, 2]) + b"zz"
    reader = HandshakeReader()
    assert reader.feed(record + other[:3]) == [Message(CLIENT_HELLO, b"abc")]
    assert reader.stopped
    assert reader.rest == other[:3]
    assert reader.feed(other[3:]) == []  # a stopped reader takes nothing more


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", "not_tls"),
        (b"GET / HTTP/1.1\r\n", "not_tls"),
        (bytes([HANDSHAKE, 2, 0, 0, 4]), "not_tls"),  # SSL 2 record version
        (bytes([HANDSHAKE, 3, 1, 0, 0]), "record_length"),  # empty handshake fragment
        (bytes([HANDSHAKE, 3, 1, 0x40, 0x01]), "record_length"),  # 2^14 + 1
        (bytes([HANDSHAKE, 3, 1, 0, 4, CLIENT_HELLO, 0x01, 0, 1]), "too_large"),  # 65,537 B
        (bytes([0x80, 0x2E, 0x01, 0x03, 0x01]), "not_tls"),  # an SSL 2 ClientHello
    ],
)
def test_bytes_that_are_not_a_tls_hello_raise(data: bytes, reason: str) -> None:
    """Non-TLS openings and impossible lengths fail at once, before anything is held."""
    with pytest.raises(HelloError) as caught:
        HandshakeReader().feed(data)
    assert caught.value.reason == reason


def _client_hello(extensions: bytes, *, session_id: bytes = b"") -> bytes:
    body = (
        b"\x03\x03"
        + bytes(32)
        + bytes([len(session_id)])
        + session_id
        + b"\x00\x02\x13\x01"  # one cipher suite
        + b"\x01\x00"  # null compression
    )
    return body + len(extensions).to_bytes(2, "big") + extensions


def _extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


_ALPN_H2 = _extension(16, b"\x00\x03\x02h2")
_BROKEN: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated_random": (lambda: b"\x03\x03" + bytes(10), "truncated"),
    "long_session_id": (lambda: _client_hello(b"", session_id=bytes(33)), "session_id"),
    "duplicate_extension": (lambda: _client_hello(_ALPN_H2 + _ALPN_H2), "duplicate_extension"),
    "empty_alpn_id": (lambda: _client_hello(_extension(16, b"\x00\x01\x00")), "alpn"),
    "alpn_overruns": (lambda: _client_hello(_extension(16, b"\x00\x09\x02h2")), "truncated"),
    "bytes_after_extensions": (lambda: _client_hello(_ALPN_H2) + b"x", "trailing_bytes"),
    "odd_versions": (
        lambda: _client_hello(_extension(43, b"\x03\x03\x04\x03")),
        "supported_versions",
    ),
    "non_ascii_sni": (
        lambda: _client_hello(_extension(0, b"\x00\x06\x00\x00\x03\xe9xa")),
        "server_name",
    ),
}


@pytest.mark.parametrize("case", sorted(_BROKEN))
def test_broken_client_hellos_name_what_is_wrong(case: str) -> None:
    """Each malformed ClientHello raises with its own reason, never reads out of bounds."""
    build, reason = _BROKEN[case]
    with pytest.raises(HelloError) as caught:
        parse_client_hello(build())
    assert caught.value.reason == reason


def test_grease_versions_are_left_out_and_the_sni_is_lower_case() -> None:
    """RFC 8701 GREASE is ignored, and SNI is compared as a DNS name: lower case, no root dot."""
    versions = _extension(43, b"\x06\x3a\x3a\x03\x04\x03\x03")
    sni = _extension(0, b"\x00\x0c\x00\x00\x09API.Test.")
    hello = parse_client_hello(_client_hello(versions + sni))
    assert (hello.versions, hello.max_version, hello.sni) == ((0x0304, 0x0303), 0x0304, "api.test")
    assert is_grease(0x3A3A)
    assert not is_grease(0x3A3B)
    assert not is_grease(0x0304)


def test_a_hello_retry_request_is_recognised_by_its_random() -> None:
    """RFC 8446 §4.1.3: the fixed random marks a HelloRetryRequest."""
    random = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
    body = b"\x03\x03" + random + b"\x00" + b"\x13\x01" + b"\x00"
    body += (6).to_bytes(2, "big") + _extension(43, b"\x03\x04")
    hello = parse_server_hello(body)
    assert (hello.retry, hello.version) == (True, 0x0304)
