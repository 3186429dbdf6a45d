"""TLS timed from a tunnel's bytes: real TLS 1.2 and 1.3 conversations (memory BIOs), read
in the orders and pieces the facts note captured, each read given the time a relay would."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import pairwise

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from proxy.rules.tls_hello import ALERT, APPLICATION_DATA, HANDSHAKE
from proxy.rules.tls_timing import (
    FIRST_BYTES_KEPT,
    TicketRule,
    TunnelTls,
    sni_differs,
)
from tests.tls import MemoryPeers

GET = b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n"
TLS12 = ssl.TLSVersion.TLSv1_2


def ok(size: int = 2) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size


@dataclass(frozen=True)
class Read:
    side: str  # "client" or "upstream", as the relay names them
    data: bytes
    at: float  # seconds


def read_through(reads: Sequence[Read], step: int = 0) -> tuple[TunnelTls, list[float]]:
    """Feed ``reads`` (each cut into ``step``-byte pieces, if given), then end the tunnel."""
    heard: list[float] = []
    tls = TunnelTls(heard.append)
    for read in reads:
        size = step or len(read.data) or 1
        for at in range(0, len(read.data), size):
            tls(read.side, read.data[at : at + size], read.at)
    tls.finish()
    return tls, heard


def records(data: bytes) -> list[bytes]:
    """``data`` cut at its record boundaries."""
    out = []
    at = 0
    while at < len(data):
        end = at + 5 + int.from_bytes(data[at + 3 : at + 5], "big")
        out.append(data[at:end])
        at = end
    return out


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


# -- TLS 1.3: the handshake and the first response ------------------------------------------


def tls13(
    ca: trustme.CA, order: str, *, tickets: int | None = None, response: bytes = ok()
) -> list[Read]:
    """One request on a TLS 1.3 connection whose origin answers the ClientHello after 300 ms
    and the request after 200 ms; ``order`` places the tickets as the facts note saw them."""
    peers = MemoryPeers(ca, client_alpn=["http/1.1"], tickets=tickets)
    flights = peers.handshake()
    hello, server_flight, finished = (data for _, data in flights[:3])
    ticket_records = records(flights[3][1]) if len(flights) > 3 else []
    request = peers.send("client", GET)
    peers.read("upstream")
    answer = peers.send("upstream", response)
    reads = [Read("client", hello, 1.0), Read("upstream", server_flight, 1.3)]
    if order == "tickets_first":  # requests, httpx: tickets cross before the request
        reads += [
            Read("client", finished, 1.301),
            Read("upstream", b"".join(ticket_records), 1.302),
        ]
        reads += [Read("client", request, 1.303)]
    elif order == "request_first":  # curl: the request crosses before the tickets
        reads += [Read("client", finished, 1.301), Read("client", request, 1.303)]
        reads += [Read("upstream", b"".join(ticket_records), 1.304)]
    elif order == "one_read":  # Node: Finished and request in one segment
        reads += [Read("client", finished + request, 1.303)]
        reads += [Read("upstream", b"".join(ticket_records), 1.304)]
    elif order == "split":  # requests to nginx: one ticket before the request, one after
        reads += [Read("client", finished, 1.301), Read("upstream", ticket_records[0], 1.302)]
        reads += [Read("client", request, 1.303), Read("upstream", ticket_records[1], 1.304)]
    elif order == "nagle":  # the second ticket held back 45 ms behind a delayed ACK
        reads += [Read("client", finished, 1.301), Read("upstream", ticket_records[0], 1.302)]
        reads += [Read("client", request, 1.303), Read("upstream", ticket_records[1], 1.348)]
    elif order == "with_the_response":  # tickets and response in one read
        reads += [Read("client", finished, 1.301), Read("client", request, 1.303)]
        return [*reads, Read("upstream", b"".join(ticket_records) + answer, 1.503)]
    else:
        raise AssertionError(order)
    return [*reads, Read("upstream", answer, 1.503)]


ORDERS = ["tickets_first", "request_first", "one_read", "split", "nagle", "with_the_response"]


@pytest.mark.parametrize("step", [0, 1, 3, 517])
@pytest.mark.parametrize("order", ORDERS)
def test_tls13_handshake_and_first_response(ca: trustme.CA, order: str, step: int) -> None:
    """Wherever the tickets fall, and however the reads are cut: 300 ms, then 200 ms."""
    tls, heard = read_through(tls13(ca, order), step)
    assert tls.version == "TLSv1.3"
    assert tls.client_hello is not None
    assert (tls.client_hello.sni, tls.client_hello.alpn) == ("api.test", ("http/1.1",))
    assert tls.handshake == pytest.approx(0.3)
    assert tls.exchanges == 1
    assert tls.ttfb == pytest.approx(0.2)
    assert heard == [pytest.approx(0.2)]
    assert tls.stopped == "finished"


@pytest.mark.parametrize(
    ("tickets", "response"),
    [
        (0, ok()),  # no tickets: the first record after the request
        (0, ok(300)),  # no tickets, a response as long as a ticket: nothing follows it
        (1, ok(1000)),  # a ticket, then a response longer than any ticket
    ],
    ids=["none", "none_ticket_sized_response", "one_then_long_response"],
)
def test_tls13_first_response_with_other_ticket_counts(
    ca: trustme.CA, tickets: int, response: bytes
) -> None:
    """Rule R1 holds with no ticket or one ticket, whatever the response's size."""
    tls, _ = read_through(tls13(ca, "request_first", tickets=tickets, response=response))
    assert tls.ttfb == pytest.approx(0.2)


