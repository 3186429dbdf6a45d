"""Bad upstream responses, row by row, from a raw TCP origin through the proxy.

Each row says who catches it: aiohttp's client parser (``AIOHTTP``), or one of our rules
(proxy.rules.response) where aiohttp lets it through. One test proves that split against
the real library; another that the proxy answers every row 502 ``http_protocol_error``,
counts and logs it, and never reuses that upstream connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.rules.response import RULES
from proxy.wire.forwarding import check_upstream, discard_upstream
from tests.conftest import LogCapture, RawOrigin, RunningProxy, read_head
from tests.test_bad_input import OK_RESPONSE, send_and_read, status_lines
from tests.test_tunnelling import open_tunnel

StartRaw = Callable[[Any], Awaitable[RawOrigin]]

AIOHTTP = "aiohttp"
_OK_TAIL = b"Content-Length: 2\r\n\r\nok"

# name -> (raw response, who rejects it: AIOHTTP or the name of our rule)
ROWS: dict[str, tuple[bytes, str]] = {
    # RFC 9112 §6.1, §6.3: framing the proxy and its client could read differently.
    "content_length_and_transfer_encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        AIOHTTP,
    ),
    "two_different_content_lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
        AIOHTTP,
    ),
    "content_length_with_sign": (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", AIOHTTP),
    "transfer_coding_gzip_alone": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nokok",
        "transfer_coding_not_single_chunked",
    ),
    "transfer_coding_gzip_then_chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        "transfer_coding_not_single_chunked",
    ),
    "transfer_coding_chunked_twice": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        "transfer_coding_not_single_chunked",
    ),
    "transfer_coding_xchunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nokok",
        "transfer_coding_not_single_chunked",
    ),
    "invalid_chunk_extension": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;\x01\r\nok\r\n0\r\n\r\n",
        AIOHTTP,
    ),
    # RFC 9110 §15, RFC 9112 §4: the status line.
    "status_two_digits": (b"HTTP/1.1 20 OK\r\n" + _OK_TAIL, AIOHTTP),
    "status_four_digits": (b"HTTP/1.1 2000 OK\r\n" + _OK_TAIL, AIOHTTP),
    "status_not_digits": (b"HTTP/1.1 2x0 OK\r\n" + _OK_TAIL, AIOHTTP),
    "status_000": (b"HTTP/1.1 000 OK\r\n" + _OK_TAIL, "status_outside_100_599"),
    "status_099": (b"HTTP/1.1 099 OK\r\n" + _OK_TAIL, "status_outside_100_599"),
    "status_600": (b"HTTP/1.1 600 OK\r\n" + _OK_TAIL, "status_outside_100_599"),
    "status_999": (b"HTTP/1.1 999 OK\r\n" + _OK_TAIL, "status_outside_100_599"),
    "version_2_0": (b"HTTP/2.0 200 OK\r\n" + _OK_TAIL, "version_not_http_1"),
    "version_1_2": (b"HTTP/1.2 200 OK\r\n" + _OK_TAIL, AIOHTTP),
    "reason_with_control_character": (
        b"HTTP/1.1 200 O\x01K\r\n" + _OK_TAIL,
        "reason_phrase_with_control_character",
    ),
    "reason_with_delete": (
        b"HTTP/1.1 200 O\x7fK\r\n" + _OK_TAIL,
        "reason_phrase_with_control_character",
    ),
    # RFC 9110 §5.1, §5.5, §5.6.2; RFC 9112 §5.1: fields.
    "space_before_colon": (b"HTTP/1.1 200 OK\r\nX-A : 1\r\n" + _OK_TAIL, AIOHTTP),
    "name_not_a_token": (b"HTTP/1.1 200 OK\r\nX@A: 1\r\n" + _OK_TAIL, AIOHTTP),
    "empty_name": (b"HTTP/1.1 200 OK\r\n: 1\r\n" + _OK_TAIL, AIOHTTP),
    "cr_inside_a_value": (b"HTTP/1.1 200 OK\r\nX-A: 1\r2\r\n" + _OK_TAIL, AIOHTTP),
    "nul_inside_a_value": (b"HTTP/1.1 200 OK\r\nX-A: 1\x002\r\n" + _OK_TAIL, AIOHTTP),
    "control_character_in_a_value": (
        b"HTTP/1.1 200 OK\r\nX-A: 1\x012\r\n" + _OK_TAIL,
        "field_value_with_control_character",
    ),
    "delete_in_a_value": (
        b"HTTP/1.1 200 OK\r\nX-A: 1\x7f2\r\n" + _OK_TAIL,
        "field_value_with_control_character",
    ),
    # Not HTTP, and bytes past the framing in the same segment.
    "not_http_at_all": (b"\x00\x01 hello there\r\n\r\n", AIOHTTP),
    "extra_bytes_after_the_body": (b"HTTP/1.1 200 OK\r\n" + _OK_TAIL + b"EXTRA", AIOHTTP),
}


async def answer_bad_then_good(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
) -> None:
    """The row's response first, then 200s; keeps its connection so reuse would show."""
    for _ in range(10):
        head = await read_head(reader)
        name = head.split(b" ", 2)[1].rsplit(b"/", 1)[1].decode()
        first = len(state.received) == 0
        state.received.append(head)
        writer.write(ROWS[name][0] if first else OK_RESPONSE)
        await writer.drain()


@pytest.mark.parametrize("name", list(ROWS))
async def test_aiohttp_or_our_rule_rejects(raw_origin: StartRaw, name: str) -> None:
    """aiohttp's client raises on its rows; on the others it parses and our rule objects."""
    caught_by = ROWS[name][1]
    origin = await raw_origin(answer_bad_then_good)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        if caught_by == AIOHTTP:
            with pytest.raises(aiohttp.ClientResponseError):
                async with session.get(origin.url(f"/{name}")) as up:
                    await up.read()
            return
        async with session.get(origin.url(f"/{name}")) as up:
            invalid = check_upstream(up)
    assert invalid is not None
    assert invalid.rule.name == caught_by


