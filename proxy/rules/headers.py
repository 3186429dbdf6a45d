"""Pure header rules for forwarding: what is dropped, what is added, in which order.

Works on aiohttp's ``raw_headers`` (``(name, value)`` byte pairs in wire order), so the
original spelling, order and duplicates survive into the forwarded message.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict

RawHeaders = Iterable[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward, in either
# direction, plus every field named in Connection. Proxy-Connection is the
# non-standard twin some clients still send (RFC 9112 Appendix C.2.2).
HOP_BY_HOP: Final = frozenset(
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

# Request fields the proxy owns on the way up:
# - Host is rebuilt from the target (RFC 9112 §3.2.2);
# - Expect is answered by our own server before the handler runs, so forwarding it
#   would make the upstream wait for a second handshake (RFC 9110 §10.1.1);
# - Content-Length is passed separately, so the client library frames the body itself
#   (RFC 9112 §6.3: the proxy re-frames, never copies framing).
_REQUEST_OWNED: Final = frozenset({b"host", b"expect", b"content-length"})

# traceparent is always set by the proxy (kept when valid, else a new trace); tracestate
# is forwarded with a kept trace and dropped with a replaced one (W3C Trace Context §3.3).
TRACE_FIELDS: Final = frozenset({b"traceparent"})


def connection_options(raw: RawHeaders) -> frozenset[bytes]:
    """Lower-cased field names listed in every Connection field (RFC 9110 §7.6.1)."""
    names: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            names.update(part.strip().lower() for part in value.split(b","))
    names.discard(b"")
    return frozenset(names)


def kept_fields(raw: RawHeaders, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The fields whose lower-cased name is not in ``drop``, as bytes, in order: for a head
    the proxy writes itself (a 1xx, HTTP/2 trailers)."""
    return [(name, value) for name, value in raw if name.lower() not in drop]


def filter_fields(raw: RawHeaders, drop: frozenset[bytes]) -> CIMultiDict[str]:
    """Copy fields whose lower-cased name is not in ``drop``, keeping order and duplicates.

    A name repeated with a different spelling reuses its first spelling: aiohttp's client
    collapses duplicates whose names differ only in case.
    """
    out: CIMultiDict[str] = CIMultiDict()
    spelling: dict[bytes, str] = {}
    for name, value in raw:
        lowered = name.lower()
        if lowered in drop:
            continue
        text = spelling.get(lowered)
        if text is None:
            text = spelling[lowered] = name.decode("latin-1")
        # Bytes that are not UTF-8 (obs-text, RFC 9110 §5.5) become lone surrogates, which
        # proxy.wire.obs_text writes back as the same bytes.
        out.add(text, value.decode("utf-8", "surrogateescape"))
    return out


def request_drop_set(raw: RawHeaders, request_id_header: bytes) -> frozenset[bytes]:
    """Everything the proxy must not copy from a client request."""
    return _with_options(_request_base(request_id_header), raw)


def response_drop_set(raw: RawHeaders, request_id_header: bytes) -> frozenset[bytes]:
    """Everything the proxy must not copy from an upstream response."""
    return _with_options(_response_base(request_id_header), raw)


# The fixed part of each set depends only on the configured request-id header: build it
# once, not on every request.
@functools.cache
def _request_base(request_id_header: bytes) -> frozenset[bytes]:
    return HOP_BY_HOP | _REQUEST_OWNED | TRACE_FIELDS | {request_id_header}


@functools.cache
def _response_base(request_id_header: bytes) -> frozenset[bytes]:
    return HOP_BY_HOP | {b"traceparent", request_id_header}


def _with_options(base: frozenset[bytes], raw: RawHeaders) -> frozenset[bytes]:
    options = connection_options(raw)
    return base | options if options else base


def ends_at_close(
    version: tuple[int, int], method: str, status: int, content_length: str | None
) -> bool:
    """True when the only way to end this response's body is to close the connection.

    An HTTP/1.0 client cannot be sent chunked framing, so a body of unknown length is
    delimited by the close (RFC 9112 §6.3 item 8); keeping the connection would leave the
    client waiting for an end that never comes. Bodiless responses (HEAD, 1xx, 204, 304;
    RFC 9110 §6.4.1) and a known length need no close.
    """
    if version >= (1, 1) or content_length is not None:
        return False
    return not (method == "HEAD" or status < 200 or status in (204, 304))


