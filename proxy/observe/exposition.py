"""``/metrics``: the text formats written straight from the plain stats, without stalling.

prometheus-client's generic encoders build a ``Sample`` per line and escape names one
character at a time: at the 1,000-host cap that was 1.8 s (classic) to 3.1 s (OpenMetrics)
of the event loop per scrape. Here instead:

- each host's lines are rendered once per change: ``HostStats.version`` moves whenever the
  stats are handed out for an update, and an unchanged host reuses its cached block;
- a host's block is rendered in one synchronous step, so each histogram's buckets,
  ``_count`` and ``_sum`` come from one moment; between hosts the loop is given back every
  ``slice_seconds`` so proxied traffic keeps flowing during a scrape;
- the body is written in pieces, each awaited, so a slow reader holds back only its own
  scrape; with ``Accept-Encoding: gzip`` (Prometheus sends it) each piece is compressed;
- scrapes share the one cache of blocks, updated in place, and a scrape looks each block up
  as it writes it: a reader that stops reading pins a piece, not a rendering of every host
  (each used to keep the blocks it started with, 8.5 MiB at 1,000 hosts), and a write that
  waits ``write_timeout`` ends the scrape and its connection.

Sample lines are the same in both formats (counters are ``_total`` in both, no
``_created``); OpenMetrics adds exemplars on histogram buckets, names counter families
without ``_total`` in ``# TYPE``, escapes ``"`` in help and ends with ``# EOF``.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from time import perf_counter
from typing import Any, Final, cast

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from structlog.typing import FilteringBoundLogger

from proxy import __version__
from proxy.observe import log
from proxy.observe.metrics import (
    PHASES,
    Histogram,
    HostStats,
    Metrics,
    exports_phase,
    le_text,
)

# prometheus-client's own float formatting and OpenMetrics parser (untyped there).
go_float: Final = cast(Callable[[float], str], floatToGoString)
parse_openmetrics: Final = cast(Callable[[str], Iterable[Metric]], text_string_to_metric_families)

# Rows of a labelled counter: the label values after ``host``, and the count.
Rows = Iterable[tuple[tuple[str, ...], float]]


def label_value(value: str) -> str:
    """A label value escaped as both text formats require (backslash, newline, quote)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def number(value: float) -> str:
    """A sample value exactly as prometheus-client writes it (Go's float formatting)."""
    # Below a million Go writes no exponent, so for counts (ints) that is "n.0", for
    # durations (floats) repr(); NaN fails the comparison.
    if type(value) is int and 0 <= value < 1_000_000:
        return f"{value}.0"
    if type(value) is float and 0.0 <= value < 1e6:
        return repr(value)
    return go_float(value)


@dataclass(frozen=True, slots=True)
class _Header:
    """A family's ``# HELP`` and ``# TYPE`` lines in each format."""

    classic: str
    openmetrics: str

    @classmethod
    def of(cls, name: str, kind: str, help_text: str) -> _Header:
        exposed = name + "_total" if kind == "counter" else name
        classic_help = help_text.replace("\\", r"\\").replace("\n", r"\n")
        return cls(
            f"# HELP {exposed} {classic_help}\n# TYPE {exposed} {kind}\n",
            f"# HELP {name} {label_value(help_text)}\n# TYPE {name} {kind}\n",
        )

    def __call__(self, om: bool) -> str:
        return self.openmetrics if om else self.classic


def _label_template(names: Sequence[str]) -> str:
    """A ``str.format`` template writing labels in sorted order, as the encoders do."""
    order = sorted(range(len(names)), key=names.__getitem__)
    return ",".join(f'{names[i]}="{{{i}}}"' for i in order)


@cache
def _le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(f'le="{le_text(b)}"' for b in bounds), 'le="+Inf"')


