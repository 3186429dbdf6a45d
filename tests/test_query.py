"""The query string as logged: signing keys' values are redacted, everything else kept."""

from __future__ import annotations

import pytest
from yarl import URL

from proxy.rules.query import loggable, redacted_query


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("", ""),
        ("q=1&page=2", "q=1&page=2"),
        ("sig=abc", "sig=REDACTED"),
        ("a=1&sig=x%3D%3D&b=2", "a=1&sig=REDACTED&b=2"),
        ("sig=a=b", "sig=REDACTED"),  # the value runs to the next &
        ("sig=&q=1", "sig=REDACTED&q=1"),
        ("sig", "sig"),  # no value to hide
        ("sig=1&sig=2", "sig=REDACTED&sig=REDACTED"),
        ("SIG=1&Sig=2&signature=3", "SIG=1&Sig=2&signature=3"),  # case-sensitive, as listed
        ("X%2DAmz%2DSignature=f", "X%2DAmz%2DSignature=REDACTED"),  # the key decoded
        ("AWSAccessKeyId=AKIA&Signature=s", "AWSAccessKeyId=REDACTED&Signature=REDACTED"),
        (
            "X-Amz-Credential=c&X-Amz-Security-Token=t&X-Goog-Signature=g",
            "X-Amz-Credential=REDACTED&X-Amz-Security-Token=REDACTED&X-Goog-Signature=REDACTED",
        ),
    ],
)
def test_signing_values_are_redacted_and_the_rest_kept_byte_for_byte(
    query: str, logged: str
) -> None:
    """Each listed key keeps its name and loses its value; other pairs stay as they came."""
    assert redacted_query(query) == logged


def test_loggable_keeps_the_url_when_nothing_is_redacted() -> None:
    """A URL without a signing key is returned as it is; one with a key keeps all but that."""
    plain = URL("http://h:8080/p%20q?a=%2F", encoded=True)
    assert loggable(plain) is plain
    signed = loggable(URL("http://h:8080/p%20q?a=%2F&sig=x", encoded=True))
    assert str(signed) == "http://h:8080/p%20q?a=%2F&sig=REDACTED"
