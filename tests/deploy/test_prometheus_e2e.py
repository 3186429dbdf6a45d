"""End to end: a real Prometheus scrapes the proxy while traffic flows, and our queries work.

One scenario is shared by the tests of this module (starting Prometheus and waiting for
scrapes is the slow part): an aiohttp origin on loopback that holds its response headers
for 200 ms, the proxy in a background event loop, and Debian's ``prometheus`` server on a
free loopback port, configured from the repository's prometheus.yml with a 1 s scrape and
rule interval and the repository's rules file.

Debian's Prometheus has no Kubernetes service discovery, so the pod job's
``kubernetes_sd_configs`` is replaced by a file of targets carrying the same
``__meta_kubernetes_*`` labels that pod discovery would give the pod of
k8s/deployment.yaml (plus decoys). The job's own relabel rules then decide what is
scraped; only the sidecar's ``metrics`` port points at the real proxy. The static
``make run`` job is left out: it would scrape the same proxy a second time.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.config import Address, Settings
from proxy.server import ProxyServer
from tests.deploy.deploy_support import (
    K8S_DIR,
    PROMETHEUS_YML,
    dashboard_expr_for,
    dashboard_queries,
    find_tool,
    is_recorded,
    load_dashboard,
    load_yaml,
    rules,
    selectors,
    variable_query,
)

T = TypeVar("T")

HOLD_S = 0.2  # the origin holds its response headers this long
ROUNDS = 12
DEADLINE_S = 30.0
POD_JOB = "tracing-proxy-pods"
PHASES = {
    "queue": "proxy_upstream_queue_seconds",
    "dns": "proxy_upstream_dns_seconds",
    "connect": "proxy_upstream_connect_seconds",
    "ttfb": "proxy_upstream_ttfb_seconds",
    "total": "proxy_upstream_request_seconds",
}
# Metrics that this version of the proxy may not export yet, or that the scenario gives no
# samples (it sends no request the proxy refuses, its traffic is plain http, so no TLS
# failures, and it makes no gRPC call): their queries must evaluate, but may come back empty.
MAYBE_ABSENT = (
    "proxy_tunnel",
    "proxy_host_label_overflow",
    "proxy_denied",
    'error=~"tls_',
    "proxy_upstream_grpc_total",
)


class LoopThread:
    """An asyncio loop in a daemon thread, so the proxy keeps serving between tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Prometheus' API on loopback: never through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def get(self, path: str, params: list[tuple[str, str]] | None = None) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with _OPENER.open(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:  # 4xx for a bad query: the body says why
            return json.load(error)

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = [("query", expr)]
        if at is not None:
            params.append(("time", f"{at:.3f}"))
        answer: dict[str, Any] = self.get("/api/v1/query", params)
        return answer

    def values(self, expr: str, at: float | None = None) -> dict[str, float]:
        """{host label (or "") -> value} of an instant vector; fails on a query error."""
        answer = self.query(expr, at)
        assert answer["status"] == "success", f"{expr}: {answer}"
        assert answer["data"]["resultType"] == "vector", expr
        return {
            sample["metric"].get("host", ""): float(sample["value"][1])
            for sample in answer["data"]["result"]
        }

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def wait_for(what: str, check: Callable[[], bool], prometheus: Prometheus | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if prometheus is not None and prometheus.process.poll() is not None:
            pytest.fail(f"prometheus exited while waiting for {what}:\n{prometheus.log_tail()}")
        if check():
            return
        time.sleep(0.25)
    tail = prometheus.log_tail() if prometheus is not None else ""
    pytest.fail(f"gave up after {DEADLINE_S:.0f} s waiting for {what}\n{tail}")


def _sanitize(name: str) -> str:
    """Prometheus' label-name form of a Kubernetes annotation or label key."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(sidecar_metrics: str, dead: str) -> list[dict[str, Any]]:
    """File-SD target groups shaped like Kubernetes pod discovery of k8s/deployment.yaml.

    One target per container port (one without port labels for a container that has no
    ports), init containers included, as Prometheus' pod role produces them. Only the
    sidecar's `metrics` port points at the live proxy; everything else at a dead port.
    Two decoy pods: one not annotated, one finished.
    """
    template = load_yaml(K8S_DIR / "deployment.yaml")["spec"]["template"]
    namespace = load_yaml(K8S_DIR / "kustomization.yaml")["namespace"]

    def pod(name: str, annotations: dict[str, str], phase: str) -> list[dict[str, Any]]:
        common = {
            "__meta_kubernetes_namespace": namespace,
            "__meta_kubernetes_pod_name": name,
            "__meta_kubernetes_pod_phase": phase,
            "__meta_kubernetes_pod_ready": "true",
            "__meta_kubernetes_pod_ip": "127.0.0.1",
        }
        for key, value in template["metadata"]["labels"].items():
            common[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
            common[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
        for key, value in annotations.items():
            common[f"__meta_kubernetes_pod_annotation_{_sanitize(key)}"] = value
            common[f"__meta_kubernetes_pod_annotationpresent_{_sanitize(key)}"] = "true"
        groups = []
        spec = template["spec"]
        for init, containers in (
            (True, spec.get("initContainers", [])),
            (False, spec["containers"]),
        ):
            for container in containers:
                labels = {
                    **common,
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_container_image": container["image"],
                    "__meta_kubernetes_pod_container_init": "true" if init else "false",
                }
                for port in container.get("ports") or [None]:
                    target_labels = dict(labels)
                    address = dead
                    if port is not None:
                        target_labels["__meta_kubernetes_pod_container_port_name"] = port["name"]
                        target_labels["__meta_kubernetes_pod_container_port_number"] = str(
                            port["containerPort"]
                        )
                        target_labels["__meta_kubernetes_pod_container_port_protocol"] = port.get(
                            "protocol", "TCP"
                        )
                        is_live = (
                            container["name"] == "tracing-proxy"
                            and port["name"] == "metrics"
                            and name == "example-app-live"
                        )
                        address = sidecar_metrics if is_live else dead
                    groups.append({"targets": [address], "labels": target_labels})
        return groups

    annotations = dict(template["metadata"].get("annotations", {}))
    return [
        *pod("example-app-live", annotations, "Running"),
        *pod("unannotated", {}, "Running"),
        *pod("finished", annotations, "Succeeded"),
    ]


def prometheus_config(tmp: Path, admin: Address) -> Path:
    """prometheus.yml for this test: 1 s intervals, absolute rule paths, file SD for pods."""
    config = load_yaml(PROMETHEUS_YML)
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = [
        str((PROMETHEUS_YML.parent / f).resolve()) for f in config["rule_files"]
    ]
    targets = tmp / "pods.json"
    targets.write_text(json.dumps(pod_targets(str(admin), f"127.0.0.1:{free_port()}")))
    jobs = []
    for job in config["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            del job["kubernetes_sd_configs"]
            job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
            jobs.append(job)
    assert [job["job_name"] for job in jobs] == [POD_JOB]
    config["scrape_configs"] = jobs
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def _hold_then_answer(request: web.Request) -> web.Response:
    await asyncio.sleep(HOLD_S)
    response = web.Response(text="ok")
    if request.path == "/close":
        response.force_close()  # every call to /close needs a new upstream connection
    return response


@dataclass
class Scenario:
    prometheus: Prometheus
    ip_host: str  # 127.0.0.1:port: kept-alive connections, no DNS
    name_host: str  # localhost:port: a new connection (and often a DNS lookup) per call
    refused_host: str  # 127.0.0.1:closed port: connection refused
    eval_at: float  # a time at which every request of the traffic phase has been scraped
    sent: Counter[str] = field(default_factory=Counter)
    # (trace id, request id) of each request sent, by host, in order
    ids: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def hosts(self) -> tuple[str, str, str]:
        return (self.ip_host, self.name_host, self.refused_host)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    prometheus_bin = find_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    loop = LoopThread()
    process: subprocess.Popen[bytes] | None = None
    state: dict[str, Any] = {}
    # The refused host's port stays bound, never listening, for the whole scenario: a port
    # only looked up and released was once taken by another job's server on this shared
    # machine before the scenario's requests to it, which then got 200.
    refused = socket.socket()

    async def start() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", _hold_then_answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        state["origin"] = runner
        settings = Settings(
            listen=Address("127.0.0.1", 0),
            admin_listen=Address("127.0.0.1", 0),
            dns_cache_ttl=1,
        )
        server = ProxyServer(settings, CollectorRegistry())
        await server.start()
        state["server"] = server
        state["session"] = aiohttp.ClientSession()

    async def stop() -> None:
        if "session" in state:
            await state["session"].close()
        if "server" in state:
            await state["server"].close()
        if "origin" in state:
            await state["origin"].cleanup()

    async def call(url: str, traceparent: str) -> tuple[int, str]:
        session: aiohttp.ClientSession = state["session"]
        proxy = f"http://{state['server'].proxy_address}"
        headers = {"traceparent": traceparent}
        async with session.get(url, proxy=proxy, headers=headers) as response:
            await response.read()
            return response.status, response.headers["X-Request-ID"]

    try:
        loop.run(start())
        origin_port = state["origin"].addresses[0][1]
        server: ProxyServer = state["server"]
        assert server.admin_address is not None
        port = free_port()
        log = tmp / "prometheus.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    prometheus_bin,
                    f"--config.file={prometheus_config(tmp, server.admin_address)}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                    # As prometheus.yml asks: exemplars are kept only with this flag.
                    "--enable-feature=exemplar-storage",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        prom = Prometheus(process, f"http://127.0.0.1:{port}", log)

        def ready() -> bool:
            try:
                with _OPENER.open(f"{prom.base}/-/ready", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for("prometheus to be ready", ready, prom)

        refused.bind(("127.0.0.1", 0))
        refused_port = refused.getsockname()[1]
        scenario = Scenario(
            prometheus=prom,
            ip_host=f"127.0.0.1:{origin_port}",
            name_host=f"localhost:{origin_port}",
            refused_host=f"127.0.0.1:{refused_port}",
            eval_at=0.0,
        )
        urls = {
            scenario.ip_host: f"http://127.0.0.1:{origin_port}/x",
            scenario.name_host: f"http://localhost:{origin_port}/close",
            scenario.refused_host: f"http://127.0.0.1:{refused_port}/x",
        }

        def send(host: str) -> None:
            trace_id = os.urandom(16).hex()
            status, request_id = loop.run(call(urls[host], f"00-{trace_id}-{'1' * 16}-01"))
            assert (status == 200) == (host != scenario.refused_host), (host, status)
            scenario.sent[host] += 1
            scenario.ids.setdefault(host, []).append((trace_id, request_id))

        # Warm-up: each host's series appear in a scrape before the measured traffic, so
        # that rate() sees all of the measured requests as increases.
        for host in scenario.hosts:
            send(host)

        def scraped(counts: Counter[str]) -> Callable[[], bool]:
            def check() -> bool:
                seen = prom.values("sum by (host) (proxy_upstream_requests_total)")
                return all(seen.get(host) == count for host, count in counts.items())

            return check

        wait_for("the warm-up scrape", scraped(Counter(scenario.sent)), prom)
        for round_number in range(ROUNDS):
            send(scenario.ip_host)
            send(scenario.name_host)
            if round_number % 3 == 0:
                send(scenario.refused_host)
        wait_for("a scrape with all the traffic", scraped(Counter(scenario.sent)), prom)
        scenario.eval_at = time.time()
        yield scenario
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        try:
            loop.run(stop())
        finally:
            loop.close()
            refused.close()


def test_pod_job_scrapes_only_the_sidecar_metrics_port(scenario: Scenario) -> None:
    """Of the pod-discovery targets, relabeling keeps exactly the sidecar's `metrics` port."""
    answer = scenario.prometheus.get("/api/v1/targets")
    assert answer["status"] == "success"
    active = [t for t in answer["data"]["activeTargets"] if t["scrapePool"] == POD_JOB]
    dropped = [
        t for t in answer["data"]["droppedTargets"] if t["discoveredLabels"].get("job") == POD_JOB
    ]
    assert len(active) == 1, active
    (target,) = active
    assert target["health"] == "up", target
    assert target["labels"]["container"] == "tracing-proxy"
    assert target["labels"]["pod"] == "example-app-live"
    assert target["labels"]["namespace"] == load_yaml(K8S_DIR / "kustomization.yaml")["namespace"]
    # live pod: app container (no ports) + unannotated pod (2) + finished pod (2)
    assert len(dropped) == 5, [t["discoveredLabels"] for t in dropped]


def test_median_time_to_first_byte_is_the_origin_hold(scenario: Scenario) -> None:
    """p50 ttfb by host, from Prometheus, is near the 200 ms the origin holds its headers."""
    expr = (
        "histogram_quantile(0.5, sum by (host, le) (rate(proxy_upstream_ttfb_seconds_bucket[1m])))"
    )
    values = scenario.prometheus.values(expr, scenario.eval_at)
    for host in (scenario.ip_host, scenario.name_host):
        assert 0.1 <= values[host] <= 0.3, (host, values)


@pytest.mark.parametrize("phase", PHASES)
def test_each_phase_has_a_quantile(scenario: Scenario, phase: str) -> None:
    """p50 and p99 of the phase for the host reached by name are finite numbers."""
    for quantile in ("0.5", "0.99"):
        expr = (
            f"histogram_quantile({quantile}, sum by (host, le) (rate({PHASES[phase]}_bucket[1m])))"
        )
        value = scenario.prometheus.values(expr, scenario.eval_at).get(scenario.name_host)
        assert value is not None, (expr, value)
        assert math.isfinite(value), (expr, value)
        assert value >= 0
    if phase in ("ttfb", "total"):
        p50 = scenario.prometheus.values(
            f"histogram_quantile(0.5, sum by (host, le) (rate({PHASES[phase]}_bucket[1m])))",
            scenario.eval_at,
        )[scenario.name_host]
        assert p50 >= 0.1  # includes the 200 ms hold


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.get("record") or r.get("alert"))
def test_rule_expression_evaluates(scenario: Scenario, rule: dict[str, Any]) -> None:
    """The rule's expression is accepted by Prometheus' query API."""
    answer = scenario.prometheus.query(rule["expr"], scenario.eval_at)
    assert answer["status"] == "success", answer


