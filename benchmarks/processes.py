"""Child processes for benchmarks and tests: the proxy's command line, ready-line starts, and
stops that always end: a signal, a bounded wait, then SIGKILL and another bounded wait.

SIGTERM, not SIGINT, is the polite signal here: a script that starts a job in the background
(``make test &``, some CI runners) leaves SIGINT ignored in every child it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, Final

STOP_WAIT: Final = 10.0  # seconds each step of a stop may take


def proxy_command(*args: str) -> list[str]:
    """``python -m proxy`` on free loopback ports (both listeners), plus ``args``.

    ``args`` may name either listener again: the last one given wins.
    """
    return [
        *(sys.executable, "-m", "proxy"),
        *("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *args),
    ]


def flags_only_environment() -> dict[str, str]:
    """This environment without PROXY_* (and the OTEL_* the proxy reads), so only the given
    flags configure a child."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "OTEL_"))}


def _send(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


async def stop(
    process: asyncio.subprocess.Process,
    sig: int = signal.SIGTERM,
    *,
    group: bool = False,
    wait: float = STOP_WAIT,
) -> int:
    """Send ``sig`` (to the process group it leads, with ``group``) and reap the child; if it
    has not exited after ``wait`` seconds, SIGKILL and ``wait`` more. Its exit status."""
    if process.returncode is None:
        _send(process.pid, sig, group)
        try:
            return await asyncio.wait_for(process.wait(), wait)
        except TimeoutError:
            _send(process.pid, signal.SIGKILL, group)
    return await asyncio.wait_for(process.wait(), wait)


async def communicate(
    process: asyncio.subprocess.Process, within: float, data: bytes | None = None
) -> tuple[bytes, bytes]:
    """``process.communicate()`` within ``within`` seconds; past them the child is killed and
    reaped, and TimeoutError raised."""
    try:
        return await asyncio.wait_for(process.communicate(data), within)
    except TimeoutError:
        await stop(process, signal.SIGKILL)
        raise


def stop_sync(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait: float = STOP_WAIT
) -> int:
    """``stop`` for a ``subprocess.Popen``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(wait)


@contextlib.contextmanager
def ready_process(args: list[str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start a process that prints one line when ready; yield it with that line; stop it."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=flags_only_environment())
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if not first:
            raise RuntimeError(f"{args} exited before it was ready")
        yield proc, first
    finally:
        stop_sync(proc)
