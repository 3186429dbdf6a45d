"""Response direction, h11 as the oracle: generated raw responses from a TCP origin.

Property: the client gets a 502 from the proxy, or a response that h11 (as a client) parses
cleanly with the status, reason, end-to-end fields and body bytes h11 read from what the
origin sent. A 502 is for a response h11 rejects too, or one that a rule of
proxy.rules.response names in its ``details``, or a row of ``DIFFERENCES``. After each
exchange a pipelined request on the same client connection gets its own answer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.rules.response import RULES
from tests.oracle import (
    Parsed,
    Received,
    RecordingOrigin,
    Stack,
    closing_socket,
    end_to_end,
    parse_response,
    read_responses,
    strictly_valid_fields,
)
from tests.test_oracle_requests import good_names, odd_names, values


class ScriptedOrigin:
    """Answers each connection's first request head with ``response``, then closes."""

    def __init__(self) -> None:
        self.response = b""
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.response)
        await writer.drain()

    def __repr__(self) -> str:
        return f"<ScriptedOrigin connections={self.connections}>"


def _probe_answer(parsed: Parsed) -> tuple[int, bytes]:
    return 200, b"probe"


@dataclass
class Setup:
    stack: Stack
    origin: ScriptedOrigin
    origin_port: int
    probe_port: int


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    origin = ScriptedOrigin()
    with Stack() as running:
        yield Setup(
            running, origin, running.origin(origin), running.origin(RecordingOrigin(_probe_answer))
        )


# -- strategies ---------------------------------------------------------------------------

good_statuses = st.sampled_from([b"200", b"201", b"204", b"301", b"304", b"404", b"500", b"599"])
odd_statuses = st.sampled_from(
    [b"000", b"099", b"100", b"101", b"102", b"600", b"999", b"20", b"2000", b"2x0", b" 200"]
)
_REASON_GOOD = [bytes([c]) for c in range(0x20, 0x7F)] + [b"\t", "é".encode()]
_REASON_ODD = [b"\x00", b"\x01", b"\x7f", b"\xe9", b"\xff", b"\r", b"\x1b"]


def reasons(odd: bool) -> st.SearchStrategy[bytes]:
    pieces = _REASON_GOOD * 3 + _REASON_ODD if odd else _REASON_GOOD
    return st.lists(st.sampled_from(pieces), max_size=10).map(b"".join)


good_versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"])
odd_versions = st.sampled_from([b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.01", b"http/1.1", b"HTTP/1.1 "])
GOOD_FRAMINGS = ["close", "length", "chunked"]
ODD_FRAMINGS = ["length_and_chunked", "two_lengths", "chunked_twice", "gzip_chunked", "gzip"]
ODD_FRAMINGS += ["length_signed", "chunked_with_extensions", "length_list", "extra_after"]


@dataclass(frozen=True)
class Generated:
    method: bytes
    version: bytes
    status: bytes
    reason: bytes
    interim: bool  # a 103 Early Hints before the final response
    fields: tuple[tuple[bytes, bytes], ...]
    framing: tuple[bytes, ...]
    body: bytes  # as sent, framing included

    def render(self) -> bytes:
        lines = [b"%s %s %s" % (self.version, self.status, self.reason)]
        lines.append(b"Connection: close")
        lines += [name + b": " + value for name, value in self.fields]
        lines += self.framing
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        early = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" if self.interim else b""
        return early + head + self.body


@st.composite
def framed(draw: st.DrawFn, odd: bool) -> tuple[tuple[bytes, ...], bytes]:
    body = draw(st.binary(max_size=40))
    kind = draw(st.sampled_from(ODD_FRAMINGS if odd else GOOD_FRAMINGS))
    if kind == "close":
        return (), body
    if kind in ("length", "extra_after"):
        extra = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL" if kind == "extra_after" else b""
        )
        return (b"Content-Length: %d" % len(body),), body + extra
    if kind == "length_signed":
        return (b"Content-Length: +%d" % len(body),), body
    if kind == "length_list":
        return (b"Content-Length: %d, %d" % (len(body), len(body)),), body
    if kind == "two_lengths":
        other = draw(st.sampled_from([len(body), len(body) + 1]))
        return (b"Content-Length: %d" % len(body), b"Content-Length: %d" % other), body
    if kind == "gzip":
        return (b"Transfer-Encoding: gzip",), body
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    ext = b";a=b" if kind == "chunked_with_extensions" else b""
    encoded = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces if p) + b"0\r\n\r\n"
    coding = {
        "chunked": b"Transfer-Encoding: chunked",
        "chunked_with_extensions": b"Transfer-Encoding: chunked",
        "length_and_chunked": b"Transfer-Encoding: chunked",
        "chunked_twice": b"Transfer-Encoding: chunked, chunked",
        "gzip_chunked": b"Transfer-Encoding: gzip, chunked",
    }[kind]
    if kind == "length_and_chunked":
        return (b"Content-Length: %d" % len(encoded), coding), encoded
    return (coding,), encoded


PARTS = ["clean", "clean", "clean", "status", "reason", "names", "values", "framing", "version"]


@st.composite
def responses(draw: st.DrawFn) -> Generated:
    odd = draw(st.sampled_from(PARTS))
    names = odd_names if odd == "names" else good_names
    fields = draw(st.lists(st.tuples(names, values(odd == "values")), max_size=6))
    framing, body = draw(framed(odd == "framing"))
    return Generated(
        draw(st.sampled_from([b"GET", b"GET", b"GET", b"HEAD"])),
        draw(odd_versions if odd == "version" else good_versions),
        draw(odd_statuses if odd == "status" else good_statuses),
        draw(reasons(odd == "reason")),
        draw(st.booleans()),
        tuple(fields),
        framing,
        body,
    )


