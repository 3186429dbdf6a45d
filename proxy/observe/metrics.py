"""Every metric the proxy exports, kept per host in plain Python.

The request path only does list and dict arithmetic (the proxy runs on one event loop,
so no locks are needed); ``proxy.observe.exposition`` writes the text when ``/metrics``
is scraped.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import monotonic, time
from typing import Final

from proxy.observe.live import Counts, Live
from proxy.rules.hostpatterns import HostPatterns

# Methods outside this set are counted as "_OTHER" (an unbounded label otherwise);
# the same convention as OpenTelemetry's http.request.method.
STANDARD_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def method_label(method: str) -> str:
    return method if method in STANDARD_METHODS else "_OTHER"


# gRPC status codes (grpc/doc/statuscodes.md): the code label of proxy_upstream_grpc_total.
GRPC_CODES: Final = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


def grpc_code(status: int) -> str:
    """The name of a grpc-status; a number outside the 17 codes counts as UNKNOWN, as gRPC
    clients treat it (the label set stays bounded)."""
    return GRPC_CODES[status] if 0 <= status < len(GRPC_CODES) else "UNKNOWN"


# An exemplar's labels as OpenMetrics text (sorted by name, as the encoders write them) and
# the text of the wall-clock time of the observation (Prometheus drops an exemplar older
# than the last one it stored for the series). Rendered once per request, shared by its
# observations, so a scrape only concatenates.
ExemplarIds = tuple[str, str]
# OpenMetrics 1.0, "Exemplars": the names and values of an exemplar's labels together take
# at most 128 UTF-8 characters.
EXEMPLAR_LABEL_CHARS: Final = 128


def exemplar_ids(trace_id: str | None, request_id: str) -> ExemplarIds | None:
    """``trace_id`` and ``request_id`` within the limit; a request id that does not fit is left out.

    A truncated request id would point at the wrong log line; the trace id alone still
    finds it (the access line carries both). Neither needs escaping: a trace id is hex and
    a request id is limited to ``proxy.rules.request_id``'s characters.
    """
    used = 0 if trace_id is None else len("trace_id") + len(trace_id)
    fits = used + len("request_id") + len(request_id) <= EXEMPLAR_LABEL_CHARS
    if trace_id is None:
        return (f'request_id="{request_id}"', repr(time())) if fits else None
    if fits:
        return f'request_id="{request_id}",trace_id="{trace_id}"', repr(time())
    return f'trace_id="{trace_id}"', repr(time())


class Histogram:
    """Bucket counts for one label set; cumulative only when rendered.

    Each bucket also keeps the ids of its most recent observation (an exemplar).
    """

    __slots__ = ("bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.exemplars: list[tuple[ExemplarIds, float] | None] = [None] * len(self.counts)

    def observe(self, value: float, ids: ExemplarIds | None = None) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= value.
        i = bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.sum += value
        if ids is not None:
            self.exemplars[i] = (ids, value)


def le_text(bound: float) -> str:
    """A bucket bound as its ``le`` label value."""
    return repr(float(bound))


# Tunnel lifetimes run from a failed handshake (milliseconds) to a long-lived stream (hours).
TUNNEL_BUCKETS: Final = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)


class HostStats:
    """Everything counted for one upstream host label."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "capped",
        "connect",
        "connections_new",
        "connections_reused",
        "dns",
        "dns_hit",
        "dns_miss",
        "errors",
        "grpc",
        "intercept_failures",
        "intercept_splices",
        "last_used",
        "live",
        "queue",
        "requests",
        "tls",
        "total",
        "ttfb",
        "tunnel_bytes_received",
        "tunnel_bytes_sent",
        "tunnel_seconds",
        "tunnel_sni_mismatches",
        "tunnel_ttfb",
        "tunnels",
        "version",
    )

    def __init__(self, bounds: Sequence[float], *, capped: bool = True, live: bool = False) -> None:
        # Bumped each time the stats are handed out for an update: the exposition
        # re-renders a host only when this moved.
        self.version = 0
        self.capped = capped  # counts against --max-hosts (tracked hosts do not)
        self.last_used = 0.0  # monotonic seconds; idle labels expire
        self.queue = Histogram(bounds)
        self.dns = Histogram(bounds)
        self.connect = Histogram(bounds)
        self.tls = Histogram(bounds)
        self.ttfb = Histogram(bounds)
        self.total = Histogram(bounds)
        self.requests: dict[tuple[str, str], int] = {}
        self.errors: dict[str, int] = {}
        self.grpc: dict[str, int] = {}  # gRPC responses by status code name
        self.connections_new = 0
        self.connections_reused = 0
        self.dns_hit = 0
        self.dns_miss = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.tunnels: dict[str, int] = {}  # by outcome
        self.intercept_failures: dict[str, int] = {}  # client TLS handshakes failed, by reason
        self.intercept_splices: dict[str, int] = {}  # intercepted CONNECTs spliced, by reason
        self.tunnel_seconds = Histogram(TUNNEL_BUCKETS)
        self.tunnel_bytes_sent = 0  # client -> upstream
        self.tunnel_bytes_received = 0  # upstream -> client
        # Read from the TLS records a tunnel carries (proxy.rules.tls_timing): each exchange's
        # first byte, and tunnels whose SNI was not their CONNECT host.
        self.tunnel_ttfb = Histogram(bounds)
        self.tunnel_sni_mismatches = 0
        self.live = Live() if live else None  # the live page's history and rings

    def counts(self) -> Counts:
        """The counters and phase histograms the live page rates and windows."""
        histograms = [getattr(self, attr) for attr in PHASE_ATTRS]
        return Counts(
            sum(self.requests.values()),
            sum(self.tunnels.values()),
            sum(self.errors.values()),
            array("q", [count for h in histograms for count in h.counts]),
            array("d", [h.sum for h in histograms]),
        )

    def observe_dial(
        self,
        dns: float | None,
        dns_cache: str | None,
        connect: float | None,
        tls: float | None = None,
        ids: ExemplarIds | None = None,
    ) -> None:
        """The lookup (when one ran), the new connection and its TLS handshake (https)."""
        if dns is not None:
            self.dns.observe(dns, ids)
        if dns_cache == "hit":
            self.dns_hit += 1
        elif dns_cache == "miss":
            self.dns_miss += 1
        if connect is not None:
            self.connect.observe(connect, ids)
        if tls is not None:
            self.tls.observe(tls, ids)


