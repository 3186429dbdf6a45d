"""Every setting that touches a request holds on every route a request can take.

A request reaches the forwarder three ways: absolute-form in the clear; as plain HTTP inside
a CONNECT to a port in --connect-http-ports (undici and https-proxy-agent send http:// URLs
that way); and over TLS inside an intercepted CONNECT. Each row of ``CASES`` sets one setting
(with what it needs to be seen) and checks what it changes; each row runs on every route it
applies to. A new setting joins the table, or ``NOT_PER_REQUEST`` with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import h11
import pytest
import trustme

from proxy.config import Settings, parse_deny_destinations
from proxy.rules.policy import Credential
from proxy.tls.certs import CertificateAuthority, write_ca
from tests.conftest import LogCapture, RunningProxy, read_head
from tests.dns import DnsServer, start_dns, stop_dns
from tests.oracle import Received, Rejected, ResponseReading
from tests.otlp import OtlpReceiver, attributes
from tests.test_failures import unanswered_port  # noqa: F401 (a fixture)
from tests.test_limits import until
from tests.tls import TLSOrigin, server_context, tls_origin

StartProxy = Callable[..., Awaitable[RunningProxy]]

ABSOLUTE, CONNECT_HTTP, INTERCEPTED = "absolute", "connect-http", "intercepted"
ROUTES = (ABSOLUTE, CONNECT_HTTP, INTERCEPTED)
ALL = frozenset(ROUTES)
HTTP_TARGETS = frozenset({ABSOLUTE, CONNECT_HTTP})  # the routes whose target is http://
HOST = "127.0.0.1"
NAME = "walk.test"  # answered by the test's DNS server with HOST
SILENT = "silent.test"  # never answered
PSEUDONYM = "walker"
USER = Credential("walker", "secret")
SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OM_ACCEPT = "application/openmetrics-text;version=1.0.0"


@dataclass
class World:
    """What a case runs against: the origins, the proxy's CA, a DNS server, an OTLP receiver."""

    plain: TLSOrigin  # the origin app in the clear (remembers its peers, like the TLS one)
    tls: TLSOrigin  # the same app over TLS, certified for HOST and NAME
    ca_cert: str
    ca_key: str
    ca_context: ssl.SSLContext  # a client that trusts the proxy's CA only
    upstream_ca_file: str  # trusts the TLS origin
    unanswered: int  # a port whose accept queue is full
    dns: DnsServer
    otlp: OtlpReceiver
    background: list[asyncio.Future[Seen]] = field(default_factory=list)


@pytest.fixture
async def world(
    tmp_path: Any,
    tls_ca: trustme.CA,
    tls_ca_file: str,
    unanswered_port: int,  # noqa: F811
) -> AsyncIterator[World]:
    cert, key = write_ca(str(tmp_path / "ca"), CertificateAuthority.create())
    dns = await start_dns({NAME: HOST, SILENT: None})
    otlp = OtlpReceiver()
    await otlp.start()
    try:
        async with (
            tls_origin(None) as plain,
            tls_origin(server_context(tls_ca, HOST, NAME)) as secure,
        ):
            yield World(
                plain,
                secure,
                str(cert),
                str(key),
                ssl.create_default_context(cafile=str(cert)),
                tls_ca_file,
                unanswered_port,
                dns,
                otlp,
            )
    finally:
        await otlp.close()
        stop_dns(dns)


