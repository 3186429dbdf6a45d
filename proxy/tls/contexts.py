"""The SSLContexts the proxy dials upstreams with, built once before serving.

Building one reads the whole system trust store (tens of milliseconds), so it never
happens per request; and every request passes the same object, because aiohttp keys its
pool on the request's ``ssl`` value (a new context per request would mean a new pool).
"""

from __future__ import annotations

import ssl

# aiohttp's server speaks HTTP/1.x only, and so does its client: offer nothing else.
ALPN: tuple[str, ...] = ("http/1.1",)


def upstream_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Verifying client context: the system trust store, plus ``ca_file`` when given.

    ``create_default_context(cafile=...)`` would trust only that file; loading it on top
    keeps the public CAs too. Verification and hostname checks stay on: there is no
    setting that turns them off.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(list(ALPN))
    return context


def check_ca_file(path: str) -> None:
    """Raise ``ssl.SSLError`` or ``OSError`` when ``path`` holds no usable CA certificate."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # bare: no system store to parse
    probe.load_verify_locations(cafile=path)
    if not probe.get_ca_certs():
        raise ssl.SSLError(f"no CA certificate in {path}")