def histogram_lines(name: str, labels: str, hist: Histogram, om: bool) -> str:
    """``_bucket`` (cumulative, with exemplars under OpenMetrics), ``_count``, ``_sum``."""
    sep = "," if labels else ""
    bucket = f"{name}_bucket{{{labels}{sep}"
    lines = []
    running = 0
    exemplars = hist.exemplars
    for le, count, slot in zip(_le_labels(tuple(hist.bounds)), hist.counts, exemplars, strict=True):
        running += count
        line = f"{bucket}{le}}} {number(running)}"
        if om and slot is not None:
            (labels_text, stamp), value = slot
            line += f" # {{{labels_text}}} {number(value)} {stamp}"
        lines.append(line)
    braces = f"{{{labels}}}" if labels else ""
    lines.append(f"{name}_count{braces} {number(running)}")
    lines.append(f"{name}_sum{braces} {number(hist.sum)}\n")
    return "\n".join(lines)


class _HostFamily:
    """One family with a ``host`` label; renders one host's lines of it."""

    header: _Header

    def lines(self, host: str, stats: HostStats, om: bool) -> str:
        """``host`` is the label value, already escaped."""
        raise NotImplementedError


class _HostHistogram(_HostFamily):
    def __init__(self, name: str, help_text: str, get: Callable[[HostStats], Histogram | None]):
        self.name = name
        self.header = _Header.of(name, "histogram", help_text)
        self._get = get

    def lines(self, host: str, stats: HostStats, om: bool) -> str:
        hist = self._get(stats)
        return "" if hist is None else histogram_lines(self.name, f'host="{host}"', hist, om)

    def __repr__(self) -> str:
        return f"<_HostHistogram {self.name}>"


class _HostCounter(_HostFamily):
    def __init__(
        self, name: str, help_text: str, labels: tuple[str, ...], rows: Callable[[HostStats], Rows]
    ):
        self.name = name
        self.header = _Header.of(name, "counter", help_text)
        self._prefix = name + "_total{"
        self._template = _label_template(("host", *labels))
        self._rows = rows

    def lines(self, host: str, stats: HostStats, om: bool) -> str:
        template, prefix = self._template, self._prefix
        return "".join(
            f"{prefix}{template.format(host, *map(label_value, values))}}} {number(count)}\n"
            for values, count in self._rows(stats)
        )

    def __repr__(self) -> str:
        return f"<_HostCounter {self.name}>"


def _phase(attr: str) -> Callable[[HostStats], Histogram | None]:
    return lambda stats: getattr(stats, attr) if exports_phase(stats, attr) else None


def _dns_cache(s: HostStats) -> Rows:
    return ((("hit",), s.dns_hit), (("miss",), s.dns_miss)) if s.dns_hit or s.dns_miss else ()


def _tunnel_bytes(s: HostStats) -> Rows:
    if not s.tunnels:
        return ()  # a host only ever reached by forwarded requests
    return ((("sent",), s.tunnel_bytes_sent), (("received",), s.tunnel_bytes_received))


