"""HTTPS origination figures: the proxy speaking TLS upstream vs a client speaking TLS itself.

``https_origination()`` returns the figures; ``python -m benchmarks.https`` prints them.
A TLS origin with a trustme certificate and a proxy trusting its CA run on loopback;
every load is bounded (wrk by its duration, the connection-per-request loops by count).

- keep-alive, wrk: direct ``https://`` vs plain ``http://`` through the proxy vs
  absolute-form ``https://`` through the proxy (origination), with the proxy's CPU per
  request;
- a new client connection per request, sequential: direct TLS (a handshake per request)
  vs origination (a new plain TCP connection to the proxy, which reuses its pooled TLS
  connection), with wall time per request and the proxy's and origin's CPU per request;
- the proxy's own ``proxy_upstream_tls_seconds``: how many handshakes it made, their mean.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from benchmarks.processes import proxy_command, ready_process
from benchmarks.procfs import cpu_seconds
from benchmarks.scenarios import run_wrk


def _scrape_tls(metrics_url: str, host: str) -> tuple[float, float]:
    """(handshakes, seconds) of ``proxy_upstream_tls_seconds`` for ``host``."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for suffix in ("count", "sum"):
        pattern = rf'^proxy_upstream_tls_seconds_{suffix}{{host="{re.escape(host)}"}} (\S+)$'
        match = re.search(pattern, text, re.MULTILINE)
        values[suffix] = float(match.group(1)) if match else 0.0
    return values["count"], values["sum"]


def _per_request(pids: dict[str, int], count: int, call: Callable[[], None]) -> dict[str, float]:
    """Run ``call`` ``count`` times in a row; wall ms and CPU us per request of each pid."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    for _ in range(count):
        call()
    wall = time.perf_counter() - started
    figures = {"wall_ms_per_request": wall / count * 1000}
    for name, pid in pids.items():
        figures[f"{name}_cpu_us_per_request"] = (cpu_seconds(pid) - before[name]) / count * 1e6
    return figures


def _get(connection: http.client.HTTPConnection, target: str) -> None:
    try:
        connection.request("GET", target, headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{target}: status {response.status}")
    finally:
        connection.close()


@dataclass
class _Rig:
    """The TLS origin and the proxy, running."""

    origin: subprocess.Popen[str]
    proxy: subprocess.Popen[str]
    proxy_url: str
    metrics_url: str
    tls_port: int
    plain_port: int
    client_context: ssl.SSLContext


@contextlib.contextmanager
def _rig(loop: str) -> Iterator[_Rig]:
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca_file = (str(Path(tmp) / name) for name in ("cert.pem", "key.pem", "ca.pem"))
        leaf = ca.issue_cert("127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(cert)
        leaf.private_key_pem.write_to_path(key)
        ca.cert_pem.write_to_path(ca_file)
        origin_command = [sys.executable, "-m", "benchmarks.https_origin", cert, key]
        command = proxy_command(
            "--admin-listen", "127.0.0.1:0", "--upstream-ca-file", ca_file, "--event-loop", loop
        )
        drains: list[subprocess.Popen[bytes]] = []
        try:
            with (
                ready_process(origin_command) as (origin, ports),
                ready_process(command) as (proxy, listening),
            ):
                # The access log is read away, as a node's log pipe would (a full pipe
                # blocks); cat ends when the proxy does.
                drains.append(
                    subprocess.Popen(["cat"], stdin=proxy.stdout, stdout=subprocess.DEVNULL)
                )
                tls_port, plain_port = (int(p) for p in ports.split())
                ready = json.loads(listening)
                yield _Rig(
                    origin,
                    proxy,
                    ready["proxy"],
                    ready["metrics"],
                    tls_port,
                    plain_port,
                    ssl.create_default_context(cafile=ca_file),
                )
        finally:
            for drain in drains:
                drain.wait(timeout=30)


def _keepalive(rig: _Rig, seconds: int, connections: int) -> dict[str, float]:
    direct_url = f"https://127.0.0.1:{rig.tls_port}"
    through = {
        "plain_http": f"http://127.0.0.1:{rig.plain_port}/",
        "origination": f"https://127.0.0.1:{rig.tls_port}/",
    }
    run_wrk(direct_url, "/", connections, 1)  # warm-up: pools, caches
    run_wrk(rig.proxy_url, through["origination"], connections, 1)
    direct = run_wrk(direct_url, "/", connections, seconds)
    figures = {"keepalive_direct_tls_rps": direct.rps, "keepalive_direct_tls_p50_ms": direct.p50_ms}
    for name, target in through.items():
        before = cpu_seconds(rig.proxy.pid)
        load = run_wrk(rig.proxy_url, target, connections, seconds)
        cpu = cpu_seconds(rig.proxy.pid) - before
        figures[f"keepalive_{name}_rps"] = load.rps
        figures[f"keepalive_{name}_p50_ms"] = load.p50_ms
        figures[f"keepalive_{name}_proxy_cpu_us_per_request"] = cpu / load.requests * 1e6
        figures[f"keepalive_{name}_errors"] = load.errors
    return figures


def _new_connections(rig: _Rig, requests: int) -> dict[str, float]:
    pids = {"proxy": rig.proxy.pid, "origin": rig.origin.pid}
    proxy_host, proxy_port = rig.proxy_url.removeprefix("http://").rsplit(":", 1)
    target = f"https://127.0.0.1:{rig.tls_port}/"

    def direct_call() -> None:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", rig.tls_port, context=rig.client_context
        )
        _get(connection, "/")

    def originated_call() -> None:
        _get(http.client.HTTPConnection(proxy_host, int(proxy_port)), target)

    figures: dict[str, float] = {}
    for name, call in (("direct_tls", direct_call), ("origination", originated_call)):
        for key, value in _per_request(pids, requests, call).items():
            figures[f"new_connection_{name}_{key}"] = value
    return figures


def https_origination(
    seconds: int = 5, connections: int = 20, requests: int = 300, loop: str = "uvloop"
) -> dict[str, float]:
    """The figures, by name (req/s, ms, us of CPU per request, handshakes)."""
    with _rig(loop) as rig:
        figures = _keepalive(rig, seconds, connections)
        figures.update(_new_connections(rig, requests))
        handshakes, total = _scrape_tls(rig.metrics_url, f"127.0.0.1:{rig.tls_port}")
    figures["proxy_tls_handshakes"] = handshakes
    figures["proxy_tls_handshake_mean_ms"] = total / handshakes * 1000 if handshakes else 0.0
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk load")
    parser.add_argument("--connections", type=int, default=20, help="concurrent wrk clients")
    parser.add_argument("--requests", type=int, default=300, help="connection-per-request calls")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    figures = https_origination(args.seconds, args.connections, args.requests, args.loop)
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value:>10.2f}")


if __name__ == "__main__":
    main()
