"""HTTP/2 abuse end to end: a raw h2 client through the proxy process, and a second client.

Each abuse goes through a real ``python -m proxy`` (uvloop), over an intercepted TLS
connection (ALPN h2) or h2c inside a CONNECT. For each: the abusive connection gets the
GOAWAY Envoy would send, the proxy's resident memory stays bounded (printed, and held to a
generous cap), a second client on its own connection gets its answers during and after, and
the abuse is counted in ``proxy_client_http2_errors_total{reason}`` and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.processes import stop
from benchmarks.procfs import rss_mb
from proxy.config import Settings
from tests import h2_client, test_intercept
from tests.h2_client import H2TestClient, headers_frame
from tests.h2_origin import H2Origin
from tests.test_cli import start_cli
from tests.test_intercept import CAFiles, intercept_flags
from tests.test_limits import until

ca_files = test_intercept.ca_files  # the interception CA fixture

LIMIT = Settings().http2_max_concurrent_streams  # what the proxy advertises by default
RSS_GROWTH_CAP_MB = 64.0  # far above what any abuse here costs (the figures are printed)
HELD = "/grpc?head_ms=60000"  # the origin answers after a minute: longer than any test


@dataclass
class Child:
    """The proxy process, its log as it comes, and the two origins it reaches."""

    process: asyncio.subprocess.Process
    proxy_port: int
    metrics: str
    tls: H2Origin  # hypercorn over TLS (h2), reached through interception
    clear: H2Origin  # hypercorn in the clear (h2c), reached through a CONNECT to its port
    context: ssl.SSLContext  # trusts the proxy's CA
    lines: list[dict[str, Any]] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def sample(self, name: str, **labels: str) -> float | None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.metrics, timeout=aiohttp.ClientTimeout(5)) as resp,
        ):
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    async def wait_event(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        """The ``name`` lines once ``count`` have come (polled, at most 10 s)."""
        for _ in range(500):
            if len(self.events(name)) >= count:
                return self.events(name)
            await asyncio.sleep(0.02)
        raise AssertionError(f"expected {count} {name} lines, got {self.lines[-5:]}")


@pytest.fixture
async def child(
    ca_files: CAFiles, tls_ca_file: str, tls_h2_origin: H2Origin, h2c_origin: H2Origin
) -> AsyncIterator[Child]:
    """The proxy CLI intercepting the TLS origin and serving h2c towards the clear one."""
    running = await start_cli(
        *intercept_flags(ca_files, tls_ca_file, tls_h2_origin.port),
        *("--connect-http-ports", str(h2c_origin.port), "--shutdown-grace", "0"),
    )
    port = int(running.proxy.rsplit(":", 1)[1])
    context = ca_files.client_context()
    it = Child(running.process, port, running.metrics, tls_h2_origin, h2c_origin, context)

    async def read_log() -> None:
        assert running.process.stdout is not None
        async for line in running.process.stdout:
            if line.endswith(b"\n"):  # a kill can cut the last one short
                it.lines.append(json.loads(line))

    reading = asyncio.ensure_future(read_log())
    try:
        yield it
    finally:
        await stop(running.process, wait=10)  # SIGTERM, SIGKILL after 10 s, reaped
        await asyncio.wait_for(reading, 10)


# -- the two ways in ---------------------------------------------------------------------------


async def connect(child: Child, how: str) -> H2TestClient:
    """An HTTP/2 connection through the proxy: intercepted TLS (``h2``) or ``h2c``."""
    if how == "h2":
        return await h2_client.connect(child.proxy_port, child.tls.authority, child.context)
    return await h2_client.connect(child.proxy_port, child.clear.authority)


def origin_of(child: Child, how: str) -> H2Origin:
    return child.tls if how == "h2" else child.clear


def scheme_of(how: str) -> str:
    return "https" if how == "h2" else "http"


# -- frames written by hand ----------------------------------------------------------------------


class Frames:
    """Request frames for one connection; its HPACK encoder keeps the peer's table in step."""

    def __init__(self, authority: str, scheme: str) -> None:
        self.authority = authority.encode()
        self.scheme = scheme.encode()
        self.encoder = hpack.Encoder()

    def block(self, path: str, method: str = "GET", *extra: tuple[bytes, bytes]) -> bytes:
        return bytes(
            self.encoder.encode(
                [
                    (b":method", method.encode()),
                    (b":scheme", self.scheme),
                    (b":authority", self.authority),
                    (b":path", path.encode()),
                    *extra,
                ]
            )
        )


