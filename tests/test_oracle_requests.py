"""Request direction, h11 as the oracle: generated raw requests through the real proxy.

Property: the proxy refuses the request (4xx, or 505 for a version) and the origin sees
nothing of it, or the origin's h11 parses what was forwarded cleanly, with the method, target,
end-to-end fields (order and duplicates kept) and body bytes h11 read from the client's
bytes. After each exchange a normal request on the same client connection gets its own
answer, never a leftover (connection reuse). Where the proxy refuses what h11 accepts, a
row of ``DIFFERENCES`` must say why.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.oracle import (
    Parsed,
    RecordingOrigin,
    Rejected,
    Stack,
    closing_socket,
    end_to_end,
    parse_request,
    read_responses,
    strictly_valid_fields,
)

TCHAR = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters
PROBE_PATH = b"/probe"


def _answer(parsed: Parsed) -> tuple[int, bytes]:
    return 200, b"probe" if parsed.target == PROBE_PATH else b"forwarded"


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Stack, RecordingOrigin, int]]:
    origin = RecordingOrigin(_answer)
    with Stack() as running:
        yield running, origin, running.origin(origin)


# -- strategies ---------------------------------------------------------------------------

tokens = st.text(TCHAR, min_size=1, max_size=10).map(str.encode)
good_methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD"])
odd_methods = st.one_of(
    tokens.filter(lambda t: t.upper() not in (b"CONNECT", b"TRACE", b"PRI")),
    st.sampled_from([b"G@T", b"GE T", b"GET\x00", b"G\xe9T", b"", b"get", b"PROPFIND"]),
)
# RFC 3986 pchar and query characters, then some that no request-target may hold.
_PATH_GOOD = [c.encode() for c in string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/"]
_PATH_GOOD += [b"%20", b"%7E", b"%2F", b"%00", b"?", b"?a=1&b=2"]
_PATH_ODD = [b'"', b"<", b">", b"\\", b"^", b"`", b"{", b"|", b"}", b"%zz", b"#frag", b"\xe9"]
_PATH_ODD += [b"\x7f", b"\t"]


def paths(odd: bool) -> st.SearchStrategy[bytes]:
    pieces = _PATH_GOOD * 4 + _PATH_ODD if odd else _PATH_GOOD
    return st.lists(st.sampled_from(pieces), max_size=8).map(lambda parts: b"/" + b"".join(parts))


# Names: mostly tokens (a fixed few, so duplicates and case variants happen), some not.
_NAMES = [b"X-A", b"x-a", b"X-B", b"Accept", b"Cookie", b"X-Hop", b"Cache-Control", b"Warning"]
good_names = st.one_of(st.sampled_from(_NAMES), tokens)
odd_names = st.one_of(
    good_names, st.sampled_from([b"X A", b"X@A", b"", b"X\xe9", b"X-A ", b"\tX", b"X\x01"])
)
# Values: VCHAR and inner SP/HTAB, obs-text as UTF-8; then other bytes and control bytes.
_VALUE_GOOD = [bytes([c]) for c in range(0x21, 0x7F)] + [b" ", b"\t", "é".encode(), "☃".encode()]
_VALUE_ODD = [b"\x80", b"\xff", b"\xe9", b"\x00", b"\r", b"\n", b"\x01", b"\x7f", b"\x1b"]
_VALUE_ODD += [b"\r\n ", b"\r\n\t"]  # obs-fold


def values(odd: bool) -> st.SearchStrategy[bytes]:
    pieces = _VALUE_GOOD * 3 + _VALUE_ODD if odd else _VALUE_GOOD
    return st.lists(st.sampled_from(pieces), max_size=12).map(b"".join)


def field_lists(odd_name: bool, odd_value: bool) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    names = odd_names if odd_name else good_names
    return st.lists(st.tuples(names, values(odd_value)), max_size=6)


schemes = st.sampled_from([b"http", b"http", b"http", b"HTTP"])
bodies = st.binary(max_size=40)
good_versions = st.sampled_from([b"HTTP/1.1"])
odd_versions = st.sampled_from([b"HTTP/1.0", b"HTTP/1.01", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "])
good_extensions = st.sampled_from([b"", b"", b";a", b";a=b"])
odd_extensions = st.sampled_from([b"", b';a="q"', b" ;a", b";\x01", b";a=\x7f"])
GOOD_FRAMINGS = ["none", "length", "chunked"]
ODD_FRAMINGS = ["length_and_chunked", "two_lengths", "chunked_twice", "gzip_chunked"]
ODD_FRAMINGS += ["length_padded", "length_signed", "chunked"]


@dataclass(frozen=True)
class Framing:
    fields: tuple[bytes, ...]
    body: bytes


@st.composite
def framings(draw: st.DrawFn, odd: bool) -> Framing:
    body = draw(bodies)
    kind = draw(st.sampled_from(ODD_FRAMINGS if odd else GOOD_FRAMINGS))
    if kind == "none":
        return Framing((), b"")
    if kind == "length":
        return Framing((b"Content-Length: %d" % len(body),), body)
    if kind == "length_padded":
        return Framing((b"Content-Length: 00%d" % len(body),), body)
    if kind == "length_signed":
        return Framing((b"Content-Length: +%d" % len(body),), body)
    if kind == "two_lengths":
        other = draw(st.sampled_from([len(body), len(body) + 1]))
        return Framing((b"Content-Length: %d" % len(body), b"Content-Length: %d" % other), body)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    encoded = b"".join(
        b"%x%s\r\n%s\r\n" % (len(piece), draw(odd_extensions if odd else good_extensions), piece)
        for piece in pieces
        if piece
    )
    trailers = draw(field_lists(odd, odd).map(lambda fields: fields[:2]))
    encoded += b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
    coding = {
        "chunked": b"Transfer-Encoding: chunked",
        "length_and_chunked": b"Transfer-Encoding: chunked",
        "chunked_twice": b"Transfer-Encoding: chunked, chunked",
        "gzip_chunked": b"Transfer-Encoding: gzip, chunked",
    }[kind]
    if kind == "length_and_chunked":
        return Framing((b"Content-Length: %d" % len(encoded), coding), encoded)
    return Framing((coding,), encoded)


@dataclass(frozen=True)
class Generated:
    method: bytes
    scheme: bytes
    path: bytes
    version: bytes
    fields: tuple[tuple[bytes, bytes], ...]
    hop: bool  # Connection names X-Hop: it must not reach the origin
    framing: Framing

    def render(self, port: int) -> bytes:
        start = (self.method, self.scheme, port, self.path, self.version)
        lines = [b"%s %s://127.0.0.1:%d%s %s" % start]
        lines.append(b"Host: x")
        lines += [name + b": " + value for name, value in self.fields]
        if self.hop:
            lines.append(b"Connection: keep-alive, X-Hop")
        lines += self.framing.fields
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.framing.body


# Each example is clean, or odd in one part only: most forward, and a failure shrinks to
# the part that matters.
PARTS = ["clean", "clean", "clean", "method", "path", "names", "values", "framing", "version"]


@st.composite
def requests(draw: st.DrawFn) -> Generated:
    odd = draw(st.sampled_from(PARTS))
    return Generated(
        draw(odd_methods if odd == "method" else good_methods),
        draw(schemes),
        draw(paths(odd == "path")),
        draw(odd_versions if odd == "version" else good_versions),
        tuple(draw(field_lists(odd == "names", odd == "values"))),
        draw(st.booleans()),
        draw(framings(odd == "framing")),
    )


# -- deliberate differences from h11 (h11 accepts, the proxy refuses) ------------------------


@dataclass(frozen=True)
class Difference:
    name: str
    why: str
    applies: Callable[[Generated], bool]


def _values(g: Generated) -> list[bytes]:
    return [value for _, value in g.fields]


def _any_byte(data: list[bytes], chars: bytes) -> bool:
    return any(c in chars for value in data for c in value)


# llhttp's method table (HTTP only): any other token is refused with 400.
LLHTTP_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)

# aiohttp's request parser refuses a repeat of these (its SINGLETON_HEADERS, aiohttp 3.14).
SINGLETONS = frozenset(
    b"content-length content-location content-range content-type etag host max-forwards "
    b"server transfer-encoding user-agent".split()
)


def _repeated_singleton(g: Generated) -> bool:
    names = [name.lower() for name, _ in g.fields] + [b"host"]
    return any(names.count(name) > 1 for name in SINGLETONS)


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "repeated_singleton_field",
        "RFC 9110 §5.3: a field that is not a list must not be repeated; aiohttp refuses a "
        "repeated Host, Server, User-Agent, Content-Type, ETag and the like with 400, h11 "
        "keeps both (aiohttp behaviour we cannot change)",
        _repeated_singleton,
    ),
    Difference(
        "bytes_after_a_closing_request",
        "RFC 9112 §9.3, §9.6: nothing after a request that ends the connection is processed; "
        "llhttp fails the whole segment instead, so the pipelined probe turns the HTTP/1.0 "
        "request before it into a 400 too",
        lambda g: g.version == b"HTTP/1.0" and not g.hop,
    ),
    Difference(
        "version_2_0",
        "RFC 9112 §2.3: a server refuses a major version it does not speak (505; llhttp ends "
        "the connection there, so a pipelined request makes it 400); h11 reads HTTP/2.0 as 1.x",
        lambda g: g.version == b"HTTP/2.0",
    ),
    Difference(
        "unknown_method",
        "RFC 9110 §9.1 allows any token; llhttp knows a fixed table of methods and answers "
        "400 to others (aiohttp behaviour we cannot change)",
        lambda g: g.method not in LLHTTP_METHODS,
    ),
    Difference(
        "control_character_in_a_value",
        "RFC 9110 §5.5: CTLs are invalid in a field value; llhttp refuses them, h11 keeps them",
        lambda g: _any_byte(_values(g), bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])),
    ),
    Difference(
        "obs_fold",
        "RFC 9112 §5.2: a server may refuse obs-fold with 400 (llhttp does); h11 unfolds it",
        lambda g: (
            any(b"\r\n " in v or b"\r\n\t" in v for v in _values(g))
            or any(name[:1] in (b" ", b"\t") for name, _ in g.fields)
        ),
    ),
    Difference(
        "content_length_and_transfer_encoding",
        "RFC 9112 §6.1: a request with both is refused (smuggling); h11 lets chunked win",
        lambda g: (
            any(f.startswith(b"Content-Length") for f in g.framing.fields)
            and any(f.startswith(b"Transfer-Encoding") for f in g.framing.fields)
        ),
    ),
    Difference(
        "repeated_content_length",
        "RFC 9110 §8.6: equal repeated lengths may be merged (h11 does); llhttp refuses all",
        lambda g: sum(f.startswith(b"Content-Length") for f in g.framing.fields) > 1,
    ),
    Difference(
        "chunk_extension_or_trailer_oddity",
        "llhttp is stricter than h11 on chunk extensions (space before ';', quoted values, "
        "control bytes) and on trailer field syntax",
        lambda g: (
            b"Transfer-Encoding" in b"".join(g.framing.fields)
            and (
                any(ext in g.framing.body for ext in (b" ;", b";\x01", b"=\x7f", b'"'))
                or g.framing.body.count(b"\r\n") > 2
            )
        ),
    ),
)


def explained(g: Generated) -> list[str]:
    return [d.name for d in DIFFERENCES if d.applies(g)]


# -- the property -------------------------------------------------------------------------

TRACESTATE = frozenset({b"tracestate"})
REFUSALS = frozenset([*range(400, 500), 501, 505])


# Target rewrites we keep (forwarded, but not byte-for-byte what h11 read):
# - a fragment is dropped: it is never part of a request-target (RFC 9112 §3.2; RFC 9110
#   §4.2.5 says it is not sent), h11 takes the bytes verbatim;
# - an empty query (``/p?``) goes out as ``/p``: yarl, aiohttp's URL type, cannot hold an
#   empty query apart from none (RFC 3986 §6.2.3 would keep the ``?``).
def _empty_query(target: bytes) -> bool:
    return target.find(b"?") == len(target) - 1


TARGET_REWRITES: tuple[tuple[str, Callable[[bytes], bytes]], ...] = (
    ("fragment_dropped", lambda target: target.split(b"#", 1)[0]),
    (
        "empty_query_dropped",
        lambda target: target.removesuffix(b"?") if _empty_query(target) else target,
    ),
)


def _origin_form(g: Generated) -> bytes:
    target = g.path
    for _, rewrite in TARGET_REWRITES:
        target = rewrite(target)
    return target


@given(generated=requests())
def test_forwarded_as_h11_reads_it_or_refused(
    stack: tuple[Stack, RecordingOrigin, int], generated: Generated
) -> None:
    """Refused and unseen by the origin, or forwarded as h11 read it; the next request is clean."""
    proxy, origin, port = stack
    raw = generated.render(port)
    client = parse_request(raw)  # h11's reading of what the client sent
    probe = b"GET http://127.0.0.1:%d%s HTTP/1.1\r\nHost: x\r\n\r\n" % (port, PROBE_PATH)
    origin.seen.clear()
    with closing_socket(proxy.connect()) as sock:
        sock.sendall(raw + probe)
        view = read_responses(sock, [b"HEAD" if generated.method == b"HEAD" else b"GET", b"GET"])
    assert not [seen for seen in origin.seen if isinstance(seen, Rejected)], origin.seen
    forwarded = [p for p in origin.seen if isinstance(p, Parsed) and p.target != PROBE_PATH]
    first = view.responses[0]
    for response in view.responses:
        assert strictly_valid_fields(response.fields)
    event(f"status {first.status}")
    if first.status in REFUSALS:
        assert forwarded == []
        if isinstance(client, Parsed):
            assert explained(generated), f"refused what h11 accepts: {client} -> {first}"
    else:
        assert first.status == 200, first
        assert first.body == (b"" if generated.method == b"HEAD" else b"forwarded")
        (got,) = forwarded
        assert isinstance(client, Parsed), f"forwarded what h11 rejects ({client.why}): {got}"
        assert got.method == client.method
        assert got.target == _origin_form(generated)
        # tracestate goes with a replaced trace (W3C Trace Context §3.3); none is kept here.
        assert end_to_end(got.fields, TRACESTATE) == end_to_end(client.fields, TRACESTATE)
        assert got.body == client.body  # trailers are not compared: aiohttp drops them
        assert strictly_valid_fields(list(got.fields))
        assert b"x-hop" not in dict(got.fields)
    # Connection reuse: the pipelined probe is answered as itself, or the proxy closed.
    if len(view.responses) > 1:
        assert view.responses[1].status == 200
        assert view.responses[1].body == b"probe"
    else:
        assert view.closed
