"""Every metric the proxy exports, kept per host in plain Python and rendered on scrape.

The request path only does list and dict arithmetic (the proxy runs on one event loop,
so no locks are needed); a custom collector turns the numbers into Prometheus families
when ``/metrics`` is scraped. Everything is registered on an injected ``CollectorRegistry``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.rules.hostpatterns import HostPatterns

# Methods outside this set are counted as "_OTHER" (an unbounded label otherwise);
# the same convention as OpenTelemetry's http.request.method.
STANDARD_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def method_label(method: str) -> str:
    return method if method in STANDARD_METHODS else "_OTHER"


class Histogram:
    """Bucket counts for one label set; cumulative only when rendered."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((_float_text(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _float_text(value: float) -> str:
    return repr(float(value))


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
        "intercept_failures",
        "last_used",
        "queue",
        "requests",
        "tls",
        "total",
        "ttfb",
        "tunnel_bytes_received",
        "tunnel_bytes_sent",
        "tunnel_seconds",
        "tunnels",
    )

    def __init__(self, bounds: Sequence[float], *, capped: bool = True) -> None:
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
        self.connections_new = 0
        self.connections_reused = 0
        self.dns_hit = 0
        self.dns_miss = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.tunnels: dict[str, int] = {}  # by outcome
        self.intercept_failures: dict[str, int] = {}  # client TLS handshakes failed, by reason
        self.tunnel_seconds = Histogram(TUNNEL_BUCKETS)
        self.tunnel_bytes_sent = 0  # client -> upstream
        self.tunnel_bytes_received = 0  # upstream -> client

    def observe_dial(
        self,
        dns: float | None,
        dns_cache: str | None,
        connect: float | None,
        tls: float | None = None,
    ) -> None:
        """The lookup (when one ran), the new connection and its TLS handshake (https)."""
        if dns is not None:
            self.dns.observe(dns)
        if dns_cache == "hit":
            self.dns_hit += 1
        elif dns_cache == "miss":
            self.dns_miss += 1
        if connect is not None:
            self.connect.observe(connect)
        if tls is not None:
            self.tls.observe(tls)


