"""Request ids and trace context: valid ones are kept, everything else is replaced."""

from __future__ import annotations

import re
from collections.abc import Callable

import aiohttp
import pytest

from proxy.rules.request_id import (
    choose_request_id,
    choose_trace_context,
    new_request_id,
    parse_traceparent,
    parse_traceparent_fields,
)
from tests.conftest import LogCapture, Origin, RunningProxy

VALID_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value", ["abc", "a" * 128, "A.b_c:d@e/f+g=h-1", "0"])
def test_valid_request_ids_are_kept(value: str) -> None:
    """An id of 1-128 allowed characters is kept as it is."""
    assert choose_request_id(value) == value


@pytest.mark.parametrize(
    "value", [None, "", "a" * 129, "has space", 'quo"te', "new\nline", "tab\t", "ünï", "a;b"]
)
def test_invalid_request_ids_are_replaced(value: str | None) -> None:
    """A missing, too long, or oddly-charactered id is replaced by a fresh one."""
    chosen = choose_request_id(value)
    assert chosen != value
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", chosen
    )


def test_generated_request_ids_differ() -> None:
    """Two generated ids are different."""
    assert len({new_request_id() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("value", "trace_id"),
    [
        (VALID_TP, "4bf92f3577b34da6a3ce929d0e0e4736"),
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            "4bf92f3577b34da6a3ce929d0e0e4736",
        ),
        (None, None),
        ("", None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
        (VALID_TP + "-extra", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
    ],
)
def test_traceparent_validation(value: str | None, trace_id: str | None) -> None:
    """Only a well-formed traceparent of a known or future version yields its trace id."""
    assert parse_traceparent(value) == trace_id


def test_new_trace_is_well_formed_and_not_sampled() -> None:
    """A replaced trace context is a valid version-00 traceparent with flags 00."""
    context = choose_trace_context("garbage")
    assert not context.kept
    assert parse_traceparent(context.traceparent) == context.trace_id
    assert context.traceparent.endswith("-00")


async def test_valid_ids_flow_upstream_back_and_into_the_log(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession, logs: LogCapture
) -> None:
    """A valid id and traceparent reach the origin, come back on the response and are logged."""
    sent = {"X-Request-ID": "req-1", "traceparent": VALID_TP, "tracestate": "v=1"}
    async with client.get(origin.url("/echo"), headers=sent, proxy=proxy.url) as resp:
        echo = await resp.json()
        assert resp.headers["X-Request-ID"] == "req-1"
        assert resp.headers["traceparent"] == VALID_TP
    seen = {k.lower(): v for k, v in echo["headers"]}
    assert seen["x-request-id"] == "req-1"
    assert seen["traceparent"] == VALID_TP
    assert seen["tracestate"] == "v=1"
    (line,) = logs.events("access")
    assert line["request_id"] == "req-1"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_invalid_ids_are_replaced_and_orphan_tracestate_dropped(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession, logs: LogCapture
) -> None:
    """A bad id and traceparent are replaced; the tracestate of the dropped trace goes too."""
    sent = {"X-Request-ID": "bad id", "traceparent": "nope", "tracestate": "v=1"}
    async with client.get(origin.url("/echo"), headers=sent, proxy=proxy.url) as resp:
        echo = await resp.json()
        returned_id = resp.headers["X-Request-ID"]
    seen = [(k.lower(), v) for k, v in echo["headers"]]
    assert ("x-request-id", returned_id) in seen
    assert [k for k, _ in seen].count("x-request-id") == 1
    assert "tracestate" not in dict(seen)
    trace_id = parse_traceparent(dict(seen)["traceparent"])
    (line,) = logs.events("access")
    assert line["request_id"] == returned_id != "bad id"
    assert line["trace_id"] == trace_id


async def test_request_id_header_name_is_configurable(
    start_proxy: object, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """With --request-id-header X-Correlation-ID that field carries the id."""
    proxy = await start_proxy(request_id_header="X-Correlation-ID")  # type: ignore[operator]
    headers = {"X-Correlation-ID": "corr-7"}
    async with client.get(origin.url("/echo"), headers=headers, proxy=proxy.url) as resp:
        echo = await resp.json()
        assert resp.headers["X-Correlation-ID"] == "corr-7"
    assert ["X-Correlation-ID", "corr-7"] in echo["headers"]


_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
_PARENT = "00f067aa0ba902b7"


def _always(trace_id: str) -> bool:
    return True


def _never(trace_id: str) -> bool:
    return False


@pytest.mark.parametrize(
    ("incoming", "record_new", "kept", "recorded", "flags"),
    [
        # Pass-through: no recorder given, nothing changes.
        (VALID_TP, None, True, False, "01"),
        (None, None, False, False, "00"),
        # Participant: a sampled caller is followed whatever the ratio says.
        (VALID_TP, _never, True, True, "01"),
        (f"00-{_TRACE}-{_PARENT}-00", _always, True, False, "00"),  # unsampled: passed through
        (f"01-{_TRACE}-{_PARENT}-03-future", _always, True, True, "01"),  # only the sampled bit
        (f"00-{_TRACE}-{_PARENT}-03", None, True, False, "03"),  # passed through: as it came
        (None, _always, False, True, "01"),
        (None, _never, False, False, "00"),
        ("garbage", _always, False, True, "01"),
    ],
)
def test_participant_trace_context(
    incoming: str | None,
    record_new: Callable[[str], bool] | None,
    kept: bool,
    recorded: bool,
    flags: str,
) -> None:
    """A recorded request goes out as 00-trace-<own span>-flags; an unrecorded one as today."""
    context = choose_trace_context(incoming, record_new)
    assert context.kept is kept
    fields = parse_traceparent_fields(context.traceparent)
    assert fields is not None
    trace_id, parent_id, sent_flags = fields
    assert sent_flags == flags
    assert trace_id == context.trace_id
    if kept:
        assert trace_id == _TRACE
    if recorded:
        assert context.span_id == parent_id
        assert context.traceparent.startswith("00-")  # §4.3: written in the version we know
        assert context.parent_id == (_PARENT if kept else None)
    else:
        assert context.span_id is None
        assert context.parent_id is None
        if kept:
            assert context.traceparent == incoming


@pytest.mark.parametrize(
    ("incoming", "sent_flags"),
    [
        (f"00-{_TRACE}-{_PARENT}-ff", "01"),
        (f"00-{_TRACE}-{_PARENT}-03", "01"),
        (f"00-{_TRACE}-{_PARENT}-81", "01"),
        (f"01-{_TRACE}-{_PARENT}-ff-future", "01"),
    ],
)
def test_recorded_traceparent_with_reserved_flag_bits_goes_out_with_them_zero(
    incoming: str, sent_flags: str
) -> None:
    """A version-00 traceparent the proxy writes has only the sampled bit (W3C §3.2.2.5)."""
    context = choose_trace_context(incoming, _always)
    assert context.span_id is not None
    assert context.traceparent == f"00-{_TRACE}-{context.span_id}-{sent_flags}"
