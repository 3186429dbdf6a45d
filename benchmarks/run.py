"""``make bench``: ours side by side with the direct path, an aiohttp floor and other proxies.

One run on one machine: a local origin, then for each round and each candidate (direct,
the bare aiohttp forwarder with and without tracing, ours with everything on and with
``--observe false``, proxy.py, squid, tinyproxy) a fresh proxy process that goes through
every scenario (``benchmarks.scenarios``). The proxy is pinned to one core, wrk and the
origin to the other; rounds alternate candidates so drift in the machine hits all alike,
and the median round is reported. Then the studies the plug-in modules define, once each
(HTTPS origination and interception, the /metrics scrape at 10-1,000 hosts, the cost of a
span). Prints a table per scenario with ratios against ours and against direct, what
exemplars and span export cost, the issue's targets, and writes everything to a JSON file.

Quick subset: ``make bench BENCH_ARGS="--quick --only ours,bare"``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from benchmarks.candidates import (
    CANDIDATES,
    EXTRA_CANDIDATES,
    LOAD_CORE,
    Candidate,
    ours_at,
    pinned,
    started,
)
from benchmarks.installs import BENCH_DIR
from benchmarks.processes import ready_process
from benchmarks.scenarios import (
    PLUGIN_MODULES,
    SCENARIOS,
    Bench,
    Measurement,
    Scenario,
    Study,
    StudyResult,
)

Medians = dict[str, dict[str, Measurement]]  # scenario -> candidate -> median round


def plugin_scenarios() -> list[Scenario | Study]:
    """Scenarios and studies other modules define (see ``benchmarks.scenarios``)."""
    found: list[Scenario | Study] = []
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        found.extend(getattr(module, "SCENARIOS", ()))
    return found


def _pick(
    names: str | None, known: Sequence[Any], what: str, extra: Sequence[Any] = ()
) -> list[Any]:
    if names is None:
        return list(known)
    known = [*known, *extra]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    by_name = {item.name: item for item in known}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(by_name)})")
    return [by_name[n] for n in wanted]


def median(samples: list[Measurement], scenario: Scenario) -> Measurement:
    """The round with the median of the scenario's key (CPU/request where there is one)."""
    key = scenario.key
    if key == "cpu_us_per_request" and samples[0].cpu_us_per_request is None:
        key = "rps"  # the direct path has no proxy process
    ordered = sorted(samples, key=lambda m: getattr(m, key) or 0.0)
    return ordered[len(ordered) // 2]


def measure_all(
    candidates: list[Candidate], scenarios: list[Scenario], bench: Bench, rounds: int
) -> tuple[list[dict[str, Any]], Medians, dict[str, str]]:
    runs: list[dict[str, Any]] = []
    samples: dict[tuple[str, str], list[Measurement]] = {}
    skipped: dict[str, str] = {}
    for candidate in candidates:
        reason = candidate.prepare()
        if reason is not None:
            skipped[candidate.name] = reason
            print(f"skipping {candidate.name}: {reason}", flush=True)
    active = [c for c in candidates if c.name not in skipped]
    for number in range(rounds):
        for candidate in active if number % 2 == 0 else active[::-1]:
            print(f"round {number + 1}/{rounds}: {candidate.name}", flush=True)
            with started(candidate, bench.origin_port) as running:
                for scenario in scenarios:
                    result = scenario.measure(running, bench)
                    samples.setdefault((scenario.name, candidate.name), []).append(result)
                    runs.append(
                        {
                            "round": number,
                            "candidate": candidate.name,
                            "scenario": scenario.name,
                            **asdict(result),
                        }
                    )
    medians: Medians = {}
    for scenario in scenarios:
        for candidate in active:
            chosen = median(samples[(scenario.name, candidate.name)], scenario)
            medians.setdefault(scenario.name, {})[candidate.name] = chosen
    return runs, medians, skipped


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(scenarios: list[Scenario], medians: Medians) -> None:
    for scenario in scenarios:
        print_table(f"{scenario.name}: {scenario.title}", medians.get(scenario.name, {}))


def print_table(
    heading: str, rows: dict[str, Measurement], reference: str = "ours", base: str = "direct"
) -> None:
    """One row per candidate; "x ours" is CPU per request over ``reference``'s, "+p50 ms" and
    "x direct" compare with ``base``."""
    if reference not in rows:  # a study's table without that row: its first with CPU figures
        with_cpu = (n for n, m in rows.items() if m.cpu_us_per_request is not None)
        reference = next(with_cpu, reference)
    ours, direct = rows.get(reference), rows.get(base)
    width = max(8, len(reference) + 3)
    print(f"\n{heading}")
    print(
        f"  {'candidate':<16}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'+p50 ms':>9}"
        f"{'CPU us/req':>11}{'x ' + reference:>{width}}{'MiB/s':>8}"
        f"{'x direct':>9}{'RSS MB':>8}{'errors':>7}  extra"
    )
    for name, m in rows.items():
        added = m.p50_ms - direct.p50_ms if direct and name != base and m.rps else None
        cpu_rel = _ratio(m.cpu_us_per_request, ours.cpu_us_per_request if ours else None)
        speed = _ratio(m.mib_per_s, direct.mib_per_s if direct else None)
        extra = " ".join(f"{k}={v:g}" for k, v in m.extra.items())
        if m.scrapes:
            extra = f"scrapes={m.scrapes} {extra}".strip()
        timed = m.rps > 0  # a CPU-only row (a study's microbenchmark) has no load figures
        rps, p50, p99 = (m.rps, m.p50_ms, m.p99_ms) if timed else (None, None, None)
        print(
            f"  {name:<16}{_fmt(rps, '.0f'):>9}{_fmt(p50, '.2f'):>8}{_fmt(p99, '.2f'):>8}"
            f"{_fmt(added, '.3f'):>9}{_fmt(m.cpu_us_per_request, '.0f'):>11}"
            f"{_fmt(cpu_rel, '.2f'):>{width}}{_fmt(m.mib_per_s, '.0f'):>8}"
            f"{_fmt(speed, '.2f'):>9}{_fmt(m.peak_rss_mb, '.1f'):>8}{m.errors:>7}  {extra}"
        )


def run_studies(studies: list[Study], bench: Bench) -> dict[str, StudyResult]:
    out: dict[str, StudyResult] = {}
    for study in studies:
        print(f"study: {study.name}", flush=True)
        started_at = time.monotonic()
        out[study.name] = study.run(bench)
        print(f"  ({study.name} took {time.monotonic() - started_at:.0f} s)", flush=True)
    return out


# What a feature costs: a candidate with it changed against ours with everything on (default).
FEATURES: Final = (
    ("exemplars on / off (--exemplars false)", "ours", "ours-noexemplars"),
    ("span export at ratio 1.0 / off", "ours-spans", "ours"),
    ("everything on / --observe false", "ours", "ours-off"),
)


def feature_costs(medians: Medians) -> list[dict[str, Any]]:
    """CPU per request with a feature over without, per CPU scenario where both ran."""
    out = []
    for label, with_it, without in FEATURES:
        for scenario, rows in medians.items():
            if with_it in rows and without in rows:
                value = _ratio(rows[with_it].cpu_us_per_request, rows[without].cpu_us_per_request)
                if value is not None:
                    out.append({"feature": label, "scenario": scenario, "cpu_ratio": value})
    return out


def print_feature_costs(costs: list[dict[str, Any]]) -> None:
    if costs:
        print("\nfeature costs: CPU per request with / without")
    for c in costs:
        print(f"  {c['feature']:<42}{c['scenario']:<10}{c['cpu_ratio']:>7.3f}")


def targets(medians: Medians) -> list[dict[str, Any]]:
    """Issue 16's targets, each as measured; a target with a candidate missing is left out."""

    def cpu(scenario: str, name: str) -> float | None:
        m = medians.get(scenario, {}).get(name)
        return m.cpu_us_per_request if m else None

    def added_p50(name: str) -> float | None:
        rows = medians.get("small-1", {})
        if name not in rows or "direct" not in rows:
            return None
        return rows[name].p50_ms - rows["direct"].p50_ms

    def speed(name: str) -> float | None:
        rows = medians.get("10m-1", {})
        if name not in rows or "direct" not in rows:
            return None
        return _ratio(rows[name].mib_per_s, rows["direct"].mib_per_s)

    small = medians.get("small-50", {})
    rss = small["ours"].peak_rss_mb if "ours" in small else None
    checks: list[tuple[str, float | None, str, float | None]] = [
        ("small-50 CPU/req, ours / bare", _ratio(cpu("small-50", "ours"), cpu("small-50", "bare")),
         "<=", 1.15),
        ("small-50 CPU/req, ours / proxy.py",
         _ratio(cpu("small-50", "ours"), cpu("small-50", "proxypy")), "<=", 2.0),
        ("small-50 CPU/req, ours / ours --observe false",
         _ratio(cpu("small-50", "ours"), cpu("small-50", "ours-off")), "<=", 1.10),
        ("small-1 added p50 ms, ours - proxy.py",
         None if added_p50("ours") is None or added_p50("proxypy") is None
         else added_p50("ours") - added_p50("proxypy"), "<=", 0.0),  # type: ignore[operator]
        ("64k-50 CPU/req, ours / proxy.py",
         _ratio(cpu("64k-50", "ours"), cpu("64k-50", "proxypy")), "<=", 1.3),
        ("10m-1 MiB/s, ours / direct", speed("ours"), ">=", 0.5),
        ("10m-1 MiB/s, ours / squid", _ratio(speed("ours"), speed("squid")), ">=", 1.0),
        ("10m-1 MiB/s, ours / tinyproxy", _ratio(speed("ours"), speed("tinyproxy")), ">=", 1.0),
        ("small-50 peak RSS MB, ours", rss, "<=", 60.0),
    ]  # fmt: skip
    out = []
    for label, value, op, bound in checks:
        if value is None or bound is None:
            continue
        met = value <= bound if op == "<=" else value >= bound
        out.append({"target": label, "value": value, "op": op, "bound": bound, "met": met})
    return out


def print_targets(found: list[dict[str, Any]]) -> None:
    if not found:
        return
    print("\ntargets (issue 16)")
    for t in found:
        verdict = "met" if t["met"] else "NOT met"
        print(f"  {t['target']:<48}{t['value']:>8.3f}  {t['op']} {t['bound']:g}  {verdict}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each load")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--only", help="candidates, comma-separated (default: all)")
    parser.add_argument("--scenarios", help="scenarios, comma-separated (default: all)")
    parser.add_argument("--quick", action="store_true", help="3 s loads, 1 round, no tunnel")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--skip-tunnel", action="store_true", help="skip the CONNECT figures")
    parser.add_argument(
        "--ab",
        help="git refs, comma-separated: adds ours@REF (and ours-off@REF with --ab-off) "
        "to compare the working tree with a commit in the same run",
    )
    parser.add_argument("--ab-off", action="store_true", help="also ours-off@REF for --ab")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds, args.skip_tunnel = 3, 1, 1, True
    if shutil.which("wrk") is None:
        sys.exit("make bench needs wrk (Debian package 'wrk'): apt-get install wrk")
    os.environ["BENCH_LOOP"] = args.loop
    candidates = _pick(args.only, CANDIDATES, "candidates", EXTRA_CANDIDATES)
    for ref in (args.ab or "").split(","):
        if ref.strip():
            candidates.append(ours_at(ref.strip()))
            if args.ab_off:
                candidates.append(ours_at(ref.strip(), observe=False))
    chosen = _pick(args.scenarios, [*SCENARIOS, *plugin_scenarios()], "scenarios")
    scenarios = [s for s in chosen if isinstance(s, Scenario)]
    studies = [s for s in chosen if isinstance(s, Study)]
    with contextlib.suppress(OSError):  # this process (the scraper) stays off the proxy's core
        os.sched_setaffinity(0, {int(LOAD_CORE)})

    origin_command = pinned(LOAD_CORE, [sys.executable, "-m", "benchmarks.origin"])
    with ready_process(origin_command) as (_, port_line):
        bench = Bench(int(port_line), args.seconds, args.warmup, args.quick)
        runs, medians, skipped = measure_all(candidates, scenarios, bench, args.rounds)
        studied = run_studies(studies, bench)
    print(
        f"\n{args.seconds} s per load after {args.warmup} s warm-up, median of {args.rounds} "
        f"round(s), loop={args.loop}; proxy pinned to core 0, wrk + origin to core 1 "
        f"({os.cpu_count()} cores); studies once each"
    )
    print_tables(scenarios, medians)
    for study in studies:
        for title, rows in studied[study.name].tables.items():
            print_table(
                f"{study.name}: {study.title}: {title}", rows, study.reference, study.direct
            )
    costs = feature_costs(medians)
    print_feature_costs(costs)
    found = targets(medians)
    print_targets(found)
    for name, reason in skipped.items():
        print(f"  (not run: {name}: {reason})")

    tunnel: dict[str, float] = {}
    if not args.skip_tunnel:
        from benchmarks.tunnel import tunnel_throughput

        tunnel = tunnel_throughput()
        print("\nCONNECT tunnel throughput (MB/s)")
        for key, value in tunnel.items():
            print(f"  {key:<50}{value:>10.1f}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "settings": {
                    "seconds": args.seconds,
                    "warmup": args.warmup,
                    "rounds": args.rounds,
                    "loop": args.loop,
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                "skipped": skipped,
                "medians": {
                    s: {c: asdict(m) for c, m in rows.items()} for s, rows in medians.items()
                },
                "feature_costs": costs,
                "targets": found,
                "studies": {
                    name: {
                        "tables": {
                            title: {row: asdict(m) for row, m in rows.items()}
                            for title, rows in result.tables.items()
                        },
                        "figures": result.figures,
                    }
                    for name, result in studied.items()
                },
                "tunnel": tunnel,
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    started_at = time.monotonic()
    main()
    print(f"(bench took {time.monotonic() - started_at:.0f} s)")
