"""The exposition: byte-equal to prometheus-client's encoders, consistent, cached, off the loop."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import random
import re
import socket
import struct
import subprocess
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families as parse_classic

from benchmarks.scrape import fill, openmetrics_latest, reference_registry, stalled_scrape
from proxy.config import DEFAULT_BUCKETS
from proxy.observe.exposition import _PIECE, Exposition, accepts_gzip, go_float, number
from proxy.observe.exposition import parse_openmetrics as parse_om
from proxy.observe.metrics import (
    EXEMPLAR_LABEL_CHARS,
    PHASES,
    HostLabelLimits,
    HostStats,
    Metrics,
    exemplar_ids,
)
from proxy.rules.request_id import new_request_id, valid_request_id
from tests.conftest import LogCapture, Origin, RawOrigin, RunningProxy, promtool_or_skip, read_head
from tests.deploy.deploy_support import dashboard_queries
from tests.test_tunnelling import echo
from tests.tls import TLSOrigin

OM_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"

# Host labels that need escaping, or look like syntax.
ODD_HOSTS = (
    'quote"host:80',
    "back\\slash",
    "new\nline",
    "ünïcödé.example",
    "[::1]:8080",
    "le=+Inf",
    "other",
    "",
)


def random_metrics(seed: int, hosts: int = 60) -> Metrics:
    """Random numbers over many hosts (odd names too), some histograms with exemplars."""
    rng = random.Random(seed)
    metrics = Metrics((0.001, 0.01, 0.1, 1.0, 10.0), HostLabelLimits(max_hosts=10_000))
    names = [f"h{n}.example:{rng.randrange(1, 65536)}" for n in range(hosts)] + list(ODD_HOSTS)
    for name in names:
        stats = metrics.host(name)
        for _ in range(rng.randrange(0, 30)):
            value = rng.choice((0.0, 0.001, 10.0, 1e7, rng.expovariate(5.0)))
            ids = None
            if rng.random() < 0.5:
                trace = rng.randbytes(16).hex() if rng.random() < 0.8 else None
                ids = exemplar_ids(trace, f"r{rng.getrandbits(40)}")
            hist = getattr(stats, rng.choice(PHASES)[1])
            hist.observe(value, ids)
        for _ in range(rng.randrange(0, 4)):
            key = (rng.choice(("GET", "POST", "_OTHER")), rng.choice(("200", "502", "499")))
            stats.requests[key] = rng.randrange(1, 3_000_000)
        if rng.random() < 0.3:
            stats.errors[rng.choice(("dns_error", "connection_timeout"))] = rng.randrange(1, 9)
        if rng.random() < 0.3:
            stats.grpc[rng.choice(("OK", "NOT_FOUND"))] = rng.randrange(1, 9)
        stats.connections_new, stats.connections_reused = rng.randrange(9), rng.randrange(2**40)
        if rng.random() < 0.5:
            stats.dns_hit, stats.dns_miss = rng.randrange(9), rng.randrange(9)
        stats.bytes_sent, stats.bytes_received = rng.randrange(2**60), rng.randrange(9)
        if rng.random() < 0.3:
            stats.tunnels[rng.choice(("closed", "failed", "reset"))] = rng.randrange(1, 9)
            stats.tunnel_seconds.observe(rng.uniform(0, 9000), exemplar_ids(None, "tunnel-1"))
            stats.tunnel_bytes_sent = rng.randrange(2**33)
            stats.tunnel_sni_mismatches = rng.randrange(3)
            for _ in range(rng.randrange(3)):
                stats.tunnel_ttfb.observe(rng.expovariate(5.0), exemplar_ids(None, "tunnel-2"))
        if rng.random() < 0.2:
            stats.intercept_splices[rng.choice(("alpn", "ca_invalid"))] = rng.randrange(1, 9)
    metrics.tunnels_open, metrics.host_overflow = rng.randrange(9), rng.randrange(9)
    metrics.certificates_minted = rng.randrange(9)
    metrics.clients.open, metrics.clients.rejected = rng.randrange(9), rng.randrange(9)
    for reason in ("client_not_allowed", "client_not_allowed", 'we"ird'):
        metrics.denied(reason)
    metrics.http2_errors("rapid_reset")
    metrics.scrapes.observe(0.003)
    return metrics


def rendered(metrics: Metrics, om: bool) -> str:
    """One whole exposition of ``metrics`` as text, with no request in flight."""
    return Exposition(metrics, lambda: 0).render(om=om).decode()


@pytest.mark.parametrize("seed", range(8))
def test_classic_text_equals_prometheus_client_byte_for_byte(seed: int) -> None:
    """For random stats over many hosts, the classic text is what generate_latest writes."""
    metrics = random_metrics(seed)
    ours = Exposition(metrics, lambda: 0).render(om=False)
    assert ours == generate_latest(reference_registry(metrics))


@pytest.mark.parametrize("seed", range(8))
def test_openmetrics_equals_prometheus_client_byte_for_byte(seed: int) -> None:
    """For the same random stats, OpenMetrics (with exemplars) is what its encoder writes."""
    metrics = random_metrics(seed)
    ours = Exposition(metrics, lambda: 0).render(om=True)
    assert ours == openmetrics_latest(reference_registry(metrics))
    assert ours.endswith(b"# EOF\n")
    families = list(parse_om(ours.decode()))
    exemplars = [s.exemplar for f in families for s in f.samples if s.exemplar is not None]
    assert exemplars
    assert {s.labels["host"] for f in families for s in f.samples if "host" in s.labels} >= set(
        ODD_HOSTS
    )


def test_cached_blocks_follow_every_change() -> None:
    """After random updates and re-admissions, each render still equals the encoder's."""
    metrics = random_metrics(1)
    exposition = Exposition(metrics, lambda: 0)
    rng = random.Random(2)
    for _ in range(20):
        for om in (False, True):
            exposition.render(om)
        label = rng.choice(sorted(metrics.hosts))
        if rng.random() < 0.2:
            del metrics.hosts[label]  # then back with fresh stats and the same version
            metrics._capped -= 1
        stats = metrics.host(label)
        stats.ttfb.observe(rng.random(), exemplar_ids("ab" * 16, "again"))
        stats.requests[("GET", "200")] = stats.requests.get(("GET", "200"), 0) + 1
        registry = reference_registry(metrics)
        assert exposition.render(False) == generate_latest(registry)
        assert exposition.render(True) == openmetrics_latest(registry)


