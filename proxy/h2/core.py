"""HTTP/2 without I/O: h2's connection state, our own events, and the defences h2 leaves to us.

Both ends of the proxy use it: towards a client (server side) and towards an origin (client
side). Bytes and a clock go in, events and bytes come out; the asyncio protocols
(``proxy.h2.server``, ``proxy.h2.upstream``) move the bytes.

h2 (python-hyper) keeps the stream states, HPACK and the flow-control windows. What it does
not bound by itself (measured: 20,000 HEADERS+RST_STREAM pairs gave 20,000 events; 100,000
PINGs queued 1.7 MB of ACKs) is bounded here, before a frame reaches it:

- each frame kind that costs work but carries no request draws from a token bucket (rapid
  reset, CVE-2023-44487; the PING, SETTINGS, PRIORITY and empty-frame floods,
  CVE-2019-9512/9515/9513/9518);
- a header block (HEADERS plus its CONTINUATION frames, RFC 9113 §6.10) is capped in bytes
  and in frames (the CONTINUATION flood), before h2 buffers it.

A peer over a budget gets GOAWAY ENHANCE_YOUR_CALM (RFC 9113 §5.4.1, §7) and the connection
ends; ``error`` then names the reason it is counted under. h2's own refusals (too many
streams, an HPACK bomb, any protocol error) end the connection the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

Fields = Sequence[tuple[bytes, bytes]]

# RFC 9113 §6: frame types, and the flags read here.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
_END_STREAM: Final = 0x1  # DATA, HEADERS
_ACK: Final = 0x1  # SETTINGS, PING
_END_HEADERS: Final = 0x4  # HEADERS, PUSH_PROMISE, CONTINUATION
_FRAME_HEAD: Final = 9  # RFC 9113 §4.1: length (3), type, flags, stream identifier (4)
_STREAM_ID: Final = 0x7FFF_FFFF  # a stream identifier is 31 bits after a reserved bit
_NO_GOAWAY: Final = _STREAM_ID  # our last_stream_id until we send a GOAWAY
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4


@dataclass(frozen=True, slots=True)
class Limits:
    """What one HTTP/2 connection may hold; the receive windows bound the buffered bodies."""

    max_concurrent_streams: int = 100  # advertised (RFC 9113 §6.5.2); h2 refuses the 101st
    stream_window: int = 256 * 1024  # body bytes one stream may have unread, at most
    connection_window: int = 1024 * 1024  # the same for all streams of a connection together
    max_header_list: int = 64 * 1024  # decoded field section (SETTINGS_MAX_HEADER_LIST_SIZE)
    max_header_block: int = 64 * 1024  # encoded: HEADERS plus CONTINUATION payloads
    max_header_frames: int = 32  # HEADERS plus CONTINUATION frames of one block


@dataclass(frozen=True, slots=True)
class Budget:
    """A token bucket: ``burst`` frames at once, refilled at ``per_second``."""

    reason: str  # the label the connection is counted under when it runs dry
    burst: float
    per_second: float


def _always(flags: int, length: int) -> bool:
    return True


def _not_ack(flags: int, length: int) -> bool:
    return not flags & _ACK


def _empty_not_last(flags: int, length: int) -> bool:
    return length == 0 and not flags & _END_STREAM


# Frame type -> (its budget, which of its frames are charged). Generous for real clients:
# a gRPC client cancelling a hundred calls a second stays within rapid_reset.
BUDGETS: Final[dict[int, tuple[Budget, Callable[[int, int], bool]]]] = {
    RST_STREAM: (Budget("rapid_reset", 200, 100), _always),
    PING: (Budget("ping_flood", 50, 10), _not_ack),
    SETTINGS: (Budget("settings_flood", 50, 10), _not_ack),
    PRIORITY: (Budget("priority_flood", 500, 200), _always),
    DATA: (Budget("empty_data_flood", 200, 100), _empty_not_last),
}
CONTINUATION_FLOOD: Final = "continuation_flood"
# Streams past SETTINGS_MAX_CONCURRENT_STREAMS before the client has acknowledged it are
# refused (REFUSED_STREAM, RFC 9113 §5.1.2: it may not have seen the limit yet). Each costs a
# header block decoded and a RST_STREAM written, as a rapid reset does: past this budget the
# connection ends. After the acknowledgement, h2 ends it at the first one (too_many_streams).
REFUSALS: Final = Budget("too_many_streams", 200, 100)

# h2's refusals -> reason; the first matching class wins (subclasses first).
_H2_ERRORS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (h2.exceptions.TooManyStreamsError, "too_many_streams"),
    (h2.exceptions.DenialOfServiceError, "hpack_bomb"),
    (h2.exceptions.FlowControlError, "flow_control"),
    (h2.exceptions.ProtocolError, "protocol_error"),
)
# Every reason a connection can be closed for by the core (bounded: metric labels).
REASONS: Final = (
    *(budget.reason for budget, _ in BUDGETS.values()),
    CONTINUATION_FLOOD,
    *(reason for _, reason in _H2_ERRORS),  # too_many_streams: REFUSALS' reason too
)


# -- events: what the protocols act on -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    """A request's (server side) or final response's (client side) header section."""

    stream_id: int
    fields: Fields
    end: bool  # no body follows


@dataclass(frozen=True, slots=True)
class Interim:
    """A 1xx response (client side, RFC 9113 §8.1)."""

    stream_id: int
    fields: Fields


@dataclass(frozen=True, slots=True)
class Trailers:
    stream_id: int
    fields: Fields


@dataclass(frozen=True, slots=True)
class Data:
    """Body bytes; the receiver acknowledges them (``H2Core.ack``) once it has passed them on."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Window:
    """More may be sent: on ``stream_id``, or on every stream when it is 0."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class GoneAway:
    """The peer sent GOAWAY: streams above ``last_stream_id`` were not processed (§6.8)."""

    last_stream_id: int
    code: int


Event = Head | Interim | Trailers | Data | End | Reset | Window | GoneAway


class StreamGone(ConnectionResetError):
    """The stream was reset or its connection ended: nothing more can be sent on it."""


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, budget: Budget, now: float) -> None:
        self.tokens = budget.burst
        self.at = now

    def take(self, budget: Budget, now: float) -> bool:
        self.tokens = min(budget.burst, self.tokens + (now - self.at) * budget.per_second)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class H2Core:
    """One HTTP/2 connection's state; ``receive`` bytes, send through the methods, flush
    ``outbound()``. After ``error`` is set, a GOAWAY is queued and nothing more is read."""

    def __init__(
        self,
        *,
        client_side: bool,
        limits: Limits = Limits(),
        clock: Callable[[], float] = monotonic,
    ) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,  # bytes in and out: fields are relayed byte for byte
        )
        self._h2 = h2.connection.H2Connection(config)
        self.client_side = client_side
        self.limits = limits
        self._clock = clock
        self.error: str | None = None  # why the connection was ended, once it was
        self.going_away = False  # GOAWAY sent or received: no new streams
        self._settled = False  # the peer's first SETTINGS has come
        self._last_stream_id = _NO_GOAWAY  # streams above it were opened after our GOAWAY
        self._extra = b""  # frames written by hand, and what h2 had queued before them
        self._buckets: dict[Budget, _Bucket] = {}
        self._refused: str | None = None  # set when refusals ran out of their budget
        # Frame scanning state (RFC 9113 §4.1): bytes of the current frame still to pass,
        # a frame head (or a GOAWAY) split across reads, the header block being counted.
        self._skip = 0 if client_side else len(PREFACE)
        self._held = b""
        self._block_bytes = 0
        self._block_frames = 0
        self._in_block = False  # a HEADERS without END_HEADERS: CONTINUATION must follow

    def start(self) -> None:
        """Queue the connection preface (RFC 9113 §3.4) with our settings and windows."""
        h2c = self._h2
        limits = self.limits
        h2c.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Given as initial values, these are in force before the peer acknowledges them, and
        # h2 only copies an acknowledged change to its decoder: the HPACK limit is set here.
        h2c.decoder.max_header_list_size = limits.max_header_list
        h2c.initiate_connection()
        # The stream limit in a SETTINGS frame of its own: h2 enforces it (with a connection
        # error) only once the peer has acknowledged it; until then ``_past_limit`` refuses
        # the streams past it.
        h2c.update_settings(
            {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams}
        )
        # The connection window starts at 65,535 whatever the settings (RFC 9113 §6.9.2).
        extra = limits.connection_window - 65_535
        if extra > 0:
            h2c.increment_flow_control_window(extra)

    # -- input -------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """The events ``data`` carries; past a budget, those before the offending frame.

        A GOAWAY is taken out before h2 sees it and becomes our ``GoneAway``: h2 ends its
        state machine on any GOAWAY (h2/connection.py: RECV_GOAWAY leads to CLOSED, where
        every later frame is a ProtocolError), so the streams the peer promised to finish
        (RFC 9113 §6.8) could not.
        """
        if self.error is not None:
            return []
        pieces, over = self._scan(data)
        events: list[Event] = []
        for piece in pieces:
            if isinstance(piece, GoneAway):
                self.going_away = True
                events.append(piece)
                continue
            try:
                raw = self._h2.receive_data(piece) if piece else []
            except h2.exceptions.ProtocolError as exc:  # h2 has queued its GOAWAY
                self._ended(next(reason for cls, reason in _H2_ERRORS if isinstance(exc, cls)))
                return []
            ours = [e for e in map(self._event, raw) if e is not None]
            refused = self._past_limit(raw)
            if refused:
                ours = [e for e in ours if getattr(e, "stream_id", 0) not in refused]
            events += ours
        reason = over if over is not None else self._refused
        if reason is not None:
            self._calm(reason)
        return events

    def _scan(self, data: bytes) -> tuple[list[bytes | GoneAway], str | None]:
        """Charge every frame that starts in ``data`` and take the GOAWAYs out.

        Returns, in their order, the bytes h2 gets (up to the first frame over a budget, and
        no further than the last whole frame head: a head split across reads is held until
        its end comes) and the GOAWAYs between them; and the reason of the frame over a
        budget, if one was.
        """
        view = self._held + data if self._held else data
        self._held = b""
        size = len(view)
        pos = self._skip  # the first frame head: after the rest of a frame begun earlier
        pieces: list[bytes | GoneAway] = []
        start = 0  # view[start:pos] goes to h2 after the pieces
        over: str | None = None
        now = -1.0
        while pos + _FRAME_HEAD <= size:
            length = int.from_bytes(view[pos : pos + 3])
            kind, flags = view[pos + 3], view[pos + 4]
            end = pos + _FRAME_HEAD + length
            if kind == GOAWAY and self._graceful(view, pos, length):
                if end > size:
                    break  # held, with what follows, until its payload is whole
                payload = view[pos + _FRAME_HEAD : end]
                last = int.from_bytes(payload[:4]) & _STREAM_ID
                pieces += (view[start:pos], GoneAway(last, int.from_bytes(payload[4:8])))
                start = pos = end
                continue
            if kind in (HEADERS, PUSH_PROMISE, CONTINUATION):
                if kind == CONTINUATION:
                    self._block_bytes += length
                    self._block_frames += 1
                else:
                    self._block_bytes, self._block_frames = length, 1
                self._in_block = not flags & _END_HEADERS
                if (
                    self._block_bytes > self.limits.max_header_block
                    or self._block_frames > self.limits.max_header_frames
                ):
                    over = CONTINUATION_FLOOD
                    break
            else:
                rule = BUDGETS.get(kind)
                if rule is not None and rule[1](flags, length):
                    if now < 0.0:
                        now = self._clock()
                    if not self._take(rule[0], now):
                        over = rule[0].reason
                        break
            pos = end
        if over is None and pos < size:
            self._held = view[pos:]  # a frame head (or a GOAWAY) not yet whole
        self._skip = max(pos - size, 0)
        pieces.append(view[start : min(pos, size)])
        return pieces, over

    def _graceful(self, view: bytes, pos: int, length: int) -> bool:
        """A GOAWAY we act on ourselves (RFC 9113 §6.8): on stream 0, of a valid size, not
        inside a header block. h2 gets any other, and ends the connection for it."""
        stream = int.from_bytes(view[pos + 5 : pos + _FRAME_HEAD]) & _STREAM_ID
        return stream == 0 and 8 <= length <= self._h2.max_inbound_frame_size and not self._in_block

    def _take(self, budget: Budget, now: float) -> bool:
        bucket = self._buckets.get(budget)
        if bucket is None:
            bucket = self._buckets[budget] = _Bucket(budget, now)
        return bucket.take(budget, now)

    def _event(self, e: h2.events.Event) -> Event | None:
        """Our event for h2's, None for what needs no action (h2 answers PINGs itself)."""
        sid = getattr(e, "stream_id", None) or 0
        if sid > self._last_stream_id:  # opened after our GOAWAY: refused, never seen
            if isinstance(e, h2.events.RequestReceived):
                self.reset(sid, ErrorCodes.REFUSED_STREAM)
            return None
        if isinstance(e, h2.events.DataReceived):
            data = e.data or b""
            padding = (e.flow_controlled_length or 0) - len(data)
            if padding:
                self.ack(sid, padding)  # padding is never passed on: return it at once
            return Data(sid, data) if data else None
        if isinstance(e, h2.events.RemoteSettingsChanged):
            self._settled = True
            return Window(0)  # settings may change every window, or the stream limit
        if isinstance(e, h2.events.WindowUpdated):
            return Window(sid)
        if isinstance(e, h2.events.StreamEnded):
            return End(sid)
        if isinstance(e, h2.events.RequestReceived | h2.events.ResponseReceived):
            return Head(sid, _fields(e.headers), e.stream_ended is not None)
        if isinstance(e, h2.events.TrailersReceived):
            return Trailers(sid, _fields(e.headers))
        if isinstance(e, h2.events.InformationalResponseReceived):
            return Interim(sid, _fields(e.headers))
        if isinstance(e, h2.events.StreamReset):
            return Reset(sid, int(e.error_code or 0))
        return None

    def _past_limit(self, raw: list[h2.events.Event]) -> set[int]:
        """Refuse the streams opened in this read that are past the stream limit, newest
        first (``REFUSALS``; only until the client has acknowledged it: after, h2 ends the
        connection at the first). h2 has read the whole piece by now, so its open count is
        the one after it."""
        opened = [e.stream_id for e in raw if isinstance(e, h2.events.RequestReceived)]
        if not opened:
            return set()
        h2c = self._h2
        excess = h2c.open_inbound_streams - self.limits.max_concurrent_streams
        if excess <= 0:
            return set()
        # After open_inbound_streams, h2 holds only the streams still open: a stream the
        # client opened and reset in this read takes no place.
        refused = [sid for sid in opened if sid in h2c.streams][-excess:]
        for sid in refused:
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            if not self._take(REFUSALS, self._clock()):
                self._refused = REFUSALS.reason
        return set(refused)

    def _ended(self, reason: str) -> None:
        self.error = reason
        self.going_away = True

    # -- output ------------------------------------------------------------------------

    def outbound(self) -> bytes:
        """What to write to the transport now."""
        data = self._h2.data_to_send()
        if self._extra:
            data, self._extra = self._extra + data, b""
        return data

    def next_stream_id(self) -> int:
        return self._h2.get_next_available_stream_id()

    def can_open(self) -> bool:
        """Client side: the peer's SETTINGS_MAX_CONCURRENT_STREAMS allows one more stream.

        Until the peer's first SETTINGS has come, one stream: h2 would assume no limit, and a
        peer allowing fewer than we open would refuse streams (RFC 9113 §5.1.2).
        """
        h2c = self._h2
        most = h2c.remote_settings.max_concurrent_streams if self._settled else 1
        return not self.going_away and h2c.open_outbound_streams < most

    @property
    def open_streams(self) -> int:
        h2c = self._h2
        return h2c.open_inbound_streams + h2c.open_outbound_streams

    @property
    def highest_stream_id(self) -> int:
        """The highest stream the peer opened (server side: what a GOAWAY would name)."""
        return self._h2.highest_inbound_stream_id

    def send_head(self, stream_id: int, fields: Fields, *, end: bool = False) -> None:
        self._guarded(lambda: self._h2.send_headers(stream_id, list(fields), end_stream=end))

    def send_trailers(self, stream_id: int, fields: Fields) -> None:
        """Trailers end the stream (RFC 9113 §8.1)."""
        self.send_head(stream_id, fields, end=True)

    def send_body(self, stream_id: int, data: memoryview, *, end: bool = False) -> int:
        """Send as much of ``data`` as the windows allow; how many bytes went.

        With ``end``, the stream ends on the frame that carries the last byte (or at once,
        for no bytes).
        """
        h2c = self._h2
        sent = 0
        size = len(data)
        try:
            while True:
                room = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
                piece = min(room, size - sent)
                last = end and sent + piece == size
                if piece <= 0 and not last:
                    return sent
                h2c.send_data(stream_id, data[sent : sent + piece], end_stream=last)
                sent += piece
                if sent == size and (last or not end):
                    return sent
        except h2.exceptions.ProtocolError as exc:  # StreamClosedError is one of them
            raise StreamGone(f"stream {stream_id} closed") from exc

    def window(self, stream_id: int) -> int:
        """Bytes that may be sent on ``stream_id`` now; 0 for a stream that is gone."""
        try:
            return self._h2.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:
            return 0

    def end(self, stream_id: int) -> None:
        self._guarded(lambda: self._h2.end_stream(stream_id))

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM, unless the stream is already closed (then nothing is owed)."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, code)

    def ack(self, stream_id: int, size: int) -> None:
        """``size`` body bytes of ``stream_id`` were passed on: the peer may send as many more."""
        if size and self.error is None:
            # A closing connection's windows no longer matter.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.acknowledge_received_data(size, stream_id)

    def go_away(self) -> None:
        """A graceful GOAWAY (RFC 9113 §6.8): the streams the peer opened so far are still
        served, later ones are refused (REFUSED_STREAM: the client may retry them elsewhere).

        Written by hand: h2's ``close_connection`` ends its state machine, after which not
        even the streams in flight could send another frame.
        """
        if self._last_stream_id != _NO_GOAWAY:
            return
        self.going_away = True
        self._last_stream_id = self._h2.highest_inbound_stream_id
        # After what h2 has queued so far, before anything it queues later.
        self._extra += (
            self._h2.data_to_send()
            + GoAwayFrame(
                0, last_stream_id=self._last_stream_id, error_code=ErrorCodes.NO_ERROR
            ).serialize()
        )

    def _calm(self, reason: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM: a peer over a budget is cut off (RFC 9113 §5.4.1)."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._ended(reason)

    def _guarded(self, send: Callable[[], None]) -> None:
        try:
            send()
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(str(exc)) from exc

    def __repr__(self) -> str:
        side = "client" if self.client_side else "server"
        return f"<H2Core {side} streams={self.open_streams} error={self.error}>"


def _fields(headers: object) -> Fields:
    # With header_encoding=None, h2 hands out (bytes, bytes) tuples: no copy needed.
    return cast(Fields, headers)
