"""Host name patterns (``api.example.com``, ``*.example.com``) matched against host labels."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

# A name or IPv4 literal, optionally behind "*." ; or a bracketed IPv6 literal.
_PATTERN: Final = re.compile(r"(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")


class PatternError(ValueError):
    """Not a host name, IP literal or ``*.domain`` pattern."""


def check_pattern(text: str) -> str:
    """The pattern in lower case; raises ``PatternError`` for anything else."""
    pattern = text.strip().lower()
    if not _PATTERN.fullmatch(pattern):
        raise PatternError(f"expected a host name or *.domain, got {text!r}")
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