def test_tls13_response_as_long_as_the_tickets_is_not_reported(ca: trustme.CA) -> None:
    """A response the length of the tickets, after a ticket came before the request: unknown."""
    peers = MemoryPeers(ca, client_alpn=["http/1.1"])
    flights = peers.handshake()
    tickets = records(flights[3][1])
    request = peers.send("client", GET)
    ticket_length = len(tickets[0])
    # A head and body whose record (5 B header, inner type byte, 16 B tag) is a ticket's size.
    size = next(n for n in range(1000) if 5 + len(ok(n)) + 1 + 16 == ticket_length)
    answer = peers.send("upstream", ok(size))
    assert len(answer) == ticket_length
    reads = [Read(side, data, 1.0 + i / 1000) for i, (side, data) in enumerate(flights[:3])]
    reads += [Read("upstream", tickets[0], 1.004), Read("client", request, 1.005)]
    reads += [Read("upstream", tickets[1], 1.006), Read("upstream", answer, 1.205)]
    tls, heard = read_through(reads)
    assert (tls.exchanges, tls.first_bytes, heard) == (1, [None], [])


@pytest.mark.parametrize(
    ("alpn", "server_alpn"),
    [(["h2", "http/1.1"], ["h2", "http/1.1"]), (["h2"], ["h2"]), (["spdy/3"], None)],
)
def test_tls13_no_exchanges_when_the_client_may_speak_another_protocol(
    ca: trustme.CA, alpn: list[str], server_alpn: list[str] | None
) -> None:
    """An offer beyond http/1.1 (HTTP/2's SETTINGS would pass for a response): handshake only."""
    peers = MemoryPeers(ca, client_alpn=alpn, server_alpn=server_alpn)
    reads = [Read(side, data, 1.0 + i * 0.1) for i, (side, data) in enumerate(peers.handshake())]
    reads.append(Read("client", peers.send("client", GET), 2.0))
    reads.append(Read("upstream", peers.send("upstream", ok()), 2.2))
    tls, heard = read_through(reads)
    assert tls.handshake == pytest.approx(0.1)
    assert (tls.counting, tls.exchanges, heard, tls.stopped) == (False, 0, [], "unpaired")


# -- TLS 1.2 ---------------------------------------------------------------------------------


def tls12(
    ca: trustme.CA, client_alpn: list[str] | None, server_alpn: list[str] | None
) -> list[Read]:
    peers = MemoryPeers(ca, maximum=TLS12, client_alpn=client_alpn, server_alpn=server_alpn)
    flights = peers.handshake()
    reads = [
        Read(side, data, [1.0, 1.3, 1.301, 1.302][i]) for i, (side, data) in enumerate(flights)
    ]
    reads.append(Read("client", peers.send("client", GET), 1.303))
    peers.read("upstream")
    return [*reads, Read("upstream", peers.send("upstream", ok()), 1.503)]