# The per-host phase histograms: (metric name, HostStats attribute, help). A new phase is
# one row here and one attribute on HostStats; the exposition renders whatever is listed.
PHASES: Final = (
    ("proxy_upstream_queue_seconds", "queue", "Time each request waited for a pooled connection."),
    ("proxy_upstream_dns_seconds", "dns", "Duration of each DNS lookup that ran (cache misses)."),
    (
        "proxy_upstream_connect_seconds",
        "connect",
        "TCP connect of each new upstream connection, DNS and TLS excluded.",
    ),
    (
        "proxy_upstream_tls_seconds",
        "tls",
        "TLS handshake of each new upstream https connection, or seen in a tunnel's bytes.",
    ),
    (
        "proxy_upstream_ttfb_seconds",
        "ttfb",
        "Request headers sent upstream to response headers received.",
    ),
    (
        "proxy_upstream_request_seconds",
        "total",
        "Request reached the proxy to the last response byte written back.",
    ),
)


PHASE_ATTRS: Final = tuple(attr for _, attr, _ in PHASES)

# The phases a CONNECT tunnel fills too. A host reached only through tunnels exports these and
# no request-side series (queue, tls, ttfb, request, connections, bytes): a row of count-0
# request histograms per tunnelled host would be noise. Its tls phase appears once a tunnel
# carried a TLS handshake the proxy could time.
TUNNEL_PHASES: Final = frozenset({"dns", "connect"})


def exports_phase(stats: HostStats, attr: str) -> bool:
    """Whether a host's ``attr`` phase histogram is exported: tunnel phases always, the rest
    once the host has had a forwarded request, or an observation of that phase."""
    return attr in TUNNEL_PHASES or bool(stats.requests) or any(getattr(stats, attr).counts)