# The per-host families in exposition order.
HOST_FAMILIES: Final[tuple[_HostFamily, ...]] = (
    *(_HostHistogram(name, help_text, _phase(attr)) for name, attr, help_text in PHASES),
    _HostCounter(
        "proxy_upstream_requests",
        "Finished forwarded requests.",
        ("method", "code"),
        lambda s: sorted(s.requests.items()),
    ),
    _HostCounter(
        "proxy_upstream_errors",
        "Failed requests by RFC 9209 Proxy-Status error type.",
        ("error",),
        lambda s: (((e,), n) for e, n in sorted(s.errors.items())),
    ),
    _HostCounter(
        "proxy_upstream_grpc",
        "gRPC calls by the grpc-status the upstream answered (the 17 codes).",
        ("code",),
        lambda s: (((c,), n) for c, n in sorted(s.grpc.items())),
    ),
    _HostCounter(
        "proxy_upstream_connections",
        "Upstream connection acquisitions, new or reused from the pool.",
        ("kind",),
        lambda s: (
            ((("new",), s.connections_new), (("reused",), s.connections_reused))
            if s.requests
            else ()
        ),
    ),
    _HostCounter(
        "proxy_upstream_dns_cache", "DNS cache use by hostname requests.", ("result",), _dns_cache
    ),
    _HostCounter(
        "proxy_upstream_bytes",
        "Body bytes sent to and received from upstreams.",
        ("direction",),
        lambda s: (
            ((("sent",), s.bytes_sent), (("received",), s.bytes_received)) if s.requests else ()
        ),
    ),
    _HostCounter(
        "proxy_tunnels",
        "Finished CONNECTs by outcome (failed: never established; intercepted, http: served).",
        ("outcome",),
        lambda s: (((o,), n) for o, n in sorted(s.tunnels.items())),
    ),
    _HostHistogram(
        "proxy_tunnel_seconds",
        "Lifetime of each established tunnel, CONNECT received to both sides closed.",
        lambda s: s.tunnel_seconds if s.tunnels else None,
    ),
    _HostCounter(
        "proxy_tunnel_bytes",
        "Bytes relayed through tunnels: sent is client to upstream, received the reverse.",
        ("direction",),
        _tunnel_bytes,
    ),
    _HostHistogram(
        "proxy_tunnel_ttfb_seconds",
        "Tunnels: each exchange's first byte, read from TLS record timing (TLS 1.3: the first "
        "one estimated).",
        lambda s: s.tunnel_ttfb if any(s.tunnel_ttfb.counts) else None,
    ),
    _HostCounter(
        "proxy_tunnel_sni_mismatches",
        "Tunnels whose TLS server name was not their CONNECT host.",
        (),
        lambda s: (((), s.tunnel_sni_mismatches),) if s.tunnels else (),
    ),
    _HostCounter(
        "proxy_intercept_failures",
        "Intercepted CONNECTs whose client TLS handshake failed (unknown_ca: CA not trusted).",
        ("reason",),
        lambda s: (((r,), n) for r, n in sorted(s.intercept_failures.items())),
    ),
    _HostCounter(
        "proxy_intercept_splices",
        "Intercepted CONNECTs relayed untouched after their ClientHello (alpn: no protocol "
        "the proxy serves; ca_invalid: no certificate could be minted).",
        ("reason",),
        lambda s: (((r,), n) for r, n in sorted(s.intercept_splices.items())),
    ),
)


class _Global:
    """A family without a host label, rendered fresh on every scrape (a few lines)."""

    def __init__(
        self,
        name: str,
        kind: str,
        help_text: str,
        read: Callable[[Metrics, int], float | Rows | Histogram],
        label: str = "",
    ) -> None:
        self.name = name
        self.kind = kind
        self.header = _Header.of(name, kind, help_text)
        self._read = read
        self._label = label

    def lines(self, metrics: Metrics, in_flight: int, om: bool) -> str:
        value = self._read(metrics, in_flight)
        if isinstance(value, Histogram):
            return histogram_lines(self.name, "", value, om)
        exposed = self.name + "_total" if self.kind == "counter" else self.name
        if isinstance(value, int | float):
            return f"{exposed} {number(value)}\n"
        return "".join(
            f'{exposed}{{{self._label}="{label_value(v)}"}} {number(n)}\n' for (v,), n in value
        )

    def __repr__(self) -> str:
        return f"<_Global {self.kind} {self.name}>"


