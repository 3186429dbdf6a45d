"""What of a query string the logs and spans may show: never the value of a signing key.

``--log-query`` puts the query in the access line and in the span's ``url.full``. Signed
URLs carry their credentials there, so the values of the keys the OpenTelemetry semantic
conventions list for ``url.full`` and ``url.query`` are replaced by ``REDACTED``, the key
kept. The request goes upstream as it came; only what is written down changes.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote

from yarl import URL

# The semantic conventions' list (model/url/registry.yaml on their main branch, 2026-08-10:
# v1.42-v1.44 had dropped AWSAccessKeyId and Signature, which came back then). They say to
# match keys case-sensitively; a key is compared percent-decoded, as the origin reads it.
SENSITIVE_QUERY_KEYS: Final = frozenset(
    {
        "AWSAccessKeyId",
        "Signature",
        "sig",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "X-Amz-Signature",
        "X-Goog-Signature",
    }
)
REDACTED: Final = "REDACTED"


def redacted_query(query: str) -> str:
    """``query`` (raw, percent-encoded) with each sensitive key's value replaced."""
    parts = query.split("&")
    changed = False
    for index, part in enumerate(parts):
        key, equals, _ = part.partition("=")
        if equals and unquote(key) in SENSITIVE_QUERY_KEYS:
            parts[index] = f"{key}={REDACTED}"
            changed = True
    return "&".join(parts) if changed else query


def loggable(url: URL) -> URL:
    """``url`` as it may be logged: its query with the sensitive values redacted."""
    query = url.raw_query_string
    redacted = redacted_query(query)
    if redacted == query:
        return url
    return URL(f"{url.origin()}{url.raw_path}?{redacted}", encoded=True)
