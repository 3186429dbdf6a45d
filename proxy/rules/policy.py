"""Pure access rules: who may use the proxy, where it may connect, and when a request loops.

Rules are data (networks and host patterns); the checks are plain functions over them.
The I/O that applies them (the resolver, the connector, the request gate) is in
``proxy.wire.guard``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from proxy.rules.addresses import IPAddress, ip_literal
from proxy.rules.hostpatterns import HostPatterns, check_pattern

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Never dialled unless an allow rule says so: link-local (which holds the cloud metadata
# service at 169.254.169.254), AWS's IPv6 metadata address, and the unspecified
# addresses, which Linux connects to the local host.
BUILTIN_DENIED: Final = ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "0.0.0.0/8", "::/128")

LOOPBACK: Final = ("127.0.0.0/8", "::1/128")


# -- addresses in every spelling ---------------------------------------------------------------


def parse_ip(text: str) -> IPAddress | None:
    """The address ``text`` spells, however it spells it (``ip_literal``); None for a name.

    IPv4-mapped IPv6 is read as the IPv4 address it reaches.
    """
    address = ip_literal(text)
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or address
    return address


# -- IPv4 inside IPv6 ----------------------------------------------------------------------------

_V6 = ipaddress.IPv6Network
_MAPPED: Final = _V6("::ffff:0:0/96")  # RFC 4291 §2.5.5.2
_COMPATIBLE: Final = _V6("::/96")  # RFC 4291 §2.5.5.1 (deprecated, still routed by some stacks)
_NAT64_WELL_KNOWN: Final = _V6("64:ff9b::/96")  # RFC 6052 §2.1
_NAT64_LOCAL: Final = _V6("64:ff9b:1::/48")  # RFC 8215: operators pick a longer prefix inside
# RFC 6052 §2.2 prefix lengths that fit inside the /48: the IPv4 address sits after the prefix,
# skipping bits 64-71 (the "u" octet, zero), and the bits after it (the suffix) are zero.
_NAT64_LOCAL_LENGTHS: Final = (48, 56, 64, 96)
_LOW_32: Final = (1 << 32) - 1


def embedded_ipv4(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """Every IPv4 address an IPv6 address reaches through: each is checked like the address.

    IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 (RFC 6052, RFC 8215),
    6to4 ``2002:AABB:CCDD::/48`` (RFC 3056 §2) and a Teredo client (RFC 4380 §4). Inside
    ``64:ff9b:1::/48`` the prefix length is the operator's, so every well-formed reading counts.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    value = int(address)
    found: list[int] = []
    # The last 32 bits: mapped, compatible (:: and ::1 are IPv6's own), well-known NAT64.
    last_32 = address.ipv4_mapped is not None or address in _NAT64_WELL_KNOWN
    if last_32 or (address in _COMPATIBLE and value > 1):
        found.append(value & _LOW_32)
    elif address in _NAT64_LOCAL:
        found.extend(_nat64_readings(value))
    elif address.sixtofour is not None:
        found.append(int(address.sixtofour))
    elif address.teredo is not None:
        found.append(int(address.teredo[1]))
    return tuple(ipaddress.IPv4Address(v) for v in found)


def _nat64_readings(value: int) -> list[int]:
    """The IPv4 address at each well-formed RFC 6052 position; the zero reading is no address
    (it is how every shorter prefix looks when read as a /96)."""
    readings = []
    u_clear = (value >> 56) & 0xFF == 0
    without_u = ((value >> 64) << 56) | (value & ((1 << 56) - 1))  # 120 bits
    for length in _NAT64_LOCAL_LENGTHS:
        if length == 96:
            reading = value & _LOW_32  # the prefix spans the u octet
        elif u_clear and without_u & ((1 << (88 - length)) - 1) == 0:
            reading = (without_u >> (88 - length)) & _LOW_32
        else:
            continue
        if reading:
            readings.append(reading)
    return readings


# -- rules: networks and host-name patterns ----------------------------------------------------


def parse_network(text: str) -> Network | None:
    """The network a CIDR or a bare address names (a /32 or /128); None for anything else.

    The address may be spelled as ``parse_ip`` reads it: brackets, any IPv6 spelling, the
    legacy IPv4 forms. An IPv4-mapped network is the IPv4 network it maps, as a mapped
    destination or client is the IPv4 address it reaches: one spelling on both sides.
    """
    text, slash, prefix = text.strip().partition("/")
    address = ip_literal(text)
    if address is None:
        return None
    try:
        network = ipaddress.ip_network(f"{address}/{prefix}" if slash else address, strict=False)
    except ValueError:
        return None
    if isinstance(network, _V6) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        mapped = int(network.network_address) & _LOW_32
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_rule(text: str) -> str:
    """A rule in its normal spelling: a CIDR (a bare address is a /32 or /128) or a host
    pattern (``name``, ``*.domain``); raises ValueError for anything else."""
    network = parse_network(text)
    return check_pattern(text) if network is None else str(network)


