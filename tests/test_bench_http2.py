"""``make bench``'s HTTP/2 study: h2load through the CONNECT shim and ours, read and divided."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.http2 import RATIOS, http2_figures, ratios
from benchmarks.scenarios import Measurement
from tests.conftest import unavailable


def test_ours_over_http2_and_http11_measured_through_the_shim() -> None:
    """A short real run of two rows: h2load's requests all answered through interception,
    the proxy's CPU per request taken, and the HTTP/2 over HTTP/1.1 ratio computed."""
    if shutil.which("h2load") is None:
        unavailable("h2load not installed (apt-get install nghttp2-client)")
    result = http2_figures(seconds=0.5, rounds=1, only=("ours-h2", "ours-h1"))
    (rows,) = result.tables.values()
    assert set(rows) == {"ours-h2", "ours-h1"}
    for row in rows.values():
        assert row.requests > 0
        assert row.errors == 0
        assert row.cpu_us_per_request is not None
        assert row.cpu_us_per_request > 0
        assert 0 < row.p50_ms <= row.p99_ms
    assert set(result.figures["cpu_ratios"]) == {"ours HTTP/2 / ours HTTP/1.1"}


@pytest.mark.parametrize(("label", "top", "bottom"), RATIOS)
def test_each_ratio_divides_its_rows(label: str, top: str, bottom: str) -> None:
    """Each ratio is its first row's CPU per request over its second's."""
    rows = {
        name: Measurement(cpu_us_per_request=cpu)
        for name, cpu in [
            ("ours-h2", 700.0),
            ("ours-h1", 350.0),
            ("ours-h2-h1up", 600.0),
            ("mitmproxy-h2", 1400.0),
        ]
    }
    assert ratios(rows)[label] == pytest.approx(
        rows[top].cpu_us_per_request / rows[bottom].cpu_us_per_request  # type: ignore[operator]
    )


def test_a_ratio_is_left_out_when_a_row_did_not_run() -> None:
    """Without mitmproxy's row, no ratio against it."""
    rows = {"ours-h2": Measurement(cpu_us_per_request=700.0)}
    assert ratios(rows) == {}
