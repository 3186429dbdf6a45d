"""The live page's bookkeeping: counter history by step, bounded rings, Prometheus' quantile."""

from __future__ import annotations

import pytest

from proxy.observe import live
from proxy.observe.live import Call, Live, Slowest, quantile, window_start
from proxy.observe.metrics import Metrics


class Clock:
    """A settable metrics clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def call(at: float, total: float, error: str | None = None, request_id: str = "r") -> Call:
    return Call(at, "h", "GET", "/", 502 if error else 200, error, request_id, None, total, ())


def count(metrics: Metrics, host: str, error: str | None = None) -> None:
    """What the observers do with one finished request: host(), then the counters move."""
    stats = metrics.host(host)
    stats.requests[("GET", "200")] = stats.requests.get(("GET", "200"), 0) + 1
    if error is not None:
        stats.errors[error] = stats.errors.get(error, 0) + 1


@pytest.mark.parametrize(
    ("q", "cumulative", "expected"),
    [
        (0.5, (3, 10, 10), 0.1 + (0.3 - 0.1) * (2.0 / 7)),  # interpolated in the second bucket
        (0.5, (10, 10, 10), 0.05),  # the first bucket starts at 0
        (0.99, (0, 0, 5), 0.3),  # a rank in +Inf gives the largest finite bound
        (0.5, (0, 0, 0), None),  # no observations: Prometheus says NaN
        (0.5, (5, 5, 10), 0.1),  # rank 5 is reached at the end of the first bucket
    ],
)
def test_quantile_as_histogram_quantile(
    q: float, cumulative: tuple[int, ...], expected: float | None
) -> None:
    """The quantile interpolates within buckets the way histogram_quantile does."""
    assert quantile(q, (0.1, 0.3), cumulative) == expected


def test_counts_at_a_boundary_are_those_before_the_first_update_after_it() -> None:
    """The history gives each step boundary's exact counter values, gaps and all."""
    clock = Clock()
    metrics = Metrics((1.0,), clock=clock, live=True)
    clock.now = 1001.0  # step 200 (1000-1005)
    count(metrics, "a")
    count(metrics, "a")
    clock.now = 1021.0  # step 204; nothing in 201-203
    count(metrics, "a", error="connection_refused")
    clock.now = 1031.0
    stats = metrics.hosts["a"]
    assert stats.live is not None
    current = stats.counts()
    assert [stats.live.counts_at(b, current).requests for b in (995, 1000, 1005, 1020, 1025)] == [
        0,  # before the label existed
        0,
        2,  # 1005, 1010 and 1015 all saw the two first requests only
        2,
        3,  # nothing since 1021: the current counts
    ]
    assert stats.live.counts_at(1025.0, current).errors == 1


def test_window_start_is_a_step_boundary_a_minute_back() -> None:
    """The window starts at the last step boundary at least a minute before now."""
    assert window_start(1061.0) == 1000.0
    assert window_start(1060.0) == 1000.0
    assert window_start(1064.9) == 1000.0
    assert window_start(1065.0) == 1005.0


def test_history_is_bounded() -> None:
    """A host busy for an hour keeps a minute and a step of snapshots."""
    clock = Clock()
    metrics = Metrics((1.0,), clock=clock, live=True)
    for second in range(3600):
        clock.now = 1000.0 + second
        count(metrics, "a")
    stats = metrics.hosts["a"]
    assert stats.live is not None
    assert len(stats.live._history) == live.HISTORY
    # Still exact a minute back: the window 4535-4599 holds the 65 requests made in it.
    start = window_start(clock.now)
    assert start == 4535.0
    assert stats.counts().requests - stats.live.counts_at(start, stats.counts()).requests == 65


def test_metrics_without_the_page_keep_no_rings() -> None:
    """With the page off no host has a Live record."""
    metrics = Metrics((1.0,))
    assert metrics.host("a").live is None


def test_dots_and_failed_are_bounded_rings() -> None:
    """Past their size the oldest dots and failed calls go."""
    ring = Live()
    for i in range(live.DOTS + 5):
        ring.add(float(i), i / 1000, 502, "connection_refused" if i % 2 else None)
    for i in range(live.FAILED + 5):
        ring.keep(call(float(i), 0.001, "connection_refused", request_id=f"f{i}"))
    assert len(ring.dots) == live.DOTS
    assert list(ring.dots) == [
        (float(i), i / 1000, 502, bool(i % 2)) for i in range(5, live.DOTS + 5)
    ]
    assert ring.failed[0].request_id == "f5"
    assert len(ring.failed) == live.FAILED


def test_add_asks_for_slow_and_failed_calls_only() -> None:
    """Once the slowest heap is full, only a slower call or a failed one is asked for."""
    ring = Live()
    for i in range(live.SLOWEST):
        assert ring.add(1.0, 0.010 + i / 1000, 200, None)
        ring.keep(call(1.0, 0.010 + i / 1000))
    assert not ring.add(2.0, 0.005, 200, None)
    assert ring.add(2.0, 0.005, 502, "connection_refused")
    assert ring.add(2.0, 0.300, 200, None)


def test_slowest_keeps_the_slowest_of_two_generations() -> None:
    """The slowest calls stay listed for one to two generations, then go."""
    slowest = Slowest()
    at = 0.0
    for i in range(3 * live.SLOWEST):
        total = i / 1000
        if slowest.admits(at, total):
            slowest.offer(call(at, total, request_id=f"r{i}"))
    top = slowest.calls(at)
    assert [c.request_id for c in top] == [f"r{i}" for i in range(3 * live.SLOWEST - 1, 39, -1)]
    later = live.GENERATION + 1.0  # a new generation: the old one is still shown
    assert slowest.admits(later, 0.0)
    slowest.offer(call(later, 0.0, request_id="new"))
    shown = [c.request_id for c in slowest.calls(later)]
    assert len(shown) == live.SLOWEST
    assert shown[-1] == "r40"
    assert "new" not in shown
    gone = 3 * live.GENERATION + 2.0  # two generations on, nothing of the first is left
    assert [c.request_id for c in slowest.calls(gone)] == []
