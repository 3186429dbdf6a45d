"""CPU per span: the OpenTelemetry SDK route against our plain records + protobuf encoding.

``python -m benchmarks.spans``. Each route builds the same span (a CLIENT span with a
remote parent, the HTTP attributes, three phase events, its status) and encodes it into
an OTLP ``ExportTraceServiceRequest`` in batches of 512. Two figures per route:

- hot path: what the request handler would pay (SDK: start_span .. end through a span
  processor; ours: ``SpanRecorder.forwarded``, which builds a record and queues it);
- export: encoding the batch to protobuf bytes, which both routes do off the request path
  (the SDK in its exporter thread, ours in the exporter task) but still on this process's CPU.

CPU time (``time.process_time``), best of ``--repeat`` runs; no network is used.
``make bench`` runs it once as the ``span-cost`` study; the ``ours-spans`` candidate
(a span per request exported to ``benchmarks.otlp_sink``) is the same cost under load.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp.test_utils import make_mocked_request
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode
from yarl import URL

from benchmarks.scenarios import Bench, Measurement, Study, StudyResult
from proxy.observe import spans
from proxy.observe.outcome import Outcome
from proxy.observe.tracing import Timings
from proxy.rules.request_id import choose_trace_context

BATCH = 512
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class KeepExporter(SpanExporter):
    """Keeps finished spans, so the encoding can be timed apart from the hot path."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _timings() -> Timings:
    t = Timings(time.perf_counter())
    t.reused = False
    t.dns = 0.0004
    t._dns_start = t.start + 0.0001
    t.connect = 0.0003
    t._connect_end = t.start + 0.0008
    t.sent_at = t.start + 0.0009
    t.response_at = t.start + 0.0050
    return t


def sdk_route(count: int, batch_processor: bool) -> tuple[float, float]:
    exporter = KeepExporter()
    provider = TracerProvider(resource=SdkResource.create({"service.name": "bench"}))
    processor = (
        BatchSpanProcessor(exporter, max_queue_size=count + 1, schedule_delay_millis=3_600_000)
        if batch_processor
        else SimpleSpanProcessor(exporter)
    )
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("tracing-proxy")
    parent = otel_trace.set_span_in_context(
        NonRecordingSpan(
            SpanContext(
                0x4BF92F3577B34DA6A3CE929D0E0E4736,
                0x00F067AA0BA902B7,
                is_remote=True,
                trace_flags=TraceFlags(1),
            )
        )
    )
    started = time.process_time()
    for _ in range(count):
        choose_trace_context(TRACEPARENT)  # the proxy parses the incoming header either way
        t = _timings()
        now = time.time_ns()
        span = tracer.start_span(
            "GET",
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=now,
            attributes={
                "http.request.method": "GET",
                "server.address": "127.0.0.1",
                "server.port": 8080,
                "url.scheme": "http",
                "url.full": "http://127.0.0.1:8080/v1/items",
                "http.request.header.x-request-id": ("2f1c-req",),
                "network.peer.address": "127.0.0.1",
                "network.peer.port": 8080,
            },
        )
        for phase, start, duration in t.phases():
            span.add_event(
                phase,
                {"proxy.phase.duration": duration},
                timestamp=now + round((start - t.start) * 1e9),
            )
        span.set_attribute("http.response.status_code", 502)
        span.set_attribute("error.type", "connection_refused")
        span.set_status(Status(StatusCode.ERROR, "connection refused"))
        span.end(end_time=now + 5_000_000)
    processor.force_flush()
    hot = time.process_time() - started
    started = time.process_time()
    for offset in range(0, len(exporter.spans), BATCH):
        encode_spans(exporter.spans[offset : offset + BATCH]).SerializeToString()
    export = time.process_time() - started
    provider.shutdown()
    return hot, export


