"""The k8s/intercept component: the CA from a Secret in both containers, the key in one."""

from __future__ import annotations

import os
import posixpath
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from proxy import config
from tests.deploy.deploy_support import K8S_DIR, find_tool, run
from tests.deploy.test_k8s import OLDEST_WITH_NATIVE_SIDECARS


@cache
def rendered(workdir: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of k8s/ with the component turned on (kustomize wants relative paths)."""
    base = os.path.relpath(K8S_DIR, workdir)
    (Path(workdir) / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [base], "components": [f"{base}/intercept"]})
    )
    result = run([find_tool("kubectl"), "kustomize", workdir])
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], ...]:
    return rendered(str(tmp_path_factory.mktemp("kustomize")))


def _one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _pod(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def _container(objects: tuple[dict[str, Any], ...], name: str) -> dict[str, Any]:
    pod = _pod(objects)
    (found,) = [c for c in [*pod["initContainers"], *pod["containers"]] if c["name"] == name]
    container: dict[str, Any] = found
    return container


def _settings(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    data: dict[str, str] = _one(objects, "ConfigMap")["data"]
    return data


def _files(objects: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """Path in the container -> Secret key, for every Secret file it mounts."""
    volumes = {v["name"]: v for v in _pod(objects)["volumes"]}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        keys = [item["key"] for item in secret.get("items", [])] or ["ca.pem", "ca-key.pem"]
        for key in keys:
            files[posixpath.join(mount["mountPath"], key)] = key
    return files


@pytest.mark.parametrize("version", ["latest", OLDEST_WITH_NATIVE_SIDECARS])
def test_component_renders_valid_objects(objects: tuple[dict[str, Any], ...], version: str) -> None:
    """With the component, every built-in object still passes strict schema validation."""
    target = kubernetes_validate.latest_version() if version == "latest" else version
    for obj in objects:
        if "." not in obj["apiVersion"].split("/")[0]:
            kubernetes_validate.validate(obj, target, strict=True)


def test_sidecar_reads_cert_and_key_from_the_secret(objects: tuple[dict[str, Any], ...]) -> None:
    """PROXY_CA_CERT and PROXY_CA_KEY name files the sidecar mounts from tracing-proxy-ca."""
    env = _settings(objects)
    settings = config.load([], env)
    assert settings.intercept
    files = _files(objects, _container(objects, "tracing-proxy"))
    assert files[settings.ca_cert] == "ca.pem"
    assert files[settings.ca_key] == "ca-key.pem"
    volumes = {v["name"]: v for v in _pod(objects)["volumes"]}
    for mount in _container(objects, "tracing-proxy")["volumeMounts"]:
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "tracing-proxy-ca"
        assert secret["defaultMode"] & 0o077 == 0  # the proxy refuses a key others may read
        assert mount["readOnly"] is True


def test_fs_group_is_the_proxys_own_group(objects: tuple[dict[str, Any], ...]) -> None:
    """The kubelet makes Secret files readable by fsGroup: it must be the proxy's own group."""
    pod = _pod(objects)
    sidecar = _container(objects, "tracing-proxy")
    group = sidecar.get("securityContext", {}).get(
        "runAsGroup", pod["securityContext"]["runAsGroup"]
    )
    assert pod["securityContext"]["fsGroup"] == group


def test_app_trusts_the_ca_and_never_sees_the_key(objects: tuple[dict[str, Any], ...]) -> None:
    """SSL_CERT_FILE, REQUESTS_CA_BUNDLE and NODE_EXTRA_CA_CERTS point at mounted files."""
    app = _container(objects, "app")
    env = {item["name"]: item["value"] for item in app["env"]}
    files = _files(objects, app)
    assert "ca-key.pem" not in files.values()
    assert files[env["NODE_EXTRA_CA_CERTS"]] == "ca.pem"
    bundle_mounts = {m["mountPath"] for m in app["volumeMounts"]}
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        assert posixpath.dirname(env[name]) in bundle_mounts, name
    builder = _container(objects, "trust-bundle")
    assert "ca-key.pem" not in _files(objects, builder).values()
    assert env["SSL_CERT_FILE"] in " ".join(builder["command"])


def test_new_init_container_is_locked_down(objects: tuple[dict[str, Any], ...]) -> None:
    """The trust-bundle builder is as restricted as the other containers."""
    context = _container(objects, "trust-bundle")["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert _pod(objects)["securityContext"]["runAsNonRoot"] is True
