"""One table: what went wrong -> status code, RFC 9209 ``Proxy-Status`` error type, body text.

The error type doubles as the ``error`` label of ``proxy_upstream_errors_total`` and the
``error`` field of the access log, so the three always agree.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiodns
import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy.rules.policy import (
    AddressWithTrailingDot,
    DestinationDenied,
    LoopDetected,
    UnusualSpelling,
)


@dataclass(frozen=True, slots=True)
class ProxyError:
    status: int
    error: str  # RFC 9209 §2.3 error type (499's client_disconnected is ours)
    text: str

    def with_text(self, text: str) -> ProxyError:
        return ProxyError(self.status, self.error, text)


CONNECTION_REFUSED: Final = ProxyError(502, "connection_refused", "upstream refused the connection")
DNS_ERROR: Final = ProxyError(502, "dns_error", "upstream host name could not be resolved")
CONNECTION_TIMEOUT: Final = ProxyError(
    504, "connection_timeout", "timed out connecting to the upstream"
)
DESTINATION_UNAVAILABLE: Final = ProxyError(
    502, "destination_unavailable", "could not connect to the upstream"
)
# RFC 9209 §2.3.14 (certificate) and §2.3.13 (protocol). The upstream's certificate is
# always verified (system trust store plus --upstream-ca-file); there is no way around it.
TLS_CERTIFICATE_ERROR: Final = ProxyError(
    502, "tls_certificate_error", "the upstream's TLS certificate could not be verified"
)
TLS_PROTOCOL_ERROR: Final = ProxyError(
    502, "tls_protocol_error", "the TLS handshake with the upstream failed"
)
RESPONSE_TIMEOUT: Final = ProxyError(
    504, "http_response_timeout", "upstream sent no response headers in time"
)
CONNECTION_TERMINATED: Final = ProxyError(
    502, "connection_terminated", "upstream closed the connection before responding"
)
PROTOCOL_ERROR: Final = ProxyError(502, "http_protocol_error", "upstream sent an invalid response")
RESPONSE_INCOMPLETE: Final = ProxyError(
    502, "http_response_incomplete", "upstream closed the connection mid-body"
)
# The handler was cancelled by shutdown: to the client, the response is cut short (or absent).
CUT_AT_SHUTDOWN: Final = ProxyError(
    502, "http_response_incomplete", "the proxy shut down before the response was complete"
)
READ_TIMEOUT: Final = ProxyError(
    504, "connection_read_timeout", "upstream went quiet in the middle of the body"
)
CLIENT_DISCONNECTED: Final = ProxyError(499, "client_disconnected", "client went away")
BAD_REQUEST_BODY: Final = ProxyError(
    400, "http_request_error", "the request body could not be read from the client"
)
INTERNAL_ERROR: Final = ProxyError(502, "proxy_internal_error", "the proxy failed on this request")

DNS_TIMEOUT: Final = ProxyError(504, "dns_timeout", "timed out resolving the upstream host name")
CONNECTION_LIMIT_REACHED: Final = ProxyError(
    503, "connection_limit_reached", "no upstream connection became free in time; retry later"
)

# Request heads the listener refuses (proxy.wire.limits); RFC 9209 has one name for them all.
MALFORMED_REQUEST: Final = ProxyError(
    400, "http_request_error", "the request is not valid HTTP/1.1 (RFC 9112)"
)
REQUEST_TIMEOUT: Final = ProxyError(
    408, "http_request_error", "the request header fields did not arrive in time"
)
TARGET_TOO_LONG: Final = ProxyError(
    414, "http_request_error", "the request target is longer than this proxy accepts"
)
HEADERS_TOO_LARGE: Final = ProxyError(
    431, "http_request_error", "the request header fields are larger than this proxy accepts"
)
# RFC 9112 §6.1: 501 for a transfer coding the server does not understand.
CODING_NOT_IMPLEMENTED: Final = ProxyError(
    501, "http_request_error", "this proxy relays no transfer coding other than chunked"
)
VERSION_NOT_SUPPORTED: Final = ProxyError(
    505, "http_request_error", "this proxy speaks HTTP/1.0 and HTTP/1.1 only"
)


class PoolWaitExceeded(Exception):
    """No pooled upstream connection became free within ``--pool-wait-timeout``."""


class Http2Required(Exception):
    """A request that needs HTTP/2 (gRPC) to an origin whose ALPN offers only HTTP/1.1."""


# RFC 9209 §2.3.12: the next hop cannot carry this request's protocol.
HTTP2_REQUIRED: Final = ProxyError(
    502,
    "http_protocol_error",
    "the upstream speaks only HTTP/1.1 and this request (gRPC) needs HTTP/2",
)


# Refusals by policy (proxy.rules.policy): who may use the proxy and where it may connect.
# 407: RFC 9110 §15.5.8; 508 Loop Detected: RFC 5842 §7.2; error types: RFC 9209 §2.3.
CLIENT_DENIED: Final = ProxyError(403, "http_request_denied", "this client may not use the proxy")
AUTH_REQUIRED: Final = ProxyError(407, "http_request_denied", "proxy authentication required")
DESTINATION_DENIED: Final = ProxyError(
    403, "destination_ip_prohibited", "the proxy does not connect to this destination"
)
LOOP_DETECTED: Final = ProxyError(
    508, "proxy_loop_detected", "the request would come back to this proxy"
)
UNUSUAL_ADDRESS: Final = ProxyError(
    400, "http_request_error", "write an IPv4 address as four decimal numbers (a.b.c.d)"
)
TRAILING_DOT_ADDRESS: Final = ProxyError(
    400, "http_request_error", "an IP address takes no trailing dot (write a.b.c.d)"
)


def _refused(exc: BaseException) -> bool:
    return isinstance(getattr(exc, "os_error", None), ConnectionRefusedError)


def _lookup_timed_out(exc: BaseException) -> bool:
    # aiohttp re-raises aiodns' DNSError(code, message) as OSError(None, message) from it.
    cause = exc.__cause__
    return isinstance(cause, aiodns.error.DNSError) and cause.args[:1] == (
        aiodns.error.ARES_ETIMEOUT,
    )


def _dns_timed_out(exc: BaseException) -> bool:
    # The connector wraps the resolver's OSError once more, as ``os_error``.
    os_error = getattr(exc, "os_error", None)
    return os_error is not None and _lookup_timed_out(os_error)


def _always(exc: BaseException) -> bool:
    return True


Rule = tuple[type[BaseException], Callable[[BaseException], bool], ProxyError]

# Checked in order, first match wins: subclasses before their bases (aiohttp's
# ClientConnectorDNSError and ConnectionTimeoutError derive from ClientOSError and
# ServerTimeoutError, which come later).
BEFORE_RESPONSE: Final[tuple[Rule, ...]] = (
    (PoolWaitExceeded, _always, CONNECTION_LIMIT_REACHED),
    (Http2Required, _always, HTTP2_REQUIRED),
    (DestinationDenied, _always, DESTINATION_DENIED),
    (LoopDetected, _always, LOOP_DETECTED),
    (AddressWithTrailingDot, _always, TRAILING_DOT_ADDRESS),  # a subclass: before its base
    (UnusualSpelling, _always, UNUSUAL_ADDRESS),
    (aiohttp.ClientConnectorDNSError, _dns_timed_out, DNS_TIMEOUT),
    (aiohttp.ClientConnectorDNSError, _always, DNS_ERROR),
    (aiohttp.ConnectionTimeoutError, _always, CONNECTION_TIMEOUT),
    (aiohttp.SocketTimeoutError, _always, RESPONSE_TIMEOUT),
    # Both TLS classes derive from ClientSSLError and ClientConnectorError: the
    # certificate one first, and both before the generic connector rows.
    (aiohttp.ClientConnectorCertificateError, _always, TLS_CERTIFICATE_ERROR),
    (aiohttp.ClientSSLError, _always, TLS_PROTOCOL_ERROR),
    (aiohttp.ClientConnectorError, _refused, CONNECTION_REFUSED),
    (aiohttp.ClientConnectorError, _always, DESTINATION_UNAVAILABLE),
    (aiohttp.ServerDisconnectedError, _always, CONNECTION_TERMINATED),
    (aiohttp.ClientResponseError, _always, PROTOCOL_ERROR),
    (aiohttp.ClientPayloadError, _always, PROTOCOL_ERROR),
    (RequestPayloadError, _always, BAD_REQUEST_BODY),
    (aiohttp.ClientOSError, _always, CONNECTION_TERMINATED),
    (aiohttp.ClientConnectionError, _always, CONNECTION_TERMINATED),
    (asyncio.TimeoutError, _always, RESPONSE_TIMEOUT),
)

DURING_BODY: Final[tuple[Rule, ...]] = (
    (aiohttp.SocketTimeoutError, _always, READ_TIMEOUT),
    (aiohttp.ClientPayloadError, _always, RESPONSE_INCOMPLETE),
    (aiohttp.ClientConnectionError, _always, RESPONSE_INCOMPLETE),
)


# A CONNECT tunnel resolves and dials without the client session, so its failures arrive
# as the resolver's and the socket's own exceptions.
LOOKUP: Final[tuple[Rule, ...]] = (
    (DestinationDenied, _always, DESTINATION_DENIED),
    (LoopDetected, _always, LOOP_DETECTED),
    (OSError, _lookup_timed_out, DNS_TIMEOUT),
    (OSError, _always, DNS_ERROR),
)

DIAL: Final[tuple[Rule, ...]] = (
    (ConnectionRefusedError, _always, CONNECTION_REFUSED),
    (TimeoutError, _always, CONNECTION_TIMEOUT),  # an OSError too: before the next row
    (OSError, _always, DESTINATION_UNAVAILABLE),
)


def classify(exc: BaseException, rules: tuple[Rule, ...]) -> ProxyError:
    """The first rule whose class and predicate match; an internal error otherwise."""
    for cls, applies, error in rules:
        if isinstance(exc, cls) and applies(exc):
            return error
    return INTERNAL_ERROR


def describe(exc: BaseException) -> str:
    """A short one-line account of an exception for ``details`` and the log."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return _tls_reason(exc.os_error)
    return f"{type(exc).__name__}: {exc}"[:200]


