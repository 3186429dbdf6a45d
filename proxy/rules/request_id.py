"""Request ids and W3C trace context: keep what is valid, replace what is not."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# 1-128 characters of a conservative alphabet: safe in logs, headers and URLs.
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def valid_request_id(value: str | None) -> bool:
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    """A random id in the familiar 8-4-4-4-12 hex layout (122 random bits, like UUIDv4)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def choose_request_id(incoming: str | None) -> str:
    return incoming if incoming is not None and valid_request_id(incoming) else new_request_id()


# W3C Trace Context §3.2: version-traceid-parentid-flags, lower-case hex. Version ff is
# invalid; a future version may append fields after a dash, which we keep forwarding.
_TRACEPARENT: Final = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<parent>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?"
)
_ZERO_TRACE: Final = "0" * 32
_ZERO_PARENT: Final = "0" * 16

# A new trace the proxy does not record is not sampled: §3.2.2.5 says the flag tells
# whether the caller may have recorded. Whatever it records (span export on: a sampled
# caller, or a new trace the ratio chose) goes out with 01, the sampled bit alone: version
# 00 defines no other flag, and §3.2.2.5.2 says the rest MUST be zero. See
# docs/trace-context.md.
NEW_TRACE_FLAGS: Final = "00"
RECORDED_FLAGS: Final = "01"
_SAMPLED_BIT: Final = 0x01


@dataclass(frozen=True, slots=True)
class TraceContext:
    traceparent: str  # what goes upstream and back to the client
    trace_id: str
    kept: bool  # False when we started a new trace; an incoming tracestate is then dropped
    parent_id: str | None = None  # the caller's span (the incoming parent id), if any
    span_id: str | None = None  # the proxy's own span, only when it records one


def parse_traceparent_fields(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid traceparent, else None."""
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace, parent, flags, rest = match.group("version", "trace", "parent", "flags", "rest")
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    return trace, parent, flags


def sampled(flags: str) -> bool:
    """The sampled bit of trace-flags (§3.2.2.5)."""
    return bool(int(flags, 16) & _SAMPLED_BIT)


def parse_traceparent(value: str | None) -> str | None:
    """The trace id of a valid traceparent, else None."""
    fields = parse_traceparent_fields(value)
    return None if fields is None else fields[0]


def choose_trace_context(
    incoming: str | None, record_new: Callable[[str], bool] | None = None
) -> TraceContext:
    """Keep a valid incoming trace or start one; with ``record_new``, take part in it.

    ``record_new`` is given only when spans are exported; it decides for a trace the proxy
    starts (by its id). An incoming trace is recorded when its sampled flag is set
    (parent-based sampling). A recorded request goes upstream with the proxy's span id as
    its parent (W3C Trace Context §4.3: a participant updates parent-id and writes the
    version it knows, 00, with that version's one flag); one not recorded goes as it
    came, or as a new unsampled trace.
    """
    fields = parse_traceparent_fields(incoming)
    if fields is not None and incoming is not None:
        trace_id, parent_id, flags = fields
        if record_new is None or not sampled(flags):
            return TraceContext(incoming.strip(), trace_id, kept=True)
        span_id = os.urandom(8).hex()
        return TraceContext(
            f"00-{trace_id}-{span_id}-{RECORDED_FLAGS}",
            trace_id,
            kept=True,
            parent_id=parent_id,
            span_id=span_id,
        )
    trace_id = os.urandom(16).hex()
    span_id = os.urandom(8).hex()
    if record_new is not None and record_new(trace_id):
        return TraceContext(
            f"00-{trace_id}-{span_id}-{RECORDED_FLAGS}",
            trace_id,
            kept=False,
            span_id=span_id,
        )
    return TraceContext(f"00-{trace_id}-{span_id}-{NEW_TRACE_FLAGS}", trace_id, kept=False)
