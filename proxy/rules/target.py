"""The request target: which form it has, where it points, and its metric host label."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from proxy.rules.hostpatterns import HostPatterns


def absolute_target(request: web.BaseRequest) -> URL | None:
    """The absolute-form target (RFC 9112 §3.2.2) of a request, None for origin-form.

    aiohttp routes on the path alone, so ``GET http://other/metrics`` and ``GET /metrics``
    look alike to the router. The parsed request line keeps the difference. It is read
    from ``_message`` because ``raw_path`` changes meaning in aiohttp 3.15 (the version
    is pinned, and tests/test_target.py checks this accessor against the real parser).
    """
    url: URL = request._message.url
    return url if url.absolute and request.method != "CONNECT" else None


@dataclass(frozen=True, slots=True)
class Target:
    url: URL  # what the upstream session is asked for: no userinfo, no fragment
    host: str  # metric label: lower-case host, ":port" only when not the default
    websocket: bool = False  # a WebSocket opening handshake (RFC 6455 §4.1)


class TargetError(ValueError):
    """An absolute-form target the proxy does not forward; the message is for the client,
    ``reason`` labels the refusal in ``proxy_denied_total``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def host_label(url: URL) -> str:
    """``api.example.com``, ``127.0.0.1:8081``, ``[::1]:8081``: port only when not default."""
    label = url.host_port_subcomponent
    return label.lower() if label else ""


_NO_UPGRADE = HostPatterns()

# RFC 6455 §3: ws and wss name the same resources as http and https.
_WEBSOCKET_SCHEMES = {"ws": "http", "wss": "https"}


def forward_target(
    url: URL, upgrade: HostPatterns = _NO_UPGRADE, *, websocket: bool = False
) -> Target:
    """Validate an absolute-form target, and choose the scheme it goes upstream with.

    ``https://`` goes upstream over TLS (origination: the client spoke to us in the
    clear, we speak verified TLS onwards). ``http://`` to a host matching ``upgrade``
    does too: without a port it goes to 443 (the https default, RFC 9110 §4.2.2), an
    explicit port is kept.

    ``websocket``: the request is a WebSocket handshake, which may also name its target
    ``ws://`` or ``wss://`` (RFC 6455 §3; what aiohttp's ws_connect sends to a proxy); it
    is the same request as ``http://`` or ``https://``.
    """
    scheme = url.scheme
    if websocket and scheme in _WEBSOCKET_SCHEMES:
        url = url.with_scheme(_WEBSOCKET_SCHEMES[scheme])
        scheme = url.scheme
    if scheme not in ("http", "https"):
        if scheme in _WEBSOCKET_SCHEMES:
            raise TargetError(
                f"{scheme}:// targets are forwarded only with Upgrade: websocket",
                "unsupported_scheme",
            )
        raise TargetError(
            f"scheme {scheme!r} is not supported; only http:// and https:// are forwarded",
            "unsupported_scheme",
        )
    if not url.host:
        raise TargetError("the target has no host", "no_host")
    if url.raw_user is not None or url.raw_fragment:
        # Userinfo would turn into an Authorization header; a fragment is never sent.
        url = url.with_user(None).with_fragment(None)
    if scheme == "http" and upgrade.matches(host_label(url)):
        url = _with_https(url)
    return Target(url, host_label(url), websocket)


def _with_https(url: URL) -> URL:
    port = url.explicit_port
    return url.with_scheme("https") if port is None else url.with_scheme("https").with_port(port)


def connect_origin(scheme: str, host: str, port: int) -> URL:
    """``scheme://host:port`` of a CONNECT target (``host`` as dialled, IPv6 unbracketed)."""
    return URL.build(scheme=scheme, host=host, port=port)


def inner_target(
    origin: URL, url: URL, upgrade: HostPatterns = _NO_UPGRADE, *, websocket: bool = False
) -> Target:
    """Where a request on the stream inside a CONNECT goes: always the CONNECT's target.

    Origin-form (RFC 9112 §3.2.1) is resolved against ``origin``; the path is appended, never
    joined, so ``//other/x`` stays a path. Absolute-form (§3.2.2) must name the same host and
    port: a tunnel reaches the one target its CONNECT named (RFC 9110 §9.3.6).

    The absolute URL this makes then takes ``forward_target``'s rules, ``upgrade`` included:
    plain HTTP inside ``CONNECT host:80`` is the request ``GET http://host/`` would be.
    """
    if url.absolute:
        if (url.host or "").lower() != origin.host or url.port != origin.port:
            raise TargetError(
                "inside a CONNECT, requests go to the CONNECT's target only", "inner_target"
            )
    elif not url.raw_path.startswith("/"):
        raise TargetError("inside a CONNECT, the target must be a path", "inner_target")
    full = URL(str(origin) + url.raw_path_qs, encoded=True)
    return forward_target(full, upgrade, websocket=websocket)
