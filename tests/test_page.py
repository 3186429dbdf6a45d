"""The live page and its JSON: the same numbers as /metrics, served on the admin listener only,
and the page itself in a real browser (Debian's chromium, headless, driven by playwright; no
browser is downloaded). The browser test's screenshot becomes docs/live-page.png whenever the
page's sources have changed since that picture was committed, so the docs keep up with the page."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from PIL import Image
from playwright.async_api import ConsoleMessage, Page, async_playwright

from proxy.observe.metrics import PHASES
from proxy.observe.page import SHOWN_HOSTS
from tests.conftest import (
    Origin,
    RunningProxy,
    http_request,
    promtool_or_skip,
    serving_origin,
    unavailable,
)
from tests.test_failures import closed_port

HOLD_MS = 300  # the slow origin holds its response headers this long


@pytest.fixture
async def fast_origin() -> AsyncIterator[Origin]:
    """A second origin (another port, so another host label) for the quick calls."""
    async with serving_origin() as served:
        yield served


@dataclass
class Load:
    """What the scripted load did, for the tests to find on the page."""

    slow_host: str
    fast_host: str
    failing_host: str
    slow_ids: list[str]
    failure: str  # the Proxy-Status error type of the 502s


async def scripted_load(proxy: RunningProxy, slow: Origin, fast: Origin) -> Load:
    """12 quick calls, 3 held 300 ms, 2 to a closed port (502 connection_refused)."""
    failing = f"127.0.0.1:{closed_port()}"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def call(url: str) -> tuple[int, str, str]:
            async with session.get(url, proxy=proxy.url) as response:
                await response.read()
                return (
                    response.status,
                    response.headers["X-Request-ID"],
                    response.headers.get("Proxy-Status", ""),
                )

        for _ in range(12):
            assert (await call(fast.url("/echo")))[0] == 200
        held = await asyncio.gather(
            *(call(slow.url(f"/slow-headers?ms={HOLD_MS}")) for _ in range(3))
        )
        assert [status for status, _, _ in held] == [200] * 3
        failed = [await call(f"http://{failing}/nothing") for _ in range(2)]
    assert [status for status, _, _ in failed] == [502, 502]
    match = re.search(r"error=([a-z_]+)", failed[0][2])
    assert match is not None, failed[0][2]
    return Load(
        slow.authority, fast.authority, failing, [rid for _, rid, _ in held], match.group(1)
    )


async def admin_get(proxy: RunningProxy, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(proxy.admin_url + path) as response,
    ):
        return response.status, await response.text()


async def admin_json(proxy: RunningProxy, path: str) -> Any:
    status, text = await admin_get(proxy, path)
    assert status == 200, text
    return json.loads(text)


def bucket_series(metrics_text: str) -> dict[str, list[tuple[str, str]]]:
    """Per phase histogram name, its bucket lines (series, value) of hosts that observed any.

    A host with an empty histogram is left out: histogram_quantile gives it NaN, which the
    page reports as null.
    """
    observed = {
        (m[1], m[2])
        for m in re.finditer(r'^(\w+)_count\{host="([^"]*)"\} (\S+)$', metrics_text, re.M)
        if float(m[3]) > 0
    }
    series: dict[str, list[tuple[str, str]]] = {}
    for m in re.finditer(
        r'^((\w+)_bucket\{host="([^"]*)",le="[^"]*"\}) (\S+)$', metrics_text, re.M
    ):
        if (m[2], m[3]) in observed:
            series.setdefault(m[2], []).append((m[1], m[4]))
    return series


def promtool_agrees(tmp_path: Path, metrics_text: str, hosts: list[dict[str, Any]]) -> None:
    """Prometheus' own histogram_quantile, over the buckets /metrics shows, gives exactly the
    p50 and p99 of every phase of every host the page shows (promtool compares floats exactly)."""
    series = bucket_series(metrics_text)
    tests = []
    for name, attr, _ in PHASES:
        for key, q in (("p50", 0.5), ("p99", 0.99)):
            expected = [
                {"labels": f'{{host="{h["host"]}"}}', "value": h["phases"][attr][key]}
                for h in hosts
                if h["phases"][attr][key] is not None
            ]
            assert len(expected) == len({s.split(",le=")[0] for s, _ in series.get(name, [])})
            if expected:
                tests.append(
                    {
                        "expr": f"histogram_quantile({q}, {name}_bucket)",
                        "eval_time": "0m",
                        "exp_samples": expected,
                    }
                )
    assert tests, "the load gave no histogram anything"
    case = {
        "rule_files": [],
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": s, "values": v} for lines in series.values() for s, v in lines
                ],
                "promql_expr_test": tests,
            }
        ],
    }
    path = tmp_path / "page-quantiles.yml"
    path.write_text(yaml.safe_dump(case))
    done = subprocess.run(
        [promtool_or_skip(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def metric_sum(proxy: RunningProxy, name: str, host: str) -> float:
    """The sum of ``name``'s samples for ``host`` over its other labels."""
    return sum(
        sample.value
        for family in proxy.registry.collect()
        for sample in family.samples
        if sample.name == name and sample.labels.get("host") == host
    )


