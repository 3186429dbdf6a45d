"""Frozen settings, read from CLI flags with a ``PROXY_*`` environment twin for each.

Precedence: flag, then environment, then default. A bad value, wherever it came from,
exits with status 2 and one line that names the flag and its environment variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from proxy import __version__
from proxy.rules.hostpatterns import PatternError, check_pattern
from proxy.rules.policy import BUILTIN_DENIED, LOOPBACK, Credential, parse_network, parse_rule
from proxy.tls.contexts import check_ca_file

DEFAULT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Address = Address("127.0.0.1", 3128)
    admin_listen: Address | None = Address("127.0.0.1", 9901)
    pool_limit: int = 1024
    pool_limit_per_host: int = 256
    upstream_keepalive_timeout: float = 15.0
    dns_cache_ttl: int = 10
    dns_servers: tuple[str, ...] = ()
    dns_timeout: float = 5.0
    connect_timeout: float = 5.0
    response_headers_timeout: float = 60.0
    read_idle_timeout: float = 300.0
    client_idle_timeout: float = 75.0
    request_id_header: str = "X-Request-ID"
    via_pseudonym: str = "tracing-proxy"
    histogram_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    log_format: str = "json"
    log_level: str = "info"
    log_query: bool = False
    observe: bool = True
    exemplars: bool = True
    live_page: bool = True
    event_loop: str = "uvloop"
    shutdown_grace: float = 5.0
    drain_timeout: float = 30.0
    connect_ports: tuple[int, ...] = (443,)
    tunnel_idle_timeout: float = 900.0
    max_request_header_size: int = 65536
    max_request_target_length: int = 8192
    request_header_timeout: float = 10.0
    max_client_connections: int = 10000
    pool_wait_timeout: float = 10.0
    max_hosts: int = 1000
    track_hosts: tuple[str, ...] = ()
    host_label_ttl: float = 600.0
    allow_clients: tuple[str, ...] = LOOPBACK
    proxy_auth: Credential | None = None
    proxy_auth_file: tuple[Credential, ...] = ()
    deny_destinations: tuple[str, ...] = BUILTIN_DENIED
    allow_destinations: tuple[str, ...] = ()
    otlp_endpoint: str | None = None
    otlp_service_name: str = "tracing-proxy"
    otlp_sample_ratio: float = 1.0
    otlp_batch_size: int = 512
    otlp_queue_size: int = 2048
    otlp_export_interval: float = 5.0
    otlp_export_timeout: float = 10.0
    upgrade_to_https: tuple[str, ...] = ()
    upstream_ca_file: str = ""
    connect_http_ports: tuple[int, ...] = (80,)
    intercept: tuple[str, ...] = ()
    ca_cert: str = ""
    ca_key: str = ""
    intercept_splice_seconds: float = 300.0
    http2: bool = True
    http2_max_concurrent_streams: int = 100


class SettingError(ValueError):
    """A value that cannot be used; the message says what was expected."""


# -- converters: str -> value, raising SettingError -------------------------------------------


def parse_address(text: str) -> Address:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]*):(\d{1,5})", text.strip())
    if not match:
        raise SettingError(f"expected HOST:PORT or [IPv6]:PORT, got {text!r}")
    host = match.group(1) or match.group(3) or "0.0.0.0"
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise SettingError(f"port out of range in {text!r}")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SettingError(f"not an IPv6 address in {text!r}") from None
    return Address(host, port)


def parse_optional_address(text: str) -> Address | None:
    return None if text.strip().lower() in ("", "off", "none") else parse_address(text)


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SettingError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def parse_positive_seconds(text: str) -> float:
    value = parse_seconds(text)
    if value == 0:
        raise SettingError(f"expected a number of seconds > 0, got {text!r}")
    return value


def parse_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SettingError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise SettingError(f"expected a whole number >= 0, got {text!r}")
    return value


def parse_positive_count(text: str) -> int:
    value = parse_count(text)
    if value == 0:
        raise SettingError(f"expected a whole number > 0, got {text!r}")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"expected true or false, got {text!r}")


def parse_dns_servers(text: str) -> tuple[str, ...]:
    """Comma-separated ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``; empty means the system's."""
    servers: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host = item
        if item.startswith("["):
            host = item[1:].partition("]")[0]
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise SettingError(f"bad port in {item!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise SettingError(f"expected IP[:PORT] addresses, got {item!r}") from None
        servers.append(item)
    return tuple(servers)


def parse_ports(text: str) -> tuple[int, ...]:
    """Comma-separated TCP ports, 1-65535; empty allows none."""
    ports: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if not re.fullmatch(r"[0-9]{1,5}", item) or not 0 < int(item) < 65536:
            raise SettingError(f"expected ports 1-65535, got {item!r}")
        ports.add(int(item))
    return tuple(sorted(ports))


def parse_host_patterns(text: str) -> tuple[str, ...]:
    """Comma-separated host names or ``*.domain`` patterns; empty means none."""
    try:
        return tuple(check_pattern(item) for item in text.split(",") if item.strip())
    except PatternError as exc:
        raise SettingError(str(exc)) from None


def parse_networks(text: str) -> tuple[str, ...]:
    """Comma-separated CIDRs (a bare address is a /32 or /128); empty means none."""
    networks: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        network = parse_network(item)
        if network is None:
            raise SettingError(f"expected CIDRs such as 10.0.0.0/8, got {item!r}")
        networks.append(str(network))
    return tuple(networks)


def parse_destinations(text: str) -> tuple[str, ...]:
    """Comma-separated CIDRs and host patterns (``name``, ``*.domain``); empty means none."""
    try:
        return tuple(parse_rule(item) for item in text.split(",") if item.strip())
    except ValueError as exc:
        raise SettingError(str(exc)) from None


def parse_deny_destinations(text: str) -> tuple[str, ...]:
    """The built-in denials always stay; what is given is denied as well."""
    return tuple(dict.fromkeys(BUILTIN_DENIED + parse_destinations(text)))


def parse_credential(text: str) -> Credential | None:
    if text.strip().lower() in ("", "off", "none"):
        return None
    try:
        return Credential.parse(text)
    except ValueError as exc:
        raise SettingError(str(exc)) from None


def parse_credential_file(path: str) -> tuple[Credential, ...]:
    """``user:password`` lines; blank lines and lines starting with # are skipped."""
    if not path.strip():
        return ()
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(f"cannot read {path!r}: {exc}") from None
    credentials: list[Credential] = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                credentials.append(Credential.parse(line))
            except ValueError as exc:  # the message never repeats the line: it holds a secret
                raise SettingError(f"{path} line {number}: {exc}") from None
    if not credentials:
        raise SettingError(f"{path} holds no user:password line")
    return tuple(credentials)


def parse_ca_file(path: str) -> str:
    """A PEM file of CA certificates, trusted on top of the system store; empty: none."""
    if not path.strip():
        return ""
    try:
        check_ca_file(path)
    except (OSError, ssl.SSLError) as exc:
        raise SettingError(f"cannot load CA certificates from {path!r}: {exc}") from None
    return path


def parse_path(text: str) -> str:
    """A file path; read later (``proxy.tls.certs`` checks the CA), empty means none."""
    return text.strip()


def parse_buckets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SettingError(f"expected comma-separated seconds, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise SettingError(f"expected positive finite bounds, got {text!r}")
    if list(values) != sorted(set(values)):
        raise SettingError(f"bounds must be strictly increasing, got {text!r}")
    return values


def parse_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise SettingError(f"expected a number from 0 to 1, got {text!r}")
    return value


def parse_url(text: str) -> str:
    """An http:// or https:// URL with a host, used as it is."""
    url = text.strip()
    match = re.fullmatch(r"(?i)https?://([^/?#@\s]+)([^?#\s]*)", url)
    if match is None or match.group(1).startswith(":"):
        raise SettingError(f"expected an http:// or https:// URL, got {text!r}")
    return url


def parse_otlp_base(text: str) -> str:
    """The OTLP/HTTP base URL: /v1/traces is appended (OpenTelemetry exporter spec)."""
    return parse_url(text).rstrip("/") + "/v1/traces"


def parse_otlp_endpoint(text: str) -> str | None:
    """A URL without a path gets /v1/traces; one with a path is used as it is."""
    if text.strip().lower() in ("", "off", "none"):
        return None
    url = parse_url(text)
    path = re.fullmatch(r"(?i)https?://[^/]+(.*)", url)
    return parse_otlp_base(url) if path is None or path.group(1) in ("", "/") else url


def parse_service_name(text: str) -> str:
    if not text.strip():
        raise SettingError("expected a service name, got an empty one")
    return text.strip()


# RFC 9110 §5.1: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_header_name(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise SettingError(f"expected an HTTP field name, got {text!r}")
    return text


def parse_pseudonym(text: str) -> str:
    # RFC 9110 §7.6.3: received-by is a pseudonym token, or host[:port].
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z:\[\]-]+", text):
        raise SettingError(f"expected a token for the Via pseudonym, got {text!r}")
    return text


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise SettingError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    return parse


# -- the table: one row per setting -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option:
    field: str
    parse: Callable[[str], Any]
    help: str
    metavar: str = "VALUE"
    empty: str = "(none)"  # what an empty default means, for --help and the README

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return "PROXY_" + self.field.upper()

    @property
    def default_text(self) -> str:
        value = getattr(Settings(), self.field)
        if value == () or value == "":
            return self.empty
        if isinstance(value, tuple):
            return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if value is None:
            return "off"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)


