"""The CLI as a real subprocess: it starts, serves, drains on SIGTERM and exits 0."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from benchmarks.processes import communicate, flags_only_environment, proxy_command, stop
from proxy import __version__, config
from proxy.config import OPTIONS
from proxy.tls.certs import CA_DAYS, CertificateAuthority
from tests.conftest import Origin


@dataclass
class Cli:
    process: asyncio.subprocess.Process
    proxy: str
    metrics: str

    async def stdout_lines(self) -> list[dict[str, object]]:
        assert self.process.stdout is not None
        out = await asyncio.wait_for(self.process.stdout.read(), 30)
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def start_cli(*args: str) -> Cli:
    process = await asyncio.create_subprocess_exec(
        *proxy_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=flags_only_environment(),
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    listening = json.loads(line)
    assert listening["event"] == "listening"
    return Cli(process, str(listening["proxy"]), str(listening["metrics"]))


@pytest.fixture
async def cli() -> AsyncIterator[list[Cli]]:
    started: list[Cli] = []
    yield started
    for running in started:
        await stop(running.process, signal.SIGKILL)


@pytest.mark.parametrize(
    "args", [(), ("--admin-listen", "off"), ("--event-loop", "asyncio")], ids=str
)
def test_test_proxies_bind_no_fixed_port(args: tuple[str, ...]) -> None:
    """Every proxy a test starts as a subprocess listens on free ports, admin listener included.

    A default (127.0.0.1:3128, :9901) would collide with a `make run` on the same machine.
    """
    settings = config.load(proxy_command(*args)[3:], {})
    assert settings.listen.port == 0
    assert settings.admin_listen is None or settings.admin_listen.port == 0


async def test_cli_serves_and_exposes_metrics(cli: list[Cli], origin: Origin) -> None:
    """The subprocess forwards a request and shows it on its admin /metrics."""
    running = await start_cli()
    cli.append(running)
    async with aiohttp.ClientSession() as session:
        async with session.get(origin.url("/echo"), proxy=running.proxy) as resp:
            assert resp.status == 200
        async with session.get(running.metrics) as resp:
            text = await resp.text()
    assert (
        f'proxy_upstream_requests_total{{code="200",host="{origin.authority}",method="GET"}} 1.0'
        in text
    )
    running.process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(running.process.wait(), 10) == 0


async def test_sigterm_finishes_an_in_flight_stream_then_exits_0(
    cli: list[Cli], origin: Origin
) -> None:
    """On SIGTERM readiness drops, a running download completes, and the process exits 0."""
    running = await start_cli("--shutdown-grace", "0.5", "--drain-timeout", "10")
    cli.append(running)
    size = 40 * 65536  # 40 chunks, 25 ms apart: about 1 s of streaming
    async with aiohttp.ClientSession() as session:
        url = origin.url(f"/stream?size={size}&delay_ms=25")
        async with session.get(url, proxy=running.proxy) as resp:
            first = await resp.content.readexactly(65536)
            running.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with session.get(running.metrics.replace("/metrics", "/readyz")) as ready:
                assert ready.status == 503
            # Still serving during the grace period.
            async with session.get(origin.url("/echo"), proxy=running.proxy) as late:
                assert late.status == 200
            rest = await resp.read()
    assert len(first) + len(rest) == size
    assert await asyncio.wait_for(running.process.wait(), 15) == 0
    events = [line["event"] for line in await running.stdout_lines()]
    assert events.count("access") == 2
    assert "draining" in events
    assert "drain_timeout" not in events  # it exited once idle, not when the drain gave up
    assert events[-1] == "stopped"


async def test_cli_bad_setting_exits_2_naming_it() -> None:
    """A bad environment value stops the CLI with exit code 2 and one line naming it."""
    code, _, err = await _run(env={**os.environ, "PROXY_DNS_CACHE_TTL": "ten"})
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "--dns-cache-ttl (PROXY_DNS_CACHE_TTL)" in err


async def test_console_log_format(cli: list[Cli], origin: Origin) -> None:
    """--log-format console writes readable, non-JSON access lines."""
    process = await asyncio.create_subprocess_exec(
        *proxy_command("--admin-listen", "off", "--log-format", "console"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=flags_only_environment(),
    )
    assert process.stdout is not None
    cli.append(Cli(process, "", ""))
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert "listening" in line
    assert not line.startswith("{")
    address = line.split("proxy=")[1].split()[0]
    async with (
        aiohttp.ClientSession() as session,
        session.get(origin.url("/echo"), proxy=address) as resp,
    ):
        assert resp.status == 200
    access = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    assert "access" in access
    assert "status=200" in access
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def run_to_exit(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the command until it exits by itself; its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else flags_only_environment(),
    )
    out, err = await communicate(process, 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m proxy ARGS`` until it exits: exit code, stdout, stderr.

    Flags go after free-port listeners, so a run that wrongly starts serving binds no fixed
    port (and is killed at the bound); ``ca`` stays the first argument.
    """
    command = (
        [sys.executable, "-m", "proxy", *args] if args[:1] == ("ca",) else proxy_command(*args)
    )
    return await run_to_exit(*command, env=env)


