"""The host label is capped: overflow goes to "other", tracked hosts stay, idle labels expire."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.config import SettingError, parse_host_patterns
from proxy.observe.exposition import RegistryView
from proxy.observe.metrics import HostLabelLimits, Metrics
from proxy.rules.hostpatterns import HostPatterns, label_host
from tests.conftest import LogCapture, RawOrigin, RunningProxy
from tests.test_failures import closed_port
from tests.test_tunnelling import echo, open_tunnel


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def capped(
    max_hosts: int, track: tuple[str, ...] = (), ttl: float = 600.0, clock: FakeClock | None = None
) -> tuple[Metrics, Callable[..., float | None]]:
    """Metrics with a host cap on a fresh registry, and its get_sample_value."""
    metrics = Metrics(
        (1.0,), HostLabelLimits(max_hosts, HostPatterns(track), ttl), clock or FakeClock()
    )
    registry = CollectorRegistry()
    registry.register(RegistryView(metrics, in_flight=lambda: 0))

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    return metrics, sample


def request(metrics: Metrics, host: str) -> None:
    """What the observer does for one finished GET 200."""
    stats = metrics.host(host)
    key = ("GET", "200")
    stats.requests[key] = stats.requests.get(key, 0) + 1


def requests(sample: Callable[..., float | None], host: str) -> float | None:
    return sample("proxy_upstream_requests_total", host=host, method="GET", code="200")


def test_hosts_past_the_cap_are_counted_as_other() -> None:
    """The first max_hosts hosts get their own label; later ones go to "other" and are counted."""
    metrics, sample = capped(max_hosts=2)
    for host in ("a.test", "b.test", "c.test", "d.test", "a.test", "c.test"):
        request(metrics, host)
    assert requests(sample, "a.test") == 2
    assert requests(sample, "b.test") == 1
    assert requests(sample, "c.test") is None
    assert requests(sample, "d.test") is None
    assert requests(sample, "other") == 3
    assert sample("proxy_host_label_overflow_total") == 3


def test_zero_max_hosts_counts_everything_as_other() -> None:
    """With --max-hosts 0 every untracked host is counted under "other"."""
    metrics, sample = capped(max_hosts=0)
    request(metrics, "a.test")
    assert requests(sample, "other") == 1
    assert sample("proxy_host_label_overflow_total") == 1


def test_tracked_hosts_keep_their_label_past_the_cap_and_take_no_slot() -> None:
    """Hosts matching --track-hosts get their own label even when the cap is reached."""
    metrics, sample = capped(max_hosts=1, track=("*.example.com", "db.internal"))
    request(metrics, "api.example.com:8080")
    request(metrics, "db.internal")
    request(metrics, "first.test")  # the one untracked slot
    request(metrics, "deep.api.example.com")
    request(metrics, "example.com")  # *.example.com names subdomains only
    request(metrics, "second.test")
    assert requests(sample, "api.example.com:8080") == 1
    assert requests(sample, "db.internal") == 1
    assert requests(sample, "first.test") == 1
    assert requests(sample, "deep.api.example.com") == 1
    assert requests(sample, "other") == 2
    assert sample("proxy_host_label_overflow_total") == 2


def test_idle_labels_expire_at_scrape_and_free_their_slot() -> None:
    """A label unused for the TTL disappears at the next scrape; a new host can take its slot."""
    clock = FakeClock()
    metrics, sample = capped(max_hosts=1, ttl=10, clock=clock)
    request(metrics, "old.test")
    clock.now += 5
    request(metrics, "new.test")
    assert requests(sample, "other") == 1
    clock.now += 6  # old.test idle 11 s, "other" 6 s
    assert requests(sample, "old.test") is None  # the scrape dropped it
    assert requests(sample, "other") == 1
    request(metrics, "new.test")
    assert requests(sample, "new.test") == 1
    assert sample("proxy_host_label_overflow_total") == 1


def test_use_keeps_a_label_alive() -> None:
    """Each use restarts a label's idle time."""
    clock = FakeClock()
    metrics, sample = capped(max_hosts=1, ttl=10, clock=clock)
    for _ in range(3):
        request(metrics, "busy.test")
        clock.now += 8
    assert requests(sample, "busy.test") == 3