GLOBAL_FAMILIES: Final = (
    _Global("proxy_requests_in_flight", "gauge", "Requests being served.", lambda m, f: f),
    _Global("proxy_tunnels_open", "gauge", "Open CONNECT tunnels.", lambda m, f: m.tunnels_open),
    _Global(
        "proxy_intercept_certificates_minted",
        "counter",
        "Certificates minted for intercepted hosts (one per host, reminted before expiry).",
        lambda m, f: m.certificates_minted,
    ),
    _Global(
        "proxy_client_connections_open",
        "gauge",
        "Client connections open on the proxy listener.",
        lambda m, f: m.clients.open,
    ),
    _Global(
        "proxy_client_connections_rejected",
        "counter",
        "Client connections closed on arrival: --max-client-connections were open.",
        lambda m, f: m.clients.rejected,
    ),
    _Global(
        "proxy_request_header_timeouts",
        "counter",
        "Client connections closed: no complete request head within --request-header-timeout.",
        lambda m, f: m.clients.header_timeouts,
    ),
    _Global(
        "proxy_host_label_overflow",
        "counter",
        'Requests and tunnels counted under host="other": the host label cap was reached.',
        lambda m, f: m.host_overflow,
    ),
    _Global(
        "proxy_denied",
        "counter",
        "Requests the proxy answered itself instead of proxying, by reason: the client, "
        "its credentials, the request's form or target, or a shutdown.",
        lambda m, f: (((r,), n) for r, n in sorted(m.denied.counts.items())),
        "reason",
    ),
    _Global(
        "proxy_client_http2_errors",
        "counter",
        "Client HTTP/2 connections the proxy ended: a defence ran out (rapid_reset, "
        "continuation_flood, ping_flood, ...) or the client broke the protocol.",
        lambda m, f: (((r,), n) for r, n in sorted(m.http2_errors.counts.items())),
        "reason",
    ),
    _Global(
        "proxy_build_info",
        "gauge",
        "Always 1; the version is a label.",
        lambda m, f: ((((__version__,), 1),)),
        "version",
    ),
    _Global(
        "proxy_scrape_duration_seconds",
        "histogram",
        "Time to answer each /metrics scrape, request received to last byte written (or to "
        "the scraper's disconnect or the write timeout).",
        lambda m, f: m.scrapes,
    ),
)


# A block per host label: the stats it was rendered from, their version, a string per family.
_Block = tuple[HostStats, int, list[str]]

# Pieces of the body handed to the socket at a time: small enough that a slow scraper
# holds back the rest, large enough that few writes are needed.
_PIECE: Final = 64 * 1024

# How long one piece may wait for the scraper to read: Prometheus's default scrape_timeout.
# A reader that takes longer has given up, or never meant to read.
WRITE_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class _Format:
    """One representation of /metrics: its media type and the version written."""

    media_type: str
    version: str
    openmetrics: bool

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; version={self.version}; charset=utf-8"

    def quality(self, accept: str) -> float:
        """The weight ``accept`` gives this format: that of its most specific matching range
        (RFC 9110 §12.5.1); 0 when none matches. A range naming another ``version`` does
        not match; other parameters (escaping, charset) do not matter here, as every name
        written is a legacy one in UTF-8."""
        kind = self.media_type.split("/")[0] + "/*"
        best_rank, best_weight = -1, 0.0
        for value, params, weight in weighted_items(accept):
            if value == "*/*":
                rank = 0
            elif value == kind:
                rank = 1
            elif value != self.media_type:
                continue
            elif "version" not in params:
                rank = 2
            elif params["version"] == self.version:
                rank = 3
            else:
                continue
            if rank > best_rank or (rank == best_rank and weight > best_weight):
                best_rank, best_weight = rank, weight
        return best_weight


CLASSIC: Final = _Format("text/plain", "0.0.4", openmetrics=False)
OPENMETRICS: Final = _Format("application/openmetrics-text", "1.0.0", openmetrics=True)


def negotiate(accept: str) -> _Format:
    """OpenMetrics when ``accept`` weighs it above the classic text; else the classic text,
    also when it accepts neither (RFC 9110 §12.5.1 lets a server disregard Accept)."""
    return OPENMETRICS if OPENMETRICS.quality(accept) > CLASSIC.quality(accept) else CLASSIC


