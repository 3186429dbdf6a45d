"""``make profile``: ours under a wrk load, sampled by py-spy, written as a speedscope file.

Starts the benchmark origin and the proxy (everything on, unless flags say otherwise),
warms up, then records ``--seconds`` of the proxy's main thread while wrk keeps 50
clients busy. Open the output at speedscope.app or with ``py-spy``'s own viewer; pass
``--format flamegraph`` for an SVG instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks.candidates import CANDIDATES, EXTRA_CANDIDATES, LOAD_CORE, pinned, started
from benchmarks.installs import BENCH_DIR
from benchmarks.processes import ready_process
from benchmarks.scenarios import run_wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--path", default="/", help="origin path: / (13 B), /64k, /10m")
    parser.add_argument("--candidate", default="ours", help="any make bench candidate")
    parser.add_argument("--format", choices=("speedscope", "flamegraph"), default="speedscope")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    suffix = "speedscope.json" if args.format == "speedscope" else "svg"
    output = args.output or BENCH_DIR / f"profile-{args.candidate}.{suffix}"
    output.parent.mkdir(parents=True, exist_ok=True)
    candidate = {c.name: c for c in (*CANDIDATES, *EXTRA_CANDIDATES)}[args.candidate]
    py_spy = Path(sys.executable).parent / "py-spy"

    origin_command = pinned(LOAD_CORE, [sys.executable, "-m", "benchmarks.origin"])
    with ready_process(origin_command) as (_, port_line):
        port = int(port_line)
        with started(candidate, port) as running:
            assert running.proxy_url is not None
            assert running.pid is not None
            host, target = f"127.0.0.1:{port}", f"http://127.0.0.1:{port}{args.path}"
            run_wrk(running.proxy_url, target, args.connections, 2, host)
            load = threading.Thread(
                target=run_wrk,
                args=(running.proxy_url, target, args.connections, args.seconds + 2, host),
            )
            load.start()
            record = [str(py_spy), "record", "--pid", str(running.pid), "--nonblocking"]
            record += ["--duration", str(args.seconds), "--rate", str(args.rate)]
            subprocess.run([*record, "--format", args.format, "--output", str(output)], check=True)
            load.join()
    print(f"profile written to {output}")


if __name__ == "__main__":
    main()
