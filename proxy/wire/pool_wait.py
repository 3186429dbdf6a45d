"""A limit on each wait for a pooled upstream connection.

aiohttp's connector queues a request for as long as the pool stays full; its ``connect``
timeout would also cover DNS and the TCP handshake, which ``--connect-timeout`` owns. The
deadline wraps exactly the queueing: ``_wait_for_available_connection`` is the step
``BaseConnector.connect`` takes only when no slot is free (aiohttp is pinned below 3.15;
see docs/aiohttp-internals.md). A request that finds a free slot pays nothing, and no
TraceConfig is needed, so the limit holds with observation off too.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from proxy.rules.errors import PoolWaitExceeded
from proxy.tls.connector import TimedTLSConnector

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.tracing import Trace


class PoolWaitConnector(TimedTLSConnector):
    """A TLS-timed connector whose queue for a free slot gives up after ``pool_wait_timeout``."""

    def __init__(self, *, pool_wait_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool_wait_timeout = pool_wait_timeout

    async def _wait_for_available_connection(self, key: ConnectionKey, traces: list[Trace]) -> None:
        try:
            async with asyncio.timeout(self._pool_wait_timeout):
                await super()._wait_for_available_connection(key, traces)
        except TimeoutError as expired:
            raise PoolWaitExceeded(
                f"no pooled connection free within {self._pool_wait_timeout:g} s"
            ) from expired
