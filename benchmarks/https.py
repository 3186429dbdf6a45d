"""HTTPS figures: TLS origination and interception by the proxy vs a client speaking TLS itself.

``https_figures()`` returns them; ``python -m benchmarks.https`` prints them, and
``make bench`` runs them once as the ``https`` study. On loopback: a TLS origin with a
trustme certificate (``benchmarks.https_origin``), and one proxy trusting that origin's CA,
with ``--upgrade-to-https 127.0.0.1`` (origination: the client sends ``http://`` in clear,
the proxy speaks TLS upstream from its pool) and ``--intercept 127.0.0.1`` with a CA made by
``tracing-proxy ca`` in a temporary directory (interception: CONNECT, then TLS to the proxy
with a certificate it mints). The load generator is ``benchmarks.tls_client`` (aiohttp,
bounded by time and count) in its own process pinned to the load core, since wrk cannot
speak TLS through a CONNECT; every row uses it, so latencies compare like with like.

- keep-alive, N clients: direct ``https://``, plain ``http://`` through the proxy (to the
  origin's clear port), origination and interception; the proxy's CPU per request;
- a new client connection per request, one client: direct TLS (a handshake per request),
  origination (a new plain TCP connection to the proxy, which reuses its pooled TLS
  connection) and interception (a CONNECT and a TLS handshake with the proxy per request,
  the upstream TLS connection pooled); latency, and the proxy's and origin's CPU per request;
- the proxy's own ``proxy_upstream_tls_seconds``: how many upstream handshakes, their mean.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import trustme

from benchmarks.candidates import LOAD_CORE, PROXY_CORE, bench_loop, pinned
from benchmarks.processes import proxy_command, ready_process
from benchmarks.procfs import cpu_seconds, peak_rss_mb
from benchmarks.scenarios import Bench, Measurement, Study, StudyResult


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


@dataclass
class _Rig:
    """The TLS origin and the proxy, running."""

    origin: subprocess.Popen[str]
    proxy: subprocess.Popen[str]
    proxy_url: str
    metrics_url: str
    tls_port: int
    plain_port: int
    cafile: str  # the origin's CA and the interception CA, for the load generator


@dataclass(frozen=True)
class TlsFiles:
    """An origin's certificate for 127.0.0.1 and its CA, and an interception CA."""

    cert: str
    key: str
    origin_ca: str
    ca_cert: str  # made by ``tracing-proxy ca DIR``, as an operator would
    ca_key: str

    def intercepting(self, *ports: int) -> tuple[str, ...]:
        """The proxy's flags: trust the origin's CA, intercept 127.0.0.1 on ``ports``."""
        return (
            *("--upstream-ca-file", self.origin_ca, "--intercept", "127.0.0.1"),
            *("--connect-ports", ",".join(map(str, ports))),
            *("--ca-cert", self.ca_cert, "--ca-key", self.ca_key),
        )


def tls_files(tmp: Path) -> TlsFiles:
    """Write them under ``tmp``."""
    ca = trustme.CA()
    cert, key, origin_ca = (str(tmp / n) for n in ("cert.pem", "key.pem", "origin.pem"))
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(origin_ca)
    ca_dir = tmp / "ca"
    subprocess.run(
        [sys.executable, "-m", "proxy", "ca", str(ca_dir)], check=True, stdout=subprocess.DEVNULL
    )
    return TlsFiles(cert, key, origin_ca, str(ca_dir / "ca.pem"), str(ca_dir / "ca-key.pem"))


