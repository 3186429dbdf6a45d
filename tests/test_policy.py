"""The pure access rules, as tables: addresses, destinations, loops and credentials."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest

from proxy import config
from proxy.config import Settings
from proxy.rules import errors, policy
from proxy.rules.policy import (
    Credential,
    DestinationCheck,
    DestinationDenied,
    Destinations,
    LoopDetected,
    OwnAddresses,
    Rules,
)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7F.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x0", "0.0.0.0"),
        ("2852039166", "169.254.169.254"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("169.16689662", "169.254.169.254"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("[::ffff:169.254.169.254]", "169.254.169.254"),
        ("::ffff:a9fe:a9fe", "169.254.169.254"),
        ("[fd00:ec2::254]", "fd00:ec2::254"),
        ("::1", "::1"),
        ("::", "::"),
    ],
)
def test_every_spelling_of_an_address_is_read_as_that_address(text: str, address: str) -> None:
    """Decimal, octal, hex, shortened, bracketed and IPv4-mapped spellings give the address."""
    assert policy.parse_ip(text) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "text",
    [
        "example.com",
        "localhost",
        "08.0.0.1",  # 8 is not an octal digit: a name to the resolver
        "1.2.3.4.5",
        "256.1.1.1",
        "1.2.65536",
        "4294967296",
        "0x1g",
        "",
        "1e3",
        "[not-v6]",
        "::g",
    ],
)
def test_names_and_impossible_numbers_are_not_addresses(text: str) -> None:
    """A string no socket call reads as an address is a name (it goes to the resolver)."""
    assert policy.parse_ip(text) is None


DEFAULTS = Destinations(Rules.parse(Settings().deny_destinations), Rules.parse(()))


@pytest.mark.parametrize(
    ("host", "permitted"),
    [
        ("169.254.169.254", False),
        ("169.254.0.1", False),
        ("2852039166", False),
        ("0251.0376.0251.0376", False),
        ("[::ffff:169.254.169.254]", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fd00:ec2::254", False),
        ("0.0.0.0", False),
        ("0", False),
        ("0.1.2.3", False),
        ("::", False),
        ("127.0.0.1", True),  # loopback is allowed by default: sidecar tests dial it
        ("0x7f.1", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("93.184.215.14", True),
        ("2001:db8::1", True),
        ("fd00:ec2::253", True),
        ("example.com", True),  # a name is judged again by the address it resolves to
    ],
)
def test_default_denials(host: str, permitted: bool) -> None:
    """Link-local, cloud metadata and unspecified addresses are denied in any spelling."""
    address = policy.parse_ip(host)
    assert DEFAULTS.permits(host if address is None else None, address) is permitted


# Each spelling reaches 169.254.169.254 (RFC 4291 §2.5.5, RFC 6052, RFC 8215, RFC 3056, RFC 4380).
IPV4_INSIDE_IPV6 = [
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::169.254.169.254",  # IPv4-compatible
    "::a9fe:a9fe",
    "64:ff9b::a9fe:a9fe",  # NAT64, well-known prefix
    "64:ff9b::169.254.169.254",
    "64:ff9b:1::a9fe:a9fe",  # NAT64, local-use prefix as a /96
    "64:ff9b:1:abcd::a9fe:a9fe",
    "64:ff9b:1:a9fe:a9:fe00::",  # ... as a /48 (the u octet skipped)
    "64:ff9b:1:1a9:fe:a9fe::",  # ... as a /56
    "64:ff9b:1:1:a9:fea9:fe00:0",  # ... as a /64
    "2002:a9fe:a9fe::1",  # 6to4
    "2002:a9fe:a9fe:1234:5678::9",
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo client (obfuscated: 0xffffffff xor)
]


@pytest.mark.parametrize("host", IPV4_INSIDE_IPV6)
def test_ipv4_embedded_in_ipv6_is_unwrapped_before_the_check(host: str) -> None:
    """Every IPv6 form that embeds a denied IPv4 address is denied like that address."""
    address = ipaddress.IPv6Address(host)
    assert ipaddress.IPv4Address("169.254.169.254") in policy.embedded_ipv4(address)
    assert DEFAULTS.permits(None, address) is False
    with pytest.raises(DestinationDenied):
        DestinationCheck(DEFAULTS, OwnAddresses()).host(f"[{host}]", 80)


@pytest.mark.parametrize(
    ("host", "embedded"),
    [
        ("::1", ()),  # IPv6's own loopback and unspecified, not IPv4-compatible
        ("::", ()),
        ("2001:db8::1", ()),
        ("64:ff9b::a01:203", ("10.1.2.3",)),
        # A /48 reading, and the /56 and /64 ones its zero suffix also fits (not the zero /96).
        ("64:ff9b:1:a01:2:300::", ("10.1.2.3", "1.2.3.0", "2.3.0.0")),
        ("64:ff9b:1:1:100:0:a01:203", ("10.1.2.3",)),  # u octet set: only a /96 fits
        ("2002:a01:203::", ("10.1.2.3",)),
        ("::ffff:10.1.2.3", ("10.1.2.3",)),
    ],
)
def test_embedded_ipv4_readings(host: str, embedded: tuple[str, ...]) -> None:
    """Only the forms that carry an IPv4 address yield one, at each RFC 6052 position."""
    readings = policy.embedded_ipv4(ipaddress.IPv6Address(host))
    assert tuple(str(a) for a in readings) == embedded


@pytest.mark.parametrize(
    ("deny", "allow", "address", "permitted"),
    [
        (["10.0.0.0/8"], [], "64:ff9b::a01:203", False),  # a deny rule on the IPv4 address
        (["10.0.0.0/8"], ["10.1.2.3"], "64:ff9b::a01:203", True),  # an allow rule on it
        (["64:ff9b::/96"], [], "64:ff9b::808:808", False),  # a rule on the IPv6 form
        ([], [], "2002:808:808::1", True),
    ],
)
def test_rules_see_both_the_ipv6_address_and_the_ipv4_inside(
    deny: list[str], allow: list[str], address: str, permitted: bool
) -> None:
    """Deny and allow rules match the IPv6 address or an IPv4 address embedded in it."""
    rules = Destinations(Rules.parse(deny), Rules.parse(allow))
    assert rules.permits(None, ipaddress.IPv6Address(address)) is permitted


TRAILING_DOT = (400, "http_request_error", "trailing dot")
DENIED_403 = (403, "destination_ip_prohibited", "")


@pytest.mark.parametrize(
    ("host", "answer"),
    [
        ("169.254.169.254.", DENIED_403),  # denied first, whatever the spelling
        ("0251.0376.0251.0376.", DENIED_403),
        ("127.0.0.1.", TRAILING_DOT),
        ("0x7f.1.", TRAILING_DOT),
        ("localhost.", None),  # a name: the resolver's business
        ("example.com.", None),
    ],
)
def test_trailing_dot_ip_literal_is_refused_by_the_rules(
    host: str, answer: tuple[int, str, str] | None
) -> None:
    """An IP literal with a trailing dot is judged as its address, then refused as a spelling."""
    check = DestinationCheck(DEFAULTS, OwnAddresses())
    if answer is None:
        check.host(host, 80)
        return
    with pytest.raises(Exception) as caught:  # noqa: PT011 (the table says which)
        check.host(host, 80)
    err = errors.classify(caught.value, errors.BEFORE_RESPONSE)
    assert (err.status, err.error) == answer[:2]
    assert answer[2] in err.text


@pytest.mark.parametrize(
    ("host", "refusal"),
    [
        ("169.254.169.254", DestinationDenied),
        ("0251.0376.0251.0376", DestinationDenied),  # denied wins over the spelling
        ("2130706433", policy.UnusualSpelling),
        ("0x7f.1", policy.UnusualSpelling),
        ("127.1", policy.UnusualSpelling),
        ("127.0.0.1", None),
        ("::ffff:127.0.0.1", None),  # an IPv6 literal that a socket dials as it is
        ("localhost", None),
    ],
)
def test_check_before_lookup(host: str, refusal: type[Exception] | None) -> None:
    """Before a lookup, denied destinations and allowed-but-legacy IPv4 spellings are refused."""
    check = DestinationCheck(DEFAULTS, OwnAddresses())
    if refusal is None:
        check.host(host, 80)
    else:
        with pytest.raises(refusal):
            check.host(host, 80)


@pytest.mark.parametrize(
    ("deny", "allow", "name", "address", "permitted"),
    [
        (["10.0.0.0/8"], [], None, "10.9.9.9", False),
        (["10.0.0.0/8"], [], None, "11.0.0.1", True),
        (["10.0.0.0/8"], ["10.1.2.3"], None, "10.1.2.3", True),  # allow beats deny
        (["10.0.0.0/8"], ["10.1.2.3"], None, "10.1.2.4", False),
        (["169.254.0.0/16"], ["169.254.10.10/32"], None, "169.254.10.10", True),
        (["*.internal"], [], "db.internal", None, False),
        (["*.internal"], [], "a.b.internal", None, False),
        (["*.internal"], [], "internal", None, True),  # *.domain: below it, not itself
        (["*.internal"], [], "DB.Internal.", None, False),  # case and a trailing dot
        (["*.internal"], ["ok.internal"], "ok.internal", None, True),
        (["metadata.google.internal"], [], "metadata.google.internal", None, False),
        (["metadata.google.internal"], [], "x.metadata.google.internal", None, True),
        # A name's answer is judged with the name: an allowed name may reach a denied net.
        (["169.254.0.0/16"], ["metadata.test"], "metadata.test", "169.254.169.254", True),
        (["169.254.0.0/16"], [], "innocent.test", "169.254.169.254", False),
        (["fe80::/10"], [], None, "fe80::abcd", False),
        ([], [], "anything.test", "10.0.0.1", True),
    ],
)
def test_deny_and_allow_rules(
    deny: list[str], allow: list[str], name: str | None, address: str | None, permitted: bool
) -> None:
    """Deny rules match by network or host pattern; any matching allow rule wins over them."""
    rules = Destinations(Rules.parse(deny), Rules.parse(allow))
    parsed = ipaddress.ip_address(address) if address is not None else None
    assert rules.permits(name, parsed) is permitted


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3/32"),
        ("FD00:EC2::254", "fd00:ec2::254/128"),
        ("*.Internal", "*.internal"),
        ("metadata.google.internal", "metadata.google.internal"),
        ("[::1]", "::1/128"),
        ("[0:0::1]", "::1/128"),
        ("::ffff:127.0.0.1", "127.0.0.1/32"),  # IPv4-mapped: the IPv4 address it reaches
        ("[::ffff:169.254.169.254]", "169.254.169.254/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("127.1", "127.0.0.1/32"),
    ],
)
def test_rules_are_normalised(text: str, normal: str) -> None:
    """A rule is written back in one spelling: CIDRs masked, names lower-cased."""
    assert policy.parse_rule(text) == normal


@pytest.mark.parametrize(
    "text", ["", "*", "a..b", "10.0.0.0/33", "http://x", "*.*.x", "a b", "[::g]", "[10.0.0.1]"]
)
def test_bad_rules_are_refused(text: str) -> None:
    """Anything that is neither a CIDR nor a host pattern is a ValueError."""
    with pytest.raises(ValueError, match="expected"):
        policy.parse_rule(text)


@pytest.mark.parametrize(
    ("rule", "host"),
    [
        ("[::1]", "::1"),
        ("[::1]", "[0:0::1]"),
        ("[0:0::1]", "[::1]"),
        ("0:0:0:0:0:0:0:1", "[::1]"),
        ("[::ffff:127.0.0.2]", "127.0.0.2"),
        ("[::ffff:127.0.0.2]", "[::ffff:127.0.0.2]"),
        ("::ffff:7f00:2", "[::ffff:7f00:2]"),
        ("::ffff:127.0.0.0/120", "127.0.0.9"),
        ("127.0.0.2", "[::ffff:127.0.0.2]"),
        ("127.2", "127.0.0.2"),
    ],
)
def test_ip_literal_rule_matches_every_spelling_of_the_destination(rule: str, host: str) -> None:
    """A rule in any IP spelling matches the address in any spelling, as deny and as allow."""
    denied = Destinations(Rules.parse([rule]), Rules.parse(()))
    with pytest.raises(DestinationDenied):
        DestinationCheck(denied, OwnAddresses()).host(host, 80)
    allowed = Destinations(Rules.parse(["0.0.0.0/0", "::/0"]), Rules.parse([rule]))
    DestinationCheck(allowed, OwnAddresses()).host(host, 80)


@pytest.mark.parametrize(
    ("bound", "host", "port", "loops"),
    [
        (("127.0.0.1", 3128), "127.0.0.1", 3128, True),
        (("127.0.0.1", 3128), "2130706433", 3128, True),
        (("127.0.0.1", 3128), "::ffff:127.0.0.1", 3128, True),
        (("127.0.0.1", 3128), "127.0.0.1", 3129, False),
        (("127.0.0.1", 3128), "127.0.0.2", 3128, False),
        (("0.0.0.0", 3128), "127.0.0.5", 3128, True),  # wildcard: any loopback address
        (("0.0.0.0", 3128), "10.0.0.1", 3128, False),
        (("::", 9901), "::1", 9901, True),
        (("::1", 9901), "::1", 9901, True),
    ],
)
def test_own_listeners_are_loops(bound: tuple[str, int], host: str, port: int, loops: bool) -> None:
    """A destination equal to a bound listener (any spelling) is a loop, even if allowed."""
    own = OwnAddresses()
    own.add(*bound)
    everything = Destinations(Rules.parse(()), Rules.parse(["0.0.0.0/0", "::/0"]))
    check = DestinationCheck(everything, own)
    if loops:
        with pytest.raises(LoopDetected):
            check.host(host, port)
    else:
        check.host(host, port)


@pytest.mark.parametrize(
    ("values", "loops"),
    [
        ([], False),
        (["1.1 tracing-proxy"], True),
        (["1.0 Tracing-Proxy"], True),
        (["HTTP/1.1 tracing-proxy (aiohttp)"], True),
        (["1.1 edge, 1.1 tracing-proxy"], True),
        (["1.1 edge", "1.1 tracing-proxy:3128"], False),  # another host:port, not our token
        (["1.1 edge (says 1.1 tracing-proxy, really)"], False),  # only in a comment
        (["1.1 tracing-proxy-2"], False),
        (["tracing-proxy"], False),  # no received-by: malformed, not ours
        (["1.1 edge,, 1.1 other"], False),
    ],
)
def test_via_loop_detection(values: list[str], loops: bool) -> None:
    """Only a Via entry whose received-by is our pseudonym marks the request as looping."""
    assert policy.via_loops(values, "tracing-proxy") is loops


def _basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("value", "credentials"),
    [
        (None, None),
        ("", None),
        (_basic(b"user:pw"), b"user:pw"),
        ("basic " + base64.b64encode(b"user:pw").decode(), b"user:pw"),  # scheme: any case
        ("  BASIC   " + base64.b64encode(b"u:p:w").decode(), b"u:p:w"),
        (_basic(b"no-colon"), None),
        ("Basic not*base64", None),
        ("Bearer abc", None),
        ("Basic", None),
    ],
)
def test_basic_credentials_are_parsed(value: str | None, credentials: bytes | None) -> None:
    """Only a Basic value whose token decodes to user:password yields credentials."""
    assert policy.basic_credentials(value) == credentials


@pytest.mark.parametrize(
    ("given", "matches"),
    [(b"alice:one", True), (b"bob:two:three", True), (b"alice:two", False), (b"alice:", False)],
)
def test_credentials_match_any_accepted(given: bytes, matches: bool) -> None:
    """Given credentials match when they equal one accepted user:password exactly."""
    accepted = [Credential.parse("alice:one").token, Credential.parse("bob:two:three").token]
    assert policy.credentials_match(given, accepted) is matches


@pytest.mark.parametrize("text", ["alice", "alice:", ":pw", ""])
def test_credentials_need_user_and_password(text: str) -> None:
    """A credential without a user, a colon or a password is refused."""
    with pytest.raises(ValueError, match="user:password"):
        Credential.parse(text)


def test_credential_repr_hides_the_password() -> None:
    """The password never shows in a repr (settings may be printed)."""
    assert "s3cret" not in repr(Credential.parse("alice:s3cret"))


@pytest.mark.parametrize(
    ("address", "permitted"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # a dual-stack listener sees IPv4 clients mapped
        ("10.0.0.1", False),
        ("::2", False),
        (None, False),
        ("not-an-address", False),
    ],
)
def test_default_clients_are_loopback(address: str | None, permitted: bool) -> None:
    """By default only loopback peers may use the proxy; an unknown peer may not."""
    assert policy.client_permitted(address, Rules.parse(Settings().allow_clients)) is permitted


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "field", "value"),
    [
        ([], {}, "allow_clients", ("127.0.0.0/8", "::1/128")),
        (["--allow-clients", "10.0.0.0/8, ::1"], {}, "allow_clients", ("10.0.0.0/8", "::1/128")),
        ([], {"PROXY_ALLOW_CLIENTS": "192.168.1.7"}, "allow_clients", ("192.168.1.7/32",)),
        (["--allow-clients", "[0:0::1]"], {}, "allow_clients", ("::1/128",)),
        (["--allow-clients", "::ffff:10.0.0.0/104"], {}, "allow_clients", ("10.0.0.0/8",)),
        (
            ["--deny-destinations", "[::1],[::ffff:127.0.0.2]"],
            {},
            "deny_destinations",
            (*policy.BUILTIN_DENIED, "::1/128", "127.0.0.2/32"),
        ),
        (
            ["--deny-destinations", "10.0.0.0/8,*.Internal"],
            {},
            "deny_destinations",
            (*policy.BUILTIN_DENIED, "10.0.0.0/8", "*.internal"),
        ),
        ([], {"PROXY_DENY_DESTINATIONS": ""}, "deny_destinations", policy.BUILTIN_DENIED),
        (
            [],
            {"PROXY_ALLOW_DESTINATIONS": "169.254.1.1"},
            "allow_destinations",
            ("169.254.1.1/32",),
        ),
        (["--proxy-auth", "u:p:w"], {}, "proxy_auth", Credential("u", "p:w")),
        ([], {"PROXY_PROXY_AUTH": "off"}, "proxy_auth", None),
    ],
)
def test_access_settings_from_flags_and_environment(
    argv: list[str], environ: dict[str, str], field: str, value: object
) -> None:
    """Each access setting reads from its flag or environment twin; built-in denials stay."""
    assert getattr(config.load(argv, environ), field) == value


@pytest.mark.parametrize(
    "argv",
    [
        ["--allow-clients", "everyone"],
        ["--allow-clients", "*.internal"],  # clients are addresses, not names
        ["--deny-destinations", "http://x"],
        ["--allow-destinations", "10.0.0.0/40"],
        ["--proxy-auth", "no-password"],
        ["--proxy-auth-file", "/nonexistent/users"],
    ],
)
def test_bad_access_settings_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A bad access setting exits with status 2 and a line naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        config.load(argv, {})
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_bad_credentials_file_line_is_reported_without_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad line in --proxy-auth-file is named by number; its text (a secret) is not shown."""
    path = tmp_path / "users"
    path.write_text("alice:one\nsecretvalue-without-colon\n")
    with pytest.raises(SystemExit):
        config.load(["--proxy-auth-file", str(path)], {})
    err = capsys.readouterr().err
    assert "line 2" in err
    assert "secretvalue" not in err
