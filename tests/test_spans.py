"""Spans: one CLIENT span per forwarded request and tunnel, linked into the caller's trace."""

from __future__ import annotations

import asyncio
import gc
import types
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from proxy.observe import spans as spans_module
from proxy.observe.spans import SpanQueue, SpanRecord, SpanRecorder, TraceIdRatio
from proxy.rules.request_id import parse_traceparent_fields
from proxy.wire.otlp import SpanExporter
from tests.conftest import LogCapture, Origin, RunningProxy, read_head
from tests.otlp import OtlpReceiver, StartTraced, attributes, otlp_receiver, traced_proxy  # noqa: F401
from tests.test_failures import closed_port
from tests.test_tunnelling import StartRaw, echo
from tests.tls import TLSOrigin

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SAMPLED_TP = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
UNSAMPLED_TP = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"


def _seen_traceparent(echoed: dict[str, object]) -> str:
    headers = echoed["headers"]
    assert isinstance(headers, list)
    values = [value for name, value in headers if name.lower() == "traceparent"]
    assert len(values) == 1
    return str(values[0])


async def _get(
    client: aiohttp.ClientSession, proxy: RunningProxy, url: str, **headers: str
) -> tuple[int, dict[str, object]]:
    async with client.get(url, headers=headers, proxy=proxy.url) as response:
        body = await response.json() if response.status == 200 else {}
        return response.status, body


@pytest.fixture
def spans_proxy(traced_proxy: StartTraced) -> StartTraced:  # noqa: F811
    """A receiver and a proxy that exports each span to it at once (batches of one)."""

    async def start(**changes: object) -> tuple[OtlpReceiver, RunningProxy]:
        return await traced_proxy(otlp_batch_size=1, **changes)

    return start


def _assert_phases_as_logged(span: Span, line: dict[str, Any], *phases: str) -> None:
    """Each phase event's duration, in ms to 3 places, is the access line's ``<phase>_ms``."""
    durations = {event.name: attributes(event)["proxy.phase.duration"] for event in span.events}
    for phase in phases:
        assert round(durations[phase] * 1000, 3) == line[f"{phase}_ms"]


# -- sampling rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "trace_id", "recorded"),
    [
        (1.0, "f" * 32, True),
        (0.0, "0" * 31 + "1", False),
        (0.5, "f" * 16 + "7fffffffffffffff", True),
        (0.5, "0" * 16 + "8000000000000000", False),
        (0.25, "0" * 16 + "3fffffffffffffff", True),
        (0.25, "0" * 16 + "4000000000000000", False),
    ],
)
def test_ratio_sampling_looks_at_the_low_64_bits(
    ratio: float, trace_id: str, recorded: bool
) -> None:
    """A new trace is recorded when its low 64 bits are below ratio * 2**64 (OTel's rule)."""
    assert TraceIdRatio(ratio)(trace_id) is recorded


def test_a_full_queue_drops_and_counts() -> None:
    """Past max_size, add() drops the record and counts it; nothing waits."""
    queue = SpanQueue(max_size=2, batch_size=10)
    record = SpanRecord("GET", CALLER_TRACE, CALLER_SPAN, None, 0.0, 1.0, {}, [])
    for _ in range(5):
        queue.add(record)
    assert len(queue) == 2
    assert queue.dropped["queue_full"] == 3


def test_encoded_times_share_one_clock_anchor() -> None:
    """Start, end and events convert through one anchor, so their differences are kept."""
    record = SpanRecord(
        "GET", CALLER_TRACE, "1" * 16, CALLER_SPAN, 10.0, 10.5, {}, [("ttfb", 10.1, 0.3)]
    )
    span = Span()
    spans_module.fill_span(span, record)
    assert span.end_time_unix_nano - span.start_time_unix_nano == 500_000_000
    assert span.events[0].time_unix_nano - span.start_time_unix_nano == 100_000_000


# -- through the proxy --------------------------------------------------------------------