@pytest.mark.parametrize(
    ("flag", "env"), [("--listen", "PROXY_LISTEN"), ("--admin-listen", "PROXY_ADMIN_LISTEN")]
)
async def test_port_in_use_exits_2_with_one_line_naming_the_listener(flag: str, env: str) -> None:
    """A listener whose port is taken exits 2 with one line: setting, address and reason."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        code, _, err = await run_to_exit(*proxy_command(flag, address))
    assert code == 2
    assert err.count("\n") == 1, err
    assert f"{flag} ({env}): cannot listen on {address}: address already in use" in err


async def test_mistyped_environment_variable_warns_with_the_closest_name(cli: list[Cli]) -> None:
    """A PROXY_* variable no setting reads gets a warning naming the setting it resembles."""
    process = await asyncio.create_subprocess_exec(
        *proxy_command("--admin-listen", "off"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**flags_only_environment(), "PROXY_LISTN": "127.0.0.1:3129"},
    )
    assert process.stdout is not None
    cli.append(Cli(process, "", ""))
    warning = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
    assert warning["event"] == "unknown_setting"
    assert warning["variable"] == "PROXY_LISTN"
    assert warning["did_you_mean"] == "PROXY_LISTEN"
    listening = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
    assert listening["event"] == "listening"


async def test_help_shows_each_default_once() -> None:
    """--help names every setting's default exactly once."""
    code, out, _ = await _run("--help")
    text = out.split("options:", 1)[1]
    assert code == 0
    assert " ".join(text.split()).count("(default: ") == len(OPTIONS)
    assert not [option.flag for option in OPTIONS if "(default" in option.help]


async def test_help_names_the_ca_command_and_version() -> None:
    """--help shows the ca command beside the flags, and --version."""
    code, out, _ = await _run("--help")
    assert code == 0
    assert "tracing-proxy ca DIR" in out
    assert "--version" in out


async def test_version_flag_prints_the_version() -> None:
    """--version prints the name and version and exits 0."""
    code, out, _ = await _run("--version")
    assert (code, out) == (0, f"tracing-proxy {__version__}\n")


@pytest.mark.parametrize(
    ("argv", "suggested"),
    [
        (["--listn", "127.0.0.1:3129"], "--listen"),
        (["--admin-lisen=off"], "--admin-listen"),
        (["--upgrade-to-http", "api.example"], "--upgrade-to-https"),
        (["--verison"], "--version"),
    ],
)
async def test_mistyped_flag_exits_2_suggesting_the_closest(
    argv: list[str], suggested: str
) -> None:
    """A flag no setting has exits 2 with one line naming it and the closest real flag."""
    code, _, err = await _run(*argv)
    assert code == 2
    assert err.count("\n") == 1, err
    assert argv[0].partition("=")[0] in err
    assert f"did you mean {suggested}?" in err


