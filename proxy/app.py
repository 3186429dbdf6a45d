"""Wiring: the proxy listener's handler, the admin application, and their shared state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, cast

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from structlog.typing import FilteringBoundLogger
from yarl import URL

from proxy.config import Settings
from proxy.h2.core import Limits
from proxy.h2.server import H2Server
from proxy.h2.upstream import H2Upstream
from proxy.observe import log
from proxy.observe.exposition import Exposition
from proxy.observe.metrics import Metrics
from proxy.observe.outcome import Observer
from proxy.observe.page import LivePage
from proxy.observe.spans import SpanRecorder
from proxy.observe.tracing import trace_config
from proxy.rules import errors, headers, policy
from proxy.rules.connect import H2, H2C, HTTP1, ConnectMode
from proxy.rules.errors import ProxyError
from proxy.rules.hostpatterns import HostPatterns
from proxy.rules.request_id import new_request_id
from proxy.rules.target import TargetError, absolute_target, forward_target, inner_target
from proxy.tls.certs import CertificateAuthority
from proxy.tls.contexts import ALPN_H2, upstream_context
from proxy.tls.intercept import Inspector, InterceptPolicy, StreamServer, serve_http1
from proxy.wire import obs_text
from proxy.wire.forwarding import SKIP_AUTO_HEADERS, Forwarder, strip_added_defaults
from proxy.wire.guard import CheckedConnector, CheckedResolver, ClientGate, Denial
from proxy.wire.inner import InnerStream
from proxy.wire.interim import Continue, InterimResponse, defer_expectation
from proxy.wire.limits import GuardedRequestHandler, inner_stream
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
# RFC 9110 §9.3.6: CONNECT asks a proxy for a tunnel and carries no content. On the stream
# inside a CONNECT the proxy serves the origin's side: a tunnel in a tunnel is not forwarded.
NESTED_CONNECT: Final = ProxyError(
    403,
    "http_request_denied",
    "CONNECT is not forwarded inside a CONNECT; send it to the proxy on a connection of its own",
)
# RFC 9110 §10.1.1: a server may answer 417 to an expectation it does not support.
EXPECTATION_FAILED: Final = ProxyError(
    417, "http_request_error", "only Expect: 100-continue is supported"
)

# What serves the stream inside a CONNECT, by protocol id, in the order the proxy prefers:
# an intercepted client is offered these in ALPN (proxy.rules.connect.alpn_offer). These need
# nothing from a handler; ProxyHandler puts its HTTP/2 servers ("h2", "h2c") ahead of them.
STREAM_SERVERS: Final[dict[str, StreamServer]] = {HTTP1: serve_http1}

# -- local endpoints: the same handlers on the admin listener and the proxy listener ----------

Endpoint = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
ExpectHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse | None]]


class LocalEndpoints:
    """/metrics, /healthz and /readyz, answered from the exposition and the lifecycle."""

    def __init__(self, exposition: Exposition, lifecycle: Lifecycle) -> None:
        self._exposition = exposition
        self._lifecycle = lifecycle
        self.routes: Final[dict[str, Endpoint]] = {
            "/metrics": self.metrics,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }

    async def metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._exposition(request)

    async def healthz(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._lifecycle.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ready\n")

    def add_routes(self, app: web.Application, expect: ExpectHandler = defer_expectation) -> None:
        for path, endpoint in self.routes.items():
            app.router.add_get(path, endpoint, expect_handler=expect)

    def __repr__(self) -> str:
        return f"<LocalEndpoints {sorted(self.routes)}>"


# -- the proxy listener ----------------------------------------------------------------------


class ProxyRequest(web.BaseRequest):
    """A request on the proxy listener (built by ``ProxyHandler.make_request``).

    ``_prepare_hook`` is the one call aiohttp makes before every response head, error
    answers included; ``web.Application`` sends ``on_response_prepare`` from it, and so do
    we, for the requests that reached ``ProxyHandler`` (as the application did for the
    requests its router had matched).
    """

    ATTRS = web.BaseRequest.ATTRS | frozenset(["handled_by"])
    handled_by: ProxyHandler | None = None

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        if self.handled_by is not None:
            self.handled_by.on_response_prepare(self, response)


class ProxyHandler:
    """The proxy listener's handler on aiohttp's low-level ``web.Server``.

    Routes by request form: CONNECT is tunnelled, absolute-form forwarded, origin-form
    ours. No ``web.Application`` (router, middleware, signals) on the request path: it
    cost about 10% of the CPU per request (docs/performance.md). ``start()`` opens the
    upstream session; ``close_tunnels()`` and ``close()`` are the shutdown steps.

    A 100 Continue the client waits for goes out only when the upstream reads the body; an
    answer that comes first withdraws it (RFC 9110 §10.1.1).
    """

    def __init__(
        self,
        settings: Settings,
        exposition: Exposition,
        metrics: Metrics,
        lifecycle: Lifecycle,
        own_addresses: policy.OwnAddresses,
        spans: SpanRecorder | None = None,
        ca: CertificateAuthority | None = None,
    ) -> None:
        """``own_addresses`` is filled in once the listeners are bound; ``ca`` signs the
        certificates of intercepted hosts (without it nothing is intercepted)."""
        obs_text.install()  # field values and reason phrases leave byte for byte
        self.settings = settings
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.own_addresses = own_addresses
        self.spans = spans
        self.logger: FilteringBoundLogger = log.get_logger()
        self.local = LocalEndpoints(exposition, lifecycle)
        self.upgrade = HostPatterns(settings.upgrade_to_https)
        self.intercept = InterceptPolicy(
            HostPatterns(settings.intercept),
            enabled=ca is not None,
            connect_ports=settings.connect_ports,
            http_ports=settings.connect_http_ports,
            splice_seconds=settings.intercept_splice_seconds,
        )
        self.h2_limits = Limits(
            max_concurrent_streams=settings.http2_max_concurrent_streams,
            max_header_list=settings.max_request_header_size,
            max_header_block=settings.max_request_header_size,
        )
        # HTTP/2 streams come back to this handler, so its servers are bound here and passed
        # in (not registered in the module's table, which every handler shares); first, as
        # the ALPN preference. With --http2 false they are left out: an h2-only client is
        # spliced, and h2c is served by nothing.
        h2: dict[str, StreamServer] = (
            {H2: self._serve_h2, H2C: self._serve_h2} if settings.http2 else {}
        )
        self.inspector = Inspector(
            ca,
            self.intercept,
            metrics,
            servers={**h2, **STREAM_SERVERS},
            head_limit=settings.max_request_target_length + _REQUEST_LINE_FRAME,
            head_timeout=settings.request_header_timeout,
        )
        credentials = (settings.proxy_auth,) if settings.proxy_auth is not None else ()
        self.gate = ClientGate(
            policy.Rules.parse(settings.allow_clients),
            credentials + settings.proxy_auth_file,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self.session: aiohttp.ClientSession | None = None
        self._forwarder: Forwarder | None = None
        self._h2: H2Upstream | None = None
        self._tunneller: Tunneller | None = None

    def make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> ProxyRequest:
        """The server's request factory (what ``web.Server._make_request`` does)."""
        assert self._loop is not None, "start() first"
        return ProxyRequest(message, payload, protocol, writer, task, self._loop)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        cast(ProxyRequest, request).handled_by = self
        # What web.Application did before any middleware: the expect handler first.
        if request.headers.get("Expect"):
            answer = await self._expect(request)
            await request.writer.drain()
            if answer is not None:
                return answer
        expect = Continue(request)
        response = await self._dispatch(request, expect)
        if not response.prepared:
            expect.withdraw(response)
        return response

    async def _expect(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """100-continue is deferred (``proxy.wire.interim``), any other expectation refused
        with 417 and counted like the proxy's other answers."""
        try:
            await defer_expectation(request)
        except web.HTTPExpectationFailed:
            return self._reject(request, EXPECTATION_FAILED, "unsupported_expectation")
        return None

    async def _dispatch(self, request: web.BaseRequest, expect: Continue) -> web.StreamResponse:
        # On a stream inside a CONNECT (proxy.tls.intercept) every request is forwarded to the
        # CONNECT's target; its proxy credentials were checked on the CONNECT.
        stream = inner_stream(request)
        url = absolute_target(request) if stream is None else request._message.url
        proxied = url is not None or request.method == "CONNECT"
        denial = self.gate(request, proxied=proxied and stream is None)
        if denial is not None:
            return self._deny(request, denial)
        if not proxied:
            if request.method in ("GET", "HEAD"):
                endpoint = self.local.routes.get(request.path)
                if endpoint is not None:
                    return await endpoint(request)
            return self._reject(request, NOT_A_PROXY_REQUEST, ORIGIN_FORM)
        if stream is not None and request.method == "CONNECT":
            # Closed: what follows a CONNECT is not HTTP.
            return self._reject(request, NESTED_CONNECT, "nested_connect", close=True)
        lifecycle = self.lifecycle
        if lifecycle.refusing:
            return self._reject(request, SHUTTING_DOWN, "shutting_down", close=True)
        lifecycle.enter()  # tunnels count too: the drain waits for them
        try:
            if url is None:
                response = await self._tunnel(request)
            else:
                response = await self._forward(request, url, expect, stream)
        finally:
            lifecycle.leave()
        if lifecycle.draining:
            # A head sent before the drain said keep-alive: still close after this response.
            response.force_close()
        return response

    def _reject(
        self,
        request: web.BaseRequest,
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
        settings = self.settings
        self.metrics.denied(refused)
        request_id = new_request_id()
        response = errors.error_response(err, settings.via_pseudonym, details, close=close)
        response.headers[settings.request_id_header] = request_id
        self.logger.info(
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

    def _deny(self, request: web.BaseRequest, denial: Denial) -> web.Response:
        # After a refused CONNECT, what the client sends next is not HTTP: close.
        close = denial.close or request.method == "CONNECT"
        response = self._reject(request, denial.error, denial.reason, close=close)
        response.headers.update(denial.headers)
        return response

    async def _forward(
        self, request: web.BaseRequest, url: URL, expect: Continue, stream: InnerStream | None
    ) -> web.StreamResponse:
        version = (request.version.major, request.version.minor)
        websocket = headers.websocket_handshake(request.method, version, request.raw_headers)
        try:
            if stream is None:
                target = forward_target(url, self.upgrade, websocket=websocket)
            else:
                target = inner_target(stream.origin, url, self.upgrade, websocket=websocket)
        except TargetError as exc:
            return self._reject(request, BAD_TARGET.with_text(str(exc)), exc.reason)
        assert self._forwarder is not None, "start() first"
        return await self._forwarder(request, target, expect)

    async def _tunnel(self, request: web.BaseRequest) -> web.StreamResponse:
        settings = self.settings
        try:
            # For CONNECT the raw target is the authority-form host:port (RFC 9112 §3.2.3).
            target = tunnel_target(
                request.raw_path, settings.connect_ports, settings.connect_http_ports
            )
        except TunnelTargetError as exc:
            # Closed: what a client sends after a refused CONNECT is not HTTP.
            return self._reject(request, exc.error, exc.reason, close=True, details=exc.details)
        assert self._tunneller is not None, "start() first"
        return await self._tunneller(request, target, self.intercept.mode(target))

    def _counted_by_requests(self) -> StreamInspector:
        """While a stream inside a CONNECT is served, its requests count as in flight, not it.

        An idle intercepted keep-alive connection must not hold the drain up; its in-flight
        request does, through ``_dispatch``.
        """
        lifecycle = self.lifecycle
        inspector = self.inspector

        async def inspect(
            request: web.BaseRequest, record: TunnelRecord, mode: ConnectMode
        ) -> bytes | None:
            lifecycle.leave()
            try:
                return await inspector(request, record, mode)
            finally:
                lifecycle.enter()  # a splice that follows is in flight, as a tunnel is

        return inspect

    def _serve_h2(
        self, server_protocol: GuardedRequestHandler, stream: InnerStream
    ) -> asyncio.Protocol:
        """An HTTP/2 connection inside a CONNECT: its streams come back here, one request each."""
        count = self.metrics.http2_errors
        server = H2Server(self, self.make_request, stream, limits=self.h2_limits, on_error=count)
        guard = server_protocol.guard
        guard.track(server)  # a GOAWAY at the drain
        server.closed.add_done_callback(lambda _: guard.untrack(server))
        return server

    def on_response_prepare(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Before every response head (``ProxyRequest._prepare_hook``)."""
        strip_added_defaults(response)
        if self.lifecycle.draining:
            _last_on_its_connection(request, response)

    async def start(self) -> None:
        """Open the upstream session and build the forwarder and the tunneller on it."""
        self._loop = asyncio.get_running_loop()
        settings = self.settings
        destinations = policy.Destinations(
            deny=policy.Rules.parse(settings.deny_destinations),
            allow=policy.Rules.parse(settings.allow_destinations),
        )
        session = build_session(settings, policy.DestinationCheck(destinations, self.own_addresses))
        metrics = self.metrics
        observer = (
            Observer(
                metrics, self.logger, log_query=settings.log_query, exemplars=settings.exemplars
            )
            if settings.observe
            else None
        )
        self.session = session
        # CONNECT tunnels and WebSockets share one set of relays: counted alike, closed alike.
        relays = Relays(
            TunnelObserver(metrics, self.logger, exemplars=settings.exemplars)
            if settings.observe
            else None
        )
        self._h2 = (
            H2Upstream(
                session,
                upstream_context(settings.upstream_ca_file or None, alpn=ALPN_H2),
                limits=Limits(max_header_list=settings.max_request_header_size),
                read_idle_timeout=settings.read_idle_timeout,
                headers_timeout=settings.response_headers_timeout,
                pool_wait_timeout=settings.pool_wait_timeout,
                keepalive_timeout=settings.upstream_keepalive_timeout,
            )
            if settings.http2
            else None
        )
        self._forwarder = Forwarder(
            session,
            observer,
            relays,
            request_id_header=settings.request_id_header,
            via_pseudonym=settings.via_pseudonym,
            read_idle_timeout=settings.read_idle_timeout,
            spans=self.spans,
            tunnel_idle_timeout=settings.tunnel_idle_timeout,
            h2=self._h2,
        )
        self._tunneller = Tunneller(
            SessionResolver(session),
            relays,
            request_id_header=settings.request_id_header,
            via_pseudonym=settings.via_pseudonym,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.tunnel_idle_timeout,
            spans=self.spans,
            inspector=self._counted_by_requests(),
        )

    def close_tunnels(self) -> None:
        # Runs once the drain is over (or skipped): whatever is still open is cut now.
        if self._tunneller is not None:
            self._tunneller.close_all()

    async def close(self) -> None:
        if self._h2 is not None:
            await self._h2.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    def __repr__(self) -> str:
        state = "open" if self.session is not None else "closed"
        return f"<ProxyHandler session={state} {self.gate!r} {self.lifecycle!r}>"


def _last_on_its_connection(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """RFC 9112 §9.6: a server going away says ``Connection: close`` and then closes, so the
    client's next request opens a connection elsewhere instead of meeting a closed one.

    Here, before the head is written, it covers every response: forwarded ones are
    prepared inside the handler, long before ``_dispatch`` sees them.
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


def build_admin_app(
    exposition: Exposition, lifecycle: Lifecycle, page: LivePage | None = None
) -> web.Application:
    """The admin listener's app: the local endpoints (off the request path), and the live
    page when it is on. The page is not a local endpoint: the proxy listener never serves it."""
    app = web.Application()
    LocalEndpoints(exposition, lifecycle).add_routes(app)
    if page is not None:
        page.add_routes(app)
    return app
