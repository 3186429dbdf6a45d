"""The clients people use, each pointed at the proxy the way docs/clients.md says.

Each client runs as its own process against a loopback origin; the proxy's access line for
its call is the proof that it went through the proxy and got the per-request view.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.processes import communicate, stop
from tests.conftest import LogCapture, Origin, RunningProxy, unavailable
from tests.test_failures import closed_port


@dataclass(frozen=True)
class Client:
    """How one client is told to use the proxy: a command and the environment it runs in."""

    name: str
    tool: str  # the program that must be installed
    argv: tuple[str, ...]  # {url}, {proxy_host}, {proxy_port}, {java_source} are filled in
    env: tuple[tuple[str, str], ...] = ()

    def command(self, values: dict[str, str]) -> list[str]:
        return [part.format(**values) for part in self.argv]

    def environment(self, proxy: str) -> dict[str, str]:
        # Nothing inherited but PATH and HOME: a stray *_proxy variable would change the test.
        base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
        return base | {name: value.format(proxy=proxy) for name, value in self.env}


def python(code: str) -> tuple[str, ...]:
    """A Python client as its own process, so its blocking I/O cannot stall the proxy's loop."""
    return (sys.executable, "-c", textwrap.dedent(code), "{url}")


CLIENTS = [
    # curl reads only the lower-case http_proxy (upper case is ignored for http://).
    Client("curl", "curl", ("curl", "-fsS", "{url}"), (("http_proxy", "{proxy}"),)),
    Client(
        "requests",
        sys.executable,
        python("import sys, requests; requests.get(sys.argv[1], timeout=10).raise_for_status()"),
        (("HTTP_PROXY", "{proxy}"),),
    ),
    Client(
        "httpx",
        sys.executable,
        python("import sys, httpx; httpx.get(sys.argv[1], timeout=10).raise_for_status()"),
        (("HTTP_PROXY", "{proxy}"),),
    ),
    Client(
        "aiohttp",
        sys.executable,
        python(
            """
            import asyncio, sys, aiohttp
            async def main():
                async with aiohttp.ClientSession(trust_env=True) as session:
                    async with session.get(sys.argv[1]) as resp:
                        resp.raise_for_status()
            asyncio.run(main())
            """
        ),
        (("HTTP_PROXY", "{proxy}"),),
    ),
    Client(
        "urllib",
        sys.executable,
        python("import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)"),
        (("http_proxy", "{proxy}"),),
    ),
    Client(
        "wget",
        "wget",
        ("wget", "-q", "-O", "/dev/null", "{url}"),
        (("http_proxy", "{proxy}"),),
    ),
    Client(
        "java",
        "java",
        (
            "java",
            "-Dhttp.proxyHost={proxy_host}",
            "-Dhttp.proxyPort={proxy_port}",
            # Java skips the proxy for localhost and 127.* unless told otherwise.
            "-Dhttp.nonProxyHosts=",
            "{java_source}",
            "{url}",
        ),
    ),
]

JAVA_SOURCE = """
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.ProxySelector;

public class Get {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newBuilder().proxy(ProxySelector.getDefault()).build();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0])).build();
        int status = client.send(request, HttpResponse.BodyHandlers.discarding()).statusCode();
        System.exit(status == 200 ? 0 : 1);
    }
}
"""


def require(tool: str) -> str:
    """Path of a client; missing, it fails under CI=true (the machine has it) and skips here."""
    found = shutil.which(tool)
    if found is None:
        unavailable(f"{tool} not installed")
    return found


async def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    """Run a client to completion; it must succeed. Its stdout."""
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await communicate(process, 120)
    assert process.returncode == 0, (argv, out.decode(), err.decode())
    return out.decode()


def proxied_paths(logs: LogCapture) -> list[str]:
    return [line["path"] for line in logs.events("access") if line["status"] == 200]


