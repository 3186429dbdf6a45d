"""Pure header rules: hop-by-hop removal, spelling of duplicates, Via and Max-Forwards."""

from __future__ import annotations

import pytest

from proxy.rules import headers

RID = b"x-request-id"


def test_connection_options_lists_every_named_field() -> None:
    """Every token of every Connection field is collected, lower-cased."""
    raw = [(b"Connection", b"close, X-A"), (b"connection", b" x-b ,,"), (b"X-A", b"1")]
    assert headers.connection_options(raw) == {b"close", b"x-a", b"x-b"}


@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"Proxy-Authorization",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"Host",
        b"Expect",
        b"Content-Length",
        b"traceparent",
        b"X-Request-ID",
    ],
)
def test_request_fields_owned_or_hop_by_hop_are_dropped(name: bytes) -> None:
    """Hop-by-hop fields and the fields the proxy sets itself are not copied upstream."""
    raw = [(name, b"v"), (b"X-Keep", b"1")]
    out = headers.filter_fields(raw, headers.request_drop_set(raw, RID))
    assert list(out.items()) == [("X-Keep", "1")]


def test_fields_named_in_connection_are_dropped() -> None:
    """A field named in Connection is removed along with Connection (RFC 9110 §7.6.1)."""
    raw = [(b"Connection", b"X-Hop"), (b"X-Hop", b"1"), (b"X-Keep", b"2")]
    out = headers.filter_fields(raw, headers.response_drop_set(raw, RID))
    assert list(out.items()) == [("X-Keep", "2")]


def test_response_keeps_content_length_and_tracestate() -> None:
    """Content-Length of a response is end-to-end and survives the copy."""
    raw = [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked"), (b"tracestate", b"a=1")]
    out = headers.filter_fields(raw, headers.response_drop_set(raw, RID))
    assert list(out.items()) == [("Content-Length", "5"), ("tracestate", "a=1")]


def test_duplicates_keep_order_and_reuse_the_first_spelling() -> None:
    """Repeated names keep their order; a later spelling is folded into the first one."""
    raw = [(b"x-dup", b"a"), (b"X-Other", b"o"), (b"X-Dup", b"b"), (b"Set-Cookie", b"1")]
    out = headers.filter_fields(raw, frozenset())
    assert list(out.items()) == [
        ("x-dup", "a"),
        ("X-Other", "o"),
        ("x-dup", "b"),
        ("Set-Cookie", "1"),
    ]


def test_via_value_names_the_received_protocol() -> None:
    """Via records the protocol version the message arrived with (RFC 9110 §7.6.3)."""
    assert headers.via_value((1, 0), "edge") == "1.0 edge"


@pytest.mark.parametrize(
    ("method", "value", "expected"),
    [
        ("TRACE", "0", 0),
        ("OPTIONS", "5", 5),
        ("OPTIONS", " 2 ", 2),
        ("GET", "0", None),
        ("TRACE", None, None),
        ("TRACE", "-1", None),
        ("TRACE", "x", None),
        ("TRACE", "\u0663", None),  # a non-ASCII digit is not a number here
    ],
)
def test_max_forwards(method: str, value: str | None, expected: int | None) -> None:
    """Max-Forwards applies to TRACE and OPTIONS only, and only when it is a number."""
    assert headers.max_forwards(method, value) == expected


@pytest.mark.parametrize(
    ("version", "method", "status", "length", "close"),
    [
        ((1, 0), "GET", 200, None, True),  # RFC 9112 §6.3: ends at close
        ((1, 0), "POST", 404, None, True),
        ((1, 0), "GET", 200, "5", False),  # the length is known
        ((1, 0), "HEAD", 200, None, False),  # no body at all (RFC 9110 §6.4.1)
        ((1, 0), "GET", 204, None, False),
        ((1, 0), "GET", 304, None, False),
        ((1, 1), "GET", 200, None, False),  # chunked framing is available
    ],
)
def test_ends_at_close(
    version: tuple[int, int], method: str, status: int, length: str | None, close: bool
) -> None:
    """Only an HTTP/1.0 client with a body of unknown length needs the connection closed."""
    assert headers.ends_at_close(version, method, status, length) is close


@pytest.mark.parametrize(
    ("value", "websocket"),
    [
        ("websocket", True),
        ("WebSocket", True),
        (None, False),
        ("h2c", False),
        ("websocket, h2c", False),
        ("caf\xe9", False),
    ],
)
def test_is_websocket(value: str | None, websocket: bool) -> None:
    """Only an Upgrade of the single token websocket, in any case, counts (RFC 6455 §4.1)."""
    assert headers.is_websocket(value) is websocket


HANDSHAKE = [(b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket")]


@pytest.mark.parametrize(
    ("method", "version", "raw", "handshake"),
    [
        ("GET", (1, 1), HANDSHAKE, True),
        ("GET", (1, 1), [(b"connection", b"upgrade"), (b"upgrade", b"WebSocket")], True),
        ("POST", (1, 1), HANDSHAKE, False),  # RFC 6455 §4.1: the method must be GET
        ("GET", (1, 0), HANDSHAKE, False),  # ... over HTTP/1.1 or later
        ("GET", (1, 1), [(b"Upgrade", b"websocket")], False),  # Connection must list upgrade
        ("GET", (1, 1), [(b"Connection", b"Upgrade"), (b"Upgrade", b"h2c")], False),
        ("GET", (1, 1), [*HANDSHAKE, (b"Upgrade", b"h2c")], False),
    ],
)
def test_websocket_handshake(
    method: str, version: tuple[int, int], raw: list[tuple[bytes, bytes]], handshake: bool
) -> None:
    """Only a GET over HTTP/1.1 with Connection: upgrade and Upgrade: websocket switches."""
    assert headers.websocket_handshake(method, version, raw) is handshake
