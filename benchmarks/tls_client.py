"""A bounded HTTP(S) load generator for the HTTPS bench, in its own process: what wrk cannot do.

    python -m benchmarks.tls_client URL --connections 20 --seconds 5 --max-requests 100000
        [--proxy http://127.0.0.1:3128] [--cafile ca.pem] [--new-connection]

``--connections`` clients, each sending one request after another on its own connection
(kept alive, or a new one per request with ``--new-connection``), until ``--seconds`` have
passed or ``--max-requests`` are done. With ``--proxy`` and an ``https://`` URL, aiohttp
opens a CONNECT tunnel and speaks TLS through it (interception); with an ``http://`` or
absolute ``https://`` target and ``--absolute`` it sends absolute-form requests in clear
(origination). Prints one JSON line: requests, seconds, errors, p50_ms, p99_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time

import aiohttp
import uvloop


async def run(args: argparse.Namespace) -> dict[str, float]:
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    connector = aiohttp.TCPConnector(
        limit=args.connections, force_close=args.new_connection, ssl=context or True
    )
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + args.seconds
    budget = args.max_requests

    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:

        async def client() -> None:
            nonlocal errors, budget
            while time.perf_counter() < stop and budget > 0:
                budget -= 1
                started = time.perf_counter()
                try:
                    async with session.get(args.url, proxy=args.proxy) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                            continue
                except (aiohttp.ClientError, OSError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def quantile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "errors": errors,
        "p50_ms": quantile(0.5) if latencies else 0.0,
        "p99_ms": quantile(0.99) if latencies else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--proxy")
    parser.add_argument("--cafile")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--new-connection", action="store_true")
    print(json.dumps(uvloop.run(run(parser.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