@dataclass
class Seen:
    """One case's exchange as the client saw it, and where to look for the rest."""

    route: str
    case: Case
    world: World
    proxy: RunningProxy
    logs: LogCapture
    port: int
    response: Received | Rejected | None  # None: closed before a response
    closed: bool = True  # the proxy closed the connection after the response

    @property
    def label(self) -> str:
        return f"{self.case.host}:{self.port}"

    def answer(self) -> Received:
        assert isinstance(self.response, Received), self.response
        return self.response

    def ok(self) -> dict[str, Any]:
        """The origin's echo of the request, after a 200."""
        answer = self.answer()
        assert answer.status == 200, answer
        echoed: dict[str, Any] = json.loads(answer.body)
        return echoed

    def refused(self, status: int, error: str) -> None:
        answer = self.answer()
        assert answer.status == status, answer
        (proxy_status,) = answer.field(b"proxy-status")
        pseudonym = self.proxy.server.settings.via_pseudonym
        assert proxy_status.startswith(f"{pseudonym}; error={error}".encode()), proxy_status

    async def access(self) -> dict[str, Any]:
        """The access line of the case's request (the last one written)."""
        lines = await self.logs.wait_for("access")
        return lines[-1]

    def requests(self, host: str) -> float | None:
        return self.proxy.sample(
            "proxy_upstream_requests_total", host=host, method="GET", code="200"
        )

    async def scrape(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{self.proxy.admin_url}/metrics", headers={"Accept": OM_ACCEPT}
            ) as response,
        ):
            return await response.text()


Check = Callable[[Seen], Awaitable[None]]


@dataclass(frozen=True)
class Case:
    """One setting (or settings that only show together), and what it must change."""

    fields: tuple[str, ...]
    settings: Callable[[World], dict[str, Any]]
    check: Check
    name: str = ""
    path: str = "/echo"
    headers: tuple[str, ...] = ()  # fields of the request
    credentials: tuple[str, ...] = ()  # on the CONNECT, or on the absolute-form request
    routes: frozenset[str] = ALL
    upstream: str = (
        "origin"  # "origin" (in the clear, or TLS when intercepted), "tls", "unanswered"
    )
    host: str = HOST
    source: str = "127.0.0.1"
    before: Callable[[Seen], Awaitable[None]] | None = None  # runs before the checked request
    keep_alive: bool = False
    whole_head: bool = True

    @property
    def id(self) -> str:
        return self.name or "+".join(self.fields)


# -- one exchange on one route -------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader, method: bytes) -> Received | Rejected | None:
    """One response read with h11 as a strict client; Rejected if it breaks off."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    reading = ResponseReading(conn)
    try:
        while not reading.step():
            try:
                data = await asyncio.wait_for(reader.read(65536), 10)
            except ConnectionResetError:
                data = b""
            conn.receive_data(data)
    except h11.RemoteProtocolError as exc:
        return Rejected(str(exc))
    return reading.response


async def read_connect_answer(reader: asyncio.StreamReader) -> Received:
    """The answer to a CONNECT: a 200 head, or a refusal with a Content-Length body."""
    status_line, *lines = (await asyncio.wait_for(read_head(reader), 10)).split(b"\r\n")
    fields = [
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(b":") for line in lines if line)
    ]
    length = int(dict(fields).get(b"content-length", b"0"))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    _, status, reason = status_line.split(b" ", 2)
    return Received(int(status), reason, fields, body)


def request_head(target: str, authority: str, fields: tuple[str, ...], close: bool) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {authority}", *fields]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upstream_port(route: str, case: Case, world: World) -> int:
    if case.upstream == "unanswered":
        return world.unanswered
    if case.upstream == "tls" or route == INTERCEPTED:
        return world.tls.port
    return world.plain.port


def route_settings(route: str, case: Case, world: World, port: int) -> dict[str, Any]:
    """What makes the route: the CONNECT port's mode, and the CA for interception."""
    common = {"dns_servers": (world.dns.address,), "upstream_ca_file": world.upstream_ca_file}
    if route == CONNECT_HTTP:
        return common | {"connect_ports": (), "connect_http_ports": (port,)}
    if route == INTERCEPTED:
        return common | {
            "connect_ports": (port,),
            "connect_http_ports": (),
            "intercept": (case.host,),
            "ca_cert": world.ca_cert,
            "ca_key": world.ca_key,
        }
    return common


