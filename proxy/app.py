"""Wiring: the proxy application, the admin application, and their shared state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import aiohttp
from aiohttp import web
from structlog.typing import FilteringBoundLogger
from yarl import URL

from proxy.config import Settings
from proxy.observe import log
from proxy.observe.exposition import Exposition
from proxy.observe.metrics import Metrics
from proxy.observe.outcome import Observer
from proxy.observe.spans import SpanRecorder
from proxy.observe.tracing import trace_config
from proxy.rules import errors, headers, policy
from proxy.rules.connect import ConnectMode
from proxy.rules.errors import ProxyError
from proxy.rules.hostpatterns import HostPatterns
from proxy.rules.request_id import new_request_id
from proxy.rules.target import TargetError, absolute_target, forward_target, inner_target
from proxy.tls.certs import CertificateAuthority
from proxy.tls.contexts import ServerContexts, upstream_context
from proxy.tls.intercept import Inspector, InterceptPolicy
from proxy.wire import obs_text
from proxy.wire.forwarding import SKIP_AUTO_HEADERS, Forwarder, strip_added_defaults
from proxy.wire.guard import CheckedConnector, CheckedResolver, ClientGate, Denial
from proxy.wire.inner import InnerStream
from proxy.wire.interim import Continue, InterimResponse, defer_expectation
from proxy.wire.limits import inner_stream
from proxy.wire.tunnelling import (
    Relays,
    SessionResolver,
    StreamInspector,
    Tunneller,
    TunnelObserver,
    TunnelRecord,
    TunnelTargetError,
    tunnel_target,
)


class Lifecycle:
    """Readiness and in-flight bookkeeping for graceful shutdown (no I/O here)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False  # /readyz answers 503; requests are still served
        self.refusing = False  # after the grace period: new requests get 503
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def __repr__(self) -> str:
        return (
            f"<Lifecycle in_flight={self.in_flight} draining={self.draining} "
            f"refusing={self.refusing}>"
        )


SETTINGS: Final = web.AppKey("settings", Settings)
EXPOSITION: Final = web.AppKey("exposition", Exposition)
METRICS: Final = web.AppKey("metrics", Metrics)
LIFECYCLE: Final = web.AppKey("lifecycle", Lifecycle)
LOGGER: Final = web.AppKey("logger", FilteringBoundLogger)
SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
FORWARDER: Final = web.AppKey("forwarder", Forwarder)
TUNNELLER: Final = web.AppKey("tunneller", Tunneller)
GATE: Final = web.AppKey("gate", ClientGate)
OWN_ADDRESSES: Final = web.AppKey("own_addresses", policy.OwnAddresses)
SPANS: Final = web.AppKey("spans", SpanRecorder)  # present only when spans are exported
UPGRADE: Final = web.AppKey("upgrade_to_https", HostPatterns)
INTERCEPT: Final = web.AppKey("intercept", InterceptPolicy)
INSPECTOR: Final = web.AppKey("inspector", Inspector)

# A request line's bytes beside its target: method, spaces, version, CRLF.
_REQUEST_LINE_FRAME: Final = 32

NOT_A_PROXY_REQUEST: Final = ProxyError(
    400,
    "http_request_error",
    "this is a forward proxy: send absolute-form requests (GET http://host/path or "
    "GET https://host/path) or "
    "CONNECT; its own endpoints are /metrics, /healthz and /readyz",
)
BAD_TARGET: Final = ProxyError(400, "http_request_error", "")
SHUTTING_DOWN: Final = ProxyError(503, "proxy_internal_response", "the proxy is shutting down")
ORIGIN_FORM: Final = "origin_form"  # the proxy_denied_total reason of NOT_A_PROXY_REQUEST
# RFC 9110 §10.1.1: a server may answer 417 to an expectation it does not support.
EXPECTATION_FAILED: Final = ProxyError(
    417, "http_request_error", "only Expect: 100-continue is supported"
)

# -- local endpoints: the same handlers on the admin listener and the proxy listener ----------


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    return await request.app[EXPOSITION](request)


