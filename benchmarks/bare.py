"""The floor reference for ``make bench``: a forward proxy made of aiohttp and nothing else.

uvloop, aiohttp's low-level ``web.Server``, one pooled ``ClientSession``, a streamed
``StreamResponse``; hop-by-hop fields dropped, nothing else checked. With ``--trace``, an
11-signal ``TraceConfig`` times each request and feeds prometheus-client histograms per
host (served on ``/metrics``), which is what tracing costs before any proxy logic.
Not a proxy to deploy: no limits, no policy, no logging. Prints its port when ready.
"""

from __future__ import annotations

import argparse
import asyncio
from time import perf_counter
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from yarl import URL

# RFC 9110 §7.6.1 hop-by-hop fields; on requests also what the client library sets itself.
_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "proxy-authorization", "proxy-authenticate"}
)
_REQUEST_DROP: Final = _HOP | {"host", "content-length"}
_SIGNALS: Final = (
    "on_request_start",
    "on_request_headers_sent",
    "on_request_end",
    "on_connection_queued_start",
    "on_connection_queued_end",
    "on_connection_create_start",
    "on_connection_create_end",
    "on_connection_reuseconn",
    "on_dns_resolvehost_start",
    "on_dns_resolvehost_end",
    "on_dns_cache_hit",
)


class Histograms:
    """Per-host phase histograms fed from trace signals (the stamps land in a plain dict)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.ttfb = Histogram("bare_ttfb_seconds", "ttfb", ["host"], registry=registry)
        self.total = Histogram("bare_total_seconds", "total", ["host"], registry=registry)

    def trace_config(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()
        for name in _SIGNALS:
            getattr(config, name).append(_stamp(name))
        config.freeze()
        return config


def _stamp(name: str) -> Any:
    async def record(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.trace_request_ctx[name] = perf_counter()

    return record


class Forward:
    def __init__(self, session: aiohttp.ClientSession, histograms: Histograms | None) -> None:
        self._session = session
        self._histograms = histograms

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        url: URL = request._message.url
        if not url.absolute:
            return await self._local(request)
        start = perf_counter()
        stamps: dict[str, float] = {}
        fields = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP
        )
        body = request.content if request.body_exists else None
        async with self._session.request(
            request.method,
            url,
            headers=fields,
            data=body,
            allow_redirects=False,
            trace_request_ctx=stamps,
        ) as up:
            out = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in _HOP)
            response = web.StreamResponse(status=up.status, reason=up.reason, headers=out)
            try:
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionError:  # the client left (wrk stops, before or mid-download)
                return response
        if self._histograms is not None:
            host = url.host or ""
            sent = stamps.get("on_request_headers_sent", start)
            self._histograms.ttfb.labels(host).observe(stamps["on_request_end"] - sent)
            self._histograms.total.labels(host).observe(perf_counter() - start)
        return response

    async def _local(self, request: web.BaseRequest) -> web.Response:
        if self._histograms is None or request.path != "/metrics":
            return web.Response(status=404)
        body = generate_latest(self._histograms.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def as_application(forward: Forward) -> web.Application:
    """The same forwarder behind web.Application: a middleware, a catch-all route, a signal.

    The layout ours uses; the difference to ``web.Server`` is what the framework costs.
    """

    @web.middleware
    async def dispatch(request: web.Request, handler: Any) -> web.StreamResponse:
        return await forward(request)

    async def unused(request: web.Request) -> web.StreamResponse:
        raise AssertionError("dispatched by the middleware")

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.popall("X-Never-There", None)

    app = web.Application(middlewares=[dispatch], handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", unused)
    app.on_response_prepare.append(on_prepare)
    return app


async def main(port: int, trace: bool, application: bool) -> None:
    histograms = Histograms(CollectorRegistry()) if trace else None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        trace_configs=[histograms.trace_config()] if histograms else None,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
    )
    forward = Forward(session, histograms)
    if application:
        runner = web.AppRunner(as_application(forward), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        print(runner.addresses[0][1], flush=True)
    else:
        server = web.Server(forward, access_log=None, auto_decompress=False)
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(server, "127.0.0.1", port, backlog=1024)
        print(listener.sockets[0].getsockname()[1], flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--application", action="store_true", help="behind web.Application")
    options = parser.parse_args()
    uvloop.run(main(options.port, options.trace, options.application))
