"""The live page's bookkeeping, per host label: a history of the counters and rings of recent calls.

A ``Live`` record hangs on each host's ``HostStats`` (``proxy.observe.metrics``), so the host
label cap and the label ttl bound it exactly as they bound the host's series, and a label
that expires takes its rings with it. All of it is bounded:

- the history: a snapshot of the host's counters and phase histograms at the first update
  after each ``STEP`` boundary, ``HISTORY`` of them (a minute and a step);
- the dots: the last ``DOTS`` calls' time, total and status, in arrays (18 bytes a dot);
- the slowest calls: two generations of ``SLOWEST`` each (min-heaps on the total), so a slow
  call stays listed for ``GENERATION`` to twice that;
- the failed calls: the last ``FAILED``.

Per call that is a dot appended and one comparison with the slowest heap's smallest total; a
full ``Call`` is built only for a call that is slow enough or failed. Nothing else runs until
someone reads the page (``proxy.observe.page``), and then the numbers come from the same
counters and histograms ``/metrics`` shows: the history only remembers what they were.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

STEP: Final = 5.0  # seconds between counter snapshots
WINDOW: Final = 60.0  # "the last minute" of rates, ratios and quantiles
# Snapshots kept: enough to find the value at the last boundary at least WINDOW ago.
HISTORY: Final = int(WINDOW // STEP) + 2
DOTS: Final = 300
DOT_SPAN: Final = 300.0  # the calls-over-time plot shows the last five minutes
SLOWEST: Final = 20
GENERATION: Final = 120.0
FAILED: Final = 20


class Counts(NamedTuple):
    """A host's counters and phase histograms at one moment (``HostStats.counts``).

    Arrays, not lists of ints: a snapshot is kept for a minute, and its counts would each be
    an int object of their own (28 bytes, not 8) once they pass 256.
    """

    requests: int
    tunnels: int
    errors: int
    buckets: array[int]  # each ``PHASES`` row's bucket counts in turn (not cumulative)
    sums: array[float]  # each row's sum of observations


@dataclass(slots=True, eq=False)
class Call:
    """One finished call as the page lists it: ids, method, path without its query, status,
    error and phases (seconds); never a header value or a body."""

    at: float  # the metrics clock (monotonic) when it finished
    host: str
    method: str
    path: str
    status: int
    error: str | None
    request_id: str
    trace_id: str | None
    total: float
    phases: tuple[float | None, ...]  # queue, dns, connect, tls, ttfb: None where not run

    def __lt__(self, other: Call) -> bool:
        # heapq orders by this: the heap's top is the fastest of the slow calls.
        return self.total < other.total

    def __repr__(self) -> str:
        return f"<Call {self.method} {self.host} {self.status} {self.total:.6f}s {self.request_id}>"


# A dot of the calls-over-time plot: (finished at, total seconds, status, failed).
Dot = tuple[float, float, int, bool]


class Dots:
    """The last ``DOTS`` calls as three arrays written in turn (a ring); a failed call's
    status is stored negated."""

    __slots__ = ("_at", "_next", "_status", "_total")

    def __init__(self) -> None:
        self._at = array("d")
        self._total = array("d")
        self._status = array("h")
        self._next = 0  # the slot the next call overwrites, once the arrays are full

    def add(self, at: float, total: float, status: int, failed: bool) -> None:
        code = -status if failed else status
        i = self._next
        if len(self._at) < DOTS:
            self._at.append(at)
            self._total.append(total)
            self._status.append(code)
            return
        self._at[i] = at
        self._total[i] = total
        self._status[i] = code
        self._next = (i + 1) % DOTS

    def __len__(self) -> int:
        return len(self._at)

    def __iter__(self) -> Iterator[Dot]:
        """Oldest first."""
        order = [*range(self._next, len(self._at)), *range(self._next)]
        at, total, status = self._at, self._total, self._status
        return ((at[i], total[i], abs(status[i]), status[i] < 0) for i in order)

    def __repr__(self) -> str:
        return f"<Dots {len(self)}>"


class Slowest:
    """The slowest calls of the last ``GENERATION`` to ``2 * GENERATION`` seconds.

    Two generations of bounded min-heaps: a call enters the current one when it is slower
    than its fastest (or it is not full yet); at the generation's end the current one becomes
    the previous one and the oldest is dropped, so the heaps never need a scan for age.
    """

    __slots__ = ("_current", "_ends", "_previous")

    def __init__(self) -> None:
        self._current: list[Call] = []
        self._previous: list[Call] = []
        self._ends = 0.0

    def admits(self, at: float, total: float) -> bool:
        """Whether a call of ``total`` seconds, finished at ``at``, is among the slowest."""
        if at >= self._ends:
            # After a quiet spell longer than a generation, the previous one is stale too.
            self._previous = self._current if at < self._ends + GENERATION else []
            self._current = []
            self._ends = at + GENERATION
        heap = self._current
        return len(heap) < SLOWEST or total > heap[0].total

    def offer(self, call: Call) -> None:
        heap = self._current
        if len(heap) < SLOWEST:
            heapq.heappush(heap, call)
        elif heap[0] < call:
            heapq.heapreplace(heap, call)

    def calls(self, now: float) -> list[Call]:
        """The slowest ``SLOWEST`` of the last two generations at ``now``, slowest first."""
        since = now - 2 * GENERATION
        kept = [call for call in (*self._previous, *self._current) if call.at >= since]
        return heapq.nlargest(SLOWEST, kept)

    def __repr__(self) -> str:
        return f"<Slowest current={len(self._current)} previous={len(self._previous)}>"


class Live:
    """One host's history and rings; ``proxy.observe.metrics.Metrics`` makes one per label."""

    __slots__ = ("_history", "dots", "failed", "next_snapshot", "slowest")

    def __init__(self) -> None:
        self._history: deque[tuple[int, Counts]] = deque(maxlen=HISTORY)
        # Metrics.host() compares with this on every update, then calls snapshot().
        self.next_snapshot = 0.0
        self.dots = Dots()
        self.slowest = Slowest()
        self.failed: deque[Call] = deque(maxlen=FAILED)

    # -- the request path -------------------------------------------------------------------

    def snapshot(self, now: float, counts: Counts) -> None:
        """``counts`` are the counters at ``now``'s step boundary: nothing has changed them
        since the last update, which came before that boundary (``next_snapshot``)."""
        step = int(now // STEP)
        self.next_snapshot = (step + 1) * STEP
        self._history.append((step, counts))

    def add(self, at: float, total: float, status: int, error: str | None) -> bool:
        """A finished call's dot; True when it should be kept in full (``keep``)."""
        self.dots.add(at, total, status, error is not None)
        return self.slowest.admits(at, total) or error is not None

    def keep(self, call: Call) -> None:
        """A call that ``add`` asked for, or a failed tunnel (never a dot: it is no request)."""
        if call.error is not None:
            self.failed.append(call)
        if self.slowest.admits(call.at, call.total):
            self.slowest.offer(call)

    # -- the read path ----------------------------------------------------------------------

    def counts_at(self, boundary: float, current: Counts) -> Counts:
        """The counters at a step ``boundary`` (a multiple of ``STEP``).

        The first snapshot at or after it: no update came between the boundary and that
        snapshot. With none, nothing has changed since the boundary: ``current``.
        """
        step = round(boundary / STEP)
        for taken, counts in self._history:
            if taken >= step:
                return counts
        return current

    def __repr__(self) -> str:
        return (
            f"<Live history={len(self._history)} dots={len(self.dots)} "
            f"failed={len(self.failed)} {self.slowest!r}>"
        )


def window_start(now: float, seconds: float = WINDOW) -> float:
    """The last step boundary at least ``seconds`` before ``now``."""
    return ((now - seconds) // STEP) * STEP


def quantile(q: float, bounds: Sequence[float], cumulative: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram, as Prometheus' ``histogram_quantile`` computes it.

    ``cumulative`` are the bucket counts as ``/metrics`` shows them (each bucket holds those
    below it), the last one +Inf. Linear interpolation within the bucket the rank falls in,
    from 0 for the first bucket (bounds are positive: ``proxy.config.parse_buckets``); a rank
    in +Inf gives the largest finite bound; no observations give None (Prometheus: NaN). The
    arithmetic is done in the same order, so the result is the same float.
    """
    observations = cumulative[-1]
    if observations == 0:
        return None
    rank = q * observations
    # The first bucket whose count reaches the rank (+Inf is not searched).
    b = bisect_left(cumulative, rank, 0, len(bounds))
    if b == len(bounds):
        return bounds[-1]
    start, end, count = 0.0, bounds[b], cumulative[b]
    if b > 0:
        start = bounds[b - 1]
        count -= cumulative[b - 1]
        rank -= cumulative[b - 1]
    return start + (end - start) * (rank / count)
