"""The live page on the admin listener: ``/`` and the JSON behind it (docs/live-page.md).

Every number is read, when asked, from the per-host stats ``/metrics`` renders, windowed with
the history ``proxy.observe.live`` keeps; the calls come from its rings. The HTML is rendered
here from the same views as the JSON, so the page shows its hosts table without JavaScript
and its script only swaps in a fresh copy every 2 s (one renderer, not a second in JS).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import json
import math
import re
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html import escape
from importlib import resources
from itertools import accumulate, islice
from time import perf_counter
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web

from proxy import __version__
from proxy.observe.live import (
    DOT_SPAN,
    Call,
    Counts,
    Dot,
    quantile,
    window_start,
)
from proxy.observe.metrics import PHASE_ATTRS, HostStats, Metrics

TEMPLATE: Final = resources.files("proxy.observe").joinpath("page.html").read_text("utf-8")
_SCRIPT: Final = re.search(r"<script>(.*?)</script>", TEMPLATE, re.DOTALL)
assert _SCRIPT is not None, "page.html has its script inline"
# Nothing but this page's own script, styles and requests to itself: no CDN can creep in.
CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
    "script-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_SCRIPT.group(1).encode()).digest()).decode()
    + "'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

WINDOWS: Final = ("minute", "all")  # the last minute, or since the host label was made
QUANTILES: Final = (("p50", 0.5), ("p99", 0.99))
SHOWN_FAILED: Final = 50  # the last failed calls across hosts on the page
SHOWN_HOSTS: Final = 100  # rows of the page's hosts table (the JSON has every host)
SLICE: Final = 0.001  # seconds reading the stats may hold the event loop at a time
PATH_CHARS: Final = 200  # longer paths are cut on the page (the JSON has them whole)
UNKNOWN: Final = "&ndash;"  # a cell with no number: the phase did not run, or no data


class BadQuery(ValueError):
    """A query parameter the page cannot use; answered with 400 and this text."""


# -- views: the numbers, computed when someone looks ------------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseView:
    """One phase histogram over the window: observations, their sum, p50 and p99 (seconds)."""

    count: int
    sum: float
    p50: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class HostView:
    host: str
    requests: int  # forwarded requests finished in the window
    tunnels: int  # tunnels (and WebSockets after their 101) ended in the window
    errors: int
    requests_per_s: float
    tunnels_per_s: float
    error_ratio: float | None  # errors / (requests + tunnels); None without either
    phases: dict[str, PhaseView]

    @property
    def worst(self) -> float | None:
        """The p99 total the table is sorted by."""
        return self.phases["total"].p99

    def per_call(self) -> list[tuple[str, float]]:
        """Where the time goes: seconds per forwarded request in each phase, then ``other``
        (the rest of the total: the body relayed, the proxy's own work)."""
        if self.requests == 0:
            return []
        parts = [(name, self.phases[name].sum / self.requests) for name in PHASE_ATTRS[:-1]]
        rest = self.phases["total"].sum / self.requests - sum(v for _, v in parts)
        return [*parts, ("other", max(rest, 0.0))]


def _difference(now: Counts, then: Counts) -> Counts:
    return Counts(
        now.requests - then.requests,
        now.tunnels - then.tunnels,
        now.errors - then.errors,
        array("q", [a - b for a, b in zip(now.buckets, then.buckets, strict=True)]),
        array("d", [a - b for a, b in zip(now.sums, then.sums, strict=True)]),
    )


def host_view(
    host: str, stats: HostStats, bounds: tuple[float, ...], since: float | None, span: float
) -> HostView:
    """``host`` since ``since`` (a step boundary), or since its label was made; rates are
    per second of ``span``."""
    current = stats.counts()
    if since is None or stats.live is None:
        seen = current
    else:
        seen = _difference(current, stats.live.counts_at(since, current))
    width = len(bounds) + 1  # each phase's buckets, +Inf included
    phases = {}
    for i, attr in enumerate(PHASE_ATTRS):
        cumulative = list(accumulate(seen.buckets[i * width : (i + 1) * width]))
        quantiles = (quantile(q, bounds, cumulative) for _, q in QUANTILES)
        phases[attr] = PhaseView(cumulative[-1], seen.sums[i], *quantiles)
    return HostView(
        host,
        seen.requests,
        seen.tunnels,
        seen.errors,
        seen.requests / span,
        seen.tunnels / span,
        seen.errors / (seen.requests + seen.tunnels) if seen.requests + seen.tunnels else None,
        phases,
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the page shows at one moment."""

    now: float  # the metrics clock
    wall: float  # time.time() at the same moment
    window: str
    seconds: float  # what the rates are per: the window, or less just after a start
    hosts: list[HostView]

    def wall_time(self, at: float) -> float:
        return self.wall - (self.now - at)


class LivePage:
    """``/`` and ``/api/*`` on the admin listener; nothing runs unless they are asked for."""

    def __init__(self, metrics: Metrics, in_flight: Callable[[], int]) -> None:
        self._metrics = metrics
        self._in_flight = in_flight
        self._started = metrics.now()
        self.routes: Final[dict[str, Callable[[web.Request], Any]]] = {
            "/": self.page,
            "/api/hosts": self.api_hosts,
            "/api/calls": self.api_calls,
            "/api/failed": self.api_failed,
        }

    def add_routes(self, app: web.Application) -> None:
        for path, handler in self.routes.items():
            app.router.add_get(path, handler)

    def __repr__(self) -> str:
        return f"<LivePage hosts={len(self._metrics.hosts)}>"

    # -- reading --------------------------------------------------------------------------

    async def snapshot(self, window: str) -> Snapshot:
        """Every host's view; each host is read in one step, and the loop is given back every
        ``SLICE`` seconds between hosts, so proxied traffic flows while a page is read at the
        host cap (about 70 ms of reading for 1,000 hosts)."""
        metrics = self._metrics
        metrics.expire_idle()  # what /metrics would show: no label past its ttl
        now = metrics.now()
        if window == "minute":
            start = window_start(now)
            since: float | None = start
            # Nothing was counted before the start: rates over the time since, if shorter.
            seconds = max(now - max(start, self._started), 1.0)
        else:
            since, seconds = None, math.nan  # no rates since an unknown moment
        hosts = []
        deadline = perf_counter() + SLICE
        for host, stats in list(metrics.hosts.items()):
            hosts.append(host_view(host, stats, metrics.buckets, since, seconds))
            if perf_counter() >= deadline:
                await asyncio.sleep(0)
                deadline = perf_counter() + SLICE
        hosts.sort(key=lambda h: (h.worst is None, -(h.worst or 0.0), h.host))
        return Snapshot(now, time.time(), window, seconds, hosts)

    def calls(self, host: str) -> tuple[list[Dot], list[Call]]:
        """The dots of the last ``DOT_SPAN`` seconds and the slowest calls of ``host``."""
        stats = self._metrics.hosts.get(host)
        if stats is None or stats.live is None:
            return [], []
        now = self._metrics.now()
        dots = [dot for dot in stats.live.dots if dot[0] >= now - DOT_SPAN]
        return dots, stats.live.slowest.calls(now)

    def failed(self, host: str | None = None) -> list[Call]:
        """The last failed calls, newest first: of ``host``, or of every host."""
        hosts = self._metrics.hosts
        chosen = hosts.values() if host is None else [hosts[host]] if host in hosts else []
        rings = (reversed(stats.live.failed) for stats in chosen if stats.live is not None)
        return list(islice(heapq.merge(*rings, key=_newest_first), SHOWN_FAILED))

    # -- serving --------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        window = _window(request)
        snap = await self.snapshot(window)
        chosen = request.query.get("host") or (snap.hosts[0].host if snap.hosts else None)
        dots, slow = self.calls(chosen) if chosen is not None else ([], [])
        body = TEMPLATE.replace(
            "<!--main-->",
            render_main(
                snap,
                chosen,
                dots,
                slow,
                self.failed(),
                in_flight=self._in_flight(),
                tunnels_open=self._metrics.tunnels_open,
                uptime=snap.now - self._started,
            ),
        )
        return web.Response(text=body, content_type="text/html", headers=HEADERS)

    async def api_hosts(self, request: web.Request) -> web.Response:
        snap = await self.snapshot(_window(request))
        return _json(
            {
                "now": snap.wall,
                "window": snap.window,
                "seconds": _number(snap.seconds),
                "hosts": [_host_json(h) for h in snap.hosts],
            }
        )

    async def api_calls(self, request: web.Request) -> web.Response:
        host = request.query.get("host")
        if not host:
            raise web.HTTPBadRequest(text="give ?host=LABEL (a host from /api/hosts)\n")
        if host not in self._metrics.hosts:
            raise web.HTTPNotFound(text=f"no host label {host!r} now\n")
        dots, slow = self.calls(host)
        offset = time.time() - self._metrics.now()
        return _json(
            {
                "host": host,
                "dots": [
                    {"at": at + offset, "total": total, "status": status, "failed": failed}
                    for at, total, status, failed in dots
                ],
                "slowest": [_call_json(call, offset) for call in slow],
                "failed": [_call_json(call, offset) for call in self.failed(host)],
            }
        )

    async def api_failed(self, request: web.Request) -> web.Response:
        offset = time.time() - self._metrics.now()
        return _json({"failed": [_call_json(call, offset) for call in self.failed()]})


def _newest_first(call: Call) -> float:
    return -call.at


def _window(request: web.Request) -> str:
    window = request.query.get("window", WINDOWS[0])
    if window not in WINDOWS:
        raise web.HTTPBadRequest(text=f"window is one of {', '.join(WINDOWS)}\n")
    return window


def _json(value: dict[str, Any]) -> web.Response:
    text = json.dumps(value, allow_nan=False)
    return web.Response(text=text, content_type="application/json", headers=HEADERS)


def _number(value: float | None) -> float | None:
    """JSON has no NaN: a number that is not known is null."""
    return None if value is None or math.isnan(value) else value


def _host_json(h: HostView) -> dict[str, Any]:
    return {
        "host": h.host,
        "requests": h.requests,
        "tunnels": h.tunnels,
        "errors": h.errors,
        "requests_per_s": _number(h.requests_per_s),
        "tunnels_per_s": _number(h.tunnels_per_s),
        "error_ratio": h.error_ratio,
        "phases": {
            name: {"count": p.count, "sum": p.sum, "p50": p.p50, "p99": p.p99}
            for name, p in h.phases.items()
        },
        "per_call": dict(h.per_call()),
    }


def _call_json(call: Call, offset: float) -> dict[str, Any]:
    return {
        "at": call.at + offset,
        "host": call.host,
        "method": call.method,
        "path": call.path,
        "status": call.status,
        "error": call.error,
        "request_id": call.request_id,
        "trace_id": call.trace_id,
        "total": call.total,
        "phases": dict(zip(PHASE_ATTRS, call.phases, strict=False)),
    }


# -- HTML -------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return UNKNOWN
    ms = seconds * 1000.0
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _rate(value: float) -> str:
    return UNKNOWN if math.isnan(value) else f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _clock_text(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _link(**query: str | None) -> str:
    return escape("?" + urlencode({k: v for k, v in query.items() if v}))


def _outcome(status: int, failed: bool) -> str:
    """The class a dot or a row is coloured by."""
    if failed:
        return "failed"
    return "5xx" if status >= 500 else "4xx" if status >= 400 else "ok"


def render_main(
    snap: Snapshot,
    chosen: str | None,
    dots: list[Dot],
    slow: list[Call],
    failed: list[Call],
    *,
    in_flight: int,
    tunnels_open: int,
    uptime: float,
) -> str:
    windows = " ".join(
        f'<a href="{_link(window=w, host=chosen)}"'
        + (' aria-current="true"' if w == snap.window else "")
        + f">{'last minute' if w == 'minute' else 'since each label was made'}</a>"
        for w in WINDOWS
    )
    return f"""<main>
<header><h1>tracing-proxy <small>{escape(__version__)}</small></h1>
<p>up {uptime / 60:.0f} min · {in_flight} in flight · {tunnels_open} tunnels open ·
updated {_clock_text(snap.wall)} · numbers over: {windows}</p></header>
<section id="hosts">
<h2>Hosts <small>sorted by the worst p99 total; times in ms, p50 / p99</small></h2>
{render_hosts(snap, chosen)}</section>
<section id="dots"><h2>Calls over time: {escape(chosen or "no host yet")}
<small>the last {DOT_SPAN / 60:.0f} minutes, one dot per call (the last {len(dots)})</small></h2>
{render_dots(snap, dots)}</section>
<section id="slow"><h2>Slowest calls: {escape(chosen or "no host yet")}</h2>
{render_calls(snap, slow, with_host=False)}</section>
<section id="failed"><h2>Failed calls <small>the last {SHOWN_FAILED}, every host</small></h2>
{render_calls(snap, failed, with_host=True)}</section>
</main>"""


def render_hosts(snap: Snapshot, chosen: str | None) -> str:
    if not snap.hosts:
        return '<p class="empty">No calls yet: send one through the proxy.</p>'
    shown = snap.hosts[:SHOWN_HOSTS]
    widest = max((sum(v for _, v in h.per_call()) for h in shown), default=0.0) or 1.0
    head = "".join(f"<th>{name}</th>" for name in PHASE_ATTRS)
    rows = []
    for h in shown:
        cells = "".join(
            f'<td class="num">{_ms(p.p50)} / {_ms(p.p99)}</td>' for p in h.phases.values()
        )
        ratio = UNKNOWN if h.error_ratio is None else f"{h.error_ratio:.1%}"
        tunnels = f" + {h.tunnels} tunnels" if h.tunnels else ""
        current = ' aria-current="true"' if h.host == chosen else ""
        rows.append(
            f'<tr{current}><td><a href="{_link(window=snap.window, host=h.host)}">'
            f"{escape(h.host)}</a></td>"
            f'<td class="num">{_rate(h.requests_per_s)}</td>'
            f'<td class="num">{ratio}</td><td class="num">{h.requests}{tunnels}</td>{cells}'
            f'<td class="bar">{render_bar(h, widest)}</td></tr>'
        )
    more = len(snap.hosts) - len(shown)
    rest = f'<p class="empty">And {more} more hosts: /api/hosts lists them all.</p>' if more else ""
    return (
        '<table class="hosts"><thead><tr><th>host</th><th>req/s</th><th>errors</th>'
        f"<th>calls</th>{head}<th>where the time goes (per call)</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{rest}"
    )


def render_bar(h: HostView, widest: float) -> str:
    parts = h.per_call()
    if not parts:
        return '<span class="none">tunnels only</span>' if h.tunnels else ""
    return "".join(
        f'<span class="seg {name}" style="width:{100 * seconds / widest:.2f}%" '
        f'title="{name} {_ms(seconds)} ms per call"></span>'
        for name, seconds in parts
        if seconds > 0
    )


# The plot's size in SVG units and the marks of its latency axis (log scale).
_W, _H, _PAD = 900.0, 200.0, 56.0
_DECADES: Final = (
    (0.0001, "0.1 ms"),
    (0.001, "1 ms"),
    (0.01, "10 ms"),
    (0.1, "100 ms"),
    (1.0, "1 s"),
    (10.0, "10 s"),
    (100.0, "100 s"),
)


def render_dots(snap: Snapshot, dots: list[Dot]) -> str:
    if not dots:
        return '<p class="empty">No calls in the last minutes.</p>'
    low = min(0.001, *(total for _, total, _, _ in dots if total > 0))
    high = max(0.1, *(total for _, total, _, _ in dots)) * 1.2
    span = math.log10(high / low)

    def y(seconds: float) -> float:
        return _H - _H * math.log10(max(seconds, low) / low) / span

    start = snap.now - DOT_SPAN
    marks = [
        f'<line x1="{_PAD}" x2="{_W}" y1="{y(d):.1f}" y2="{y(d):.1f}"/>'
        f'<text x="{_PAD - 6}" y="{y(d) + 4:.1f}">{label}</text>'
        for d, label in _DECADES
        if low <= d <= high
    ]
    marks += [
        f'<text class="x" x="{_PAD + (_W - _PAD) * i / 5:.1f}" y="{_H + 16}">'
        f"{'now' if i == 5 else f'-{5 - i} min'}</text>"
        for i in range(6)
    ]
    circles = "".join(
        f'<circle class="{_outcome(status, failed)}" '
        f'cx="{_PAD + (_W - _PAD) * (at - start) / DOT_SPAN:.1f}" cy="{y(total):.1f}" r="3">'
        f"<title>{_clock_text(snap.wall_time(at))} {status}{' failed' if failed else ''} "
        f"{_ms(total)} ms</title></circle>"
        for at, total, status, failed in dots
    )
    return (
        f'<svg class="dots" viewBox="0 -6 {_W + 24} {_H + 26}" role="img" '
        f'aria-label="one dot per call: time across, total latency up">'
        f'<g class="grid">{"".join(marks)}</g>{circles}</svg>'
    )


def render_calls(snap: Snapshot, calls: Iterable[Call], *, with_host: bool) -> str:
    rows = []
    for call in calls:
        host = f"<td>{escape(call.host)}</td>" if with_host else ""
        path = call.path if len(call.path) <= PATH_CHARS else call.path[:PATH_CHARS] + "…"
        phases = "".join(f'<td class="num">{_ms(v)}</td>' for v in call.phases)
        rows.append(
            f'<tr class="{_outcome(call.status, call.error is not None)}">'
            f"<td>{_clock_text(snap.wall_time(call.at))}</td>{host}"
            f'<td class="id">{escape(call.request_id)}</td>'
            f'<td class="id">{escape(call.trace_id) if call.trace_id else UNKNOWN}</td>'
            f'<td>{escape(call.method)}</td><td class="path">{escape(path)}</td>'
            f'<td class="num">{call.status}</td><td>{escape(call.error or "")}</td>'
            f'{phases}<td class="num">{_ms(call.total)}</td></tr>'
        )
    if not rows:
        return '<p class="empty">None.</p>'
    head = "".join(f"<th>{name}</th>" for name in PHASE_ATTRS)
    return (
        f'<table class="calls"><thead><tr><th>time</th>{"<th>host</th>" if with_host else ""}'
        "<th>request id</th><th>trace id</th><th>method</th><th>path</th><th>status</th>"
        f"<th>error</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