@dataclass(frozen=True, slots=True)
class Rules:
    """Networks and host patterns; a destination matches if its address or its name does."""

    networks: tuple[Network, ...] = ()
    names: HostPatterns = field(default_factory=HostPatterns)

    @classmethod
    def parse(cls, items: Iterable[str]) -> Rules:
        networks: list[Network] = []
        patterns: list[str] = []
        for item in items:
            network = parse_network(item)
            if network is None:
                patterns.append(item)
            else:
                networks.append(network)
        return cls(tuple(networks), HostPatterns(patterns))

    def contains(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def matches(self, name: str | None, address: IPAddress | None) -> bool:
        # A trailing dot names the same host (an absolute name); it must not dodge a pattern.
        return (name is not None and self.names.matches(name.lower().rstrip("."))) or (
            address is not None and self.contains(address)
        )


@dataclass(frozen=True, slots=True)
class Destinations:
    """Where the proxy may connect: an allow rule beats a deny rule, anything else is allowed."""

    deny: Rules
    allow: Rules

    def permits(self, name: str | None, address: IPAddress | None) -> bool:
        """Allowed if an allow rule matches the name, the address or an IPv4 address inside
        it; else denied if a deny rule matches any of them."""
        addresses = (address, *embedded_ipv4(address)) if address is not None else (None,)
        if any(self.allow.matches(name, each) for each in addresses):
            return True
        return not any(self.deny.matches(name, each) for each in addresses)


# -- loops -------------------------------------------------------------------------------------


@dataclass(slots=True)
class OwnAddresses:
    """The proxy's bound listeners, filled in once they are bound (the app exists before)."""

    bound: set[tuple[IPAddress, int]] = field(default_factory=set)

    def add(self, host: str, port: int) -> None:
        address = parse_ip(host)
        if address is not None:
            self.bound.add((address, port))

    def contains(self, address: IPAddress, port: int) -> bool:
        for own, own_port in self.bound:
            # A wildcard listener is reached through every local address; loopback is the
            # part of that a rule can know without asking the interfaces.
            if own_port == port and (
                own == address or (own.is_unspecified and address.is_loopback)
            ):
                return True
        return False


# RFC 9110 §7.6.3: Via = #( received-protocol RWS received-by [ RWS comment ] ).
_COMMENT: Final = re.compile(r"\([^()]*\)")


def via_names(values: Iterable[str]) -> list[str]:
    """The received-by of each Via entry, lower-cased, in order."""
    names: list[str] = []
    for value in values:
        for entry in _COMMENT.sub("", value).split(","):
            words = entry.split()
            if len(words) >= 2:
                names.append(words[1].lower())
    return names


def via_loops(values: Iterable[str], pseudonym: str) -> bool:
    """True when a Via entry was added by a proxy with our pseudonym: we saw this request."""
    return pseudonym.lower() in via_names(values)


class DestinationDenied(Exception):
    """The proxy will not connect there; the message names the destination."""


class LoopDetected(Exception):
    """The destination is this proxy itself; the message names it."""


class UnusualSpelling(ValueError):
    """An allowed IPv4 address in a legacy form (``0x7f.1``): refused rather than guessed at."""


class AddressWithTrailingDot(UnusualSpelling):
    """An IPv4 address with a trailing dot (``127.0.0.1.``): neither an address nor a name.

    A resolver may read it as the address or look it up as a name; aiohttp refuses it.
    The address is checked first, so a denied one is refused as denied.
    """


@dataclass(frozen=True, slots=True)
class DestinationCheck:
    """Raises for a destination the proxy must not dial; loops are checked before rules."""

    destinations: Destinations
    own: OwnAddresses

    def host(self, host: str, port: int) -> None:
        """Before any lookup: an address literal in full, a host name by its patterns."""
        address = parse_ip(host)
        dotted = address is None and host.endswith(".") and ":" not in host
        if dotted:
            address = parse_ip(host[:-1])
            dotted = address is not None
        self.address(None if address is not None else host, address, port)
        if dotted:
            raise AddressWithTrailingDot(f"{host} means {address}; write it without the dot")
        if address is not None and ":" not in host and host != str(address):
            raise UnusualSpelling(f"{host} means {address}; write it that way")

    def address(self, name: str | None, address: IPAddress | None, port: int) -> None:
        if address is not None and self.own.contains(address, port):
            raise LoopDetected(f"{address}:{port} is this proxy")
        if not self.destinations.permits(name, address):
            shown = " -> ".join(str(part) for part in (name, address) if part is not None)
            raise DestinationDenied(f"{shown} is not an allowed destination")


# -- who may use the proxy ---------------------------------------------------------------------

# RFC 9110 §11.7.1: the challenge a proxy sends with 407.
CHALLENGE: Final = 'Basic realm="tracing-proxy"'


@dataclass(frozen=True, slots=True)
class Credential:
    """One ``user:password`` the proxy accepts; its repr never shows the password."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Credential:
        # RFC 7617 §2: the user-id cannot hold a colon; the password may.
        user, colon, password = text.partition(":")
        if not user or not colon or not password:
            raise ValueError("expected user:password with neither part empty")
        return cls(user, password)

    @property
    def token(self) -> bytes:
        return f"{self.user}:{self.password}".encode()


def basic_credentials(value: str | None) -> bytes | None:
    """The ``user:password`` bytes of a Basic Proxy-Authorization value, None if not Basic.

    RFC 9110 §11.1: the scheme name is case-insensitive; RFC 7617 §2: the token is the
    base64 of ``user-id ":" password``.
    """
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if b":" in decoded else None


def credentials_match(given: bytes, accepted: Sequence[bytes]) -> bool:
    """Constant-time comparison against every accepted ``user:password``, never stopping early."""
    found = False
    for expected in accepted:
        found |= hmac.compare_digest(given, expected)
    return found


def client_permitted(address: str | None, allowed: Rules) -> bool:
    """Whether a peer address may use the proxy; an unknown peer may not."""
    parsed = parse_ip(address) if address is not None else None
    return parsed is not None and allowed.contains(parsed)