async def test_ca_files_without_intercept_warn_that_they_do_nothing(cli: list[Cli]) -> None:
    """--ca-cert and --ca-key without --intercept each get a warning before the listening line."""
    process = await asyncio.create_subprocess_exec(
        *proxy_command("--ca-cert", "/nonexistent/ca.pem", "--admin-listen", "off"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**flags_only_environment(), "PROXY_CA_KEY": "/nonexistent/ca-key.pem"},
    )
    assert process.stdout is not None
    cli.append(Cli(process, "", ""))
    lines = [json.loads(await asyncio.wait_for(process.stdout.readline(), 30)) for _ in range(3)]
    assert [line["event"] for line in lines] == ["ignored_setting", "ignored_setting", "listening"]
    assert [line["setting"] for line in lines[:2]] == [
        "--ca-cert (PROXY_CA_CERT)",
        "--ca-key (PROXY_CA_KEY)",
    ]
    assert all("--intercept" in line["reason"] for line in lines[:2])


# -- tracing-proxy ca DIR, and the CA settings -------------------------------------------------


@pytest.mark.parametrize("argv", [["ca", "--help"], ["ca", "-h"]])
async def test_ca_help_exits_0_with_its_usage(argv: list[str]) -> None:
    """`tracing-proxy ca --help` explains the command and exits 0."""
    code, out, _ = await _run(*argv)
    assert code == 0
    assert out.startswith("usage: tracing-proxy ca [-h] DIR")
    assert "ca-key.pem" in out


@pytest.mark.parametrize("argv", [["ca"], ["ca", "a", "b"], ["ca", "--force", "a"]])
async def test_ca_with_bad_arguments_exits_2_with_one_line(argv: list[str]) -> None:
    """`tracing-proxy ca` without exactly one DIR exits 2 with one line (ca --help has more)."""
    code, _, err = await _run(*argv)
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("tracing-proxy ca: error:")


async def test_ca_command_writes_a_ca_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """`tracing-proxy ca DIR` writes ca.pem and a 0600 ca-key.pem; a second run changes nothing."""
    folder = tmp_path / "ca"
    code, out, _ = await _run("ca", str(folder))
    assert code == 0
    key = folder / "ca-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (folder / "ca.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert "PRIVATE" not in out
    before = key.read_bytes()
    code, _, err = await _run("ca", str(folder))
    assert code == 1
    assert "already exists" in err
    assert key.read_bytes() == before


@pytest.mark.parametrize(
    ("fault", "flag"),
    [
        ("no_ca", "--ca-cert (PROXY_CA_CERT)"),
        ("key_world_readable", "--ca-key (PROXY_CA_KEY)"),
        ("key_unreadable", "--ca-key (PROXY_CA_KEY)"),
        ("cert_garbage", "--ca-cert (PROXY_CA_CERT)"),
        ("key_garbage", "--ca-key (PROXY_CA_KEY)"),
        ("cert_expired", "--ca-cert (PROXY_CA_CERT)"),
        ("cert_and_key_swapped", "--ca-key (PROXY_CA_KEY)"),
    ],
)
async def test_intercept_with_a_bad_ca_exits_2_naming_the_setting(
    tmp_path: Path, fault: str, flag: str
) -> None:
    """Each CA fault stops the CLI with exit 2 and one line; no key material in it."""
    folder = tmp_path / "ca"
    assert (await _run("ca", str(folder)))[0] == 0
    cert, key = folder / "ca.pem", folder / "ca-key.pem"
    secret = key.read_bytes()
    args = ["--intercept", "api.example", "--ca-cert", str(cert), "--ca-key", str(key)]
    if fault == "no_ca":
        args = args[:2]
    elif fault == "key_world_readable":
        key.chmod(0o644)
    elif fault == "key_unreadable":
        key.unlink()
    elif fault == "cert_garbage":
        cert.write_text("garbage\n")
    elif fault == "key_garbage":
        key.write_bytes(secret.replace(b"\n", b"\n!", 2))
    elif fault == "cert_expired":
        expired = CertificateAuthority.create(
            now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=CA_DAYS + 1)
        )
        cert.write_bytes(expired.cert_pem())
        key.write_bytes(expired.key_pem())
    elif fault == "cert_and_key_swapped":
        args = ["--intercept", "api.example", "--ca-cert", str(key), "--ca-key", str(cert)]
    code, _, err = await _run(*args)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert flag in err
    if fault != "key_world_readable":
        assert "chmod" not in err
    for line in secret.splitlines()[1:-1]:
        assert line.decode()[:16] not in err
