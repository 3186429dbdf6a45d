"""The span exporter: a collector that is down, slow or failing never touches proxied requests."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import aiohttp

from tests.conftest import Origin, RunningProxy, proxy_process
from tests.otlp import StartReceiver, StartTraced, otlp_receiver, traced_proxy  # noqa: F401
from tests.test_failures import closed_port

StartProxy = Callable[..., Awaitable[RunningProxy]]


async def _get_all(
    client: aiohttp.ClientSession, proxy: RunningProxy, origin: Origin, n: int
) -> None:
    """``n`` requests for /echo one after the other; each must complete with 200."""
    for _ in range(n):
        async with client.get(origin.url("/echo"), proxy=proxy.url) as response:
            assert response.status == 200
            await response.read()


async def _get_all_then_export(
    client: aiohttp.ClientSession, proxy: RunningProxy, origin: Origin, n: int
) -> None:
    """``n`` requests, then one export of what they queued, done at once (not on a timer)."""
    await _get_all(client, proxy, origin, n)
    exporter = proxy.server.span_exporter
    assert exporter is not None
    await exporter.export_batch()


async def test_collector_down_leaves_requests_alone_and_counts_the_failure(
    start_proxy: StartProxy, origin: Origin, client: aiohttp.ClientSession
) -> None:
    """Nothing listens at the endpoint: requests all succeed, the export fails and is counted."""
    proxy = await start_proxy(
        otlp_endpoint=f"http://127.0.0.1:{closed_port()}/v1/traces", otlp_export_interval=3600.0
    )
    await _get_all_then_export(client, proxy, origin, 3)
    assert proxy.sample("proxy_span_exports_total", result="connection_error") == 1
    assert proxy.sample("proxy_spans_dropped_total", reason="export_failed") == 3
    await _get_all(client, proxy, origin, 1)  # and still nothing in the way


async def test_collector_answering_500_counts_an_http_error(
    traced_proxy: StartTraced,  # noqa: F811
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """A 500 from the collector: the batch is dropped and counted, requests unaffected."""
    receiver, proxy = await traced_proxy({"status": 500}, otlp_export_interval=3600.0)
    await _get_all_then_export(client, proxy, origin, 2)
    assert len(receiver.spans()) == 2  # it did arrive, and was refused
    assert proxy.sample("proxy_span_exports_total", result="http_error") == 1
    assert proxy.sample("proxy_spans_dropped_total", reason="export_failed") == 2
    assert proxy.sample("proxy_span_exports_total", result="success") == 0


async def test_slow_collector_never_delays_requests_and_a_full_queue_drops(
    traced_proxy: StartTraced,  # noqa: F811
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """While the collector holds an export, requests complete and spans past the queue drop."""
    receiver, proxy = await traced_proxy({"hold": True}, otlp_batch_size=1, otlp_queue_size=2)
    await _get_all(client, proxy, origin, 1)
    await receiver.wait_holding(1)  # the first export is now stuck in the collector
    await _get_all(client, proxy, origin, 6)
    # All six completed while the export was still held: ordering, not timing.
    assert receiver.holding == 1
    assert not receiver.release.is_set()
    assert proxy.sample("proxy_spans_dropped_total", reason="queue_full") == 4
    assert proxy.server.spans is not None
    assert len(proxy.server.spans.queue) == 2
    receiver.release.set()
    await receiver.wait_for_spans(3)
    assert proxy.sample("proxy_span_exports_total", result="success") is not None


async def test_export_timeout_is_counted_and_drops_the_batch(
    traced_proxy: StartTraced,  # noqa: F811
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """An export held past --otlp-export-timeout ends as result="timeout"."""
    receiver, proxy = await traced_proxy(
        {"hold": True}, otlp_export_interval=3600.0, otlp_export_timeout=0.2
    )
    await _get_all_then_export(client, proxy, origin, 2)
    assert not receiver.release.is_set()  # the collector never answered
    assert proxy.sample("proxy_span_exports_total", result="timeout") == 1
    assert proxy.sample("proxy_spans_dropped_total", reason="export_failed") == 2


async def test_partial_success_rejections_are_counted(
    traced_proxy: StartTraced,  # noqa: F811
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """A 200 whose partial_success rejects spans counts them as dropped, reason rejected."""
    _, proxy = await traced_proxy({"reject": 1}, otlp_export_interval=3600.0)
    await _get_all_then_export(client, proxy, origin, 2)
    assert proxy.sample("proxy_span_exports_total", result="success") == 1
    assert proxy.sample("proxy_spans_dropped_total", reason="rejected") == 1


async def test_interval_sends_a_partial_batch(
    traced_proxy: StartTraced,  # noqa: F811
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """Fewer spans than a batch still leave once the interval is up."""
    receiver, proxy = await traced_proxy(otlp_batch_size=100, otlp_export_interval=0.05)
    await _get_all(client, proxy, origin, 2)
    assert len(await receiver.wait_for_spans(2)) == 2


async def test_close_flushes_the_queue(
    traced_proxy: StartTraced,  # noqa: F811
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """Spans still queued when the server closes are sent before it is done."""
    receiver, proxy = await traced_proxy(otlp_export_interval=3600.0)
    await _get_all(client, proxy, origin, 3)
    assert receiver.spans() == []
    await proxy.server.close()
    assert len(receiver.spans()) == 3
    assert proxy.sample("proxy_spans_dropped_total", reason="shutdown") == 0


async def test_close_with_a_stuck_collector_gives_up_and_counts(
    traced_proxy: StartTraced,  # noqa: F811
    origin: Origin,
    client: aiohttp.ClientSession,
) -> None:
    """A collector that holds the final export: close() still returns, the spans count as lost."""
    receiver, proxy = await traced_proxy({"hold": True}, otlp_export_interval=3600.0)
    await _get_all(client, proxy, origin, 2)
    await proxy.server.close()
    assert not receiver.release.is_set()
    assert proxy.sample("proxy_spans_dropped_total", reason="shutdown") == 2


async def test_sigterm_flushes_queued_spans_before_exit(
    otlp_receiver: StartReceiver,  # noqa: F811
    origin: Origin,
) -> None:
    """A proxy process with spans queued (long interval) sends them all on SIGTERM, exit 0."""
    receiver = await otlp_receiver()
    args = ("--otlp-endpoint", receiver.endpoint, "--otlp-export-interval", "3600")
    async with (
        proxy_process(*args, "--shutdown-grace", "0", "--admin-listen", "off") as (process, url),
        aiohttp.ClientSession() as session,
    ):
        for _ in range(3):
            async with session.get(origin.url("/echo"), proxy=url) as response:
                assert response.status == 200
        assert receiver.spans() == []  # queued, not sent yet
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert len(receiver.spans()) == 3
