"""A TCP endpoint for the tunnel benchmark: swallows an upload or streams a download.

The first byte a client sends picks the direction. ``U``: read to EOF, then answer the
byte count as 8 big-endian bytes. ``D`` + an 8-byte size: send that many bytes, then
close. A TLS handshake record (0x16) instead asks for the same in TLS framing, so that a
proxy reading record headers has them to read: the sink answers the ClientHello record
with a ServerHello record, and the command, the download and the count come as
application-data records (no encryption: only the framing matters here). Runs on uvloop
and prints its port on the first line of stdout.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

BLOCK = bytes(1 << 20)
HANDSHAKE, APPLICATION_DATA = 0x16, 0x17
RECORD = 1 << 14  # the largest TLS record payload (RFC 8446 §5.1)


def record(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 3, 3]) + len(payload).to_bytes(2, "big") + payload


def records(payload: bytes) -> bytes:
    """``payload`` as application-data records of at most 16 KiB."""
    return b"".join(
        record(APPLICATION_DATA, payload[at : at + RECORD]) for at in range(0, len(payload), RECORD)
    )


# A TLS 1.2 ServerHello (RFC 5246 §7.4.1.3): version, random, no session id,
# TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, no compression, no extensions.
SERVER_HELLO = record(
    HANDSHAKE, b"\x02\x00\x00\x26" + b"\x03\x03" + bytes(32) + b"\x00" + b"\xc0\x2f" + b"\x00"
)
FRAMED_BLOCK = records(BLOCK)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        first = await reader.readexactly(1)
        framed = first[0] == HANDSHAKE
        if framed:  # skip the ClientHello record, answer it, read the command record
            await reader.readexactly(int.from_bytes((await reader.readexactly(4))[2:], "big"))
            writer.write(SERVER_HELLO)
            first = (await reader.readexactly(6))[5:]
        if first == b"U":
            count = 0
            while chunk := await reader.read(len(BLOCK)):
                count += len(chunk)
            answer = count.to_bytes(8, "big")
            writer.write(record(APPLICATION_DATA, answer) if framed else answer)
        else:
            size = int.from_bytes(await reader.readexactly(8), "big")
            block = FRAMED_BLOCK if framed else BLOCK
            whole, rest = divmod(size, len(BLOCK))
            for _ in range(whole):
                writer.write(block)
                await writer.drain()
            writer.write(records(BLOCK[:rest]) if framed else BLOCK[:rest])
        await writer.drain()
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