@pytest.mark.parametrize("name", list(ROWS))
async def test_bad_upstream_response_is_502_and_its_connection_is_dropped(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture, name: str
) -> None:
    """A 502 http_protocol_error, counted and logged; the next request gets a new connection."""
    caught_by = ROWS[name][1]
    origin = await raw_origin(answer_bad_then_good)
    request = (
        f"GET {origin.url('/' + name)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    data, _ = await send_and_read(proxy, request)
    assert status_lines(data) == [b"HTTP/1.1 502 Bad Gateway"]
    assert b"Proxy-Status: tracing-proxy; error=http_protocol_error" in data
    if caught_by != AIOHTTP:
        rule = next(rule for rule in RULES if rule.name == caught_by)
        assert f'details="{rule.details}"'.encode() in data
        (event,) = logs.events("invalid_response")
        assert event["rule"] == caught_by
    data, _ = await send_and_read(proxy, request)
    assert status_lines(data) == [b"HTTP/1.1 200 OK"], data
    assert origin.connections == 2, (data, origin)
    host = f"127.0.0.1:{origin.port}"
    assert proxy.sample("proxy_upstream_errors_total", host=host, error="http_protocol_error") == 1
    failed = logs.events("access")[0]
    assert (failed["status"], failed["error"]) == (502, "http_protocol_error")


def test_every_rule_has_a_row_here_or_is_unreachable_through_aiohttp() -> None:
    """Each rule is proven end to end, except those aiohttp's parser already enforces."""
    # aiohttp rejects bad names, NUL/CR/LF in values and conflicting lengths before us;
    # the rules stay as the contract (and for any future client parser).
    enforced_by_aiohttp = {
        "field_name_not_a_token",
        "content_length_and_transfer_encoding",
        "content_length_invalid",
    }
    covered = {caught_by for _, caught_by in ROWS.values()}
    assert {rule.name for rule in RULES} - enforced_by_aiohttp <= covered


async def test_discard_closes_a_connection_aiohttp_already_pooled(raw_origin: StartRaw) -> None:
    """A response complete with its head is pooled before we see it; discard_upstream drops it."""
    origin = await raw_origin(answer_bad_then_good)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(origin.url("/status_600")) as up:
            assert up.connection is None  # already released: up.close() alone cannot help
            discard_upstream(up)
        async with session.get(origin.url("/status_600")) as up:
            assert await up.read() == b"ok"
    assert origin.connections == 2


async def test_unsolicited_response_on_an_idle_connection_never_answers_the_next_request(
    proxy: RunningProxy, raw_origin: StartRaw
) -> None:
    """A response sent while the pooled connection is idle is never taken as the next one's.

    RFC 9112 §9.3: each response answers one request. Found by test_oracle_reuse.py: aiohttp
    queued the unsolicited response and handed it to the next request on that connection.
    """
    sent_extra = asyncio.Event()

    async def answer_then_poison(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        for _ in range(10):
            head = await read_head(reader)
            state.received.append(head)
            writer.write(OK_RESPONSE)
            await writer.drain()
            if len(state.received) == 1:
                await first_answered.wait()  # the connection is idle in the pool now
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
                await writer.drain()
                sent_extra.set()

    first_answered = asyncio.Event()
    origin = await raw_origin(answer_then_poison)
    request = f"GET {origin.url('/p')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    first, _ = await send_and_read(proxy, request)
    first_answered.set()
    await asyncio.wait_for(sent_extra.wait(), 5)
    second, _ = await send_and_read(proxy, request)
    assert first.endswith(b"\r\n\r\nok")
    assert second.endswith(b"\r\n\r\nok")
    assert b"EVIL" not in second
    assert origin.connections == 2


async def test_interim_response_with_control_character_is_502_and_never_relayed(
    proxy: RunningProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """A 1xx head is held to the same rules as a final one (RFC 9110 §5.5, §15.2)."""

    async def bad_early_hints(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a\x01>\r\n\r\n" + OK_RESPONSE)
        await writer.drain()

    origin = await raw_origin(bad_early_hints)
    request = f"GET {origin.url('/p')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    data, _ = await send_and_read(proxy, request)
    assert status_lines(data) == [b"HTTP/1.1 502 Bad Gateway"]
    assert b"\x01" not in data
    rule = next(rule for rule in RULES if rule.name == "field_value_with_control_character")
    assert f'details="{rule.details}"'.encode() in data
    (event,) = logs.events("invalid_response")
    assert event["rule"] == rule.name


async def test_bad_response_inside_connect_is_502_too(
    start_proxy: Callable[..., Awaitable[RunningProxy]], raw_origin: StartRaw
) -> None:
    """A request served inside a CONNECT (plain HTTP port) gets the same response check."""

    async def bad_status(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        await read_head(reader)
        writer.write(ROWS["status_600"][0])
        await writer.drain()

    origin = await raw_origin(bad_status)
    proxy = await start_proxy(connect_http_ports=(origin.port,))
    authority = f"127.0.0.1:{origin.port}"
    tunnel = await open_tunnel(proxy.url, authority)
    assert tunnel.status == 200, tunnel.head
    tunnel.writer.write(
        f"GET /p HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode()
    )
    answer = await asyncio.wait_for(tunnel.reader.read(), 10)
    tunnel.writer.close()
    assert status_lines(answer) == [b"HTTP/1.1 502 Bad Gateway"]
    rule = next(rule for rule in RULES if rule.name == "status_outside_100_599")
    assert f'details="{rule.details}"'.encode() in answer