# -- deliberate differences from h11 (h11 reads it, the proxy answers 502) -------------------
# Not compared: a 1xx before the final response (aiohttp reads past it and never relays it,
# although RFC 9110 §15.2 asks a proxy to) and trailers (dropped, RFC 9110 §6.5.1).


@dataclass(frozen=True)
class Difference:
    name: str
    why: str
    applies: Callable[[Generated], bool]


def _may_have_body(g: Generated) -> bool:
    """RFC 9110 §6.4.1: no content in a response to HEAD, nor in a 1xx, 204 or 304."""
    return g.method != b"HEAD" and g.status not in (b"204", b"304") and g.status[:1] != b"1"


def _folded(g: Generated) -> bool:
    return any(b"\r\n " in v or b"\r\n\t" in v for _, v in g.fields) or any(
        name[:1] in (b" ", b"\t") for name, _ in g.fields
    )


def _lengths(g: Generated) -> list[bytes]:
    return [f for f in g.framing if f.startswith(b"Content-Length")]


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "minor_version_above_1",
        "RFC 9110 §2.5 says to read HTTP/1.2 as 1.1 (h11 does); aiohttp's parser refuses any "
        "version but 1.0 and 1.1 (aiohttp behaviour we cannot change), so the proxy says 502",
        lambda g: g.version.startswith(b"HTTP/1.") and g.version not in (b"HTTP/1.0", b"HTTP/1.1"),
    ),
    Difference(
        "repeated_content_length",
        "RFC 9110 §8.6 lets a recipient merge equal repeated lengths (h11 does); aiohttp's "
        "parser refuses any repeat, so the proxy answers 502",
        lambda g: len(_lengths(g)) > 1 or any(b"," in f for f in _lengths(g)),
    ),
    Difference(
        "content_length_and_transfer_encoding",
        "RFC 9112 §6.3 says such a message ought to be handled as an error; h11 lets "
        "chunked win, aiohttp refuses it (502)",
        lambda g: bool(_lengths(g)) and any(f.startswith(b"Transfer") for f in g.framing),
    ),
    Difference(
        "bytes_past_the_framing",
        "bytes after the response's end in the same segment make aiohttp's parser fail the "
        "response it has read (502); h11 leaves them for a next response we never read",
        lambda g: g.body.endswith(b"EVIL") or (bool(g.body) and not _may_have_body(g)),
    ),
    Difference(
        "obs_fold",
        "RFC 9112 §5.2 lets a proxy answer 502 to obs-fold; aiohttp unfolds some and refuses "
        "others, h11 unfolds",
        lambda g: (
            any(b"\r\n " in v or b"\r\n\t" in v for _, v in g.fields)
            or any(name[:1] in (b" ", b"\t") for name, _ in g.fields)
        ),
    ),
    Difference(
        "control_character_in_a_value",
        "RFC 9110 §5.5: h11 passes CTLs other than CR, LF and NUL in values; the proxy "
        "refuses them (our field_value_with_control_character rule, or aiohttp before it)",
        lambda g: any(
            (c < 0x20 and c != 0x09) or c == 0x7F for _, value in g.fields for c in value
        ),
    ),
)


def _unfolded(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, re.sub(rb"[ \t]+", b" ", value)) for name, value in fields]


_DETAILS = re.compile(rb'details="([^"]*)"')


def rule_named(response: Received) -> str | None:
    """The rule of proxy.rules.response a 502 names in its Proxy-Status details."""
    for value in response.field(b"Proxy-Status"):
        match = _DETAILS.search(value)
        for rule in RULES:
            if match is not None and match.group(1).decode() == rule.details:
                return rule.name
    return None


# -- the property -------------------------------------------------------------------------


@given(generated=responses())
def test_relayed_as_h11_reads_it_or_502(setup: Setup, generated: Generated) -> None:
    """A 502 for what h11 or our rules reject, else what h11 read; the next request is clean."""
    raw = generated.render()
    setup.origin.response = raw
    expected = parse_response(raw, generated.method)  # h11's reading of the origin's bytes
    first = b"%s http://127.0.0.1:%d/r HTTP/1.1\r\nHost: x\r\n\r\n" % (
        generated.method,
        setup.origin_port,
    )
    probe = b"GET http://127.0.0.1:%d/probe HTTP/1.1\r\nHost: x\r\n\r\n" % setup.probe_port
    with closing_socket(setup.stack.connect()) as sock:
        sock.sendall(first + probe)
        view = read_responses(sock, [generated.method, b"GET"])
    got = view.responses[0]
    for response in view.responses:
        assert strictly_valid_fields(response.fields)
    if got.status == 502:
        rule = rule_named(got)
        event(f"502 {rule or 'aiohttp'}")
        if isinstance(expected, Received):
            differences = [d.name for d in DIFFERENCES if d.applies(generated)]
            assert rule is not None or differences, f"502 for what h11 reads: {expected} {got}"
    else:
        event("relayed")
        assert isinstance(expected, Received), f"relayed what h11 rejects ({expected.why}): {got}"
        assert got.status == expected.status
        assert got.reason == expected.reason
        also = frozenset() if any(n.lower() == b"date" for n, _ in expected.fields) else {b"date"}
        relayed, sent = end_to_end(got.fields, frozenset(also)), end_to_end(expected.fields)
        if _folded(generated):
            relayed, sent = _unfolded(relayed), _unfolded(sent)
        assert relayed == sent
        assert got.body == expected.body
    if len(view.responses) > 1:
        assert view.responses[1].body == b"probe"
    else:
        assert view.closed
