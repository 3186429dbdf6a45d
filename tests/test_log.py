"""The access line's encoding, its timestamps, and stdout buffering."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys

import pytest
import structlog

from proxy.observe.log import JSONLine, UTCTimeStamper

CASES = [
    pytest.param({"event": "access", "status": 200, "ttfb_ms": 0.412, "error": None}, id="plain"),
    pytest.param({"host": "bücher.example", "path": "/é"}, id="non-ascii"),
    pytest.param({"path": "/\udcff"}, id="lone-surrogate"),  # surrogateescape'd client bytes
    pytest.param({"bytes_in": 2**70}, id="int-past-64-bits"),
]


@pytest.mark.parametrize("event", CASES)
def test_json_line_is_ascii_and_round_trips(event: dict[str, object]) -> None:
    """Every line is 7-bit clean JSON that decodes back to the event."""
    line = JSONLine()(event)
    assert line == json.dumps(event, ensure_ascii=True)  # the stdlib's text, exactly
    assert line.isascii()
    assert "\n" not in line
    assert json.loads(line) == event


def test_json_line_uses_the_fallback_handler() -> None:
    """An object JSON cannot hold is rendered by structlog's default handler, not dropped."""
    line = JSONLine()({"obj": 1j}, default=repr)
    assert json.loads(line) == {"obj": "1j"}


def _stamp_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_timestamps_have_structlogs_layout_and_order() -> None:
    """Ours sits between two of structlog's own ISO UTC stamps and has the same layout."""
    theirs = structlog.processors.TimeStamper(fmt="iso", utc=True)
    ours = UTCTimeStamper()
    before = theirs(None, "info", {})["timestamp"]
    stamp = ours(None, "info", {})["timestamp"]
    after = theirs(None, "info", {})["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert _stamp_time(before) <= _stamp_time(stamp) <= _stamp_time(after)


SCRIPT = """
import os
from proxy.observe import log
log.configure("json", "info")
log.get_logger().info("first")
os.write(1, b"MARK\\n")
log.flush()
"""


def test_stdout_is_buffered_even_with_pythonunbuffered() -> None:
    """With PYTHONUNBUFFERED=1 a line still waits for the flush: a write behind it lands first."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
    ).stdout.splitlines()
    assert out[0] == "MARK"
    assert json.loads(out[1])["event"] == "first"
