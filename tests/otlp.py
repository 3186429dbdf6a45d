"""An OTLP/HTTP traces receiver on loopback for tests: decodes every export it is sent.

It can answer with another status, hold each export (a slow collector), or add a
partial-success rejection; ``wait_for_spans`` waits (bounded) until enough spans came.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import RunningProxy

# How long a held export is kept at most: the "slow collector" of the fault tests.
HOLD_SECONDS = 5.0


class OtlpReceiver:
    def __init__(self, status: int = 200, *, hold: bool = False, reject: int = 0) -> None:
        self.status = status
        self.hold = hold
        self.reject = reject
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.holding = 0  # exports being held right now
        self.release = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._server: TestServer | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.content_types.append(request.headers.get("Content-Type", ""))
        if self.hold:
            async with self._arrived:
                self.holding += 1
                self._arrived.notify_all()
            try:
                await asyncio.wait_for(self.release.wait(), HOLD_SECONDS)
            except TimeoutError:
                pass
            finally:
                self.holding -= 1
        async with self._arrived:
            self.requests.append(message)
            self._arrived.notify_all()
        if self.status != 200:
            return web.Response(status=self.status, text="no")
        answer = ExportTraceServiceResponse()
        if self.reject:
            answer.partial_success.rejected_spans = self.reject
        return web.Response(body=answer.SerializeToString(), content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.port}/v1/traces"

    def spans(self) -> list[Span]:
        return [
            span
            for message in self.requests
            for resource_spans in message.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    async def wait_for_spans(self, count: int, within: float = 10.0) -> list[Span]:
        """Wait (bounded) until at least ``count`` spans arrived; fail otherwise."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.spans()) >= count)
        return self.spans()

    async def wait_holding(self, count: int = 1, within: float = 10.0) -> None:
        """Wait (bounded) until ``count`` exports are being held."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: self.holding >= count)

    async def close(self) -> None:
        self.release.set()
        if self._server is not None:
            await self._server.close()


StartReceiver = Callable[..., Awaitable[OtlpReceiver]]


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[StartReceiver]:
    started: list[OtlpReceiver] = []

    async def start(*args: Any, **kwargs: Any) -> OtlpReceiver:
        receiver = OtlpReceiver(*args, **kwargs)
        await receiver.start()
        started.append(receiver)
        return receiver

    try:
        yield start
    finally:
        for receiver in started:
            await receiver.close()


StartTraced = Callable[..., Awaitable[tuple[OtlpReceiver, RunningProxy]]]


@pytest.fixture
def traced_proxy(
    start_proxy: Callable[..., Awaitable[RunningProxy]],
    otlp_receiver: StartReceiver,
) -> StartTraced:
    """A receiver started with ``collector``'s options and a proxy exporting to it."""

    async def start(
        collector: Mapping[str, Any] | None = None, **changes: Any
    ) -> tuple[OtlpReceiver, RunningProxy]:
        receiver = await otlp_receiver(**(collector or {}))
        return receiver, await start_proxy(otlp_endpoint=receiver.endpoint, **changes)

    return start


def attributes(span: Span | Span.Event) -> dict[str, Any]:
    """A span's or event's attributes as plain Python values."""
    return {kv.key: plain(kv.value) for kv in span.attributes}


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind is not None else None