def test_rules_load_and_evaluate_without_errors(scenario: Scenario) -> None:
    """Prometheus loaded every rule of rules.yml and each one evaluated with health ok."""
    expected = {rule.get("record") or rule.get("alert") for rule in rules()}

    def all_evaluated() -> bool:
        answer = scenario.prometheus.get("/api/v1/rules")
        loaded = [r for group in answer["data"]["groups"] for r in group["rules"]]
        return {r["name"] for r in loaded} == expected and all(r["health"] == "ok" for r in loaded)

    wait_for("every rule to evaluate", all_evaluated, scenario.prometheus)
    answer = scenario.prometheus.get("/api/v1/rules")
    for group in answer["data"]["groups"]:
        for rule in group["rules"]:
            assert not rule.get("lastError"), rule
    # The proxy is up, so it is not reported down.
    alerts = scenario.prometheus.get("/api/v1/alerts")["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] == "TracingProxyDown"]


def test_recorded_series_hold_the_expected_numbers(scenario: Scenario) -> None:
    """Recorded ttfb p50, error, connection-reuse and DNS-cache ratios match the traffic."""
    prometheus = scenario.prometheus
    recorded: dict[str, dict[str, float]] = {}

    def have(name: str, hosts: tuple[str, ...]) -> Callable[[], bool]:
        def check() -> bool:
            recorded[name] = prometheus.values(name)
            return all(host in recorded[name] for host in hosts)

        return check

    ttfb = "host:proxy_upstream_ttfb_seconds:p50_rate5m"
    errors = "host:proxy_upstream_errors:ratio_rate5m"
    reuse = "host:proxy_upstream_connections_reused:ratio_rate5m"
    dns = "host:proxy_upstream_dns_cache_hits:ratio_rate5m"
    wait_for(ttfb, have(ttfb, (scenario.ip_host, scenario.name_host)), prometheus)
    wait_for(errors, have(errors, scenario.hosts), prometheus)
    wait_for(reuse, have(reuse, (scenario.ip_host, scenario.name_host)), prometheus)
    wait_for(dns, have(dns, (scenario.name_host,)), prometheus)
    assert 0.1 <= recorded[ttfb][scenario.ip_host] <= 0.3
    assert recorded[errors][scenario.refused_host] == 1.0
    assert recorded[errors][scenario.ip_host] == 0.0
    assert recorded[errors][scenario.name_host] == 0.0
    # 127.0.0.1/x keeps one connection alive; localhost/close gets a new one every time.
    assert recorded[reuse][scenario.ip_host] >= 0.9
    assert recorded[reuse][scenario.name_host] <= 0.1
    assert 0.0 <= recorded[dns][scenario.name_host] <= 1.0


def has_data(prometheus: Prometheus, query: str, at: float | None) -> bool:
    """Whether ``query`` evaluates to a non-empty result at ``at``; fails on a query error."""
    answer = prometheus.query(query, at)
    assert answer["status"] == "success", f"{query}: {answer}"
    return bool(answer["data"]["result"])


def scrape_filters() -> dict[str, str]:
    """The job, namespace and pod variables as a user picks the one live pod's values."""
    namespace = load_yaml(K8S_DIR / "kustomization.yaml")["namespace"]
    return {"job": POD_JOB, "namespace": namespace, "pod": "example-app-live"}


@pytest.mark.parametrize("picked", ["all", "one pod"])
def test_dashboard_queries_evaluate(scenario: Scenario, picked: str) -> None:
    """Every dashboard query, its variables filled in, evaluates successfully.

    With job, namespace and pod at All or at the live pod's values, and `$host` at each
    host or at All. Queries on metrics this proxy already exports must also return data.
    """
    filters = scrape_filters() if picked == "one pod" else {}
    (host_variable,) = [v for v in load_dashboard()["templating"]["list"] if v["name"] == "host"]
    for title, expr in dashboard_queries():
        found = False
        for host in (*scenario.hosts, host_variable["allValue"]):
            query = dashboard_expr_for(expr, host, **filters)
            assert "$" not in query, f"{title}: unsubstituted variable in {query}"
            found = has_data(scenario.prometheus, query, scenario.eval_at) or found
        if not found and any(is_recorded(family) for family, _ in selectors(expr)):
            # The rules may not have run since the last scrape of the traffic: ask again
            # at the current time, which has the evaluations made since (host: All).
            wait_for(
                f"{title}: recorded data",
                functools.partial(has_data, scenario.prometheus, query, None),
                scenario.prometheus,
            )
            found = True
        if not any(name in expr for name in MAYBE_ABSENT):
            assert found, f"{title}: no data for any host: {expr}"


def test_host_variable_offers_the_hosts(scenario: Scenario) -> None:
    """The `$host` variable's label_values() query lists every host that was called."""
    match = re.fullmatch(r"label_values\((.+),\s*host\)", variable_query("host"))
    assert match
    for filters in ({}, scrape_filters()):
        answer = scenario.prometheus.get(
            "/api/v1/label/host/values",
            [("match[]", dashboard_expr_for(match.group(1).strip(), "", **filters))],
        )
        assert answer["status"] == "success", answer
        assert set(scenario.hosts) <= set(answer["data"])


@pytest.mark.parametrize("name", ["job", "namespace", "pod"])
def test_scrape_variables_offer_the_live_pod(scenario: Scenario, name: str) -> None:
    """The job, namespace and pod variables list the scraped sidecar's labels."""
    match = re.fullmatch(rf"label_values\((.+),\s*{name}\)", variable_query(name))
    assert match
    selector = dashboard_expr_for(match.group(1).strip(), "", **scrape_filters())
    answer = scenario.prometheus.get(f"/api/v1/label/{name}/values", [("match[]", selector)])
    assert answer["status"] == "success", answer
    assert answer["data"] == [scrape_filters()[name]]


def exemplars_by_host(scenario: Scenario, series: str) -> dict[str, list[dict[str, Any]]]:
    """{host -> exemplars} from Prometheus' exemplar API for ``series``."""
    answer = scenario.prometheus.get(
        "/api/v1/query_exemplars",
        [("query", series), ("start", f"{time.time() - 600:.3f}"), ("end", f"{time.time():.3f}")],
    )
    assert answer["status"] == "success", answer
    found: dict[str, list[dict[str, Any]]] = {}
    for entry in answer["data"]:
        host = entry["seriesLabels"]["host"]
        assert entry["seriesLabels"]["__name__"] == series
        assert "le" in entry["seriesLabels"]
        found.setdefault(host, []).extend(entry["exemplars"])
    return found


@pytest.mark.parametrize(
    ("series", "refused_too"),
    [
        ("proxy_upstream_ttfb_seconds_bucket", False),
        ("proxy_upstream_request_seconds_bucket", True),
    ],
)
def test_exemplars_carry_the_trace_ids_sent_to_each_host(
    scenario: Scenario, series: str, refused_too: bool
) -> None:
    """Prometheus stored exemplars for each host holding the trace and request ids sent there.

    A refused connection has no time to first byte, but its request time has an exemplar.
    """
    found = exemplars_by_host(scenario, series)
    hosts = scenario.hosts if refused_too else (scenario.ip_host, scenario.name_host)
    assert set(found) == set(hosts)
    for host in hosts:
        sent = dict(scenario.ids[host])
        stored = {e["labels"]["trace_id"]: e["labels"]["request_id"] for e in found.get(host, [])}
        assert stored, (host, found.keys())
        assert set(stored) <= set(sent), host  # only this host's own requests
        assert all(sent[trace] == request for trace, request in stored.items())
        # The last request of each host was the latest in its bucket when it was scraped.
        last_trace, _ = scenario.ids[host][-1]
        assert last_trace in stored, host


def test_exemplar_values_fall_in_their_bucket(scenario: Scenario) -> None:
    """Each stored ttfb exemplar's value is at most its bucket's upper bound."""
    answer = scenario.prometheus.get(
        "/api/v1/query_exemplars",
        [
            ("query", "proxy_upstream_ttfb_seconds_bucket"),
            ("start", f"{time.time() - 600:.3f}"),
            ("end", f"{time.time():.3f}"),
        ],
    )
    checked = 0
    for entry in answer["data"]:
        bound = float(entry["seriesLabels"]["le"])
        for exemplar in entry["exemplars"]:
            assert float(exemplar["value"]) <= bound
            checked += 1
    assert checked > 0
