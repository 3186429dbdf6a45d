"""Spans: one plain record per forwarded request or tunnel, queued for batched OTLP export.

The request path only builds a ``SpanRecord`` (ids, a few attributes, the phases as
clock readings) and appends it to a bounded ``SpanQueue``; a full queue drops and counts,
it never waits. Turning records into OTLP protobuf happens later, in the exporter task
(``proxy.wire.otlp``), through ``encode``. Nothing here exists when export is off.

Times: ``Timings`` holds ``perf_counter`` readings. Each record keeps one pair of
readings taken together (wall-clock ns, perf_counter), and every time of the span, its
start, end and events, is converted through that one pair, so the span is consistent in
itself whatever the wall clock does later.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from time import perf_counter, time_ns
from typing import TYPE_CHECKING, Final

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.observe.metrics import grpc_code, method_label
from proxy.rules.headers import rpc_method
from proxy.rules.query import loggable

if TYPE_CHECKING:
    from proxy.observe.outcome import Outcome
    from proxy.observe.tracing import Timings
    from proxy.rules.errors import ProxyError
    from proxy.rules.request_id import TraceContext

AttributeValue = str | int | float | tuple[str, ...]

# Why a span was not exported, and how each export ended (both pre-set to 0).
DROP_REASONS: Final = ("queue_full", "export_failed", "rejected", "shutdown", "unencodable")
EXPORT_RESULTS: Final = ("success", "http_error", "connection_error", "timeout")

SCOPE_NAME: Final = "tracing-proxy"
# OTLP Span.flags: the low byte is the W3C trace-flags; bit 8 says bit 9 is meaningful,
# bit 9 says the parent span context came from another process.
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_SAMPLED: Final = 0x01

# A lone surrogate: a byte that was not UTF-8 in a header (proxy.rules.headers decodes
# with surrogateescape). Protobuf refuses it in a string field.
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class TraceIdRatio:
    """Sampling for traces the proxy starts: the same rule as OpenTelemetry's
    TraceIdRatioBased (the low 64 bits of the trace id below ratio * 2**64), so every
    participant that uses the ratio rule decides the same for the same trace id."""

    __slots__ = ("_bound", "ratio")

    def __init__(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sample ratio must be within 0..1, got {ratio}")
        self.ratio = ratio
        self._bound = round(ratio * (1 << 64))

    def __call__(self, trace_id: str) -> bool:
        return int(trace_id[16:], 16) < self._bound

    def __repr__(self) -> str:
        return f"<TraceIdRatio {self.ratio:g}>"


class SpanRecord:
    """One finished span in plain Python; protobuf is built from it at export time."""

    __slots__ = (
        "attributes",
        "end",
        "error",
        "error_text",
        "events",
        "name",
        "parent_id",
        "perf_anchor",
        "span_id",
        "start",
        "trace_id",
        "trace_state",
        "wall_anchor_ns",
    )

    def __init__(
        self,
        name: str,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        start: float,
        end: float,
        attributes: dict[str, AttributeValue],
        events: Sequence[tuple[str, float, float]],
        *,
        error: str | None = None,
        error_text: str = "",
        trace_state: str | None = None,
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.start = start  # perf_counter seconds, like Timings
        self.end = end
        self.attributes = attributes
        self.events = events  # (phase, perf_counter start, duration seconds)
        self.error = error  # error.type; the span status is ERROR when set
        self.error_text = error_text
        self.trace_state = trace_state
        # Taken together, once: every perf_counter reading of this span converts through it.
        self.wall_anchor_ns = time_ns()
        self.perf_anchor = perf_counter()

    def epoch_ns(self, perf: float) -> int:
        return self.wall_anchor_ns - round((self.perf_anchor - perf) * 1e9)

    def clean(self) -> None:
        """Make every text encodable; only for a record protobuf refused (off the request path).

        A lone surrogate becomes U+FFFD. A ``trace_state`` holding one is left out instead:
        W3C tracestate is printable ASCII, and a replaced value would be another vendor's.
        """
        self.name = _cleaned(self.name)
        self.error_text = _cleaned(self.error_text)
        if self.trace_state is not None and _SURROGATE.search(self.trace_state):
            self.trace_state = None
        self.attributes = {_cleaned(k): _cleaned_value(v) for k, v in self.attributes.items()}

    def __repr__(self) -> str:
        return f"<SpanRecord {self.name} {self.trace_id}/{self.span_id} error={self.error}>"


class SpanQueue:
    """A bounded queue of finished spans plus the export counters; never blocks.

    ``wanted`` is called when a full batch is ready, so the exporter can send it before
    its interval is up (it sets an event; no task switch happens on the request path).
    """

    def __init__(self, max_size: int, batch_size: int) -> None:
        self.max_size = max_size
        self.batch_size = batch_size
        self._records: deque[SpanRecord] = deque()
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.cleaned = 0  # encoded with the text protobuf refused replaced or left out
        self.exports: dict[str, int] = dict.fromkeys(EXPORT_RESULTS, 0)
        self.wanted: list[asyncio.Event] = []  # the exporter's wake-up

    def add(self, record: SpanRecord) -> None:
        records = self._records
        if len(records) >= self.max_size:
            self.dropped["queue_full"] += 1
            return
        records.append(record)
        if len(records) == self.batch_size:
            for waiter in self.wanted:
                waiter.set()

    def take(self, limit: int) -> list[SpanRecord]:
        records = self._records
        return [records.popleft() for _ in range(min(limit, len(records)))]

    def drop_all(self, reason: str) -> None:
        self.dropped[reason] += len(self._records)
        self._records.clear()

    def __len__(self) -> int:
        return len(self._records)

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_SpanCollector(self))

    def __repr__(self) -> str:
        return f"<SpanQueue {len(self)}/{self.max_size} dropped={sum(self.dropped.values())}>"


class _SpanCollector(Collector):
    def __init__(self, queue: SpanQueue) -> None:
        self._queue = queue

    def collect(self) -> Iterator[Metric]:
        dropped = CounterMetricFamily(
            "proxy_spans_dropped",
            "Spans not exported: queue full, export failed, rejected by the collector, "
            "still queued at shutdown, or not encodable.",
            labels=["reason"],
        )
        for reason, count in self._queue.dropped.items():
            dropped.add_metric([reason], count)
        cleaned = CounterMetricFamily(
            "proxy_spans_cleaned",
            "Spans encoded with text that was not UTF-8 replaced by U+FFFD, or their "
            "tracestate left out.",
            value=self._queue.cleaned,
        )
        exports = CounterMetricFamily(
            "proxy_span_exports", "OTLP export requests, by how they ended.", labels=["result"]
        )
        for result, count in self._queue.exports.items():
            exports.add_metric([result], count)
        yield from (dropped, cleaned, exports)


class SpanRecorder:
    """Builds the record for a finished request or tunnel and queues it."""

    def __init__(
        self,
        queue: SpanQueue,
        sampler: TraceIdRatio,
        *,
        request_id_header: str,
        log_query: bool,
    ) -> None:
        self.queue = queue
        self.sampler = sampler
        # OTel HTTP semconv records request fields as http.request.header.<lower-case name>.
        self._rid_key = "http.request.header." + request_id_header.lower()
        self._log_query = log_query

    def forwarded(self, outcome: Outcome) -> None:
        """The CLIENT span of one forwarded request (only called when it is recorded)."""
        trace = outcome.trace
        if trace.span_id is None:
            return
        request = outcome.request
        target = outcome.target
        t = outcome.timings
        method = method_label(request.method)
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method,
            "server.address": target.raw_host or "",
            "server.port": target.port or 80,
            "url.scheme": target.scheme,
            "url.full": str(loggable(target) if self._log_query else target.with_query(None)),
            self._rid_key: (outcome.request_id,),
        }
        if method != request.method:
            attributes["http.request.method_original"] = request.method
        error = outcome.error.error if outcome.error is not None else None
        if t.response_at is not None:  # the upstream answered: its status, not ours
            attributes["http.response.status_code"] = outcome.status
            if error is None and outcome.status >= 400:
                error = str(outcome.status)  # semconv: 4xx/5xx fail a client span
        name = method
        grpc = outcome.grpc_status
        rpc = rpc_method(target.raw_path) if grpc is not None else None
        if grpc is not None and rpc is not None:
            # OpenTelemetry RPC semantic conventions: the span is named service/method; on a
            # gRPC client span every status but OK is an error, error.type the code's name.
            name = f"{rpc[0]}/{rpc[1]}"
            attributes["rpc.system"] = "grpc"
            attributes["rpc.service"] = rpc[0]
            attributes["rpc.method"] = rpc[1]
            attributes["rpc.grpc.status_code"] = grpc
            if error is None and grpc != 0:
                error = grpc_code(grpc)
        if error is not None:
            attributes["error.type"] = error
        add_peer(attributes, outcome.peer)
        self.queue.add(
            SpanRecord(
                name,
                trace.trace_id,
                trace.span_id,
                trace.parent_id,
                t.start,
                t.start + outcome.total,
                attributes,
                t.phases(),
                error=error,
                error_text=outcome.error.text if outcome.error is not None else "",
                trace_state=request.headers.get("tracestate") if trace.kept else None,
            )
        )

    def tunnel(
        self,
        trace: TraceContext,
        *,
        host: str,
        port: int,
        request_id: str,
        timings: Timings,
        duration: float,
        outcome: str,
        error: ProxyError | None,
        peer: tuple[str, int] | None,
        tracestate: str | None,
    ) -> None:
        """The CLIENT span of one CONNECT tunnel: its dial, then its lifetime."""
        if trace.span_id is None:
            return
        attributes: dict[str, AttributeValue] = {
            "http.request.method": "CONNECT",
            "server.address": host,
            "server.port": port,
            self._rid_key: (request_id,),
            "proxy.tunnel.outcome": outcome,
        }
        if error is not None:
            attributes["error.type"] = error.error
        add_peer(attributes, peer)
        self.queue.add(
            SpanRecord(
                "CONNECT",
                trace.trace_id,
                trace.span_id,
                trace.parent_id,
                timings.start,
                timings.start + duration,
                attributes,
                timings.phases(),
                error=error.error if error is not None else None,
                error_text=error.text if error is not None else "",
                trace_state=tracestate if trace.kept else None,
            )
        )

    def __repr__(self) -> str:
        return f"<SpanRecorder {self.sampler!r} {self.queue!r}>"


def add_peer(attributes: dict[str, AttributeValue], peer: tuple[str, int] | None) -> None:
    if peer is not None:
        attributes["network.peer.address"] = peer[0]
        attributes["network.peer.port"] = peer[1]


# -- OTLP encoding: runs in the exporter task, never on the request path ---------------------


def resource(service_name: str) -> Resource:
    return Resource(
        attributes=[
            _key_value("service.name", service_name),
            _key_value("service.version", __version__),
            _key_value("telemetry.sdk.name", SCOPE_NAME),
            _key_value("telemetry.sdk.language", "python"),
        ]
    )


class BatchBuilder:
    """One ``ExportTraceServiceRequest`` (one resource, one scope), filled a slice at a time.

    A record protobuf refuses is cleaned and tried once more, and left out if it is refused
    again: one record never fails its batch. ``cleaned`` and ``dropped`` list those records
    with what was refused, for the exporter to count and report.
    """

    def __init__(self, service: Resource) -> None:
        self._request = ExportTraceServiceRequest()
        resource_spans = self._request.resource_spans.add()
        resource_spans.resource.CopyFrom(service)
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = SCOPE_NAME
        scope_spans.scope.version = __version__
        self._spans = scope_spans.spans
        self.cleaned: list[tuple[SpanRecord, Exception]] = []
        self.dropped: list[tuple[SpanRecord, Exception]] = []

    def add(self, records: Iterable[SpanRecord]) -> None:
        add = self._spans.add
        for record in records:
            try:
                fill_span(add(), record)
            except Exception as exc:
                del self._spans[-1]  # the half-filled span
                self._retry_cleaned(record, exc)

    def _retry_cleaned(self, record: SpanRecord, refused: Exception) -> None:
        record.clean()
        try:
            fill_span(self._spans.add(), record)
        except Exception as exc:
            del self._spans[-1]
            self.dropped.append((record, exc))
        else:
            self.cleaned.append((record, refused))

    def __len__(self) -> int:
        return len(self._spans)

    def body(self) -> bytes:
        body: bytes = self._request.SerializeToString()
        return body


def encode(records: Iterable[SpanRecord], service: Resource) -> bytes:
    """An ``ExportTraceServiceRequest`` body for ``records``."""
    builder = BatchBuilder(service)
    builder.add(records)
    return builder.body()


def rejected_spans(body: bytes) -> int:
    """How many spans a successful export response says were rejected (partial success)."""
    if not body:
        return 0
    response = ExportTraceServiceResponse()
    response.ParseFromString(body)
    return int(response.partial_success.rejected_spans)


def fill_span(span: Span, record: SpanRecord) -> None:
    """Write ``record`` into ``span`` in place (about twice as fast as nested constructors)."""
    span.trace_id = bytes.fromhex(record.trace_id)
    span.span_id = bytes.fromhex(record.span_id)
    if record.parent_id is not None:
        span.parent_span_id = bytes.fromhex(record.parent_id)
    if record.trace_state:
        span.trace_state = record.trace_state
    span.flags = _SAMPLED | _HAS_IS_REMOTE | (_IS_REMOTE if record.parent_id is not None else 0)
    span.name = record.name
    span.kind = Span.SPAN_KIND_CLIENT
    span.start_time_unix_nano = record.epoch_ns(record.start)
    span.end_time_unix_nano = record.epoch_ns(record.end)
    add_attribute = span.attributes.add
    for key, value in record.attributes.items():
        attribute = add_attribute()
        attribute.key = key
        _set_value(attribute.value, value)
    add_event = span.events.add
    for phase, start, duration in record.events:
        event = add_event()
        event.time_unix_nano = record.epoch_ns(start)
        event.name = phase
        attribute = event.attributes.add()
        attribute.key = "proxy.phase.duration"
        attribute.value.double_value = duration
    if record.error is not None:
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = record.error_text


def _cleaned(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


def _cleaned_value(value: AttributeValue) -> AttributeValue:
    if isinstance(value, str):
        return _cleaned(value)
    if isinstance(value, tuple):
        return tuple(map(_cleaned, value))
    return value


def _key_value(key: str, value: AttributeValue) -> KeyValue:
    attribute = KeyValue(key=key)
    _set_value(attribute.value, value)
    return attribute


def _set_value(target: AnyValue, value: AttributeValue) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, tuple):
        add = target.array_value.values.add
        for item in value:
            _set_value(add(), item)
    else:
        target.string_value = value
