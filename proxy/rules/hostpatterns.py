"""Host name patterns (``api.example.com``, ``*.example.com``) matched against host labels."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final

from proxy.rules.addresses import ip_literal

# A name, optionally behind "*." (IP literals are read apart).
_NAME: Final = re.compile(r"(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


class PatternError(ValueError):
    """Not a host name, IP literal or ``*.domain`` pattern."""


def check_pattern(text: str) -> str:
    """The pattern in the spelling of host labels; raises ``PatternError`` for anything else.

    Names are lower-cased. An IP literal in any spelling becomes what a URL's host label
    makes of it (yarl: the compressed IPv6 form in brackets, tests/test_hostpatterns.py
    checks that they agree); IPv4 becomes the dotted quad, the only IPv4 spelling the proxy
    forwards or tunnels to.
    """
    pattern = text.strip().lower()
    address = ip_literal(pattern)
    if isinstance(address, ipaddress.IPv6Address):
        return f"[{address.compressed}]"
    if address is not None:
        return str(address)
    if not _NAME.fullmatch(pattern):
        raise PatternError(f"expected a host name, an IP address or *.domain, got {text!r}")
    return pattern


def label_host(label: str) -> str:
    """The host part of a label: ``api.example.com:8080`` -> ``api.example.com``."""
    if label.startswith("["):
        return label[: label.find("]") + 1]
    return label.partition(":")[0]


class HostPatterns:
    """Exact names, plus ``*.domain`` for every name below that domain (not the domain itself).

    The port of a label is ignored: a pattern names hosts, not services.
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        checked = [check_pattern(p) for p in patterns]
        self._exact = frozenset(p for p in checked if not p.startswith("*."))
        self._suffixes = tuple(p[1:] for p in checked if p.startswith("*."))  # ".example.com"

    def matches(self, label: str) -> bool:
        host = label_host(label)
        return host in self._exact or host.endswith(self._suffixes)

    def __repr__(self) -> str:
        return f"<HostPatterns {sorted(self._exact)} *{list(self._suffixes)}>"