async def healthz_endpoint(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz_endpoint(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        return web.Response(status=503, text="draining\n")
    return web.Response(text="ready\n")


LOCAL_ROUTES: Final = (
    ("/metrics", metrics_endpoint),
    ("/healthz", healthz_endpoint),
    ("/readyz", readyz_endpoint),
)


ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def _add_local_routes(app: web.Application, expect: ExpectHandler = defer_expectation) -> None:
    for path, handler in LOCAL_ROUTES:
        app.router.add_get(path, handler, expect_handler=expect)


# -- the proxy listener ----------------------------------------------------------------------


def _reject(
    request: web.Request,
    err: ProxyError,
    refused: str,
    *,
    close: bool = False,
    details: str | None = None,
) -> web.Response:
    """Answer a request the proxy will not forward, count it by ``refused``, and log why.

    Every answer the proxy gives itself on a parsed request comes through here (those to
    heads that did not parse, through ``proxy.wire.limits``): one count, one log line.
    """
    settings = request.app[SETTINGS]
    request.app[METRICS].denied(refused)
    request_id = new_request_id()
    response = errors.error_response(err, settings.via_pseudonym, details, close=close)
    response.headers[settings.request_id_header] = request_id
    request.app[LOGGER].info(
        "rejected",
        request_id=request_id,
        client=request.remote,
        method=request.method,
        status=err.status,
        error=err.error,
        refused=refused,
        reason=err.text,
    )
    return response


def _deny(request: web.Request, denial: Denial) -> web.Response:
    # After a refused CONNECT, what the client sends next is not HTTP: close.
    close = denial.close or request.method == "CONNECT"
    response = _reject(request, denial.error, denial.reason, close=close)
    response.headers.update(denial.headers)
    return response


async def _not_a_proxy_request(request: web.Request) -> web.StreamResponse:
    return _reject(request, NOT_A_PROXY_REQUEST, ORIGIN_FORM)


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """The proxy listener's expect handler: 100-continue is deferred (``proxy.wire.interim``),
    any other expectation refused with 417 and counted like the proxy's other answers."""
    try:
        await defer_expectation(request)
    except web.HTTPExpectationFailed:
        return _reject(request, EXPECTATION_FAILED, "unsupported_expectation")
    return None


@web.middleware
async def dispatch(request: web.Request, handler: Any) -> web.StreamResponse:
    """Route by request form: CONNECT is tunnelled, absolute-form forwarded, origin-form ours.

    A 100 Continue the client waits for goes out only when the upstream reads the body; an
    answer that comes first withdraws it (RFC 9110 §10.1.1).
    """
    expect = Continue(request)
    response = await _dispatch(request, handler, expect)
    if not response.prepared:
        expect.withdraw(response)
    return response


async def _dispatch(request: web.Request, handler: Any, expect: Continue) -> web.StreamResponse:
    # On a stream inside a CONNECT (proxy.tls.intercept) every request is forwarded to the
    # CONNECT's target; its proxy credentials were checked on the CONNECT.
    stream = inner_stream(request)
    url = absolute_target(request) if stream is None else request._message.url
    proxied = url is not None or request.method == "CONNECT"
    denial = request.app[GATE](request, proxied=proxied and stream is None)
    if denial is not None:
        return _deny(request, denial)
    if not proxied:
        if request.method in ("GET", "HEAD") and request.path in _LOCAL_PATHS:
            response: web.StreamResponse = await handler(request)
            return response
        return _reject(request, NOT_A_PROXY_REQUEST, ORIGIN_FORM)
    lifecycle = request.app[LIFECYCLE]
    if lifecycle.refusing:
        return _reject(request, SHUTTING_DOWN, "shutting_down", close=True)
    lifecycle.enter()  # tunnels count too: the drain waits for them
    try:
        if url is None:
            response = await _tunnel(request)
        else:
            response = await _forward(request, url, expect, stream)
    finally:
        lifecycle.leave()
    if lifecycle.draining:
        # A head sent before the drain said keep-alive: still close after this response.
        response.force_close()
    return response


async def _forward(
    request: web.Request, url: URL, expect: Continue, stream: InnerStream | None
) -> web.StreamResponse:
    version = (request.version.major, request.version.minor)
    websocket = headers.websocket_handshake(request.method, version, request.raw_headers)
    try:
        if stream is None:
            target = forward_target(url, request.app[UPGRADE], websocket=websocket)
        else:
            target = inner_target(stream.origin, url, websocket=websocket)
    except TargetError as exc:
        return _reject(request, BAD_TARGET.with_text(str(exc)), exc.reason)
    return await request.app[FORWARDER](request, target, expect)


async def _tunnel(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    try:
        # For CONNECT the raw target is the authority-form host:port (RFC 9112 §3.2.3).
        target = tunnel_target(
            request.raw_path, settings.connect_ports, settings.connect_http_ports
        )
    except TunnelTargetError as exc:
        # Closed: what a client sends after a refused CONNECT is not HTTP.
        return _reject(request, exc.error, exc.reason, close=True, details=exc.details)
    return await request.app[TUNNELLER](request, target, request.app[INTERCEPT].mode(target))


def _counted_by_requests(inspector: Inspector) -> StreamInspector:
    """While a stream inside a CONNECT is served, its requests count as in flight, not it.

    An idle intercepted keep-alive connection must not hold the drain up; its in-flight
    request does, through dispatch.
    """

    async def inspect(request: web.Request, record: TunnelRecord, mode: ConnectMode) -> None:
        lifecycle = request.app[LIFECYCLE]
        lifecycle.leave()
        try:
            await inspector(request, record, mode)
        finally:
            lifecycle.enter()

    return inspect


_LOCAL_PATHS: Final = frozenset(path for path, _ in LOCAL_ROUTES)


async def _on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    strip_added_defaults(response)
    if request.app[LIFECYCLE].draining:
        _last_on_its_connection(request, response)


def _last_on_its_connection(request: web.Request, response: web.StreamResponse) -> None:
    """RFC 9112 §9.6: a server going away says ``Connection: close`` and then closes, so the
    client's next request opens a connection elsewhere instead of meeting a closed one.

    Here, before the head is written, it covers every response: forwarded ones are
    prepared inside the handler, long before the middleware sees them.
    """
    if response.status == 101 or (request.method == "CONNECT" and 200 <= response.status < 300):
        return  # a WebSocket or a tunnel: its relay ends the connection when it is done
    response.force_close()
    response.headers["Connection"] = "close"  # set after aiohttp chose keep-alive or none


def build_resolver(settings: Settings) -> aiohttp.AsyncResolver:
    """aiodns with one try of ``dns_timeout``; explicit servers when configured."""
    if settings.dns_servers:
        return aiohttp.AsyncResolver(
            nameservers=list(settings.dns_servers), timeout=settings.dns_timeout, tries=1
        )
    return aiohttp.AsyncResolver(timeout=settings.dns_timeout, tries=1)


def build_session(settings: Settings, check: policy.DestinationCheck) -> aiohttp.ClientSession:
    """The one long-lived upstream session: pooled, traced, transparent, and checked.

    Every destination passes ``check``: the host before any lookup, then every address
    the resolver returns, so what is dialled is what was checked. https upstreams are
    verified against the system store plus ``--upstream-ca-file``.
    """
    connector = CheckedConnector(
        check,
        ssl=upstream_context(settings.upstream_ca_file or None),
        pool_wait_timeout=settings.pool_wait_timeout,
        limit=settings.pool_limit,
        limit_per_host=settings.pool_limit_per_host,
        keepalive_timeout=settings.upstream_keepalive_timeout,
        use_dns_cache=settings.dns_cache_ttl > 0,
        ttl_dns_cache=settings.dns_cache_ttl if settings.dns_cache_ttl > 0 else None,
        resolver=CheckedResolver(build_resolver(settings), check),
    )
    return aiohttp.ClientSession(
        connector=connector,
        trace_configs=[trace_config()] if settings.observe else [],
        timeout=aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.connect_timeout,
            # Until the response headers; forwarding switches it to read_idle_timeout.
            sock_read=settings.response_headers_timeout,
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        response_class=InterimResponse,  # 1xx reach the client (RFC 9110 §15.2)
        skip_auto_headers=SKIP_AUTO_HEADERS,
        trust_env=False,  # never route through our own HTTP_PROXY
        raise_for_status=False,
    )


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    destinations = policy.Destinations(
        deny=policy.Rules.parse(settings.deny_destinations),
        allow=policy.Rules.parse(settings.allow_destinations),
    )
    session = build_session(settings, policy.DestinationCheck(destinations, app[OWN_ADDRESSES]))
    metrics = app[METRICS]
    observer = (
        Observer(metrics, app[LOGGER], log_query=settings.log_query, exemplars=settings.exemplars)
        if settings.observe
        else None
    )
    app[SESSION] = session
    # CONNECT tunnels and WebSockets share one set of relays: counted alike, closed alike.
    relays = Relays(
        TunnelObserver(metrics, app[LOGGER], exemplars=settings.exemplars)
        if settings.observe
        else None
    )
    app[FORWARDER] = Forwarder(
        session,
        observer,
        relays,
        request_id_header=settings.request_id_header,
        via_pseudonym=settings.via_pseudonym,
        read_idle_timeout=settings.read_idle_timeout,
        spans=app.get(SPANS),
        tunnel_idle_timeout=settings.tunnel_idle_timeout,
    )
    app[TUNNELLER] = Tunneller(
        SessionResolver(session),
        relays,
        request_id_header=settings.request_id_header,
        via_pseudonym=settings.via_pseudonym,
        connect_timeout=settings.connect_timeout,
        idle_timeout=settings.tunnel_idle_timeout,
        spans=app.get(SPANS),
        inspector=_counted_by_requests(app[INSPECTOR]),
    )
    try:
        yield
    finally:
        await session.close()


async def _close_tunnels(app: web.Application) -> None:
    # Runs once the drain is over (or skipped): whatever is still open is cut now.
    app[TUNNELLER].close_all()


def build_proxy_app(
    settings: Settings,
    exposition: Exposition,
    metrics: Metrics,
    lifecycle: Lifecycle,
    own_addresses: policy.OwnAddresses,
    spans: SpanRecorder | None = None,
    ca: CertificateAuthority | None = None,
) -> web.Application:
    """The proxy listener's app; ``own_addresses`` is filled in once the listeners are bound.

    ``ca`` signs the certificates of intercepted hosts; without it nothing is intercepted.
    """
    obs_text.install()  # field values and reason phrases leave byte for byte
    app = web.Application(middlewares=[dispatch], handler_args={"auto_decompress": False})
    app[SETTINGS] = settings
    app[EXPOSITION] = exposition
    app[METRICS] = metrics
    app[LIFECYCLE] = lifecycle
    app[LOGGER] = log.get_logger()
    app[OWN_ADDRESSES] = own_addresses
    if spans is not None:
        app[SPANS] = spans
    app[UPGRADE] = HostPatterns(settings.upgrade_to_https)
    app[INTERCEPT] = InterceptPolicy(
        HostPatterns(settings.intercept),
        enabled=ca is not None,
        connect_ports=settings.connect_ports,
        http_ports=settings.connect_http_ports,
        splice_seconds=settings.intercept_splice_seconds,
    )
    app[INSPECTOR] = Inspector(
        ServerContexts(ca) if ca is not None else None,
        app[INTERCEPT],
        metrics,
        head_limit=settings.max_request_target_length + _REQUEST_LINE_FRAME,
        head_timeout=settings.request_header_timeout,
    )
    credentials = (settings.proxy_auth,) if settings.proxy_auth is not None else ()
    app[GATE] = ClientGate(
        policy.Rules.parse(settings.allow_clients),
        credentials + settings.proxy_auth_file,
    )
    _add_local_routes(app, _expect)
    # Absolute-form targets are dispatched by the middleware, but the router still looks
    # at their path first; a catch-all spares it building a 404 for each of them.
    app.router.add_route("*", "/{tail:.*}", _not_a_proxy_request, expect_handler=_expect)
    app.on_response_prepare.append(_on_response_prepare)
    app.cleanup_ctx.append(_upstream_session)
    app.on_shutdown.append(_close_tunnels)
    return app


def build_admin_app(exposition: Exposition, lifecycle: Lifecycle) -> web.Application:
    app = web.Application()
    app[EXPOSITION] = exposition
    app[LIFECYCLE] = lifecycle
    _add_local_routes(app)
    return app
