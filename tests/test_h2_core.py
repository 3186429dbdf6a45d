"""proxy.h2.core without sockets: a real h2 peer on the other side, bytes passed by hand."""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
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

from proxy.h2 import core
from proxy.h2.core import H2Core, Limits
from tests.h2_client import headers_frame

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"example.test"),
    (b":path", b"/pkg.Svc/Call"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


DEFAULT = Limits()


def pair(
    limits: Limits = DEFAULT, clock: Callable[[], float] | None = None
) -> tuple[H2Core, h2.connection.H2Connection]:
    """Our server core and an h2 client, prefaces exchanged."""
    server = H2Core(client_side=False, limits=limits, clock=clock or Clock())
    server.start()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server.receive(client.data_to_send())
    client.receive_data(server.outbound())
    server.receive(client.data_to_send())  # the SETTINGS ack
    return server, client


def raw_client(limits: Limits = DEFAULT, clock: Callable[[], float] | None = None) -> H2Core:
    """Our server core after a bare preface and empty SETTINGS: frames then come by hand."""
    server = H2Core(client_side=False, limits=limits, clock=clock or Clock())
    server.start()
    server.receive(core.PREFACE + SettingsFrame(0).serialize())
    return server


def test_request_response_and_trailers_pass_through() -> None:
    """A gRPC-shaped exchange: request head and body in, head, body and trailers out."""
    server, client = pair()
    client.send_headers(1, REQUEST)
    client.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    events = server.receive(client.data_to_send())
    assert events == [
        core.Head(1, REQUEST, False),
        core.Data(1, b"\x00\x00\x00\x00\x02hi"),
        core.End(1),
    ]
    server.send_head(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    assert server.send_body(1, memoryview(b"\x00\x00\x00\x00\x02ok")) == 7
    server.send_trailers(1, [(b"grpc-status", b"5"), (b"grpc-message", b"no such thing")])
    got = client.receive_data(server.outbound())
    kinds = [type(e) for e in got]
    assert kinds == [
        h2.events.ResponseReceived,
        h2.events.DataReceived,
        h2.events.TrailersReceived,
        h2.events.StreamEnded,
    ]
    trailers = got[2]
    assert isinstance(trailers, h2.events.TrailersReceived)
    assert trailers.headers == [(b"grpc-status", b"5"), (b"grpc-message", b"no such thing")]


def test_received_data_is_returned_only_when_acknowledged() -> None:
    """The client's window stays spent until the receiver says the bytes were passed on."""
    limits = Limits(stream_window=65_535, connection_window=65_535)
    server, client = pair(limits)
    client.send_headers(1, REQUEST)
    for _ in range(4):
        client.send_data(1, b"x" * 10_000)
    server.receive(client.data_to_send())
    client.receive_data(server.outbound())
    assert client.local_flow_control_window(1) == 65_535 - 40_000
    server.ack(1, 40_000)
    events = client.receive_data(server.outbound())
    assert any(isinstance(e, h2.events.WindowUpdated) for e in events)
    assert client.local_flow_control_window(1) == 65_535


def test_padding_is_returned_at_once() -> None:
    """Padding never reaches the receiver, so its window share comes back unasked."""
    server = raw_client(Limits(stream_window=65_535, connection_window=65_535))
    server.receive(headers_frame(1, end_stream=False))
    frame = DataFrame(1, data=b"abc", pad_length=100)
    frame.flags.add("PADDED")
    events = server.receive(frame.serialize())
    assert events == [core.Data(1, b"abc")]
    assert b"\x08" in server.outbound()  # a WINDOW_UPDATE frame (type 8) was queued


def test_send_body_stops_at_the_peer_window() -> None:
    """What does not fit the peer's window stays with the caller."""
    server, client = pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive(client.data_to_send())
    server.send_head(1, [(b":status", b"200")])
    assert server.send_body(1, memoryview(b"y" * 100_000)) == 65_535
    assert server.window(1) == 0


def test_send_on_a_reset_stream_raises_stream_gone() -> None:
    """A stream the peer reset cannot be written to; the error is a ConnectionResetError."""
    server, client = pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive(client.data_to_send())
    client.reset_stream(1, ErrorCodes.CANCEL)
    assert server.receive(client.data_to_send()) == [core.Reset(1, ErrorCodes.CANCEL)]
    with pytest.raises(ConnectionResetError):
        server.send_head(1, [(b":status", b"200")])


def test_frame_heads_split_across_reads_are_still_counted() -> None:
    """Fed one byte at a time, a PING flood is still seen."""
    clock = Clock()
    server = raw_client(clock=clock)
    flood = PingFrame(0, opaque_data=b"12345678").serialize() * 60
    for i in range(len(flood)):
        server.receive(flood[i : i + 1])
    assert server.error == "ping_flood"


def test_budgets_refill_with_time() -> None:
    """Within the refill rate a peer may ping for ever."""
    clock = Clock()
    server = raw_client(clock=clock)
    for _ in range(200):
        clock.now += 0.5
        server.receive(PingFrame(0, opaque_data=b"12345678").serialize())
    assert server.error is None


def _rapid_reset(count: int) -> bytes:
    out = b""
    for stream in range(1, 2 * count, 2):
        out += headers_frame(stream) + RstStreamFrame(stream, error_code=8).serialize()
    return out


def _empty_data(count: int) -> bytes:
    return headers_frame(1, end_stream=False) + DataFrame(1, data=b"").serialize() * count


def _settings(count: int) -> bytes:
    return SettingsFrame(0).serialize() * count


def _priority(count: int) -> bytes:
    return PriorityFrame(1, depends_on=0, stream_weight=1).serialize() * count


def _pings(count: int) -> bytes:
    return PingFrame(0, opaque_data=b"12345678").serialize() * count


@pytest.mark.parametrize(
    ("flood", "count", "reason"),
    [
        (_rapid_reset, 1000, "rapid_reset"),
        (_empty_data, 1000, "empty_data_flood"),
        (_settings, 1000, "settings_flood"),
        (_priority, 2000, "priority_flood"),
        (_pings, 1000, "ping_flood"),
    ],
)
def test_flood_ends_the_connection_with_enhance_your_calm(
    flood: Callable[[int], bytes], count: int, reason: str
) -> None:
    """Each flood stops at its budget: GOAWAY ENHANCE_YOUR_CALM, nothing after it read."""
    server = raw_client()
    server.outbound()
    events = server.receive(flood(count))
    assert server.error == reason
    heads = [e for e in events if isinstance(e, core.Head)]
    assert len(heads) <= 201  # rapid reset: no stream past the budget reached the caller
    assert goaway_code(server) == ErrorCodes.ENHANCE_YOUR_CALM
    assert server.receive(flood(1)) == []  # nothing more is read


def test_continuation_flood_is_cut_before_h2_buffers_it() -> None:
    """CONTINUATION frames past the block limit end the connection at the limit."""
    server = raw_client(Limits(max_header_block=8192))
    head = HeadersFrame(1, data=b"\x82")
    frames = head.serialize() + ContinuationFrame(1, data=b"\x00" * 1000).serialize() * 20
    assert server.receive(frames) == []
    assert server.error == "continuation_flood"


def test_too_many_continuation_frames_end_the_connection() -> None:
    """Empty CONTINUATION frames cost no bytes but are counted too."""
    server = raw_client()
    frames = HeadersFrame(1, data=b"\x82").serialize() + ContinuationFrame(1).serialize() * 100
    server.receive(frames)
    assert server.error == "continuation_flood"


def test_hpack_bomb_is_refused() -> None:
    """A small block that decodes past the header list limit: h2's refusal, counted here."""
    limits = Limits(max_header_list=4096)
    server, client = pair(limits)
    client.send_headers(1, [*REQUEST, (b"x-big", b"a" * 3000)])
    # One large entry into the dynamic table, then referenced over and over.
    client.send_headers(3, [*REQUEST, *([(b"x-big", b"a" * 3000)] * 8)], end_stream=True)
    server.receive(client.data_to_send())
    assert server.error == "hpack_bomb"


def test_too_many_streams_is_refused() -> None:
    """Past an acknowledged SETTINGS_MAX_CONCURRENT_STREAMS the connection ends, counted as
    too_many_streams (h2's connection error, as nghttp2's)."""
    server = raw_client(Limits(max_concurrent_streams=10))
    server.receive(SettingsFrame(0, flags=["ACK"]).serialize() * 2)  # both our SETTINGS
    opened = b"".join(headers_frame(stream, end_stream=False) for stream in range(1, 25, 2))
    server.receive(opened)
    assert server.error == "too_many_streams"
    assert goaway_code(server) == ErrorCodes.PROTOCOL_ERROR


def test_streams_past_a_limit_not_yet_acknowledged_are_refused() -> None:
    """A client that has not seen our limit yet gets REFUSED_STREAM for the streams past it
    (RFC 9113 §5.1.2), the connection lives; past the refusals' budget it ends."""
    server = raw_client(Limits(max_concurrent_streams=10))
    server.outbound()
    opened = b"".join(headers_frame(stream, end_stream=False) for stream in range(1, 25, 2))
    heads = [e for e in server.receive(opened) if isinstance(e, core.Head)]
    assert [head.stream_id for head in heads] == list(range(1, 21, 2))
    assert server.error is None
    refused = [f for f in _frames(server.outbound()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in refused] == [
        (21, ErrorCodes.REFUSED_STREAM),
        (23, ErrorCodes.REFUSED_STREAM),
    ]
    budget = int(core.REFUSALS.burst)
    flood = b"".join(headers_frame(s, end_stream=False) for s in range(25, 25 + 2 * budget, 2))
    server.receive(flood)
    assert server.error == "too_many_streams"
    assert goaway_code(server) == ErrorCodes.ENHANCE_YOUR_CALM


def test_reasons_are_a_bounded_set() -> None:
    """Every reason the core can give is listed once (they are metric labels)."""
    assert len(set(core.REASONS)) == len(core.REASONS)
    assert {"rapid_reset", "continuation_flood", "hpack_bomb", "ping_flood"} <= set(core.REASONS)


def goaway_code(server: H2Core) -> int:
    """The error code of the GOAWAY that ``server`` wrote last (it must be its last frame)."""
    goaway = _frames(server.outbound())[-1]
    assert isinstance(goaway, GoAwayFrame)
    return int(goaway.error_code)


def _frames(data: bytes) -> list[Frame]:
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


def test_graceful_goaway_keeps_streams_in_flight_and_refuses_new_ones() -> None:
    """After our GOAWAY the open stream still answers; a stream opened later is refused."""
    server, client = pair()
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive(client.data_to_send())
    server.go_away()
    events = client.receive_data(server.outbound())
    assert [type(e) for e in events] == [h2.events.ConnectionTerminated]
    assert isinstance(events[0], h2.events.ConnectionTerminated)
    assert events[0].last_stream_id == 1
    assert events[0].error_code == ErrorCodes.NO_ERROR
    late = raw_client()
    late.receive(headers_frame(1))
    late.go_away()
    assert late.receive(headers_frame(3)) == []  # refused: never reaches the caller
    assert isinstance(_frames(late.outbound())[-1], RstStreamFrame)
    server.send_head(1, [(b":status", b"200")], end=True)  # stream 1 is still served
    assert server.error is None


def origin_pair() -> tuple[H2Core, h2.connection.H2Connection]:
    """Our client core and an h2 server (an origin), prefaces exchanged, stream 1 answered."""
    client = H2Core(client_side=True, clock=Clock())
    client.start()
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.initiate_connection()
    server.receive_data(client.outbound())
    client.receive(server.data_to_send())
    server.receive_data(client.outbound())  # the SETTINGS ack
    client.send_head(1, REQUEST, end=True)
    server.receive_data(client.outbound())
    server.send_headers(1, [(b":status", b"200")])
    return client, server


def goaway(last: int, *, stream: int = 0, length: int = 8) -> bytes:
    """A GOAWAY (NO_ERROR) written by hand: it may break the rules hyperframe keeps."""
    payload = (last.to_bytes(4, "big") + bytes(4))[:length]
    head = length.to_bytes(3, "big") + bytes([core.GOAWAY, 0]) + stream.to_bytes(4, "big")
    return head + payload


@pytest.mark.parametrize("cut", [None, 1, 5, 9, 12])
def test_origin_goaway_ends_the_state_machine(cut: int | None) -> None:
    """A graceful GOAWAY naming stream 1, then the rest of stream 1: the data and trailers
    still come through (RFC 9113 §6.8), with or without the GOAWAY split across reads."""
    client, server = origin_pair()
    server.send_data(1, b"before ")
    wire = server.data_to_send() + goaway(1)
    server.send_data(1, b"after")
    server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    wire += server.data_to_send()
    at = len(wire) if cut is None else wire.index(goaway(1)) + cut
    events = client.receive(wire[:at]) + client.receive(wire[at:])
    assert [e for e in events if not isinstance(e, core.Window)] == [
        core.Head(1, [(b":status", b"200")], False),
        core.Data(1, b"before "),
        core.GoneAway(1, ErrorCodes.NO_ERROR),
        core.Data(1, b"after"),
        core.Trailers(1, [(b"grpc-status", b"0")]),
        core.End(1),
    ]
    assert client.going_away
    assert not client.can_open()
    assert client.error is None


@pytest.mark.parametrize(
    "bad",
    [
        goaway(1, stream=1),  # GOAWAY belongs to the connection (stream 0)
        goaway(1, length=4),  # too short to say anything (RFC 9113 §6.8: 8 bytes at least)
    ],
    ids=["on_a_stream", "short"],
)
def test_malformed_goaway_is_a_protocol_error(bad: bytes) -> None:
    """A GOAWAY the core does not act on goes to h2, which ends the connection for it."""
    client, server = origin_pair()
    assert client.receive(server.data_to_send() + bad)[:1] == []
    assert client.error == "protocol_error"


def test_goaway_inside_a_header_block_is_a_protocol_error() -> None:
    """Between HEADERS and its CONTINUATION nothing else may come (RFC 9113 §6.10)."""
    server = raw_client()
    frame = HeadersFrame(1, data=b"\x82\x84")
    frame.flags.add("END_STREAM")
    server.receive(frame.serialize() + goaway(0))
    assert server.error == "protocol_error"


def test_one_stream_until_the_peer_states_its_limit() -> None:
    """Before the origin's first SETTINGS a client core opens one stream (h2 alone would
    assume no limit); after it, the origin's SETTINGS_MAX_CONCURRENT_STREAMS."""
    client = H2Core(client_side=True, clock=Clock())
    client.start()
    assert client.can_open()
    client.send_head(client.next_stream_id(), REQUEST, end=True)
    assert not client.can_open()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2}
    )
    server.initiate_connection()
    client.receive(server.data_to_send())
    assert client.can_open()
    client.send_head(client.next_stream_id(), REQUEST, end=True)
    assert not client.can_open()