async def test_incoming_trace_gets_one_child_span_and_the_origin_its_grandchild(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """One span with the caller's trace and parent; the origin's parent id is that span."""
    receiver, proxy = await spans_proxy()
    status, echoed = await _get(
        client, proxy, origin.url("/echo?secret=1"), traceparent=SAMPLED_TP, tracestate="k=v"
    )
    assert status == 200
    [span] = await receiver.wait_for_spans(1)
    assert span.trace_id.hex() == CALLER_TRACE
    assert span.parent_span_id.hex() == CALLER_SPAN
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.trace_state == "k=v"
    assert span.status.code == Status.STATUS_CODE_UNSET
    assert _seen_traceparent(echoed) == f"00-{CALLER_TRACE}-{span.span_id.hex()}-01"
    assert ["tracestate", "k=v"] in echoed["headers"]  # type: ignore[operator]
    [line] = logs.events("access")
    assert line["span_id"] == span.span_id.hex()
    assert line["trace_id"] == CALLER_TRACE
    assert receiver.content_types == ["application/x-protobuf"]


async def test_span_attributes_follow_the_http_client_conventions(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """Method, server, scheme, status, peer, URL without its query, and the request id."""
    receiver, proxy = await spans_proxy()
    await _get(client, proxy, origin.url("/echo?secret=1"), **{"X-Request-ID": "req-7"})
    [span] = await receiver.wait_for_spans(1)
    assert span.name == "GET"
    assert attributes(span) == {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": origin.port,
        "url.scheme": "http",
        "url.full": origin.url("/echo"),
        "http.request.header.x-request-id": ["req-7"],
        "http.response.status_code": 200,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": origin.port,
    }
    resource = {
        kv.key: kv.value.string_value
        for kv in receiver.requests[0].resource_spans[0].resource.attributes
    }
    assert resource["service.name"] == "tracing-proxy"


async def test_phases_are_events_inside_the_span_in_order(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """A new connection gives connect then ttfb events, timed within the span, as logged."""
    receiver, proxy = await spans_proxy()
    await _get(client, proxy, origin.url("/echo"))
    [span] = await receiver.wait_for_spans(1)
    names = [event.name for event in span.events]
    assert names == ["connect", "ttfb"]  # an IP literal needs no lookup; the pool was free
    times = [event.time_unix_nano for event in span.events]
    assert span.start_time_unix_nano <= times[0] <= times[1] <= span.end_time_unix_nano
    [line] = logs.events("access")
    _assert_phases_as_logged(span, line, "ttfb", "connect")


async def test_https_upstream_has_a_tls_event_between_connect_and_ttfb(
    spans_proxy: StartTraced,
    secure_origin: TLSOrigin,
    tls_ca_file: str,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """TLS origination: connect (TCP), then tls, then ttfb, each as logged, in order."""
    receiver, proxy = await spans_proxy(
        upstream_ca_file=tls_ca_file,
        upgrade_to_https=("localhost",),
    )
    await _get(client, proxy, f"http://localhost:{secure_origin.port}/echo")
    [span] = await receiver.wait_for_spans(1)
    assert [event.name for event in span.events] == ["dns", "connect", "tls", "ttfb"]
    times = [event.time_unix_nano for event in span.events]
    assert times == sorted(times)
    [line] = logs.events("access")
    _assert_phases_as_logged(span, line, "tls", "connect")


async def test_new_trace_is_recorded_sampled_and_logged_with_the_same_ids(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """Without trace context, the new trace id is the same in the span, the log and upstream."""
    receiver, proxy = await spans_proxy()
    _, echoed = await _get(client, proxy, origin.url("/echo"))
    [span] = await receiver.wait_for_spans(1)
    [line] = logs.events("access")
    assert span.trace_id.hex() == line["trace_id"]
    assert span.span_id.hex() == line["span_id"]
    assert span.parent_span_id == b""  # a root span
    assert _seen_traceparent(echoed) == f"00-{line['trace_id']}-{line['span_id']}-01"


async def test_ratio_zero_records_no_new_trace_but_follows_a_sampled_caller(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """Ratio 0: a new trace goes out with 00 and no span; a sampled caller is still followed."""
    receiver, proxy = await spans_proxy(otlp_sample_ratio=0.0)
    _, unrecorded = await _get(client, proxy, origin.url("/echo"))
    _, unsampled = await _get(client, proxy, origin.url("/echo"), traceparent=UNSAMPLED_TP)
    _, followed = await _get(client, proxy, origin.url("/echo"), traceparent=SAMPLED_TP)
    [span] = await receiver.wait_for_spans(1)
    assert span.trace_id.hex() == CALLER_TRACE
    fields = parse_traceparent_fields(_seen_traceparent(unrecorded))
    assert fields is not None
    assert fields[2] == "00"
    assert _seen_traceparent(unsampled) == UNSAMPLED_TP  # passed through as it came
    assert _seen_traceparent(followed) == f"00-{CALLER_TRACE}-{span.span_id.hex()}-01"
    assert [line["span_id"] for line in logs.events("access")] == [None, None, span.span_id.hex()]
    assert proxy.server.spans is not None
    assert len(proxy.server.spans.queue) == 0


async def test_log_query_puts_the_query_in_url_full(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """With --log-query the span's url.full keeps its query string."""
    receiver, proxy = await spans_proxy(log_query=True)
    await _get(client, proxy, origin.url("/echo?q=1"))
    [span] = await receiver.wait_for_spans(1)
    assert attributes(span)["url.full"] == origin.url("/echo?q=1")


SIGNED_QUERY = (
    "q=1&X-Goog-Signature=abc&sig=s%2Fv&Signature=z&AWSAccessKeyId=AKIA&X-Amz-Signature=f"
    "&X-Amz-Credential=c&X-Amz-Security-Token=t&SIG=kept&signature=kept&X%2DGoog%2DSignature=x"
)
REDACTED_QUERY = (
    "q=1&X-Goog-Signature=REDACTED&sig=REDACTED&Signature=REDACTED&AWSAccessKeyId=REDACTED"
    "&X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Security-Token=REDACTED"
    "&SIG=kept&signature=kept&X%2DGoog%2DSignature=REDACTED"
)


async def test_log_query_redacts_signature_values_in_url_full_and_the_access_line(
    spans_proxy: StartTraced,
    origin: Origin,
    logs: LogCapture,
) -> None:
    """Values of the semconv's signing keys (case-sensitive) are REDACTED; upstream gets all."""
    receiver, proxy = await spans_proxy(log_query=True)
    head = (
        f"GET {origin.url('/echo')}?{SIGNED_QUERY} HTTP/1.1\r\nHost: {origin.authority}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await proxy.connect()
    try:
        writer.write(head)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f'"target": "/echo?{SIGNED_QUERY}"'.encode() in answer  # forwarded as it came
    [span] = await receiver.wait_for_spans(1)
    assert attributes(span)["url.full"] == origin.url(f"/echo?{REDACTED_QUERY}")
    [line] = logs.events("access")
    assert line["path"] == f"/echo?{REDACTED_QUERY}"


async def test_connection_refused_502_is_an_error_span(
    spans_proxy: StartTraced,
    client: aiohttp.ClientSession,
) -> None:
    """A 502 the proxy answered: status ERROR, error.type from Proxy-Status, no response code."""
    receiver, proxy = await spans_proxy()
    status, _ = await _get(client, proxy, f"http://127.0.0.1:{closed_port()}/")
    assert status == 502
    [span] = await receiver.wait_for_spans(1)
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert span.status.message == "upstream refused the connection"
    assert attributes(span)["error.type"] == "connection_refused"
    assert "http.response.status_code" not in attributes(span)


async def test_response_headers_timeout_is_an_error_span(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """A 504 for headers that never came: status ERROR with error.type http_response_timeout."""
    receiver, proxy = await spans_proxy(response_headers_timeout=0.2)
    status, _ = await _get(client, proxy, origin.url("/slow-headers?ms=3000"))
    assert status == 504
    [span] = await receiver.wait_for_spans(1)
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert attributes(span)["error.type"] == "http_response_timeout"


async def test_upstream_5xx_fails_the_client_span(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """An upstream 503 is relayed; the span is ERROR with error.type "503" (semconv)."""
    receiver, proxy = await spans_proxy()
    status, _ = await _get(client, proxy, origin.url("/status/503"))
    assert status == 503
    [span] = await receiver.wait_for_spans(1)
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert attributes(span)["http.response.status_code"] == 503
    assert attributes(span)["error.type"] == "503"


async def test_tunnel_gets_a_connect_span(
    spans_proxy: StartTraced,
    raw_origin: StartRaw,
    logs: LogCapture,
) -> None:
    """A CONNECT tunnel is one CONNECT span with its connect event, linked to the caller."""
    port = (await raw_origin(echo)).port
    receiver, proxy = await spans_proxy(connect_ports=(port,))
    address = proxy.server.proxy_address
    assert address is not None
    reader, writer = await asyncio.open_connection(address.host, address.port)
    authority = f"127.0.0.1:{port}"
    writer.write(
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        f"traceparent: {SAMPLED_TP}\r\n\r\n".encode()
    )
    assert (await asyncio.wait_for(read_head(reader), 10)).startswith(b"HTTP/1.1 200")
    writer.close()
    [span] = await receiver.wait_for_spans(1)
    assert span.name == "CONNECT"
    assert span.trace_id.hex() == CALLER_TRACE
    assert span.parent_span_id.hex() == CALLER_SPAN
    assert [event.name for event in span.events] == ["connect"]
    found = attributes(span)
    assert found["server.port"] == port
    assert found["network.peer.address"] == "127.0.0.1"
    [line] = logs.events("tunnel")
    assert line["span_id"] == span.span_id.hex()


async def test_denied_destinations_do_not_stop_the_exporter(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """With loopback denied to users, the 403's span still reaches a loopback collector."""
    receiver, proxy = await spans_proxy(deny_destinations=("127.0.0.0/8",))
    status, _ = await _get(client, proxy, origin.url("/echo"))
    assert status == 403
    [span] = await receiver.wait_for_spans(1)
    assert attributes(span)["error.type"] == "destination_ip_prohibited"


async def _send_raw(proxy: RunningProxy, head: bytes) -> bytes:
    """One request written byte for byte to the proxy listener; its status line back."""
    reader, writer = await proxy.connect()
    try:
        writer.write(head)
        return (await asyncio.wait_for(read_head(reader), 10)).split(b"\r\n")[0]
    finally:
        writer.close()


async def test_tracestate_that_is_not_utf8_does_not_stop_span_export(
    spans_proxy: StartTraced,
    origin: Origin,
    client: aiohttp.ClientSession,
    logs: LogCapture,
) -> None:
    """tracestate: vendor=\\xff is left out of its span; that span and the next are exported."""
    receiver, proxy = await spans_proxy()
    head = (
        f"GET {origin.url('/echo')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
        f"traceparent: {SAMPLED_TP}\r\ntracestate: vendor=\xff\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    for _ in range(2):
        assert await _send_raw(proxy, head) == b"HTTP/1.1 200 OK"
    status, _ = await _get(client, proxy, origin.url("/echo"), traceparent=SAMPLED_TP)
    assert status == 200
    first, second, third = await receiver.wait_for_spans(3)
    assert (first.trace_state, second.trace_state) == ("", "")  # W3C: printable ASCII only
    assert third.trace_state == ""  # none was sent
    assert proxy.sample("proxy_spans_cleaned_total") == 2
    [line] = logs.events("span_cleaned")  # once, however many follow
    assert line["level"] == "warning"
    assert line["trace_id"] == CALLER_TRACE


async def test_a_record_that_cannot_be_encoded_is_dropped_alone_and_counted(
    traced_proxy: StartTraced,  # noqa: F811
    logs: LogCapture,
) -> None:
    """A record protobuf refuses even when cleaned is dropped; the rest of its batch goes out."""
    receiver, proxy = await traced_proxy(otlp_export_interval=3600.0)
    assert proxy.server.spans is not None
    assert proxy.server.span_exporter is not None
    queue = proxy.server.spans.queue
    good = SpanRecord("GET", CALLER_TRACE, "1" * 16, None, 0.0, 1.0, {}, [])
    unencodable = SpanRecord("GET", "not hex" * 5, "2" * 16, None, 0.0, 1.0, {}, [])
    for record in (good, unencodable, good):
        queue.add(record)
    await proxy.server.span_exporter.export_batch()
    assert [span.span_id.hex() for span in receiver.spans()] == ["1" * 16] * 2
    assert proxy.sample("proxy_spans_dropped_total", reason="unencodable") == 1
    assert proxy.sample("proxy_span_exports_total", result="success") == 1
    [line] = logs.events("span_dropped")
    assert line["level"] == "warning"


def _reachable(root: object) -> list[object]:
    """Every object reachable from ``root``, not descending into code, classes or modules."""
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, types.ModuleType | type | types.FunctionType):
            continue
        if isinstance(obj, dict) and "__builtins__" in obj:
            continue  # a module's globals
        seen[id(obj)] = obj
        stack.extend(gc.get_referents(obj))
    return list(seen.values())


async def test_export_off_builds_no_span_objects(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession, logs: LogCapture
) -> None:
    """Without an endpoint the proxy holds no recorder, queue, exporter or record at all."""
    _, echoed = await _get(client, proxy, origin.url("/echo"), traceparent=SAMPLED_TP)
    reachable = _reachable(proxy.server)
    assert len(reachable) > 1000  # the walk did reach the apps, handlers and sessions
    span_types = (SpanRecord, SpanQueue, SpanRecorder, SpanExporter, TraceIdRatio)
    assert not [obj for obj in reachable if isinstance(obj, span_types)]
    assert proxy.server.spans is None
    assert proxy.server.span_exporter is None
    assert _seen_traceparent(echoed) == SAMPLED_TP
    assert logs.events("access")[0]["span_id"] is None
    assert proxy.sample("proxy_spans_dropped_total", reason="queue_full") is None


async def test_export_on_is_found_by_the_same_walk(
    spans_proxy: StartTraced,
) -> None:
    """The walk that finds nothing with export off finds the recorder and exporter when on."""
    _, proxy = await spans_proxy()
    found = {type(obj) for obj in _reachable(proxy.server)}
    assert {SpanQueue, SpanRecorder, SpanExporter, TraceIdRatio} <= found
