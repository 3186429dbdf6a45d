"""TLS origination: absolute-form https:// and --upgrade-to-https, over real TLS on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import trustme
import websockets.asyncio.server

from proxy import config
from tests.conftest import (
    LogCapture,
    Origin,
    RawOrigin,
    RunningProxy,
    pattern,
    proxy_process,
)
from tests.test_forwarding import curl
from tests.test_limits import until
from tests.tls import TLSOrigin, delayed_handshake, server_context, tls_origin

StartProxy = Callable[..., Awaitable[RunningProxy]]
MiB = 1024 * 1024
Call = list[tuple[str, str, dict[str, str], bytes | None]]


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _exchange(
    address: str, calls: Sequence[tuple[str, str, dict[str, str], bytes | None]]
) -> list[Answer]:
    """Send each request line verbatim (absolute-form) on one keep-alive connection."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        answers = []
        for method, url, fields, body in calls:
            connection.request(method, url, body=body, headers=fields)
            response = connection.getresponse()
            answers.append(Answer(response.status, response.headers, response.read()))
        return answers
    finally:
        connection.close()


async def fetch(
    proxy: RunningProxy,
    url: str,
    method: str = "GET",
    fields: dict[str, str] | None = None,
    body: bytes | None = None,
) -> Answer:
    """One absolute-form request to the proxy in the clear (``GET https://... HTTP/1.1``)."""
    (answer,) = await asyncio.to_thread(
        _exchange, str(proxy.server.proxy_address), [(method, url, fields or {}, body)]
    )
    return answer


@pytest.fixture
async def https_proxy(start_proxy: StartProxy, tls_ca_file: str) -> RunningProxy:
    return await start_proxy(upstream_ca_file=tls_ca_file)


def sample(proxy: RunningProxy, name: str, host: str, **labels: str) -> float:
    return proxy.sample(name, host=host, **labels) or 0.0


# -- forwarding over TLS -----------------------------------------------------------------------


async def test_absolute_form_https_is_forwarded_over_tls(
    https_proxy: RunningProxy, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """GET https://origin/... sent in the clear reaches the TLS origin and comes back 200."""
    answer = await fetch(https_proxy, secure_origin.url("/echo?q=1"))
    assert answer.status == 200
    assert answer.json()["target"] == "/echo?q=1"
    host = secure_origin.authority
    assert sample(https_proxy, "proxy_upstream_requests_total", host, method="GET", code="200") == 1
    (line,) = logs.events("access")
    assert line["scheme"] == "https"
    assert line["host"] == host
    assert line["path"] == "/echo"
    assert line["status"] == 200


async def test_curl_examples_from_the_https_page(
    start_proxy: StartProxy, tls_ca_file: str, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """docs/https.md's curl lines: --request-target https://..., and an upgraded http:// URL."""
    proxy = await start_proxy(upstream_ca_file=tls_ca_file, upgrade_to_https=("localhost",))
    code, out, err = await curl(
        "--request-target", secure_origin.url("/echo?via=target"), proxy.url
    )
    assert code == 0, err
    assert json.loads(out)["target"] == "/echo?via=target"
    code, out, err = await curl("-x", proxy.url, f"http://localhost:{secure_origin.port}/echo")
    assert code == 0, err
    assert json.loads(out)["target"] == "/echo"
    assert [line["scheme"] for line in logs.events("access")] == ["https", "https"]


async def test_request_id_and_traceparent_reach_the_tls_origin(
    https_proxy: RunningProxy, secure_origin: TLSOrigin
) -> None:
    """The client's request id and traceparent arrive at the origin and come back on the reply."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    answer = await fetch(
        https_proxy,
        secure_origin.url("/echo"),
        fields={"X-Request-ID": "rid-https-1", "traceparent": traceparent},
    )
    seen = {name.lower(): value for name, value in answer.json()["headers"]}
    assert seen["x-request-id"] == "rid-https-1"
    assert seen["traceparent"] == traceparent
    assert answer.headers["X-Request-ID"] == "rid-https-1"
    assert answer.headers["traceparent"] == traceparent


async def test_upgrade_to_https_sends_a_plain_request_over_tls(
    start_proxy: StartProxy, tls_ca_file: str, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """An http:// request to a host in --upgrade-to-https goes to its explicit port over TLS."""
    proxy = await start_proxy(upstream_ca_file=tls_ca_file, upgrade_to_https=("localhost",))
    url = f"http://localhost:{secure_origin.port}/echo"
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url, proxy=proxy.url, headers={"X-Request-ID": "up-1", "traceparent": traceparent}
        ) as resp,
    ):
        assert resp.status == 200
        echo = await resp.json()
    seen = {name.lower(): value for name, value in echo["headers"]}
    assert seen["x-request-id"] == "up-1"
    assert seen["traceparent"] == traceparent
    assert len(secure_origin.peers) == 1  # it was the TLS listener that answered
    (line,) = logs.events("access")
    assert line["scheme"] == "https"
    assert line["tls_ms"] is not None


