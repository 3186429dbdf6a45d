"""Would ``--workers N`` pay? N copies of ours sharing one listener through SO_REUSEPORT.

A measurement prototype, not a feature: each worker is ``python -m proxy`` with aiohttp's
``TCPSite`` forced to ``reuse_port=True`` (the kernel then spreads new connections across
the processes), each with its own metrics. wrk drives 50 keep-alive clients at the shared
port; the figures are requests/s and the workers' total CPU per request, for 1 and 2
workers. Nothing is pinned: the point is what a second core buys when the machine has
two. See docs/performance.md for the results and why ``--workers`` is not (yet) built.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterator

from benchmarks.candidates import free_port, wait_listening
from benchmarks.processes import flags_only_environment, ready_process, stop_sync
from benchmarks.procfs import tree_cpu_seconds
from benchmarks.scenarios import run_wrk

WORKER = """
import sys
from aiohttp import web
plain = web.TCPSite.__init__
def reuse_port(self, *args, **kwargs):
    kwargs["reuse_port"] = True
    plain(self, *args, **kwargs)
web.TCPSite.__init__ = reuse_port
from proxy.__main__ import main
sys.argv = ["tracing-proxy", *sys.argv[1:]]
main()
"""


@contextlib.contextmanager
def workers(count: int, port: int) -> Iterator[list[int]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            args = [sys.executable, "-c", WORKER, "--listen", f"127.0.0.1:{port}"]
            args += ["--admin-listen", "off", "--event-loop", "uvloop"]
            procs.append(
                subprocess.Popen(
                    args,
                    stdout=subprocess.DEVNULL,
                    env=flags_only_environment(),
                )
            )
        for proc in procs:
            wait_listening(port, proc)
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            stop_sync(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    with ready_process([sys.executable, "-m", "benchmarks.origin"]) as (_, port_line):
        origin = int(port_line)
        target, host = f"http://127.0.0.1:{origin}/", f"127.0.0.1:{origin}"
        print(f"{'round':>5}{'workers':>8}{'req/s':>9}{'CPU us/req':>12}")
        for number in range(args.rounds):
            for count in (1, 2) if number % 2 == 0 else (2, 1):
                port = free_port()
                with workers(count, port) as pids:
                    url = f"http://127.0.0.1:{port}"
                    run_wrk(url, target, args.connections, 2, host)
                    before = sum(tree_cpu_seconds(pid) for pid in pids)
                    load = run_wrk(url, target, args.connections, args.seconds, host)
                    cpu = sum(tree_cpu_seconds(pid) for pid in pids) - before
                print(
                    f"{number + 1:>5}{count:>8}{load.rps:>9.0f}{cpu / load.requests * 1e6:>12.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
