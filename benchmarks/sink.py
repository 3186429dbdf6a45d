"""A TCP endpoint for the tunnel benchmark: swallows an upload or streams a download.

The first byte a client sends picks the direction. ``U``: read to EOF, then answer the
byte count as 8 big-endian bytes. ``D`` + an 8-byte size: send that many bytes, then
close. Runs on uvloop and prints its port on the first line of stdout.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

BLOCK = bytes(1 << 20)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        if await reader.readexactly(1) == b"U":
            count = 0
            while chunk := await reader.read(len(BLOCK)):
                count += len(chunk)
            writer.write(count.to_bytes(8, "big"))
        else:
            size = int.from_bytes(await reader.readexactly(8), "big")
            whole, rest = divmod(size, len(BLOCK))
            for _ in range(whole):
                writer.write(BLOCK)
                await writer.drain()
            writer.write(BLOCK[:rest])
        await writer.drain()
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