class Exposition:
    """Renders the metrics in the classic text format or OpenMetrics, and serves ``/metrics``.

    ``others`` (process metrics, span export) go through prometheus-client's own encoder.
    """

    def __init__(
        self,
        metrics: Metrics,
        in_flight: Callable[[], int],
        others: CollectorRegistry | None = None,
        *,
        slice_seconds: float = 0.001,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self._metrics = metrics
        self._in_flight = in_flight
        self._others = others if others is not None else CollectorRegistry()
        self.slice_seconds = slice_seconds  # how long a slice of rendering may hold the loop
        self.write_timeout = write_timeout  # how long a piece may wait for the reader
        # Blocks of the format scraped last only: Prometheus asks for one format, and two
        # caches would hold the text twice (up to 24 KB per host label).
        self._cache: dict[bool, dict[str, _Block]] = {}
        self._logger: FilteringBoundLogger = log.get_logger()

    def __repr__(self) -> str:
        return f"<Exposition hosts={len(self._metrics.hosts)} slice={self.slice_seconds}s>"

    # -- rendering --------------------------------------------------------------------------

    def _blocks(self, om: bool) -> Iterator[tuple[list[str], dict[str, _Block]] | None]:
        """Brings every host's block up to date in the cache; yields None when the slice is
        used up.

        The last item is the host labels, sorted, and the cache itself: the blocks are looked
        up as they are written, so a scrape that another one overtakes writes the newer
        block, and keeps no block the cache has dropped.
        """
        self._metrics.expire_idle()
        items = sorted(self._metrics.hosts.items())
        blocks = self._cache.get(om)
        if blocks is None:
            blocks = {}
            self._cache = {om: blocks}
        deadline = perf_counter() + self.slice_seconds
        for host, stats in items:
            block = blocks.get(host)
            if block is None or block[0] is not stats or block[1] != stats.version:
                escaped = label_value(host)
                blocks[host] = (
                    stats,
                    stats.version,
                    [f.lines(escaped, stats, om) for f in HOST_FAMILIES],
                )
                if perf_counter() >= deadline:
                    yield None
                    deadline = perf_counter() + self.slice_seconds
        for host in blocks.keys() - self._metrics.hosts.keys():
            del blocks[host]  # expired
        yield [host for host, _ in items], blocks

    def _pieces(
        self, om: bool, hosts: list[str], blocks: dict[str, _Block], extra: str
    ) -> Iterator[str]:
        for i, family in enumerate(HOST_FAMILIES):
            yield family.header(om)
            for host in hosts:
                block = blocks.get(host)
                if block is not None:  # None: expired while an earlier family was written
                    yield block[2][i]
        metrics, in_flight = self._metrics, self._in_flight()
        for g in GLOBAL_FAMILIES:
            yield g.header(om) + g.lines(metrics, in_flight, om)
        yield extra

    def _extra_text(self, om: bool) -> str:
        encoder = openmetrics.generate_latest if om else generate_latest
        text = encoder(self._others).decode()
        # The OpenMetrics encoder ends its output; ours goes on after it.
        return text.removesuffix("# EOF\n") + "# EOF\n" if om else text

    def render(self, om: bool = False) -> bytes:
        """The whole body at once (tests, benchmarks, the registry view)."""
        *_, rendered = self._blocks(om)
        assert rendered is not None
        return "".join(self._pieces(om, *rendered, self._extra_text(om))).encode()

    # -- serving ----------------------------------------------------------------------------

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = perf_counter()
        fmt = negotiate(request.headers.get("Accept", ""))
        response = web.StreamResponse(
            headers={"Content-Type": fmt.content_type, "Vary": "Accept, Accept-Encoding"}
        )
        gzip = _gzip() if accepts_gzip(request.headers.get("Accept-Encoding", "")) else None
        if gzip is not None:
            response.headers["Content-Encoding"] = "gzip"
        await response.prepare(request)
        if request.method == "HEAD":
            # A HEAD is an up-check (RFC 9110 §9.3.2): the head only, nothing rendered.
            await response.write_eof()
            return response
        try:
            await self._write_body(response, fmt.openmetrics, gzip)
        except (ConnectionError, TimeoutError) as exc:
            self._aborted(request, exc, perf_counter() - started)
        self._metrics.scrapes.observe(perf_counter() - started)
        return response

    async def _write_body(self, response: web.StreamResponse, om: bool, gzip: Any) -> None:
        rendered: tuple[list[str], dict[str, _Block]] | None = None
        for rendered in self._blocks(om):
            if rendered is None:
                await asyncio.sleep(0)  # let proxied traffic run between slices
        assert rendered is not None
        buffered: list[str] = []
        size = 0
        deadline = perf_counter() + self.slice_seconds
        for piece in self._pieces(om, *rendered, self._extra_text(om)):
            buffered.append(piece)
            size += len(piece)
            if size >= _PIECE:
                data = "".join(buffered).encode()
                # write() returns without yielding while the socket keeps up: yield here.
                await self._write(response, data if gzip is None else gzip.compress(data))
                buffered, size = [], 0
                if perf_counter() >= deadline:
                    await asyncio.sleep(0)
                    deadline = perf_counter() + self.slice_seconds
        data = "".join(buffered).encode()
        await self._write(response, data if gzip is None else gzip.compress(data))
        if gzip is not None:
            await self._write(response, gzip.flush())
        async with asyncio.timeout(self.write_timeout):
            await response.write_eof()

    async def _write(self, response: web.StreamResponse, data: bytes) -> None:
        async with asyncio.timeout(self.write_timeout):
            await response.write(data)

    def _aborted(self, request: web.BaseRequest, exc: BaseException, seconds: float) -> None:
        """The scraper went away (info), or stopped reading (warning: its connection is cut)."""
        timed_out = isinstance(exc, TimeoutError)
        if timed_out and request.transport is not None:
            request.transport.abort()  # the rest of the body would wait for it too
        write = self._logger.warning if timed_out else self._logger.info
        write(
            "scrape_aborted",
            client=request.remote,
            reason="write_timeout" if timed_out else "client_disconnected",
            duration_ms=round(seconds * 1000.0, 3),
        )


def _gzip() -> Any:
    """gzip at level 1: at the cap, level 6 took 2.5-4x the CPU for 7-10% fewer bytes.

    Each piece is compressed on the loop (0.1-0.5 ms): handing pieces to a worker thread
    measured slower, as the loop, busy with traffic, held the GIL the thread waited for.
    """
    return zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)


