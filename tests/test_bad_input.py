"""The bad-input table of proxy-rules.md, row by row, as raw bytes through the proxy listener.

Each row asserts the exact status line, whether the connection is still usable, and that the
origin behind the proxy received nothing. Rows already covered elsewhere: Host rewritten from
the target, hop-by-hop removal, Max-Forwards, HEAD/204/304 bodies (test_forwarding.py).

Two answers differ from the table on purpose:

- aiohttp answers a request it could not parse with ``HTTP/1.0`` in the status line: it never
  learned the client's version, and RFC 9110 §6.2 lets a server answer with a lower minor
  version. Our refusals after a successful parse (505, 431 for a whole head) go the same way.
- llhttp reports ``xchunked`` and an unknown coding alike ("invalid Transfer-Encoding"), so
  both get 400, not 501 for the unknown one. RFC 9112 §6.1 says a server SHOULD answer 501;
  400 plus close refuses the message just as firmly, which is what matters for smuggling.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from proxy import __main__ as cli
from proxy.observe import log
from tests.conftest import LogCapture, RawOrigin, RunningProxy, read_head

StartRaw = Callable[[Any], Awaitable[RawOrigin]]
StartProxy = Callable[..., Awaitable[RunningProxy]]

# Every raw request carries this field value; no log line may ever contain it.
CANARY = "cnry-5e1d"
FIELD = f"X-Canary: {CANARY}\r\n"


@dataclass(frozen=True)
class Row:
    """One raw request: ``{t}`` is the origin's absolute URL, ``{c}`` the canary field line."""

    raw: bytes
    status: bytes
    closed: bool = True
    probe: bool = True  # follow with a well-formed request in the same write
    reason: str = "malformed_request"  # its count in proxy_denied_total

    def render(self, origin: RawOrigin) -> bytes:
        return self.raw.replace(b"{t}", origin.url("/p").encode()).replace(b"{c}", FIELD.encode())


def head(*lines: str, body: bytes = b"", method: str = "POST") -> bytes:
    """A request head for ``{t}`` with the canary and ``lines``, CRLF-terminated."""
    start = f"{method} {{t}} HTTP/1.1\r\nHost: x\r\n{{c}}"
    return (start + "".join(line + "\r\n" for line in lines) + "\r\n").encode() + body


BAD_REQUEST = b"HTTP/1.0 400 Bad Request"
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = "Transfer-Encoding: chunked"

