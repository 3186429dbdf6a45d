"""PoolWaitConnector against the real aiohttp connector: the deadline covers only the queue."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.rules.errors import PoolWaitExceeded
from proxy.wire.pool_wait import PoolWaitConnector
from tests.conftest import Origin

# A body still streaming: its connection stays out of the pool until released.
UNFINISHED = "/stream?size=1048576&delay_ms=100"


async def test_a_full_pool_past_the_limit_raises_pool_wait_exceeded(origin: Origin) -> None:
    """With its one slot held, a second request queues and gives up with PoolWaitExceeded."""
    connector = PoolWaitConnector(pool_wait_timeout=0.1, limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        held = await session.get(origin.url(UNFINISHED))
        try:
            with pytest.raises(PoolWaitExceeded):
                await session.get(origin.url("/echo"))
        finally:
            held.release()


async def test_a_queued_request_gets_the_slot_once_freed(origin: Origin) -> None:
    """A request queued behind a busy slot is served when the slot frees, within the limit."""
    connector = PoolWaitConnector(pool_wait_timeout=30, limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        held = await session.get(origin.url(UNFINISHED))
        queued = asyncio.ensure_future(session.get(origin.url("/echo")))
        await asyncio.sleep(0)  # let it reach the queue
        assert not queued.done()
        held.release()
        async with await asyncio.wait_for(queued, 10) as resp:
            assert resp.status == 200


async def test_the_limit_does_not_apply_to_a_slow_upstream(origin: Origin) -> None:
    """A free slot means no deadline at all: an upstream slower than the limit is not cut."""
    connector = PoolWaitConnector(pool_wait_timeout=0.05, limit=1)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(origin.url("/slow-headers?ms=200")) as resp,
    ):
        assert resp.status == 200
