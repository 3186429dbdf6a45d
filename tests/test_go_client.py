"""Go's net/http client (Debian's golang-go) through interception: HTTP/2 both ways.

tests/go/h2client.go uses the standard library only: it is built in a temporary directory
with GOPROXY=off and no module, so nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.processes import communicate
from tests import test_intercept
from tests.conftest import LogCapture, RunningProxy, pattern, unavailable
from tests.h2_origin import H2Origin
from tests.test_intercept import CAFiles, intercepting_proxy

StartProxy = Callable[..., Awaitable[RunningProxy]]
ca_files = test_intercept.ca_files
SOURCE = Path(__file__).parent / "go" / "h2client.go"


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client, built once for the module; fails under CI=true when go is missing."""
    go = shutil.which("go")
    if go is None:
        unavailable("go is needed (Debian's golang-go; .ci/run installs it)")
    assert go is not None
    folder = tmp_path_factory.mktemp("go")
    binary = folder / "h2client"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(folder),
        "GOCACHE": str(folder / "cache"),
        "GOPATH": str(folder / "gopath"),
        "GOPROXY": "off",  # nothing is fetched: the standard library is all it uses
        "GO111MODULE": "off",
        "GOFLAGS": "",
    }
    built = subprocess.run(
        [go, "build", "-o", str(binary), SOURCE.name],
        cwd=SOURCE.parent,
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr.decode()
    return binary


async def run_go(binary: Path, proxy: str, ca: str, *urls: str) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        str(binary),
        proxy,
        ca,
        *urls,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ["PATH"]},  # no proxy variables, no SSL_CERT_FILE
    )
    out, err = await communicate(process, 60)  # past the bound: killed, reaped, TimeoutError
    assert process.returncode == 0, err.decode()
    results: list[dict[str, Any]] = json.loads(out)
    return results


async def test_go_net_http_gets_http2_through_interception(
    go_client: Path,
    start_proxy: StartProxy,
    ca_files: CAFiles,
    tls_ca_file: str,
    tls_h2_origin: H2Origin,
    logs: LogCapture,
) -> None:
    """Go's client negotiates h2 with the proxy and the proxy with the h2 origin: a gRPC-shaped
    answer with its trailers and a 1 MiB body come through, and each GET is an HTTP/2 access
    line."""
    origin = tls_h2_origin
    proxy = await intercepting_proxy(start_proxy, ca_files, tls_ca_file, origin.port)
    grpc, big = await run_go(
        go_client,
        proxy.url,
        ca_files.cert,
        origin.url("/grpc?status=5&messages=2"),
        origin.url("/stream?size=1048576"),
    )
    assert (grpc["proto"], grpc["status"], grpc["length"]) == ("HTTP/2.0", 200, 20)
    assert grpc["trailers"]["Grpc-Status"] == "5"
    assert (big["proto"], big["status"], big["length"]) == ("HTTP/2.0", 200, 1 << 20)
    assert big["sha256"] == hashlib.sha256(pattern(1 << 20)).hexdigest()
    lines = await logs.wait_for("access", 2)
    assert [(line["protocol"], line["path"]) for line in lines] == [
        ("HTTP/2", "/grpc"),
        ("HTTP/2", "/stream"),
    ]
    assert lines[0]["grpc_status"] == 5
    assert origin.versions == ["2", "2"]
