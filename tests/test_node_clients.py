"""Node clients that tunnel even http:// through CONNECT (undici ProxyAgent v6, https-proxy-agent):
plain HTTP inside CONNECT and interception give each request its own access line."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from benchmarks.processes import communicate
from tests.conftest import LogCapture, Origin, RunningProxy, unavailable
from tests.test_intercept import (  # noqa: F401
    CAFiles,
    ca_files,
    intercepting,
    intercepting_proxy,
    ws_server,
)
from tests.test_limits import until
from tests.tls import TLSOrigin, server_context

StartProxy = Callable[..., Awaitable[RunningProxy]]
NODE_DIR = Path(__file__).parent / "node"
CLIENTS = ["undici", "https-proxy-agent"]


def node_or_skip() -> str:
    """Path of node with the clients installed (make test runs npm ci); fails under CI=true."""
    node = shutil.which("node")
    missing = node is None or not (NODE_DIR / "node_modules" / "undici").is_dir()
    if missing:
        unavailable("node and tests/node/node_modules are needed (make test runs npm ci)")
    assert node is not None
    return node


async def run_client(kind: str, proxy: str, ca: str | None, *urls: str) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        node_or_skip(),
        str(NODE_DIR / "client.mjs"),
        kind,
        proxy,
        ca or "-",
        *urls,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ["PATH"]},  # no NODE_EXTRA_CA_CERTS or proxy variables
    )
    out, err = await communicate(process, 60)
    assert process.returncode == 0, err.decode()
    results: list[dict[str, Any]] = json.loads(out)
    return results


@pytest.mark.parametrize("kind", CLIENTS)
async def test_node_http_call_through_connect_is_a_forwarded_request(
    kind: str, start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """An http:// call these clients tunnel through CONNECT shows up per request, scheme http."""
    proxy = await start_proxy(connect_http_ports=(origin.port,))
    results = await run_client(kind, proxy.url, None, origin.url("/echo/a"), origin.url("/echo/b"))
    assert [r["status"] for r in results] == [200, 200]
    assert [json.loads(r["body"])["target"] for r in results] == ["/echo/a", "/echo/b"]
    await until(lambda: len(logs.events("access")) == 2)
    assert [(a["path"], a["scheme"]) for a in logs.events("access")] == [
        ("/echo/a", "http"),
        ("/echo/b", "http"),
    ]
    # Through CONNECT, served as plain HTTP: both clients tunnel http:// calls (undici 7 too).
    tunnels = await logs.wait_for("tunnel")
    assert {t["outcome"] for t in tunnels} == {"http"}


def test_clients_doc_names_the_undici_version_tested() -> None:
    """docs/clients.md's undici row names the major version tests/node installs."""
    node_or_skip()
    package = json.loads((NODE_DIR / "node_modules" / "undici" / "package.json").read_text())
    major = package["version"].split(".")[0]
    doc = (NODE_DIR.parent.parent / "docs" / "clients.md").read_text()
    (row,) = [line for line in doc.splitlines() if line.startswith("| Node `undici`")]
    assert f"v{major}" in row
    assert "up to v" not in row


@pytest.mark.parametrize("kind", CLIENTS)
async def test_node_https_call_through_interception(
    kind: str,
    intercepting: RunningProxy,  # noqa: F811
    ca_files: CAFiles,  # noqa: F811
    secure_origin: TLSOrigin,
    logs: LogCapture,
) -> None:
    """Trusting our CA (what NODE_EXTRA_CA_CERTS does), Node's https call is intercepted."""
    url = f"https://localhost:{secure_origin.port}/echo/node"
    results = await run_client(kind, intercepting.url, ca_files.cert, url)
    assert results[0]["status"] == 200
    assert json.loads(results[0]["body"])["target"] == "/echo/node"
    await until(lambda: len(logs.events("access")) == 1)
    assert logs.events("access")[0]["scheme"] == "https"


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_node_websockets_inside_connect_never_release_it(
    scheme: str,
    start_proxy: StartProxy,
    ca_files: CAFiles,  # noqa: F811
    tls_ca: trustme.CA,
    tls_ca_file: str,
    logs: LogCapture,
) -> None:
    """ws with https-proxy-agent, four WebSockets in turn under --max-client-connections 3
    (ws:// as plain HTTP inside CONNECT, wss:// intercepted): each echoes and ends its CONNECT."""
    context = server_context(tls_ca, "localhost") if scheme == "wss" else None
    async with ws_server(context) as port:
        proxy = await intercepting_proxy(
            start_proxy,
            ca_files,
            tls_ca_file,
            port,
            connect_ports=(port,) if scheme == "wss" else (),
            connect_http_ports=(port,) if scheme == "ws" else (),
            max_client_connections=3,
        )
        url = f"{scheme}://localhost:{port}/"
        results = await run_client("ws", proxy.url, ca_files.cert, *[url] * 4)
        await logs.wait_for("tunnel", 4)
        await until(lambda: proxy.sample("proxy_client_connections_open") == 0)
    assert [(r["status"], r["body"]) for r in results] == [(1005, "hello")] * 4
    served = "intercepted" if scheme == "wss" else "http"
    assert [line["outcome"] for line in logs.events("tunnel")] == [served] * 4
    assert proxy.sample("proxy_client_connections_rejected_total") == 0
