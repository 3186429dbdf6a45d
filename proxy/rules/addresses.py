"""IP literals in every spelling a socket call accepts, read as the address they spell."""

from __future__ import annotations

import ipaddress
import re
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# One part of a legacy numeric IPv4 address, as inet_aton(3) reads it: hex, octal or decimal.
_NUMBER_PART: Final = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")


def ip_literal(text: str) -> IPAddress | None:
    """The address ``text`` spells; None when it is a host name.

    Reads IPv6 in any spelling, bare or bracketed (RFC 3986 §3.2.2: brackets hold IPv6
    only), and IPv4 in the inet_aton forms ``2130706433``, ``0177.0.0.1``, ``0x7f.1`` and
    ``127.1`` as well as the dotted quad. An IPv4-mapped IPv6 address stays IPv6 here.
    """
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if ":" not in text:
            return None
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    return _legacy_ipv4(text)


def _legacy_ipv4(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMBER_PART.fullmatch(part) for part in parts):
        return None
    numbers = [_number(part) for part in parts]
    *leading, last = numbers
    # a.b.c.d; a.b.c with c 16 bits wide; a.b with b 24 bits wide; a alone 32 bits wide.
    if any(n > 255 for n in leading) or last >= 1 << (8 * (5 - len(numbers))):
        return None
    value = last
    for index, number in enumerate(leading):
        value |= number << (24 - 8 * index)
    return ipaddress.IPv4Address(value)


def _number(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    return int(part, 8 if part.startswith("0") else 10)