@pytest.mark.parametrize("window", ["minute", "all"])
async def test_api_numbers_are_those_of_metrics_after_a_scripted_load(
    proxy: RunningProxy, origin: Origin, fast_origin: Origin, tmp_path: Path, window: str
) -> None:
    """After a known load, /api/hosts gives /metrics' counts and sums, and the quantiles
    Prometheus computes from /metrics' buckets, for every host and phase."""
    load = await scripted_load(proxy, origin, fast_origin)
    page = await admin_json(proxy, f"/api/hosts?window={window}")
    status, metrics_text = await admin_get(proxy, "/metrics")
    assert status == 200
    hosts = {h["host"]: h for h in page["hosts"]}
    assert set(hosts) == {load.slow_host, load.fast_host, load.failing_host}
    expected = {load.fast_host: (12, 0), load.slow_host: (3, 0), load.failing_host: (2, 2)}
    for host, (requests, errors) in expected.items():
        h = hosts[host]
        assert (h["requests"], h["errors"]) == (requests, errors)
        assert h["requests"] == metric_sum(proxy, "proxy_upstream_requests_total", host)
        assert h["errors"] == metric_sum(proxy, "proxy_upstream_errors_total", host)
        assert h["error_ratio"] == errors / requests
        for name, attr, _ in PHASES:
            assert h["phases"][attr]["count"] == (proxy.sample(f"{name}_count", host=host) or 0)
            assert h["phases"][attr]["sum"] == (proxy.sample(f"{name}_sum", host=host) or 0)
        if window == "minute":
            assert h["requests_per_s"] == requests / page["seconds"]
        else:
            assert h["requests_per_s"] is None
    assert page["hosts"][0]["host"] == load.slow_host  # the worst p99 total
    await asyncio.to_thread(promtool_agrees, tmp_path, metrics_text, page["hosts"])


async def test_calls_list_the_slow_and_the_failed_calls(
    proxy: RunningProxy, origin: Origin, fast_origin: Origin
) -> None:
    """/api/calls gives a host's dots and slowest calls; /api/failed the 502s, with ids."""
    load = await scripted_load(proxy, origin, fast_origin)
    calls = await admin_json(proxy, f"/api/calls?host={load.slow_host}")
    assert len(calls["dots"]) == 3
    assert {c["request_id"] for c in calls["slowest"]} == set(load.slow_ids)
    assert all(c["phases"]["ttfb"] >= HOLD_MS / 1000 for c in calls["slowest"])
    assert all(c["path"] == "/slow-headers" for c in calls["slowest"])  # no query string
    failed = (await admin_json(proxy, "/api/failed"))["failed"]
    assert [(c["host"], c["status"], c["error"]) for c in failed] == [
        (load.failing_host, 502, load.failure)
    ] * 2
    assert failed[0]["at"] >= failed[1]["at"]  # newest first


async def test_failed_tunnel_is_listed_with_the_failed_calls(
    start_proxy: Any,
) -> None:
    """A CONNECT that cannot be dialled is a failed call; its host is on the page as tunnels."""
    port = closed_port()
    proxy = await start_proxy(connect_ports=(port,))
    reader, writer = await proxy.connect()
    writer.write(http_request("CONNECT", f"127.0.0.1:{port}", host=f"127.0.0.1:{port}"))
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line == b"HTTP/1.1 502 Bad Gateway\r\n"
    host = f"127.0.0.1:{port}"
    for _ in range(250):  # the tunnel is recorded as its handler ends: bounded wait, 5 s
        failed = (await admin_json(proxy, "/api/failed"))["failed"]
        if failed:
            break
        await asyncio.sleep(0.02)
    assert [(c["method"], c["path"], c["status"], c["error"]) for c in failed] == [
        ("CONNECT", host, 502, "connection_refused")
    ]
    hosts = (await admin_json(proxy, "/api/hosts"))["hosts"]
    assert [(h["host"], h["requests"], h["tunnels"], h["errors"]) for h in hosts] == [
        (host, 0, 1, 1)
    ]
    assert hosts[0]["phases"]["connect"]["count"] == 1