def rapid_reset(frames: Frames, count: int, first: int = 1) -> Iterator[bytes]:
    """HEADERS then RST_STREAM(CANCEL) for ``count`` streams (CVE-2023-44487), each asking
    for an answer the origin holds for a minute."""
    for stream_id in range(first, first + 2 * count, 2):
        yield headers_frame(stream_id, frames.block(HELD))
        yield RstStreamFrame(stream_id, error_code=ErrorCodes.CANCEL).serialize()


def continuation_flood(frames: Frames, count: int) -> Iterator[bytes]:
    """A header block that never ends: HEADERS, then CONTINUATION frames of 1 KiB each."""
    yield HeadersFrame(1, data=frames.block("/echo/cont")).serialize()  # no END_HEADERS
    pad = frames.encoder.encode([(b"x-pad", b"p" * 1000)])
    for _ in range(count):
        yield ContinuationFrame(1, data=pad).serialize()


def hpack_bomb(frames: Frames, count: int) -> Iterator[bytes]:
    """One 3 KB field into the dynamic table, then a block naming it ``count`` times by index:
    about ``count`` bytes on the wire, 3 KB each decoded."""
    big = (b"x-big", b"b" * 3000)
    yield headers_frame(1, frames.block("/echo/table", "GET", big))
    yield headers_frame(3, frames.block("/echo/bomb", "GET", *[big] * count))


def settings_flood(frames: Frames, count: int) -> Iterator[bytes]:
    for _ in range(count):
        yield SettingsFrame(0).serialize()


def ping_flood(frames: Frames, count: int) -> Iterator[bytes]:
    for n in range(count):
        yield PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize()


def priority_flood(frames: Frames, count: int) -> Iterator[bytes]:
    for n in range(count):
        yield PriorityFrame(2 * n + 1, depends_on=0, stream_weight=16).serialize()


def empty_data_flood(frames: Frames, count: int) -> Iterator[bytes]:
    """A POST whose body is ``count`` empty DATA frames that never end it."""
    yield headers_frame(1, frames.block("/echo/empty", "POST"), end_stream=False)
    for _ in range(count):
        yield DataFrame(1, data=b"").serialize()


def too_many_streams(frames: Frames, count: int) -> Iterator[bytes]:
    """``count`` streams opened at once by a client that has not acknowledged the proxy's
    SETTINGS; the origin holds each answer for a minute."""
    for stream_id in range(1, 2 * count, 2):
        yield headers_frame(stream_id, frames.block(HELD))


def too_many_streams_acknowledged(frames: Frames, count: int) -> Iterator[bytes]:
    """The same after acknowledging both SETTINGS frames the proxy sends first: the
    advertised SETTINGS_MAX_CONCURRENT_STREAMS knowingly ignored."""
    yield SettingsFrame(0, flags=["ACK"]).serialize() * 2
    yield from too_many_streams(frames, count)


Abuse = Callable[[Frames, int], Iterator[bytes]]


async def send_abuse(client: H2TestClient, frames: Iterator[bytes], batch: int = 200) -> int:
    """Write the frames in batches, draining between them (60 s at most in all); the bytes
    written before the proxy closed the connection."""
    async with asyncio.timeout(60):
        return await _write_batches(client, frames, batch)


async def _write_batches(client: H2TestClient, frames: Iterator[bytes], batch: int) -> int:
    written = 0
    pending: list[bytes] = []
    with contextlib.suppress(ConnectionError):
        for frame in frames:
            pending.append(frame)
            if len(pending) == batch:
                data = b"".join(pending)
                pending.clear()
                client.writer.write(data)
                await asyncio.wait_for(client.writer.drain(), 10)
                written += len(data)
                if client.writer.is_closing():
                    break
        if pending:
            data = b"".join(pending)
            client.writer.write(data)
            await asyncio.wait_for(client.writer.drain(), 10)
            written += len(data)
    return written


async def frames_until(
    client: H2TestClient, last: Callable[[Frame], bool] = lambda frame: False
) -> list[Frame]:
    """The frames the proxy sends, up to the first ``last`` one or the end of the connection
    (at most 10 s)."""
    data = b""
    frames: list[Frame] = []
    async with asyncio.timeout(10):
        with contextlib.suppress(ConnectionError):
            while chunk := await client.reader.read(65536):
                data += chunk
                while len(data) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(data[:9]))
                    if len(data) < 9 + length:
                        break
                    frame.parse_body(memoryview(data[9 : 9 + length]))
                    frames.append(frame)
                    data = data[9 + length :]
                    if last(frame):
                        return frames
    return frames