@pytest.mark.parametrize("client", CLIENTS, ids=[c.name for c in CLIENTS])
async def test_client_goes_through_the_proxy_as_documented(
    client: Client, proxy: RunningProxy, origin: Origin, logs: LogCapture, tmp_path: Path
) -> None:
    """Set up as docs/clients.md says, the client's call shows in the proxy's access log."""
    require(client.tool)
    address = proxy.server.proxy_address
    assert address is not None
    source = tmp_path / "Get.java"
    source.write_text(JAVA_SOURCE)
    values = {
        "url": origin.url(f"/echo/{client.name}"),
        "proxy_host": address.host,
        "proxy_port": str(address.port),
        "java_source": str(source),
    }
    argv = client.command(values)
    await run(argv, client.environment(proxy.url))
    assert proxied_paths(logs) == [f"/echo/{client.name}"]


async def test_java_skips_the_proxy_for_loopback_by_default(
    proxy: RunningProxy, origin: Origin, logs: LogCapture, tmp_path: Path
) -> None:
    """Without -Dhttp.nonProxyHosts, Java calls 127.0.0.1 directly: no access line."""
    require("java")
    source = tmp_path / "Get.java"
    source.write_text(JAVA_SOURCE)
    address = proxy.server.proxy_address
    assert address is not None
    argv = [
        "java",
        f"-Dhttp.proxyHost={address.host}",
        f"-Dhttp.proxyPort={address.port}",
        str(source),
        origin.url("/echo/java-direct"),
    ]
    await run(argv, {"PATH": os.environ["PATH"]})
    assert proxied_paths(logs) == []


async def test_curl_ignores_upper_case_http_proxy(
    proxy: RunningProxy, origin: Origin, logs: LogCapture
) -> None:
    """curl ignores HTTP_PROXY for http:// URLs, which is why the docs set http_proxy too."""
    require("curl")
    env = {"PATH": os.environ["PATH"], "HTTP_PROXY": proxy.url}
    await run(["curl", "-fsS", "-o", "/dev/null", origin.url("/echo/upper")], env)
    assert proxied_paths(logs) == []


@pytest.mark.parametrize(("no_proxy", "status"), [("localhost,127.0.0.1,::1", "200"), ("", "508")])
async def test_no_proxy_keeps_the_admin_port_direct(
    proxy: RunningProxy, no_proxy: str, status: str
) -> None:
    """NO_PROXY as the docs set it keeps a call to the admin port direct; without it, 508."""
    env = {
        "PATH": os.environ["PATH"],
        "HTTP_PROXY": proxy.url,
        "http_proxy": proxy.url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }
    code = """
        import sys, urllib.error, urllib.request
        try:
            print(urllib.request.urlopen(sys.argv[1], timeout=10).status)
        except urllib.error.HTTPError as exc:
            print(exc.code)
        """
    out = await run(
        [sys.executable, "-c", textwrap.dedent(code), proxy.admin_url + "/metrics"], env
    )
    assert out.strip() == status


async def test_git_clones_over_dumb_http_through_the_proxy(
    proxy: RunningProxy, logs: LogCapture, tmp_path: Path
) -> None:
    """git with http_proxy clones a repository from a loopback dumb-HTTP server via the proxy."""
    git = require("git")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    work = tmp_path / "work"
    work.mkdir()
    await run([git, "init", "-q"], env, work)
    await run([git, "commit", "-q", "--allow-empty", "-m", "one"], env, work)
    served = tmp_path / "served"
    served.mkdir()
    await run([git, "clone", "-q", "--bare", str(work), "repo.git"], env, served)
    await run([git, "update-server-info"], env, served / "repo.git")
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "http.server",
        "0",
        "--bind",
        "127.0.0.1",
        cwd=served,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        banner = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
        port = banner.split("port ")[1].split()[0]
        url = f"http://127.0.0.1:{port}/repo.git"
        await run(
            [git, "clone", "-q", url, str(tmp_path / "clone")], env | {"http_proxy": proxy.url}
        )
    finally:
        await stop(server)
    paths = proxied_paths(logs)
    assert "/repo.git/info/refs" in paths
    assert (tmp_path / "clone" / ".git").is_dir()


