"""TLS timed from the bytes a tunnel carries, with no key: the handshake and each exchange.

Pure code: the relay hands over each read with the time it was read, and nothing here
writes, holds back or changes a byte. Each direction is read in two stages:

1. Its hellos, with ``proxy.rules.tls_hello.HandshakeReader``: the ClientHello (SNI, ALPN
   offer) and the ServerHello (version, cipher, and in TLS 1.2 the chosen ALPN). The
   handshake time runs from the read that completed the ClientHello (it went on to the
   origin then) to the read that completed the ServerHello: one round trip plus the
   origin's work.
2. Record headers alone (RFC 8446 §5.1, RFC 5246 §6.2.1): type and length, the body
   skipped without a copy. The first header that cannot be TLS stops the reading for good,
   since record alignment cannot be regained.

From the application-data records' directions and times come the exchanges (a client
burst, then the server burst that answers it) and the first byte of each. That pairing
holds for HTTP/1.1 without pipelining; HTTP/2 sends frames nobody asked for (SETTINGS,
RFC 9113 §3.4), so where the client may speak it only the handshake is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.rules.tls_hello import (
    ALERT,
    APPLICATION_DATA,
    CLIENT_HELLO,
    CONTENT_TYPES,
    HANDSHAKE,
    MAX_RECORD,
    RECORD_HEADER,
    SERVER_HELLO,
    ClientHello,
    HandshakeReader,
    HelloError,
    Message,
    ServerHello,
    parse_client_hello,
    parse_server_hello,
    version_name,
)

TLS_1_2: Final = 0x0303
TLS_1_3: Final = 0x0304

# Protocols in which one client burst is answered by the next server burst (HTTP/1.1,
# RFC 9112 §9.3, without pipelining). An empty ALPN offer is taken as HTTP/1.1 too.
PAIRED_PROTOCOLS: Final = frozenset({"http/1.1"})

# TLS 1.3 suites: (hash length, AEAD tag length) (RFC 8446 §B.4). The client's Finished
# is a record of hash + 4 (message header, §4.4.4) + 1 (inner content type, §5.2) + tag.
# A record of at most 5 + 1 + tag bytes holds an alert (2 B, §6) or a KeyUpdate (5 B,
# §4.6.3), never the start of an HTTP/1.1 message: such records are not requests or answers.
TLS13_SUITES: Final = {
    0x1301: (32, 16),  # TLS_AES_128_GCM_SHA256
    0x1302: (48, 16),  # TLS_AES_256_GCM_SHA384
    0x1303: (32, 16),  # TLS_CHACHA20_POLY1305_SHA256
    0x1304: (32, 16),  # TLS_AES_128_CCM_SHA256
    0x1305: (32, 8),  # TLS_AES_128_CCM_8_SHA256
}

# TLS 1.3 sends NewSessionTicket messages as application data (RFC 8446 §4.6.1), after the
# client's Finished and, in every capture of the facts note, before the first response;
# one connection's tickets had one length, within these bounds (facts note, rule R1).
TICKET_LENGTHS: Final = range(100, 1025)

# A TLS 1.3 client sends its Finished within this many application-data records (more
# than a client certificate flight needs: Certificate, CertificateVerify, Finished).
MAX_CLIENT_FLIGHT: Final = 8

# The tunnel line keeps the first byte of this many exchanges; the histogram gets them all.
FIRST_BYTES_KEPT: Final = 32


def paired(client: ClientHello, server: ServerHello) -> bool:
    """Whether the exchanges of this connection can be told from its records.

    In TLS 1.2 the server's ALPN choice is in the clear (RFC 7301 §3.1); in TLS 1.3 it is
    encrypted, so the client's whole offer must be paired protocols (or none).
    """
    if server.version == TLS_1_2 and server.alpn is not None:
        return server.alpn in PAIRED_PROTOCOLS
    return all(protocol in PAIRED_PROTOCOLS for protocol in client.alpn)


def sni_differs(sni: str | None, host: str) -> bool:
    """Whether a ClientHello's server name is not the CONNECT host (both lower case)."""
    return sni is not None and sni != host.rstrip(".")


