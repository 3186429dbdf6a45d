# syntax=docker/dockerfile:1
#
# tracing-proxy image: `docker build -t tracing-proxy:0.1.0 .`
#
# Two stages. "build" turns the repository into a virtual environment under /opt/venv
# (pip builds the wheel in its own isolated environment, so nothing from the build
# stays behind); "runtime" copies only that environment onto a fresh base image, so
# the final image has no compiler, no pip and no source tree.
#
# Every dependency (aiohttp, uvloop, aiodns/pycares, ...) ships manylinux wheels for
# CPython 3.11 on amd64 and arm64, so no apt packages or compilers are needed here.
# If pip ever falls back to an sdist it fails loudly instead of half-building.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all:

WORKDIR /src

# A venv without pip of its own: the base image's pip installs into it (--python),
# so the runtime stage copies packages only.
RUN python -m venv --without-pip /opt/venv

# Only what `pip install .` reads (the .dockerignore keeps everything else out).
COPY pyproject.toml README.md ./
COPY proxy ./proxy

# PIP_ONLY_BINARY covers the dependencies; the project itself is built from source
# by setuptools (pure Python), hence --no-binary for it alone.
RUN pip --python /opt/venv/bin/python install --no-cache-dir --no-binary tracing-proxy . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
    && /opt/venv/bin/tracing-proxy --help > /dev/null


FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
# The base image's own packaging tools are removed: nothing is installed at run time.
RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin proxy \
    && python -m pip uninstall --yes --quiet pip setuptools wheel

COPY --from=build /opt/venv /opt/venv

# Bytecode was compiled in the build stage; at run time nothing is written, so the
# container works with a read-only root filesystem.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# In a container the proxy must listen on all interfaces: 127.0.0.1 inside a container
# is unreachable from `docker run -p`. For the same reason the client allow-list takes
# the private ranges a `docker run -p` client arrives from (the bridge gateway, 172.17.0.1
# by default) besides loopback; public addresses are still refused with 403. All three are
# ordinary settings, so a deployment can narrow them again: in a Kubernetes pod the
# application reaches its sidecar on 127.0.0.1, and k8s/ sets PROXY_LISTEN=127.0.0.1:3128
# so that other pods cannot use the proxy; the admin port stays on 0.0.0.0 because the
# kubelet's probes and Prometheus come from outside the pod.
ENV PROXY_LISTEN=0.0.0.0:3128 \
    PROXY_ADMIN_LISTEN=0.0.0.0:9901 \
    PROXY_ALLOW_CLIENTS=127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7

USER 10001:10001

# 3128: the forward proxy. 9901: admin (/metrics, /healthz, /readyz).
EXPOSE 3128 9901

# For `docker run`; Kubernetes ignores this and uses the probes in k8s/deployment.yaml.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status != 200)"]

# Exec form: tracing-proxy is PID 1 and receives SIGTERM itself, then keeps serving for
# PROXY_SHUTDOWN_GRACE seconds and drains for up to PROXY_DRAIN_TIMEOUT seconds.
ENTRYPOINT ["tracing-proxy"]
