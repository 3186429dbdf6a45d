"""HTTP/2 towards the client: h2c inside a CONNECT and h2 through interception, real clients."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from tests import test_intercept
from tests.conftest import LogCapture, Origin, RunningProxy, pattern
from tests.test_forwarding import curl
from tests.test_intercept import CAFiles
from tests.test_limits import until
from tests.tls import TLSOrigin

StartProxy = Callable[..., Awaitable[RunningProxy]]

# The interception fixtures: a CA, a TLS origin, a proxy intercepting it.
ca_files = test_intercept.ca_files
secure_origin = test_intercept.secure_origin
intercepting = test_intercept.intercepting


async def h2c_proxy(start_proxy: StartProxy, origin: Origin, **changes: object) -> RunningProxy:
    """A proxy whose CONNECT to the origin's port may carry plain HTTP only (h2c included)."""
    return await start_proxy(connect_http_ports=(origin.port,), **changes)


async def test_curl_h2c_prior_knowledge_inside_connect_is_forwarded(
    start_proxy: StartProxy, origin: Origin, logs: LogCapture
) -> None:
    """curl --http2-prior-knowledge -p: HTTP/2 to the proxy, the request forwarded and logged.

    One URL per curl: curl 7.88 fails its second request on a reused h2c tunnel before
    sending a byte of it ("Error in the HTTP2 framing layer"); streams on one connection are
    tested with an h2 client below.
    """
    proxy = await h2c_proxy(start_proxy, origin)
    url = origin.url("/echo/a?q=1")
    code, out, err = await curl(
        "--http2-prior-knowledge", "-p", "-x", proxy.url, "-w", "\n%{http_version}", url
    )
    assert code == 0, err
    first = out.partition(b"\n")[0]
    echoed = json.loads(first)
    assert echoed["target"] == "/echo/a?q=1"
    assert echoed["version"] == "1.1"  # the origin speaks HTTP/1.1 only: forwarded as such
    fields = {name.lower(): value for name, value in echoed["headers"]}
    assert fields["via"] == "2 tracing-proxy"
    assert fields["host"] == origin.authority
    assert out.endswith(b"\n2")
    lines = await logs.wait_for("access", 1)
    assert [(line["path"], line["status"]) for line in lines] == [("/echo/a", 200)]
    assert proxy.sample("proxy_upstream_ttfb_seconds_count", host=origin.authority) == 1


async def test_h2c_request_body_reaches_the_origin_byte_exact(
    start_proxy: StartProxy, origin: Origin, tmp_path: Path
) -> None:
    """A 3 MiB upload over h2c (more than any window) arrives whole at the origin."""
    proxy = await h2c_proxy(start_proxy, origin)
    body = pattern(3 << 20, seed=7)
    path = tmp_path / "body"
    path.write_bytes(body)
    code, out, err = await curl(
        "--http2-prior-knowledge",
        "-p",
        "-x",
        proxy.url,
        "--data-binary",
        f"@{path}",
        origin.url("/echo"),
    )
    assert code == 0, err
    echoed = json.loads(out)
    assert echoed["body_len"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_h2c_download_is_byte_exact(start_proxy: StartProxy, origin: Origin) -> None:
    """5 MiB down over h2c, chunked from the origin, arrive whole."""
    proxy = await h2c_proxy(start_proxy, origin)
    code, out, err = await curl(
        "--http2-prior-knowledge", "-p", "-x", proxy.url, origin.url("/stream?size=5242880")
    )
    assert code == 0, err
    assert out == pattern(5 << 20)


async def test_h2c_refused_when_http2_is_off(start_proxy: StartProxy, origin: Origin) -> None:
    """With --http2 false the preface is not served: curl fails, nothing is forwarded."""
    proxy = await h2c_proxy(start_proxy, origin, http2=False)
    code, _, _ = await curl("--http2-prior-knowledge", "-p", "-x", proxy.url, origin.url("/echo"))
    assert code != 0
    assert proxy.sample("proxy_upstream_requests_total", host=origin.authority) is None


async def test_httpx_http2_through_interception(
    intercepting: RunningProxy, ca_files: CAFiles, secure_origin: TLSOrigin, logs: LogCapture
) -> None:
    """httpx http2=True through interception speaks HTTP/2 to the proxy (ALPN h2)."""
    async with httpx.AsyncClient(
        http2=True, proxy=intercepting.url, verify=ca_files.client_context(), trust_env=False
    ) as client:
        responses = [
            await client.get(f"https://localhost:{secure_origin.port}/echo/{i}") for i in range(3)
        ]
    assert [r.http_version for r in responses] == ["HTTP/2"] * 3
    assert [r.json()["target"] for r in responses] == ["/echo/0", "/echo/1", "/echo/2"]
    lines = await logs.wait_for("access", 3)
    assert {line["status"] for line in lines} == {200}
    host = f"localhost:{secure_origin.port}"
    await until(
        lambda: intercepting.sample("proxy_tunnels_total", host=host, outcome="intercepted") == 1
    )