@pytest.mark.parametrize("path", ["/", "/api/hosts", "/api/calls?host=x", "/api/failed"])
async def test_page_on_the_proxy_listener_is_refused(proxy: RunningProxy, path: str) -> None:
    """The proxy listener answers the page's paths 400, like any origin-form request."""
    reader, writer = await proxy.connect()
    writer.write(http_request("GET", path))
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line == b"HTTP/1.1 400 Bad Request\r\n"
    assert proxy.sample("proxy_denied_total", reason="origin_form") == 1


async def test_page_off_serves_no_page_and_keeps_no_rings(start_proxy: Any, origin: Origin) -> None:
    """With --live-page false the admin listener has /metrics only, and no host keeps rings."""
    proxy = await start_proxy(live_page=False)
    async with (
        aiohttp.ClientSession() as session,
        session.get(origin.url("/echo"), proxy=proxy.url) as response,
    ):
        assert response.status == 200
    for path in ("/", "/api/hosts", "/api/failed"):
        assert (await admin_get(proxy, path))[0] == 404
    assert (await admin_get(proxy, "/metrics"))[0] == 200
    assert [stats.live for stats in proxy.server.metrics.hosts.values()] == [None]


async def test_page_carries_no_query_header_values_or_bodies(
    proxy: RunningProxy, origin: Origin
) -> None:
    """Secrets in a query, a header and a body, sent and echoed back, appear nowhere on the page."""
    failing = f"127.0.0.1:{closed_port()}"
    async with aiohttp.ClientSession() as session:
        for url in (origin.url("/echo"), f"http://{failing}/x"):
            async with session.post(
                url + "?token=QUERY-SECRET",
                proxy=proxy.url,
                headers={"X-Token": "HEADER-SECRET", "Cookie": "c=COOKIE-SECRET"},
                data=b"BODY-SECRET",
            ) as response:
                await response.read()
    texts = [
        (await admin_get(proxy, path))[1]
        for path in (
            "/",
            "/api/hosts",
            f"/api/calls?host={origin.authority}",
            f"/api/calls?host={failing}",
            "/api/failed",
        )
    ]
    assert "/x" in texts[0]  # the calls are there, paths and all
    assert "/echo" in texts[2]
    assert [t for t in texts if "SECRET" in t] == []


async def test_page_shows_the_hosts_table_without_javascript(
    proxy: RunningProxy, origin: Origin
) -> None:
    """The HTML itself holds the hosts table, and loads nothing from anywhere."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(origin.url("/echo"), proxy=proxy.url) as response,
    ):
        assert response.status == 200
    status, html = await admin_get(proxy, "/")
    assert status == 200
    table = re.search(r'<table class="hosts">.*?</table>', html, re.S)
    assert table is not None
    assert f">{origin.authority}</a>" in table.group(0)
    assert '<meta http-equiv="refresh" content="2">' in html  # inside <noscript>
    assert re.findall(r'(?:src|href)="(?!\?|data:)', html) == []  # nothing from elsewhere


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/hosts?window=week", 400),
        ("/?window=week", 400),
        ("/api/calls", 400),
        ("/api/calls?host=nowhere.example", 404),
    ],
)
async def test_bad_query_is_answered_with_what_to_send(
    proxy: RunningProxy, path: str, status: int
) -> None:
    """A window or host the page does not know gets a 4xx that says what it takes."""
    got, text = await admin_get(proxy, path)
    assert (got, bool(text.strip())) == (status, True)


# -- in a real browser ---------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).parent.parent
SCREENSHOT = "docs/live-page.png"
PAGE_SOURCES = ("proxy/observe/page.py", "proxy/observe/page.html")  # what the page looks like
# Headless on this machine (root, no GPU, no display); nothing but what the test asks for
# (no first-run page, no component, sync or background requests to hosts off loopback, no
# QUIC), and no proxy from the environment.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    # Even so, chromium looked up update.googleapis.com and accounts.google.com (seen with
    # strace): no name resolves in it at all; the page is reached by its loopback address.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
WAIT_MS = 15_000  # the bound on every browser step


def _git(*args: str) -> str | None:
    """``git args`` in the checkout; None without git or a checkout."""
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def screenshot_path(elsewhere: Path) -> Path:
    """docs/live-page.png when the page has changed since that picture was committed (a commit
    to its sources after it, or changes not committed), so the docs keep up with the page;
    ``elsewhere`` when nothing changed, so a run leaves the tree clean (docs/development.md)."""
    shot = _git("log", "-1", "--format=%H", "--", SCREENSHOT)
    if shot is None:
        return elsewhere  # not a git checkout: nothing to keep up to date
    if not shot.strip():
        return ROOT / SCREENSHOT  # never committed yet
    newer = _git("rev-list", f"{shot.strip()}..HEAD", "--", *PAGE_SOURCES)
    uncommitted = _git("status", "--porcelain", "--", *PAGE_SOURCES, SCREENSHOT)
    return ROOT / SCREENSHOT if newer or uncommitted else elsewhere


async def bar_widths(page: Page, row: int) -> dict[str, float]:
    """The width of each phase segment in the ``row``-th line of the hosts table."""
    segments = page.locator("table.hosts tbody tr").nth(row).locator(".seg")
    pairs = await segments.evaluate_all(
        "els => els.map(e => [e.classList[1], e.getBoundingClientRect().width])"
    )
    return {name: width for name, width in pairs}


def drawn_share(path: Path) -> tuple[float, int]:
    """The share of the screenshot's pixels that differ from its commonest colour, and how
    many colours it has: a blank page has none and one."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=rgb.width * rgb.height)
        assert colours is not None
        background = max(colours)[0]
        return 1 - background / (rgb.width * rgb.height), len(colours)


