"""A CONNECT shim for load generators that cannot speak to a proxy (h2load).

``python -m benchmarks.connect_shim PROXY_PORT AUTHORITY`` listens on a loopback port (its
first line of stdout) and, for each connection it accepts, opens a tunnel to ``AUTHORITY``
through the proxy on 127.0.0.1:PROXY_PORT (``CONNECT``, then the 200) and relays both ways
until either side ends. The client then speaks TLS through it, as it would through
``HTTPS_PROXY``; an intercepting proxy answers the handshake itself. Runs on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import uvloop


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def main(proxy_port: int, authority: str) -> None:
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()

    async def tunnel(client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        upstream, to_upstream = await asyncio.open_connection("127.0.0.1", proxy_port)
        to_upstream.write(head)
        answer = await asyncio.wait_for(upstream.readuntil(b"\r\n\r\n"), 30)
        if not answer.startswith(b"HTTP/1.1 200"):
            to_client.close()
            to_upstream.close()
            return
        await asyncio.gather(_pipe(client, to_upstream), _pipe(upstream, to_client))

    server = await asyncio.start_server(tunnel, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
