"""A limit on each wait for a pooled upstream connection.

aiohttp's connector queues a request for as long as the pool stays full; its ``connect``
timeout would also cover DNS and the TCP handshake, which ``--connect-timeout`` owns. The
trace signals ``on_connection_queued_start``/``_end`` (see ``proxy.observe.tracing``) start and stop
this deadline around exactly the queueing.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from proxy.rules.errors import PoolWaitExceeded


class PoolWait:
    """An async context around one upstream request; only a queue wait can make it expire."""

    def __init__(self, limit: float) -> None:
        self._limit = limit
        self._scope = asyncio.timeout(None)

    async def __aenter__(self) -> PoolWait:
        await self._scope.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._scope.__aexit__(exc_type, exc, tb)
        except TimeoutError as expired:
            raise PoolWaitExceeded(f"no pooled connection free within {self._limit:g} s") from (
                expired
            )

    def queued(self) -> None:
        self._scope.reschedule(asyncio.get_running_loop().time() + self._limit)

    def dequeued(self) -> None:
        self._scope.reschedule(None)
