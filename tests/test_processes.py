"""Stopping the children tests start always ends, SIGINT ignored or not."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from benchmarks.processes import communicate, stop, stop_sync

# A child that says it is ready, then sleeps with the given signals ignored: what a child
# of a job started in the background from a script is (SIGINT ignored), and worse.
STUBBORN = """
import signal, sys, time
for name in sys.argv[1:]:
    signal.signal(getattr(signal, name), signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


async def stubborn(*ignored: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STUBBORN, *ignored, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    assert await asyncio.wait_for(process.stdout.readline(), 30) == b"ready\n"
    return process


@pytest.mark.parametrize(
    ("ignored", "ended_by"),
    [
        (("SIGINT",), signal.SIGTERM),
        (("SIGINT", "SIGTERM"), signal.SIGKILL),
    ],
)
async def test_stop_ends_a_child_that_ignores_sigint(
    ignored: tuple[str, ...], ended_by: signal.Signals
) -> None:
    """SIGTERM ends a child that ignores SIGINT; one that ignores SIGTERM too gets SIGKILL."""
    process = await stubborn(*ignored)
    assert await stop(process, wait=1.0) == -ended_by


async def test_stop_of_a_process_group_reaches_every_member() -> None:
    """With group=True the signal goes to the session the child leads, its own children too."""
    shell = "python3 -c 'import time; time.sleep(60)' & echo ready; wait"
    process = await asyncio.create_subprocess_shell(
        shell, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    assert process.stdout is not None
    assert await asyncio.wait_for(process.stdout.readline(), 30) == b"ready\n"
    await stop(process, group=True, wait=5.0)
    # The grandchild held stdout open: it ends once the grandchild is gone too.
    assert await asyncio.wait_for(process.stdout.read(), 5) == b""


async def test_communicate_past_its_bound_kills_the_child() -> None:
    """A child that outlives the bound is killed and reaped, and the caller gets TimeoutError."""
    process = await stubborn("SIGINT", "SIGTERM")
    with pytest.raises(TimeoutError):
        await communicate(process, 0.5)
    assert process.returncode == -signal.SIGKILL


def test_stop_sync_ends_a_child_that_ignores_sigterm() -> None:
    """The subprocess.Popen twin: SIGTERM, then SIGKILL after the bound."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, "SIGINT", "SIGTERM"], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    assert stop_sync(proc, wait=1.0) == -signal.SIGKILL
    proc.stdout.close()