# A scrape takes milliseconds per hundred hosts; seconds would mean trouble.
SCRAPE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Where hosts past the cap are counted.
OVERFLOW_HOST: Final = "other"

# On the overflow path, idle labels are looked for at most this often (seconds).
_SWEEP_INTERVAL: Final = 1.0


@dataclass(frozen=True, slots=True)
class HostLabelLimits:
    """How many host labels may exist, which are exempt, and how long an idle one lives."""

    max_hosts: int = 1000
    track: HostPatterns = field(default_factory=HostPatterns)
    ttl: float = 600.0


class ClientStats:
    """Client connections on the proxy listener (``proxy.wire.limits`` keeps these)."""

    __slots__ = ("header_timeouts", "open", "rejected")

    def __init__(self) -> None:
        self.open = 0
        self.rejected = 0
        self.header_timeouts = 0


class Refusals:
    """Answers the proxy gave itself instead of proxying, by reason (``proxy_denied_total``)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def __repr__(self) -> str:
        return f"<Refusals {self.counts!r}>"


class Metrics:
    """The proxy's metrics, as plain numbers (``proxy.observe.exposition`` renders them).

    Per-host series are the cardinality risk, so host labels are capped: past
    ``max_hosts`` untracked labels, a new host is counted under ``other``; a label idle
    for ``ttl`` seconds is dropped (at scrape, or when the cap is hit) to free its slot.
    """

    def __init__(
        self,
        buckets: Sequence[float],
        limits: HostLabelLimits | None = None,
        clock: Callable[[], float] = monotonic,
        *,
        live: bool = False,
    ) -> None:
        """``live``: each host keeps the live page's history and rings (``proxy.observe.live``)."""
        self.buckets = tuple(buckets)
        self.live = live
        self.limits = limits if limits is not None else HostLabelLimits()
        self.hosts: dict[str, HostStats] = {}
        self.host_overflow = 0  # acquisitions sent to OVERFLOW_HOST
        self.tunnels_open = 0
        self.certificates_minted = 0  # leaves minted for intercepted hosts
        self.clients = ClientStats()
        self.denied = Refusals()  # proxy.app and proxy.wire.limits count here
        self.http2_errors = Refusals()  # client HTTP/2 connections ended, by reason (proxy.h2)
        self._clock = clock
        self.scrapes = Histogram(SCRAPE_BUCKETS)  # seconds per /metrics answer
        self._capped = 0  # labels in ``hosts`` that count against max_hosts
        self._next_sweep = 0.0

    def host(self, label: str) -> HostStats:
        """The stats for ``label``, or for ``other`` when the label cap is reached."""
        stats = self.hosts.get(label)
        if stats is None:
            stats = self._admit(label)
        now = stats.last_used = self._clock()
        stats.version += 1
        live = stats.live
        if live is not None and now >= live.next_snapshot:
            live.snapshot(now, stats.counts())  # before the caller moves the counters
        return stats

    def now(self) -> float:
        """The clock ``HostStats.last_used`` and the live rings are stamped with."""
        return self._clock()

    def _admit(self, label: str) -> HostStats:
        limits = self.limits
        capped = not limits.track.matches(label)
        if capped and self._capped >= limits.max_hosts:
            if self._clock() >= self._next_sweep:
                self.expire_idle()
            if self._capped >= limits.max_hosts:
                self.host_overflow += 1
                label, capped = OVERFLOW_HOST, False
                stats = self.hosts.get(label)
                if stats is not None:
                    return stats
        stats = self.hosts[label] = HostStats(self.buckets, capped=capped, live=self.live)
        self._capped += capped
        return stats

    def expire_idle(self) -> None:
        """Drop every host label unused for ``ttl`` seconds (its series disappear)."""
        now = self._clock()
        self._next_sweep = now + _SWEEP_INTERVAL
        cutoff = now - self.limits.ttl
        for label in [label for label, stats in self.hosts.items() if stats.last_used < cutoff]:
            self._capped -= self.hosts.pop(label).capped
