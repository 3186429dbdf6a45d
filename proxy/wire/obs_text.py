"""Message heads written byte for byte, obs-text included (RFC 9110 §5.5).

Field values and reason phrases reach the proxy as bytes. ``proxy.rules.headers`` turns
them into text with ``surrogateescape``, so a byte that is not UTF-8 (a latin-1 filename in
``Content-Disposition``, a cookie) becomes a lone surrogate and valid UTF-8 stays as it is.
aiohttp's C head writer encodes to UTF-8 and silently drops lone surrogates: ``caf\\xe9``
would leave as ``caf``. ``install`` puts a writer in front of it that encodes those heads
with ``surrogateescape`` as well, so every byte goes out as it came in.

It replaces ``aiohttp.http_writer._serialize_headers``, the one function both the server's
responses and the client's requests use (``StreamWriter.write_headers``); aiohttp is pinned
below 3.15 and tests/test_forwarding.py checks the bytes on the wire both ways.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from aiohttp import http_writer
from multidict import CIMultiDict

Serializer = Callable[[str, "CIMultiDict[str]"], bytes]

# RFC 9110 §5.5, RFC 9112 §4: what aiohttp's writer refuses (header injection), kept here.
_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HeadWriter:
    """aiohttp's head serializer, except that a head holding non-ASCII text is encoded here."""

    def __init__(self, inner: Serializer) -> None:
        self.inner = inner

    def __call__(self, status_line: str, headers: CIMultiDict[str]) -> bytes:
        # The common case, all ASCII, stays on aiohttp's C path; checking costs ~0.4 us a
        # head. Names need no look: they are tokens, decoded as latin-1, never surrogates.
        if status_line.isascii() and all(map(str.isascii, headers.values())):
            return self.inner(status_line, headers)
        lines = [status_line, *(f"{name}: {value}" for name, value in headers.items())]
        for line in lines:
            if _FORBIDDEN.search(line) is not None:
                raise ValueError("forbidden control character in a message head")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    def __repr__(self) -> str:
        return f"<HeadWriter inner={self.inner!r}>"


def install() -> None:
    """Make aiohttp write message heads byte for byte; calling it again changes nothing."""
    current = http_writer._serialize_headers
    if not isinstance(current, HeadWriter):
        http_writer._serialize_headers = HeadWriter(current)
