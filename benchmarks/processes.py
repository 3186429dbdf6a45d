"""Child processes for benchmarks and tests: the proxy's command line, and ready-line starts."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator


def proxy_command(*args: str) -> list[str]:
    """``python -m proxy`` on a free loopback port, plus ``args``."""
    return [sys.executable, "-m", "proxy", "--listen", "127.0.0.1:0", *args]


def flags_only_environment() -> dict[str, str]:
    """This environment without PROXY_* (and the OTEL_* the proxy reads), so only the given
    flags configure a child."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "OTEL_"))}


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
        proc.terminate()
        proc.wait(timeout=30)
