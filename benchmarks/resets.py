"""Ending a TCP connection with a reset, as a crashed or impatient peer does."""

from __future__ import annotations

import asyncio
import socket
import struct


def reset(transport: asyncio.WriteTransport) -> None:
    """Close with a TCP RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