OPTIONS: tuple[Option, ...] = (
    Option("listen", parse_address, "proxy listener", "HOST:PORT"),
    Option(
        "admin_listen",
        parse_optional_address,
        "admin listener for /metrics, /healthz, /readyz and the live page ('off' to disable)",
        "HOST:PORT",
    ),
    Option("pool_limit", parse_count, "upstream connections in total (0 = unlimited)", "N"),
    Option(
        "pool_limit_per_host", parse_count, "upstream connections per host (0 = unlimited)", "N"
    ),
    Option(
        "upstream_keepalive_timeout",
        parse_positive_seconds,
        "seconds an idle pooled upstream connection is kept",
        "SECONDS",
    ),
    Option(
        "dns_cache_ttl",
        parse_count,
        "seconds the proxy caches a DNS answer (0 = no cache of its own; see docs/settings.md)",
        "SECONDS",
    ),
    Option(
        "dns_servers",
        parse_dns_servers,
        "DNS servers to ask, IP[:PORT],... ('(system)': those in resolv.conf)",
        "ADDRS",
        empty="(system)",
    ),
    Option("dns_timeout", parse_positive_seconds, "seconds to wait for a DNS answer", "SECONDS"),
    Option("connect_timeout", parse_positive_seconds, "seconds to open a connection", "SECONDS"),
    Option(
        "response_headers_timeout",
        parse_positive_seconds,
        "seconds from the end of the request to the response headers",
        "SECONDS",
    ),
    Option(
        "read_idle_timeout",
        parse_positive_seconds,
        "seconds without a byte from the upstream before giving up",
        "SECONDS",
    ),
    Option(
        "client_idle_timeout",
        parse_positive_seconds,
        "seconds an idle client keep-alive connection is kept",
        "SECONDS",
    ),
    Option("request_id_header", parse_header_name, "request id header name", "NAME"),
    Option("via_pseudonym", parse_pseudonym, "name this proxy adds to Via", "NAME"),
    Option("histogram_buckets", parse_buckets, "histogram upper bounds in seconds", "S,S,..."),
    Option("log_format", choice("json", "console"), "access log format: json or console", "FORMAT"),
    Option(
        "log_level",
        choice("debug", "info", "warning", "error"),
        "debug, info, warning or error (access lines are info)",
        "LEVEL",
    ),
    Option(
        "log_query",
        parse_bool,
        "log the query string with the path (signing values redacted)",
        "BOOL",
    ),
    Option(
        "observe",
        parse_bool,
        "tracing, metrics and access log (false only to measure their cost)",
        "BOOL",
    ),
    Option(
        "exemplars",
        parse_bool,
        "trace and request id of the latest observation per histogram bucket (OpenMetrics)",
        "BOOL",
    ),
    Option(
        "live_page",
        parse_bool,
        "the live page on the admin listener (/, /api/*) and the rings of recent calls it shows",
        "BOOL",
    ),
    Option("event_loop", choice("uvloop", "asyncio"), "event loop: uvloop or asyncio", "LOOP"),
    Option(
        "shutdown_grace",
        parse_seconds,
        "after SIGTERM, seconds to keep serving new requests",
        "SECONDS",
    ),
    Option(
        "drain_timeout",
        parse_seconds,
        "after the grace, seconds to wait for in-flight requests",
        "SECONDS",
    ),
    Option(
        "connect_ports",
        parse_ports,
        "ports CONNECT may open tunnels to (empty: none)",
        "PORT,...",
    ),
    Option(
        "tunnel_idle_timeout",
        parse_positive_seconds,
        "seconds a tunnel may carry no bytes either way before it is closed",
        "SECONDS",
    ),
    Option(
        "max_request_header_size",
        parse_positive_count,
        "bytes a request head (request line and fields) may take (431 beyond)",
        "BYTES",
    ),
    Option(
        "max_request_target_length",
        parse_positive_count,
        "bytes a request target may take (414 beyond)",
        "BYTES",
    ),
    Option(
        "request_header_timeout",
        parse_positive_seconds,
        "seconds a client has to send a complete request head (408 and close beyond)",
        "SECONDS",
    ),
    Option(
        "max_client_connections",
        parse_count,
        "client connections open at once; more are closed at once (0 = unlimited)",
        "N",
    ),
    Option(
        "pool_wait_timeout",
        parse_positive_seconds,
        "seconds a request may wait for a free upstream connection (503 beyond)",
        "SECONDS",
    ),
    Option(
        "max_hosts",
        parse_count,
        'distinct host label values in the metrics; later hosts count as host="other"',
        "N",
    ),
    Option(
        "track_hosts",
        parse_host_patterns,
        "hosts that always get their own label, past --max-hosts (names, *.domain)",
        "HOST,...",
    ),
    Option(
        "host_label_ttl",
        parse_positive_seconds,
        "seconds a host label may go unused before its series are dropped",
        "SECONDS",
    ),
    Option(
        "allow_clients",
        parse_networks,
        "client networks that may use the proxy listener, endpoints included",
        "CIDR,...",
    ),
    Option(
        "proxy_auth",
        parse_credential,
        "require Basic proxy credentials for proxying (407 otherwise)",
        "USER:PASSWORD",
    ),
    Option(
        "proxy_auth_file",
        parse_credential_file,
        "file of user:password lines, each accepted as proxy credentials",
        "PATH",
    ),
    Option(
        "deny_destinations",
        parse_deny_destinations,
        "destinations never dialled, CIDRs and host patterns (added to the defaults)",
        "RULE,...",
    ),
    Option(
        "allow_destinations",
        parse_destinations,
        "destinations dialled even when a deny rule matches (CIDRs, host patterns)",
        "RULE,...",
    ),
    Option(
        "upgrade_to_https",
        parse_host_patterns,
        "hosts whose http:// requests go upstream as https:// (443 unless a port is given)",
        "HOST,...",
    ),
    Option(
        "upstream_ca_file",
        parse_ca_file,
        "PEM file of CA certificates trusted for upstreams, on top of the system store",
        "PATH",
        empty="(system store only)",
    ),
    Option(
        "connect_http_ports",
        parse_ports,
        "ports CONNECT may reach only to carry plain HTTP, served as forwarded requests",
        "PORT,...",
    ),
    Option(
        "intercept",
        parse_host_patterns,
        "CONNECT hosts whose TLS is terminated with a minted certificate (names, *.domain)",
        "HOST,...",
    ),
    Option("ca_cert", parse_path, "CA certificate that signs minted certificates", "PATH"),
    Option("ca_key", parse_path, "that CA's private key (mode 0600)", "PATH"),
    Option(
        "intercept_splice_seconds",
        parse_seconds,
        "after a client rejects a minted certificate, seconds its host is only tunnelled",
        "SECONDS",
    ),
    Option(
        "http2",
        parse_bool,
        "serve HTTP/2 inside CONNECTs: ALPN h2 when intercepting, and the h2c preface",
        "BOOL",
    ),
    Option(
        "http2_max_concurrent_streams",
        parse_positive_count,
        "streams one client HTTP/2 connection may have open at once",
        "N",
    ),
    Option(
        "otlp_endpoint",
        parse_otlp_endpoint,
        "export spans over OTLP/HTTP protobuf to this URL (no path: /v1/traces is added); "
        "also read from OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT",
        "URL",
    ),
    Option(
        "otlp_service_name",
        parse_service_name,
        "service.name of the exported spans; also read from OTEL_SERVICE_NAME",
        "NAME",
    ),
    Option(
        "otlp_sample_ratio",
        parse_ratio,
        "share of the traces the proxy starts that it records (an incoming traceparent's "
        "sampled flag decides for the others)",
        "RATIO",
    ),
    Option("otlp_batch_size", parse_positive_count, "spans per OTLP export request", "N"),
    Option(
        "otlp_queue_size",
        parse_positive_count,
        "spans waiting for export at most; more are dropped and counted",
        "N",
    ),
    Option(
        "otlp_export_interval",
        parse_positive_seconds,
        "seconds between exports when no full batch is waiting",
        "SECONDS",
    ),
    Option(
        "otlp_export_timeout",
        parse_positive_seconds,
        "seconds one OTLP export request may take",
        "SECONDS",
    ),
)