def _tls_reason(cause: OSError) -> str:
    # aiohttp's own text puts the verifier's reason last, where the 200-character cut
    # would drop it; this is the part an operator needs.
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate rejected: {cause.verify_message} (code {cause.verify_code})"[:200]
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return f"TLS handshake failed: {cause.reason}"
    return f"TLS handshake failed: {type(cause).__name__}: {cause}"[:200]


def _quote(text: str) -> str:
    # RFC 8941 §3.3.3 sf-string: printable ASCII, with " and \ escaped.
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def proxy_status(pseudonym: str, error: str, details: str | None = None) -> str:
    """A ``Proxy-Status`` member naming this proxy (RFC 9209 §2)."""
    value = f"{pseudonym}; error={error}"
    return f"{value}; details={_quote(details)}" if details else value


def error_response(
    err: ProxyError, pseudonym: str, details: str | None = None, *, close: bool = False
) -> web.Response:
    """The short text answer a client gets when the proxy itself fails the request."""
    headers = {"Proxy-Status": proxy_status(pseudonym, err.error, details)}
    if err.status == 503:
        headers["Retry-After"] = "1"  # RFC 9110 §10.2.3: a retry soon may well succeed
    response = web.Response(
        status=err.status, text=err.text + "\n", headers=headers, content_type="text/plain"
    )
    if close:
        response.force_close()
    return response
