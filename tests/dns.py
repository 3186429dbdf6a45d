"""A DNS server on loopback for tests: answers A queries from a table, NXDOMAIN otherwise.

Names mapped to None are never answered, which is how tests produce a DNS timeout; a
``delay`` holds every answer back, which is how they produce a slow resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Any

_A, _IN = 1, 1


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self, records: dict[str, str | None], delay: float = 0.0) -> None:
        self.records = {name.lower().rstrip("."): addr for name, addr in records.items()}
        self.delay = delay
        self.queries: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    @property
    def address(self) -> str:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        labels, offset = [], 12
        while data[offset]:
            length = data[offset]
            labels.append(data[offset + 1 : offset + 1 + length].decode("ascii"))
            offset += length + 1
        qtype, _qclass = struct.unpack("!HH", data[offset + 1 : offset + 5])
        question = data[12 : offset + 5]
        name = ".".join(labels).lower()
        self.queries.append(name)
        if name in self.records and self.records[name] is None:
            return  # silence: the resolver times out
        address = self.records.get(name)
        header = data[:2]
        if address is None:
            reply = header + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + question
        elif qtype != _A:
            reply = header + struct.pack("!HHHHH", 0x8180, 1, 0, 0, 0) + question
        else:
            answer = b"\xc0\x0c" + struct.pack("!HHIH", _A, _IN, 60, 4)
            answer += ipaddress.IPv4Address(address).packed
            reply = header + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer
        assert self.transport is not None
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.transport.sendto, reply, addr)
        else:
            self.transport.sendto(reply, addr)


async def start_dns(records: dict[str, str | None], delay: float = 0.0) -> DnsServer:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: DnsServer(records, delay), local_addr=("127.0.0.1", 0)
    )
    return protocol


def stop_dns(server: DnsServer) -> None:
    if server.transport is not None:
        server.transport.close()