async def test_plain_http_is_not_upgraded_for_other_hosts(
    start_proxy: StartProxy, origin: Origin, tls_ca_file: str, logs: LogCapture
) -> None:
    """A host outside --upgrade-to-https stays plain http, with no TLS phase."""
    proxy = await start_proxy(upstream_ca_file=tls_ca_file, upgrade_to_https=("*.example",))
    async with (
        aiohttp.ClientSession() as session,
        session.get(origin.url("/echo"), proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
    (line,) = logs.events("access")
    assert line["scheme"] == "http"
    assert line["tls_ms"] is None
    assert proxy.sample("proxy_upstream_tls_seconds_count", host=origin.authority) == 0


async def test_five_mib_bodies_cross_byte_exact_both_ways(
    https_proxy: RunningProxy, secure_origin: TLSOrigin
) -> None:
    """A 5 MiB upload and a 5 MiB download over origination arrive with the right sha256."""
    body = pattern(5 * MiB, seed=3)
    up, down = await asyncio.to_thread(
        _exchange,
        str(https_proxy.server.proxy_address),
        [
            ("POST", secure_origin.url("/echo"), {}, body),
            ("GET", secure_origin.url(f"/stream?size={5 * MiB}"), {}, None),
        ],
    )
    assert up.json()["body_len"] == 5 * MiB
    assert up.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert hashlib.sha256(down.body).hexdigest() == hashlib.sha256(pattern(5 * MiB)).hexdigest()
    host = secure_origin.authority
    assert sample(https_proxy, "proxy_upstream_bytes_total", host, direction="sent") == 5 * MiB
    assert sample(https_proxy, "proxy_upstream_bytes_total", host, direction="received") >= 5 * MiB


async def test_websocket_to_an_upgraded_host_runs_over_tls(
    start_proxy: StartProxy, tls_ca: trustme.CA, tls_ca_file: str, logs: LogCapture
) -> None:
    """aiohttp's ws_connect to ws://localhost via --upgrade-to-https echoes through a wss origin."""

    async def echo(connection: websockets.asyncio.server.ServerConnection) -> None:
        async for message in connection:
            await connection.send(message)

    context = server_context(tls_ca, "localhost")
    async with websockets.asyncio.server.serve(echo, "127.0.0.1", 0, ssl=context) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        proxy = await start_proxy(upstream_ca_file=tls_ca_file, upgrade_to_https=("localhost",))
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"ws://localhost:{port}/chat", proxy=proxy.url) as ws,
        ):
            await ws.send_bytes(b"\x00\xff" * 1000)
            assert await asyncio.wait_for(ws.receive_bytes(), 10) == b"\x00\xff" * 1000
    (handshake,) = logs.events("access")
    assert (handshake["status"], handshake["scheme"]) == (101, "https")
    assert handshake["tls_ms"] is not None


# -- the TLS phase -----------------------------------------------------------------------------


