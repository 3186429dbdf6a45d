"""The README and docs stay true to the code: two commands first, a quick start that runs as
written, every setting, every metric, every link."""

from __future__ import annotations

import asyncio
import os
import re
import socket
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from benchmarks.processes import STOP_WAIT, communicate, stop
from proxy.config import OPTIONS
from proxy.observe.exposition import RegistryView
from proxy.observe.metrics import Metrics

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
SETTINGS = (ROOT / "docs" / "settings.md").read_text()
METRICS = (ROOT / "docs" / "metrics.md").read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, re.DOTALL)


def test_readme_starts_with_the_two_commands() -> None:
    """The first code block is exactly make run and make test."""
    commands = [line.split("#")[0].strip() for line in code_blocks(README)[0].splitlines()]
    assert commands == ["make run", "make test"]


def test_readme_is_a_front_page() -> None:
    """The README stays under 10 KB; topics live in docs/."""
    assert len(README.encode()) < 10_000


def test_every_link_to_docs_resolves() -> None:
    """Each relative link in the README and in docs/ names a file that exists."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_setting_is_in_the_settings_table() -> None:
    """Each flag appears with its environment twin and its default."""
    for option in OPTIONS:
        row = f"| `{option.flag}` | `{option.env}` | `{option.default_text}` |"
        assert row in SETTINGS, row


def test_every_exported_metric_is_documented() -> None:
    """Each metric family the collector describes has a row in the metrics table."""
    registry = CollectorRegistry()
    registry.register(RegistryView(Metrics((1.0,)), in_flight=lambda: 0))
    names = {metric.name for metric in registry.collect()}
    documented = set(re.findall(r"^\| `(proxy_[a-z0-9_]+)`", METRICS, re.MULTILINE))
    # prometheus_client reports counters without their _total suffix.
    assert {n if n in documented else n + "_total" for n in names} <= documented


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_listener(host: str, port: int, process: asyncio.subprocess.Process) -> None:
    """Until something accepts on host:port; the process must stay alive meanwhile."""
    for _ in range(600):  # bounded: 60 s
        assert process.returncode is None, "exited before it listened"
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listened on {host}:{port}")


async def test_quick_start_runs_as_written() -> None:
    """The Quick start's commands, run by bash, give what the text says (ports moved aside)."""
    lines = [line for line in code_blocks(README)[1].splitlines() if line.strip()]
    proxy_port, admin_port, origin_port = free_port(), free_port(), free_port()

    def moved(line: str) -> str:
        # Only the port numbers change, so a running proxy or a parallel run cannot interfere.
        line = line.replace(":3128", f":{proxy_port}").replace(":9901", f":{admin_port}")
        return line.replace("8000", str(origin_port))

    assert lines[0].startswith("make run")
    assert lines[1].startswith("python3 -m http.server")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env = {k: v for k, v in env.items() if not k.startswith("PROXY_")}
    env |= {
        "PROXY_LISTEN": f"127.0.0.1:{proxy_port}",
        "PROXY_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "PROXY_SHUTDOWN_GRACE": "0",  # SIGTERM ends it at once, as Ctrl-C would
    }
    proxy = await asyncio.create_subprocess_shell(
        moved(lines[0]), cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    origin = await asyncio.create_subprocess_shell(
        moved(lines[1]),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await wait_for_listener("127.0.0.1", proxy_port, proxy)
        await wait_for_listener("127.0.0.2", origin_port, origin)
        script = "set -euo pipefail\n" + "\n".join(moved(line) for line in lines[2:])
        client = await asyncio.create_subprocess_exec(
            "bash", "-c", script, env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await communicate(client, 60)
        assert client.returncode == 0
        # Last, the page the Quick start opens: the call's host, its phases, the call.
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(f"http://127.0.0.1:{admin_port}/") as response,
        ):
            page = await response.text()
    finally:
        # SIGTERM to the sessions started here: a suite started in the background from a
        # script has SIGINT ignored, and so have these children (http.server then never ends).
        for process in (proxy, origin):
            await stop(process, group=True)
    text = out.decode()
    assert text.splitlines()[0] == "200"
    hosts = re.search(r'<table class="hosts">.*?</table>', page, re.S)
    assert hosts is not None
    assert f">127.0.0.2:{origin_port}</a>" in hosts.group(0)
    assert 'class="seg ttfb"' in hosts.group(0)
    slow = re.search(r'<section id="slow">.*?</section>', page, re.S)
    assert slow is not None
    assert '<td>GET</td><td class="path">/</td><td class="num">200</td>' in slow.group(0)
    assert f'proxy_upstream_ttfb_seconds_count{{host="127.0.0.2:{origin_port}"}} 1.0' in text
    assert proxy.stdout is not None
    log = (await asyncio.wait_for(proxy.stdout.read(), STOP_WAIT)).decode()
    assert '"event": "access"' in log
    assert f'"host": "127.0.0.2:{origin_port}"' in log