# The standard OpenTelemetry variables, read when neither the flag nor its PROXY_* twin is
# set; for one setting, the first that is present wins.
STANDARD_ENV: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("otlp_endpoint", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", parse_url),
    ("otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", parse_otlp_base),
    ("otlp_service_name", "OTEL_SERVICE_NAME", parse_service_name),
)


def option(field: str) -> Option:
    """The table row of one setting."""
    return next(o for o in OPTIONS if o.field == field)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit 2: the same contract as a bad setting value.
        self.exit(2, f"{self.prog}: error: {message}\n")


USAGE = """tracing-proxy [--FLAG VALUE ...]
       tracing-proxy ca DIR
       tracing-proxy --version"""

COMMANDS = """commands:
  tracing-proxy ca DIR  write a new interception CA into DIR, for --intercept
                        (tracing-proxy ca --help)

Every flag has an environment twin, shown in brackets; the flag wins.
Flags are spelled in full, as their twins are."""


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: a prefix that works today would change meaning with a new flag, and a
    # typo such as --upgrade-to-http would pass unnoticed; unknown flags get a suggestion.
    parser = _Parser(
        prog="tracing-proxy",
        usage=USAGE,
        description="Forward HTTP proxy with per-host timing histograms on /metrics.",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"tracing-proxy {__version__}")
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.field,
            metavar=option.metavar,
            default=None,
            help=f"{option.help} [{option.env}] (default: {option.default_text})",
        )
    return parser


