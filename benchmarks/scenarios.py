"""The loads ``make bench`` runs against every candidate, and how one is measured.

A ``Scenario`` is a name, a title, the quantity its median is taken by, and a ``measure``
function: given a ``Running`` candidate and the ``Bench`` (origin port, durations), it
returns a ``Measurement``. ``wrk_scenario`` builds the usual kind: a wrk load of N
keep-alive clients on one origin path, with the proxy's CPU (its whole process tree,
from /proc) counted over exactly the measured load.

To add a scenario from another module (``benchmarks.scrape``, ``benchmarks.https``,
``benchmarks.spans``, ``benchmarks.http2``): define ``SCENARIOS: tuple[Scenario, ...]``
there and add the module's name to ``PLUGIN_MODULES``; ``make bench`` then runs and reports
it like the built-in ones (``--scenarios NAME`` picks it alone). ``Measurement.extra``
carries figures of its own, which go to the JSON file and the table's last column.

A ``Study`` is the other kind a module may list in ``SCENARIOS``: a measurement that starts
its own processes (a TLS origin and a proxy with ``--intercept``, a proxy with 1,000 host
labels) instead of loading each candidate. It runs once per ``make bench``, after the
candidates' rounds, and returns tables of rows (printed like the others, with ratios
against its ``reference`` and ``direct`` rows) plus every figure it took, for the JSON file.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from benchmarks.candidates import LOAD_CORE, Running, pinned
from benchmarks.procfs import tree_cpu_seconds, tree_peak_rss_mb

PLUGIN_MODULES: Final = (
    "benchmarks.scrape",
    "benchmarks.https",
    "benchmarks.spans",
    "benchmarks.http2",
)

SCRAPE_INTERVAL: Final = 15.0  # Prometheus' usual scrape interval, as in a real pod


@dataclass(frozen=True)
class Bench:
    origin_port: int
    seconds: int
    warmup: int
    quick: bool = False  # --quick: studies shorten themselves too

    def origin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.origin_port}{path}"


@dataclass
class Measurement:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    cpu_us_per_request: float | None = None
    peak_rss_mb: float | None = None
    mib_per_s: float | None = None
    scrapes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


Key = Literal["cpu_us_per_request", "p50_ms", "mib_per_s", "rps"]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    key: Key  # the median round is the one with the median of this
    measure: Callable[[Running, Bench], Measurement]


@dataclass
class StudyResult:
    tables: dict[str, dict[str, Measurement]]  # table title -> row name -> figures
    figures: dict[str, Any]  # everything measured, for the JSON file


@dataclass(frozen=True)
class Study:
    """A measurement with processes of its own, run once per ``make bench`` (see above)."""

    name: str
    title: str
    run: Callable[[Bench], StudyResult]
    reference: str = "ours"  # the row the "x ours" column divides CPU per request by
    direct: str = "direct"  # the row latency and speed are compared with


# -- wrk ---------------------------------------------------------------------------------------


def _duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(
    url: str, path: str, connections: int, seconds: int, host: str | None = None
) -> Measurement:
    """wrk on the load core; an absolute ``path`` makes it send absolute-form requests.

    ``host``: the Host field (the origin's, for a proxy); by default wrk's, from ``url``.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.path = "{path}"\n')
        if host is not None:
            script.write(f'wrk.headers["Host"] = "{host}"\n')
    try:
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
        out = subprocess.run(
            pinned(LOAD_CORE, [*command, "-s", script.name, url]),
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        os.unlink(script.name)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    done = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    if done is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    if not latency:  # nothing completed (a proxy that stalled): counted, not fatal
        errors += 1
    elif len(latency) < 2:  # seen once under heavy load: a percentile line wrk left out
        print(f"wrk printed no 50% or no 99% latency line:\n{out}", flush=True)
    return Measurement(
        requests=int(done.group(1)),
        seconds=_duration_ms(done.group(2)) / 1000.0,
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_duration_ms(latency["50"]) if "50" in latency else 0.0,
        p99_ms=_duration_ms(latency["99"]) if "99" in latency else 0.0,
        errors=errors,
    )


class Scraper:
    """GET ``url`` now and every ``interval`` s until stopped, as Prometheus would."""

    def __init__(self, url: str | None, interval: float = SCRAPE_INTERVAL) -> None:
        self.url = url
        self.interval = interval
        self.count = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assert self.url is not None
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    response.read()
                self.count += 1
            except OSError:
                self.failures += 1
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def running(self) -> Iterator[Scraper]:
        if self.url is None:
            yield self
            return
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=15)

    def __repr__(self) -> str:
        return f"<Scraper {self.url} every {self.interval:g}s count={self.count}>"


def wrk_scenario(
    name: str,
    title: str,
    path: str,
    connections: int,
    *,
    key: Key = "cpu_us_per_request",
    body_bytes: int | None = None,
    scrape: bool = False,
) -> Scenario:
    """``connections`` keep-alive clients fetching ``path`` through the candidate."""

    def measure(running: Running, bench: Bench) -> Measurement:
        host = f"127.0.0.1:{bench.origin_port}"
        if running.proxy_url is None:
            url, target = bench.origin_url(""), path
        else:
            url, target = running.proxy_url, bench.origin_url(path)
        run_wrk(url, target, connections, bench.warmup, host)  # pool, caches, DNS
        before = tree_cpu_seconds(running.pid) if running.pid else 0.0
        with Scraper(running.metrics_url if scrape else None).running() as scraper:
            result = run_wrk(url, target, connections, bench.seconds, host)
        if running.pid:
            cpu = tree_cpu_seconds(running.pid) - before
            result.cpu_us_per_request = cpu / max(result.requests, 1) * 1e6
            result.peak_rss_mb = tree_peak_rss_mb(running.pid)
        if body_bytes is not None:
            result.mib_per_s = result.requests * body_bytes / (1 << 20) / result.seconds
        result.scrapes = scraper.count
        return result

    return Scenario(name, title, key, measure)


SCENARIOS: Final[tuple[Scenario, ...]] = (
    wrk_scenario(
        "small-50",
        "13-byte responses, 50 keep-alive clients, /metrics scraped every 15 s",
        "/",
        50,
        scrape=True,
    ),
    wrk_scenario("small-1", "13-byte responses, 1 client (latency)", "/", 1, key="p50_ms"),
    wrk_scenario("64k-50", "64 KiB responses, 50 clients", "/64k", 50, body_bytes=64 << 10),
    wrk_scenario(
        "10m-1", "10 MiB downloads, 1 client", "/10m", 1, key="mib_per_s", body_bytes=10 << 20
    ),
)