ROWS: dict[str, Row] = {
    # RFC 9112 §6.1, §6.3: framing a proxy and its origin could read differently.
    "content_length_and_transfer_encoding": Row(
        head("Content-Length: 5", CHUNKED, body=b"0\r\n\r\n"), BAD_REQUEST
    ),
    "two_different_content_lengths": Row(
        head("Content-Length: 1", "Content-Length: 2", body=b"ab"), BAD_REQUEST
    ),
    "two_equal_content_lengths": Row(
        head("Content-Length: 2", "Content-Length: 2", body=b"ab"), BAD_REQUEST
    ),
    "content_length_with_sign": Row(head("Content-Length: +1", body=b"a"), BAD_REQUEST),
    "content_length_in_hex": Row(head("Content-Length: 0x10"), BAD_REQUEST),
    "content_length_with_underscore": Row(head("Content-Length: 1_0"), BAD_REQUEST),
    "chunked_not_last": Row(
        head("Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"), BAD_REQUEST
    ),
    "chunked_twice_in_one_field": Row(
        head("Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"), BAD_REQUEST
    ),
    "chunked_twice_in_two_fields": Row(head(CHUNKED, CHUNKED, body=b"0\r\n\r\n"), BAD_REQUEST),
    "xchunked": Row(head("Transfer-Encoding: xchunked", body=b"0\r\n\r\n"), BAD_REQUEST),
    "unknown_transfer_coding": Row(head("Transfer-Encoding: snappy"), BAD_REQUEST),
    # llhttp accepts a coding before chunked; the proxy would drop it with Transfer-Encoding
    # and forward gzip bytes as identity content: 501 (found by test_oracle_requests.py).
    "coding_before_chunked": Row(
        head("Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
        b"HTTP/1.0 501 Not Implemented",
        reason="unsupported_transfer_coding",
    ),
    # RFC 9112 §2.2, §5.1, §5.2; RFC 9110 §5.5: field syntax.
    "space_before_colon": Row(head("X-A : 1", method="GET"), BAD_REQUEST),
    "obs_fold": Row(head("X-A: 1", " folded", method="GET"), BAD_REQUEST),
    "cr_inside_a_value": Row(head("X-A: 1\r2", method="GET"), BAD_REQUEST),
    "lf_inside_a_value": Row(head("X-A: 1\n2", method="GET"), BAD_REQUEST),
    "nul_inside_a_value": Row(head("X-A: 1\x002", method="GET"), BAD_REQUEST),
    "bare_lf_line_ends": Row(b"GET {t} HTTP/1.1\nHost: x\n{c}\n", BAD_REQUEST),
    "bare_cr_line_ends": Row(b"GET {t} HTTP/1.1\rHost: x\r{c}\r", BAD_REQUEST),
    # RFC 9112 §7.1: chunk framing.
    "invalid_chunk_size": Row(head(CHUNKED, body=b"zz\r\nab\r\n0\r\n\r\n"), BAD_REQUEST),
    "invalid_chunk_extension": Row(head(CHUNKED, body=b"2;\x01\r\nab\r\n0\r\n\r\n"), BAD_REQUEST),
    # RFC 9112 §2.3, §3: method and version tokens.
    "bad_method_token": Row(b"G@T {t} HTTP/1.1\r\nHost: x\r\n{c}\r\n", BAD_REQUEST),
    # RFC 9110 §9.1 allows any token as a method, but llhttp knows a fixed list of them: any
    # other is refused before the proxy sees it (docs/metrics.md; the forwarded ones below).
    "unknown_extension_method": Row(b"FOO {t} HTTP/1.1\r\nHost: x\r\n{c}\r\n", BAD_REQUEST),
    "lower_case_method": Row(b"get {t} HTTP/1.1\r\nHost: x\r\n{c}\r\n", BAD_REQUEST),
    "rtsp_method_with_http_version": Row(
        b"DESCRIBE {t} HTTP/1.1\r\nHost: x\r\n{c}\r\n", BAD_REQUEST
    ),
    "version_1_01": Row(b"GET {t} HTTP/1.01\r\nHost: x\r\n{c}\r\n", BAD_REQUEST),
    "version_1_9": Row(b"GET {t} HTTP/1.9\r\nHost: x\r\n{c}\r\n", BAD_REQUEST),
    # llhttp takes an HTTP/2.0 message as the connection's last: anything after it in the
    # same segment fails with 400 (that case is the probe of the row above).
    "version_2_0": Row(
        b"GET {t} HTTP/2.0\r\nHost: x\r\n{c}\r\n",
        b"HTTP/1.0 505 HTTP Version Not Supported",
        probe=False,
        reason="version_not_supported",
    ),
    # RFC 6585 §5, RFC 9110 §15.5.15: sizes (defaults: 64 KiB head, 8 KiB target).
    "head_over_the_size_limit": Row(
        head(*(f"X-Fill-{i}: {'f' * 2000}" for i in range(40)), method="GET"),
        b"HTTP/1.0 431 Request Header Fields Too Large",
        reason="headers_too_large",
    ),
    "one_field_over_the_size_limit": Row(
        head(f"X-Big: {'b' * 70000}", method="GET"),
        b"HTTP/1.0 431 Request Header Fields Too Large",
        reason="headers_too_large",
    ),
    "too_many_fields": Row(
        head(*(f"X-N{i}: 1" for i in range(200)), method="GET"),
        b"HTTP/1.0 431 Request Header Fields Too Large",
        reason="headers_too_large",
    ),
    "target_over_the_length_limit": Row(
        b"GET {t}?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n{c}\r\n",
        b"HTTP/1.0 414 Request-URI Too Long",
        reason="target_too_long",
    ),
    # RFC 9112 §3.2: Host.
    "no_host_in_http_1_1": Row(b"GET {t} HTTP/1.1\r\n{c}\r\n", BAD_REQUEST),
    "two_host_fields": Row(head("Host: y", method="GET"), BAD_REQUEST),
    # RFC 9112 §3.2.1: origin-form to the proxy is only for its own endpoints; never route
    # by Host. Refused without closing: the request itself was well-formed.
    "origin_form_other_path": Row(
        b"GET /p HTTP/1.1\r\nHost: 127.0.0.1\r\n{c}\r\n",
        b"HTTP/1.1 400 Bad Request",
        False,
        reason="origin_form",
    ),
    "ws_absolute_target": Row(
        b"GET ws://127.0.0.1/p HTTP/1.1\r\nHost: x\r\n{c}\r\n",
        b"HTTP/1.1 400 Bad Request",
        False,
        reason="unsupported_scheme",
    ),
    "ftp_absolute_target": Row(
        b"GET ftp://127.0.0.1/p HTTP/1.1\r\nHost: x\r\n{c}\r\n",
        b"HTTP/1.1 400 Bad Request",
        False,
        reason="unsupported_scheme",
    ),
    # A good request and a bad one in the same segment: llhttp fails the whole segment,
    # so neither is forwarded; no byte of either reaches an origin.
    "good_then_bad_pipelined_together": Row(
        head(method="GET") + b"G@T {t} HTTP/1.1\r\nHost: x\r\n\r\n", BAD_REQUEST
    ),
}

# What is left of the table elsewhere: a client outside the allowed networks, CONNECT ports,
# denied destinations and loops (test_access.py, test_policy.py); cardinality
# (test_cardinality.py); slowloris (test_limits.py).


async def record_and_answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
) -> None:
    """Record every byte; answer each request head with a small 200, keeping the connection."""
    for _ in range(100):
        data = await read_head(reader)
        state.received.append(data)
        writer.write(OK_RESPONSE)
        await writer.drain()


