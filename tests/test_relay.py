"""The tunnel relay's state machine, driven through transports that only record calls.

The socket-level behaviour is in test_tunnelling.py; these cover orderings a real
connection produces only by chance (upstream bytes before the 200, errors from write_eof).
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.wire.relay import Relay, Side


class RecordingTransport(asyncio.Transport):
    def __init__(self, eof_error: OSError | None = None) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.eof_sent = False
        self.ended: str | None = None  # "close" or "abort"
        self._eof_error = eof_error

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def write_eof(self) -> None:
        if self._eof_error is not None:
            raise self._eof_error
        self.eof_sent = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.ended = "close"

    def abort(self) -> None:
        self.ended = "abort"

    def is_closing(self) -> bool:
        return self.ended is not None


def relay_with(upstream: RecordingTransport) -> Relay:
    relay = Relay(idle_timeout=60)
    relay.attach_upstream(upstream)
    return relay


async def test_upstream_bytes_before_start_are_held_then_released() -> None:
    """What the upstream sends before the client is attached waits, with reading paused."""
    upstream, client = RecordingTransport(), RecordingTransport()
    relay = relay_with(upstream)
    relay.feed("upstream", b"220 banner\r\n")
    assert not upstream.reading
    relay.start(client)
    assert bytes(client.written) == b"220 banner\r\n"
    assert upstream.reading
    relay.close("shutdown")


async def test_upstream_eof_before_start_is_passed_on_after_the_held_bytes() -> None:
    """An upstream that speaks and half-closes before the 200 still gets both to the client."""
    upstream, client = RecordingTransport(), RecordingTransport()
    relay = relay_with(upstream)
    relay.feed("upstream", b"bye")
    relay.eof("upstream")
    relay.start(client)
    assert (bytes(client.written), client.eof_sent) == (b"bye", True)
    assert not upstream.reading  # nothing more to read after its EOF
    assert relay.closed_by == "upstream"
    relay.close("shutdown")


async def test_full_write_buffer_pauses_the_other_side() -> None:
    """A side whose buffer is full stops reads from the other side until it drains."""
    upstream, client = RecordingTransport(), RecordingTransport()
    relay = relay_with(upstream)
    relay.start(client)
    relay.writing_paused("client")
    assert (upstream.reading, client.reading) == (False, True)
    relay.writing_resumed("client")
    relay.writing_paused("upstream")
    assert (upstream.reading, client.reading) == (True, False)
    relay.close("shutdown")


async def test_a_side_after_its_eof_is_never_resumed() -> None:
    """Resuming a side that has sent its FIN would make the transport report EOF twice."""
    upstream, client = RecordingTransport(), RecordingTransport()
    relay = relay_with(upstream)
    relay.start(client)
    relay.writing_paused("upstream")
    relay.eof("client")
    relay.writing_resumed("upstream")
    assert not client.reading
    assert upstream.eof_sent
    relay.close("shutdown")


@pytest.mark.parametrize(("first", "second"), [("client", "upstream"), ("upstream", "client")])
async def test_both_eofs_end_the_relay_closed(first: Side, second: Side) -> None:
    """Two half-closes end the relay; closed_by names the first."""
    upstream, client = RecordingTransport(), RecordingTransport()
    relay = relay_with(upstream)
    relay.start(client)
    relay.eof(first)
    assert not relay.done.done()
    relay.eof(second)
    assert relay.done.done()
    assert (relay.outcome, relay.closed_by) == ("closed", first)
    assert (upstream.ended, client.ended) == ("close", "close")


async def test_reset_mid_stream_aborts_the_other_side() -> None:
    """A reset while both directions are open is a reset, passed on as an abort."""
    upstream, client = RecordingTransport(), RecordingTransport()
    relay = relay_with(upstream)
    relay.start(client)
    error = ConnectionResetError(104, "Connection reset by peer")
    relay.lost("upstream", error)
    assert (relay.outcome, relay.closed_by, relay.error) == ("reset", "upstream", error)
    assert client.ended == "abort"


async def test_peer_gone_during_write_eof_is_an_ordinary_close() -> None:
    """write_eof raising (the peer already reset) ends the relay instead of escaping."""
    upstream = RecordingTransport()
    client = RecordingTransport(eof_error=OSError(107, "Transport endpoint is not connected"))
    relay = relay_with(upstream)
    relay.start(client)
    relay.eof("upstream")
    assert (relay.outcome, relay.closed_by) == ("closed", "upstream")
    assert upstream.ended == "close"


async def test_nothing_is_relayed_after_the_end() -> None:
    """Bytes that arrive after the relay ended are neither written nor counted."""
    upstream, client = RecordingTransport(), RecordingTransport()
    relay = relay_with(upstream)
    relay.start(client)
    relay.feed("client", b"abc")
    relay.close("idle_timeout")
    relay.feed("client", b"late")
    assert (bytes(upstream.written), relay.received["client"]) == (b"abc", 3)
    assert (relay.outcome, upstream.ended, client.ended) == ("idle_timeout", "abort", "abort")


async def test_proxy_failure_aborts_both_sides_and_keeps_the_cause() -> None:
    """close("error", exc) aborts both connections and records why."""
    upstream, client = RecordingTransport(), RecordingTransport()
    relay = relay_with(upstream)
    relay.start(client)
    cause = RuntimeError("broken")
    relay.close("error", cause)
    assert (relay.outcome, relay.closed_by, relay.error) == ("error", "error", cause)
    assert (upstream.ended, client.ended) == ("abort", "abort")
