"""The k8s/ example: `kubectl kustomize` renders it, and the objects are what we promise.

Built-in kinds are validated with kubernetes-validate against its JSON schemas (strict:
unknown fields are errors) for the newest Kubernetes it knows and for 1.29, the first
release with native sidecars on by default. The PodMonitor is a custom resource with no
schema there, so it is checked structurally and against the Deployment it must match.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from proxy.config import Settings, parse_address
from tests.deploy.deploy_support import K8S_DIR, find_tool, run

OLDEST_WITH_NATIVE_SIDECARS = "1.29"
BACKSTOP_S = 2  # aiohttp's final shutdown after the drain (proxy.server), rounded up


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize k8s/` prints."""
    result = run([find_tool("kubectl"), "kustomize", str(K8S_DIR)])
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def only(kind: str) -> dict[str, Any]:
    found = [obj for obj in rendered() if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = only("Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar() -> dict[str, Any]:
    init: list[dict[str, Any]] = pod_spec().get("initContainers", [])
    (container,) = [c for c in init if c["name"] == "tracing-proxy"]
    return container


def app() -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec()["containers"]
    (container,) = containers
    return container


def proxy_env() -> dict[str, str]:
    """The ConfigMap that the sidecar's envFrom points at, as rendered."""
    (ref,) = sidecar()["envFrom"]
    name = ref["configMapRef"]["name"]
    (config_map,) = [
        o for o in rendered() if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name
    ]
    data: dict[str, str] = config_map["data"]
    return data


def test_kustomize_renders_the_expected_objects() -> None:
    """The kustomization renders a Namespace, ServiceAccount, ConfigMap, Deployment, the
    collector Service and a PodMonitor."""
    kinds = sorted(obj["kind"] for obj in rendered())
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PodMonitor",
        "Service",
        "ServiceAccount",
    ]
    namespace = only("Namespace")["metadata"]["name"]
    for obj in rendered():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]


@pytest.mark.parametrize("version", ["latest", OLDEST_WITH_NATIVE_SIDECARS])
def test_builtin_objects_validate_against_the_kubernetes_schema(version: str) -> None:
    """Every built-in object passes strict schema validation for the given Kubernetes version."""
    target = kubernetes_validate.latest_version() if version == "latest" else version
    builtin = [obj for obj in rendered() if "." not in obj["apiVersion"].split("/")[0]]
    assert len(builtin) == len(rendered()) - 1  # all but the PodMonitor
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, target, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{obj['kind']} invalid for {target} at {path}: {error.message}")


def test_the_validator_rejects_a_broken_deployment() -> None:
    """A misspelled field and a wrong type in the Deployment make kubernetes-validate fail."""
    broken = copy.deepcopy(only("Deployment"))
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)
    broken = copy.deepcopy(only("Deployment"))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "forty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_proxy_is_a_native_sidecar_from_the_kustomize_image() -> None:
    """The proxy is an init container with restartPolicy Always, image set by kustomize."""
    container = sidecar()
    assert container["restartPolicy"] == "Always"
    assert re.fullmatch(r"tracing-proxy:\S+", container["image"]), container["image"]
    assert "command" not in container  # the image's ENTRYPOINT runs tracing-proxy


def test_app_sends_its_outbound_calls_through_the_sidecar() -> None:
    """HTTP_PROXY/HTTPS_PROXY point at the proxy's loopback listener; NO_PROXY skips loopback."""
    env = {item["name"]: item.get("value") for item in app()["env"]}
    listen = parse_address(proxy_env()["PROXY_LISTEN"])
    assert listen.host == "127.0.0.1"
    url = f"http://127.0.0.1:{listen.port}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name] == url, name
    for name in ("NO_PROXY", "no_proxy"):
        assert {"localhost", "127.0.0.1"} <= set(str(env[name]).split(",")), name


def test_admin_port_is_named_metrics_and_probed() -> None:
    """Port `metrics` is the admin listener; readiness is /readyz and liveness /healthz on it."""
    container = sidecar()
    (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    admin = parse_address(proxy_env()["PROXY_ADMIN_LISTEN"])
    assert port["containerPort"] == admin.port
    # Probes come from the kubelet, outside the pod's loopback.
    assert admin.host == "0.0.0.0"
    for probe, path in (
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe


def test_settings_come_from_the_configmap_and_parse() -> None:
    """Every key of the ConfigMap is a PROXY_* setting the proxy accepts."""
    from proxy import config

    env = proxy_env()
    assert env, "empty ConfigMap"
    known = {option.env for option in config.OPTIONS}
    assert set(env) <= known, f"unknown settings: {sorted(set(env) - known)}"
    settings = config.load(argv=[], environ=env)
    assert isinstance(settings, Settings)
    assert str(settings.listen) == env["PROXY_LISTEN"]


def test_spans_go_to_the_collector_service_on_the_otlp_http_port() -> None:
    """PROXY_OTLP_ENDPOINT names the rendered collector Service and its OTLP/HTTP port."""
    from proxy import config

    endpoint = config.load(argv=[], environ=proxy_env()).otlp_endpoint
    service = only("Service")
    (port,) = service["spec"]["ports"]
    name = service["metadata"]["name"]
    assert endpoint == f"http://{name}:{port['port']}/v1/traces"
    assert port["port"] == 4318


def test_termination_grace_covers_the_proxy_shutdown() -> None:
    """terminationGracePeriodSeconds >= shutdown grace + drain timeout + backstop."""
    env = proxy_env()
    defaults = Settings()
    grace = float(env.get("PROXY_SHUTDOWN_GRACE", defaults.shutdown_grace))
    drain = float(env.get("PROXY_DRAIN_TIMEOUT", defaults.drain_timeout))
    budget = pod_spec()["terminationGracePeriodSeconds"]
    assert budget >= grace + drain + BACKSTOP_S
    # ...and not wildly more: a stuck pod should not linger for minutes.
    assert budget <= grace + drain + BACKSTOP_S + 30


def test_every_container_is_locked_down() -> None:
    """Non-root, read-only root FS, no capabilities, no privilege escalation, RuntimeDefault."""
    pod = pod_spec()
    pod_context = pod.get("securityContext", {})
    assert pod.get("automountServiceAccountToken") is False
    for container in [*pod["initContainers"], *pod["containers"]]:
        context = container.get("securityContext", {})
        effective = {**pod_context, **context}
        name = container["name"]
        assert effective.get("runAsNonRoot") is True, name
        assert effective.get("runAsUser", 1) != 0, name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert context.get("capabilities", {}).get("drop") == ["ALL"], name
        assert "add" not in context.get("capabilities", {}), name
        assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), (name, kind)
    labels = only("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_pod_is_annotated_for_plain_prometheus() -> None:
    """prometheus.io/scrape, /port and /path name the sidecar's metrics port and /metrics."""
    annotations = only("Deployment")["spec"]["template"]["metadata"]["annotations"]
    (port,) = [p for p in sidecar()["ports"] if p["name"] == "metrics"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


_DURATION = re.compile(r"^(0|(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$")


def test_podmonitor_selects_the_pod_and_scrapes_port_metrics() -> None:
    """The PodMonitor is well formed, its selector matches the pod and its port exists."""
    monitor = only("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    selector = spec["selector"]["matchLabels"]
    pod_labels = only("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector
    assert selector.items() <= pod_labels.items()
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        assert _DURATION.match(endpoint[key]), key
    names = {
        p["name"]
        for c in [*pod_spec()["initContainers"], *pod_spec()["containers"]]
        for p in c.get("ports", [])
    }
    assert endpoint["port"] in names
