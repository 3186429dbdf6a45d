"""Installing the third-party proxies ``make bench`` compares against, on first use.

- proxy.py and mitmproxy each go into a venv of their own under ``.bench/`` (git-ignored),
  never into ours.
- squid and tinyproxy are Debian packages, installed only when running as root. Their
  packages would start a system daemon; a ``policy-rc.d`` that forbids starting services
  is in place for the install (see invoke-rc.d(8)), and any daemon process that
  appeared anyway is stopped by its PID. The benchmark runs its own instance, with its own
  config, on a loopback port.

Each function returns None when the proxy is ready, or a one-line reason it is not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

BENCH_DIR: Final = Path(__file__).resolve().parent.parent / ".bench"
PROXYPY_VENV: Final = BENCH_DIR / "proxypy"
PROXYPY_BIN: Final = PROXYPY_VENV / "bin" / "proxy"
PROXYPY_REQUIREMENT: Final = "proxy.py>=2.4,<2.5"
MITMPROXY_VENV: Final = BENCH_DIR / "mitmproxy"
MITMPROXY_BIN: Final = MITMPROXY_VENV / "bin" / "mitmdump"
MITMPROXY_REQUIREMENT: Final = "mitmproxy>=11.0,<11.1"  # 11.0 is the last for Python 3.11
POLICY_RC_D: Final = Path("/usr/sbin/policy-rc.d")


def _venv(venv: Path, binary: Path, requirement: str) -> str | None:
    """``requirement`` pip-installed into a venv of its own, unless ``binary`` is there."""
    if binary.exists():
        return None
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", requirement],
            check=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"installing {requirement} failed: {exc}"
    return None


def proxypy() -> str | None:
    return _venv(PROXYPY_VENV, PROXYPY_BIN, PROXYPY_REQUIREMENT)


def mitmproxy() -> str | None:
    return _venv(MITMPROXY_VENV, MITMPROXY_BIN, MITMPROXY_REQUIREMENT)


def debian(package: str, binary: str) -> Callable[[], str | None]:
    """A ``prepare`` step that installs ``package`` unless ``binary`` is already there."""

    def prepare() -> str | None:
        if _find(binary):
            return None
        if os.geteuid() != 0:
            return f"{binary} not installed (apt-get install {package}, or run as root)"
        before = _pids_named(binary)
        try:
            with _no_service_starts():
                subprocess.run(
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                    check=True,
                    timeout=900,
                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                    stdout=subprocess.DEVNULL,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"apt-get install {package} failed: {exc}"
        finally:
            for pid in _pids_named(binary) - before:  # only what the install started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 15)
        return None if _find(binary) else f"{binary} still missing after installing {package}"

    return prepare


def _find(binary: str) -> str | None:
    return shutil.which(binary) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d) / binary).exists()), None
    )


@contextlib.contextmanager
def _no_service_starts() -> Iterator[None]:
    """invoke-rc.d asks policy-rc.d; exit 101 means "action forbidden"."""
    if POLICY_RC_D.exists():  # someone else's policy: leave it alone
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# written by tracing-proxy's make bench\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink()


def _pids_named(name: str) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    pids.add(int(entry))
    return pids