async def exchange(
    seen: Seen, path: str | None = None, headers: tuple[str, ...] | None = None
) -> Seen:
    """One request on the case's route; fills in (a copy of) ``seen`` with what came back."""
    case, route = seen.case, seen.route
    assert seen.proxy.server.proxy_address is not None
    reader, writer = await asyncio.open_connection(
        HOST, seen.proxy.port, local_addr=(case.source, 0)
    )
    authority = f"{case.host}:{seen.port}"
    path = case.path if path is None else path
    fields = case.headers if headers is None else headers
    result = dataclasses.replace(seen, response=None)
    try:
        if route == ABSOLUTE:
            target, fields = f"http://{authority}{path}", (*case.credentials, *fields)
        else:
            lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", *case.credentials]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            answer = await read_connect_answer(reader)
            if answer.status != 200:
                result.response = answer
                return result
            if route == INTERCEPTED:
                await asyncio.wait_for(
                    writer.start_tls(seen.world.ca_context, server_hostname=case.host), 10
                )
            target = path
        head = request_head(target, authority, fields, close=not case.keep_alive)
        writer.write(head if case.whole_head else head[:-2])  # without the blank line
        result.response = await read_response(reader, b"GET")
        if case.keep_alive:
            result.closed = await asyncio.wait_for(reader.read(1), 5) == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 5)
    return result


# -- the checks -----------------------------------------------------------------------------------


async def goes_upstream_over_tls(seen: Seen) -> None:
    seen.ok()  # the origin speaks TLS only: a 200 came over TLS
    assert (await seen.access())["scheme"] == "https"


def refused(status: int, error: str) -> Check:
    async def check(seen: Seen) -> None:
        seen.refused(status, error)

    return check


async def served(seen: Seen) -> None:
    seen.ok()


async def via_names_us(seen: Seen) -> None:
    echoed = seen.ok()
    assert ["Via", f"1.1 {PSEUDONYM}"] in echoed["headers"]


async def request_id_both_ways(seen: Seen) -> None:
    echoed = seen.ok()
    assert seen.answer().field(b"x-walk-id") == [b"walk-1"]
    assert ["X-Walk-Id", "walk-1"] in echoed["headers"]


async def query_logged(seen: Seen) -> None:
    seen.ok()
    assert (await seen.access())["path"] == "/echo?q=1"


async def counted_as_other(seen: Seen) -> None:
    seen.ok()
    await seen.access()
    assert seen.requests("other") == 1
    assert seen.requests(seen.label) is None


async def keeps_its_label(seen: Seen) -> None:
    seen.ok()
    await seen.access()
    assert seen.requests(seen.label) == 1


async def label_expires(seen: Seen) -> None:
    seen.ok()
    await seen.access()
    if seen.route != ABSOLUTE:
        await seen.logs.wait_for("tunnel")  # the CONNECT uses the label too, when it ends
    assert seen.requests(seen.label) == 1
    await asyncio.sleep(0.5)
    assert seen.requests(seen.label) is None


async def not_observed(seen: Seen) -> None:
    seen.ok()
    await asyncio.sleep(0.2)  # an access line would be written by now
    assert seen.logs.events("access") == []
    assert seen.requests(seen.label) is None


async def own_buckets(seen: Seen) -> None:
    seen.ok()
    await seen.access()
    sample = seen.proxy.sample
    assert sample("proxy_upstream_ttfb_seconds_bucket", host=seen.label, le="30.0") == 1
    assert sample("proxy_upstream_ttfb_seconds_bucket", host=seen.label, le="0.0005") is None


def exemplar(present: bool) -> Check:
    async def check(seen: Seen) -> None:
        seen.ok()
        request_id = (await seen.access())["request_id"]
        assert (f'request_id="{request_id}"' in await seen.scrape()) is present

    return check


async def read_idle_cut(seen: Seen) -> None:
    assert isinstance(seen.response, Rejected), seen.response  # the body broke off
    line = await seen.access()
    assert (line["status"], line["error"]) == (200, "connection_read_timeout")


