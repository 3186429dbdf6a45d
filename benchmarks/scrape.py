"""What a /metrics scrape costs at 10, 100 and 1,000 host labels, and what it does to traffic.

    python -m benchmarks.scrape [--hosts 10,100,1000] [--repeat 5]

Per host count, with every phase histogram (and the tunnel histogram) filled and an
exemplar on every bucket:

- render time of the classic text and of OpenMetrics, when every host moved since the
  last scrape (the worst case) and when none did (cached blocks); bytes, gzip bytes;
- the same for prometheus-client's generic encoders over the same numbers (before);
- over real sockets (a proxy process, an origin on N ports, curl scraping, an aiohttp
  client in this process): the scrape's wall time, and a proxied request's latency while
  a scrape runs against the idle p50;
- the CPU a 15 s scrape interval adds per proxied request at 50 clients: the scrape's
  CPU time divided by the requests 50 clients send in 15 s (measured CPU per request);
- the proxy's CPU per request at 50 clients with ``--exemplars`` true and false;
- the cost of one histogram observation with and without an exemplar;
- in this process, the longest wait between event-loop turns while a scrape is served;
- a live proxy's resident memory with scrapers that stop reading, every host moved before
  each (issue 20: each used to pin a rendering of every host).

``figures()`` returns the same numbers as a dict (``make bench`` wires it in).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Final, cast

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    Exemplar,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics

from benchmarks.processes import proxy_command, ready_process
from benchmarks.procfs import cpu_seconds, rss_mb
from benchmarks.scenarios import Bench, Measurement, Study, StudyResult
from proxy import __version__
from proxy.config import DEFAULT_BUCKETS
from proxy.observe.exposition import Exposition
from proxy.observe.metrics import (
    PHASES,
    Histogram,
    HostLabelLimits,
    HostStats,
    Metrics,
    exemplar_ids,
    exports_phase,
    le_text,
)


def fill(metrics: Metrics, hosts: int, *, exemplars: bool = True, seed: int = 0) -> None:
    """``hosts`` labels with every bucket of every histogram hit (a different request each)."""
    rng = random.Random(seed)
    for n in range(hosts):
        stats = metrics.host(f"host-{n}.example:{8000 + n}")
        stats.requests[("GET", "200")] = rng.randrange(1, 10_000)
        stats.requests[("POST", "503")] = rng.randrange(1, 100)
        stats.errors["connection_timeout"] = rng.randrange(1, 100)
        stats.connections_new, stats.connections_reused = rng.randrange(100), rng.randrange(9999)
        stats.dns_hit, stats.dns_miss = rng.randrange(100), rng.randrange(100)
        stats.bytes_sent, stats.bytes_received = rng.randrange(10**9), rng.randrange(10**9)
        stats.tunnels["closed"] = rng.randrange(1, 100)
        stats.tunnel_bytes_sent, stats.tunnel_bytes_received = rng.randrange(10**6), 7
        stats.tunnel_sni_mismatches = rng.randrange(3)
        stats.grpc["OK"], stats.grpc["NOT_FOUND"] = rng.randrange(1, 1000), rng.randrange(10)
        if n % 3 == 0:
            stats.intercept_failures["unknown_ca"] = rng.randrange(1, 10)
            stats.intercept_splices["alpn"] = rng.randrange(1, 10)
        tunnel_histograms = (stats.tunnel_seconds, stats.tunnel_ttfb)
        for hist in (*(getattr(stats, attr) for _, attr, _ in PHASES), *tunnel_histograms):
            for bound in (*hist.bounds, hist.bounds[-1] * 2):
                ids = None
                if exemplars:
                    ids = exemplar_ids(rng.randbytes(16).hex(), f"req-{rng.getrandbits(64):x}")
                hist.observe(bound * rng.uniform(0.5, 1.0), ids)


# -- the generic encoders over the same numbers (what /metrics did before; tests compare) -----


def _buckets(hist: Histogram) -> list[Any]:
    out: list[Any] = []
    running = 0
    les = [*(le_text(b) for b in hist.bounds), "+Inf"]
    for le, count, slot in zip(les, hist.counts, hist.exemplars, strict=True):
        running += count
        if slot is None:
            out.append((le, running))
        else:
            (labels_text, stamp), value = slot
            labels = dict(pair.split("=", 1) for pair in labels_text.split(","))
            labels = {k: v.strip('"') for k, v in labels.items()}
            out.append((le, running, Exemplar(labels, value, float(stamp))))
    return out


def _by_reason(name: str, help_text: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter family with one ``reason`` label: a sample per reason, in reason order."""
    family = CounterMetricFamily(name, help_text, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


# The reference's own per-host counter families (name, help, labels after host), written
# apart from the exposition's table so that the tests' comparison checks it.
_HOST_COUNTERS: Final = (
    ("proxy_upstream_requests", "Finished forwarded requests.", ("method", "code")),
    ("proxy_upstream_errors", "Failed requests by RFC 9209 Proxy-Status error type.", ("error",)),
    (
        "proxy_upstream_grpc",
        "gRPC calls by the grpc-status the upstream answered (the 17 codes).",
        ("code",),
    ),
    (
        "proxy_upstream_connections",
        "Upstream connection acquisitions, new or reused from the pool.",
        ("kind",),
    ),
    ("proxy_upstream_dns_cache", "DNS cache use by hostname requests.", ("result",)),
    ("proxy_upstream_bytes", "Body bytes sent to and received from upstreams.", ("direction",)),
    (
        "proxy_tunnels",
        "Finished CONNECTs by outcome (failed: never established; intercepted, http: served).",
        ("outcome",),
    ),
    (
        "proxy_tunnel_bytes",
        "Bytes relayed through tunnels: sent is client to upstream, received the reverse.",
        ("direction",),
    ),
    (
        "proxy_tunnel_sni_mismatches",
        "Tunnels whose TLS server name was not their CONNECT host.",
        (),
    ),
    (
        "proxy_intercept_failures",
        "Intercepted CONNECTs whose client TLS handshake failed (unknown_ca: CA not trusted).",
        ("reason",),
    ),
    (
        "proxy_intercept_splices",
        "Intercepted CONNECTs relayed untouched after their ClientHello (alpn: no protocol "
        "the proxy serves; ca_invalid: no certificate could be minted).",
        ("reason",),
    ),
)


class ReferenceCollector:
    """Our numbers as prometheus-client ``Metric`` families, for its own encoders."""

    def __init__(self, metrics: Metrics, in_flight: Callable[[], int] = lambda: 0) -> None:
        self._metrics = metrics
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        m.expire_idle()
        items = sorted(m.hosts.items())
        for name, attr, help_text in PHASES:
            family = HistogramMetricFamily(name, help_text, labels=["host"])
            for host, stats in items:
                if exports_phase(stats, attr):
                    hist: Histogram = getattr(stats, attr)
                    family.add_metric([host], _buckets(hist), hist.sum)
            yield family
        yield from self._host_counters(items)
        g, c = GaugeMetricFamily, CounterMetricFamily
        yield g("proxy_requests_in_flight", "Requests being served.", value=self._in_flight())
        yield g("proxy_tunnels_open", "Open CONNECT tunnels.", value=m.tunnels_open)
        yield c(
            "proxy_intercept_certificates_minted",
            "Certificates minted for intercepted hosts (one per host, reminted before expiry).",
            value=m.certificates_minted,
        )
        yield g(
            "proxy_client_connections_open",
            "Client connections open on the proxy listener.",
            value=m.clients.open,
        )
        yield c(
            "proxy_client_connections_rejected",
            "Client connections closed on arrival: --max-client-connections were open.",
            value=m.clients.rejected,
        )
        yield c(
            "proxy_request_header_timeouts",
            "Client connections closed: no complete request head within --request-header-timeout.",
            value=m.clients.header_timeouts,
        )
        yield c(
            "proxy_host_label_overflow",
            'Requests and tunnels counted under host="other": the host label cap was reached.',
            value=m.host_overflow,
        )
        yield _by_reason(
            "proxy_denied",
            "Requests the proxy answered itself instead of proxying, by reason: the client, "
            "its credentials, the request's form or target, or a shutdown.",
            m.denied.counts,
        )
        yield _by_reason(
            "proxy_client_http2_errors",
            "Client HTTP/2 connections the proxy ended: a defence ran out (rapid_reset, "
            "continuation_flood, ping_flood, ...) or the client broke the protocol.",
            m.http2_errors.counts,
        )
        build = g("proxy_build_info", "Always 1; the version is a label.", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        scrapes = HistogramMetricFamily(
            "proxy_scrape_duration_seconds",
            "Time to answer each /metrics scrape, request received to last byte written (or to "
            "the scraper's disconnect or the write timeout).",
        )
        scrapes.add_metric([], _buckets(m.scrapes), m.scrapes.sum)
        yield scrapes

    def _host_counters(self, items: list[tuple[str, HostStats]]) -> Iterator[Metric]:
        (
            requests,
            errors,
            grpc,
            connections,
            dns_cache,
            body,
            outcomes,
            tunnel_bytes,
            sni_mismatches,
            intercept_failures,
            intercept_splices,
        ) = (
            CounterMetricFamily(name, help_text, labels=["host", *labels])
            for name, help_text, labels in _HOST_COUNTERS
        )
        seconds = HistogramMetricFamily(
            "proxy_tunnel_seconds",
            "Lifetime of each established tunnel, CONNECT received to both sides closed.",
            labels=["host"],
        )
        ttfb = HistogramMetricFamily(
            "proxy_tunnel_ttfb_seconds",
            "Tunnels: each exchange's first byte, read from TLS record timing (TLS 1.3: the first "
            "one estimated).",
            labels=["host"],
        )
        for host, s in items:
            for (method, code), n in sorted(s.requests.items()):
                requests.add_metric([host, method, code], n)
            for error, n in sorted(s.errors.items()):
                errors.add_metric([host, error], n)
            for code, n in sorted(s.grpc.items()):
                grpc.add_metric([host, code], n)
            if s.requests:
                connections.add_metric([host, "new"], s.connections_new)
                connections.add_metric([host, "reused"], s.connections_reused)
                body.add_metric([host, "sent"], s.bytes_sent)
                body.add_metric([host, "received"], s.bytes_received)
            if s.dns_hit or s.dns_miss:
                dns_cache.add_metric([host, "hit"], s.dns_hit)
                dns_cache.add_metric([host, "miss"], s.dns_miss)
            if s.tunnels:
                for outcome, n in sorted(s.tunnels.items()):
                    outcomes.add_metric([host, outcome], n)
                seconds.add_metric([host], _buckets(s.tunnel_seconds), s.tunnel_seconds.sum)
                tunnel_bytes.add_metric([host, "sent"], s.tunnel_bytes_sent)
                tunnel_bytes.add_metric([host, "received"], s.tunnel_bytes_received)
                sni_mismatches.add_metric([host], s.tunnel_sni_mismatches)
            if any(s.tunnel_ttfb.counts):
                ttfb.add_metric([host], _buckets(s.tunnel_ttfb), s.tunnel_ttfb.sum)
            for reason, n in sorted(s.intercept_failures.items()):
                intercept_failures.add_metric([host, reason], n)
            for reason, n in sorted(s.intercept_splices.items()):
                intercept_splices.add_metric([host, reason], n)
        yield from (requests, errors, grpc, connections, dns_cache, body, outcomes, seconds)
        yield from (tunnel_bytes, ttfb, sni_mismatches, intercept_failures, intercept_splices)


# prometheus-client's OpenMetrics encoder (untyped there).
openmetrics_latest: Final = cast(Callable[[CollectorRegistry], bytes], openmetrics.generate_latest)


def reference_registry(metrics: Metrics) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ReferenceCollector(metrics))
    return registry


# -- in-process render figures ------------------------------------------------------------


def _best(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def render_figures(hosts: int, repeat: int = 5) -> dict[str, Any]:
    """Render times (best of ``repeat``, ms) and sizes at ``hosts`` labels."""
    metrics = Metrics(DEFAULT_BUCKETS, HostLabelLimits(max_hosts=max(hosts, 1)))
    fill(metrics, hosts)
    exposition = Exposition(metrics, lambda: 0)
    registry = reference_registry(metrics)
    out: dict[str, Any] = {"hosts": hosts}
    for fmt, om in (("classic", False), ("openmetrics", True)):

        def all_moved(om: bool = om) -> bytes:
            for stats in metrics.hosts.values():
                stats.version += 1
            return exposition.render(om)

        def cached(om: bool = om) -> bytes:
            return exposition.render(om)

        body = exposition.render(om)
        out[f"{fmt}_all_moved_ms"] = round(_best(all_moved, repeat) * 1000, 1)
        out[f"{fmt}_cached_ms"] = round(_best(cached, repeat) * 1000, 1)
        out[f"{fmt}_bytes"] = len(body)
        started = time.perf_counter()
        out[f"{fmt}_gzip_bytes"] = len(gzip.compress(body, 6))
        out[f"{fmt}_gzip_ms"] = round((time.perf_counter() - started) * 1000, 1)
    encoders: dict[str, Callable[[CollectorRegistry], bytes]] = {
        "classic": generate_latest,
        "openmetrics": openmetrics_latest,
    }
    for fmt, encoder in encoders.items():
        seconds = _best(partial(encoder, registry), max(1, repeat // 2))
        out[f"{fmt}_prometheus_client_ms"] = round(seconds * 1000, 1)
    return out


def observe_cost(rounds: int = 200_000) -> dict[str, float]:
    """ns per histogram observation without and with an exemplar, and per request's ids."""
    hist = Histogram(DEFAULT_BUCKETS)
    ids = exemplar_ids("4bf92f3577b34da6a3ce929d0e0e4736", "0f5a3c1e-9a4b-4c7d-8e2f-1a2b3c4d5e6f")
    values = [random.Random(1).uniform(0, 2) for _ in range(1000)]

    def run(fn: Callable[[float], object]) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(rounds // 1000):
                for v in values:
                    fn(v)
            best = min(best, time.perf_counter() - started)
        return round(best / rounds * 1e9, 1)

    plain = run(hist.observe)
    with_exemplar = run(lambda v: hist.observe(v, ids))
    baseline = run(lambda v: None)
    make_ids = run(lambda v: exemplar_ids("4bf92f3577b34da6a3ce929d0e0e4736", "req-1"))
    return {
        "observe_ns": round(plain - baseline, 1),
        "observe_with_exemplar_ns": round(with_exemplar - baseline, 1),
        "exemplar_ids_per_request_ns": round(make_ids - baseline, 1),
    }


# -- over real sockets --------------------------------------------------------------------

OM_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)  # what Prometheus 2.42 sends
FORMATS = (("classic", "*/*"), ("openmetrics", OM_ACCEPT))


async def _get(session: aiohttp.ClientSession, url: str, **kw: Any) -> float:
    started = time.perf_counter()
    async with session.get(url, **kw) as resp:
        await resp.read()
    return time.perf_counter() - started


class _Live:
    """A proxy process with ``hosts`` labels, driven by an aiohttp client in this process."""

    def __init__(self, session: aiohttp.ClientSession, pid: int, proxy: str, metrics: str):
        self.session, self.pid, self.proxy, self.metrics = session, pid, proxy, metrics

    async def touch(self, urls: list[str], concurrency: int = 20) -> None:
        """One request to each URL (every host label moves)."""
        sem = asyncio.Semaphore(concurrency)

        async def one(url: str) -> None:
            async with sem:
                await _get(self.session, url, proxy=self.proxy)

        await asyncio.gather(*(one(url) for url in urls))

    async def scrape(self, accept: str) -> float:
        return await self.curl(self.metrics, accept)

    @staticmethod
    async def curl(url: str, accept: str) -> float:
        """One scrape by curl, as Prometheus asks (gzip); another process, so that reading
        and decompressing the body does not delay this loop's own requests."""
        curl = await asyncio.create_subprocess_exec(
            *("curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}"),
            *("-H", f"Accept: {accept}", "-H", "Accept-Encoding: gzip", url),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await curl.communicate()
        if curl.returncode != 0:
            raise RuntimeError(f"curl {url} exited {curl.returncode}")
        return float(out)

    async def during_scrape(self, accept: str, url: str) -> tuple[float, list[float]]:
        """A scrape's wall time, and the latency of requests sent one after another during it."""
        scrape = asyncio.ensure_future(self.scrape(accept))
        await asyncio.sleep(0)  # the scrape request goes out first
        during = []
        while not scrape.done():
            during.append(await _get(self.session, url, proxy=self.proxy))
        return await scrape, during

    async def cpu_per_request(self, url: str, clients: int, seconds: float) -> tuple[float, float]:
        """Proxy CPU seconds per request and requests per second at ``clients`` clients."""
        count = 0
        stop = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal count
            while time.perf_counter() < stop:
                await _get(self.session, url, proxy=self.proxy)
                count += 1

        before = cpu_seconds(self.pid)
        await asyncio.gather(*(client() for _ in range(clients)))
        return (cpu_seconds(self.pid) - before) / max(count, 1), count / seconds


async def stalled_scrape(host: str, port: int) -> socket.socket:
    """A scraper that sends GET /metrics (no Accept, no gzip), reads the head and the
    body's first bytes (so the body has been rendered), and then nothing more."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10)
        await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while len(received) <= received.find(b"\r\n\r\n") + 4:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
            if not chunk:
                raise ConnectionError("closed before the body")
            received += chunk
        if not received.startswith(b"HTTP/1.1 200 OK\r\n"):
            raise ConnectionError(f"not a scrape: {received[:40]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


async def _stalled(live: _Live, urls: list[str], readers: int) -> dict[str, Any]:
    await live.touch(urls)
    await live.scrape("*/*")  # every host rendered and cached
    before = rss_mb(live.pid)
    host, port = live.metrics.split("//")[1].split("/")[0].rsplit(":", 1)
    stalled: list[socket.socket] = []
    started = time.perf_counter()
    try:
        for _ in range(readers):
            await live.touch(urls)  # traffic moved every host since the last scrape
            stalled.append(await stalled_scrape(host, int(port)))
        seconds = time.perf_counter() - started
        during = rss_mb(live.pid)
    finally:
        for sock in stalled:
            sock.close()
    return {
        "readers": readers,
        "rss_before_mb": round(before, 1),
        "rss_with_readers_mb": round(during, 1),
        "per_reader_mb": round((during - before) / readers, 2),
        "seconds_to_open_them": round(seconds, 1),  # each must still be open: under 10 s
    }


def stalled_figures(hosts: int, readers: int = 10) -> dict[str, Any]:
    """A live proxy's RSS before and with ``readers`` scrapers that stopped reading."""
    return _through_live_proxy(hosts, lambda live, urls: _stalled(live, urls, readers))


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _live(live: _Live, urls: list[str], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    await live.touch(urls)
    target = urls[0]
    idle = sorted([await _get(live.session, target, proxy=live.proxy) for _ in range(200)])
    idle_p50 = statistics.median(idle)
    out["idle_p50_ms"] = round(idle_p50 * 1000, 2)
    # The noise floor: on a shared machine the slowest idle request is far above the p50.
    out["idle_p99_ms"] = round(_quantile(idle, 0.99) * 1000, 2)
    out["idle_max_ms"] = round(idle[-1] * 1000, 2)
    for fmt, accept in FORMATS:
        walls, during, cpus = [], [], []
        for _ in range(rounds):
            await live.touch(urls)  # every host moved since the last scrape: the worst case
            before = cpu_seconds(live.pid)
            wall, latencies = await live.during_scrape(accept, target)
            cpus.append(cpu_seconds(live.pid) - before)
            walls.append(wall)
            during.extend(latencies)
        cached = [await live.scrape(accept) for _ in range(rounds)]
        out[f"{fmt}_scrape_wall_ms"] = round(statistics.median(walls) * 1000, 1)
        out[f"{fmt}_scrape_wall_cached_ms"] = round(statistics.median(cached) * 1000, 1)
        out[f"{fmt}_scrape_cpu_ms"] = round(statistics.median(cpus) * 1000, 1)
        out[f"{fmt}_requests_during_scrapes"] = len(during)
        out[f"{fmt}_requests_per_scrape"] = len(during) / rounds
        during.sort()
        for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
            value = _quantile(during, q)
            out[f"{fmt}_during_scrape_{name}_ms"] = round(value * 1000, 2)
            out[f"{fmt}_during_scrape_{name}_over_idle_p50"] = round(value / idle_p50, 1)
    clients = 50
    per_request, rate = await live.cpu_per_request(target, clients, 5.0)
    out["clients"] = clients
    out["requests_per_s"] = round(rate, 1)
    out["cpu_per_request_us"] = round(per_request * 1e6, 1)
    # The CPU one scrape per 15 s adds, shared over that interval's requests. The CPU read
    # during a scrape also paid for the requests served meanwhile; they are taken off.
    for fmt, _ in FORMATS:
        served = out.pop(f"{fmt}_requests_per_scrape") * per_request
        net = max(out[f"{fmt}_scrape_cpu_ms"] / 1000 - served, 0.0)
        out[f"{fmt}_scrape_cpu_net_ms"] = round(net * 1000, 1)
        out[f"{fmt}_scrape_15s_cpu_added_percent"] = round(100 * net / (15 * rate * per_request), 2)
    return out


async def _loop_stalls(hosts: int, rounds: int) -> dict[str, Any]:
    metrics = Metrics(DEFAULT_BUCKETS, HostLabelLimits(max_hosts=max(hosts, 1)))
    fill(metrics, hosts)
    app = web.Application()
    app.router.add_get("/metrics", Exposition(metrics, lambda: 0))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    out: dict[str, Any] = {"hosts": hosts}
    try:
        for fmt, accept in FORMATS:
            gaps: list[float] = []  # wall time between turns
            cpu: list[float] = []  # this thread's CPU time between turns (no preemption)
            for _ in range(rounds):
                for stats in metrics.hosts.values():
                    stats.version += 1
                scrape = asyncio.ensure_future(_Live.curl(url, accept))
                last, last_cpu = time.perf_counter(), time.thread_time()
                while not scrape.done():
                    await asyncio.sleep(0)
                    now, now_cpu = time.perf_counter(), time.thread_time()
                    gaps.append(now - last)
                    cpu.append(now_cpu - last_cpu)
                    last, last_cpu = now, now_cpu
                await scrape
            for name, values in (("loop_gap", sorted(gaps)), ("loop_gap_cpu", sorted(cpu))):
                out[f"{fmt}_{name}_p99_ms"] = round(_quantile(values, 0.99) * 1000, 2)
                out[f"{fmt}_{name}_max_ms"] = round(values[-1] * 1000, 2)
    finally:
        await runner.cleanup()
    return out


def loop_stall_figures(hosts: int, rounds: int = 5) -> dict[str, Any]:
    """The longest the event loop waited between turns while serving a scrape (in this process,
    curl scraping). The CPU time of a gap is what the slicing bounds; its wall time also
    counts the machine preempting the process."""
    return asyncio.run(_loop_stalls(hosts, rounds))


@contextlib.contextmanager
def _proxy(*args: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """A proxy process (access log to a file, as a sidecar's stdout goes to a pipe)."""
    command = proxy_command("--admin-listen", "127.0.0.1:0", *args)
    with tempfile.TemporaryFile("w") as sink, ready_process(command) as (proc, listening):
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=sink)
        try:
            yield proc.pid, json.loads(listening)
        finally:
            proc.terminate()
            drain.wait(timeout=30)


async def _session_run(pid: int, ready: dict[str, Any], work: Callable[[_Live], Any]) -> Any:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await work(_Live(session, pid, ready["proxy"], ready["metrics"]))


def _through_live_proxy(
    hosts: int, work: Callable[[_Live, list[str]], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """``work``'s figures against a live proxy, given the URLs of ``hosts`` origin ports (a
    host label each)."""
    with ready_process([sys.executable, "-m", "benchmarks.ports_origin", str(hosts)]) as (_, line):
        urls = [f"http://127.0.0.1:{port}/" for port in json.loads(line)]
        with _proxy("--max-hosts", str(hosts)) as (pid, ready):
            out = asyncio.run(_session_run(pid, ready, lambda live: work(live, urls)))
    return {"hosts": hosts, **out}


def live_figures(hosts: int, rounds: int = 5) -> dict[str, Any]:
    """Scrape wall time and a proxied request's latency during a scrape, against a live proxy."""
    return _through_live_proxy(hosts, lambda live, urls: _live(live, urls, rounds))


def exemplar_cpu(rounds: int = 3, seconds: float = 5.0) -> dict[str, Any]:
    """Proxy CPU per request at 50 clients with --exemplars true and false, alternating."""
    found: dict[str, list[float]] = {"true": [], "false": []}
    with ready_process([sys.executable, "-m", "benchmarks.ports_origin", "1"]) as (_, line):
        (url,) = (f"http://127.0.0.1:{port}/" for port in json.loads(line))
        for _ in range(rounds):
            for setting, samples in found.items():
                with _proxy("--exemplars", setting) as (pid, ready):

                    async def work(live: _Live) -> float:
                        await live.cpu_per_request(url, 50, 1.0)  # warm-up
                        per_request, _ = await live.cpu_per_request(url, 50, seconds)
                        return per_request

                    samples.append(asyncio.run(_session_run(pid, ready, work)))
    on, off = statistics.median(found["true"]), statistics.median(found["false"])
    return {
        "cpu_per_request_us_exemplars_on": round(on * 1e6, 1),
        "cpu_per_request_us_exemplars_off": round(off * 1e6, 1),
        "on_over_off": round(on / off, 3),
    }


def figures(
    hosts: tuple[int, ...] = (10, 100, 1000),
    repeat: int = 5,
    rounds: int = 5,
    exemplar_rounds: int = 3,
    exemplar_seconds: float = 5.0,
) -> dict[str, Any]:
    return {
        "observe": observe_cost(),
        "render": [render_figures(n, repeat) for n in hosts],
        "loop": [loop_stall_figures(n, rounds) for n in hosts],
        "live": [live_figures(n, rounds) for n in hosts],
        "stalled": stalled_figures(max(hosts)),
        "exemplars_cpu": exemplar_cpu(exemplar_rounds, exemplar_seconds),
    }


# The figures of each host count shown in the bench table's last column (all go to the JSON).
TABLE_EXTRA: Final = {
    "render": ("openmetrics_all_moved_ms", "openmetrics_cached_ms", "openmetrics_gzip_bytes"),
    "loop": ("openmetrics_loop_gap_cpu_max_ms",),
    "live": (
        "openmetrics_scrape_wall_ms",
        "openmetrics_during_scrape_p99_over_idle_p50",
        "openmetrics_scrape_15s_cpu_added_percent",
    ),
}


def study_tables(found: dict[str, Any]) -> dict[str, dict[str, Measurement]]:
    """``figures()`` as bench tables: a row per host count, and exemplars on against off."""
    by_hosts: dict[str, Measurement] = {}
    for index, live in enumerate(found["live"]):
        extra = {
            key: float(found[part][index][key])
            for part, keys in TABLE_EXTRA.items()
            for key in keys
        }
        by_hosts[f"{live['hosts']} hosts"] = Measurement(
            rps=live["requests_per_s"],
            p50_ms=live["idle_p50_ms"],
            p99_ms=live["idle_p99_ms"],
            cpu_us_per_request=live["cpu_per_request_us"],
            extra=extra,
        )
    cpu = found["exemplars_cpu"]
    exemplars = {  # off first: the table's ratios are against it
        "exemplars-off": Measurement(cpu_us_per_request=cpu["cpu_per_request_us_exemplars_off"]),
        "exemplars-on": Measurement(cpu_us_per_request=cpu["cpu_per_request_us_exemplars_on"]),
    }
    return {
        "per host count (idle latency; scrape figures in extra, OpenMetrics, every host moved)": (
            by_hosts
        ),
        "50 clients, --exemplars true vs false": exemplars,
    }


def _study(bench: Bench) -> StudyResult:
    if bench.quick:
        found = figures((10, 100), repeat=2, rounds=2, exemplar_rounds=1, exemplar_seconds=2.0)
    else:
        found = figures()
    return StudyResult(study_tables(found), found)


SCENARIOS: Final = (
    Study(
        "scrape",
        "/metrics at 10, 100, 1,000 host labels (--quick: 10, 100)",
        _study,
        reference="10 hosts",
        direct="10 hosts",
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hosts", default="10,100,1000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    hosts = tuple(int(n) for n in args.hosts.split(","))
    print(json.dumps(figures(hosts, args.repeat), indent=2))


if __name__ == "__main__":
    main()
