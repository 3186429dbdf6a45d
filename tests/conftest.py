"""Shared fixtures: a real aiohttp origin, raw TCP origins, and the proxy on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis.database import DirectoryBasedExampleDatabase
from prometheus_client import CollectorRegistry

from benchmarks.processes import STOP_WAIT, flags_only_environment, proxy_command, stop
from proxy import config
from proxy.config import Address, Settings
from proxy.observe import log
from proxy.server import ProxyServer

# TLS origins (tests/tls.py): the secure_origin fixture; HTTP/2 origins (tests/h2_origin.py):
# the tls_h2_origin and h2c_origin fixtures.
pytest_plugins = ["tests.tls", "tests.h2_origin"]

GZIP_BODY = gzip.compress(b"compressed hello " * 100)


def unavailable(message: str) -> NoReturn:
    """A test's outside need is missing: skip here, fail under CI=true.

    .ci/run runs as root and installs every tool the suite uses, so there a missing one is a
    defect of the project's setup, not a reason to pass without testing.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


# Property tests (tests/test_oracle_*.py): a small budget for `make test`, a large one for
# `make fuzz` (HYPOTHESIS_PROFILE=fuzz; FUZZ_EXAMPLES overrides its count). Failures found
# are kept in .hypothesis/ (git-ignored) and replayed first on the next run. No deadline:
# the machine is shared, and examples are real loopback round trips.
_PROFILE = hypothesis_settings(
    database=DirectoryBasedExampleDatabase(
        os.path.join(os.path.dirname(os.path.dirname(__file__)), ".hypothesis", "examples")
    ),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.register_profile("default", _PROFILE, max_examples=100)
hypothesis_settings.register_profile(
    "fuzz", _PROFILE, max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000"))
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (so both ends can check sha256 without storing)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


async def _echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_len": size,
            "body_sha256": digest.hexdigest(),
            "version": f"{request.version.major}.{request.version.minor}",
        }
    )


async def _slow_headers(request: web.Request) -> web.Response:
    await asyncio.sleep(int(request.query.get("ms", "200")) / 1000)
    return web.Response(text="slow")


async def _stream(request: web.Request) -> web.StreamResponse:
    """``size`` pattern bytes, chunked unless ``cl=1``; ``delay_ms`` between 64 KiB chunks."""
    size = int(request.query["size"])
    delay = int(request.query.get("delay_ms", "0")) / 1000
    response = web.StreamResponse()
    if request.query.get("cl") == "1":
        response.content_length = size
    await response.prepare(request)
    body = pattern(size)
    for offset in range(0, size, 65536):
        await response.write(body[offset : offset + 65536])
        if delay:
            await asyncio.sleep(delay)
    await response.write_eof()
    return response


async def _cookies(request: web.Request) -> web.Response:
    response = web.Response(text="cookies")
    response.headers.add("Set-Cookie", "a=1")
    response.headers.add("Set-Cookie", "b=2")
    response.headers.add("X-UPPER", "A")
    response.headers.add("x-lower", "b")
    return response


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/echo")


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    headers = {"ETag": '"v1"', "Content-Length": "1234"} if code in (204, 304) else {}
    return web.Response(status=code, headers=headers)


async def _gzip(request: web.Request) -> web.Response:
    return web.Response(
        body=GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    )


async def _big_head(request: web.Request) -> web.Response:
    return web.Response(text="x" * 1234)


def origin_app() -> web.Application:
    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_route("*", "/echo", _echo)
    app.router.add_route("*", "/echo/{tail:.*}", _echo)
    app.router.add_get("/slow-headers", _slow_headers)
    app.router.add_get("/stream", _stream)
    app.router.add_get("/cookies", _cookies)
    app.router.add_get("/redirect", _redirect)
    app.router.add_route("*", "/status/{code}", _status)
    app.router.add_get("/gzip", _gzip)
    app.router.add_route("*", "/big", _big_head)
    return app


@dataclass
class Origin:
    host: str
    port: int

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.authority}{path}"


@contextlib.asynccontextmanager
async def serving_origin() -> AsyncIterator[Origin]:
    """``origin_app()`` on a free loopback port, closed on exit."""
    server = TestServer(origin_app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield Origin("127.0.0.1", server.port or 0)
    finally:
        await server.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with serving_origin() as served:
        yield served


@dataclass
class RawOrigin:
    """A TCP origin driven by a script; remembers every byte each connection sent it."""

    port: int
    received: list[bytes] = field(default_factory=list)
    connections: int = 0

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, RawOrigin], Awaitable[None]]