async def test_a_held_back_handshake_shows_in_tls_not_connect_or_ttfb(
    https_proxy: RunningProxy, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """An origin that holds its handshake 300 ms shows it in tls; connect and ttfb stay small."""
    async with delayed_handshake(secure_origin, 0.3) as port:
        answer = await fetch(https_proxy, f"https://127.0.0.1:{port}/echo")
    assert answer.status == 200
    host = f"127.0.0.1:{port}"
    (line,) = logs.events("access")
    assert line["tls_ms"] >= 300
    assert line["connect_ms"] < line["tls_ms"]
    assert line["ttfb_ms"] < line["tls_ms"]
    # The same numbers went into the histograms: the 300 ms is in tls, above 0.25 s.
    assert sample(https_proxy, "proxy_upstream_tls_seconds_count", host) == 1
    assert sample(https_proxy, "proxy_upstream_tls_seconds_bucket", host, le="0.25") == 0
    assert sample(https_proxy, "proxy_upstream_tls_seconds_sum", host) == pytest.approx(
        line["tls_ms"] / 1000, abs=1e-6
    )
    assert sample(https_proxy, "proxy_upstream_connect_seconds_sum", host) == pytest.approx(
        line["connect_ms"] / 1000, abs=1e-6
    )
    # Disjoint phases: none of them holds another, and together they fit in the total.
    phases = ("queue_ms", "dns_ms", "connect_ms", "tls_ms", "ttfb_ms")
    assert sum(line[p] or 0.0 for p in phases) <= line["total_ms"]


async def test_second_request_reuses_the_tls_connection(
    https_proxy: RunningProxy, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """Two requests: one handshake, one TLS observation; the second is a pooled reuse."""
    address = str(https_proxy.server.proxy_address)
    first: Call = [("GET", secure_origin.url("/echo"), {}, None)]
    await asyncio.to_thread(_exchange, address, first)
    await asyncio.to_thread(_exchange, address, first)  # a new client connection, same pool
    host = secure_origin.authority
    assert sample(https_proxy, "proxy_upstream_tls_seconds_count", host) == 1
    assert sample(https_proxy, "proxy_upstream_connections_total", host, kind="reused") == 1
    assert len(secure_origin.peers) == 1
    one, two = logs.events("access")
    assert one["reused"] is False
    assert one["tls_ms"] is not None
    assert two["reused"] is True
    assert two["tls_ms"] is None
    assert two["connect_ms"] is None


async def test_plain_http_connect_has_no_tls_phase(
    proxy: RunningProxy, origin: Origin, logs: LogCapture
) -> None:
    """For http:// the connect phase is the TCP connect and tls is absent."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(origin.url("/echo"), proxy=proxy.url) as resp,
    ):
        assert resp.status == 200
    (line,) = logs.events("access")
    assert line["connect_ms"] is not None
    assert line["tls_ms"] is None
    assert proxy.sample("proxy_upstream_connect_seconds_count", host=origin.authority) == 1
    assert proxy.sample("proxy_upstream_tls_seconds_count", host=origin.authority) == 0


# -- failures ----------------------------------------------------------------------------------


async def assert_tls_failure(
    proxy: RunningProxy, url: str, host: str, error: str, logs: LogCapture, reason: str
) -> None:
    answer = await fetch(proxy, url)
    assert answer.status == 502
    assert answer.headers["Proxy-Status"].startswith(f"tracing-proxy; error={error}")
    assert reason in answer.headers["Proxy-Status"]  # the verifier's or the handshake's reason
    assert sample(proxy, "proxy_upstream_errors_total", host, error=error) == 1
    assert sample(proxy, "proxy_upstream_requests_total", host, method="GET", code="502") == 1
    (line,) = logs.events("access")
    assert (line["status"], line["error"], line["scheme"]) == (502, error, "https")
    # The failed handshake is timed in its own phase, and connect is the TCP part.
    assert line["tls_ms"] is not None
    assert line["connect_ms"] is not None
    assert sample(proxy, "proxy_upstream_tls_seconds_count", host) == 1
    assert sample(proxy, "proxy_upstream_tls_seconds_sum", host) == pytest.approx(
        line["tls_ms"] / 1000, abs=1e-6
    )


async def test_untrusted_origin_certificate_is_502_tls_certificate_error(
    https_proxy: RunningProxy, logs: LogCapture
) -> None:
    """An origin whose CA the proxy does not trust gets 502 tls_certificate_error."""
    async with tls_origin(server_context(trustme.CA(), "127.0.0.1")) as stranger:
        await assert_tls_failure(
            https_proxy,
            stranger.url("/echo"),
            stranger.authority,
            "tls_certificate_error",
            logs,
            "unable to get local issuer certificate (code 20)",
        )
        assert stranger.peers == set()  # no request was ever sent to it


async def test_origin_ca_is_untrusted_without_upstream_ca_file(
    proxy: RunningProxy, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """Without --upstream-ca-file only the system store counts: a private CA fails."""
    await assert_tls_failure(
        proxy,
        secure_origin.url("/echo"),
        secure_origin.authority,
        "tls_certificate_error",
        logs,
        "unable to get local issuer certificate",
    )


@pytest.mark.parametrize(
    ("host", "reason"),
    [("127.0.0.1", "IP address mismatch"), ("localhost", "Hostname mismatch")],
)
async def test_hostname_mismatch_is_502_tls_certificate_error(
    https_proxy: RunningProxy, tls_ca: trustme.CA, logs: LogCapture, host: str, reason: str
) -> None:
    """A trusted certificate issued for another name fails for an IP literal and for a name."""
    async with tls_origin(server_context(tls_ca, "other.test")) as origin:
        url = f"https://{host}:{origin.port}/echo"
        await assert_tls_failure(
            https_proxy, url, f"{host}:{origin.port}", "tls_certificate_error", logs, reason
        )


async def test_plain_http_on_the_tls_port_is_502_tls_protocol_error(
    https_proxy: RunningProxy, origin: Origin, logs: LogCapture
) -> None:
    """An https:// target that answers plain HTTP fails the handshake: tls_protocol_error."""
    url = f"https://{origin.authority}/echo"
    await assert_tls_failure(
        https_proxy, url, origin.authority, "tls_protocol_error", logs, "WRONG_VERSION_NUMBER"
    )


async def test_origin_closing_during_the_handshake_is_502_tls_protocol_error(
    https_proxy: RunningProxy,
    raw_origin: Callable[[Any], Awaitable[RawOrigin]],
    logs: LogCapture,
) -> None:
    """An origin that reads the ClientHello and hangs up is a TLS failure, not a TCP one."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: Any) -> None:
        await reader.read(1)  # the ClientHello has started arriving

    closer = await raw_origin(hang_up)
    host = f"127.0.0.1:{closer.port}"
    await assert_tls_failure(
        https_proxy, f"https://{host}/", host, "tls_protocol_error", logs, "TLS handshake failed"
    )


async def test_origin_silent_in_the_handshake_is_504_timed_in_tls(
    start_proxy: StartProxy, tls_ca_file: str, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """A handshake that outlasts --connect-timeout is a connection_timeout, spent in tls."""
    proxy = await start_proxy(upstream_ca_file=tls_ca_file, connect_timeout=0.3)
    async with delayed_handshake(secure_origin, 5.0) as port:
        answer = await fetch(proxy, f"https://127.0.0.1:{port}/echo")
    assert answer.status == 504
    assert "error=connection_timeout" in answer.headers["Proxy-Status"]
    (line,) = logs.events("access")
    assert line["error"] == "connection_timeout"
    assert line["tls_ms"] > line["connect_ms"]  # TCP was quick; the wait was the handshake


# -- the same rules as for http ----------------------------------------------------------------


async def test_denied_https_destination_gets_403_and_is_not_dialled(
    start_proxy: StartProxy, tls_ca_file: str, secure_origin: TLSOrigin
) -> None:
    """--deny-destinations holds for https:// targets and upgraded ones, by address and name."""
    proxy = await start_proxy(
        upstream_ca_file=tls_ca_file,
        upgrade_to_https=("localhost",),
        deny_destinations=config.parse_deny_destinations("127.0.0.1/32"),
    )
    for url in (
        secure_origin.url("/echo"),
        f"https://localhost:{secure_origin.port}/echo",
        f"http://localhost:{secure_origin.port}/echo",
    ):
        answer = await fetch(proxy, url)
        assert answer.status == 403, url
        assert "error=destination_ip_prohibited" in answer.headers["Proxy-Status"]
    assert secure_origin.peers == set()


async def test_full_pool_holds_for_https(
    start_proxy: StartProxy, tls_ca_file: str, secure_origin: TLSOrigin
) -> None:
    """With the one pooled TLS connection busy past --pool-wait-timeout, the next gets 503."""
    proxy = await start_proxy(
        upstream_ca_file=tls_ca_file, pool_limit_per_host=1, pool_wait_timeout=0.2
    )
    busy = asyncio.ensure_future(fetch(proxy, secure_origin.url("/slow-headers?ms=1500")))
    await until(lambda: proxy.server.lifecycle.in_flight == 1)
    answer = await fetch(proxy, secure_origin.url("/echo"))
    assert (await asyncio.wait_for(busy, 10)).status == 200
    assert answer.status == 503
    assert "error=connection_limit_reached" in answer.headers["Proxy-Status"]


async def test_cli_on_uvloop_originates_tls(
    tls_ca_file: str, secure_origin: TLSOrigin, client: aiohttp.ClientSession
) -> None:
    """python -m proxy, on its default uvloop, upgrades a host given by flag and verifies it."""
    # No admin listener: its default port may be held by another proxy on this machine.
    async with proxy_process(
        "--admin-listen",
        "off",
        "--upstream-ca-file",
        tls_ca_file,
        "--upgrade-to-https",
        "localhost",
    ) as (_, url):
        target = f"http://localhost:{secure_origin.port}/echo"
        async with client.get(target, proxy=url) as resp:
            assert resp.status == 200
            assert (await resp.json())["target"] == "/echo"
    assert len(secure_origin.peers) == 1
