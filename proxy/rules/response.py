"""Pure rules for an upstream response head: is it valid HTTP/1.1 we can relay as it is?

aiohttp's client parser is lenient (llhttp's lenient-headers mode): it hands on status
codes outside 100-599, control characters in the reason phrase and in field values, and
transfer codings it does not decode. Whatever passes these rules is something the proxy
can re-serialize faithfully and a strict client parses the same way; anything else is
answered 502 ``http_protocol_error`` (RFC 9112 §6.3: a proxy that receives an invalid
response discards it, closes that upstream connection and sends 502).

The rules are data: ``RULES`` is checked in order and the first broken rule is reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from proxy.rules import headers

RawFields = Sequence[tuple[bytes, bytes]]

# RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ), possibly empty.
_REASON: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# RFC 9110 §5.5: field-value = *( field-vchar / SP / HTAB ); any other CTL is invalid.
_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# RFC 9110 §8.6: Content-Length = 1*DIGIT.
_DIGITS: Final = re.compile(rb"[0-9]+")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What the upstream sent before the body, as bytes where the wire had bytes."""

    version: tuple[int, int]
    status: int
    reason: bytes
    fields: RawFields

    def values(self, name: bytes) -> list[bytes]:
        """Every value of the field ``name`` (lower case), in order."""
        return [value for key, value in self.fields if key.lower() == name]


def _bad_version(head: ResponseHead) -> bool:
    return head.version not in ((1, 0), (1, 1))


def _bad_status(head: ResponseHead) -> bool:
    return not 100 <= head.status <= 599


def _bad_reason(head: ResponseHead) -> bool:
    return _REASON.fullmatch(head.reason) is None


def _bad_name(head: ResponseHead) -> bool:
    return any(_TOKEN.fullmatch(name) is None for name, _ in head.fields)


def _bad_value(head: ResponseHead) -> bool:
    return any(_VALUE.fullmatch(value) is None for _, value in head.fields)


def _length_and_coding(head: ResponseHead) -> bool:
    return bool(head.values(b"content-length")) and bool(head.values(b"transfer-encoding"))


def _bad_length(head: ResponseHead) -> bool:
    lengths = head.values(b"content-length")
    if not lengths:
        return False
    items = {item.strip() for value in lengths for item in value.split(b",")}
    return len(items) != 1 or _DIGITS.fullmatch(next(iter(items))) is None


def _coding_not_chunked(head: ResponseHead) -> bool:
    return headers.codings_other_than_chunked(head.fields)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str  # also the regression test's name in tests/test_bad_response.py
    cite: str
    text: str
    broken: Callable[[ResponseHead], bool]

    @property
    def details(self) -> str:
        """What the client reads in ``Proxy-Status: ...; details`` (printable ASCII only)."""
        return f"{self.text} ({self.cite.replace('§', 'section ')})"


RULES: Final[tuple[Rule, ...]] = (
    Rule(
        "version_not_http_1",
        "RFC 9112 §2.3",
        "upstream status line is not HTTP/1.0 or HTTP/1.1",
        _bad_version,
    ),
    Rule(
        "status_outside_100_599",
        "RFC 9110 §15, RFC 9112 §4",
        "upstream status code is not a three-digit code in 100-599",
        _bad_status,
    ),
    Rule(
        "reason_phrase_with_control_character",
        "RFC 9112 §4",
        "upstream reason phrase holds a control character",
        _bad_reason,
    ),
    Rule(
        "field_name_not_a_token",
        "RFC 9110 §5.1, §5.6.2",
        "upstream field name is not a token",
        _bad_name,
    ),
    Rule(
        "field_value_with_control_character",
        "RFC 9110 §5.5",
        "upstream field value holds CR, LF, NUL or another control character",
        _bad_value,
    ),
    Rule(
        "content_length_and_transfer_encoding",
        "RFC 9112 §6.1, §6.3",
        "upstream sent both Content-Length and Transfer-Encoding",
        _length_and_coding,
    ),
    Rule(
        "content_length_invalid",
        "RFC 9110 §8.6, RFC 9112 §6.3",
        "upstream Content-Length is not one decimal number",
        _bad_length,
    ),
    # RFC 9112 §6.3 lets a response end a coding list without chunked (read until close),
    # but Transfer-Encoding is hop-by-hop: the proxy removes it and re-frames the body, so
    # any coding other than one chunked would reach the client undeclared.
    Rule(
        "transfer_coding_not_single_chunked",
        "RFC 9112 §6.1, §6.3, §7",
        "upstream Transfer-Encoding is not exactly chunked",
        _coding_not_chunked,
    ),
)


class InvalidResponse(ValueError):
    """An upstream response head that breaks ``rule``."""

    def __init__(self, rule: Rule) -> None:
        super().__init__(rule.details)
        self.rule = rule


def broken_rule(head: ResponseHead) -> Rule | None:
    """The first rule ``head`` breaks; None when the head can be relayed."""
    for rule in RULES:
        if rule.broken(head):
            return rule
    return None


def check(
    version: tuple[int, int],
    status: int,
    reason: str | None,
    fields: RawFields,
) -> InvalidResponse | None:
    """``broken_rule`` for a head as aiohttp's client parser hands it over.

    The C parser decodes the reason as UTF-8 with surrogateescape: encoding it back the
    same way gives the bytes on the wire.
    """
    reason_bytes = (reason or "").encode("utf-8", "surrogateescape")
    rule = broken_rule(ResponseHead(version, status, reason_bytes, fields))
    return InvalidResponse(rule) if rule is not None else None