class TicketRule:
    """TLS 1.3, first exchange: the first response told from the tickets before it (rule R1).

    Fed the server's application-data records after the client's Finished. A leading run
    of records of one length within ``TICKET_LENGTHS`` is taken for tickets when a record
    of another length follows before the first exchange ends: that record is the first
    response. When none follows, the run's first record is the response, if it came after
    the request. The result is an estimate; anything else yields nothing (``None``).
    """

    __slots__ = ("_length", "_start", "decided", "response")

    def __init__(self) -> None:
        self._length = 0  # the run's record length; 0 before the first record
        self._start: float | None = None  # when the run began, if after the request
        self.decided = False
        self.response: float | None = None

    def __call__(self, length: int, now: float, requested: bool) -> None:
        """A server record of ``length`` read at ``now``, after the request or not."""
        if self.decided or length == self._length:
            return
        if self._length == 0 and length in TICKET_LENGTHS:
            self._length = length
            self._start = now if requested else None
            return
        self.decided = True
        self.response = now if requested else None

    def close(self) -> float | None:
        """The first exchange is over: when its response began, if the records tell."""
        if not self.decided:
            self.decided = True
            self.response = self._start
        return self.response

    def __repr__(self) -> str:
        return f"<TicketRule run={self._length} decided={self.decided} response={self.response}>"


# Where a tunnel's reading stands.
_CLIENT_HELLO: Final = 0  # waiting for the client's first flight
_SERVER_HELLO: Final = 1  # the ClientHello went on; waiting for the origin's answer
_RETRY: Final = 2  # a HelloRetryRequest came back; waiting for the second ClientHello
_FINISHED: Final = 3  # TLS 1.3: waiting for the client's Finished
_EXCHANGES: Final = 4  # application data: counting exchanges
_DONE: Final = 5  # nothing more to learn from the bytes


class _Direction:
    """One direction's reading position: its hello reader, then the record walk."""

    __slots__ = ("deaf", "head", "hello", "skip")

    def __init__(self) -> None:
        self.hello: HandshakeReader | None = HandshakeReader()
        self.skip = 0  # bytes of the current record still to come
        self.head = b""  # the start of a record header that a read cut short
        # Its application-data records cannot change anything until the other side's next
        # one (the rest of a request, or of an answer): they are walked, not looked at.
        self.deaf = False


