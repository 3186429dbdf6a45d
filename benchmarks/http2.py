"""HTTP/2 figures: ours intercepting HTTP/2, against ours intercepting HTTP/1.1 and mitmproxy.

``http2_figures()`` returns them; ``python -m benchmarks.http2`` prints them, and
``make bench`` runs them once as the ``http2`` study. The load generator is h2load (Debian
``nghttp2-client``): 20 requests in flight, kept alive, on one connection of 20 streams
(HTTP/2) or on 20 connections (HTTP/1.1, ``--h1``). h2load cannot talk to a proxy, so a
CONNECT shim (``benchmarks.connect_shim``) opens the tunnel for each of its connections; it
then speaks TLS through the tunnel, and the proxy answers the handshake with a certificate
it mints. Rows, each a fresh measurement over the same time:

- ``direct``: h2load straight to the HTTP/2 origin (no proxy: latency and rate only);
- ``ours-h2``: HTTP/2 on both legs (the origin offers h2, so ours forwards over HTTP/2);
- ``ours-h1``: HTTP/1.1 on both legs, to an HTTP/1.1 origin;
- ``ours-h2-h1up``: HTTP/2 from the client, HTTP/1.1 upstream (the same HTTP/1.1 origin):
  what serving HTTP/2 to the client costs on its own;
- ``mitmproxy-h2``: mitmdump (pip, its own venv under ``.bench/``) on the same HTTP/2 path
  as ``ours-h2``; it offers the client the protocol the origin chose, hence the h2 origin.

The origins are hypercorn (``benchmarks.h2_origin``: h2 and HTTP/1.1) and aiohttp
(``benchmarks.https_origin``) over TLS. The HTTP/1.1 rows use aiohttp's: hypercorn sends no
reason phrase, and h2load 1.52 counts such an HTTP/1.1 response as failed. Proxies run on
the proxy core; origins, shims and h2load on the load core. Rounds alternate the rows; the
median round by the proxy's CPU per request is kept, and the CPU ratios are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks.candidates import LOAD_CORE, PROXY_CORE, bench_loop, pinned
from benchmarks.https import TlsFiles, drained, tls_files
from benchmarks.installs import MITMPROXY_BIN, mitmproxy
from benchmarks.processes import proxy_command, ready_process
from benchmarks.procfs import tree_cpu_seconds, tree_peak_rss_mb
from benchmarks.scenarios import Bench, Measurement, Study, StudyResult

STREAMS: Final = 20  # requests in flight: streams on one connection, or connections
H2: Final = ("-c1", f"-m{STREAMS}")
H1: Final = ("--h1", f"-c{STREAMS}", "-m1")
REFERENCE: Final = "ours-h2"
# (label, numerator row, denominator row): CPU per request, printed and kept in the JSON.
RATIOS: Final = (
    ("ours HTTP/2 / ours HTTP/1.1", "ours-h2", "ours-h1"),
    ("ours HTTP/2 / mitmproxy HTTP/2", "ours-h2", "mitmproxy-h2"),
    ("ours HTTP/2 client, HTTP/1.1 upstream / ours HTTP/1.1", "ours-h2-h1up", "ours-h1"),
)


@dataclass(frozen=True)
class Row:
    """One way through: which proxy (None: straight to the origin), which origin, which
    protocol towards the client."""

    proxy: str | None  # "ours" or "mitmproxy"
    origin: str  # "h2" (hypercorn) or "h1" (aiohttp)
    client: tuple[str, ...]  # h2load's flags: H2 or H1


ROWS: Final = {
    "direct": Row(None, "h2", H2),
    "ours-h2": Row("ours", "h2", H2),
    "ours-h1": Row("ours", "h1", H1),
    "ours-h2-h1up": Row("ours", "h1", H2),
    "mitmproxy-h2": Row("mitmproxy", "h2", H2),
}


def ratios(rows: dict[str, Measurement]) -> dict[str, float]:
    """``RATIOS`` over the rows that ran (a row left out leaves its ratios out)."""
    out = {}
    for label, top, bottom in RATIOS:
        a, b = rows.get(top), rows.get(bottom)
        if a and b and a.cpu_us_per_request is not None and b.cpu_us_per_request:
            out[label] = a.cpu_us_per_request / b.cpu_us_per_request
    return out


def parse_h2load(out: str, log: str) -> Measurement:
    """h2load's summary, with p50/p99 from its per-request log (start µs, status, µs)."""
    done = re.search(r"finished in ([\d.]+)(s|ms), ([\d.]+) req/s", out)
    counts = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    if done is None or counts is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    durations = sorted(int(line.split("\t")[2]) / 1000 for line in log.splitlines() if line)
    p50 = statistics.median(durations) if durations else 0.0
    p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))] if durations else 0.0
    seconds = float(done.group(1)) / (1000 if done.group(2) == "ms" else 1)
    succeeded, failed, errored, timeouts = (int(n) for n in counts.groups())
    return Measurement(
        requests=succeeded,
        seconds=seconds,
        rps=float(done.group(3)),
        p50_ms=p50,
        p99_ms=p99,
        errors=failed + errored + timeouts,
    )


