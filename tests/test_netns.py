"""Default denials of non-loopback destinations, inside a network namespace with only loopback.

Run there, a destination the rules failed to deny would fail at once with no route (502),
never reach a real network, and so could not be mistaken for the 403 the rule gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from benchmarks.processes import communicate
from tests.conftest import proxy_process, unavailable

# A client run inside the namespace: send the request bytes, print the status code and
# Proxy-Status of the answer as JSON.
CLIENT = """
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=10) as sock:
    sock.sendall(sys.argv[2].encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
lines = head.split(b"\\r\\n\\r\\n")[0].decode("latin-1").split("\\r\\n")
fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
print(json.dumps({"status": int(lines[0].split()[1]), "proxy_status": fields.get("proxy-status")}))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace holding only an up loopback interface; deleted afterwards."""
    name = f"tp-test-{os.getpid()}-{secrets.token_hex(4)}"
    problem = None
    if shutil.which("ip") is None:
        problem = "iproute2 (ip) is not installed"
    else:
        added = subprocess.run(
            ["ip", "netns", "add", name], capture_output=True, text=True, timeout=30
        )
        if added.returncode != 0:
            problem = f"cannot create a network namespace: {added.stderr.strip()}"
    if problem is not None:
        # The only tests that try non-loopback destinations: never silently skipped in CI.
        unavailable(problem)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=30
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)


async def ask_in(netns: str, proxy: str, request: str) -> dict[str, object]:
    command = ("ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, proxy, request)
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    out, _ = await communicate(process, 30)
    assert process.returncode == 0
    answer: dict[str, object] = json.loads(out)
    return answer


def get(target: str) -> str:
    return f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


DENIED_BY_DEFAULT = (
    get("http://169.254.169.254/latest/meta-data/"),
    get("http://2852039166/latest/meta-data/"),
    get("http://0251.0376.0251.0376/"),
    get("http://0xa9fea9fe/"),
    get("http://[::ffff:169.254.169.254]/"),
    # IPv4 inside IPv6 (compatible, NAT64 both prefixes, 6to4): unwrapped, never dialled.
    get("http://[::169.254.169.254]/"),
    get("http://[64:ff9b::a9fe:a9fe]/"),
    get("http://[64:ff9b:1::a9fe:a9fe]/"),
    get("http://[2002:a9fe:a9fe::1]/"),
    get("http://169.254.169.254./"),
    get("http://[fd00:ec2::254]/"),
    get("http://[fe80::1]:8080/"),
    get("http://0.0.0.0:8080/"),
    "CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\n\r\n",
    "CONNECT [fd00:ec2::254]:443 HTTP/1.1\r\nHost: [fd00:ec2::254]:443\r\n\r\n",
    "CONNECT [64:ff9b::a9fe:a9fe]:443 HTTP/1.1\r\nHost: [64:ff9b::a9fe:a9fe]:443\r\n\r\n",
)
DENIED = "tracing-proxy; error=destination_ip_prohibited"


def proxy_in(
    netns: str, *args: str
) -> contextlib.AbstractAsyncContextManager[tuple[asyncio.subprocess.Process, str]]:
    # No grace period: nothing is in flight when a test ends.
    return proxy_process(
        "--admin-listen",
        "off",
        "--shutdown-grace",
        "0",
        *args,
        prefix=("ip", "netns", "exec", netns),
    )


async def test_metadata_link_local_and_unspecified_are_denied_by_default(netns: str) -> None:
    """Cloud metadata, link-local and unspecified destinations get 403, in any spelling."""
    async with proxy_in(netns) as (_, url):
        answers = [await ask_in(netns, url.removeprefix("http://"), r) for r in DENIED_BY_DEFAULT]
    assert [(a["status"], str(a["proxy_status"])[: len(DENIED)]) for a in answers] == [
        (403, DENIED)
    ] * len(DENIED_BY_DEFAULT)


async def test_an_allowed_unreachable_destination_fails_differently(netns: str) -> None:
    """A destination no rule denies fails with 502 there: the 403s above come from the rules."""
    async with proxy_in(netns) as (_, url):
        answer = await ask_in(netns, url.removeprefix("http://"), get("http://10.0.0.1/"))
    assert answer["status"] == 502


async def test_allow_destinations_opens_one_metadata_address(netns: str) -> None:
    """--allow-destinations lets one link-local address through (it then fails: no route)."""
    async with proxy_in(netns, "--allow-destinations", "169.254.169.254") as (_, url):
        proxy = url.removeprefix("http://")
        allowed = await ask_in(netns, proxy, get("http://169.254.169.254/"))
        other = await ask_in(netns, proxy, get("http://169.254.169.253/"))
    assert (allowed["status"], other["status"]) == (502, 403)