def is_websocket(upgrade: str | None) -> bool:
    """An Upgrade value asking for WebSocket alone (RFC 6455 §4.1), compared without case."""
    return upgrade is not None and upgrade.isascii() and upgrade.lower() == "websocket"


def websocket_handshake(method: str, version: tuple[int, int], raw: RawHeaders) -> bool:
    """An opening handshake (RFC 6455 §4.1): a GET over HTTP/1.1 whose Connection lists
    ``upgrade`` and whose one Upgrade field is ``websocket``. Any other Upgrade (h2c, say)
    is hop-by-hop and dropped (RFC 9110 §7.8)."""
    if method != "GET" or version < (1, 1):
        return False
    upgrades = [value for name, value in raw if name.lower() == b"upgrade"]
    return (
        len(upgrades) == 1
        and b"upgrade" in connection_options(raw)
        and is_websocket(upgrades[0].decode("latin-1"))
    )


# What a WebSocket handshake and its 101 carry hop by hop, set by the proxy on each leg
# (RFC 9110 §7.8; RFC 6455 §4.1 and §4.2.2).
WEBSOCKET_UPGRADE: Final = (("Connection", "Upgrade"), ("Upgrade", "websocket"))


def transfer_codings(raw: RawHeaders) -> list[bytes]:
    """Every transfer coding named, in order, lower-cased (RFC 9112 §6.1)."""
    return [
        item.strip().lower()
        for name, value in raw
        if name.lower() == b"transfer-encoding"
        for item in value.split(b",")
    ]


def codings_other_than_chunked(raw: RawHeaders) -> bool:
    """True unless Transfer-Encoding is absent or exactly one ``chunked``.

    The proxy removes Transfer-Encoding (hop-by-hop) and re-frames the body itself, so any
    other coding would reach the next recipient undeclared (RFC 9112 §6.1, §7).
    """
    codings = transfer_codings(raw)
    return bool(codings) and codings != [b"chunked"]


def via_value(version: tuple[int, int], pseudonym: str) -> str:
    """Our Via entry: the protocol we received the message with, then our name (§7.6.3).

    HTTP/2's version is written "2" (RFC 9113 §3.1), HTTP/1.x's "1.1" or "1.0".
    """
    major, minor = version
    protocol = str(major) if major >= 2 else f"{major}.{minor}"
    return f"{protocol} {pseudonym}"


# RFC 9110 §7.6.2: Max-Forwards applies to TRACE and OPTIONS only.
MAX_FORWARDS_METHODS: Final = frozenset({"TRACE", "OPTIONS"})


def max_forwards(method: str, value: str | None) -> int | None:
    """The received Max-Forwards of a TRACE or OPTIONS request; None when the rule does not apply.

    0 means the proxy answers itself; above 0 it forwards with the value decremented.
    An unparsable value is treated as absent, since the field is advisory.
    """
    if method not in MAX_FORWARDS_METHODS or value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def accepts_trailers(raw: RawHeaders) -> bool:
    """The client's TE lists ``trailers``: it will take trailer fields (RFC 9110 §10.1.4)."""
    return any(
        part.strip().lower() == b"trailers"
        for name, value in raw
        if name.lower() == b"te"
        for part in value.split(b",")
    )


def needs_http2(raw: RawHeaders) -> bool:
    """A request only HTTP/2 can carry: gRPC (its status comes in trailers; content type
    ``application/grpc``, gRPC over HTTP/2 spec) or any request that waits for trailers."""
    return accepts_trailers(raw) or any(
        name.lower() == b"content-type" and value.lower().startswith(b"application/grpc")
        for name, value in raw
    )


def grpc_status(raw: RawHeaders) -> int | None:
    """The ``grpc-status`` of a gRPC response's trailers (or trailers-only head), if valid."""
    for name, value in raw:
        if name.lower() == b"grpc-status":
            text = value.strip()
            return int(text) if text.isdigit() and len(text) <= 3 else None
    return None


def rpc_method(path: str) -> tuple[str, str] | None:
    """(service, method) of a gRPC path ``/package.Service/Method``, None for anything else."""
    service, slash, method = path.removeprefix("/").partition("/")
    return (service, method) if path.startswith("/") and slash and service and method else None
