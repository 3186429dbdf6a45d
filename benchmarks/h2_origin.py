"""The HTTP/2 benchmark origin: hypercorn over TLS, ALPN ``h2`` and ``http/1.1`` on one port.

``python -m benchmarks.h2_origin CERT KEY`` runs on uvloop and prints its port on the first
line of stdout. Every request gets the same 13 bytes as ``benchmarks.origin``'s small answer.
An origin that speaks both lets each client protocol go upstream as it came in (ours sends
an HTTP/2 request over HTTP/2 to an origin offering h2, mitmproxy mirrors the origin's ALPN
to its client), so the rows compare the same path on both sides of the proxy.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config

from benchmarks.origin import SMALL

HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(SMALL)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": SMALL})


async def main(cert: str, key: str) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.certfile, config.keyfile = cert, key
    config.accesslog = config.errorlog = None
    config.keep_alive_max_requests = 10**9  # a load's connection is never asked to go
    config.backlog = 1024
    print(port, flush=True)
    await serve(app, config, shutdown_trigger=asyncio.Event().wait)  # type: ignore[arg-type]


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2]))
