"""The Grafana dashboard: valid JSON, the promised panels, the variables on every query.

That every expression parses and evaluates is checked against a real Prometheus in
test_prometheus_e2e.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.deploy_support import (
    DASHBOARD_JSON,
    PER_HOST_METRICS,
    dashboard_queries,
    is_recorded,
    iter_panels,
    load_dashboard,
    rules,
    selectors,
    variable_query,
)

SCRAPE_FILTERS = ('job=~"$job"', 'namespace=~"$namespace"', 'pod=~"$pod"')
OVERVIEW_SERIES = (
    "job_namespace_host:proxy_upstream_ttfb_seconds:p99_rate5m",
    "job_namespace_host:proxy_upstream_request_seconds:p99_rate5m",
    "job_namespace_host:proxy_upstream_errors:rate5m",
    "job_namespace_host:proxy_upstream_requests:rate5m",
    "job_namespace_host:proxy_upstream_connections_new:rate5m",
)


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in load_dashboard()["templating"]["list"]}


def test_dashboard_is_valid_json_with_unique_ids() -> None:
    """The file parses as JSON; panel ids are unique and every panel has a grid position."""
    dashboard = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    assert dashboard["uid"]
    assert dashboard["title"]
    panels = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_host_variable_is_multi_select_with_all() -> None:
    """`$host` is a multi-select query variable with All over the request and tunnel hosts."""
    variable = variables()["host"]
    assert variable["type"] == "query"
    assert variable["multi"] is True
    assert variable["includeAll"] is True
    # Every per-host series has a non-empty host, which All must match.
    for host in ("api.example.com", "127.0.0.1:8081", "[::1]:8443"):
        assert re.fullmatch(variable["allValue"], host), host
    query = variable_query("host")
    match = re.fullmatch(r"label_values\((.+),\s*host\)", query)
    assert match, query
    assert "proxy_upstream_requests_total" in match.group(1)
    for needle in SCRAPE_FILTERS:
        assert needle in match.group(1), query


@pytest.mark.parametrize(
    ("name", "selector"),
    [
        ("job", "proxy_build_info"),
        ("namespace", 'proxy_build_info{job=~"$job"}'),
        ("pod", 'proxy_build_info{job=~"$job",namespace=~"$namespace"}'),
    ],
)
def test_scrape_variables_list_label_values_and_all_matches_no_label(
    name: str, selector: str
) -> None:
    """job, namespace and pod list proxy_build_info's labels; All also matches a missing label.

    A plain local scrape has no namespace or pod label, so All must match "" there.
    """
    variable = variables()[name]
    assert variable["type"] == "query"
    assert variable["multi"] is True
    assert variable["includeAll"] is True
    assert variable_query(name) == f"label_values({selector}, {name})"
    assert re.fullmatch(variable["allValue"], "tracing-proxy-pods")
    if name != "job":  # every series has a job
        assert re.fullmatch(variable["allValue"], "")


def test_every_per_host_query_selects_host() -> None:
    """Each selector of a metric or recorded series with a host label carries `host=~"$host"`."""
    checked = 0
    for title, expr in dashboard_queries():
        for family, selector in selectors(expr):
            if family in PER_HOST_METRICS or is_recorded(family):
                assert 'host=~"$host"' in selector, f"{title}: {expr}"
                checked += 1
    assert checked >= 20


def test_every_query_filters_on_job_namespace_and_pod() -> None:
    """Every selector filters on job and namespace; every raw series on pod as well.

    Recorded series keep job and namespace but not pod (see prometheus/rules.yml).
    """
    checked = 0
    for title, expr in dashboard_queries():
        found = list(selectors(expr))
        assert found, f"{title}: {expr}"
        for family, selector in found:
            wanted = SCRAPE_FILTERS[:2] if is_recorded(family) else SCRAPE_FILTERS
            for needle in wanted:
                assert needle in selector, f"{title}: {family}{selector} lacks {needle}"
            checked += 1
    assert checked >= 30


def test_overview_row_comes_first_and_is_served_by_recording_rules() -> None:
    """The top row ranks hosts by p99 ttfb and total, error ratio and new connections.

    Each recorded series it reads is a rule of prometheus/rules.yml that keeps job,
    namespace and host.
    """
    panels = load_dashboard()["panels"]
    assert panels[0]["type"] == "row"
    assert "overview" in panels[0]["title"].lower()
    end = next(i for i, panel in enumerate(panels[1:], 1) if panel["type"] == "row")
    overview = panels[1:end]
    exprs = {panel["title"]: panel["targets"][0]["expr"] for panel in overview}
    assert exprs["Slowest hosts: p99 time to first byte"].startswith(
        f"topk(10, {OVERVIEW_SERIES[0]}{{"
    )
    assert exprs["Slowest hosts: p99 total"].startswith(f"topk(10, {OVERVIEW_SERIES[1]}{{")
    assert OVERVIEW_SERIES[2] in exprs["Error ratio by host"]
    assert OVERVIEW_SERIES[3] in exprs["Error ratio by host"]
    assert OVERVIEW_SERIES[4] in exprs["New connections by host"]
    for title, expr in exprs.items():
        assert "sum by (host)" in expr or "topk(10, job_namespace_host:" in expr, title
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    used = {family for expr in exprs.values() for family, _ in selectors(expr)}
    assert used == set(OVERVIEW_SERIES)
    for name in OVERVIEW_SERIES:
        assert "by (job, namespace, host" in recorded[name], name


def test_host_row_repeats_for_each_chosen_host() -> None:
    """The per-host row repeats per host, so each stack of phases belongs to one host."""
    (row,) = [
        panel
        for panel in load_dashboard()["panels"]
        if panel["type"] == "row" and "$host" in panel["title"]
    ]
    assert row["repeat"] == "host"


def test_every_panel_has_a_description_and_queries() -> None:
    """Every non-row panel says what question it answers and has at least one query."""
    for panel in iter_panels(load_dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        assert "Answers:" in panel.get("description", ""), panel["title"]
        assert panel["targets"], panel["title"]


def test_promised_panels_are_there() -> None:
    """Phases p50/p99, status codes, errors, reuse/DNS ratios, tunnels, refusals and the gRPC
    row (calls by code, the not-OK ratio, ttfb and total of gRPC hosts) exist."""
    queries = dashboard_queries()
    text = "\n".join(expr for _, expr in queries)
    for metric in (
        "proxy_upstream_queue_seconds_bucket",
        "proxy_upstream_dns_seconds_bucket",
        "proxy_upstream_connect_seconds_bucket",
        "proxy_upstream_tls_seconds_bucket",
        "proxy_upstream_ttfb_seconds_bucket",
        "proxy_upstream_request_seconds_bucket",
        "proxy_tunnel_ttfb_seconds_bucket",
    ):
        for quantile in ("0.5", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (host, le) (rate({metric}{{" in text, (
                metric
            )
    for needle in (
        "sum by (host, code) (rate(proxy_upstream_requests_total{",
        "sum by (host, error) (rate(proxy_upstream_errors_total{",
        'kind="reused"',
        'result="hit"',
        "proxy_tunnels_open",
        "sum by (host, outcome) (rate(proxy_tunnels_total{",
        "proxy_tunnel_bytes_total{",
        "sum by (reason) (rate(proxy_denied_total{",
        "sum by (host) (rate(proxy_upstream_tls_seconds_count{",
        "sum by (host) (rate(proxy_tunnel_sni_mismatches_total{",
        'error=~"tls_.*"',
        "sum by (host, code) (rate(proxy_upstream_grpc_total{",
        'code!="OK"',
    ):
        assert needle in text, needle
    grpc_hosts = "and on (host) sum by (host) (rate(proxy_upstream_grpc_total{"
    for metric in ("proxy_upstream_ttfb_seconds_bucket", "proxy_upstream_request_seconds_bucket"):
        # The gRPC row: these quantiles only for hosts that had gRPC calls.
        grpc_only = [e for _, e in queries if f"rate({metric}{{" in e and grpc_hosts in e]
        assert len(grpc_only) == 2, metric  # p50 and p99
    stacked = [
        panel
        for panel in iter_panels(load_dashboard()["panels"])
        if panel.get("fieldConfig", {})
        .get("defaults", {})
        .get("custom", {})
        .get("stacking", {})
        .get("mode")
        == "normal"
        and "histogram_quantile" in json.dumps(panel["targets"])
    ]
    assert len(stacked) == 2


def test_latency_panels_show_exemplars_linked_to_trace_and_log_line() -> None:
    """Each quantile panel asks for exemplars and links them to the trace and the access line."""
    textboxes = variables()
    for name in ("trace_url", "log_url"):
        assert textboxes[name]["type"] == "textbox"
        assert textboxes[name]["query"].startswith(("http://", "https://"))
    latency = [
        panel
        for panel in iter_panels(load_dashboard()["panels"])
        if "histogram_quantile" in json.dumps(panel.get("targets", []))
    ]
    assert len(latency) >= 4  # p50 and p99 by phase, TLS handshake, tunnel duration
    for panel in latency:
        assert all(target["exemplar"] is True for target in panel["targets"]), panel["title"]
        urls = [link["url"] for link in panel["fieldConfig"]["defaults"]["links"]]
        assert "${trace_url}${__data.fields.trace_id}" in urls, panel["title"]
        assert "${log_url}${__data.fields.request_id}" in urls, panel["title"]


def test_docs_table_names_every_panel_and_variable() -> None:
    """docs/prometheus.md has a row for each panel and each variable of the dashboard."""
    text = (DASHBOARD_JSON.parents[1] / "docs" / "prometheus.md").read_text(encoding="utf-8")
    for panel in iter_panels(load_dashboard()["panels"]):
        if panel["type"] != "row":
            assert f"\n| {panel['title']} |" in text, panel["title"]
    for name in variables():
        assert f"`${name}`" in text, name
