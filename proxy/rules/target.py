"""The request target: which form it has, where it points, and its metric host label."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from yarl import URL


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


def forward_target(url: URL, *, websocket: bool = False) -> Target:
    """Validate an absolute-form target for plain forwarding.

    ``websocket``: the request is a WebSocket handshake, which may also name its target
    ``ws://`` (RFC 6455 §3; what aiohttp's ws_connect sends to a proxy); it is the same
    request as ``http://``.
    """
    scheme = url.scheme
    if scheme == "ws" and websocket:
        url = url.with_scheme("http")
    elif scheme != "http":
        if scheme in ("https", "wss"):
            raise TargetError(
                f"{scheme}:// targets are not forwarded in the clear; "
                "use CONNECT (HTTPS_PROXY) for TLS",
                "unsupported_scheme",
            )
        if scheme == "ws":
            raise TargetError(
                "ws:// targets are forwarded only with Upgrade: websocket", "unsupported_scheme"
            )
        raise TargetError(
            f"scheme {scheme!r} is not supported; only http:// is forwarded", "unsupported_scheme"
        )
    if not url.host:
        raise TargetError("the target has no host", "no_host")
    if url.raw_user is not None or url.raw_fragment:
        # Userinfo would turn into an Authorization header; a fragment is never sent.
        url = url.with_user(None).with_fragment(None)
    return Target(url, host_label(url), websocket)