def held(path: str) -> Callable[[Seen], Awaitable[None]]:
    """Start a request that holds an upstream connection until the origin has it."""

    async def before(seen: Seen) -> None:
        origin = seen.world.tls if seen.route == INTERCEPTED else seen.world.plain
        seen.world.background.append(asyncio.ensure_future(exchange(seen, path)))
        await until(lambda: len(origin.peers) >= 1)

    return before


async def one_before_then_idle(seen: Seen) -> None:
    """One whole exchange, then a pause past --upstream-keepalive-timeout."""
    (await exchange(seen)).ok()
    await asyncio.sleep(0.6)


async def new_connection_each(seen: Seen) -> None:
    seen.ok()
    origin = seen.world.tls if seen.route == INTERCEPTED else seen.world.plain
    assert len(origin.peers) == 2


async def looked_up_again(seen: Seen) -> None:
    """Every connection's lookup runs: none is answered from the proxy's cache.

    The DNS server is still asked only once (one A and one AAAA query): c-ares keeps answers
    for their record's TTL (60 s here), which no setting turns off (docs/settings.md).
    """
    seen.ok()
    await asyncio.wait_for(asyncio.gather(*seen.world.background), 10)
    tunnels = 0 if seen.route == ABSOLUTE else len(await seen.logs.wait_for("tunnel", 2))
    sample = seen.proxy.sample
    # Each connection's lookup, and each CONNECT's own.
    assert sample("proxy_upstream_dns_seconds_count", host=seen.label) == 2 + tunnels
    assert sample("proxy_upstream_dns_cache_total", host=seen.label, result="hit") is None
    assert seen.world.dns.queries == [NAME, NAME]


async def resolved_by_our_dns(seen: Seen) -> None:
    seen.ok()
    assert NAME in seen.world.dns.queries


async def unsampled_before(seen: Seen) -> None:
    (await exchange(seen, headers=())).ok()


async def exported(seen: Seen) -> None:
    seen.ok()
    await seen.access()
    otlp = seen.world.otlp
    await until(lambda: any("http.request.method" in attributes(s) for s in otlp.spans()), 10)
    names = [
        plain.value.string_value
        for message in otlp.requests
        for spans in message.resource_spans
        for plain in spans.resource.attributes
        if plain.key == "service.name"
    ]
    assert set(names) == {PSEUDONYM}


async def only_the_sampled_trace(seen: Seen) -> None:
    seen.ok()
    otlp = seen.world.otlp
    trace_id = bytes.fromhex(SAMPLED.split("-")[1])
    await until(lambda: any(s.trace_id == trace_id for s in otlp.spans()), 10)
    assert {span.trace_id for span in otlp.spans()} == {trace_id}


async def credentials_not_forwarded(seen: Seen) -> None:
    echoed = seen.ok()
    assert not [f for f in echoed["headers"] if f[0].lower() == "proxy-authorization"]


async def closed_when_idle(seen: Seen) -> None:
    seen.ok()
    assert seen.closed


def basic(credential: Credential) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(credential.token).decode()


def otlp(world: World, **changes: Any) -> dict[str, Any]:
    return {"otlp_endpoint": world.otlp.endpoint, "otlp_export_interval": 0.1, **changes}


