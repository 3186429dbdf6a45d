"""Soak: hundreds of clients through the proxy for a minute, with client aborts and upstream resets.

``python -m benchmarks.soak [--clients N] [--seconds S] [--warm-up S] [--seed N]``

The proxy and the origin (``benchmarks/soak_origin.py``) run as their own processes; the
clients run here, each on one keep-alive connection at a time, drawing operations from a
fixed mix: downloads and uploads of mixed sizes (Content-Length or chunked), CONNECT tunnels
to a TCP echo, downloads, uploads and tunnels the client abandons half-way (FIN or RST), and
requests whose upstream resets before or during the response. Everything stays on loopback
and is bounded by ``--seconds`` and a per-client operation cap.

Once the load stops and idle connections have expired, the proxy must show:

- as many open file descriptors as before the load (no leaked sockets);
- ``proxy_requests_in_flight`` and ``proxy_tunnels_open`` at 0 (no handler left running);
- resident memory back within a margin of its baseline, taken after a warm-up of the same load;
- every response and tunnel that completed byte-exact, and no other failure than the
  injected ones;
- ``proxy_upstream_requests_total`` summed equal to the requests the clients sent (the
  abandoned ones included), ``proxy_tunnels_total`` to their CONNECTs, and one access-log
  line for each.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.processes import STOP_WAIT, flags_only_environment, stop
from benchmarks.procfs import open_fds, peak_rss_mb, rss_mb
from benchmarks.resets import reset
from benchmarks.soak_origin import body, digest

SIZES = (0, 1, 1000, 65_536, 300_000, 1 << 20)  # bodies each way
SEEDS = (1, 2, 3)
ABANDONED_SIZE = 4 << 20  # long enough that a client can leave half-way
MAX_OPS_PER_CLIENT = 5000
OP_TIMEOUT = 30.0  # seconds: a stuck operation counts as a failure, it never hangs the soak
SETTLE_TIMEOUT = 20.0  # seconds to wait for idle connections to close after the load
# Short idle limits, so that connections left open expire soon after the load.
IDLE = ("--upstream-keepalive-timeout", "0.5", "--client-idle-timeout", "1")
IDLE_SECONDS = 1.5
CLIENT_KEEPALIVE = 0.5  # below the proxy's idle limit: never reuse a connection it may close


@dataclass(frozen=True)
class Endpoints:
    proxy_host: str
    proxy_port: int
    metrics: str
    origin: str  # http://127.0.0.1:PORT
    echo_port: int

    @property
    def proxy(self) -> str:
        return f"http://{self.proxy_host}:{self.proxy_port}"


@dataclass
class Tally:
    """What the clients saw: one outcome per operation, keyed ``"<operation> <outcome>"``."""

    outcomes: Counter[str] = field(default_factory=Counter)
    requests: int = 0  # HTTP requests whose head was sent to the proxy
    tunnels: int = 0  # CONNECTs sent
    surprises: list[str] = field(default_factory=list)  # the first few unexpected errors

    def note(self, operation: str, outcome: str) -> None:
        self.outcomes[f"{operation} {outcome}"] += 1

    def surprise(self, operation: str, exc: BaseException) -> None:
        self.note(operation, "failed")
        if len(self.surprises) < 10:
            self.surprises.append(f"{operation}: {type(exc).__name__}: {exc}")


# -- operations: each sends one request (or CONNECT) and notes one outcome -----------------------

Operation = Callable[[Endpoints, aiohttp.ClientSession, random.Random, Tally], Awaitable[None]]


async def download(
    ends: Endpoints, session: aiohttp.ClientSession, rng: random.Random, tally: Tally
) -> None:
    size, seed = rng.choice(SIZES), rng.choice(SEEDS)
    chunked = rng.choice(("0", "1"))
    url = f"{ends.origin}/bytes?size={size}&seed={seed}&chunked={chunked}"
    tally.requests += 1
    async with session.get(url, proxy=ends.proxy) as resp:
        received = hashlib.sha256(await resp.read()).hexdigest()
    tally.note("download", _verdict(resp.status, received == digest(size, seed)))


def _verdict(status: int, exact: bool) -> str:
    if status != 200:
        return f"status {status}"
    return "ok" if exact else "corrupt"


async def _chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


async def upload(
    ends: Endpoints, session: aiohttp.ClientSession, rng: random.Random, tally: Tally
) -> None:
    size, seed = rng.choice(SIZES), rng.choice(SEEDS)
    data = body(size, seed)
    payload = data if rng.random() < 0.5 else _chunks(data)  # Content-Length or chunked
    tally.requests += 1
    async with session.post(f"{ends.origin}/upload", data=payload, proxy=ends.proxy) as resp:
        answer = await resp.text()
    tally.note("upload", _verdict(resp.status, answer == digest(size, seed)))


async def abandoned_download(
    ends: Endpoints, session: aiohttp.ClientSession, rng: random.Random, tally: Tally
) -> None:
    url = f"{ends.origin}/bytes?size={ABANDONED_SIZE}&seed=1"
    tally.requests += 1
    async with session.get(url, proxy=ends.proxy) as resp:
        await resp.content.readexactly(rng.randrange(1, ABANDONED_SIZE // 2))
        resp.close()  # drops the connection with the rest of the body unread
    tally.note("abandoned download", "aborted")


async def upstream_reset_before_headers(
    ends: Endpoints, session: aiohttp.ClientSession, rng: random.Random, tally: Tally
) -> None:
    tally.requests += 1
    async with session.get(f"{ends.origin}/reset?at=head", proxy=ends.proxy) as resp:
        await resp.read()
    tally.note("reset before headers", f"status {resp.status}")


async def upstream_reset_mid_body(
    ends: Endpoints, session: aiohttp.ClientSession, rng: random.Random, tally: Tally
) -> None:
    tally.requests += 1
    try:
        async with session.get(
            f"{ends.origin}/reset?at=body&size={1 << 20}", proxy=ends.proxy
        ) as resp:
            await resp.read()
    except aiohttp.ClientPayloadError:
        tally.note("reset mid-body", "visibly incomplete")
    else:
        tally.note("reset mid-body", "corrupt")  # a cut body must never look whole


def _leave(writer: asyncio.StreamWriter, rng: random.Random) -> None:
    """Walk away from a connection: a reset or a plain close, at random."""
    if rng.random() < 0.5:
        reset(writer.transport)
    else:
        writer.close()


def _status(head: bytes) -> str:
    return "answered " + head.split(b" ", 2)[1].decode("latin-1")


async def abandoned_upload(
    ends: Endpoints, session: aiohttp.ClientSession, rng: random.Random, tally: Tally
) -> None:
    # Raw bytes, because the client must know the proxy has the request before it leaves:
    # the proxy's server sends 100 Continue only once it has parsed the head.
    reader, writer = await asyncio.open_connection(ends.proxy_host, ends.proxy_port)
    size = 1 << 20
    try:
        writer.write(
            f"POST {ends.origin}/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        tally.requests += 1
        head = await reader.readuntil(b"\r\n\r\n")
        continued = head.startswith(b"HTTP/1.1 100 ")
        if continued:
            writer.write(body(size, 1)[: rng.randrange(0, size)])
            await writer.drain()
    finally:
        _leave(writer, rng)
    tally.note("abandoned upload", "aborted" if continued else _status(head))


async def tunnel(
    ends: Endpoints, session: aiohttp.ClientSession, rng: random.Random, tally: Tally
) -> None:
    """CONNECT to the echo and check a few blocks; then close, or leave half-way."""
    abandon = rng.random() < 0.3
    reader, writer = await asyncio.open_connection(ends.proxy_host, ends.proxy_port)
    try:
        outcome = await _echo_blocks(ends, reader, writer, rng, tally, abandon)
    finally:
        if abandon:
            _leave(writer, rng)
        else:
            writer.close()
    tally.note("abandoned tunnel" if abandon else "tunnel", outcome)


async def _echo_blocks(
    ends: Endpoints,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    rng: random.Random,
    tally: Tally,
    abandon: bool,
) -> str:
    authority = f"127.0.0.1:{ends.echo_port}"
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    tally.tunnels += 1
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        return _status(head)
    blocks = [body(rng.choice(SIZES[1:5]), seed) for seed in SEEDS]
    for block in blocks[:1] if abandon else blocks:
        writer.write(block)
        if await reader.readexactly(len(block)) != block:
            return "corrupt"
    if abandon:
        return "aborted"
    writer.write_eof()
    return "ok" if await reader.read() == b"" else "corrupt"  # the echo closes after our FIN


# Weights: mostly clean traffic, with every fault present.
MIX: tuple[tuple[Operation, int], ...] = (
    (download, 35),
    (upload, 25),
    (tunnel, 14),
    (abandoned_download, 8),
    (abandoned_upload, 8),
    (upstream_reset_before_headers, 5),
    (upstream_reset_mid_body, 5),
)

# The outcomes that are fine; anything else is a problem.
EXPECTED: frozenset[str] = frozenset(
    {
        "download ok",
        "upload ok",
        "tunnel ok",
        "abandoned tunnel aborted",
        "abandoned download aborted",
        "abandoned upload aborted",
        "reset before headers status 502",
        "reset mid-body visibly incomplete",
    }
)


async def client(ends: Endpoints, number: int, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed * 100_003 + number)
    operations, weights = zip(*MIX, strict=True)
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=CLIENT_KEEPALIVE)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        for _ in range(MAX_OPS_PER_CLIENT):
            if time.monotonic() >= deadline:
                return
            operation = rng.choices(operations, weights)[0]
            try:
                async with asyncio.timeout(OP_TIMEOUT):
                    await operation(ends, session, rng, tally)
            except Exception as exc:  # counted and shown: the soak reports, it does not stop
                tally.surprise(operation.__name__, exc)


# -- the processes and what they show ------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    clients: int
    seconds: float
    warm_up: float  # seconds of the same load first, so that memory reaches its working size
    seed: int = 1
    # Allowed growth over the warmed-up baseline: how much memory the allocators keep varies
    # from round to round with how many large bodies happened to be in flight at once.
    rss_margin_mb: float = 25.0


@dataclass
class Report:
    plan: Plan
    tally: Tally = field(default_factory=Tally)
    fds_before: int = 0
    fds_after: int = 0
    rss_cold_mb: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    rss_peak_mb: float = 0.0
    in_flight: float = -1.0
    tunnels_open: float = -1.0
    proxy_requests: float = 0.0
    proxy_tunnels: float = 0.0
    access_lines: int = 0
    tunnel_lines: int = 0
    other_lines: Counter[str] = field(default_factory=Counter)  # by event: none expected

    def problems(self) -> list[str]:
        """Every invariant the run broke, in words; empty when the proxy held up."""
        tally = self.tally
        found = [f"{count} x {key}" for key, count in tally.outcomes.items() if key not in EXPECTED]
        found += tally.surprises
        checks = (
            (self.fds_after <= self.fds_before, "file descriptors not back to the baseline"),
            (self.in_flight == 0, "requests still in flight"),
            (self.tunnels_open == 0, "tunnels still open"),
            (self.rss_after_mb <= self.rss_before_mb + self.plan.rss_margin_mb, "memory kept"),
            (self.proxy_requests == tally.requests, "requests counted != requests sent"),
            (self.proxy_tunnels == tally.tunnels, "tunnels counted != CONNECTs sent"),
            (self.access_lines == tally.requests, "access lines != requests sent"),
            (self.tunnel_lines == tally.tunnels, "tunnel lines != CONNECTs sent"),
        )
        found += [message for ok, message in checks if not ok]
        found += [f"{count} x log event {event!r}" for event, count in self.other_lines.items()]
        return found

    def lines(self) -> list[str]:
        tally, plan = self.tally, self.plan
        sent = tally.requests + tally.tunnels
        out = [
            f"{plan.clients} clients for {plan.seconds:g} s (after {plan.warm_up:g} s of warm-up): "
            f"{tally.requests} requests and {tally.tunnels} tunnels ({sent / plan.seconds:.0f}/s)",
            f"  proxy counted        {self.proxy_requests:.0f} requests, "
            f"{self.proxy_tunnels:.0f} tunnels; log lines {self.access_lines} access, "
            f"{self.tunnel_lines} tunnel",
            f"  file descriptors     {self.fds_before} before, {self.fds_after} after",
            f"  resident memory      {self.rss_cold_mb:.1f} MiB cold, {self.rss_before_mb:.1f} "
            f"after the warm-up, {self.rss_peak_mb:.1f} peak, {self.rss_after_mb:.1f} after",
            f"  after the load       in flight {self.in_flight:.0f}, "
            f"tunnels open {self.tunnels_open:.0f}",
            "  client outcomes",
        ]
        out += [f"    {count:>8}  {key}" for key, count in sorted(tally.outcomes.items())]
        return out


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, bytes]:
    """A child process that prints one line when ready; returns it with that line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        env=flags_only_environment(),
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    if not line:
        raise RuntimeError(f"{args} exited before it was ready")
    return process, line


