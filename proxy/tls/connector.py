"""A TCPConnector that times the TLS handshake of each new connection apart from TCP.

aiohttp has no trace signal between TCP connect and TLS: one call,
``TCPConnector._wrap_create_connection``, does both (``aiohappyeyeballs`` for the socket,
then ``loop.create_connection(ssl=..., sock=...)`` for the handshake). The subclass asks
it for TCP only and then runs the handshake itself with the public ``loop.start_tls``,
so each phase has its own clock. ``_wrap_create_connection`` is private: aiohttp is
pinned below 3.15, and tests/test_connector.py runs this against the real library.

The handshake's duration (failed ones too) goes to the ``Timings`` the caller made
current with ``proxy.observe.tracing.timing``, and the connect phase subtracts it, so
connect is TCP only and the phases stay disjoint.

aiohttp speaks HTTP/1.1 only, so every handshake it dials for a request offers what the
connector's own context offers (``http/1.1``), whatever context the request names: that
context only picks the pool. Only an ``AlpnProbe`` (``proxy.h2.upstream``'s dial) offers
what its own context offers, h2 included.
"""

from __future__ import annotations

import asyncio
import ssl
from time import perf_counter
from typing import Any

import aiohttp
from aiohttp.client_exceptions import (
    ClientConnectorCertificateError,
    ClientConnectorError,
    ClientConnectorSSLError,
)
from aiohttp.client_reqrep import ClientRequest

from proxy.observe.tracing import Timings, current_timings


class AlpnProbe(ClientRequest):
    """A dial that learns what the origin picks in ALPN: its handshake offers what its
    ``ssl`` context offers (h2 too), and the connection is pooled under that context."""


class TimedTLSConnector(aiohttp.TCPConnector):
    """TCP first, then TLS, each timed; same exceptions as the stock connector."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        context = kwargs.get("ssl")
        self._http1_context = context if isinstance(context, ssl.SSLContext) else None

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: Any,
        req: Any,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
        client_error: type[Exception] = ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, Any]:
        context: ssl.SSLContext | None = kwargs.pop("ssl", None)
        if context and self._http1_context is not None and not isinstance(req, AlpnProbe):
            # A request pooled under a context that offers h2 (an origin that chose
            # http/1.1 when probed) must not get h2 on a new connection: aiohttp would send
            # HTTP/1.1 over it.
            context = self._http1_context
        server_hostname: str | None = kwargs.pop("server_hostname", None)
        started = perf_counter()
        transport, protocol = await super()._wrap_create_connection(
            *args,
            addr_infos=addr_infos,
            req=req,
            timeout=timeout,
            client_error=client_error,
            **kwargs,
        )
        if not context:
            return transport, protocol
        # TCP and TLS share --connect-timeout, as they do in the stock connector.
        budget = timeout.sock_connect
        remaining = None if budget is None else max(budget - (perf_counter() - started), 0.0)
        timings = current_timings()
        handshake_start = perf_counter()
        try:
            async with asyncio.timeout(remaining):
                tls_transport = await asyncio.get_running_loop().start_tls(
                    transport, protocol, context, server_hostname=server_hostname
                )
        except BaseException as exc:
            transport.abort()
            _add_tls_time(timings, handshake_start)  # a failed handshake is timed too
            if isinstance(exc, ssl.CertificateError):
                raise ClientConnectorCertificateError(req.connection_key, exc) from exc
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                # ssl.SSLError, or a reset or close in the middle of the handshake: the
                # TCP connection was up, so this is a TLS failure (RFC 9209 tls_protocol_error).
                raise ClientConnectorSSLError(req.connection_key, exc) from exc
            raise  # a timeout stays a timeout, as in the stock connector; cancellation too
        if tls_transport is None:  # the peer closed as the handshake ended
            transport.abort()
            _add_tls_time(timings, handshake_start)
            raise ClientConnectorSSLError(
                req.connection_key, ConnectionResetError("connection closed during TLS handshake")
            )
        _add_tls_time(timings, handshake_start)
        # start_tls does not tell the app protocol: hand it the TLS transport, as aiohttp's
        # own _start_tls_connection does for HTTPS through a proxy.
        protocol.connection_made(tls_transport)
        return tls_transport, protocol


def _add_tls_time(timings: Timings | None, start: float) -> None:
    if timings is not None:
        timings.handshook(start)