CASES = [
    Case(
        ("upgrade_to_https",),
        lambda w: {"upgrade_to_https": (HOST,)},
        goes_upstream_over_tls,
        upstream="tls",
        routes=HTTP_TARGETS,  # inside an intercepted CONNECT the target is https:// already
        headers=("Authorization: Bearer never-in-the-clear",),
    ),
    Case(
        ("upstream_ca_file",),
        lambda w: {"upstream_ca_file": "", "upgrade_to_https": (HOST,)},
        refused(502, "tls_certificate_error"),
        upstream="tls",
    ),
    Case(
        ("deny_destinations",),
        lambda w: {"deny_destinations": parse_deny_destinations("[::ffff:127.0.0.1]")},
        refused(403, "destination_ip_prohibited"),
    ),
    Case(
        ("allow_destinations",),
        lambda w: {
            "deny_destinations": parse_deny_destinations("127.0.0.0/8"),
            "allow_destinations": ("127.0.0.1/32",),
        },
        served,
    ),
    Case(("via_pseudonym",), lambda w: {"via_pseudonym": PSEUDONYM}, via_names_us),
    Case(
        ("via_pseudonym",),
        lambda w: {"via_pseudonym": PSEUDONYM},
        refused(508, "proxy_loop_detected"),
        name="via_pseudonym-loop",
        headers=(f"Via: 1.1 {PSEUDONYM}",),
    ),
    Case(
        ("request_id_header",),
        lambda w: {"request_id_header": "X-Walk-Id"},
        request_id_both_ways,
        headers=("X-Walk-Id: walk-1",),
    ),
    Case(("log_query",), lambda w: {"log_query": True}, query_logged, path="/echo?q=1"),
    Case(("max_hosts",), lambda w: {"max_hosts": 0}, counted_as_other),
    Case(("track_hosts",), lambda w: {"max_hosts": 0, "track_hosts": (HOST,)}, keeps_its_label),
    Case(("host_label_ttl",), lambda w: {"host_label_ttl": 0.2}, label_expires),
    Case(("observe",), lambda w: {"observe": False}, not_observed),
    Case(("histogram_buckets",), lambda w: {"histogram_buckets": (0.005, 30.0)}, own_buckets),
    Case(("exemplars",), lambda w: {"exemplars": True}, exemplar(present=True)),
    Case(
        ("exemplars",),
        lambda w: {"exemplars": False},
        exemplar(present=False),
        name="exemplars-off",
    ),
    Case(
        ("response_headers_timeout",),
        lambda w: {"response_headers_timeout": 0.2},
        refused(504, "http_response_timeout"),
        path="/slow-headers?ms=1000",
    ),
    Case(
        ("read_idle_timeout",),
        lambda w: {"read_idle_timeout": 0.3},
        read_idle_cut,
        path="/stream?size=200000&delay_ms=1000",
    ),
    Case(
        ("connect_timeout",),
        lambda w: {"connect_timeout": 0.3},
        refused(504, "connection_timeout"),
        upstream="unanswered",
    ),
    Case(
        ("pool_limit", "pool_wait_timeout"),
        lambda w: {"pool_limit": 1, "pool_wait_timeout": 0.3},
        refused(503, "connection_limit_reached"),
        before=held("/slow-headers?ms=1000"),
    ),
    Case(
        ("pool_limit_per_host",),
        lambda w: {"pool_limit_per_host": 1, "pool_wait_timeout": 0.3},
        refused(503, "connection_limit_reached"),
        before=held("/slow-headers?ms=1000"),
    ),
    Case(
        ("upstream_keepalive_timeout",),
        lambda w: {"upstream_keepalive_timeout": 0.2},
        new_connection_each,
        before=one_before_then_idle,
    ),
    Case(("dns_servers",), lambda w: {}, resolved_by_our_dns, host=NAME),
    Case(
        ("dns_timeout",),
        lambda w: {"dns_timeout": 0.3},
        refused(504, "dns_timeout"),
        host=SILENT,
    ),
    Case(
        ("dns_cache_ttl",),
        lambda w: {"dns_cache_ttl": 0},
        looked_up_again,
        host=NAME,
        before=held("/slow-headers?ms=500"),  # so the checked request needs a new connection
    ),
    Case(
        ("otlp_endpoint", "otlp_service_name"),
        lambda w: otlp(w, otlp_service_name=PSEUDONYM),
        exported,
    ),
    Case(
        ("otlp_sample_ratio",),
        lambda w: otlp(w, otlp_sample_ratio=0.0),
        only_the_sampled_trace,
        headers=(f"traceparent: {SAMPLED}",),
        before=unsampled_before,
    ),
    Case(
        ("allow_clients",),
        lambda w: {"allow_clients": ("127.0.0.1/32",)},
        refused(403, "http_request_denied"),
        source="127.0.0.2",
    ),
    Case(
        ("proxy_auth",),
        lambda w: {"proxy_auth": USER},
        refused(407, "http_request_denied"),
    ),
    Case(
        ("proxy_auth_file",),
        lambda w: {"proxy_auth_file": (USER,)},
        credentials_not_forwarded,
        credentials=(basic(USER),),
    ),
    Case(
        ("max_request_header_size",),
        lambda w: {"max_request_header_size": 2048},
        refused(431, "http_request_error"),
        headers=("X-Big: " + "a" * 4000,),
    ),
    Case(
        ("max_request_target_length",),
        lambda w: {"max_request_target_length": 100},
        refused(414, "http_request_error"),
        path="/echo?" + "a" * 200,
    ),
    Case(
        ("request_header_timeout",),
        lambda w: {"request_header_timeout": 0.3},
        refused(408, "http_request_error"),
        whole_head=False,
    ),
    Case(
        ("client_idle_timeout",),
        lambda w: {"client_idle_timeout": 0.3},
        closed_when_idle,
        keep_alive=True,
    ),
]

