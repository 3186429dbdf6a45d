"""Connection reuse: bytes an upstream sends past a response's framing never answer a later request.

An origin on keep-alive connections answers ``/gen`` with a generated, well-framed response
followed by extra bytes (with the response, just after it, or a moment later, when the
connection is back in the proxy's pool), and ``/fresh/N`` with ``fresh N``. Property: the
first response is what h11 reads from the origin's framed part, or a 502; the next request
to that upstream, on the same client connection or a new one, gets a fresh answer.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.oracle import (
    Received,
    Stack,
    closing_socket,
    end_to_end,
    parse_response,
    read_responses,
)
from tests.test_oracle_requests import good_names, values


@dataclass(frozen=True)
class Generated:
    response: bytes  # one complete, well-framed response
    extra: bytes
    when: str  # "together", "apart" (a second write), "later" (after the client has it)
    same_client: bool  # the fresh request reuses the client connection


class KeepAliveOrigin:
    """Keeps each connection; ``/gen`` gets the current example, ``/fresh/N`` a plain answer."""

    def __init__(self) -> None:
        self.current: Generated | None = None
        self.connections = 0
        self.answered = asyncio.Event()
        # Set once the extra bytes are written: the next request must not overtake them,
        # or no HTTP/1.1 client could tell them from its own response.
        self.extra_sent = threading.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            if target == b"/gen":
                assert self.current is not None
                await self._generated(writer, self.current)
            else:
                body = b"fresh " + target.rsplit(b"/", 1)[1]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()

    async def _generated(self, writer: asyncio.StreamWriter, g: Generated) -> None:
        if g.when == "together":
            writer.write(g.response + g.extra)
        else:
            writer.write(g.response)
            await writer.drain()
            if g.when == "later":
                await self.answered.wait()  # the client has read the response: it is pooled
                self.answered.clear()
            writer.write(g.extra)
        await writer.drain()
        self.extra_sent.set()

    def __repr__(self) -> str:
        return f"<KeepAliveOrigin connections={self.connections}>"


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Stack, KeepAliveOrigin, int]]:
    origin = KeepAliveOrigin()
    with Stack() as running:
        yield running, origin, running.origin(origin)


@st.composite
def framed_responses(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([b"200 OK", b"201 Created", b"404 Not Found", b"500 Oops"]))
    fields = draw(st.lists(st.tuples(good_names, values(False)), max_size=4))
    body = draw(st.binary(max_size=30))
    head = [b"HTTP/1.1 " + status] + [name + b": " + value for name, value in fields]
    if draw(st.booleans()):
        head.append(b"Content-Length: %d" % len(body))
        payload = body
    else:
        head.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return b"\r\n".join(head) + b"\r\n\r\n" + payload


extras = st.one_of(
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n",
            b"\r\n",
            b"EVIL",
            b"0\r\n\r\n",
        ]
    ),
    st.binary(min_size=1, max_size=20),
)
examples = st.builds(
    Generated,
    framed_responses(),
    extras,
    st.sampled_from(["together", "apart", "later"]),
    st.booleans(),
)
_numbers = itertools.count()


@given(generated=examples)
def test_bytes_past_the_framing_never_answer_the_next_request(
    setup: tuple[Stack, KeepAliveOrigin, int], generated: Generated
) -> None:
    """The generated response is relayed as h11 reads it, or 502; the next request is fresh."""
    stack, origin, port = setup
    origin.current = generated
    origin.extra_sent.clear()
    expected = parse_response(generated.response, b"GET")
    assert isinstance(expected, Received)  # the generator makes well-framed responses
    number = next(_numbers)
    first = b"GET http://127.0.0.1:%d/gen HTTP/1.1\r\nHost: x\r\n\r\n" % port
    fresh = b"GET http://127.0.0.1:%d/fresh/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (port, number)
    with closing_socket(stack.connect()) as sock:
        sock.sendall(first)
        view = read_responses(sock, [b"GET"])
        if generated.when == "later":
            stack.call(origin.answered.set)
        assert origin.extra_sent.wait(10)
        if generated.same_client and not view.closed:
            sock.sendall(fresh)
            second = read_responses(sock, [b"GET"])
        else:
            with closing_socket(stack.connect()) as other:
                other.sendall(fresh)
                second = read_responses(other, [b"GET"])
    got = view.responses[0]
    event(f"{generated.when}: {got.status}")
    if got.status != 502:
        assert got.status == expected.status
        assert got.body == expected.body
        assert end_to_end(got.fields, frozenset({b"date"})) == end_to_end(
            expected.fields, frozenset({b"date"})
        )
    (answer,) = second.responses
    assert answer.status == 200, answer
    assert answer.body == b"fresh %d" % number