def h2load(url: str, client: Sequence[str], seconds: float) -> Measurement:
    """One h2load run of ``seconds`` on the load core."""
    with tempfile.NamedTemporaryFile("r", suffix=".tsv") as log:
        duration = f"{round(seconds * 1000)}ms"  # h2load takes whole numbers with a unit
        command = ["h2load", "-t1", *client, "-D", duration, f"--log-file={log.name}", url]
        done = subprocess.run(
            pinned(LOAD_CORE, command), capture_output=True, text=True, timeout=seconds + 60
        )
        return parse_h2load(done.stdout + done.stderr, log.read())


@dataclass
class _Proxy:
    pid: int
    port: int


@contextlib.contextmanager
def _ours(files: TlsFiles, ports: Sequence[int], loop: str) -> Iterator[_Proxy]:
    command = proxy_command(
        "--admin-listen", "off", "--event-loop", loop, *files.intercepting(*ports)
    )
    with ready_process(pinned(PROXY_CORE, command)) as (proxy, listening), drained(proxy):
        yield _Proxy(proxy.pid, int(json.loads(listening)["proxy"].rsplit(":", 1)[1]))


@contextlib.contextmanager
def _mitmproxy(files: TlsFiles, confdir: Path) -> Iterator[_Proxy]:
    """mitmdump with its defaults (HTTP/2 on, a one-line summary of each flow on stdout,
    read away as ours' access log is), verifying the origin against its CA."""
    command = [str(MITMPROXY_BIN), "--listen-host", "127.0.0.1", "--listen-port", "0"]
    command += ["--set", f"confdir={confdir}"]
    command += ["--set", f"ssl_verify_upstream_trusted_ca={files.origin_ca}"]
    with ready_process(pinned(PROXY_CORE, command)) as (proxy, listening), drained(proxy):
        port = re.search(r"listening at [\d.]+:(\d+)", listening)
        if port is None:
            raise RuntimeError(f"mitmdump said: {listening}")
        yield _Proxy(proxy.pid, int(port.group(1)))


@contextlib.contextmanager
def _shim(proxy: _Proxy, origin_port: int) -> Iterator[str]:
    """The URL h2load fetches to reach ``origin_port`` through ``proxy``."""
    command = [sys.executable, "-m", "benchmarks.connect_shim", str(proxy.port)]
    command.append(f"127.0.0.1:{origin_port}")
    with ready_process(pinned(LOAD_CORE, command)) as (_, port):
        yield f"https://127.0.0.1:{int(port)}/"


def _measure(url: str, client: Sequence[str], seconds: float, pid: int | None) -> Measurement:
    h2load(url, client, min(seconds, 1.0))  # connections, pools, caches
    before = tree_cpu_seconds(pid) if pid else 0.0
    result = h2load(url, client, seconds)
    if pid:
        cpu = tree_cpu_seconds(pid) - before
        result.cpu_us_per_request = cpu / max(result.requests, 1) * 1e6
        result.peak_rss_mb = tree_peak_rss_mb(pid)
    return result


