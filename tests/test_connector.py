"""The TLS-timing connector against the real aiohttp: the private hook it overrides still works."""

from __future__ import annotations

import asyncio
import inspect
import ssl
from pathlib import Path
from time import perf_counter

import aiohttp
import pytest
import trustme
import uvloop

from proxy.observe.tracing import Timings, timing, trace_config
from proxy.tls.connector import TimedTLSConnector
from proxy.tls.contexts import upstream_context
from tests.conftest import Origin
from tests.tls import TLSOrigin, delayed_handshake, server_context, tls_origin


def client_context(ca: trustme.CA, tmp: str) -> ssl.SSLContext:
    ca.cert_pem.write_to_path(tmp)
    return upstream_context(tmp)


async def timed_get(session: aiohttp.ClientSession, url: str) -> Timings:
    """One GET with its Timings made current, as the forwarder does."""
    timings = Timings(perf_counter())
    with timing(timings):
        async with session.get(url, trace_request_ctx=timings) as resp:
            assert resp.status == 200
            await resp.read()
    return timings


def test_the_overridden_hook_keeps_its_signature() -> None:
    """aiohttp's _wrap_create_connection still takes the keywords the override passes on."""
    params = inspect.signature(aiohttp.TCPConnector._wrap_create_connection).parameters
    assert {"addr_infos", "req", "timeout", "client_error"} <= set(params)
    kinds = {p.kind for p in params.values()}
    assert inspect.Parameter.VAR_POSITIONAL in kinds
    assert inspect.Parameter.VAR_KEYWORD in kinds  # ssl= and server_hostname= arrive here


async def handshake_apart(ca: trustme.CA, tmp: str, origin: TLSOrigin) -> list[Timings]:
    """A held-back handshake, then a reuse, then plain http: the Timings of each."""
    context = client_context(ca, tmp)
    connector = TimedTLSConnector(ssl=context)
    async with (
        aiohttp.ClientSession(connector=connector, trace_configs=[trace_config()]) as session,
        delayed_handshake(origin, 0.3) as port,
    ):
        url = f"https://127.0.0.1:{port}/echo"
        return [await timed_get(session, url), await timed_get(session, url)]


def assert_apart(first: Timings, second: Timings) -> None:
    assert first.tls is not None
    assert first.tls >= 0.3  # the relay held the ClientHello that long
    assert first.connect is not None
    assert first.connect < first.tls
    assert second.reused is True
    assert (second.tls, second.connect) == (None, None)


async def test_handshake_is_timed_apart_from_tcp(
    tls_ca: trustme.CA, tmp_path: Path, secure_origin: TLSOrigin
) -> None:
    """A 300 ms handshake lands in tls, connect keeps the TCP part, a reuse has neither."""
    assert_apart(*await handshake_apart(tls_ca, f"{tmp_path}/ca.pem", secure_origin))


def test_handshake_is_timed_apart_from_tcp_on_uvloop(tls_ca: trustme.CA, tmp_path: Path) -> None:
    """The same on uvloop, the proxy's default loop (its start_tls is its own)."""

    async def scenario() -> list[Timings]:
        async with tls_origin(server_context(tls_ca, "127.0.0.1")) as origin:
            return await handshake_apart(tls_ca, f"{tmp_path}/ca.pem", origin)

    loop = uvloop.new_event_loop()
    try:
        assert_apart(*loop.run_until_complete(scenario()))
    finally:
        loop.close()


async def test_plain_http_gets_no_tls_phase(origin: Origin) -> None:
    """An http:// URL through the same connector is TCP only."""
    async with aiohttp.ClientSession(
        connector=TimedTLSConnector(ssl=upstream_context()), trace_configs=[trace_config()]
    ) as session:
        timings = await timed_get(session, origin.url("/echo"))
    assert timings.connect is not None
    assert timings.tls is None


@pytest.mark.parametrize("connector_class", [aiohttp.TCPConnector, TimedTLSConnector])
async def test_untrusted_certificate_raises_what_the_stock_connector_raises(
    connector_class: type[aiohttp.TCPConnector], tmp_path: Path
) -> None:
    """Both connectors raise ClientConnectorCertificateError for a CA they do not trust."""
    trusted, stranger = trustme.CA(), trustme.CA()
    context = client_context(trusted, f"{tmp_path}/ca.pem")
    async with (
        tls_origin(server_context(stranger, "127.0.0.1")) as origin,
        aiohttp.ClientSession(connector=connector_class(ssl=context)) as session,
    ):
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(origin.url("/echo"))


async def test_hang_up_during_the_handshake_is_a_tls_error(
    tmp_path: Path,
) -> None:
    """A peer that closes mid-handshake: ClientConnectorSSLError here, where stock says reset."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    context = client_context(trustme.CA(), f"{tmp_path}/ca.pem")
    try:
        raised = []
        for connector_class in (aiohttp.TCPConnector, TimedTLSConnector):
            async with aiohttp.ClientSession(connector=connector_class(ssl=context)) as session:
                with pytest.raises(aiohttp.ClientConnectorError) as info:
                    await session.get(f"https://127.0.0.1:{port}/")
                raised.append(type(info.value))
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
    assert raised == [aiohttp.ClientConnectorError, aiohttp.ClientConnectorSSLError]