def our_route(count: int) -> tuple[float, float]:
    queue = spans.SpanQueue(count + 1, BATCH)
    recorder = spans.SpanRecorder(
        queue, spans.TraceIdRatio(1.0), request_id_header="X-Request-ID", log_query=False
    )
    request = make_mocked_request("GET", "http://127.0.0.1:8080/v1/items?q=1")
    target = URL("http://127.0.0.1:8080/v1/items?q=1")
    sampler = recorder.sampler
    started = time.process_time()
    for _ in range(count):
        trace = choose_trace_context(TRACEPARENT, sampler)
        outcome = Outcome(request, target, "127.0.0.1:8080", "2f1c-req", trace, _timings())
        outcome.status = 502
        outcome.total = 0.005
        outcome.peer = ("127.0.0.1", 8080)
        recorder.forwarded(outcome)
    hot = time.process_time() - started
    service = spans.resource("bench")
    started = time.process_time()
    while len(queue):
        spans.encode(queue.take(BATCH), service)
    export = time.process_time() - started
    return hot, export


def trace_context_cost(count: int) -> tuple[float, float]:
    """choose_trace_context as today (pass-through) and as a participant."""
    sampler = spans.TraceIdRatio(1.0)
    started = time.process_time()
    for _ in range(count):
        choose_trace_context(TRACEPARENT)
    passing = time.process_time() - started
    started = time.process_time()
    for _ in range(count):
        choose_trace_context(TRACEPARENT, sampler)
    return passing, time.process_time() - started


def best(run: Callable[[], tuple[float, float]], repeat: int) -> tuple[float, float]:
    results = [run() for _ in range(repeat)]
    return min(r[0] for r in results), min(r[1] for r in results)


def routes(n: int, repeat: int) -> dict[str, tuple[float, float]]:
    """(hot path, export) CPU seconds for ``n`` spans, best of ``repeat``, by route."""
    return {
        "SDK, SimpleSpanProcessor": best(lambda: sdk_route(n, False), repeat),
        "SDK, BatchSpanProcessor": best(lambda: sdk_route(n, True), repeat),
        "plain record + opentelemetry-proto": best(lambda: our_route(n), repeat),
    }


ROW_NAMES: Final = {
    "SDK, SimpleSpanProcessor": "sdk-simple",
    "SDK, BatchSpanProcessor": "sdk-batch",
    "plain record + opentelemetry-proto": "ours",
}


def _study(bench: Bench) -> StudyResult:
    n, repeat = (5_000, 1) if bench.quick else (20_000, 3)
    rows: dict[str, Measurement] = {}
    figures: dict[str, Any] = {"spans_per_run": n, "repeat": repeat}
    for route, (hot, export) in routes(n, repeat).items():
        per_span = {"hot_us": hot / n * 1e6, "export_us": export / n * 1e6}
        figures[route] = per_span
        rows[ROW_NAMES[route]] = Measurement(
            requests=n, cpu_us_per_request=(hot + export) / n * 1e6, extra=per_span
        )
    passing, taking_part = best(lambda: trace_context_cost(n), repeat)
    figures["choose_trace_context_pass_through_us"] = passing / n * 1e6
    figures["choose_trace_context_participant_us"] = taking_part / n * 1e6
    return StudyResult({"CPU us per span, in one process (no network)": rows}, figures)


SCENARIOS: Final = (
    Study("span-cost", "a span per request: the OpenTelemetry SDK route vs ours", _study),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000, help="spans per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is shown")
    args = parser.parse_args()
    n = args.count
    rows = routes(n, args.repeat)
    print(f"{n} spans per run, best of {args.repeat}; CPU us per span")
    print(f"{'route':<38}{'hot path':>10}{'export':>10}{'total':>10}")
    for name, (hot, export) in rows.items():
        print(
            f"{name:<38}{hot / n * 1e6:>10.1f}{export / n * 1e6:>10.1f}"
            f"{(hot + export) / n * 1e6:>10.1f}"
        )
    passing, taking_part = best(lambda: trace_context_cost(n), args.repeat)
    print(
        f"\nchoose_trace_context: pass-through {passing / n * 1e6:.2f} us, "
        f"participant {taking_part / n * 1e6:.2f} us"
    )


if __name__ == "__main__":
    main()