def test_unchanged_hosts_are_not_rendered_again() -> None:
    """A second render reuses every host's block; a moved host gets a new one."""
    metrics = random_metrics(3, hosts=5)
    exposition = Exposition(metrics, lambda: 0)
    exposition.render(om=True)
    before = {h: b[2] for h, b in exposition._cache[True].items()}
    metrics.host("h0.example:1" if "h0.example:1" in metrics.hosts else sorted(metrics.hosts)[0])
    exposition.render(om=True)
    after = exposition._cache[True]
    reused = [h for h in before if after[h][2] is before[h]]
    assert len(reused) == len(before) - 1


@pytest.mark.parametrize(
    "value",
    [0, 1, 999_999, 1_000_000, 2**53 + 1, 0.0, -0.0, 1e-9, 0.1, 123456.7, 1e6, 1e22, -3.5,
     float("inf"), float("-inf"), float("nan")],
)  # fmt: skip
def test_number_is_go_float_formatting(value: float) -> None:
    """Sample values are written exactly as prometheus-client's floatToGoString writes them."""
    assert number(value) == go_float(value)


@pytest.mark.parametrize(
    ("trace_id", "request_id", "names"),
    [
        ("a" * 32, "0f5a3c1e-9a4b-4c7d-8e2f-1a2b3c4d5e6f", ("request_id", "trace_id")),
        ("a" * 32, "r" * 78, ("request_id", "trace_id")),  # exactly 128 characters
        ("a" * 32, "r" * 79, ("trace_id",)),  # one over: the request id is left out
        (None, "r" * 118, ("request_id",)),  # a tunnel without a traceparent
        (None, "r" * 119, None),  # nothing fits: no exemplar
    ],
)
def test_exemplar_labels_fit_the_openmetrics_limit(
    trace_id: str | None, request_id: str, names: tuple[str, ...] | None
) -> None:
    """Exemplar labels stay within 128 characters; a request id that does not fit is dropped."""
    ids = exemplar_ids(trace_id, request_id)
    if names is None:
        assert ids is None
        return
    assert ids is not None
    pairs = dict(re.findall(r'(\w+)="([^"]*)"', ids[0]))
    assert tuple(pairs) == names
    assert sum(len(k) + len(v) for k, v in pairs.items()) <= EXEMPLAR_LABEL_CHARS
    assert float(ids[1]) > 0


