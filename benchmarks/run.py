"""``make bench``: the proxy against a direct path and against itself untraced, in one run.

Starts a local origin, then for each scenario a fresh proxy process and a wrk load
(keep-alive clients, small responses). Prints requests/s, p50/p99 latency, the proxy's
CPU time per request (utime + stime from /proc) and its peak RSS (also with spans exported
to a local OTLP sink at ratio 1.0), with the ratios:
through-proxy vs direct, and tracing + metrics + access log on vs off.
Everything runs on loopback; each load is bounded by wrk's duration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from benchmarks.processes import proxy_command, ready_process
from benchmarks.procfs import cpu_seconds, peak_rss_mb


@dataclass
class Load:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass
class Sample:
    name: str
    load: Load
    cpu_us_per_request: float | None = None
    peak_rss_mb: float | None = None


def _duration_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, path: str, connections: int, seconds: int) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        # An absolute path makes wrk send absolute-form requests: what a proxy receives.
        script.write(f'wrk.path = "{path}"\n')
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        ).stdout
    finally:
        os.unlink(script.name)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return Load(
        requests=int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=_duration_ms(latency["50"]),
        p99_ms=_duration_ms(latency["99"]),
        errors=errors,
    )


def proxy_sample(
    name: str, origin_port: int, observe: bool, args: argparse.Namespace, *extra: str
) -> Sample:
    command = proxy_command(
        *extra,
        "--admin-listen",
        "off",
        "--observe",
        "true" if observe else "false",
        "--log-level",
        "info",
        "--event-loop",
        args.loop,
    )
    # The access log goes to a file, as a sidecar's stdout goes to the node's log pipe.
    with tempfile.TemporaryFile("w") as sink:
        with ready_process(command) as (proc, listening):
            proxy_url = json.loads(listening)["proxy"]
            drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=sink)
            target = f"http://127.0.0.1:{origin_port}/"
            run_wrk(proxy_url, target, args.connections, 2)  # warm-up: pool, caches
            before = cpu_seconds(proc.pid)
            load = run_wrk(proxy_url, target, args.connections, args.seconds)
            cpu = cpu_seconds(proc.pid) - before
            rss = peak_rss_mb(proc.pid)
        drain.wait(timeout=30)
    return Sample(name, load, cpu / load.requests * 1e6, rss)


def median_sample(samples: list[Sample]) -> Sample:
    """The run with the median CPU per request (the quantity the targets are about)."""
    ordered = sorted(samples, key=lambda s: s.cpu_us_per_request or 0.0)
    return ordered[len(ordered) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each load")
    parser.add_argument("--connections", type=int, default=50, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--skip-tunnel", action="store_true", help="skip the CONNECT figures")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("make bench needs wrk (Debian package 'wrk'): apt-get install wrk")

    with (
        ready_process([sys.executable, "-m", "benchmarks.origin"]) as (_, port_line),
        ready_process([sys.executable, "-m", "benchmarks.otlp_sink"]) as (_, sink_line),
    ):
        port = int(port_line)
        # Span export at ratio 1.0: every request is a span, sent to a local OTLP sink.
        spans_args = (
            "--otlp-endpoint",
            f"http://127.0.0.1:{int(sink_line)}",
            "--otlp-sample-ratio",
            "1.0",
        )
        run_wrk(f"http://127.0.0.1:{port}", "/", args.connections, 2)
        direct = Sample(
            "direct", run_wrk(f"http://127.0.0.1:{port}", "/", args.connections, args.seconds)
        )
        on: list[Sample] = []
        off: list[Sample] = []
        exporting: list[Sample] = []
        for _ in range(args.rounds):  # alternate, so drift in the machine hits both alike
            on.append(proxy_sample("proxy, tracing on", port, True, args))
            off.append(proxy_sample("proxy, tracing off", port, False, args))
            exporting.append(proxy_sample("proxy, spans exported", port, True, args, *spans_args))
    traced, untraced = median_sample(on), median_sample(off)
    spans_on = median_sample(exporting)

    print(
        f"\n{args.connections} keep-alive clients, {args.seconds:g} s per run, "
        f"{args.rounds} rounds (median by CPU/request), loop={args.loop}, wrk -t1\n"
    )
    print(
        f"{'scenario':<22}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}"
        f"{'peak RSS MB':>13}{'errors':>8}"
    )
    for sample in (direct, traced, untraced, spans_on):
        cpu = f"{sample.cpu_us_per_request:.0f}" if sample.cpu_us_per_request else "-"
        rss = f"{sample.peak_rss_mb:.1f}" if sample.peak_rss_mb else "-"
        print(
            f"{sample.name:<22}{sample.load.rps:>10.0f}{sample.load.p50_ms:>9.2f}"
            f"{sample.load.p99_ms:>9.2f}{cpu:>12}{rss:>13}{sample.load.errors:>8}"
        )
    assert traced.cpu_us_per_request
    assert untraced.cpu_us_per_request
    print("\nratios")
    print(f"  through proxy vs direct, req/s:      {traced.load.rps / direct.load.rps:.2f}")
    print(f"  through proxy vs direct, p50:        {traced.load.p50_ms / direct.load.p50_ms:.2f}")
    print(
        f"  tracing on vs off, CPU per request:  "
        f"{traced.cpu_us_per_request / untraced.cpu_us_per_request:.3f}"
    )
    print(f"  tracing on vs off, req/s:            {traced.load.rps / untraced.load.rps:.3f}")
    print("  all rounds, CPU us/req on:  " + ", ".join(f"{s.cpu_us_per_request:.0f}" for s in on))
    print("  all rounds, CPU us/req off: " + ", ".join(f"{s.cpu_us_per_request:.0f}" for s in off))
    print(f"  spread on: {statistics.pstdev(s.cpu_us_per_request or 0 for s in on):.1f} us")
    assert spans_on.cpu_us_per_request
    print(
        f"  spans exported vs not, CPU per request: "
        f"{spans_on.cpu_us_per_request / traced.cpu_us_per_request:.3f}"
    )

    if not args.skip_tunnel:
        with contextlib.suppress(ImportError):
            from benchmarks.tunnel import tunnel_throughput

            print("\nCONNECT tunnel throughput (MB/s)")
            for key, value in tunnel_throughput().items():
                print(f"  {key:<34}{value:>10.1f}")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")
