"""Request ids, trace context and CONNECT targets, generated.

Properties: a generated ``X-Request-ID`` comes back (and goes upstream) unchanged when it is
valid, else replaced by a fresh valid one; a generated ``traceparent`` is kept when it is valid
W3C Trace Context, else a fresh valid one replaces it (and an incoming tracestate is dropped);
a generated CONNECT target is refused, or tunnelled to exactly the port it names.
"""

from __future__ import annotations

import asyncio
import re
import socket
import string
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.conftest import TEST_SETTINGS
from tests.oracle import Parsed, RecordingOrigin, Stack, closing_socket, read_responses


def _answer(parsed: Parsed) -> tuple[int, bytes]:
    return 200, b"ok"


class Banner:
    """A tunnel endpoint that names its own port first, then echoes."""

    def __init__(self) -> None:
        self.port = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"port %d\n" % self.port)
        await writer.drain()
        writer.write(await reader.readline())
        await writer.drain()


@dataclass
class Setup:
    stack: Stack
    origin: RecordingOrigin
    origin_port: int
    tunnel_port: int
    other_port: int  # listening too, but not in --connect-ports


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    origin = RecordingOrigin(_answer)
    banner, other = Banner(), Banner()
    tunnel_port = _free_port()
    # The port is chosen before the proxy starts: --connect-ports must name it.
    with Stack(connect_ports=(tunnel_port,)) as running:
        origin_port = running.origin(origin)
        banner.port = running.origin(banner, port=tunnel_port)
        other.port = running.origin(other)
        yield Setup(running, origin, origin_port, banner.port, other.port)


# -- ids ------------------------------------------------------------------------------------

_RID_ALPHABET = string.ascii_letters + string.digits + "._:@/+=-"
request_ids = st.one_of(
    st.text(_RID_ALPHABET, min_size=1, max_size=130),
    st.text(string.printable.strip() + " \"'\\", min_size=0, max_size=20),
    st.binary(max_size=20)
    .filter(lambda b: not set(b) & set(b"\r\n"))
    .map(lambda b: b.decode("latin-1")),
)
_HEX = "0123456789abcdef"


@st.composite
def traceparents(draw: st.DrawFn) -> str:
    if draw(st.booleans()):  # half the examples: valid, to show it is kept
        trace, parent = (
            draw(st.text(_HEX, min_size=32, max_size=32)),
            draw(st.text(_HEX, min_size=16, max_size=16)),
        )
        return f"00-{trace}-{parent}-{draw(st.sampled_from(['00', '01']))}"
    version = draw(st.sampled_from(["00", "00", "00", "01", "ff", "0g", "0"]))
    exact_trace = st.text(_HEX, min_size=32, max_size=32)
    trace = draw(
        st.one_of(
            exact_trace,
            exact_trace,
            st.sampled_from(["0" * 32, "A" * 32]),
            st.text(_HEX, min_size=31, max_size=33),
        )
    )
    exact_parent = st.text(_HEX, min_size=16, max_size=16)
    parent = draw(
        st.one_of(
            exact_parent,
            exact_parent,
            st.sampled_from(["0" * 16]),
            st.text(_HEX, min_size=15, max_size=17),
        )
    )
    flags = draw(st.sampled_from(["00", "01", "01", "ff", "1", "0x"]))
    rest = draw(st.sampled_from(["", "", "", "-", "-extra", "-x-y"]))
    value = f"{version}-{trace}-{parent}-{flags}{rest}"
    return draw(st.sampled_from(["", " ", "\t"])) + value + draw(st.sampled_from(["", " "]))


def valid_request_id(value: str) -> bool:
    # The documented alphabet (README, X-Request-ID): 1-128 characters, log- and URL-safe.
    return re.fullmatch(r"[A-Za-z0-9._:@/+=-]{1,128}", value) is not None


def valid_traceparent(value: str) -> bool:
    """W3C Trace Context §3.2, written out again here (not the proxy's parser)."""
    parts = value.split("-")
    if len(parts) < 4 or not all(re.fullmatch("[0-9a-f]+", p) for p in parts[:4]):
        return False
    version, trace, parent, flags = parts[:4]
    if len(version) != 2 or len(trace) != 32 or len(parent) != 16 or len(flags) != 2:
        return False
    if version == "ff" or trace == "0" * 32 or parent == "0" * 16:
        return False
    return len(parts) == 4 if version == "00" else True


def _one(fields: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...], name: bytes) -> str:
    (value,) = [v for k, v in fields if k.lower() == name]
    return value.decode("latin-1")


