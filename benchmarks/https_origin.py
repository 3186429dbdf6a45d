"""The benchmark origin over TLS: the same small fixed answer, on a TLS port and a plain one.

``python -m benchmarks.https_origin CERT KEY`` runs on uvloop and prints
``TLS_PORT PLAIN_PORT`` on its first line of stdout. TLS listens on 127.0.0.1, plain HTTP
on 127.0.0.2, so a proxy can upgrade one host to https (``--upgrade-to-https 127.0.0.1``)
and forward the other in clear.
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import uvloop
from aiohttp import web

from benchmarks.origin import handle


async def main(cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = web.Server(handle, access_log=None)
    loop = asyncio.get_running_loop()
    secure = await loop.create_server(server, "127.0.0.1", 0, ssl=context, backlog=1024)
    plain = await loop.create_server(server, "127.0.0.2", 0, backlog=1024)
    ports = (secure.sockets[0].getsockname()[1], plain.sockets[0].getsockname()[1])
    print(*ports, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2]))