PROBE = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def send_and_read(proxy: RunningProxy, raw: bytes, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send ``raw`` in one write; return what came back and whether the proxy closed."""
    reader, writer = await proxy.connect()
    received = bytearray()
    closed = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        writer.write(raw)
        await writer.drain()
        while not closed and loop.time() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - loop.time())
            except TimeoutError:
                break
            except ConnectionResetError:
                chunk = b""
            closed = not chunk
            received += chunk
    finally:
        writer.close()
    return bytes(received), closed


def status_lines(data: bytes) -> list[bytes]:
    return re.findall(rb"(?m)^HTTP/1\.[01] \d{3} [^\r]*", data)


@pytest.mark.parametrize("name", list(ROWS))
async def test_bad_input_row(proxy: RunningProxy, raw_origin: StartRaw, name: str) -> None:
    """Each row gets its exact status line and connection state, is counted by its reason in
    proxy_denied_total, and reaches no origin."""
    row = ROWS[name]
    origin = await raw_origin(record_and_answer)
    # A well-formed probe follows in the same write: answered only if the connection lives.
    data, closed = await send_and_read(proxy, row.render(origin) + (PROBE if row.probe else b""))
    assert closed
    lines = status_lines(data)
    assert lines[0] == row.status
    assert lines[1:] == ([] if row.closed else [b"HTTP/1.1 200 OK"])
    assert b"Proxy-Status: tracing-proxy; error=http_request_error" in data
    assert CANARY.encode() not in data  # never an echo of what the client sent
    assert origin.connections == 0
    assert proxy.sample("proxy_denied_total", reason=row.reason) == 1
    assert sum(count(proxy, "proxy_denied_total").values()) == 1  # under that reason alone


# Methods beyond RFC 9110's that llhttp (aiohttp 3.14) knows: WebDAV, CalDAV, UPnP, cache
# purges, QUERY. Each is forwarded as it came and counted under method="_OTHER".
EXTENSION_METHODS = [
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "SEARCH",
    "MKCALENDAR",
    "M-SEARCH",
    "NOTIFY",
    "PURGE",
    "QUERY",
    "LINK",
    "UNLINK",
]


@pytest.mark.parametrize("method", EXTENSION_METHODS)
async def test_extension_methods_the_parser_knows_are_forwarded_as_other(
    proxy: RunningProxy, raw_origin: StartRaw, method: str
) -> None:
    """An extension method llhttp knows reaches the origin unchanged and counts as _OTHER."""
    origin = await raw_origin(record_and_answer)
    raw = f"{method} {origin.url('/p')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data, _ = await send_and_read(proxy, raw.encode())
    assert status_lines(data) == [b"HTTP/1.1 200 OK"]
    assert origin.received[0].startswith(f"{method} /p HTTP/1.1\r\n".encode())
    host = f"127.0.0.1:{origin.port}"
    samples = {"host": host, "method": "_OTHER", "code": "200"}
    assert proxy.registry.get_sample_value("proxy_upstream_requests_total", samples) == 1


def count(proxy: RunningProxy, family: str) -> dict[str, float]:
    """Every sample of a labelled counter family, by its one label's value."""
    return {
        next(iter(sample.labels.values())): sample.value
        for metric in proxy.registry.collect()
        for sample in metric.samples
        if sample.name == family
    }


async def test_bad_request_after_a_good_one_is_refused_alone(
    proxy: RunningProxy, raw_origin: StartRaw
) -> None:
    """A good request is answered; a bad one sent after its response gets 400 and a close."""
    origin = await raw_origin(record_and_answer)
    reader, writer = await proxy.connect()
    try:
        writer.write(Row(head(method="GET"), b"").render(origin))
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 5)
        writer.write(ROWS["two_different_content_lengths"].render(origin))
        rest = await asyncio.wait_for(reader.read(-1), 5)  # to EOF: the proxy closes
    finally:
        writer.close()
    assert status_lines(first) == [b"HTTP/1.1 200 OK"]
    assert status_lines(rest) == [BAD_REQUEST]
    assert len(origin.received) == 1  # nothing of the second request was carried across


