"""One finished request -> histograms, counters and one access-log line, from the same numbers."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from yarl import URL

from proxy.observe.live import Call
from proxy.observe.metrics import Metrics, exemplar_ids, grpc_code, method_label
from proxy.observe.tracing import Timings
from proxy.rules.errors import ProxyError
from proxy.rules.query import loggable
from proxy.rules.request_id import TraceContext


class Outcome:
    """What happened to one forwarded request; filled in by the forwarder as it goes."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "error",
        "exc",
        "grpc_status",
        "host",
        "peer",
        "request",
        "request_id",
        "status",
        "target",
        "timings",
        "total",
        "trace",
    )

    def __init__(
        self,
        request: web.BaseRequest,
        target: URL,
        host: str,
        request_id: str,
        trace: TraceContext,
        timings: Timings,
    ) -> None:
        self.request = request
        self.target = target
        self.host = host
        self.request_id = request_id
        self.trace = trace
        self.timings = timings
        self.status = 0
        self.error: ProxyError | None = None
        self.exc: BaseException | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.total = 0.0
        # Spans only (proxy.observe.spans): the upstream address; left None when export is off.
        self.peer: tuple[str, int] | None = None
        self.grpc_status: int | None = None  # a gRPC response's grpc-status, when it had one

    def fail(self, error: ProxyError, exc: BaseException | None = None) -> None:
        self.error = error
        self.exc = exc
        if error.status == 499:
            self.status = 499

    def __repr__(self) -> str:
        err = self.error.error if self.error else None
        return f"<Outcome {self.request.method} {self.host} status={self.status} error={err}>"


# The access line's protocol, named once: HTTP/2's version is written "2" (RFC 9113 §3.1).
_PROTOCOLS: Final = {
    HttpVersion11: "HTTP/1.1",
    HttpVersion10: "HTTP/1.0",
    HttpVersion(2, 0): "HTTP/2",
}


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class Observer:
    """Records an ``Outcome`` in the metrics and writes its access-log line."""

    def __init__(
        self, metrics: Metrics, logger: Any, *, log_query: bool, exemplars: bool = True
    ) -> None:
        self._metrics = metrics
        self._logger = logger
        self._log_query = log_query
        self._exemplars = exemplars

    def __call__(self, outcome: Outcome) -> None:
        t = outcome.timings
        stats = self._metrics.host(outcome.host)
        ids = exemplar_ids(outcome.trace.trace_id, outcome.request_id) if self._exemplars else None
        waited = t.waited  # every request that reached the pool, a timed-out wait included
        if waited:
            stats.queue.observe(t.queue, ids)
        if t.reused is not None:
            if t.reused:
                stats.connections_reused += 1
            else:
                stats.connections_new += 1
        stats.observe_dial(t.dns, t.dns_cache, t.connect, t.tls, ids)
        ttfb = t.ttfb
        if ttfb is not None:
            stats.ttfb.observe(ttfb, ids)
        stats.total.observe(outcome.total, ids)
        request = outcome.request
        key = (method_label(request.method), str(outcome.status))
        stats.requests[key] = stats.requests.get(key, 0) + 1
        error = outcome.error.error if outcome.error is not None else None
        if error is not None:
            stats.errors[error] = stats.errors.get(error, 0) + 1
        stats.bytes_sent += outcome.bytes_in
        stats.bytes_received += outcome.bytes_out
        grpc = outcome.grpc_status
        if grpc is not None:
            code = grpc_code(grpc)
            stats.grpc[code] = stats.grpc.get(code, 0) + 1
        live = stats.live
        if live is not None and live.add(stats.last_used, outcome.total, outcome.status, error):
            live.keep(
                Call(
                    stats.last_used,
                    outcome.host,
                    request.method,
                    outcome.target.raw_path,  # never the query: the page shows no query string
                    outcome.status,
                    error,
                    outcome.request_id,
                    outcome.trace.trace_id,
                    outcome.total,
                    (t.queue if waited else None, t.dns, t.connect, t.tls, ttfb),
                )
            )
        version = request.version
        protocol = _PROTOCOLS.get(version) or f"HTTP/{version.major}.{version.minor}"

        self._logger.info(
            "access",
            request_id=outcome.request_id,
            trace_id=outcome.trace.trace_id,
            span_id=outcome.trace.span_id,  # None unless the proxy records a span
            client=request.remote,
            method=request.method,
            protocol=protocol,
            scheme=outcome.target.scheme,
            host=outcome.host,
            path=loggable(outcome.target).raw_path_qs
            if self._log_query
            else outcome.target.raw_path,
            status=outcome.status,
            bytes_in=outcome.bytes_in,
            bytes_out=outcome.bytes_out,
            queue_ms=milliseconds(t.queue if waited else None),
            dns_ms=milliseconds(t.dns),
            connect_ms=milliseconds(t.connect),
            tls_ms=milliseconds(t.tls),
            ttfb_ms=milliseconds(ttfb),
            total_ms=milliseconds(outcome.total),
            reused=t.reused,
            error=error,
            grpc_status=grpc,
        )