def http2_figures(
    seconds: float = 10.0,
    rounds: int = 3,
    loop: str = "uvloop",
    only: Sequence[str] = tuple(ROWS),
) -> StudyResult:
    """The rows of ``ROWS`` named in ``only`` that can run, ``rounds`` times alternating;
    the median round of each."""
    if shutil.which("h2load") is None:
        return StudyResult({}, {"skipped": "h2load not installed (apt-get install nghttp2-client)"})
    skipped: dict[str, str] = {}
    rows = {name: row for name, row in ROWS.items() if name in only}
    if any(row.proxy == "mitmproxy" for row in rows.values()):
        reason = mitmproxy()
        if reason is not None:
            skipped["mitmproxy-h2"] = reason
            del rows["mitmproxy-h2"]
    samples: dict[str, list[Measurement]] = {name: [] for name in rows}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        files = tls_files(tmp)
        origins = {
            "h2": _start_origin(stack, "benchmarks.h2_origin", files),
            "h1": _start_origin(stack, "benchmarks.https_origin", files),
        }
        proxies: dict[str, Callable[[], contextlib.AbstractContextManager[_Proxy]]] = {
            "ours": lambda: _ours(files, list(origins.values()), loop),
            "mitmproxy": lambda: _mitmproxy(files, tmp / "mitmproxy"),
        }
        for number in range(rounds):
            order = list(rows.items())
            for name, row in order if number % 2 == 0 else order[::-1]:
                print(f"  http2 round {number + 1}/{rounds}: {name}", flush=True)
                origin = origins[row.origin]
                if row.proxy is None:
                    url = f"https://127.0.0.1:{origin}/"
                    samples[name].append(_measure(url, row.client, seconds, None))
                    continue
                with proxies[row.proxy]() as proxy, _shim(proxy, origin) as url:
                    samples[name].append(_measure(url, row.client, seconds, proxy.pid))
    medians = {name: _median(runs) for name, runs in samples.items()}
    found = ratios(medians)
    for label, value in found.items():
        print(f"  CPU per request, {label}: {value:.2f}", flush=True)
    title = f"{STREAMS} requests in flight, kept alive, through interception"
    figures: dict[str, Any] = {
        "rows": {name: asdict(m) for name, m in medians.items()},
        "rounds": {name: [asdict(m) for m in runs] for name, runs in samples.items()},
        "cpu_ratios": found,
        "skipped": skipped,
    }
    return StudyResult({title: medians}, figures)


def _start_origin(stack: contextlib.ExitStack, module: str, files: TlsFiles) -> int:
    """Start an origin for the whole study; its TLS port."""
    command = pinned(LOAD_CORE, [sys.executable, "-m", module, files.cert, files.key])
    _, ports = stack.enter_context(ready_process(command))
    return int(ports.split()[0])


def _median(runs: list[Measurement]) -> Measurement:
    """The round with the median CPU per request (rate, for the row with no proxy)."""
    key: Callable[[Measurement], float] = lambda m: m.cpu_us_per_request or m.rps  # noqa: E731
    return sorted(runs, key=key)[len(runs) // 2]


def _study(bench: Bench) -> StudyResult:
    return http2_figures(
        seconds=3.0 if bench.quick else float(bench.seconds),
        rounds=1 if bench.quick else 3,
        loop=bench_loop(),
    )


SCENARIOS: Final = (
    Study(
        "http2",
        "HTTP/2 through interception: ours over HTTP/2 and HTTP/1.1, and mitmproxy",
        _study,
        reference=REFERENCE,
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is kept")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--only", help=f"rows, comma-separated (default: {','.join(ROWS)})")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else tuple(ROWS)
    result = http2_figures(args.seconds, args.rounds, args.loop, only)
    print(json.dumps(result.figures, indent=1))


if __name__ == "__main__":
    main()
