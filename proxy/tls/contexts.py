"""The SSLContexts of both ends, built once: upstream (verifying) and per intercepted host.

Building an upstream context reads the whole system trust store (tens of milliseconds), so it
never happens per request; and every request passes the same object, because aiohttp keys
its pool on the request's ``ssl`` value (a new context per request would mean a new pool).

A server context for an intercepted host costs ~4 ms (``load_cert_chain`` reads only
files) and its leaf ~0.3 ms to mint, so both happen once per host, not per connection; one
leaf key serves every host.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.tls.certs import CertificateAuthority, leaf_name, mint_leaf

# aiohttp's client speaks HTTP/1.x only: upstream, offer nothing else unless the caller
# carries HTTP/2 itself (proxy.h2.upstream offers ALPN_H2). (The server side offers what the
# proxy serves on an intercepted stream: ``ServerContexts``' ``alpn``.)
ALPN: tuple[str, ...] = ("http/1.1",)
ALPN_H2: tuple[str, ...] = ("h2", "http/1.1")
# A leaf is reminted once less than this much of its validity is left.
_RENEW_BEFORE: Final = datetime.timedelta(days=1)


def upstream_context(ca_file: str | None = None, alpn: tuple[str, ...] = ALPN) -> ssl.SSLContext:
    """Verifying client context: the system trust store, plus ``ca_file`` when given.

    ``create_default_context(cafile=...)`` would trust only that file; loading it on top
    keeps the public CAs too. Verification and hostname checks stay on: there is no
    setting that turns them off.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(list(alpn))
    return context


def check_ca_file(path: str) -> None:
    """Raise ``ssl.SSLError`` or ``OSError`` when ``path`` holds no usable CA certificate."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # bare: no system store to parse
    probe.load_verify_locations(cafile=path)
    if not probe.get_ca_certs():
        raise ssl.SSLError(f"no CA certificate in {path}")


class ServerContexts:
    """``host -> SSLContext`` presenting a leaf for ``host``, bounded to ``max_hosts`` entries.

    Keyed by the name the leaf certifies, so every spelling of a host (``0:0::1``, ``::1``;
    ``API.example.``, ``api.example``) shares one leaf. ``alpn`` is offered in the server's
    order; ``on_mint`` hears of each leaf minted.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        alpn: Sequence[str] = ALPN,
        max_hosts: int = 1024,
        clock: Callable[[], datetime.datetime] | None = None,
        on_mint: Callable[[], None] | None = None,
    ) -> None:
        self._ca = ca
        self._alpn = list(alpn)
        self._max = max_hosts
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._on_mint = on_mint
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._cache: OrderedDict[str, tuple[ssl.SSLContext, datetime.datetime]] = OrderedDict()
        self.minted = 0

    def __call__(self, host: str) -> ssl.SSLContext:
        """The context for ``host``; raises ``CAError`` when the CA cannot sign (expired)."""
        name = leaf_name(host)
        now = self._clock()
        entry = self._cache.get(name)
        if entry is not None and entry[1] - _RENEW_BEFORE > now:
            self._cache.move_to_end(name)
            return entry[0]
        leaf = mint_leaf(self._ca, name, self._key, now)
        context = self._build(leaf.public_bytes(serialization.Encoding.PEM))
        self.minted += 1
        if self._on_mint is not None:
            self._on_mint()
        self._cache[name] = (context, leaf.not_valid_after_utc)
        self._cache.move_to_end(name)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return context

    def _build(self, leaf_pem: bytes) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(self._alpn)
        # load_cert_chain takes only paths: a private directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="tracing-proxy-") as folder:
            chain = os.path.join(folder, "chain.pem")
            fd = os.open(chain, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(leaf_pem + self._ca.cert_pem() + self._key_pem)
            context.load_cert_chain(chain)
        return context

    def __len__(self) -> int:
        return len(self._cache)

    def __repr__(self) -> str:
        return f"<ServerContexts hosts={len(self._cache)}/{self._max} minted={self.minted}>"
