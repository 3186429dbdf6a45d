"""tracing-proxy: a sidecar forward HTTP proxy with per-host timing histograms."""

__version__ = "0.1.0"
