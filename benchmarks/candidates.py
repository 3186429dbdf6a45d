"""What ``make bench`` puts between the load generator and the origin, one process each.

A ``Candidate`` starts its proxy pinned to the proxy core and yields a ``Running``: the
proxy URL (None for the direct path), the process whose tree is measured, and where its
metrics are scraped, if it has any. Third-party proxies are installed on first use:
proxy.py into its own venv under ``.bench/``, squid and tinyproxy from Debian packages
when running as root (see ``benchmarks.installs``). Each gets a config file generated
into a temporary directory and listens on a free loopback port.

To add a candidate (say, ours with TLS interception), append a ``Candidate`` to
``CANDIDATES`` or pass extra ones to ``benchmarks.run.main``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks import installs
from benchmarks.processes import flags_only_environment, proxy_command, ready_process, stop_sync

# The proxy under test gets core 0 to itself; wrk and the origin share core 1.
PROXY_CORE: Final = "0"
LOAD_CORE: Final = "1"


def pinned(core: str, args: Sequence[str]) -> list[str]:
    """``args`` under ``taskset -c core`` when the machine has two cores to pin to."""
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return list(args)
    return ["taskset", "-c", core, *args]


def bench_loop() -> str:
    """The event loop our proxy runs on: run.py's --loop, read from the environment because
    the candidates and studies are declared before any argument is parsed."""
    return os.environ.get("BENCH_LOOP", "uvloop")


@dataclass(frozen=True)
class Running:
    name: str
    proxy_url: str | None  # None: the direct path, no proxy
    pid: int | None  # the root of the process tree whose CPU is measured
    metrics_url: str | None = None  # scraped every 15 s during the small-response load


Starter = Callable[["Candidate", int, Path], contextlib.AbstractContextManager[Running]]


@dataclass(frozen=True)
class Candidate:
    name: str
    description: str
    start: Starter
    # Returns why the candidate cannot run here, or None (installing it if needed).
    prepare: Callable[[], str | None] = lambda: None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    """Poll until ``port`` accepts; fail early if ``proc`` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.args!r} did not listen on {port} within {seconds:g} s")


