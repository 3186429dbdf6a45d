"""benchmarks/bare.py, the floor `make bench` measures against: a client that leaves is no error."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from benchmarks.processes import communicate, flags_only_environment, stop
from tests.conftest import read_head

HOLD = 0.3  # the origin holds its answer this long: the client is gone by then


@pytest.fixture
async def holding_origin() -> AsyncIterator[int]:
    """An origin that answers 13 bytes after ``HOLD`` seconds; yields its port."""

    async def hold(request: web.Request) -> web.Response:
        await asyncio.sleep(HOLD)
        return web.Response(text="Hello, world\n")

    app = web.Application()
    app.router.add_get("/", hold)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("trace", [False, True], ids=["bare", "bare-traced"])
async def test_client_gone_before_the_response_head_logs_a_traceback(
    holding_origin: int, trace: bool
) -> None:
    """Clients that leave while the origin holds its answer (as wrk does when a run ends):
    bare logs no "Error handling request" traceback, and goes on serving the next client."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "benchmarks.bare", *(["--trace"] if trace else [])),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=flags_only_environment(),
    )
    assert process.stdout is not None
    try:
        port = int(await asyncio.wait_for(process.stdout.readline(), 30))
        request = f"GET http://127.0.0.1:{holding_origin}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await asyncio.sleep(HOLD / 3)  # the request has reached the origin
            writer.transport.abort()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await asyncio.wait_for(read_head(reader), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        await asyncio.sleep(HOLD)  # the last of the abandoned answers has come and gone
    finally:
        await stop(process)
    _, stderr = await communicate(process, 10)
    assert b"Traceback" not in stderr, stderr.decode()