def build_ca_parser() -> argparse.ArgumentParser:
    """``tracing-proxy ca DIR``: its own usage, --help and one-line errors."""
    parser = _Parser(
        prog="tracing-proxy ca",
        description="Write a new interception CA for --intercept: DIR/ca.pem, the certificate "
        "to give to clients, and DIR/ca-key.pem, its private key (mode 0600). DIR is created "
        "(mode 0700) if missing; existing files are never overwritten.",
        allow_abbrev=False,
    )
    parser.add_argument("directory", metavar="DIR", help="where to write the two files")
    return parser


def unknown_flags_message(extras: Sequence[str]) -> str:
    """argparse's complaint about ``extras``, with the closest real flag for each unknown one.

    As ``unknown_environment`` does for ``PROXY_*`` variables: a typo names its fix.
    """
    known = ["--version", "--help", *(option.flag for option in OPTIONS)]
    hints = []
    for extra in extras:
        name = extra.partition("=")[0]
        if name.startswith("--") and (found := closest(name, known)) is not None:
            hints.append(f"{name}: did you mean {found}?")
    message = f"unrecognized arguments: {' '.join(extras)}"
    return f"{message} ({'; '.join(hints)})" if hints else message


def load(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Settings from argv and environ; on a bad value print one line and exit 2."""
    parser = build_parser()
    namespace, extras = parser.parse_known_args(list(argv))
    if extras:
        parser.error(unknown_flags_message(extras))
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = getattr(namespace, option.field)
        if raw is None:
            raw = environ.get(option.env)
        if raw is None:
            continue
        try:
            values[option.field] = option.parse(raw)
        except SettingError as exc:
            parser.exit(2, error_line(option.field, str(exc)))
    for field, env, parse in STANDARD_ENV:
        raw = environ.get(env)
        if field in values or raw is None or (field == "otlp_endpoint" and not raw.strip()):
            continue
        try:
            values[field] = parse(raw)
        except SettingError as exc:
            parser.exit(2, f"{parser.prog}: error: {env}: {exc}\n")
    settings = Settings(**values)
    if settings.intercept:
        for field in ("ca_cert", "ca_key"):
            if not getattr(settings, field):
                parser.exit(2, error_line(field, "--intercept needs a CA (tracing-proxy ca DIR)"))
    return settings


def error_line(field: str, message: str) -> str:
    """The one line a bad setting exits with: the flag, its environment twin, what is wrong."""
    row = option(field)
    return f"tracing-proxy: error: {row.flag} ({row.env}): {message}\n"


def load_from_process() -> Settings:
    return load(sys.argv[1:], os.environ)


def ignored_settings(settings: Settings) -> list[tuple[str, str]]:
    """Settings that were given but take no effect, each with why (flag and twin, reason)."""
    if settings.intercept:
        return []
    return [
        (f"{row.flag} ({row.env})", "takes effect only with --intercept (PROXY_INTERCEPT)")
        for row in map(option, ("ca_cert", "ca_key"))
        if getattr(settings, row.field)
    ]


def unknown_environment(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``PROXY_*`` variables no setting reads, each with the closest known name (or None).

    A typo such as ``PROXY_LISTN`` would otherwise be ignored without a word.
    """
    known = [option.env for option in OPTIONS]
    return [
        (name, closest(name, known))
        for name in sorted(environ)
        if name.startswith("PROXY_") and name not in known
    ]


def closest(name: str, known: Sequence[str]) -> str | None:
    """The known name a mistyped ``name`` most likely meant; None when none is close."""
    return next(iter(difflib.get_close_matches(name, known, n=1)), None)


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy with some fields changed (tests and benchmarks build variants this way)."""
    return dataclasses.replace(settings, **changes)
