"""prometheus.yml and prometheus/rules.yml: promtool accepts them and the alerts pass their tests.

Debian's Prometheus (the one installed here and in CI) is built without Kubernetes service
discovery, so its promtool rejects `kubernetes_sd_configs`. The config is therefore checked
twice: as is, where the promtool in use supports it (set PROMTOOL to an upstream build),
and with the `kubernetes_sd_configs` block swapped for an equivalent `file_sd_configs`
block, which checks everything else, relabeling included. The Kubernetes block itself is
checked structurally here and exercised by the end-to-end test with synthesized pod
targets.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from proxy.config import Settings
from proxy.observe import metrics
from tests.deploy.deploy_support import (
    PROMETHEUS_YML,
    RULES_TEST_YML,
    RULES_YML,
    find_tool,
    load_yaml,
    rules,
    run,
)

PHASES = (
    "proxy_upstream_queue_seconds",
    "proxy_upstream_dns_seconds",
    "proxy_upstream_connect_seconds",
    "proxy_upstream_tls_seconds",
    "proxy_upstream_ttfb_seconds",
    "proxy_upstream_request_seconds",
)
# Fields of Prometheus' kubernetes_sd_config.
KUBERNETES_SD_FIELDS = frozenset(
    {
        "api_server",
        "role",
        "kubeconfig_file",
        "namespaces",
        "selectors",
        "attach_metadata",
        "basic_auth",
        "authorization",
        "oauth2",
        "proxy_url",
        "no_proxy",
        "proxy_from_environment",
        "proxy_connect_header",
        "follow_redirects",
        "enable_http2",
        "tls_config",
    }
)


def copy_config_tree(destination: Path, config: dict[str, Any]) -> Path:
    """prometheus.yml (possibly changed) with its rule files beside it, as in the repo."""
    (destination / "prometheus").mkdir(parents=True, exist_ok=True)
    for rule_file in config.get("rule_files", []):
        shutil.copy(PROMETHEUS_YML.parent / rule_file, destination / rule_file)
    path = destination / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def without_kubernetes_sd(config: dict[str, Any], targets_file: Path) -> dict[str, Any]:
    """The config with each kubernetes_sd_configs block replaced by a file_sd_configs one."""
    changed = yaml.safe_load(yaml.safe_dump(config))
    for job in changed["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["file_sd_configs"] = [{"files": [str(targets_file)]}]
    assert changed != config
    result: dict[str, Any] = changed
    return result


def test_promtool_checks_the_config_as_is() -> None:
    """promtool accepts prometheus.yml unchanged, or rejects nothing but its Kubernetes SD block.

    Debian's promtool is built without Kubernetes service discovery; with it, the only error
    allowed is that one, so any other mistake in the file still fails here.
    """
    result = run([find_tool("promtool"), "check", "config", str(PROMETHEUS_YML)])
    output = result.stdout + result.stderr
    if result.returncode != 0:
        # promtool lists each unmarshal error as "line N: <what>".
        errors = re.findall(r"line \d+: (.*)", output)
        assert errors, output
        assert all("field kubernetes_sd_configs not found" in error for error in errors), output


PROMETHEUS_DOC = PROMETHEUS_YML.parent / "docs" / "prometheus.md"


def doc_commands(program: str) -> list[str]:
    """Every command line of docs/prometheus.md's sh blocks that runs ``program``."""
    blocks = re.findall(r"```sh\n(.*?)```", PROMETHEUS_DOC.read_text(), re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith(program)]


def test_docs_start_prometheus_with_the_exemplar_storage_the_page_requires() -> None:
    """Each `prometheus` command in docs/prometheus.md keeps exemplars, as the page says to."""
    commands = doc_commands("prometheus ")
    assert commands
    for command in commands:
        assert "--enable-feature=exemplar-storage" in command, command


def test_docs_say_what_this_promtool_says_of_the_kubernetes_job() -> None:
    """Where promtool rejects the Kubernetes SD job (Debian's), the page says so, with the fix."""
    result = run([find_tool("promtool"), "check", "config", str(PROMETHEUS_YML)])
    rejected = "field kubernetes_sd_configs not found" in result.stdout + result.stderr
    text = " ".join(PROMETHEUS_DOC.read_text().split())
    if rejected:
        assert "`promtool check config prometheus.yml` rejects it too" in text
        assert "`field kubernetes_sd_configs not found`" in text
    assert "promtool check config prometheus.yml" in doc_commands("promtool ")