async def _count_log_lines(stream: asyncio.StreamReader) -> Counter[str]:
    """The proxy's log lines by event, read until it exits (it must never block on stdout)."""
    events: Counter[str] = Counter()
    while line := await stream.readline():
        events[json.loads(line).get("event", "")] += 1
    return events


async def _scrape(url: str) -> dict[str, float]:
    """Each metric family's samples summed (enough for these totals and gauges)."""
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


async def _steady_fds(pid: int) -> int:
    """Open descriptors once idle connections are gone: the same count 0.5 s apart."""
    await asyncio.sleep(IDLE_SECONDS)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    previous, count = -1, open_fds(pid)
    while count != previous and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        previous, count = count, open_fds(pid)
    return count


async def _fds_back_to(pid: int, baseline: int) -> int:
    """Open descriptors, polled until they are back to ``baseline`` or SETTLE_TIMEOUT passes."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    count = open_fds(pid)
    while count > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        count = open_fds(pid)
    return count


async def _run_load(ends: Endpoints, clients: int, seconds: float, seed: int) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    load = asyncio.gather(*(client(ends, n, seed, deadline, tally) for n in range(clients)))
    await asyncio.wait_for(load, seconds + OP_TIMEOUT + 30)
    return tally


async def soak(plan: Plan) -> Report:
    """Run the soak and return its figures; ``Report.problems()`` says what went wrong."""
    origin, origin_line = await _start("-m", "benchmarks.soak_origin")
    try:
        ports = json.loads(origin_line)
        return await _soak_proxy(plan, ports["http"], ports["echo"])
    finally:
        await stop(origin)


async def _soak_proxy(plan: Plan, origin_port: int, echo_port: int) -> Report:
    proxy, listening = await _start(
        "-m",
        "proxy",
        *("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *IDLE),
        *("--connect-ports", str(echo_port), "--shutdown-grace", "0"),
    )
    assert proxy.stdout is not None
    log_lines = asyncio.ensure_future(_count_log_lines(proxy.stdout))
    report = Report(plan)
    try:
        started = json.loads(listening)
        host, _, port = str(started["proxy"]).removeprefix("http://").rpartition(":")
        ends = Endpoints(
            host, int(port), str(started["metrics"]), f"http://127.0.0.1:{origin_port}", echo_port
        )
        report.rss_cold_mb = rss_mb(proxy.pid)
        # Python and malloc keep freed memory for reuse, so the baseline is taken once the
        # same load has run for a while: a leak shows as growth beyond it, not as the first
        # round's high-water mark.
        warm_up = await _run_load(ends, plan.clients, plan.warm_up, plan.seed + 1)
        report.fds_before = await _steady_fds(proxy.pid)
        report.rss_before_mb = rss_mb(proxy.pid)
        report.tally = await _run_load(ends, plan.clients, plan.seconds, plan.seed)
        report.rss_peak_mb = peak_rss_mb(proxy.pid)
        report.fds_after = await _fds_back_to(proxy.pid, report.fds_before)
        report.rss_after_mb = rss_mb(proxy.pid)
        totals = await _scrape(ends.metrics)
    finally:
        await stop(proxy)
    events = await asyncio.wait_for(log_lines, STOP_WAIT)
    report.in_flight = totals["proxy_requests_in_flight"]
    report.tunnels_open = totals["proxy_tunnels_open"]
    # The warm-up's traffic is in the proxy's totals too.
    report.proxy_requests = totals["proxy_upstream_requests_total"] - warm_up.requests
    report.proxy_tunnels = totals["proxy_tunnels_total"] - warm_up.tunnels
    report.access_lines = events.pop("access") - warm_up.requests
    report.tunnel_lines = events.pop("tunnel") - warm_up.tunnels
    for event in ("listening", "signal", "draining", "stopped"):
        events.pop(event, None)
    report.other_lines = events
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=300, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the load")
    parser.add_argument("--warm-up", type=float, default=10.0, help="seconds of load first")
    parser.add_argument("--seed", type=int, default=1, help="seed of the operation mix")
    args = parser.parse_args()
    if not 1 <= args.clients <= 2000 or not 0 < args.seconds + args.warm_up <= 600:
        parser.error("keep it bounded: 1-2000 clients, up to 600 s in all")
    report = asyncio.run(soak(Plan(args.clients, args.seconds, args.warm_up, args.seed)))
    print("\n".join(report.lines()))
    problems = report.problems()
    print("\nproblems:" if problems else "\nno problems", *problems, sep="\n  ")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