def test_a_full_table_sweeps_idle_labels_without_a_scrape() -> None:
    """When the cap is reached and nobody scrapes, idle labels still make room."""
    clock = FakeClock()
    metrics, sample = capped(max_hosts=1, ttl=10, clock=clock)
    request(metrics, "old.test")
    clock.now += 11
    request(metrics, "new.test")
    assert requests(sample, "new.test") == 1
    assert requests(sample, "old.test") is None
    assert sample("proxy_host_label_overflow_total") == 0


@pytest.mark.parametrize(
    ("label", "host"),
    [
        ("api.example.com", "api.example.com"),
        ("api.example.com:8080", "api.example.com"),
        ("127.0.0.1:8081", "127.0.0.1"),
        ("[::1]:8081", "[::1]"),
        ("[::1]", "[::1]"),
    ],
)
def test_label_host_drops_the_port(label: str, host: str) -> None:
    """Patterns see the host part of a label, without its port."""
    assert label_host(label) == host


def test_track_hosts_setting() -> None:
    """--track-hosts takes names, IP literals and *.domain, lower-cased; nothing else."""
    assert parse_host_patterns(" API.example.com,*.svc.local,,10.0.0.1,[::1]") == (
        "api.example.com",
        "*.svc.local",
        "10.0.0.1",
        "[::1]",
    )
    for bad in ("a.*.com", "*", "exa mple.com", "http://x"):
        with pytest.raises(SettingError):
            parse_host_patterns(bad)


def host_values(exposition: str) -> set[str]:
    return set(re.findall(r'host="([^"]*)"', exposition))


async def test_five_thousand_hosts_keep_the_series_bounded(
    start_proxy: Callable[..., Awaitable[RunningProxy]], logs: LogCapture
) -> None:
    """5,000 distinct hosts leave 1,000 host labels plus "other"; the access log names all."""
    proxy = await start_proxy()  # the default cap: 1000
    port = closed_port()
    hosts = [f"127.1.{i // 250}.{1 + i % 250}:{port}" for i in range(5000)]
    pending = iter(hosts)
    statuses: list[int] = []

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            for host in pending:
                async with session.get(f"http://{host}/", proxy=proxy.url) as resp:
                    statuses.append(resp.status)

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(32))), 120)
    assert statuses == [502] * 5000

    started = time.perf_counter()
    text = generate_latest(proxy.registry).decode()
    print(
        f"/metrics with 5000 hosts seen: {len(text)} bytes in {time.perf_counter() - started:.3f} s"
    )
    labels = host_values(text)
    assert len(labels) == 1001
    assert "other" in labels
    assert proxy.sample("proxy_host_label_overflow_total") == 4000
    assert (
        proxy.sample("proxy_upstream_requests_total", host="other", method="GET", code="502")
        == 4000
    )
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    per_host = sum(1 for line in samples if f'host="{hosts[0]}"' in line)
    assert len(samples) <= 1001 * per_host + 100  # the rest: gauges, process metrics
    await asyncio.sleep(0.3)  # the access log is flushed every 0.2 s
    assert {line["host"] for line in logs.events("access")} == set(hosts)


async def test_tunnels_past_the_cap_are_counted_as_other(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    raw_origin: Callable[[Any], Awaitable[RawOrigin]],
    logs: LogCapture,
) -> None:
    """A CONNECT tunnel goes through the same cap: its series say "other", its log line the host."""
    origin = await raw_origin(echo)
    proxy = await start_proxy(connect_ports=(origin.port,), max_hosts=0)
    host = f"127.0.0.1:{origin.port}"
    tunnel = await open_tunnel(proxy.url, host)
    tunnel.writer.write_eof()
    assert await asyncio.wait_for(tunnel.reader.read(), 5) == b""
    tunnel.writer.close()
    (line,) = await logs.wait_for("tunnel")
    assert line["host"] == host
    assert proxy.sample("proxy_tunnels_total", host="other", outcome="closed") == 1
    assert proxy.sample("proxy_tunnels_total", host=host, outcome="closed") is None
    assert proxy.sample("proxy_host_label_overflow_total") == 1
