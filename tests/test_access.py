"""Who may use the proxy, where it may go, and loops, through the real listener.

Denied destinations here are loopback addresses (127.0.0.2) with a listener that counts
connections, so a broken denial shows as a connection and never leaves the machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy import config
from proxy.rules.policy import Credential
from tests.conftest import LogCapture, Origin, RunningProxy, http_request, read_head
from tests.dns import start_dns, stop_dns
from tests.test_forwarding import curl

StartProxy = Callable[..., Awaitable[RunningProxy]]
DENIED_HOST = "127.0.0.2"  # loopback, so a denial that fails still stays on this machine


# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    fields: dict[str, str]  # lower-case names
    body: bytes


class Connection:
    """One client connection to the proxy listener, from a chosen loopback source address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, proxy: RunningProxy, source: str = "127.0.0.1") -> Connection:
        assert proxy.server.proxy_address is not None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, local_addr=(source, 0)
        )
        return cls(reader, writer)

    async def ask(self, data: bytes, *, body: bool = True) -> Answer:
        """Send ``data``; read one response head and (when ``body``) its Content-Length body."""
        self.writer.write(data)
        await self.writer.drain()
        head = await asyncio.wait_for(read_head(self.reader), 10)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        fields: dict[str, str] = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
        length = int(fields.get("content-length", "0")) if body else 0
        content = await asyncio.wait_for(self.reader.readexactly(length), 10)
        return Answer(int(status_line.split(" ")[1]), fields, content)

    async def closed(self) -> bool:
        """True when the proxy closes the connection (nothing more arrives)."""
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    def close(self) -> None:
        self.writer.close()


async def ask(proxy: RunningProxy, data: bytes, source: str = "127.0.0.1") -> Answer:
    connection = await Connection.open(proxy, source)
    try:
        return await connection.ask(data)
    finally:
        connection.close()


@dataclass
class Trap:
    """A listener that counts connections and answers each request with 200 ``trap``."""

    host: str
    port: int = 0
    connections: int = 0
    server: asyncio.Server | None = field(default=None, repr=False)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\ntrap")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def trap_on(host: str) -> AsyncIterator[Trap]:
    """A ``Trap`` listening on ``host``."""
    state = Trap(host)
    state.server = await asyncio.start_server(state.handle, host, 0)
    state.port = state.server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        state.server.close()
        await asyncio.wait_for(state.server.wait_closed(), 10)


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    async with trap_on(DENIED_HOST) as state:
        yield state


def basic(user_password: str) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(user_password.encode()).decode()


def deny(*rules: str) -> tuple[str, ...]:
    return config.parse_deny_destinations(",".join(rules))


def connect(authority: str, *fields: str) -> bytes:
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- who may use it ----------------------------------------------------------------------------


async def test_client_outside_allow_clients_gets_403_and_is_disconnected(
    start_proxy: StartProxy, trap: Trap, logs: LogCapture
) -> None:
    """A peer outside --allow-clients gets 403 http_request_denied, is counted and cut off."""
    proxy = await start_proxy(allow_clients=("127.0.0.2/32",))
    connection = await Connection.open(proxy, source="127.0.0.1")
    answer = await connection.ask(http_request("GET", f"http://{trap.authority}/", close=False))
    assert answer.status == 403
    assert answer.fields["proxy-status"] == "tracing-proxy; error=http_request_denied"
    assert await connection.closed()
    connection.close()
    assert trap.connections == 0
    assert proxy.sample("proxy_denied_total", reason="client") == 1
    (line,) = await logs.wait_for("rejected")
    assert (line["status"], line["error"], line["client"]) == (
        403,
        "http_request_denied",
        "127.0.0.1",
    )


