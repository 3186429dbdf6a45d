"""Metrics: names, labels and bucket arithmetic on a fresh registry; promtool accepts the text."""

from __future__ import annotations

import asyncio
import subprocess

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.observe.exposition import RegistryView, histogram_lines
from proxy.observe.metrics import Histogram, Metrics, method_label
from tests.conftest import Origin, RunningProxy, promtool_or_skip

IDENTITY = {"Accept-Encoding": "identity"}  # the body as written, for promtool


def registry_with(metrics: Metrics, in_flight: int = 0) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RegistryView(metrics, in_flight=lambda: in_flight))
    return registry


def test_histogram_buckets_are_less_than_or_equal_and_cumulative() -> None:
    """A value equal to a bound lands in that bucket; rendering is cumulative with +Inf."""
    hist = Histogram((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 5.0):
        hist.observe(value)
    assert hist.counts == [1, 2, 1]
    text = histogram_lines("h", 'host="a"', hist, om=False)
    assert text.splitlines() == [
        'h_bucket{host="a",le="0.1"} 1.0',
        'h_bucket{host="a",le="1.0"} 3.0',
        'h_bucket{host="a",le="+Inf"} 4.0',
        'h_count{host="a"} 4.0',
        'h_sum{host="a"} 6.6',
    ]
    assert hist.sum == pytest.approx(6.6)


def test_samples_per_host() -> None:
    """Observations show up under the host label with _bucket, _count and _sum."""
    metrics = Metrics((0.001, 0.01))
    stats = metrics.host("api.example.com")
    stats.ttfb.observe(0.005)
    stats.requests[("GET", "200")] = 3
    stats.errors["dns_error"] = 1
    stats.dns_hit = 2
    registry = registry_with(metrics, in_flight=4)
    get = registry.get_sample_value
    host = {"host": "api.example.com"}
    assert get("proxy_upstream_ttfb_seconds_bucket", {**host, "le": "0.001"}) == 0
    assert get("proxy_upstream_ttfb_seconds_bucket", {**host, "le": "0.01"}) == 1
    assert get("proxy_upstream_ttfb_seconds_count", host) == 1
    assert get("proxy_upstream_requests_total", {**host, "method": "GET", "code": "200"}) == 3
    assert get("proxy_upstream_errors_total", {**host, "error": "dns_error"}) == 1
    assert get("proxy_upstream_dns_cache_total", {**host, "result": "hit"}) == 2
    assert get("proxy_upstream_dns_cache_total", {**host, "result": "miss"}) == 0
    assert get("proxy_requests_in_flight") == 4
    assert get("proxy_build_info", {"version": "0.1.0"}) == 1


@pytest.mark.parametrize(
    ("method", "label"),
    [("GET", "GET"), ("PATCH", "PATCH"), ("PURGE", "_OTHER"), ("get", "_OTHER")],
)
def test_method_label(method: str, label: str) -> None:
    """Methods outside the standard set are counted as _OTHER."""
    assert method_label(method) == label


def promtool_check(text: bytes) -> None:
    result = subprocess.run(
        [promtool_or_skip(), "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_an_empty_and_a_populated_registry() -> None:
    """promtool check metrics accepts the text format with and without samples."""
    metrics = Metrics((0.001, 0.01))
    promtool_check(generate_latest(registry_with(metrics)))
    metrics.host("127.0.0.1:8081").total.observe(0.2)
    metrics.host("127.0.0.1:8081").requests[("_OTHER", "502")] = 1
    promtool_check(generate_latest(registry_with(metrics)))


async def test_promtool_accepts_the_live_metrics_endpoint(
    proxy: RunningProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """The admin /metrics of a proxy that forwarded traffic passes promtool check metrics."""
    async with client.get(origin.url("/echo"), proxy=proxy.url) as resp:
        assert resp.status == 200
    async with client.get(
        origin.url("/echo").replace("127.0.0.1", "localhost"), proxy=proxy.url
    ) as resp:
        assert resp.status == 200
    async with client.get(proxy.admin_url + "/metrics", headers=IDENTITY) as resp:
        body = await resp.read()
    assert b"proxy_upstream_request_seconds_bucket" in body
    await asyncio.to_thread(promtool_check, body)