_HISTOGRAMS: Final = (
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
        "TLS handshake of each new upstream https connection.",
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
    """The proxy's metrics; ``register`` puts them on a registry.

    Per-host series are the cardinality risk, so host labels are capped: past
    ``max_hosts`` untracked labels, a new host is counted under ``other``; a label idle
    for ``ttl`` seconds is dropped (at scrape, or when the cap is hit) to free its slot.
    """

    def __init__(
        self,
        buckets: Sequence[float],
        limits: HostLabelLimits | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.buckets = tuple(buckets)
        self.limits = limits if limits is not None else HostLabelLimits()
        self.hosts: dict[str, HostStats] = {}
        self.host_overflow = 0  # acquisitions sent to OVERFLOW_HOST
        self.tunnels_open = 0
        self.clients = ClientStats()
        self.denied = Refusals()  # proxy.app and proxy.wire.limits count here
        self._clock = clock
        self._capped = 0  # labels in ``hosts`` that count against max_hosts
        self._next_sweep = 0.0

    def host(self, label: str) -> HostStats:
        """The stats for ``label``, or for ``other`` when the label cap is reached."""
        stats = self.hosts.get(label)
        if stats is None:
            stats = self._admit(label)
        stats.last_used = self._clock()
        return stats

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
        stats = self.hosts[label] = HostStats(self.buckets, capped=capped)
        self._capped += capped
        return stats

    def expire_idle(self) -> None:
        """Drop every host label unused for ``ttl`` seconds (its series disappear)."""
        now = self._clock()
        self._next_sweep = now + _SWEEP_INTERVAL
        cutoff = now - self.limits.ttl
        for label in [label for label, stats in self.hosts.items() if stats.last_used < cutoff]:
            self._capped -= self.hosts.pop(label).capped

    def register(self, registry: CollectorRegistry, in_flight: Callable[[], int]) -> None:
        """Expose these metrics on ``registry``; ``in_flight`` is read at each scrape."""
        registry.register(_Collector(self, in_flight))


class _Collector(Collector):
    def __init__(self, metrics: Metrics, in_flight: Callable[[], int]) -> None:
        self._metrics = metrics
        self._in_flight = in_flight

    def describe(self) -> list[Metric]:
        # Non-empty describe() lets the registry check for name clashes without collecting.
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        self._metrics.expire_idle()
        return self._families(self._metrics.hosts)

    def _families(self, hosts: dict[str, HostStats]) -> Iterator[Metric]:
        items = sorted(hosts.items())
        for name, attr, help_text in _HISTOGRAMS:
            family = HistogramMetricFamily(name, help_text, labels=["host"])
            for host, stats in items:
                hist: Histogram = getattr(stats, attr)
                family.add_metric([host], hist.cumulative(), hist.sum)
            yield family

        requests = CounterMetricFamily(
            "proxy_upstream_requests",
            "Finished forwarded requests.",
            labels=["host", "method", "code"],
        )
        errors = CounterMetricFamily(
            "proxy_upstream_errors",
            "Failed requests by RFC 9209 Proxy-Status error type.",
            labels=["host", "error"],
        )
        connections = CounterMetricFamily(
            "proxy_upstream_connections",
            "Upstream connection acquisitions, new or reused from the pool.",
            labels=["host", "kind"],
        )
        dns_cache = CounterMetricFamily(
            "proxy_upstream_dns_cache",
            "DNS cache use by hostname requests.",
            labels=["host", "result"],
        )
        body_bytes = CounterMetricFamily(
            "proxy_upstream_bytes",
            "Body bytes sent to and received from upstreams.",
            labels=["host", "direction"],
        )
        for host, stats in items:
            for (method, code), count in sorted(stats.requests.items()):
                requests.add_metric([host, method, code], count)
            for error, count in sorted(stats.errors.items()):
                errors.add_metric([host, error], count)
            connections.add_metric([host, "new"], stats.connections_new)
            connections.add_metric([host, "reused"], stats.connections_reused)
            if stats.dns_hit or stats.dns_miss:
                dns_cache.add_metric([host, "hit"], stats.dns_hit)
                dns_cache.add_metric([host, "miss"], stats.dns_miss)
            body_bytes.add_metric([host, "sent"], stats.bytes_sent)
            body_bytes.add_metric([host, "received"], stats.bytes_received)
        yield from (requests, errors, connections, dns_cache, body_bytes)
        yield from self._tunnel_families(items)

        yield GaugeMetricFamily(
            "proxy_requests_in_flight", "Requests being served.", value=self._in_flight()
        )
        yield GaugeMetricFamily(
            "proxy_tunnels_open", "Open CONNECT tunnels.", value=self._metrics.tunnels_open
        )
        clients = self._metrics.clients
        yield GaugeMetricFamily(
            "proxy_client_connections_open",
            "Client connections open on the proxy listener.",
            value=clients.open,
        )
        yield CounterMetricFamily(
            "proxy_client_connections_rejected",
            "Client connections closed on arrival: --max-client-connections were open.",
            value=clients.rejected,
        )
        yield CounterMetricFamily(
            "proxy_request_header_timeouts",
            "Client connections closed: no complete request head within --request-header-timeout.",
            value=clients.header_timeouts,
        )
        yield CounterMetricFamily(
            "proxy_host_label_overflow",
            'Requests and tunnels counted under host="other": the host label cap was reached.',
            value=self._metrics.host_overflow,
        )
        denied = CounterMetricFamily(
            "proxy_denied",
            "Requests the proxy answered itself instead of proxying, by reason: the client, "
            "its credentials, the request's form or target, or a shutdown.",
            labels=["reason"],
        )
        for reason, count in sorted(self._metrics.denied.counts.items()):
            denied.add_metric([reason], count)
        yield denied
        build = GaugeMetricFamily(
            "proxy_build_info", "Always 1; the version is a label.", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build

    def _tunnel_families(self, items: list[tuple[str, HostStats]]) -> Iterator[Metric]:
        outcomes = CounterMetricFamily(
            "proxy_tunnels",
            "Finished CONNECTs by outcome (failed: never established; intercepted, http: served).",
            labels=["host", "outcome"],
        )
        seconds = HistogramMetricFamily(
            "proxy_tunnel_seconds",
            "Lifetime of each established tunnel, CONNECT received to both sides closed.",
            labels=["host"],
        )
        tunnel_bytes = CounterMetricFamily(
            "proxy_tunnel_bytes",
            "Bytes relayed through tunnels: sent is client to upstream, received the reverse.",
            labels=["host", "direction"],
        )
        failures = CounterMetricFamily(
            "proxy_intercept_failures",
            "Intercepted CONNECTs whose client TLS handshake failed (unknown_ca: CA not trusted).",
            labels=["host", "reason"],
        )
        for host, stats in items:
            for reason, count in sorted(stats.intercept_failures.items()):
                failures.add_metric([host, reason], count)
            if not stats.tunnels:
                continue  # a host only ever reached by forwarded requests
            for outcome, count in sorted(stats.tunnels.items()):
                outcomes.add_metric([host, outcome], count)
            seconds.add_metric([host], stats.tunnel_seconds.cumulative(), stats.tunnel_seconds.sum)
            tunnel_bytes.add_metric([host, "sent"], stats.tunnel_bytes_sent)
            tunnel_bytes.add_metric([host, "received"], stats.tunnel_bytes_received)
        yield from (outcomes, seconds, tunnel_bytes, failures)