@contextlib.contextmanager
def _stopped_at_exit(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        stop_sync(proc)


@contextlib.contextmanager
def _external(name: str, args: list[str], port: int, workdir: Path) -> Iterator[Running]:
    """A third-party proxy that logs to files in ``workdir`` and listens on ``port``."""
    with (
        open(workdir / "stdout", "wb") as out,
        _stopped_at_exit(
            subprocess.Popen(
                pinned(PROXY_CORE, args),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
        ) as proc,
    ):
        wait_listening(port, proc)
        yield Running(name, f"http://127.0.0.1:{port}", proc.pid)


# -- the direct path and the aiohttp floor ---------------------------------------------------


@contextlib.contextmanager
def _direct(candidate: Candidate, origin_port: int, workdir: Path) -> Iterator[Running]:
    yield Running(candidate.name, None, None)


def _bare(trace: bool, application: bool = False) -> Starter:
    @contextlib.contextmanager
    def start(candidate: Candidate, origin_port: int, workdir: Path) -> Iterator[Running]:
        args = [sys.executable, "-m", "benchmarks.bare", *(["--trace"] if trace else [])]
        args += ["--application"] if application else []
        with _ready(pinned(PROXY_CORE, args), workdir) as (proc, line):
            url = f"http://127.0.0.1:{int(line)}"
            yield Running(candidate.name, url, proc.pid, f"{url}/metrics" if trace else None)

    return start


@contextlib.contextmanager
def _ready(
    args: list[str], workdir: Path, cwd: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start a process that prints one line when ready; the rest of its stdout goes to a file.

    The file stands in for a sidecar's stdout, which goes to the node's log pipe.
    """
    with (
        open(workdir / "stdout", "wb") as sink,
        _stopped_at_exit(
            subprocess.Popen(args, stdout=subprocess.PIPE, env=flags_only_environment(), cwd=cwd)
        ) as proc,
    ):
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        if not first:
            raise RuntimeError(f"{args} exited before it was ready")
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=sink)
        try:
            yield proc, first
        finally:
            proc.terminate()
            drain.wait(timeout=30)


# -- ours --------------------------------------------------------------------------------------


def _ours(observe: bool, *extra: str, source: Path | None = None) -> Starter:
    @contextlib.contextmanager
    def start(candidate: Candidate, origin_port: int, workdir: Path) -> Iterator[Running]:
        command = proxy_command(
            "--admin-listen",
            "127.0.0.1:0",
            "--observe",
            "true" if observe else "false",
            "--log-level",
            "info",
            "--event-loop",
            bench_loop(),
            *extra,
        )
        with _ready(pinned(PROXY_CORE, command), workdir, cwd=source) as (proc, line):
            listening = json.loads(line)
            yield Running(candidate.name, listening["proxy"], proc.pid, listening["metrics"])

    return start


def _ours_spans(candidate: Candidate, origin_port: int, workdir: Path) -> Any:
    """Ours exporting a span per request (ratio 1.0) to a local OTLP sink."""

    @contextlib.contextmanager
    def start() -> Iterator[Running]:
        sink_command = pinned(LOAD_CORE, [sys.executable, "-m", "benchmarks.otlp_sink"])
        with ready_process(sink_command) as (_, sink_line):
            endpoint = f"http://127.0.0.1:{int(sink_line)}"
            spans = ("--otlp-endpoint", endpoint, "--otlp-sample-ratio", "1.0")
            with _ours(True, *spans)(candidate, origin_port, workdir) as running:
                yield running

    return start()


# -- third-party proxies -----------------------------------------------------------------------


@contextlib.contextmanager
def _proxypy(candidate: Candidate, origin_port: int, workdir: Path) -> Iterator[Running]:
    port = free_port()
    # One acceptor and one worker: the same single core as everyone else.
    args = [str(installs.PROXYPY_BIN), "--hostname", "127.0.0.1", "--port", str(port)]
    args += ["--num-acceptors", "1", "--num-workers", "1", "--log-file", str(workdir / "log")]
    with _external(candidate.name, args, port, workdir) as running:
        yield running


SQUID_CONF: Final = """\
http_port 127.0.0.1:{port}
http_access allow all
cache deny all
cache_mem 0 MB
workers 1
access_log stdio:{dir}/access.log
cache_log {dir}/cache.log
pid_filename {dir}/squid.pid
coredump_dir {dir}
netdb_filename none
shutdown_lifetime 0 seconds
max_filedescriptors 4096
"""


@contextlib.contextmanager
def _squid(candidate: Candidate, origin_port: int, workdir: Path) -> Iterator[Running]:
    port = free_port()
    workdir.chmod(0o777)  # squid drops to its own user when started as root
    conf = workdir / "squid.conf"
    conf.write_text(SQUID_CONF.format(port=port, dir=workdir))
    squid = shutil.which("squid") or "/usr/sbin/squid"
    with _external(candidate.name, [squid, "-N", "-f", str(conf)], port, workdir) as running:
        yield running


TINYPROXY_CONF: Final = """\
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 1000
LogFile "{dir}/tinyproxy.log"
LogLevel Info
PidFile "{dir}/tinyproxy.pid"
Allow 127.0.0.1
DisableViaHeader No
"""


@contextlib.contextmanager
def _tinyproxy(candidate: Candidate, origin_port: int, workdir: Path) -> Iterator[Running]:
    port = free_port()
    workdir.chmod(0o777)  # tinyproxy drops to nobody when started as root
    conf = workdir / "tinyproxy.conf"
    text = TINYPROXY_CONF.format(port=port, dir=workdir)
    if os.geteuid() == 0:
        text += "User nobody\nGroup nogroup\n"
    conf.write_text(text)
    tinyproxy = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    with _external(candidate.name, [tinyproxy, "-d", "-c", str(conf)], port, workdir) as running:
        yield running


CANDIDATES: Final[tuple[Candidate, ...]] = (
    Candidate("direct", "wrk straight to the origin", _direct),
    Candidate("bare", "aiohttp forwarder, nothing on top (benchmarks/bare.py)", _bare(False)),
    Candidate("bare-traced", "the same with a TraceConfig -> histograms", _bare(True)),
    Candidate("ours", "tracing-proxy, everything on", _ours(True)),
    Candidate("ours-off", "tracing-proxy --observe false", _ours(False)),
    Candidate(
        "ours-noexemplars", "tracing-proxy --exemplars false", _ours(True, "--exemplars", "false")
    ),
    Candidate("ours-spans", "tracing-proxy exporting every request as a span", _ours_spans),
    Candidate("proxypy", "proxy.py, 1 acceptor, 1 worker", _proxypy, installs.proxypy),
    Candidate("squid", "squid, no cache, 1 worker", _squid, installs.debian("squid", "squid")),
    Candidate("tinyproxy", "tinyproxy", _tinyproxy, installs.debian("tinyproxy", "tinyproxy")),
)


def ours_at(ref: str, observe: bool = True) -> Candidate:
    """Ours as committed at git ``ref``, for A/B runs: ``--ab HEAD~1`` adds ``ours@HEAD~1``.

    The ref's ``proxy/`` is exported (``git archive``, nothing in the repository changes) to
    ``.bench/ab/<sha>``; ``python -m proxy`` run there imports it ahead of the working tree.
    """
    repo = Path(__file__).resolve().parent.parent
    export = installs.BENCH_DIR / "ab" / ref.replace("/", "_")

    def prepare() -> str | None:
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
                cwd=repo, capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            shutil.rmtree(export, ignore_errors=True)
            export.mkdir(parents=True)
            archive = subprocess.run(
                ["git", "archive", sha, "proxy"], cwd=repo, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"cannot export {ref}: {exc}"
        return None

    suffix = "" if observe else "-off"
    return Candidate(
        f"ours{suffix}@{ref}", f"ours at {ref}", _ours(observe, source=export), prepare
    )


# Named with --only; not in the default set.
EXTRA_CANDIDATES: Final[tuple[Candidate, ...]] = (
    Candidate("bare-app", "bare behind web.Application: the framework's cost", _bare(False, True)),
    Candidate(
        "ours-nopage",
        "tracing-proxy --live-page false: no rings or counter history",
        _ours(True, "--live-page", "false"),
    ),
)


@contextlib.contextmanager
def started(candidate: Candidate, origin_port: int) -> Iterator[Running]:
    """``candidate`` running, with a scratch directory for its config and logs."""
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-{candidate.name}-") as scratch,
        candidate.start(candidate, origin_port, Path(scratch)) as running,
    ):
        yield running
