"""Paired A/B: two candidates under the same load at the same time, for a busy machine.

``make bench`` measures one candidate after another; on a machine that others share,
the noise between two runs (2-3x in requests/s here) swamps a 5% change. Here both
proxies run at once, pinned to the same core, each with its own wrk on the load core,
so whatever else the machine does hits both alike; each round gives the ratio of their
CPU per request over the same window, and the median ratio over rounds is reported.
The two compete for one core, so absolute figures are not comparable with ``make bench``:
only the ratio is.

    python -m benchmarks.ab --ref HEAD              # working tree vs the last commit
    python -m benchmarks.ab --a ours --b ours-off   # any two make bench candidates
    python -m benchmarks.ab --a-ref X --ref X~1     # one commit vs its parent
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading

from benchmarks.candidates import (
    CANDIDATES,
    EXTRA_CANDIDATES,
    LOAD_CORE,
    Candidate,
    Running,
    ours_at,
    pinned,
)
from benchmarks.candidates import started as start_candidate
from benchmarks.processes import ready_process
from benchmarks.procfs import tree_cpu_seconds
from benchmarks.scenarios import Measurement, run_wrk


def _load(running: Running, port: int, path: str, connections: int, seconds: int) -> Measurement:
    assert running.proxy_url is not None
    target = f"http://127.0.0.1:{port}{path}"
    return run_wrk(running.proxy_url, target, connections, seconds, f"127.0.0.1:{port}")


def paired_round(
    pair: tuple[Running, Running], port: int, path: str, connections: int, seconds: int
) -> tuple[float, float]:
    """CPU us per request of each, measured over the same window."""
    results: list[Measurement | None] = [None, None]

    def drive(index: int) -> None:
        results[index] = _load(pair[index], port, path, connections, seconds)

    before = [tree_cpu_seconds(r.pid) for r in pair if r.pid]
    threads = [threading.Thread(target=drive, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = [tree_cpu_seconds(r.pid) for r in pair if r.pid]
    cpu = []
    for index, result in enumerate(results):
        assert result is not None
        cpu.append((after[index] - before[index]) / max(result.requests, 1) * 1e6)
    return cpu[0], cpu[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--a", default="ours", help="candidate A (default: the working tree)")
    parser.add_argument("--a-ref", help="candidate A is ours at this git ref")
    parser.add_argument("--b", help="candidate B, a make bench candidate name")
    parser.add_argument("--ref", help="candidate B is ours at this git ref")
    parser.add_argument("--b-observe", default="true", choices=("true", "false"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--path", default="/", help="origin path: / (13 B), /64k, /10m")
    args = parser.parse_args()
    by_name = {c.name: c for c in (*CANDIDATES, *EXTRA_CANDIDATES)}
    a = ours_at(args.a_ref) if args.a_ref else by_name[args.a]
    b: Candidate
    if args.ref:
        b = ours_at(args.ref, observe=args.b_observe == "true")
    elif args.b:
        b = by_name[args.b]
    else:
        sys.exit("give --b NAME or --ref REF")
    for candidate in (a, b):
        if (reason := candidate.prepare()) is not None:
            sys.exit(f"{candidate.name}: {reason}")

    ratios: list[float] = []
    origin_command = pinned(LOAD_CORE, [sys.executable, "-m", "benchmarks.origin"])
    with ready_process(origin_command) as (_, port_line), contextlib.ExitStack() as stack:
        port = int(port_line)
        pair = (
            stack.enter_context(start_candidate(a, port)),
            stack.enter_context(start_candidate(b, port)),
        )
        paired_round(pair, port, args.path, args.connections, 2)  # warm-up
        print(f"{'round':>5}{a.name:>16}{b.name:>16}{'A/B':>8}   (CPU us per request)")
        for number in range(args.rounds):
            cpu_a, cpu_b = paired_round(pair, port, args.path, args.connections, args.seconds)
            ratios.append(cpu_a / cpu_b)
            print(f"{number + 1:>5}{cpu_a:>16.0f}{cpu_b:>16.0f}{ratios[-1]:>8.3f}", flush=True)
    print(
        f"median A/B {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} rounds of "
        f"{args.seconds} s, {args.connections} clients each, path {args.path})"
    )


if __name__ == "__main__":
    main()