class TunnelTls:
    """Reads the TLS in one tunnel: call it with each read; it says False once it is done.

    ``on_first_byte`` hears each exchange's first byte (seconds) as soon as it is known.
    ``finish`` ends the reading when the tunnel ends. What was measured: ``client_hello``,
    ``server_hello``, ``handshake`` (seconds), ``counting`` (whether exchanges are told
    here), ``exchanges``, ``first_bytes`` (the first ``FIRST_BYTES_KEPT`` exchanges, ``None``
    where it cannot be told) and ``stopped`` (why the reading ended, for the curious).
    """

    __slots__ = (
        "_answered",
        "_client",
        "_client_records",
        "_control",
        "_early",
        "_finished",
        "_on_first_byte",
        "_passed",
        "_phase",
        "_request_at",
        "_server",
        "_tickets",
        "client_hello",
        "counting",
        "exchanges",
        "first_bytes",
        "handshake",
        "server_hello",
        "stopped",
    )

    def __init__(self, on_first_byte: Callable[[float], None] | None = None) -> None:
        self._on_first_byte = on_first_byte
        self._client = _Direction()
        self._server = _Direction()
        self._phase = _CLIENT_HELLO
        self._passed = 0.0  # when the last ClientHello went on
        self._early = False  # TLS 1.3 early data: the first request went before the handshake
        self._finished = 0  # TLS 1.3: the length of the client's Finished record
        self._control = 0  # TLS 1.3: records up to this length are alerts or KeyUpdates
        self._client_records = 0  # TLS 1.3: client application-data records before Finished
        self._request_at: float | None = None  # the current exchange's first client record
        self._answered = False  # whether the server has answered the current exchange
        self._tickets: TicketRule | None = None  # TLS 1.3, while the first exchange lasts
        self.client_hello: ClientHello | None = None
        self.server_hello: ServerHello | None = None
        self.handshake: float | None = None
        self.counting = False
        self.exchanges = 0
        self.first_bytes: list[float | None] = []
        self.stopped: str | None = None

    @property
    def version(self) -> str | None:
        """The negotiated version's name, ``TLSv1.3`` say (a HelloRetryRequest's is not)."""
        hello = self.server_hello
        return version_name(hello.version) if hello is not None and not hello.retry else None

    @property
    def ttfb(self) -> float | None:
        """The first exchange's first byte, where it could be told."""
        return self.first_bytes[0] if self.first_bytes else None

    def __call__(self, side: str, data: bytes, now: float) -> bool:
        """``data`` was read from ``side`` ("client" or "upstream") at ``now`` (seconds)."""
        if self.stopped is None:
            client = side == "client"
            direction = self._client if client else self._server
            if direction.hello is not None:
                self._read_hello(client, direction, data, now)
            else:
                self._walk(client, direction, data, now)
        return self.stopped is None

    def finish(self) -> None:
        """The tunnel has ended: settle the exchange in progress and stop reading."""
        self._stop("finished")

    def _stop(self, reason: str) -> None:
        """Read no more. The exchange in progress is settled only where what was read
        decides it: a record that cannot be read may have hidden the answer."""
        if self.stopped is not None:
            return
        self.stopped = reason
        self._phase = _DONE
        self._client.hello = self._server.hello = None
        tickets = self._tickets
        if tickets is not None:
            if reason != "finished" and not tickets.decided:
                tickets.decided = True  # the response may have been in what is not read
            self._close_first_exchange()
        elif self._request_at is not None and not self._answered:
            self._keep(None)

    def _awaits_hello(self, client: bool) -> bool:
        """Whether ``client``'s side owes a hello (the second ClientHello, the ServerHello)."""
        return self._phase == (_RETRY if client else _SERVER_HELLO)

    # -- the hellos -----------------------------------------------------------------------

    def _read_hello(self, client: bool, direction: _Direction, data: bytes, now: float) -> None:
        reader = direction.hello
        assert reader is not None
        if not client and self._phase == _CLIENT_HELLO:
            return self._stop("not_tls")  # a TLS server never speaks first
        try:
            for message in reader.feed(data):
                self._message(client, message, now)
        except HelloError as exc:
            return self._stop(exc.reason)
        if not reader.stopped or self.stopped is not None:
            return None
        # The first record that is not a plaintext handshake record: from here on only
        # headers are read, starting with the rest of this read.
        direction.hello = None
        rest = reader.rest
        if client and self._phase == _CLIENT_HELLO:
            return self._stop("not_tls")
        if not client and rest[0] == ALERT and self._phase == _SERVER_HELLO:
            return self._stop("alert")  # the origin refused the ClientHello
        return self._walk(client, direction, rest, now)

    def _message(self, client: bool, message: Message, now: float) -> None:
        phase = self._phase
        if client:
            if phase in (_CLIENT_HELLO, _RETRY):
                if message.type != CLIENT_HELLO:
                    return self._stop("not_tls")
                offer = parse_client_hello(message.body)
                if self.client_hello is None:  # a second one (after a retry) offers the same
                    self.client_hello = offer
                self._passed = now
                self._phase = _SERVER_HELLO
            return  # the rest of a TLS 1.2 client flight says nothing more
        if phase != _SERVER_HELLO:
            return  # the rest of a TLS 1.2 server flight (certificates, key exchange)
        if message.type != SERVER_HELLO:
            return self._stop("no_server_hello")
        retried = self.server_hello is not None
        self.server_hello = answer = parse_server_hello(message.body)
        if answer.retry:
            # RFC 8446 §4.1.4: a second ClientHello follows; at most one retry.
            if retried:
                return self._stop("second_retry")
            self._phase = _RETRY
            return None
        self.handshake = now - self._passed
        return self._after_hellos(answer)

    def _after_hellos(self, server: ServerHello) -> None:
        client = self.client_hello
        assert client is not None
        if self._early or not paired(client, server):
            return self._stop("unpaired")
        if server.version == TLS_1_2:
            self._phase = _EXCHANGES
            self.counting = True
            return None
        sizes = TLS13_SUITES.get(server.cipher)
        if server.version != TLS_1_3 or sizes is None:
            return self._stop("version")
        digest, tag = sizes
        self._finished = digest + 4 + 1 + tag
        self._control = 4 + 1 + 1 + tag
        self._tickets = TicketRule()
        self._phase = _FINISHED
        return None

    # -- the records ----------------------------------------------------------------------

    def _walk(self, client: bool, direction: _Direction, data: bytes, now: float) -> None:
        """Record headers in ``data``, which continues ``direction``'s stream; bodies are
        skipped, not copied."""
        at = direction.skip
        size = len(data)
        if at >= size:
            direction.skip = at - size
            return
        if direction.head:  # a header the last read cut: rare, so a copy is fine here
            data = direction.head + data
            direction.head = b""
            size = len(data)
        while at + RECORD_HEADER <= size:
            kind = data[at]
            length = data[at + 3] << 8 | data[at + 4]
            if kind not in CONTENT_TYPES or data[at + 1] != 3 or length > MAX_RECORD:
                return self._stop("unreadable_record")
            if kind == APPLICATION_DATA:
                if not direction.deaf:
                    self._record(client, length, now)
                    if self.stopped is not None:
                        return None
            elif kind == HANDSHAKE and self._awaits_hello(client):
                # After a HelloRetryRequest: the next hello, read from its header on.
                direction.hello = HandshakeReader()
                return self._read_hello(client, direction, data[at:], now)
            at += RECORD_HEADER + length
        if at < size:
            direction.head = data[at:]
            direction.skip = 0
        else:
            direction.skip = at - size
        return None

    def _record(self, client: bool, length: int, now: float) -> None:
        """An application-data record of ``length`` bytes began in the read at ``now``."""
        phase = self._phase
        if phase == _EXCHANGES:
            if length <= self._control:
                return
            if client:
                if self._request_at is None or self._answered:
                    self._begin(now)
                return
            request_at = self._request_at
            if self._tickets is not None:
                self._tickets(length, now, request_at is not None)
            if request_at is not None and not self._answered:
                self._answered = True
                self._client.deaf = False
                if self._tickets is None:
                    self._server.deaf = True
                    self._keep(now - request_at)
            return
        if phase == _FINISHED:
            if client:
                if length == self._finished:
                    self._phase = _EXCHANGES
                    self.counting = True
                else:
                    self._client_records += 1
                    if self._client_records >= MAX_CLIENT_FLIGHT:
                        self._stop("no_finished")
            return  # the rest of the server's encrypted flight
        if client and phase in (_SERVER_HELLO, _RETRY):
            self._early = True  # RFC 8446 §4.2.10: 0-RTT data before the ServerHello

    def _begin(self, now: float) -> None:
        if self._tickets is not None and self.exchanges:
            self._close_first_exchange()
        self.exchanges += 1
        self._request_at = now
        self._answered = False
        self._client.deaf = True
        self._server.deaf = False

    def _close_first_exchange(self) -> None:
        assert self._tickets is not None
        response = self._tickets.close()
        self._tickets = None
        if self.exchanges:
            assert self._request_at is not None
            self._keep(None if response is None else response - self._request_at)

    def _keep(self, first_byte: float | None) -> None:
        if len(self.first_bytes) < FIRST_BYTES_KEPT:
            self.first_bytes.append(first_byte)
        if first_byte is not None and self._on_first_byte is not None:
            self._on_first_byte(first_byte)

    def __repr__(self) -> str:
        return (
            f"<TunnelTls {self.version} handshake={self.handshake} "
            f"exchanges={self.exchanges} stopped={self.stopped}>"
        )