async def victim_fetches(client: H2TestClient, how: str, origin: H2Origin, count: int) -> None:
    """``count`` requests on the second client's own connection, each answered 200."""
    for n in range(count):
        answer = await client.fetch(
            h2_client.get(origin.authority, f"/echo/victim{n}", scheme_of(how))
        )
        assert answer.status == 200, answer.header(b"proxy-status")


async def until_sampled(child: Child, name: str, value: float) -> None:
    """Until the proxy's /metrics shows ``value`` for ``name`` (polled, at most 10 s)."""
    for _ in range(100):
        if await child.sample(name) == value:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} is {await child.sample(name)}, not {value}")


def victim_lines(child: Child) -> list[dict[str, Any]]:
    return [line for line in child.events("access") if "victim" in line["path"]]


ABUSES: list[tuple[str, Abuse, int, str, ErrorCodes]] = [
    # (transport, abuse, count, reason counted, GOAWAY code)
    ("h2", rapid_reset, 5000, "rapid_reset", ErrorCodes.ENHANCE_YOUR_CALM),
    ("h2c", rapid_reset, 5000, "rapid_reset", ErrorCodes.ENHANCE_YOUR_CALM),
    ("h2", continuation_flood, 10_000, "continuation_flood", ErrorCodes.ENHANCE_YOUR_CALM),
    ("h2c", hpack_bomb, 1000, "hpack_bomb", ErrorCodes.ENHANCE_YOUR_CALM),
    ("h2", settings_flood, 10_000, "settings_flood", ErrorCodes.ENHANCE_YOUR_CALM),
    ("h2c", ping_flood, 100_000, "ping_flood", ErrorCodes.ENHANCE_YOUR_CALM),
    ("h2", priority_flood, 10_000, "priority_flood", ErrorCodes.ENHANCE_YOUR_CALM),
    ("h2c", empty_data_flood, 10_000, "empty_data_flood", ErrorCodes.ENHANCE_YOUR_CALM),
    # Streams past a limit not yet acknowledged are refused, up to a budget (REFUSALS).
    ("h2", too_many_streams, 1000, "too_many_streams", ErrorCodes.ENHANCE_YOUR_CALM),
    ("h2c", too_many_streams_acknowledged, 1000, "too_many_streams", ErrorCodes.PROTOCOL_ERROR),
]


@pytest.mark.parametrize(
    ("how", "abuse", "count", "reason", "code"),
    ABUSES,
    ids=[f"{how}-{abuse.__name__}" for how, abuse, *_ in ABUSES],
)
async def test_abuse_ends_its_connection_and_spares_the_others(
    child: Child, how: str, abuse: Abuse, count: int, reason: str, code: ErrorCodes
) -> None:
    """The abuser gets GOAWAY ``code``, counted and logged once as ``reason``, with memory
    bounded and a second client served during and after."""
    origin = origin_of(child, how)
    victim = await connect(child, how)
    attacker = await connect(child, how)
    try:
        await victim_fetches(victim, how, origin, 1)
        before = rss_mb(child.process.pid)
        frames = Frames(origin.authority, scheme_of(how))
        written, _ = await asyncio.gather(
            send_abuse(attacker, abuse(frames, count)), victim_fetches(victim, how, origin, 5)
        )
        got = await frames_until(attacker)
        await victim_fetches(victim, how, origin, 5)
        after = rss_mb(child.process.pid)
    finally:
        await victim.close()
        await attacker.close()
    print(f"{how} {reason}: {written} bytes sent, RSS {before:.1f} -> {after:.1f} MiB")
    goaways = [frame for frame in got if isinstance(frame, GoAwayFrame)]
    assert [frame.error_code for frame in goaways] == [code]
    assert after - before < RSS_GROWTH_CAP_MB
    assert await child.sample("proxy_client_http2_errors_total", reason=reason) == 1
    await until_sampled(child, "proxy_requests_in_flight", 0)  # no stream's work outlived it
    await child.wait_event("h2_connection_closed")
    await until(lambda: len(victim_lines(child)) == 11)  # logged after the abuse was
    assert [line["reason"] for line in child.events("h2_connection_closed")] == [reason]
    if abuse is too_many_streams:
        refused = [f for f in got if isinstance(f, RstStreamFrame)]
        assert refused
        assert {f.error_code for f in refused} == {ErrorCodes.REFUSED_STREAM}
    if abuse in (too_many_streams, too_many_streams_acknowledged):
        # The advertised limit held: no more streams than it reached the origin.
        assert len(origin.versions) - len(victim_lines(child)) <= LIMIT