def http_request(
    method: str, target: str, *fields: str, host: str = "x", close: bool = True, body: bytes = b""
) -> bytes:
    """The raw bytes of one HTTP/1.1 request."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *fields]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """Read one request head (up to the blank line)."""
    return await reader.readuntil(b"\r\n\r\n")


def answer(
    response: bytes,
    *,
    times: int = 1,
    read: Callable[[asyncio.StreamReader], Awaitable[bytes]] = read_head,
) -> Script:
    """A raw origin's script: up to ``times`` requests on a connection, each taken with ``read``,
    kept in ``state.received`` and answered with the same ``response``."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: RawOrigin
    ) -> None:
        for _ in range(times):
            state.received.append(await read(reader))
            writer.write(response)
            await writer.drain()

    return script


@pytest.fixture
async def raw_origin() -> AsyncIterator[Callable[[Script], Awaitable[RawOrigin]]]:
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(script: Script) -> RawOrigin:
        state = RawOrigin(0)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await script(reader, writer, state)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                tasks.discard(task)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    try:
        yield start
    finally:
        for task in list(tasks):
            task.cancel()
        for server in servers:
            server.close()
            await asyncio.wait_for(server.wait_closed(), 10)


class LogCapture:
    """The proxy's stdout log lines, parsed."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    async def wait_for(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        """The ``name`` lines once ``count`` are written (they come as a handler or tunnel ends);
        polled every 20 ms for at most 5 s."""
        for _ in range(250):
            found = self.events(name)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"expected {count} {name} lines, got {self.lines()}")


@pytest.fixture
def logs() -> LogCapture:
    capture = LogCapture()
    log.configure("json", "info", stream=capture.stream)
    return capture


@dataclass
class RunningProxy:
    server: ProxyServer
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        return f"http://{self.server.proxy_address}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.server.admin_address}"

    @property
    def port(self) -> int:
        """The proxy listener's port."""
        assert self.server.proxy_address is not None
        return self.server.proxy_address.port

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw client connection to the proxy listener."""
        return await asyncio.open_connection("127.0.0.1", self.port)


TEST_SETTINGS = Settings(listen=Address("127.0.0.1", 0), admin_listen=Address("127.0.0.1", 0))


@pytest.fixture
async def start_proxy(logs: LogCapture) -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    started: list[ProxyServer] = []

    async def start(**changes: Any) -> RunningProxy:
        settings = config.replace(TEST_SETTINGS, **changes)
        registry = CollectorRegistry()
        server = ProxyServer(settings, registry)
        await server.start()
        started.append(server)
        return RunningProxy(server, registry)

    try:
        yield start
    finally:
        for server in started:
            await server.close()


@pytest.fixture
async def proxy(start_proxy: Callable[..., Awaitable[RunningProxy]]) -> RunningProxy:
    return await start_proxy()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session: no decompression, nothing from the environment."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@contextlib.asynccontextmanager
async def proxy_process(
    *args: str, prefix: tuple[str, ...] = ()
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``python -m proxy`` on a free port; yields the process and its proxy URL.

    ``prefix`` runs it through another command (``ip netns exec NS``), which must exec it.
    The rest of its stdout (the access log) is kept flowing so the proxy never blocks on it.
    """
    process = await asyncio.create_subprocess_exec(
        *prefix,
        *proxy_command(*args),
        stdout=asyncio.subprocess.PIPE,
        env=flags_only_environment(),
    )
    assert process.stdout is not None
    try:
        listening = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        rest = asyncio.ensure_future(process.stdout.read())
        try:
            yield process, str(listening["proxy"])
        finally:
            await stop(process)
            await asyncio.wait_for(rest, STOP_WAIT)
    finally:
        await stop(process, signal.SIGKILL)  # when it never said it was listening


def promtool_or_skip() -> str:
    """Path of promtool; a missing promtool fails under CI=true instead of skipping."""
    from tests.deploy.deploy_support import find_tool

    return find_tool("promtool")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """After skips, say which tools were missing and how to get them, so nobody needs -rs."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        _path, _line, reason = report.longrepr
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        return
    terminalreporter.write_sep("-", "skipped, and how to run them")
    for reason, count in sorted(reasons.items()):
        terminalreporter.write_line(f"{count} skipped: {reason}")
    terminalreporter.write_line(
        "As root, `bash .ci/run` installs the Debian packages the tests need, then runs them all."
    )


@pytest.fixture(scope="session")
def tls_ca() -> Any:
    """A trustme CA the proxy is told to trust (``--upstream-ca-file``)."""
    import trustme

    return trustme.CA()


@pytest.fixture
def tls_ca_file(tls_ca: Any, tmp_path: Any) -> str:
    path = tmp_path / "upstream-ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)