@contextlib.contextmanager
def drained(proxy: subprocess.Popen[str]) -> Iterator[None]:
    """The proxy's log read away, as a node's log pipe would (a full pipe blocks); on the
    way out the proxy is stopped, and cat ends with it."""
    drain = subprocess.Popen(["cat"], stdin=proxy.stdout, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
        drain.wait(timeout=30)


@contextlib.contextmanager
def _rig(loop: str) -> Iterator[_Rig]:
    with tempfile.TemporaryDirectory() as tmp:
        files = tls_files(Path(tmp))
        bundle = Path(tmp) / "bundle.pem"
        bundle.write_text(Path(files.origin_ca).read_text() + Path(files.ca_cert).read_text())
        origin_command = pinned(
            LOAD_CORE, [sys.executable, "-m", "benchmarks.https_origin", files.cert, files.key]
        )
        with ready_process(origin_command) as (origin, ports):
            tls_port, plain_port = (int(p) for p in ports.split())
            command = proxy_command(
                *("--admin-listen", "127.0.0.1:0", "--event-loop", loop),
                *("--upgrade-to-https", "127.0.0.1", *files.intercepting(tls_port)),
            )
            with (
                ready_process(pinned(PROXY_CORE, command)) as (proxy, listening),
                drained(proxy),
            ):
                ready = json.loads(listening)
                yield _Rig(
                    origin,
                    proxy,
                    ready["proxy"],
                    ready["metrics"],
                    tls_port,
                    plain_port,
                    str(bundle),
                )


@dataclass(frozen=True)
class _Route:
    url: str
    through_proxy: bool


def _routes(rig: _Rig) -> dict[str, _Route]:
    secure = f"https://127.0.0.1:{rig.tls_port}/"
    return {
        "direct": _Route(secure, False),
        "ours-http": _Route(f"http://127.0.0.2:{rig.plain_port}/", True),
        "originate": _Route(f"http://127.0.0.1:{rig.tls_port}/", True),  # upgraded to https
        "intercept": _Route(secure, True),
    }


def _load(
    rig: _Rig, route: _Route, connections: int, seconds: float, limit: int, new: bool
) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.tls_client", route.url, "--cafile", rig.cafile]
    command += ["--connections", str(connections), "--seconds", str(seconds)]
    command += ["--max-requests", str(limit), *(["--new-connection"] if new else [])]
    command += ["--proxy", rig.proxy_url] if route.through_proxy else []
    out = subprocess.run(
        pinned(LOAD_CORE, command), capture_output=True, text=True, check=True,
        timeout=seconds + 120,
    ).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    return result


def _measured(
    rig: _Rig, route: _Route, connections: int, seconds: float, limit: int, new: bool
) -> Measurement:
    """One load after a short warm-up, with the proxy's and the origin's CPU over it."""
    _load(rig, route, connections, 1.0, max(limit // 10, 20), new)  # pools, caches
    pids = {"proxy": rig.proxy.pid, "origin": rig.origin.pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    load = _load(rig, route, connections, seconds, limit, new)
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    requests = max(load["requests"], 1)
    return Measurement(
        requests=load["requests"],
        seconds=load["seconds"],
        rps=load["requests"] / load["seconds"],
        p50_ms=load["p50_ms"],
        p99_ms=load["p99_ms"],
        errors=load["errors"],
        cpu_us_per_request=cpu["proxy"] / requests * 1e6 if route.through_proxy else None,
        peak_rss_mb=peak_rss_mb(rig.proxy.pid) if route.through_proxy else None,
        extra={"origin_cpu_us_per_req": round(cpu["origin"] / requests * 1e6, 1)},
    )


KEEPALIVE: Final = "keep-alive"
NEW_CONNECTION: Final = "new connection per request"


def https_figures(
    seconds: float = 5.0, connections: int = 20, requests: int = 300, loop: str = "uvloop"
) -> StudyResult:
    """Both tables (keep-alive at ``connections`` clients; ``requests`` connection-per-request
    calls by one client) and the proxy's upstream handshakes."""
    keepalive: dict[str, Measurement] = {}
    fresh: dict[str, Measurement] = {}
    with _rig(loop) as rig:
        routes = _routes(rig)
        for name, route in routes.items():
            keepalive[name] = _measured(rig, route, connections, seconds, 10**6, False)
        for name in ("direct", "originate", "intercept"):
            fresh[name] = _measured(rig, routes[name], 1, seconds * 4, requests, True)
        handshakes, total = _scrape_tls(rig.metrics_url, f"127.0.0.1:{rig.tls_port}")
    tables = {
        f"{KEEPALIVE}, {connections} clients": keepalive,
        f"{NEW_CONNECTION}, 1 client, {requests} requests": fresh,
    }
    figures: dict[str, Any] = {
        title: {name: asdict(m) for name, m in rows.items()} for title, rows in tables.items()
    }
    figures["proxy_tls_handshakes"] = handshakes
    figures["proxy_tls_handshake_mean_ms"] = total / handshakes * 1000 if handshakes else 0.0
    return StudyResult(tables, figures)


def _study(bench: Bench) -> StudyResult:
    return https_figures(
        seconds=bench.seconds,
        requests=100 if bench.quick else 300,
        loop=bench_loop(),
    )


SCENARIOS: Final = (
    Study(
        "https",
        "HTTPS: origination and interception vs direct TLS (ours-http: plain http via ours)",
        _study,
        reference="ours-http",
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each load")
    parser.add_argument("--connections", type=int, default=20, help="keep-alive clients")
    parser.add_argument("--requests", type=int, default=300, help="connection-per-request calls")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    result = https_figures(args.seconds, args.connections, args.requests, args.loop)
    print(json.dumps(result.figures, indent=1))


if __name__ == "__main__":
    main()