@given(request_id=request_ids, traceparent=traceparents(), tracestate=st.booleans())
def test_ids_come_out_valid_or_replaced(
    setup: Setup, request_id: str, traceparent: str, tracestate: bool
) -> None:
    """Valid ids are kept both ways; anything else is replaced by a fresh valid one."""
    raw = (
        b"GET http://127.0.0.1:%d/ids HTTP/1.1\r\nHost: x\r\nX-Request-ID: %s\r\n"
        b"traceparent: %s\r\n%s\r\n"
        % (
            setup.origin_port,
            request_id.encode("latin-1"),
            traceparent.encode(),
            b"tracestate: k=v\r\n" if tracestate else b"",
        )
    )
    setup.origin.seen.clear()
    with closing_socket(setup.stack.connect()) as sock:
        sock.sendall(raw)
        (got,) = read_responses(sock, [b"GET"]).responses
    if got.status == 400:
        # llhttp refuses control characters in a value (RFC 9110 §5.5): never forwarded.
        event("refused")
        assert any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in request_id)
        assert setup.origin.seen == []
        return
    assert got.status == 200
    (upstream,) = setup.origin.seen
    assert isinstance(upstream, Parsed)
    rid = _one(got.fields, b"x-request-id")
    assert valid_request_id(rid)
    assert rid == _one(upstream.fields, b"x-request-id")
    stripped = request_id.strip(" \t")
    kept = valid_request_id(stripped)
    event(f"request id {'kept' if kept else 'replaced'}")
    assert (rid == stripped) == kept
    parent = _one(got.fields, b"traceparent")
    assert valid_traceparent(parent)
    assert parent == _one(upstream.fields, b"traceparent")
    incoming = traceparent.strip(" \t")
    kept = valid_traceparent(incoming)
    event(f"traceparent {'kept' if kept else 'replaced'}")
    assert (parent == incoming) == kept
    forwarded_state = [v for k, v in upstream.fields if k.lower() == b"tracestate"]
    assert forwarded_state == ([b"k=v"] if tracestate and kept else [])


# -- CONNECT targets ------------------------------------------------------------------------

_HOSTS = ["127.0.0.1", "localhost", "LocalHost", "[::1]", "127.1", "2130706433", "0x7f.0.0.1"]
_HOSTS += ["127.0.0.1.", "[::ffff:127.0.0.1]", "127.000.000.001", "", "[127.0.0.1]", "::1"]
# A space would end the target in the request line (RFC 9112 §3), so none is generated.
_HOSTS += ["u@127.0.0.1", "127.0.0.1%00", "[::1%lo]", "0.0.0.0", "[::]", "127.0.0.1%2e"]


@st.composite
def connect_targets(draw: st.DrawFn, tunnel_port: int, other_port: int) -> str:
    if draw(st.integers(0, 3)) == 0:  # some plainly good ones, to show they tunnel
        return draw(st.sampled_from(["127.0.0.1", "localhost"])) + f":{tunnel_port}"
    host = draw(st.sampled_from(_HOSTS))
    # Any other port is refused by --connect-ports before a dial, so any number is safe.
    port = draw(
        st.one_of(
            st.sampled_from(
                [str(tunnel_port)] * 4
                + [f"0{tunnel_port}", f"+{tunnel_port}", str(other_port), "443", "80", "", "0"]
                + [f"{tunnel_port}:{tunnel_port}", f"{tunnel_port}/x", "-1", f"{tunnel_port}%20"]
            ),
            st.integers(0, 99999).map(str),
        )
    )
    separator = draw(st.sampled_from([":", ":", ":", "", "::"]))
    return draw(st.sampled_from(["", "", "http://"])) + host + separator + port


HTTP_PORTS = TEST_SETTINGS.connect_http_ports


def _drain(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (the socket's timeout bounds the wait)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


_AUTHORITY = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(?P<port>[0-9]+)")


@given(data=st.data())
def test_connect_targets_are_refused_or_tunnelled_to_the_port_they_name(
    setup: Setup, data: st.DataObject
) -> None:
    """A tunnel only ever opens to the port a well-formed authority-form target names."""
    target = data.draw(connect_targets(setup.tunnel_port, setup.other_port))
    # The Host field is not what a CONNECT names (RFC 9110 §9.3.6): it must not steer the tunnel.
    # A missing Host is a 400 (RFC 9112 §3.2), so it is the rare case.
    host = f"Host: {target}\r\n"
    host = data.draw(st.sampled_from([host, host, host, "Host: 127.0.0.1:1\r\n", ""]))
    raw = f"CONNECT {target} HTTP/1.1\r\n{host}\r\n".encode("latin-1")
    with closing_socket(setup.stack.connect()) as sock:
        sock.sendall(raw)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                break
            head += chunk
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
        event(f"status {status}")
        if status != 200:
            assert 400 <= status < 600, head
            return
        # RFC 9112 §3.2.3: authority-form is uri-host ":" port, nothing else.
        match = _AUTHORITY.fullmatch(target)
        assert match is not None, f"tunnelled for a target that is not authority-form: {target!r}"
        banner = head.split(b"\r\n\r\n", 1)[1]
        if int(match.group("port")) in HTTP_PORTS:
            # --connect-http-ports: the proxy serves plain HTTP there itself and closes on
            # anything else, so nothing is dialled and nothing comes back.
            sock.sendall(b"ping\n")
            assert banner + _drain(sock) == b""
            return
        assert int(match.group("port")) == setup.tunnel_port
        sock.sendall(b"ping\n")
        while banner.count(b"\n") < 2:
            chunk = sock.recv(65536)
            assert chunk, banner
            banner += chunk
    assert banner == b"port %d\nping\n" % setup.tunnel_port