async def test_apt_get_update_goes_through_the_proxy(
    proxy: RunningProxy, origin: Origin, logs: LogCapture, tmp_path: Path
) -> None:
    """apt-get with Acquire::http::Proxy fetches a loopback repository's index through the proxy."""
    apt = require("apt-get")
    sources = tmp_path / "sources.list"
    sources.write_text(f"deb [trusted=yes] {origin.url('/echo/apt')} ./\n")
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)
    argv = [
        apt,
        "update",
        "-qq",
        f"-oAcquire::http::Proxy={proxy.url}",
        f"-oDir::Etc::SourceList={sources}",
        "-oDir::Etc::SourceParts=/nonexistent",
        f"-oDir::State::Lists={lists}",
        "-oAPT::Sandbox::User=root",
        "-oDebug::NoLocking=1",
    ]
    # The origin answers every path with an echo, not a repository: apt complains, but only
    # after it asked through the proxy, which is what this test is about.
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    await communicate(process, 120)
    paths = proxied_paths(logs)
    assert "/echo/apt/./InRelease" in paths or "/echo/apt/InRelease" in paths, paths


# -- which spelling of the proxy variable each client reads (the README's claim) ---------------

GRPC_SERVER = """
import sys
from concurrent import futures
import grpc
handler = grpc.method_handlers_generic_handler(
    "t.T", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
)
server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
sys.stdin.read()  # until the test closes stdin
"""

GRPC_CLIENT = """
import sys
import grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    echo = channel.unary_unary("/t.T/Echo")
    assert echo(b"hi", timeout=10) == b"hi"
"""

# Each client, asked to read a proxy variable that names a closed port: it fails if it reads
# that spelling, and reaches the origin directly if it does not.
READS_LOWER_ONLY = ("curl", "wget", "grpcio")
READS_BOTH = ("requests", "httpx", "urllib", "aiohttp")


def spelling_command(name: str, url: str, grpc_target: str) -> list[str]:
    if name == "grpcio":
        return [sys.executable, "-c", GRPC_CLIENT, grpc_target]
    (client,) = [c for c in CLIENTS if c.name == name]
    require(client.tool)
    return client.command({"url": url})


@pytest.mark.parametrize(
    ("name", "variable"),
    [(name, v) for name in READS_LOWER_ONLY + READS_BOTH for v in ("http_proxy", "HTTP_PROXY")],
)
async def test_each_client_reads_the_proxy_variable_spelling_the_readme_names(
    origin: Origin, name: str, variable: str
) -> None:
    """curl, wget and grpcio read only the lower-case variable; the Python clients read both."""
    dead = f"http://127.0.0.1:{closed_port()}"
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        GRPC_SERVER,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        grpc_port = int(await asyncio.wait_for(server.stdout.readline(), 30))
        argv = spelling_command(name, origin.url("/echo"), f"127.0.0.1:{grpc_port}")
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
        # grpcio reads https_proxy (and grpc_proxy) before http_proxy: the same spelling each.
        variables = (variable, variable.replace("http", "https", 1)) if name == "grpcio" else ()
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env | {variable: dead} | dict.fromkeys(variables, dead),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await communicate(process, 60)
    finally:
        await stop(server)
    reads = variable == "http_proxy" or name in READS_BOTH
    assert (process.returncode != 0) is reads, (name, variable, process.returncode)


def test_readme_names_the_clients_that_read_only_lower_case() -> None:
    """The README's advice on both spellings names exactly the clients tested above."""
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    claim = readme.split("Set both spellings:", 1)[1].split(".", 1)[0]
    lower, _, both = claim.partition(";")
    assert [n for n in READS_LOWER_ONLY + READS_BOTH if n in lower] == list(READS_LOWER_ONLY)
    assert [n for n in READS_LOWER_ONLY + READS_BOTH if n in both] == list(READS_BOTH)