# Settings read apart from any request, each with where it acts instead.
NOT_PER_REQUEST = {
    "listen": "where the proxy listens",
    "admin_listen": "where /metrics listens",
    "live_page": "what the admin listener shows, not what a request carries (tests/test_page.py)",
    "log_format": "how the process writes its log, set once at start",
    "log_level": "how the process writes its log, set once at start",
    "event_loop": "the CLI's event loop (tests/test_cli.py)",
    "shutdown_grace": "shutdown (tests/test_shutdown.py)",
    "drain_timeout": "shutdown (tests/test_shutdown.py)",
    "max_client_connections": "client connections, before any request (tests/test_limits.py)",
    "connect_ports": "chooses the route: every case runs on it",
    "connect_http_ports": "chooses the route: every case runs on it",
    "intercept": "chooses the route: every case runs on it",
    "ca_cert": "chooses the route: every case runs on it",
    "ca_key": "chooses the route: every case runs on it",
    "intercept_splice_seconds": "a host whose client refused our CA is tunnelled: no request",
    # HTTP/2 streams are routes of their own that this walk (HTTP/1.1 on the wire) does not
    # take yet; test_h2_server.py and test_grpc.py run them.
    "http2": "chooses whether HTTP/2 is served inside a CONNECT (tests/test_h2_server.py)",
    "http2_max_concurrent_streams": "streams per client HTTP/2 connection (test_h2_core.py)",
    "tunnel_idle_timeout": "the relay after a 200 to CONNECT or a 101 (test_tunnelling, _upgrade)",
    "otlp_batch_size": "how the exporter batches, apart from any request",
    "otlp_queue_size": "how the exporter batches, apart from any request",
    "otlp_export_interval": "how the exporter batches, apart from any request",
    "otlp_export_timeout": "how the exporter sends, apart from any request",
}


def test_every_setting_is_walked_or_said_to_touch_no_request() -> None:
    """Each Settings field is in a case of the walk or in NOT_PER_REQUEST, never in both."""
    walked = {name for case in CASES for name in case.fields}
    assert walked.isdisjoint(NOT_PER_REQUEST)
    assert walked | set(NOT_PER_REQUEST) == set(Settings.__dataclass_fields__)


@pytest.mark.parametrize(
    ("case", "route"),
    [
        pytest.param(case, route, id=f"{case.id}-{route}")
        for case in CASES
        for route in ROUTES
        if route in case.routes
    ],
)
async def test_every_request_setting_holds_on_every_route(
    start_proxy: StartProxy, world: World, logs: LogCapture, case: Case, route: str
) -> None:
    """The setting changes what it should, absolute-form, inside CONNECT and intercepted alike."""
    port = upstream_port(route, case, world)
    proxy = await start_proxy(**(route_settings(route, case, world, port) | case.settings(world)))
    seen = Seen(route, case, world, proxy, logs, port, None)
    try:
        if case.before is not None:
            await case.before(seen)
        await case.check(await exchange(seen))
    finally:
        for task in world.background:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
