"""Listeners and graceful shutdown, usable from the CLI, the tests and the benchmark.

aiohttp's own run_app shutdown drops bytes that clients send after the signal (uploads
and tunnels stall), so draining is ours: keep serving through a grace period, then
refuse new requests while the in-flight ones finish, and only then close the listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from types import TracebackType

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector

from proxy.app import Lifecycle, ProxyHandler, build_admin_app
from proxy.config import Address, Settings
from proxy.observe import log
from proxy.observe.exposition import Exposition, RegistryView
from proxy.observe.metrics import HostLabelLimits, Metrics
from proxy.observe.page import LivePage
from proxy.observe.spans import SpanQueue, SpanRecorder, TraceIdRatio
from proxy.rules.hostpatterns import HostPatterns
from proxy.rules.policy import OwnAddresses
from proxy.tls.certs import CertificateAuthority
from proxy.wire.limits import ClientLimits, GuardedRunner, GuardedServer, ListenerGuard
from proxy.wire.otlp import SpanExporter

# Backstop for handlers still running after the drain: aiohttp waits twice this long.
_FINAL_SHUTDOWN_TIMEOUT = 1.0

# Connections the kernel may hold before we accept them (capped by net.core.somaxconn).
# aiohttp's default of 128 overflowed when a few hundred clients connected at once (the
# soak): handshakes were dropped and clients saw resets, closes and stalls.
_LISTEN_BACKLOG = 1024


class ListenError(Exception):
    """A listener could not bind; names the setting so the operator knows what to change."""

    def __init__(self, field: str, address: Address, exc: OSError) -> None:
        self.field = field
        self.address = address
        # asyncio rewraps the bind error's text; errno keeps the plain reason.
        self.reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(f"cannot listen on {address}: {self.reason.lower()}")


class ProxyServer:
    """The proxy listener plus the optional admin listener, started and stopped together."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.lifecycle = Lifecycle()
        # The live page lives on the admin listener: without one, no rings are kept for it.
        live = settings.live_page and settings.admin_listen is not None
        self.metrics = Metrics(
            settings.histogram_buckets,
            HostLabelLimits(
                settings.max_hosts, HostPatterns(settings.track_hosts), settings.host_label_ttl
            ),
            live=live,
        )
        # Collectors other than ours (process, span export): prometheus-client encodes
        # them into /metrics after our families. The registry holds both.
        self.others = CollectorRegistry()
        ProcessCollector(registry=self.others)
        self.exposition = Exposition(self.metrics, self._in_flight, self.others)
        self.page = LivePage(self.metrics, self._in_flight) if live else None
        self._runners: list[web.BaseRunner] = []
        self._handler: ProxyHandler | None = None
        self.proxy_address: Address | None = None
        self.admin_address: Address | None = None
        self._logger = log.get_logger()
        self._flusher: asyncio.Future[None] | None = None
        self._guard: ListenerGuard | None = None
        self.own_addresses = OwnAddresses()  # what the listeners bound: never a destination
        # Span export: nothing of it exists unless an endpoint is configured.
        self.spans: SpanRecorder | None = None
        self.span_exporter: SpanExporter | None = None
        self._flush_by: float | None = None  # loop time the drain wants spans flushed by

    async def start(self) -> None:
        settings = self.settings
        # The registry sees the same numbers (get_sample_value, other exporters); /metrics
        # is written by the exposition.
        self.registry.register(RegistryView(self.metrics, self._in_flight))
        self.registry.register(self.others)
        try:
            if settings.otlp_endpoint is not None:
                await self._start_spans(settings.otlp_endpoint)
            # main() has checked the CA already; a caller that has not gets CAError here.
            ca = (
                CertificateAuthority.load(settings.ca_cert, settings.ca_key)
                if settings.intercept
                else None
            )
            handler = self._handler = ProxyHandler(
                settings,
                self.exposition,
                self.metrics,
                self.lifecycle,
                self.own_addresses,
                self.spans,
                ca,
            )
            await handler.start()
            limits = ClientLimits.from_settings(settings)
            guard = self._guard = ListenerGuard(
                limits,
                self.metrics.clients,
                self.metrics.denied,
                pseudonym=settings.via_pseudonym,
                request_id_header=settings.request_id_header,
            )
            server = GuardedServer(
                handler,
                request_factory=handler.make_request,
                guard=guard,
                access_log=None,
                auto_decompress=False,
                keepalive_timeout=settings.client_idle_timeout,
                **limits.handler_kwargs(),
            )
            proxy_runner = GuardedRunner(
                server,
                on_shutdown=handler.close_tunnels,
                handle_signals=False,
                shutdown_timeout=_FINAL_SHUTDOWN_TIMEOUT,
            )
            self.proxy_address = await self._listen(proxy_runner, "listen", settings.listen)
            if settings.admin_listen is not None:
                admin_runner = web.AppRunner(
                    build_admin_app(self.exposition, self.lifecycle, self.page),
                    handle_signals=False,
                    access_log=None,
                    shutdown_timeout=_FINAL_SHUTDOWN_TIMEOUT,
                )
                self.admin_address = await self._listen(
                    admin_runner, "admin_listen", settings.admin_listen
                )
        except BaseException:
            await self.close()
            raise
        self._flusher = asyncio.ensure_future(_flush_logs_periodically())

    async def _start_spans(self, endpoint: str) -> None:
        settings = self.settings
        queue = SpanQueue(settings.otlp_queue_size, settings.otlp_batch_size)
        queue.register(self.others)
        self.spans = SpanRecorder(
            queue,
            TraceIdRatio(settings.otlp_sample_ratio),
            request_id_header=settings.request_id_header,
            log_query=settings.log_query,
        )
        self.span_exporter = SpanExporter(
            queue,
            endpoint,
            service_name=settings.otlp_service_name,
            interval=settings.otlp_export_interval,
            timeout=settings.otlp_export_timeout,
        )
        await self.span_exporter.start()

    def _in_flight(self) -> int:
        return self.lifecycle.in_flight

    async def _listen(self, runner: web.BaseRunner, field: str, address: Address) -> Address:
        """Serve ``runner`` on ``address``; what it bound is never a destination."""
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(
            runner, address.host, address.port, reuse_address=True, backlog=_LISTEN_BACKLOG
        )
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(field, address, exc) from exc
        for sockname in runner.addresses:
            self.own_addresses.add(*sockname[:2])
        host, port = runner.addresses[0][:2]
        return Address(host, port)

    async def drain(self, grace: float, drain_timeout: float) -> bool:
        """Readiness off, keep serving ``grace`` s, then wait for in-flight work; True if idle."""
        lifecycle = self.lifecycle
        lifecycle.draining = True
        closed = self._guard.close_idle() if self._guard is not None else 0
        self._logger.info(
            "draining", grace_s=grace, in_flight=lifecycle.in_flight, idle_closed=closed
        )
        if grace > 0:
            await asyncio.sleep(grace)
        lifecycle.refusing = True
        # Spans are flushed by close(), within what is left of this deadline.
        self._flush_by = asyncio.get_running_loop().time() + drain_timeout
        try:
            await asyncio.wait_for(lifecycle.wait_idle(), drain_timeout)
        except TimeoutError:
            self._logger.warning("drain_timeout", in_flight=lifecycle.in_flight)
            return False
        except asyncio.CancelledError:
            self._flush_by = None  # a second signal skips the drain: flush briefly
            raise
        return True

    async def close(self) -> None:
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        if self._handler is not None:  # after the listeners: their handlers used the session
            await self._handler.close()
            self._handler = None
        if self.span_exporter is not None:
            # After the listeners: tunnels cut at shutdown have queued their spans by now.
            await self.span_exporter.close(self._flush_budget())
            self.span_exporter = None
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        log.flush()

    def _flush_budget(self) -> float:
        """What is left of the drain deadline, but at least the final backstop."""
        if self._flush_by is None:
            return _FINAL_SHUTDOWN_TIMEOUT
        left = self._flush_by - asyncio.get_running_loop().time()
        return max(left, _FINAL_SHUTDOWN_TIMEOUT)

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        addresses = f"proxy={self.proxy_address} admin={self.admin_address}"
        return f"<ProxyServer {addresses} {self.lifecycle!r}>"


async def _flush_logs_periodically(interval: float = 0.2) -> None:
    """Bound how long an access line can sit in the buffer when traffic stops."""
    while True:
        await asyncio.sleep(interval)
        log.flush()
