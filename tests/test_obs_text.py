"""The head writer: byte for byte with obs-text, aiohttp's own bytes otherwise."""

from __future__ import annotations

import pytest
from aiohttp import http_writer
from multidict import CIMultiDict

from proxy.wire import obs_text
from proxy.wire.obs_text import HeadWriter


def test_install_wraps_aiohttps_serializer_once() -> None:
    """After install (twice), the writer aiohttp calls is ours, wrapping aiohttp's C one."""
    obs_text.install()
    obs_text.install()
    installed = http_writer._serialize_headers
    assert isinstance(installed, HeadWriter)
    assert not isinstance(installed.inner, HeadWriter)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("plain", b"plain"),
        ("caf\udce9", b"caf\xe9"),  # a latin-1 byte, as surrogateescape decodes it
        ("caf\u00e9", b"caf\xc3\xa9"),  # text that was UTF-8 stays UTF-8
        ("\udcff\udc80", b"\xff\x80"),
    ],
)
def test_heads_are_written_with_their_original_bytes(value: str, wire: bytes) -> None:
    """Each value leaves as the bytes it arrived as; an ASCII head as aiohttp writes it."""
    writer = HeadWriter(http_writer._c_serialize_headers)
    head = writer("HTTP/1.1 200 OK", CIMultiDict({"X-V": value}))
    assert head == b"HTTP/1.1 200 OK\r\nX-V: " + wire + b"\r\n\r\n"


@pytest.mark.parametrize("value", ["caf\udce9\r\nX-Injected: 1", "\udce9\x00"])
def test_control_characters_are_refused_on_the_slow_path_too(value: str) -> None:
    """A CR, LF or NUL in a value is refused, as aiohttp's own writer refuses it."""
    writer = HeadWriter(http_writer._c_serialize_headers)
    with pytest.raises(ValueError, match="forbidden"):
        writer("HTTP/1.1 200 OK", CIMultiDict({"X-V": value}))