async def test_goaway_is_not_lost_to_a_reset_while_the_client_still_writes(child: Child) -> None:
    """A client in mid-flood over h2c reads the GOAWAY and a clean end, not a TCP reset that
    discards both (the proxy half-closes and drops what still comes)."""
    attacker = await connect(child, "h2c")
    frames = Frames(child.clear.authority, "http")
    try:
        await send_abuse(attacker, ping_flood(frames, 100_000))
        data = b""
        async with asyncio.timeout(10):
            while chunk := await attacker.reader.read(65536):
                data += chunk
    finally:
        await attacker.close()
    goaway = GoAwayFrame(0)
    goaway.parse_body(memoryview(data[-8:]))  # the last frame: its 8-byte payload
    assert data[-17:-8] == b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"  # GOAWAY, 8 bytes, stream 0
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


async def test_rapid_reset_within_its_budget_leaves_no_upstream_request_running(
    child: Child,
) -> None:
    """150 HEADERS+RST_STREAM pairs, under the rapid_reset budget, keep the connection but
    leave no request in flight (a reset stream's request is cancelled)."""
    attacker = await connect(child, "h2c")
    frames = Frames(child.clear.authority, "http")
    try:
        await send_abuse(attacker, rapid_reset(frames, 150))
        # The connection lives on: a PING after the resets is answered, no GOAWAY comes.
        attacker.writer.write(PingFrame(0, opaque_data=b"still-on").serialize())
        got = await frames_until(attacker, lambda f: isinstance(f, PingFrame))
        assert not [frame for frame in got if isinstance(frame, GoAwayFrame)]
        await until_sampled(child, "proxy_requests_in_flight", 0)
    finally:
        await attacker.close()
    assert await child.sample("proxy_client_http2_errors_total", reason="rapid_reset") is None


@pytest.mark.parametrize("how", ["h2", "h2c"])
async def test_a_new_upstream_connection_opens_no_more_streams_than_the_origin_allows(
    child: Child, how: str
) -> None:
    """200 streams from two clients at once to an origin not yet dialled are all answered
    (hypercorn ends a whole connection at its 101st stream, even before its SETTINGS)."""
    origin = origin_of(child, how)
    clients = [await connect(child, how) for _ in range(2)]
    try:
        path = "/grpc?head_ms=500"
        sids = [
            (client, client.start(h2_client.get(origin.authority, path, scheme_of(how))))
            for client in clients
            for _ in range(LIMIT)
        ]
        answers = [await client.wait(sid) for client, sid in sids]
    finally:
        for client in clients:
            await client.close()
    assert [answer.status for answer in answers] == [200] * 2 * LIMIT, answers[-1].header(
        b"proxy-status"
    )


async def test_a_thousand_streams_within_the_advertised_limit_are_all_answered(
    child: Child,
) -> None:
    """1,000 streams on one connection, 100 at a time as advertised, are all answered with
    the proxy's memory bounded (printed)."""
    client = await connect(child, "h2")
    authority = child.tls.authority
    for _ in range(10):  # the proxy's SETTINGS: its stream limit comes in the second
        if client.h2.remote_settings.max_concurrent_streams == LIMIT:
            break
        await client.pump()
    assert client.h2.remote_settings.max_concurrent_streams == LIMIT
    before = rss_mb(child.process.pid)
    waiting, running, answered = 1000, set[int](), 0
    try:
        async with asyncio.timeout(120):
            while waiting or running:
                while waiting and len(running) < client.h2.remote_settings.max_concurrent_streams:
                    running.add(client.start(h2_client.get(authority, f"/echo/{waiting}")))
                    waiting -= 1
                await client.pump()
                done = running & client.ended
                answered += sum(client.answers.pop(sid).status == 200 for sid in done)
                running -= done
                assert not client.closed
    finally:
        await client.close()
    after = rss_mb(child.process.pid)
    print(f"1,000 streams on one connection: RSS {before:.1f} -> {after:.1f} MiB")
    assert answered == 1000
    assert after - before < RSS_GROWTH_CAP_MB
