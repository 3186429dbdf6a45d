"""The Dockerfile: hadolint finds nothing, and the image is built the way the docs say.

Docker itself cannot run here, so the build is not executed; the checks are hadolint plus
reading the instructions.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from proxy import config
from proxy.config import Settings
from proxy.rules import policy
from tests.deploy.deploy_support import DOCKERFILE, REPO, find_tool, run


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each Dockerfile line, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (split at FROM)."""
    out: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def test_hadolint_reports_nothing() -> None:
    """hadolint finds no error, warning, info or style issue in the Dockerfile."""
    result = run([find_tool("hadolint"), "--format", "json", str(DOCKERFILE)])
    findings = json.loads(result.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=2)
    assert result.returncode == 0, result.stderr


def test_hadolint_does_flag_a_bad_dockerfile() -> None:
    """hadolint, run the same way, reports an unpinned base image and sudo (so it really lints)."""
    bad = "FROM python:latest\nRUN sudo pip install requests\n"
    result = subprocess.run(
        [find_tool("hadolint"), "--format", "json", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3004"} <= codes, codes
    assert result.returncode != 0


def test_every_ignored_rule_is_justified_inline() -> None:
    """Any `hadolint ignore=` pragma sits under a comment line that explains it."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#"), f"line {number + 1}: no comment above"
            assert len(before) > 20, f"line {number + 1}: the comment explains nothing"


def test_multi_stage_on_the_slim_python_base() -> None:
    """Two stages on python:3.11-slim-bookworm, the runtime copying only the built venv."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    build, runtime = stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert runtime[0] == ("FROM", "${PYTHON_IMAGE} AS runtime")
    copies = [args for word, args in runtime if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]
    # The project is installed with pip from its source tree, in the build stage only.
    build_runs = " ".join(args for word, args in build if word == "RUN")
    assert re.search(r"\bpip\b.*\binstall\b.*\s\.(\s|$)", build_runs)
    runtime_runs = " ".join(args for word, args in runtime if word == "RUN")
    for tool in ("pip install", "apt-get", "gcc", "build-essential"):
        assert tool not in runtime_runs


def test_runtime_runs_as_non_root_with_the_documented_ports_and_entrypoint() -> None:
    """The final stage: numeric non-root USER, EXPOSE 3128 9901, ENTRYPOINT tracing-proxy."""
    runtime = stages()[-1]
    users = [args for word, args in runtime if word == "USER"]
    assert users, "no USER in the runtime stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    exposed = {port for word, args in runtime if word == "EXPOSE" for port in args.split()}
    assert exposed == {"3128", "9901"}
    assert runtime[-1] == ("ENTRYPOINT", '["tracing-proxy"]')


def test_container_listens_on_all_interfaces_on_the_default_ports() -> None:
    """ENV sets PROXY_LISTEN/PROXY_ADMIN_LISTEN to 0.0.0.0 with the proxy's default ports."""
    env = " ".join(args for word, args in stages()[-1] if word == "ENV")
    defaults = Settings()
    assert defaults.admin_listen is not None
    assert f"PROXY_LISTEN=0.0.0.0:{defaults.listen.port}" in env
    assert f"PROXY_ADMIN_LISTEN=0.0.0.0:{defaults.admin_listen.port}" in env


def test_dockerignore_lets_in_only_what_pip_install_needs() -> None:
    """.dockerignore excludes everything but pyproject.toml, README.md and proxy/."""
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "proxy"}
    copied = " ".join(args for word, args in stages()[0] if word == "COPY")
    for name in allowed:
        assert name in copied


def image_settings() -> Settings:
    """The settings the image's ENV lines give the entrypoint, read by the real config."""
    env: dict[str, str] = {}
    for word, args in stages()[-1]:
        if word == "ENV":
            env.update(pair.partition("=")[::2] for pair in args.split() if "=" in pair)
    return config.load([], env)


@pytest.mark.parametrize(
    ("client", "permitted"),
    [
        ("127.0.0.1", True),
        ("172.17.0.1", True),  # docker's default bridge gateway: what `docker run -p` shows
        ("192.168.65.1", True),  # Docker Desktop's host address
        ("10.1.2.3", True),
        ("fd00::1", True),
        ("203.0.113.9", False),  # public (documentation range): still refused
        ("2001:db8::1", False),
    ],
)
def test_image_admits_docker_run_clients_and_refuses_public_ones(
    client: str, permitted: bool
) -> None:
    """The image's client allow-list lets a docker run -p client in and keeps public ones out."""
    allowed = policy.Rules.parse(image_settings().allow_clients)
    assert policy.client_permitted(client, allowed) is permitted