async def test_client_chunk_framing_is_never_copied(
    proxy: RunningProxy, raw_origin: StartRaw
) -> None:
    """Chunk extensions and the client's chunk sizes do not reach the origin (RFC 9112 §7.1)."""

    async def record_body(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        state.received.append(await read_head(reader))
        state.received.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(OK_RESPONSE)
        await writer.drain()

    origin = await raw_origin(record_body)
    body = b"3;ext=cnry\r\nabc\r\n001;x\r\nd\r\n0\r\n\r\n"
    data, _ = await send_and_read(proxy, Row(head(CHUNKED, body=body), b"").render(origin))
    assert status_lines(data) == [b"HTTP/1.1 200 OK"]
    forwarded = b"".join(origin.received[1:])
    assert b"cnry" not in forwarded
    assert b";x" not in forwarded
    assert b"001" not in forwarded
    assert b"abc" in forwarded
    assert b"d\r\n" in forwarded


# The response direction (RFC 9112 §6.3) is in test_bad_response.py.


# -- request ids: RFC 9110 §5.5 values the parser lets through, and some it does not ----------

REQUEST_IDS = {
    "too_long": (b"a" * 129, 200),
    "double_quote": (b'cnry"x', 200),
    "single_quote": (b"cnry'x", 200),
    "backslash": (b"cnry\\x", 200),
    "space": (b"cnry x", 200),
    "tab": (b"cnry\tx", 200),
    "utf8_non_ascii": ("cnry-é".encode(), 200),
    "latin1_high_bytes": (b"cnry\xff\xfe", 200),
    "json_breaker": (b'cnry","event":"forged', 200),
    "html": (b"<cnry>", 200),
    "control_character": (b"cnry\x01x", 400),
    "escape_character": (b"cnry\x1b[2J", 400),
    "delete": (b"cnry\x7f", 400),
    "vertical_tab": (b"cnry\x0bx", 400),
    "cr_without_lf": (b"cnry\rx", 400),
    "lf_without_cr": (b"cnry\nX-Injected: 1", 400),
}


def request_with_id(origin: RawOrigin, value: bytes) -> bytes:
    target = origin.url("/p").encode()
    return b"GET %s HTTP/1.1\r\nHost: x\r\nX-Request-ID: %s\r\nConnection: close\r\n\r\n" % (
        target,
        value,
    )


@pytest.mark.parametrize("name", list(REQUEST_IDS))
async def test_bad_request_id_is_replaced_never_echoed(
    proxy: RunningProxy, raw_origin: StartRaw, name: str
) -> None:
    """An unusable X-Request-ID is replaced by a fresh one or refused, and never echoed."""
    value, status = REQUEST_IDS[name]
    origin = await raw_origin(record_and_answer)
    data, closed = await send_and_read(proxy, request_with_id(origin, value))
    assert closed
    assert int(status_lines(data)[0].split()[1]) == status
    ids = re.findall(rb"(?im)^X-Request-ID: ([^\r\n]*)", data)
    assert len(ids) == 1
    assert re.fullmatch(rb"[0-9a-f-]{36}", ids[0])
    assert value not in data
    forwarded = b"".join(origin.received)
    assert value not in forwarded
    if status == 200:
        assert b"X-Request-ID: " + ids[0] in forwarded


async def test_valid_request_id_is_kept(proxy: RunningProxy, raw_origin: StartRaw) -> None:
    """A well-formed id passes through to the origin and back to the client unchanged."""
    origin = await raw_origin(record_and_answer)
    data, _ = await send_and_read(proxy, request_with_id(origin, b"good.id-42"))
    assert b"X-Request-ID: good.id-42\r\n" in data
    assert b"X-Request-ID: good.id-42\r\n" in origin.received[0]


async def test_every_log_line_is_one_json_object_without_client_values(
    start_proxy: StartProxy, raw_origin: StartRaw, logs: LogCapture
) -> None:
    """After the whole bad-input suite, each line written parses alone and quotes nothing sent."""
    proxy = await start_proxy()
    origin = await raw_origin(record_and_answer)
    for row in ROWS.values():
        await send_and_read(proxy, row.render(origin) + (PROBE if row.probe else b""))
    for value, _ in REQUEST_IDS.values():
        await send_and_read(proxy, request_with_id(origin, value))
    await send_and_read(proxy, request_with_id(origin, b"good.id-42"))
    log.flush()
    text = logs.stream.getvalue()
    assert text.endswith("\n")
    assert text.splitlines() == text.split("\n")[:-1]  # no other line separator anywhere
    lines = logs.lines()  # json.loads of each line: one non-JSON line fails here
    assert all(isinstance(line, dict) and "event" in line for line in lines)
    assert len(logs.events("rejected")) >= len(ROWS)
    assert CANARY not in text
    assert "cnry" not in text
    assert any(line.get("request_id") == "good.id-42" for line in logs.events("access"))


# -- start-up ---------------------------------------------------------------------------------


def test_the_c_parser_is_in_use() -> None:
    """aiohttp's llhttp-based parser is what this installation runs."""
    assert cli.c_parser_in_use()


def test_start_up_refuses_the_pure_python_parser(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the C parser the proxy exits 1 before listening, and says why."""
    monkeypatch.setattr(cli, "c_parser_in_use", lambda: False)
    monkeypatch.setattr(
        sys, "argv", ["tracing-proxy", "--listen", "127.0.0.1:0", "--admin-listen", "off"]
    )
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert "C HTTP parser" in capsys.readouterr().err