async def test_client_inside_allow_clients_is_served(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """A peer whose address is in --allow-clients is forwarded as usual."""
    proxy = await start_proxy(allow_clients=("127.0.0.3/32",))
    answer = await ask(proxy, http_request("GET", origin.url("/echo")), source="127.0.0.3")
    assert answer.status == 200
    assert json.loads(answer.body)["target"] == "/echo"
    assert proxy.sample("proxy_denied_total", reason="client") is None


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_local_endpoints_obey_allow_clients(start_proxy: StartProxy, path: str) -> None:
    """The proxy port's own endpoints answer 403 to a client outside --allow-clients."""
    proxy = await start_proxy(allow_clients=("127.0.0.2/32",))
    assert (await ask(proxy, http_request("GET", path), source="127.0.0.1")).status == 403
    assert (await ask(proxy, http_request("GET", path), source="127.0.0.2")).status == 200


async def test_curl_without_or_with_wrong_credentials_gets_407(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """With --proxy-auth, no or wrong credentials get 407 and a Basic challenge; each is counted."""
    proxy = await start_proxy(proxy_auth=Credential("user", "pw"))
    for credentials in ([], ["-U", "user:wrong"], ["-U", "other:pw"]):
        code, out, err = await curl(
            "-x", proxy.url, *credentials, "-D", "-", "-o", "/dev/null", origin.url("/echo")
        )
        assert code == 0, err
        head = out.decode("latin-1")
        assert head.startswith("HTTP/1.1 407 "), head
        assert 'Proxy-Authenticate: Basic realm="tracing-proxy"' in head
        assert "Proxy-Status: tracing-proxy; error=http_request_denied" in head
    assert proxy.sample("proxy_denied_total", reason="auth_missing") == 1
    assert proxy.sample("proxy_denied_total", reason="auth_invalid") == 2


async def test_curl_with_the_right_credentials_is_forwarded_without_them(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """Right credentials are forwarded to the origin with no Proxy-Authorization left on them."""
    proxy = await start_proxy(proxy_auth=Credential("user", "p:w"))
    code, out, err = await curl("-x", proxy.url, "-U", "user:p:w", origin.url("/echo"))
    assert code == 0, err
    names = [name.lower() for name, _ in json.loads(out)["headers"]]
    assert "proxy-authorization" not in names
    assert proxy.sample("proxy_denied_total", reason="auth_missing") is None


async def test_proxy_authorization_is_never_forwarded(proxy: RunningProxy, origin: Origin) -> None:
    """Without --proxy-auth a client's Proxy-Authorization still stops at the proxy."""
    answer = await ask(proxy, http_request("GET", origin.url("/echo"), basic("a:b")))
    names = [name.lower() for name, _ in json.loads(answer.body)["headers"]]
    assert "proxy-authorization" not in names


async def test_a_407_keeps_the_connection_for_the_retry(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """After a 407 the client can send credentials on the same connection."""
    proxy = await start_proxy(proxy_auth=Credential("user", "pw"))
    connection = await Connection.open(proxy)
    first = await connection.ask(http_request("GET", origin.url("/echo"), close=False))
    second = await connection.ask(http_request("GET", origin.url("/echo"), basic("user:pw")))
    connection.close()
    assert (first.status, second.status) == (407, 200)


async def test_credentials_file_accepts_each_line(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    """Every user:password line of --proxy-auth-file is accepted; other pairs are not."""
    path = tmp_path / "users"
    path.write_text("# users\nalice:one\n\nbob:two\n")
    settings = config.load(["--proxy-auth-file", str(path)], {})
    proxy = await start_proxy(proxy_auth_file=settings.proxy_auth_file)
    for pair, status in (("alice:one", 200), ("bob:two", 200), ("alice:two", 407)):
        answer = await ask(proxy, http_request("GET", origin.url("/echo"), basic(pair)))
        assert answer.status == status, pair


async def test_connect_needs_credentials_too(start_proxy: StartProxy, trap: Trap) -> None:
    """CONNECT without credentials gets 407 and the connection is closed; nothing is dialled."""
    proxy = await start_proxy(proxy_auth=Credential("user", "pw"), connect_ports=(trap.port,))
    connection = await Connection.open(proxy)
    answer = await connection.ask(connect(trap.authority))
    assert answer.status == 407
    assert answer.fields["proxy-authenticate"] == 'Basic realm="tracing-proxy"'
    assert await connection.closed()
    connection.close()
    assert trap.connections == 0


async def test_connect_with_credentials_opens_the_tunnel(
    start_proxy: StartProxy, origin: Origin
) -> None:
    """CONNECT with the right credentials is answered 200 and carries bytes."""
    port = origin.port
    proxy = await start_proxy(proxy_auth=Credential("user", "pw"), connect_ports=(port,))
    connection = await Connection.open(proxy)
    answer = await connection.ask(connect(origin.authority, basic("user:pw")), body=False)
    assert answer.status == 200
    reply = await connection.ask(http_request("GET", "/echo", host=origin.authority))
    connection.close()
    assert json.loads(reply.body)["target"] == "/echo"


async def test_local_endpoints_need_no_credentials(start_proxy: StartProxy) -> None:
    """/metrics on the proxy port answers without Proxy-Authorization."""
    proxy = await start_proxy(proxy_auth=Credential("user", "pw"))
    assert (await ask(proxy, http_request("GET", "/metrics"))).status == 200


# -- where it may go ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [DENIED_HOST, "2130706434", "0177.0.0.2", "0x7f.0.0.2", "127.2", "[::ffff:127.0.0.2]"],
)
async def test_denied_address_gets_403_in_any_spelling_and_is_not_dialled(
    start_proxy: StartProxy, trap: Trap, logs: LogCapture, host: str
) -> None:
    """A denied address, however spelled, is answered 403 and never connected to."""
    proxy = await start_proxy(deny_destinations=deny("127.0.0.2/32"))
    answer = await ask(proxy, http_request("GET", f"http://{host}:{trap.port}/x"))
    assert answer.status == 403
    assert answer.fields["proxy-status"].startswith(
        "tracing-proxy; error=destination_ip_prohibited"
    )
    assert trap.connections == 0
    (line,) = await logs.wait_for("access")
    assert (line["status"], line["error"]) == (403, "destination_ip_prohibited")
    error = "destination_ip_prohibited"
    assert proxy.sample("proxy_upstream_errors_total", host=line["host"], error=error) == 1


@pytest.mark.parametrize(
    ("rule", "listening", "target"),
    [
        ("[::1]", "::1", "[::1]"),
        ("[0:0::1]", "::1", "[::1]"),
        ("::1", "::1", "[0:0::1]"),
        ("[::ffff:127.0.0.2]", DENIED_HOST, DENIED_HOST),
        ("[::ffff:127.0.0.2]", DENIED_HOST, "[::ffff:7f00:2]"),
    ],
)
async def test_bracketed_or_unusual_ipv6_deny_rule_is_not_dialled(
    start_proxy: StartProxy, rule: str, listening: str, target: str
) -> None:
    """--deny-destinations "[::1]" (any IPv6 spelling) denies that address in any spelling."""
    settings = config.load(["--deny-destinations", rule], {})
    async with trap_on(listening) as denied:
        proxy = await start_proxy(deny_destinations=settings.deny_destinations)
        answer = await ask(proxy, http_request("GET", f"http://{target}:{denied.port}/x"))
        assert (answer.status, denied.connections) == (403, 0)
        assert answer.fields["proxy-status"].startswith(
            "tracing-proxy; error=destination_ip_prohibited"
        )


async def test_bracketed_ipv6_allow_rule_beats_the_deny_rule(start_proxy: StartProxy) -> None:
    """--allow-destinations "[0:0::1]" lets [::1] through a deny rule on it."""
    settings = config.load(["--deny-destinations", "::1", "--allow-destinations", "[0:0::1]"], {})
    async with trap_on("::1") as allowed:
        proxy = await start_proxy(
            deny_destinations=settings.deny_destinations,
            allow_destinations=settings.allow_destinations,
        )
        answer = await ask(proxy, http_request("GET", f"http://[::1]:{allowed.port}/x"))
    assert (answer.status, answer.body, allowed.connections) == (200, b"trap", 1)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1"])
async def test_allowed_address_in_a_legacy_spelling_gets_400(
    proxy: RunningProxy, origin: Origin, host: str
) -> None:
    """An allowed IPv4 address written in a legacy form is refused with 400, not guessed at."""
    answer = await ask(proxy, http_request("GET", f"http://{host}:{origin.port}/echo"))
    assert answer.status == 400
    assert answer.fields["proxy-status"].startswith("tracing-proxy; error=http_request_error")
    assert b"127.0.0.1" in answer.fields["proxy-status"].encode()


async def test_trailing_dot_ip_literal_gets_400_or_403_never_502(
    start_proxy: StartProxy, trap: Trap, origin: Origin, logs: LogCapture
) -> None:
    """`127.0.0.1.` is refused as a spelling (400) and a denied `127.0.0.2.` as denied (403)."""
    proxy = await start_proxy(deny_destinations=deny("127.0.0.2/32"))
    connection = await Connection.open(proxy)
    try:
        allowed = await connection.ask(
            http_request("GET", f"http://127.0.0.1.:{origin.port}/echo", close=False)
        )
        denied = await connection.ask(http_request("GET", f"http://127.0.0.2.:{trap.port}/x"))
    finally:
        connection.close()
    assert allowed.status == 400
    assert allowed.fields["proxy-status"].startswith("tracing-proxy; error=http_request_error")
    assert b"trailing dot" in allowed.body
    assert denied.status == 403
    assert denied.fields["proxy-status"].startswith(
        "tracing-proxy; error=destination_ip_prohibited"
    )
    assert trap.connections == 0
    lines = await logs.wait_for("access", 2)
    assert [(line["status"], line["error"]) for line in lines] == [
        (400, "http_request_error"),
        (403, "destination_ip_prohibited"),
    ]


async def test_allow_rule_beats_the_deny_rule(start_proxy: StartProxy, trap: Trap) -> None:
    """An address in both lists is dialled: --allow-destinations wins."""
    proxy = await start_proxy(
        deny_destinations=deny("127.0.0.0/8"), allow_destinations=("127.0.0.2/32",)
    )
    answer = await ask(proxy, http_request("GET", f"http://{trap.authority}/x"))
    assert (answer.status, answer.body, trap.connections) == (200, b"trap", 1)


async def test_name_resolving_to_a_denied_address_gets_403(
    start_proxy: StartProxy, trap: Trap, logs: LogCapture
) -> None:
    """A name whose DNS answer is a denied address is refused after the lookup, not dialled."""
    dns = await start_dns({"rebound.test": DENIED_HOST})
    try:
        proxy = await start_proxy(
            dns_servers=(dns.address,), deny_destinations=deny("127.0.0.2/32")
        )
        for _ in range(2):  # the second answer would come from the DNS cache
            answer = await ask(proxy, http_request("GET", f"http://rebound.test:{trap.port}/"))
            assert answer.status == 403
    finally:
        stop_dns(dns)
    assert "rebound.test" in dns.queries
    assert trap.connections == 0
    host = f"rebound.test:{trap.port}"
    error = "destination_ip_prohibited"
    assert proxy.sample("proxy_upstream_errors_total", host=host, error=error) == 2


async def test_denied_host_pattern_is_refused_before_any_lookup(
    start_proxy: StartProxy, trap: Trap
) -> None:
    """A name matching a denied pattern gets 403 without a DNS query."""
    dns = await start_dns({"db.internal.test": DENIED_HOST})
    try:
        proxy = await start_proxy(
            dns_servers=(dns.address,), deny_destinations=deny("*.internal.test")
        )
        answer = await ask(proxy, http_request("GET", f"http://DB.internal.test.:{trap.port}/"))
    finally:
        stop_dns(dns)
    assert answer.status == 403
    assert (dns.queries, trap.connections) == ([], 0)


@pytest.mark.parametrize("host", [DENIED_HOST, "rebound.test"])
async def test_connect_to_a_denied_destination_gets_403(
    start_proxy: StartProxy, trap: Trap, logs: LogCapture, host: str
) -> None:
    """CONNECT to a denied address, or a name resolving to one, gets 403 and is not dialled."""
    dns = await start_dns({"rebound.test": DENIED_HOST})
    try:
        proxy = await start_proxy(
            dns_servers=(dns.address,),
            deny_destinations=deny("127.0.0.2/32"),
            connect_ports=(trap.port,),
        )
        connection = await Connection.open(proxy)
        answer = await connection.ask(connect(f"{host}:{trap.port}"))
        assert await connection.closed()
        connection.close()
    finally:
        stop_dns(dns)
    assert answer.status == 403
    assert answer.fields["proxy-status"].startswith(
        "tracing-proxy; error=destination_ip_prohibited"
    )
    assert trap.connections == 0
    (line,) = await logs.wait_for("tunnel")
    assert (line["status"], line["error"]) == (403, "destination_ip_prohibited")
    label = f"{host}:{trap.port}"
    error = "destination_ip_prohibited"
    assert proxy.sample("proxy_upstream_errors_total", host=label, error=error) == 1


# -- loops -------------------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["proxy", "admin"])
async def test_request_to_our_own_listener_gets_508(
    proxy: RunningProxy, logs: LogCapture, listener: str
) -> None:
    """A target that is one of the proxy's bound listeners is a loop: 508, counted, logged."""
    address = proxy.server.proxy_address if listener == "proxy" else proxy.server.admin_address
    assert address is not None
    answer = await ask(proxy, http_request("GET", f"http://{address}/metrics"))
    assert answer.status == 508
    assert answer.fields["proxy-status"].startswith("tracing-proxy; error=proxy_loop_detected")
    (line,) = await logs.wait_for("access")
    assert (line["status"], line["error"]) == (508, "proxy_loop_detected")
    host = str(address)
    assert proxy.sample("proxy_upstream_errors_total", host=host, error="proxy_loop_detected") == 1


async def test_name_resolving_to_our_listener_gets_508(start_proxy: StartProxy) -> None:
    """A name whose answer is our own listener address is a loop too."""
    dns = await start_dns({"self.test": "127.0.0.1"})
    try:
        proxy = await start_proxy(dns_servers=(dns.address,))
        assert proxy.server.proxy_address is not None
        port = proxy.port
        answer = await ask(proxy, http_request("GET", f"http://self.test:{port}/"))
    finally:
        stop_dns(dns)
    assert answer.status == 508


async def test_connect_to_our_own_listener_gets_508(start_proxy: StartProxy) -> None:
    """CONNECT to the proxy's own address is answered 508 instead of tunnelling to itself."""
    first = await start_proxy()
    assert first.server.proxy_address is not None
    port = first.port
    await first.server.close()
    # A second proxy whose --connect-ports includes its own port: bind that same port.
    proxy = await start_proxy(listen=config.Address("127.0.0.1", port), connect_ports=(port,))
    answer = await ask(proxy, connect(f"127.0.0.1:{port}"))
    assert answer.status == 508


async def test_via_with_our_pseudonym_gets_508(
    proxy: RunningProxy, trap: Trap, logs: LogCapture
) -> None:
    """A request whose Via already names this proxy is not forwarded again."""
    data = http_request("GET", f"http://{trap.authority}/", "Via: 1.0 edge, 1.1 tracing-proxy")
    answer = await ask(proxy, data)
    assert answer.status == 508
    assert answer.fields["proxy-status"].startswith("tracing-proxy; error=proxy_loop_detected")
    assert trap.connections == 0
    (line,) = await logs.wait_for("access")
    assert line["error"] == "proxy_loop_detected"


async def test_via_of_another_proxy_is_forwarded(start_proxy: StartProxy, trap: Trap) -> None:
    """Via entries from other proxies do not stop a request (the pseudonym is ours alone)."""
    proxy = await start_proxy(via_pseudonym="second-proxy")
    data = http_request("GET", f"http://{trap.authority}/", "Via: 1.1 tracing-proxy")
    answer = await ask(proxy, data)
    assert (answer.status, trap.connections) == (200, 1)


async def test_connect_with_our_via_gets_508(start_proxy: StartProxy, trap: Trap) -> None:
    """A CONNECT that already passed through this proxy is answered 508, not dialled."""
    proxy = await start_proxy(connect_ports=(trap.port,))
    answer = await ask(proxy, connect(trap.authority, "Via: 1.1 tracing-proxy"))
    assert answer.status == 508
    assert trap.connections == 0
