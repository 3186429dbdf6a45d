"""What the proxy does with a CONNECT, and what the first bytes of a tunnel are (no I/O here).

A CONNECT (RFC 9110 §9.3.6) is opaque by default. Two cases are opened up:
- a host in ``--intercept``: the proxy answers 200 itself and reads the stream: a TLS
  ClientHello is terminated with a minted certificate when the client offers a protocol the
  proxy serves (else the stream is spliced to the target untouched), an HTTP/1.x request
  line is served as plain forwarded requests;
- a port in ``--connect-http-ports`` (default 80) but not in ``--connect-ports``: the stream
  may carry plain HTTP only, which is no riskier than forwarding ``http://`` to that port;
  anything else on it is closed.

The HTTP/2 prior-knowledge preface (h2c) is an opening of its own, served where an HTTP/2
server is registered for ``"h2c"``. Where none is (``--http2 false``) it is spliced to the
target: h2c is HTTP (RFC 9113 §3.3), which either mode lets through.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from enum import Enum
from typing import Final


class ConnectMode(Enum):
    TUNNEL = "tunnel"  # dial, answer 200, relay bytes untouched
    INSPECT = "inspect"  # answer 200, then TLS -> intercept, HTTP -> serve, else close
    HTTP_ONLY = "http_only"  # answer 200, then HTTP -> serve, else close
    REFUSE = "refuse"  # 403: the port is not allowed


def connect_mode(
    *,
    intercepted: bool,
    port: int,
    connect_ports: Collection[int],
    http_ports: Collection[int],
) -> ConnectMode:
    """The table: interception needs a port CONNECT may reach at all."""
    if port in connect_ports:
        return ConnectMode.INSPECT if intercepted else ConnectMode.TUNNEL
    if port in http_ports:
        return ConnectMode.HTTP_ONLY
    return ConnectMode.REFUSE


class Opening(Enum):
    TLS = "tls"
    HTTP = "http"
    H2C = "h2c"  # HTTP/2 with prior knowledge, in the clear
    OTHER = "other"


# Protocol ids (RFC 7301 §6) that servers of a stream are registered under.
HTTP1: Final = "http/1.1"
H2: Final = "h2"  # RFC 9113 §3.2: HTTP/2 over TLS
# RFC 9113 §3.1: "h2c" names HTTP/2 over cleartext TCP; it is never offered in TLS ALPN.
H2C: Final = "h2c"
# The protocol a cleartext opening speaks.
CLEARTEXT_PROTOCOLS: Final = {Opening.HTTP: HTTP1, Opening.H2C: H2C}
_NOT_OVER_TLS: Final = frozenset({H2C})


def alpn_offer(served: Iterable[str]) -> tuple[str, ...]:
    """What the proxy's TLS server offers in ALPN: the protocols it serves, in its order."""
    return tuple(protocol for protocol in served if protocol not in _NOT_OVER_TLS)


def alpn_choice(offered: Sequence[str], served: Iterable[str]) -> str | None:
    """The protocol a handshake will agree on, None when there is none to agree on.

    RFC 7301 §3.2: the server picks one of the client's protocols; OpenSSL picks by the
    server's order. A client that sends no ALPN speaks HTTP/1.1 (RFC 9112 over TLS).
    """
    ours = alpn_offer(served)
    if not offered:
        return HTTP1 if HTTP1 in ours else None
    return next((protocol for protocol in ours if protocol in offered), None)


# RFC 8446 §5.1: a record of type handshake (22), then a 3.x legacy record version.
_TLS_HANDSHAKE: Final = 0x16
# RFC 9113 §3.4: the client connection preface of HTTP/2 with prior knowledge.
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9112 §3: method SP request-target SP HTTP-version; methods are tokens (RFC 9110 §9.1).
_REQUEST_LINE: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e]+ HTTP/1\.[01]\r?\n")
# What a request line may look like before its end has arrived (a loose superset).
_LINE_SO_FAR: Final = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?: [\x21-\x7e]*(?: [HTP/.01]{0,8}\r?)?)?"
)


def classify_opening(data: bytes, limit: int) -> Opening | None:
    """What a stream's first bytes start; None while more bytes are needed to tell.

    ``limit`` bounds the request line (``--max-request-target-length`` plus its frame):
    past it, or on a byte that cannot belong to a request line, the answer is OTHER.
    """
    if not data:
        return None
    if data[0] == _TLS_HANDSHAKE:
        if len(data) < 2:
            return None
        return Opening.TLS if data[1] == 3 else Opening.OTHER
    if H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return Opening.H2C if len(data) >= len(H2_PREFACE) else None
    line_end = data.find(b"\n")
    if line_end >= 0:
        return Opening.HTTP if _REQUEST_LINE.fullmatch(data[: line_end + 1]) else Opening.OTHER
    if len(data) > limit or not _LINE_SO_FAR.fullmatch(data):
        return Opening.OTHER
    return None
