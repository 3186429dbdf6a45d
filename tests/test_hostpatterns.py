"""Host patterns (--intercept, --upgrade-to-https, --track-hosts) and the labels they match."""

from __future__ import annotations

import pytest
from yarl import URL

from proxy.config import SettingError, parse_host_patterns
from proxy.rules.hostpatterns import HostPatterns, PatternError, check_pattern
from proxy.rules.target import host_label
from proxy.wire.tunnelling import tunnel_target


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("API.Example.com", "api.example.com"),
        ("*.Svc.Local", "*.svc.local"),
        ("10.0.0.1", "10.0.0.1"),
        ("[::1]", "[::1]"),
        ("[0:0::1]", "[::1]"),
        ("[0000:0000:0000:0000:0000:0000:0000:0001]", "[::1]"),
        ("::1", "[::1]"),
        ("[FD00:EC2::254]", "[fd00:ec2::254]"),
        ("[::ffff:127.0.0.1]", "[::ffff:7f00:1]"),
        ("127.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
    ],
)
def test_ip_literal_patterns_are_written_in_one_spelling(text: str, normal: str) -> None:
    """An IP literal pattern takes the spelling host labels have; names are lower-cased."""
    assert check_pattern(text) == normal


@pytest.mark.parametrize("text", ["[::g]", "[127.0.0.1]", "[::1", "::1]", "a b", "*", "a.*.b"])
def test_bad_patterns_are_refused(text: str) -> None:
    """Neither a host name, an IP literal nor *.domain: refused with the text quoted."""
    with pytest.raises(PatternError, match="expected"):
        check_pattern(text)


# The spellings a client may give a target, and a pattern the operator may write for it.
SPELLINGS = [
    ("[::1]", "[0:0::1]"),
    ("[0:0::1]", "[::1]"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("[::ffff:127.0.0.1]", "[::ffff:127.0.0.1]"),
    ("[::ffff:7f00:1]", "[::ffff:127.0.0.1]"),
    ("[::FFFF:127.0.0.1]", "[::ffff:7f00:1]"),
    ("[FD00:EC2::254]", "[fd00:ec2:0::254]"),
]


@pytest.mark.parametrize(("target", "pattern"), SPELLINGS)
def test_ip_literal_pattern_matches_every_spelling_of_the_target(target: str, pattern: str) -> None:
    """Pattern and label are normalised alike: any IPv6 spelling matches any other.

    Both routes are checked: the absolute-form label (--upgrade-to-https, --track-hosts) and
    the CONNECT label (--intercept), each as the proxy builds it.
    """
    patterns = HostPatterns([pattern])
    assert patterns.matches(host_label(URL(f"http://{target}:8080/")))
    assert patterns.matches(host_label(URL(f"http://{target}/")))
    assert patterns.matches(tunnel_target(f"{target}:443", (443,)).label)


def test_track_hosts_setting_normalises_ip_literals() -> None:
    """--track-hosts keeps each IP literal in the spelling of the labels it is matched against."""
    assert parse_host_patterns("[0:0::1], [::ffff:127.0.0.1],::2") == (
        "[::1]",
        "[::ffff:7f00:1]",
        "[::2]",
    )
    with pytest.raises(SettingError):
        parse_host_patterns("[::g]")