@pytest.mark.parametrize(
    ("client_alpn", "server_alpn", "alpn", "ttfb"),
    [
        (None, None, None, 0.2),
        (["http/1.1"], ["http/1.1"], "http/1.1", 0.2),
        (["h2", "http/1.1"], ["http/1.1"], "http/1.1", 0.2),  # the choice is in the clear
        (["h2", "http/1.1"], ["h2"], "h2", None),
    ],
)
def test_tls12_handshake_first_response_and_chosen_alpn(
    ca: trustme.CA,
    client_alpn: list[str] | None,
    server_alpn: list[str] | None,
    alpn: str | None,
    ttfb: float | None,
) -> None:
    """TLS 1.2 shows the chosen protocol; for HTTP/1.1 the first response is exact."""
    tls, _ = read_through(tls12(ca, client_alpn, server_alpn))
    assert tls.version == "TLSv1.2"
    assert tls.server_hello is not None
    assert tls.server_hello.alpn == alpn
    assert tls.handshake == pytest.approx(0.3)
    assert tls.ttfb == (pytest.approx(ttfb) if ttfb is not None else None)


# -- exchanges on a kept-alive connection ----------------------------------------------------


@pytest.mark.parametrize("maximum", [TLS12, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("step", [0, 2])
def test_five_requests_on_one_connection_are_five_exchanges(
    ca: trustme.CA, maximum: ssl.TLSVersion, step: int
) -> None:
    """Each request, answered 100 ms later, is one exchange with its own first byte."""
    peers = MemoryPeers(ca, maximum=maximum, client_alpn=["http/1.1"])
    reads = [Read(side, data, 1.0 + i / 1000) for i, (side, data) in enumerate(peers.handshake())]
    for n in range(5):
        start = 2.0 + n
        reads.append(Read("client", peers.send("client", GET), start))
        peers.read("upstream")
        reads.append(Read("upstream", peers.send("upstream", ok(n * 500)), start + 0.1))
        peers.read("client")
    tls, heard = read_through(reads, step)
    assert (tls.counting, tls.exchanges) == (True, 5)
    assert tls.first_bytes == [pytest.approx(0.1)] * 5
    assert heard == [pytest.approx(0.1)] * 5


def test_only_the_first_exchanges_are_kept_for_the_log(ca: trustme.CA) -> None:
    """The line keeps FIRST_BYTES_KEPT first bytes; the count and the histogram get them all."""
    peers = MemoryPeers(ca, maximum=TLS12)
    reads = [Read(side, data, 0.0) for side, data in peers.handshake()]
    for n in range(FIRST_BYTES_KEPT + 3):
        reads.append(Read("client", peers.send("client", GET), 1.0 + n))
        reads.append(Read("upstream", peers.send("upstream", ok()), 1.05 + n))
    tls, heard = read_through(reads)
    assert tls.exchanges == len(heard) == FIRST_BYTES_KEPT + 3
    assert len(tls.first_bytes) == FIRST_BYTES_KEPT


def test_a_request_without_an_answer_is_an_exchange_without_a_first_byte(ca: trustme.CA) -> None:
    """The tunnel ended while the origin was still working: counted, not timed."""
    peers = MemoryPeers(ca, maximum=TLS12)
    reads = [Read(side, data, 0.0) for side, data in peers.handshake()]
    reads.append(Read("client", peers.send("client", GET), 1.0))
    tls, heard = read_through(reads)
    assert (tls.exchanges, tls.first_bytes, heard) == (1, [None], [])


def test_close_notify_is_not_a_request(ca: trustme.CA) -> None:
    """TLS 1.3 alerts are application-data records too; the client's close_notify, and the
    origin's answer to it, are not one more exchange."""
    peers = MemoryPeers(ca, client_alpn=["http/1.1"], tickets=0)
    reads = [Read(side, data, 1.0 + i / 1000) for i, (side, data) in enumerate(peers.handshake())]
    reads.append(Read("client", peers.send("client", GET), 2.0))
    peers.read("upstream")
    reads.append(Read("upstream", peers.send("upstream", ok()), 2.2))
    peers.read("client")
    reads.append(Read("client", peers.close("client"), 2.3))
    reads.append(Read("upstream", peers.close("upstream"), 2.301))
    tls, _ = read_through(reads)
    assert tls.exchanges == 1
    assert tls.first_bytes == [pytest.approx(0.2)]


# -- the handshake: retries, failures, and what is not TLS ------------------------------------


def test_hello_retry_is_timed_from_the_second_client_hello(ca: trustme.CA) -> None:
    """After a HelloRetryRequest the handshake runs from the second ClientHello (RFC 8446
    §4.1.4), and exchanges are still read."""
    peers = MemoryPeers(ca, client_alpn=["http/1.1"], server_curve="secp384r1")
    flights = peers.handshake()
    assert [side for side, _ in flights][:4] == ["client", "upstream", "client", "upstream"]
    times = [1.0, 1.001, 2.0, 2.3, 2.301, 2.302]
    reads = [Read(side, data, times[i]) for i, (side, data) in enumerate(flights)]
    reads.append(Read("client", peers.send("client", GET), 3.0))
    peers.read("upstream")
    reads.append(Read("upstream", peers.send("upstream", ok()), 3.2))
    for step in (0, 1):
        tls, _ = read_through(reads, step)
        assert tls.server_hello is not None
        assert not tls.server_hello.retry
        assert tls.handshake == pytest.approx(0.3)
        assert tls.ttfb == pytest.approx(0.2)


def test_early_data_leaves_the_exchanges_untold(ca: trustme.CA) -> None:
    """0-RTT data (RFC 8446 §4.2.10) sends the first request before the handshake: the
    handshake is timed, the exchanges are not."""
    reads = tls13(ca, "request_first")
    early = bytes([APPLICATION_DATA, 3, 3, 0, 60]) + bytes(60)
    reads.insert(1, Read("client", early, 1.0))
    tls, heard = read_through(reads)
    assert tls.handshake == pytest.approx(0.3)
    assert (tls.counting, tls.exchanges, heard, tls.stopped) == (False, 0, [], "unpaired")


def test_an_alert_instead_of_a_server_hello_measures_nothing(ca: trustme.CA) -> None:
    """The origin refused the hello: no handshake time, no version, reading stops."""
    hello = MemoryPeers(ca).handshake()[0][1]
    alert = bytes([ALERT, 3, 3, 0, 2, 2, 70])  # fatal protocol_version
    tls, _ = read_through([Read("client", hello, 1.0), Read("upstream", alert, 1.1)])
    assert (tls.handshake, tls.version, tls.stopped) == (None, None, "alert")


@pytest.mark.parametrize(
    ("reads", "stopped"),
    [
        ([Read("client", b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u6\r\n", 1.0)], "not_tls"),
        ([Read("upstream", b"SSH-2.0-OpenSSH_9.2p1\r\n", 1.0)], "not_tls"),  # server first
        ([Read("client", b"GET / HTTP/1.1\r\n\r\n", 1.0)], "not_tls"),
        ([Read("client", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 1.0)], "not_tls"),
        ([Read("client", bytes([APPLICATION_DATA, 3, 3, 0, 1, 0]), 1.0)], "not_tls"),
        ([], "finished"),  # a client that sends nothing
        ([Read("client", bytes([HANDSHAKE]), 1.0)], "finished"),  # one byte, then nothing
    ],
    ids=["ssh", "ssh_server_first", "http", "h2_prior_knowledge", "data_first", "nothing", "one"],
)
def test_tunnels_without_a_tls_handshake_report_nothing(reads: list[Read], stopped: str) -> None:
    """Not TLS, or not enough of it: no field is filled in."""
    tls, heard = read_through(reads)
    assert (tls.client_hello, tls.handshake, tls.version, tls.exchanges) == (None, None, None, 0)
    assert (tls.stopped, heard) == (stopped, [])


def test_a_16_kib_client_hello_spanning_records_and_reads(ca: trustme.CA) -> None:
    """A ClientHello over one record's 16 KiB, read 1 byte at a time, is timed from its end."""
    protocols = [f"p{n:03d}" + "x" * 200 for n in range(80)] + ["http/1.1"]
    peers = MemoryPeers(ca, client_alpn=protocols, server_alpn=["http/1.1"])
    flights = peers.handshake()
    hello = flights[0][1]
    assert len(hello) > 16384
    assert len(records(hello)) == 2
    tls, _ = read_through(
        [Read("client", hello, 1.0), Read("upstream", flights[1][1], 1.25)], step=1
    )
    assert tls.client_hello is not None
    assert len(tls.client_hello.alpn) == 81
    assert tls.handshake == pytest.approx(0.25)


def test_tls12_renegotiation_changes_nothing_measured(ca: trustme.CA) -> None:
    """Handshake records after the handshake (renegotiation, RFC 5746) are neither requests
    nor answers; exchanges around them still pair."""
    reads = tls12(ca, ["http/1.1"], ["http/1.1"])
    encrypted_handshake = bytes([HANDSHAKE, 3, 3, 0, 40]) + bytes(40)
    reads.insert(4, Read("upstream", encrypted_handshake, 1.3025))  # a HelloRequest
    reads.insert(5, Read("client", encrypted_handshake * 3, 1.3026))  # the new ClientHello...
    tls, _ = read_through(reads)
    assert tls.exchanges == 1
    assert tls.ttfb == pytest.approx(0.2)


def test_an_unreadable_record_stops_the_reading_and_unsettles_the_first_exchange(
    ca: trustme.CA,
) -> None:
    """Alignment lost mid-exchange: what came before stays, the open question gets no answer."""
    reads = tls13(ca, "request_first")
    reads.insert(-1, Read("upstream", b"\x00garbage", 1.4))
    tls, heard = read_through(reads)
    assert tls.handshake == pytest.approx(0.3)
    assert (tls.stopped, tls.exchanges, tls.first_bytes, heard) == (
        "unreadable_record",
        1,
        [None],
        [],
    )


# -- the ticket rule and the SNI check, alone ------------------------------------------------


@pytest.mark.parametrize(
    ("records_", "response"),
    [
        ([(250, 1.0, False), (250, 1.1, True), (118, 1.3, True)], 1.3),  # R1: skip the run
        ([(118, 1.3, True)], 1.3),  # no follower: the run's first record
        ([(50, 1.3, True)], 1.3),  # shorter than any ticket: the response at once
        ([(250, 1.0, False), (250, 1.3, True)], None),  # the run began before the request
        ([(250, 1.0, False), (300, 1.01, False)], None),  # something else before the request
        ([], None),
    ],
)
def test_ticket_rule(records_: list[tuple[int, float, bool]], response: float | None) -> None:
    """Rule R1 from the facts note, with its guard: never a time from before the request."""
    rule = TicketRule()
    for length, now, requested in records_:
        rule(length, now, requested)
    assert rule.close() == response


@pytest.mark.parametrize(
    ("sni", "host", "differs"),
    [
        ("api.test", "api.test", False),
        ("api.test", "api.test.", False),
        (None, "127.0.0.1", False),
        ("other.test", "api.test", True),
        ("api.test", "127.0.0.1", True),
    ],
)
def test_sni_differs(sni: str | None, host: str, differs: bool) -> None:
    """The CONNECT host against the SNI (both lower case; a root dot is no difference)."""
    assert sni_differs(sni, host) is differs


# -- properties ------------------------------------------------------------------------------


@cache
def conversation() -> list[Read]:
    """A TLS 1.3 request with tickets on both sides of it, for the property tests."""
    return tls13(trustme.CA(), "split")


@given(st.data())
def test_any_cut_of_a_real_conversation_reads_the_same(data: st.DataObject) -> None:
    """Reads cut anywhere (times kept) give the same measurements as whole reads."""
    whole, _ = read_through(conversation())
    cut: list[Read] = []
    for read in conversation():
        points = sorted(data.draw(st.sets(st.integers(1, len(read.data) - 1), max_size=4)))
        edges = [0, *points, len(read.data)]
        cut += [Read(read.side, read.data[a:b], read.at) for a, b in pairwise(edges)]
    tls, _ = read_through(cut)
    assert (tls.handshake, tls.exchanges, tls.first_bytes) == (
        whole.handshake,
        whole.exchanges,
        whole.first_bytes,
    )
    assert whole.ttfb == pytest.approx(0.2)


@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=64)), max_size=20), st.booleans())
def test_arbitrary_bytes_never_raise(chunks: list[tuple[bool, bytes]], hello: bool) -> None:
    """Whatever crosses a tunnel, after a real ClientHello or not, reading never raises."""
    tls = TunnelTls()
    if hello:
        tls("client", conversation()[0].data, 0.0)
    for n, (client, chunk) in enumerate(chunks):
        assert tls("client" if client else "upstream", chunk, float(n)) in (True, False)
    tls.finish()