def test_request_ids_need_no_escaping_in_exemplars() -> None:
    """Every character a valid request id may hold is written as itself in a label value."""
    charset = "".join(chr(c) for c in range(32, 127) if valid_request_id(chr(c)))
    assert charset
    assert all(c not in charset for c in '"\\\n')
    assert valid_request_id(new_request_id())


def promtool_check(text: bytes) -> None:
    result = subprocess.run(
        [promtool_or_skip(), "check", "metrics"], input=text, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def send_buffer_max() -> int:
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


def capped_metrics(hosts: int = 1000) -> Metrics:
    metrics = Metrics(DEFAULT_BUCKETS, HostLabelLimits(max_hosts=hosts))
    fill(metrics, hosts)
    return metrics


def test_promtool_accepts_the_classic_text_at_the_cap() -> None:
    """1,000 hosts, every histogram filled, exemplars everywhere: promtool accepts the text."""
    metrics = capped_metrics()
    body = Exposition(metrics, lambda: 0).render(om=False)
    # Per host: the phases, the tunnel lifetime and first byte; then the scrape histogram.
    assert body.count(b'le="+Inf"') == 1000 * (len(PHASES) + 2) + 1
    promtool_check(body)


def test_openmetrics_at_the_cap_parses_with_an_exemplar_per_bucket() -> None:
    """The OpenMetrics body at the cap parses, ends in # EOF and carries every exemplar."""
    metrics = capped_metrics(200)
    body = rendered(metrics, om=True)
    assert body.endswith("# EOF\n")
    buckets = [
        s for f in parse_om(body) if f.type == "histogram" for s in f.samples
        if s.name.endswith("_bucket") and "host" in s.labels
    ]  # fmt: skip
    assert buckets
    assert all(s.exemplar is not None for s in buckets)


# -- over the wire ------------------------------------------------------------------------


async def scrape(client: aiohttp.ClientSession, url: str, accept: str = "*/*") -> str:
    headers = {"Accept": accept, "Accept-Encoding": "identity"}
    async with client.get(url + "/metrics", headers=headers) as resp:
        assert resp.status == 200
        return (await resp.read()).decode()


def series_names(text: str, om: bool) -> set[str]:
    families = parse_om(text) if om else parse_classic(text)
    return {s.name for f in families for s in f.samples}


async def test_openmetrics_when_asked_classic_otherwise(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """Prometheus' Accept gets OpenMetrics with exemplars; */* and none get the classic text."""
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    async with client.get(origin.url("/echo"), proxy=proxy.url, headers=headers) as resp:
        assert resp.status == 200
    headers = {"Accept": OM_ACCEPT, "Accept-Encoding": "identity"}
    async with client.get(proxy.admin_url + "/metrics", headers=headers) as resp:
        assert resp.headers["Content-Type"].startswith(
            "application/openmetrics-text; version=1.0.0"
        )
        om = (await resp.read()).decode()
    for accept in ("*/*", ""):
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        async with client.get(proxy.admin_url + "/metrics", headers=headers) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            classic = (await resp.read()).decode()
            assert "# EOF" not in classic
            assert " # {" not in classic
    assert om.endswith("# EOF\n")
    assert 'trace_id="4bf92f3577b34da6a3ce929d0e0e4736"' in om
    assert "process_cpu_seconds_total" in om
    assert "process_cpu_seconds_total" in classic


async def test_dashboards_and_rules_see_the_same_series_in_both_formats(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    """Series names are the same under both formats and include all the dashboard and rules use."""
    fill(proxy.server.metrics, 2)  # every per-host family, tunnels too
    proxy.server.metrics.denied("client_not_allowed")  # series appear once counted
    classic = series_names(await scrape(client, proxy.admin_url), om=False)
    om = series_names(await scrape(client, proxy.admin_url, OM_ACCEPT), om=True)
    assert classic == om
    rules = (Path(__file__).parent.parent / "prometheus" / "rules.yml").read_text()
    exprs = "\n".join([rules, *(expr for _, expr in dashboard_queries())])
    # Series names, not recorded ones (level:metric:operation).
    used = set(re.findall(r"(?<![\w:])(proxy_[a-z_]+)(?![\w:])", exprs))
    assert "proxy_upstream_ttfb_seconds_bucket" in used
    assert used - classic == set()


async def test_exemplars_false_writes_none(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """With --exemplars false the OpenMetrics body has no exemplar."""
    proxy = await start_proxy(exemplars=False)
    async with client.get(origin.url("/echo"), proxy=proxy.url) as resp:
        assert resp.status == 200
    om = await scrape(client, proxy.admin_url, OM_ACCEPT)
    assert "proxy_upstream_request_seconds_bucket" in om
    assert " # {" not in om


@pytest.mark.parametrize(
    ("header", "gzip"),
    [
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=0.5", True),
        ("gzip; q=0", False),
        ("gzip;q=0.000", False),
        ("gzip;q=x", False),
        ("deflate, br", False),
        ("", False),
        ("x-gzip", False),
    ],
)
def test_accepts_gzip(header: str, gzip: bool) -> None:
    """gzip is used when listed with a non-zero weight (RFC 9110 §12.5.3)."""
    assert accepts_gzip(header) is gzip


async def test_gzip_when_the_scraper_accepts_it(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """Accept-Encoding: gzip gets a gzip body holding the same text."""
    async with client.get(origin.url("/echo"), proxy=proxy.url) as resp:
        assert resp.status == 200
    headers = {"Accept": OM_ACCEPT, "Accept-Encoding": "gzip"}
    async with client.get(proxy.admin_url + "/metrics", headers=headers) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(await resp.read()).decode()
    assert text.endswith("# EOF\n")
    assert "proxy_upstream_requests_total{" in text


async def test_head_metrics_answers_the_head_without_rendering(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    """HEAD /metrics gets the scrape's head, an empty body, and counts no scrape."""
    fill(proxy.server.metrics, 2)
    before = sum(proxy.server.metrics.scrapes.counts)
    async with client.head(proxy.admin_url + "/metrics", headers={"Accept": OM_ACCEPT}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert await resp.read() == b""
    assert sum(proxy.server.metrics.scrapes.counts) == before
    assert "proxy_upstream_requests_total{" in await scrape(client, proxy.admin_url)
    assert sum(proxy.server.metrics.scrapes.counts) == before + 1


async def test_scrapes_interleaved_with_traffic_show_count_equal_to_inf_bucket(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """Scrapes that yield after every host, amid traffic to many hosts, stay consistent."""
    proxy.server.exposition.slice_seconds = 0.0  # give the loop back after every host
    fill(proxy.server.metrics, 200)
    targets = [origin.url("/echo"), origin.url("/echo").replace("127.0.0.1", "localhost")]
    stop = asyncio.Event()

    async def traffic() -> int:
        sent = 0
        while not stop.is_set() and sent < 2000:
            async with client.get(targets[sent % 2], proxy=proxy.url) as resp:
                await resp.read()
            sent += 1
        return sent

    workers = [asyncio.ensure_future(traffic()) for _ in range(4)]
    checked = 0
    try:
        for n in range(12):
            text = await scrape(client, proxy.admin_url, OM_ACCEPT if n % 2 else "*/*")
            for family in (parse_om if n % 2 else parse_classic)(text):
                if family.type != "histogram":
                    continue
                inf = {}
                count = {}
                for s in family.samples:
                    key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                    if s.name.endswith("_bucket") and s.labels["le"] == "+Inf":
                        inf[key] = s.value
                    elif s.name.endswith("_count"):
                        count[key] = s.value
                assert inf == count, family.name
                checked += len(count)
    finally:
        stop.set()
        sent = sum(await asyncio.wait_for(asyncio.gather(*workers), 10))
    assert sent > 0
    assert checked > 12 * 200


async def test_a_proxied_request_completes_while_a_capped_scrape_is_in_progress(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """While a scrape of 1,000 hosts is under way (its reader stalled), a request is answered."""
    fill(proxy.server.metrics, 1000)
    scrapes = proxy.server.metrics.scrapes
    assert proxy.server.admin_address is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    address = (proxy.server.admin_address.host, proxy.server.admin_address.port)
    try:
        async with asyncio.timeout(10):
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(
                sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            head = b""
            while b"\r\n\r\n" not in head:  # the scrape has begun: its status line is out
                head += await loop.sock_recv(sock, 1024)
        # Nothing more of the scrape is read until the proxied request is done.
        async with client.get(origin.url("/echo"), proxy=proxy.url) as resp:
            assert resp.status == 200
            await resp.read()
        assert sum(scrapes.counts) == 0  # the scrape has not written its last byte
        received = len(head)
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(sock, 1 << 20):
                received += len(chunk)
    finally:
        sock.close()
    # The body could not have fitted in the socket buffers and one piece.
    wmem_max = send_buffer_max()
    assert received > wmem_max + 2 * 16384 + 2 * _PIECE
    for _ in range(100):  # bounded: the handler records the scrape after its last write
        if sum(scrapes.counts) == 1:
            break
        await asyncio.sleep(0.01)
    assert sum(scrapes.counts) == 1


# -- exemplars follow the host labels -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exemplar_hosts(text: str, trace_id: str) -> set[str]:
    """The host labels of the bucket lines whose exemplar holds ``trace_id``."""
    return {
        s.labels["host"]
        for f in parse_om(text)
        for s in f.samples
        if s.exemplar is not None and s.exemplar.labels.get("trace_id") == trace_id
    }


def request_to(metrics: Metrics, host: str, trace_id: str, request_id: str) -> None:
    """One forwarded request as the observer records it: counted, its ttfb with exemplar."""
    stats = metrics.host(host)
    stats.requests[("GET", "200")] = stats.requests.get(("GET", "200"), 0) + 1
    stats.ttfb.observe(0.5, exemplar_ids(trace_id, request_id))


def test_an_expired_host_label_takes_its_exemplars_with_it() -> None:
    """Once a host label expires its exemplars are gone; back again, it shows only new ones."""
    clock = Clock()
    metrics = Metrics((1.0,), HostLabelLimits(max_hosts=10, ttl=60.0), clock)
    exposition = Exposition(metrics, lambda: 0)
    request_to(metrics, "a.test", "a" * 32, "old")
    assert exemplar_hosts(exposition.render(om=True).decode(), "a" * 32) == {"a.test"}
    clock.now += 61
    assert exemplar_hosts(exposition.render(om=True).decode(), "a" * 32) == set()
    request_to(metrics, "a.test", "b" * 32, "new")
    text = exposition.render(om=True).decode()
    assert exemplar_hosts(text, "a" * 32) == set()
    assert exemplar_hosts(text, "b" * 32) == {"a.test"}


def test_a_host_past_the_cap_leaves_its_exemplars_on_other() -> None:
    """A host counted under "other" has no series of its own; its exemplars are other's."""
    metrics = Metrics((1.0,), HostLabelLimits(max_hosts=1), Clock())
    request_to(metrics, "a.test", "a" * 32, "first")
    request_to(metrics, "b.test", "b" * 32, "second")
    text = rendered(metrics, om=True)
    assert exemplar_hosts(text, "a" * 32) == {"a.test"}
    assert exemplar_hosts(text, "b" * 32) == {"other"}
    assert 'host="b.test"' not in text


async def phases_with_exemplar(
    client: aiohttp.ClientSession, proxy: RunningProxy, url: str, host: str
) -> set[str]:
    """The families whose buckets for ``host`` carry the ids of one request to ``url``."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    async with client.get(url, proxy=proxy.url, headers=headers) as resp:
        assert resp.status == 200
        request_id = resp.headers["X-Request-ID"]
    text = await scrape(client, proxy.admin_url, OM_ACCEPT)
    return {
        f.name
        for f in parse_om(text)
        for s in f.samples
        if s.exemplar is not None
        and s.exemplar.labels == {"trace_id": trace, "request_id": request_id}
        and s.labels["host"] == host
    }


async def test_every_phase_of_a_forwarded_request_gets_its_exemplar(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """A new http connection's queue, dns, connect, ttfb and request buckets carry its ids."""
    url = origin.url("/echo").replace("127.0.0.1", "localhost")  # a lookup too
    found = await phases_with_exemplar(client, proxy, url, f"localhost:{origin.port}")
    assert found == {name for name, _, _ in PHASES} - {"proxy_upstream_tls_seconds"}


async def test_an_https_request_gets_a_tls_exemplar_too(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    tls_ca_file: str,
    secure_origin: TLSOrigin,
    client: aiohttp.ClientSession,
) -> None:
    """Upgraded to https, the request's ids are on the TLS handshake bucket as well."""
    proxy = await start_proxy(upstream_ca_file=tls_ca_file, upgrade_to_https=("localhost",))
    url = f"http://localhost:{secure_origin.port}/echo"
    found = await phases_with_exemplar(client, proxy, url, f"localhost:{secure_origin.port}")
    assert found == {name for name, _, _ in PHASES}


async def test_a_tunnel_gets_an_exemplar_with_its_traceparent(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    raw_origin: Callable[..., Awaitable[RawOrigin]],
    logs: LogCapture,
    client: aiohttp.ClientSession,
) -> None:
    """A CONNECT carrying a traceparent leaves its trace and request ids on the tunnel buckets."""
    origin = await raw_origin(echo)
    proxy = await start_proxy(connect_ports=(origin.port,))
    trace = "0af7651916cd43dd8448eb211c80319c"
    host, _, port = proxy.url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    authority = f"127.0.0.1:{origin.port}"
    writer.write(
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        f"traceparent: 00-{trace}-b7ad6b7169203331-01\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(read_head(reader), 10)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), 10)
    (line,) = await logs.wait_for("tunnel")
    text = await scrape(client, proxy.admin_url, OM_ACCEPT)
    found = {
        (f.name, s.exemplar.labels["request_id"])
        for f in parse_om(text)
        for s in f.samples
        if s.exemplar is not None and s.exemplar.labels.get("trace_id") == trace
    }
    assert ("proxy_tunnel_seconds", line["request_id"]) in found
    assert ("proxy_upstream_connect_seconds", line["request_id"]) in found


async def test_every_family_on_the_registry_is_in_the_scrape(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """What the registry holds (ours, process, span export) is what /metrics serves."""
    proxy = await start_proxy(otlp_endpoint=f"http://127.0.0.1:{origin.port}/v1/traces")
    async with client.get(origin.url("/echo"), proxy=proxy.url) as resp:
        assert resp.status == 200
    registry = {m.name for m in proxy.registry.collect()}
    for accept, om in (("*/*", False), (OM_ACCEPT, True)):
        text = await scrape(client, proxy.admin_url, accept)
        families = {f.name for f in (parse_om if om else parse_classic)(text)}
        assert registry <= families, accept
    assert any(name.startswith("process_") for name in registry)
    assert any("span" in name for name in registry)


def one_closed_tunnel() -> tuple[Metrics, HostStats]:
    """Metrics that saw ``tunnelled.example`` only through one closed tunnel, connected in 3 ms."""
    metrics = Metrics((0.01, 1.0), HostLabelLimits(max_hosts=10))
    tunnelled = metrics.host("tunnelled.example")
    tunnelled.tunnels["closed"] = 1
    tunnelled.connect.observe(0.003)
    return metrics, tunnelled


def test_a_host_only_tunnelled_exports_no_request_series() -> None:
    """A tunnel-only host shows dns, connect and tunnel series, and no count-0 request rows."""
    metrics, tunnelled = one_closed_tunnel()
    tunnelled.dns.observe(0.002)
    tunnelled.tunnel_seconds.observe(5.0)
    forwarded = metrics.host("forwarded.example")
    forwarded.requests[("GET", "200")] = 1
    forwarded.ttfb.observe(0.004)
    text = rendered(metrics, om=False)
    tunnel_lines = {line.split("{")[0] for line in text.splitlines() if "tunnelled.example" in line}
    assert tunnel_lines == {
        "proxy_upstream_dns_seconds_bucket",
        "proxy_upstream_dns_seconds_count",
        "proxy_upstream_dns_seconds_sum",
        "proxy_upstream_connect_seconds_bucket",
        "proxy_upstream_connect_seconds_count",
        "proxy_upstream_connect_seconds_sum",
        "proxy_tunnels_total",
        "proxy_tunnel_seconds_bucket",
        "proxy_tunnel_seconds_count",
        "proxy_tunnel_seconds_sum",
        "proxy_tunnel_bytes_total",
        "proxy_tunnel_sni_mismatches_total",
    }
    assert 'proxy_upstream_queue_seconds_count{host="forwarded.example"} 0.0' in text
    assert 'proxy_upstream_connections_total{host="forwarded.example",kind="new"} 0.0' in text


def test_a_tunnel_whose_tls_was_timed_adds_its_tls_phase_and_first_bytes() -> None:
    """TLS read from a tunnel's bytes exports the tls phase and the tunnel's first bytes, and
    still no count-0 request series."""
    metrics, tunnelled = one_closed_tunnel()
    tunnelled.tls.observe(0.3)
    tunnelled.tunnel_ttfb.observe(0.2)
    text = rendered(metrics, om=False)
    assert 'proxy_upstream_tls_seconds_count{host="tunnelled.example"} 1.0' in text
    assert 'proxy_tunnel_ttfb_seconds_count{host="tunnelled.example"} 1.0' in text
    assert "proxy_upstream_queue_seconds_count{" not in text
    assert "proxy_upstream_ttfb_seconds_count{" not in text


# -- negotiation, and scrapers that stop reading ----------------------------------------------

CLASSIC_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OM_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", CLASSIC_TYPE),
        ("*/*", CLASSIC_TYPE),
        ("application/openmetrics-text;q=0, text/plain", CLASSIC_TYPE),
        ("application/openmetrics-text; q=0, */*", CLASSIC_TYPE),
        ("text/*;q=0.1, application/openmetrics-text;q=0", CLASSIC_TYPE),
        ("text/plain;q=0.5, application/openmetrics-text;q=0.4", CLASSIC_TYPE),
        ("application/openmetrics-text;version=2.0.0", CLASSIC_TYPE),  # not written here
        ("text/plain;version=1.0.0;escaping=allow-utf-8", CLASSIC_TYPE),
        ("application/openmetrics-text", OM_TYPE),
        ("Application/OpenMetrics-Text; Version=1.0.0", OM_TYPE),
        ("application/*", OM_TYPE),
        ("*/*;q=0.1, application/openmetrics-text;version=1.0.0;q=0.5", OM_TYPE),
        (OM_ACCEPT, OM_TYPE),
        (PROMETHEUS_3_ACCEPT, OM_TYPE),
    ],
)
async def test_metrics_content_type_names_the_format_written(
    proxy: RunningProxy, client: aiohttp.ClientSession, accept: str, content_type: str
) -> None:
    """Accept weights (q=0 refuses) pick the format; Content-Type and Vary say what was done."""
    headers = {"Accept": accept, "Accept-Encoding": "identity"}
    async with client.get(proxy.admin_url + "/metrics", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == content_type
        assert resp.headers["Vary"] == "Accept, Accept-Encoding"
        text = (await resp.read()).decode()
    assert text.endswith("# EOF\n") is (content_type == OM_TYPE)


async def _scrapes_counted(proxy: RunningProxy, count: int) -> None:
    """Wait (10 s at most) until ``count`` scrapes are in proxy_scrape_duration_seconds."""
    scrapes = proxy.server.metrics.scrapes
    for _ in range(1000):
        if sum(scrapes.counts) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{sum(scrapes.counts)} scrapes counted, expected {count}")


@pytest.mark.parametrize("listener", ["admin", "proxy"])
async def test_a_scraper_that_disconnects_mid_body_is_counted_without_a_traceback(
    proxy: RunningProxy,
    logs: LogCapture,
    caplog: pytest.LogCaptureFixture,
    listener: str,
) -> None:
    """A scraper resets the connection mid-body: no ERROR, the scrape is counted and logged."""
    fill(proxy.server.metrics, 1000)  # far more than the socket buffers hold
    address = proxy.server.admin_address if listener == "admin" else proxy.server.proxy_address
    assert address is not None
    sock = await stalled_scrape(address.host, address.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, with the rest of the body unread
    await _scrapes_counted(proxy, 1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    [line] = logs.events("scrape_aborted")
    assert line["reason"] == "client_disconnected"


async def test_stalled_scrapers_pin_no_copy_of_the_body(
    proxy: RunningProxy, client: aiohttp.ClientSession
) -> None:
    """Five scrapers stalled after every host moved hold far less than one body between them."""
    metrics = proxy.server.metrics
    fill(metrics, 1000)
    assert proxy.server.admin_address is not None
    address = proxy.server.admin_address
    stalled: list[socket.socket] = []
    tracemalloc.start()  # before the cache is filled, so that replacing its blocks nets out
    try:
        body = len(await scrape(client, proxy.admin_url))
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(5):
            for stats in metrics.hosts.values():
                stats.version += 1  # traffic moved every host: each scrape renders anew
            stalled.append(await stalled_scrape(address.host, address.port))
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        for sock in stalled:
            sock.close()
    assert after - before < body  # each used to pin its own rendering of every host


async def test_a_stalled_scraper_is_cut_after_the_write_timeout(
    proxy: RunningProxy, logs: LogCapture
) -> None:
    """A scraper that stops reading is disconnected once a write waits write_timeout."""
    fill(proxy.server.metrics, 1000)
    proxy.server.exposition.write_timeout = 0.3
    assert proxy.server.admin_address is not None
    address = proxy.server.admin_address
    sock = await stalled_scrape(address.host, address.port)
    try:
        await _scrapes_counted(proxy, 1)
        [line] = logs.events("scrape_aborted")
        assert line["reason"] == "write_timeout"
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(10):  # what was sent before the cut, then the end
                while await loop.sock_recv(sock, 1 << 20):
                    pass
    finally:
        sock.close()
