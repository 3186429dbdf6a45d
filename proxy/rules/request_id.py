"""Request ids and W3C trace context: keep what is valid, replace what is not."""

from __future__ import annotations

import os
import re
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
    r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<parent>[0-9a-f]{16})-[0-9a-f]{2}(?P<rest>-.*)?"
)
_ZERO_TRACE: Final = "0" * 32
_ZERO_PARENT: Final = "0" * 16

# New traces are not sampled: the proxy records no span, and §3.2.2.5 says the flag
# tells whether the caller may have recorded. See "Trace context" in README.md.
NEW_TRACE_FLAGS: Final = "00"


@dataclass(frozen=True, slots=True)
class TraceContext:
    traceparent: str
    trace_id: str
    kept: bool  # False when we started a new trace; an incoming tracestate is then dropped


def parse_traceparent(value: str | None) -> str | None:
    """The trace id of a valid traceparent, else None."""
    if value is None:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace, parent, rest = match.group("version", "trace", "parent", "rest")
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    return trace


def choose_trace_context(incoming: str | None) -> TraceContext:
    trace_id = parse_traceparent(incoming)
    if trace_id is not None and incoming is not None:
        return TraceContext(incoming.strip(), trace_id, kept=True)
    trace_id = os.urandom(16).hex()
    parent = os.urandom(8).hex()
    return TraceContext(f"00-{trace_id}-{parent}-{NEW_TRACE_FLAGS}", trace_id, kept=False)
