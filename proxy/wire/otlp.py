"""The span exporter: a background task that posts queued spans as OTLP/HTTP protobuf.

It has its own small session (one connection, no proxy from the environment), apart from
the upstream pool and outside the destination rules: the endpoint is operator config, not
user traffic. One export is in flight at a time; while it waits on a slow collector, new
spans queue up to ``SpanQueue.max_size`` and are dropped (and counted) beyond that, so a
slow, failing or absent collector costs requests nothing. A failed export is counted and
its spans dropped; there is no retry, so a collector that is down never builds a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import aiohttp
from structlog.typing import FilteringBoundLogger

from proxy.observe import log, spans
from proxy.observe.spans import SpanQueue

CONTENT_TYPE: Final = "application/x-protobuf"  # OTLP/HTTP binary protobuf encoding

# Spans encoded between two yields to the event loop: encoding a whole default batch
# (512) at once would hold the loop for about 10 ms.
_ENCODE_SLICE: Final = 64


class SpanExporter:
    """Exports ``queue`` to ``endpoint`` every ``interval`` s, or as soon as a batch is full."""

    def __init__(
        self,
        queue: SpanQueue,
        endpoint: str,
        *,
        service_name: str,
        interval: float,
        timeout: float,
    ) -> None:
        self.queue = queue
        self.endpoint = endpoint
        self._resource = spans.resource(service_name)
        self._interval = interval
        self._timeout = timeout
        self._wake = asyncio.Event()
        self._closing = False
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._logger: FilteringBoundLogger = log.get_logger()
        self._reported: set[str] = set()  # the events logged once already

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=False),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            trust_env=False,  # never through our own HTTP_PROXY
            skip_auto_headers=("User-Agent",),
        )
        self.queue.wanted.append(self._wake)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        queue = self.queue
        while not self._closing:
            timed_out = False
            if len(queue) < queue.batch_size:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                except TimeoutError:
                    timed_out = True
            self._wake.clear()
            while len(queue) >= queue.batch_size:
                await self.export_batch()
            if timed_out and len(queue):
                await self.export_batch()  # a partial batch, once per interval
        while len(queue):  # closing: send what is left, then end
            await self.export_batch()

    async def export_batch(self) -> None:
        """Send up to one batch now; the outcome is counted, never raised."""
        batch = self.queue.take(self.queue.batch_size)
        if not batch:
            return
        builder = spans.BatchBuilder(self._resource)
        counted = 0  # records of the batch whose end is counted already
        try:
            for offset in range(0, len(batch), _ENCODE_SLICE):
                if offset:
                    await asyncio.sleep(0)
                builder.add(batch[offset : offset + _ENCODE_SLICE])
            counted = self._count_refused(builder)
            if len(builder):
                self.queue.exports[await self._post(builder.body(), len(builder))] += 1
        except asyncio.CancelledError:
            self.queue.dropped["shutdown"] += len(batch) - counted  # the flush deadline passed
            raise

    def _count_refused(self, builder: spans.BatchBuilder) -> int:
        """Count the records protobuf refused, log the first of each kind; how many were left
        out."""
        self.queue.cleaned += len(builder.cleaned)
        self.queue.dropped["unencodable"] += len(builder.dropped)
        for event, refused, counter in (
            ("span_cleaned", builder.cleaned, "proxy_spans_cleaned_total"),
            ("span_dropped", builder.dropped, 'proxy_spans_dropped_total{reason="unencodable"}'),
        ):
            if refused and event not in self._reported:
                self._reported.add(event)
                record, exc = refused[0]
                self._logger.warning(
                    event,
                    trace_id=record.trace_id,
                    span_id=record.span_id,
                    error=f"{type(exc).__name__}: {exc}",
                    note=f"logged for the first only; {counter} counts them all",
                )
        return len(builder.dropped)

    async def _post(self, body: bytes, count: int) -> str:
        assert self._session is not None, "start() first"
        dropped = self.queue.dropped
        try:
            async with self._session.post(
                self.endpoint, data=body, headers={"Content-Type": CONTENT_TYPE}
            ) as response:
                answer = await response.read()
                if not 200 <= response.status < 300:
                    dropped["export_failed"] += count
                    return "http_error"
        except TimeoutError:
            dropped["export_failed"] += count
            return "timeout"
        except (aiohttp.ClientError, OSError):
            dropped["export_failed"] += count
            return "connection_error"
        with contextlib.suppress(Exception):  # a body we cannot parse is still a success
            dropped["rejected"] += spans.rejected_spans(answer)
        return "success"

    async def close(self, budget: float) -> None:
        """Export what is queued for at most ``budget`` s; what is left is dropped, counted."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is not None:
            # The exporter must never fail the shutdown; what it could not send is counted.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, budget)
        self.queue.drop_all("shutdown")
        if self._session is not None:
            await self._session.close()
            self._session = None
        with contextlib.suppress(ValueError):
            self.queue.wanted.remove(self._wake)

    def __repr__(self) -> str:
        return f"<SpanExporter {self.endpoint} {self.queue!r}>"