def test_promtool_checks_the_config_with_file_sd_in_place_of_kubernetes_sd(tmp_path: Path) -> None:
    """promtool check config accepts prometheus.yml with kubernetes SD swapped for file SD."""
    promtool = find_tool("promtool")
    targets = tmp_path / "pods.json"
    targets.write_text("[]")
    config = without_kubernetes_sd(load_yaml(PROMETHEUS_YML), targets)
    path = copy_config_tree(tmp_path / "conf", config)
    result = run([promtool, "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_relabel_rule(tmp_path: Path) -> None:
    """The same check fails when a relabel regex does not compile (so the check can fail)."""
    promtool = find_tool("promtool")
    targets = tmp_path / "pods.json"
    targets.write_text("[]")
    config = without_kubernetes_sd(load_yaml(PROMETHEUS_YML), targets)
    config["scrape_configs"][0]["relabel_configs"][0]["regex"] = "(unclosed"
    path = copy_config_tree(tmp_path / "conf", config)
    assert run([promtool, "check", "config", str(path)]).returncode != 0


def test_pod_job_discovers_pods_and_keeps_annotated_metrics_ports() -> None:
    """The Kubernetes job uses role pod, keeps prometheus.io/scrape=true and port `metrics`."""
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    kubernetes_jobs = [job for job in jobs.values() if "kubernetes_sd_configs" in job]
    assert len(kubernetes_jobs) == 1
    job = kubernetes_jobs[0]
    for sd in job["kubernetes_sd_configs"]:
        assert set(sd) <= KUBERNETES_SD_FIELDS
        assert sd["role"] == "pod"
    keeps = {
        tuple(rule["source_labels"]): str(rule["regex"])
        for rule in job["relabel_configs"]
        if rule.get("action") == "keep"
    }
    assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    assert keeps[("__meta_kubernetes_pod_container_port_name",)] == "metrics"
    # A native sidecar is an init container: dropping init containers would lose it.
    for rule in job["relabel_configs"]:
        assert "__meta_kubernetes_pod_container_init" not in rule.get("source_labels", [])


def test_static_job_scrapes_the_default_admin_listener() -> None:
    """The static job scrapes the admin address `make run` listens on by default."""
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    static = [job for job in jobs.values() if "static_configs" in job]
    assert len(static) == 1
    targets = [t for config in static[0]["static_configs"] for t in config["targets"]]
    assert targets == [str(Settings().admin_listen)]


def test_config_loads_the_rules_file() -> None:
    """prometheus.yml's rule_files is prometheus/rules.yml."""
    rule_files = load_yaml(PROMETHEUS_YML)["rule_files"]
    assert [(PROMETHEUS_YML.parent / f).resolve() for f in rule_files] == [RULES_YML.resolve()]


def test_promtool_checks_the_rules() -> None:
    """promtool check rules accepts prometheus/rules.yml."""
    result = run([find_tool("promtool"), "check", "rules", str(RULES_YML)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    """promtool test rules passes the alert and recording-rule tests."""
    result = run(
        [find_tool("promtool"), "test", "rules", str(RULES_TEST_YML)], cwd=RULES_TEST_YML.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    """Each alert of rules.yml is tested both firing and not firing in rules_test.yml."""
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in load_yaml(RULES_TEST_YML)["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts == {
        "TracingProxyHighErrorRatio",
        "TracingProxyHighTTFB",
        "TracingProxyHostLabelOverflow",
        "TracingProxyDown",
    }
    assert fired == alerts
    assert quiet == alerts


def test_recording_rules_cover_every_phase_and_ratio() -> None:
    """p50 and p99 per host for each phase, plus error, DNS cache and reuse ratios."""
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    for metric in PHASES:
        for quantile, name in (("0.5", "p50"), ("0.99", "p99")):
            expr = recorded[f"host:{metric}:{name}_rate5m"]
            assert expr.startswith(f"histogram_quantile({quantile}, sum by (host, le)")
            assert f"rate({metric}_bucket[5m])" in expr
    for name in (
        "host:proxy_upstream_errors:ratio_rate5m",
        "host:proxy_upstream_dns_cache_hits:ratio_rate5m",
        "host:proxy_upstream_connections_reused:ratio_rate5m",
    ):
        assert name in recorded


def test_exemplar_storage_holds_every_bucket_at_the_host_cap() -> None:
    """max_exemplars covers one exemplar per bucket of every per-host histogram at the cap."""
    settings = Settings()
    buckets = len(settings.histogram_buckets) + 1
    per_host = len(metrics.PHASES) * buckets + len(metrics.TUNNEL_BUCKETS) + 1
    config = load_yaml(PROMETHEUS_YML)
    assert config["storage"]["exemplars"]["max_exemplars"] >= settings.max_hosts * per_host
