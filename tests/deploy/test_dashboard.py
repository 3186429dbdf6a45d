"""The Grafana dashboard: valid JSON, the promised panels, `$host` on every per-host query.

That every expression parses and evaluates is checked against a real Prometheus in
test_prometheus_e2e.py.
"""

from __future__ import annotations

import json
import re

from tests.deploy.deploy_support import (
    DASHBOARD_JSON,
    PER_HOST_METRICS,
    dashboard_queries,
    host_variable_query,
    iter_panels,
    load_dashboard,
    selectors,
)


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


def test_host_variable_lists_upstream_hosts() -> None:
    """`$host` is a single-value query variable over the `host` label of the request counters."""
    (variable,) = [v for v in load_dashboard()["templating"]["list"] if v["name"] == "host"]
    assert variable["type"] == "query"
    assert variable["multi"] is False
    assert variable["includeAll"] is False
    query = host_variable_query()
    match = re.fullmatch(r"label_values\((.+),\s*host\)", query)
    assert match, query
    assert "proxy_upstream_requests_total" in match.group(1)


def test_every_per_host_query_selects_host() -> None:
    """Each selector of a metric with a host label carries exactly `host="$host"`."""
    checked = 0
    for title, expr in dashboard_queries():
        for family, selector in selectors(expr):
            if family in PER_HOST_METRICS:
                assert 'host="$host"' in selector, f"{title}: {expr}"
                checked += 1
    assert checked >= 15


def test_every_panel_has_a_description_and_queries() -> None:
    """Every non-row panel says what question it answers and has at least one query."""
    for panel in iter_panels(load_dashboard()["panels"]):
        if panel["type"] == "row":
            continue
        assert "Answers:" in panel.get("description", ""), panel["title"]
        assert panel["targets"], panel["title"]


def test_promised_panels_are_there() -> None:
    """Phases p50/p99, status codes, errors, reuse/DNS ratios, tunnels and refusals exist."""
    queries = dashboard_queries()
    text = "\n".join(expr for _, expr in queries)
    for metric in (
        "proxy_upstream_queue_seconds_bucket",
        "proxy_upstream_dns_seconds_bucket",
        "proxy_upstream_connect_seconds_bucket",
        "proxy_upstream_tls_seconds_bucket",
        "proxy_upstream_ttfb_seconds_bucket",
        "proxy_upstream_request_seconds_bucket",
    ):
        for quantile in ("0.5", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({metric}{{" in text, metric
    for needle in (
        "sum by (code) (rate(proxy_upstream_requests_total{",
        "sum by (error) (rate(proxy_upstream_errors_total{",
        'kind="reused"',
        'result="hit"',
        "proxy_tunnels_open",
        "sum by (outcome) (rate(proxy_tunnels_total{",
        "proxy_tunnel_bytes_total{",
        "sum by (reason) (rate(proxy_denied_total[",
        "sum(rate(proxy_upstream_tls_seconds_count{",
        'error=~"tls_.*"',
    ):
        assert needle in text, needle
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
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    for name in ("trace_url", "log_url"):
        assert variables[name]["type"] == "textbox"
        assert variables[name]["query"].startswith(("http://", "https://"))
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