async def test_page_in_chromium_shows_where_the_time_goes(
    proxy: RunningProxy, origin: Origin, fast_origin: Origin, tmp_path: Path
) -> None:
    """After a load with an origin holding its headers 300 ms, chromium shows that host first
    with ttfb its largest bar, the slow calls' ids, the 502's error, no console error, and
    a fresh copy 2 s later."""
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(
            "the live page's browser test needs Debian's chromium: apt-get install chromium"
        )
    load = await scripted_load(proxy, origin, fast_origin)
    screenshot = screenshot_path(tmp_path / "live-page.png")
    problems: list[str] = []
    requested: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(message.text)

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile, removed with tmp_path
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 900},
            timeout=WAIT_MS,
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("console", console)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("request", lambda request: requested.append(request.url))
            await page.goto(proxy.admin_url + "/")

            rows = page.locator("table.hosts tbody tr")
            assert await rows.count() == 3
            assert await rows.first.locator("td").first.inner_text() == load.slow_host
            first = await bar_widths(page, 0)
            assert max(first, key=first.__getitem__) == "ttfb"
            others = [(await bar_widths(page, i)).get("ttfb", 0.0) for i in (1, 2)]
            assert first["ttfb"] > max(others)

            slow = await page.locator("#slow").inner_text()
            assert all(request_id in slow for request_id in load.slow_ids)
            failed = await page.locator("#failed").inner_text()
            assert load.failure in failed
            assert load.failing_host in failed

            # The refresh brings what happened since: one more call to the chosen host shows
            # up by itself, as a fourth dot and among its slowest (it holds 20).
            async with (
                aiohttp.ClientSession() as session,
                session.get(origin.url("/echo"), proxy=proxy.url) as response,
            ):
                late = response.headers["X-Request-ID"]
            await page.locator("#dots circle").nth(3).wait_for()
            await page.wait_for_function(
                "id => document.querySelector('#slow').innerText.includes(id)", arg=late
            )
            await page.screenshot(path=str(screenshot), full_page=True)
        finally:
            await context.close()
    assert problems == []
    assert [url for url in requested if not url.startswith(proxy.admin_url + "/")] == []
    share, colours = drawn_share(screenshot)
    assert share > 0.02, share
    assert colours > 50, colours


async def test_page_table_shows_the_worst_hosts_and_says_how_many_more(
    proxy: RunningProxy,
) -> None:
    """Past 100 hosts the table shows the 100 worst and names the rest; the JSON has all."""
    metrics = proxy.server.metrics
    for i in range(SHOWN_HOSTS + 7):
        stats = metrics.host(f"host-{i:03d}.test")
        stats.requests[("GET", "200")] = 1
        stats.total.observe(i / 1000)
    html = (await admin_get(proxy, "/"))[1]
    rows = re.findall(r'<a href="\?window=minute&amp;host=(host-\d+\.test)">', html)
    assert "And 7 more hosts: /api/hosts lists them all." in html
    hosts = (await admin_json(proxy, "/api/hosts"))["hosts"]
    assert rows == [h["host"] for h in hosts[:SHOWN_HOSTS]]
    worst = [h["phases"]["total"]["p99"] for h in hosts]
    assert worst == sorted(worst, reverse=True)
    assert worst[0] > worst[-1]