def accepts_gzip(accept_encoding: str) -> bool:
    """RFC 9110 §12.5.3: gzip is listed and not refused with a weight of 0."""
    return any(
        coding == "gzip" and weight > 0 for coding, _, weight in weighted_items(accept_encoding)
    )


# RFC 9110 §12.4.2: a weight is 0 to 1 with at most three decimals.
_QVALUE: Final = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def weighted_items(header: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """The items of an Accept or Accept-Encoding list: the value in lower case, its other
    parameters (names in lower case), and its weight; a malformed weight counts as 0."""
    for item in header.split(","):
        value, *fields = item.split(";")
        value = value.strip().lower()
        if not value:
            continue
        params: dict[str, str] = {}
        for field in fields:
            name, _, text = field.partition("=")
            params[name.strip().lower()] = text.strip().strip('"')
        q = params.pop("q", "1")
        yield value, params, float(q) if _QVALUE.fullmatch(q) else 0.0


class RegistryView(Collector):
    """Our families on a ``CollectorRegistry`` (``get_sample_value``, other exporters).

    Parsed back from our own OpenMetrics text, so the registry sees what scrapers see.
    """

    def __init__(self, metrics: Metrics, in_flight: Callable[[], int]) -> None:
        self._exposition = Exposition(metrics, in_flight)

    def collect(self) -> Iterator[Metric]:
        text = self._exposition.render(om=True).decode()
        return iter(parse_openmetrics(text))

    def describe(self) -> Iterator[Metric]:
        # Non-empty describe() lets the registry check for name clashes without collecting.
        return self.collect()

    def __repr__(self) -> str:
        return f"<RegistryView {self._exposition!r}>"
