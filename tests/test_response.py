"""Table tests for the upstream response-head rules (proxy.rules.response)."""

from __future__ import annotations

import pytest

from proxy.rules.response import RULES, ResponseHead, broken_rule

OK = ResponseHead((1, 1), 200, b"OK", ((b"Content-Length", b"2"),))


def head(
    *fields: tuple[bytes, bytes],
    status: int = 200,
    reason: bytes = b"OK",
    version: tuple[int, int] = (1, 1),
) -> ResponseHead:
    return ResponseHead(version, status, reason, fields)


# name -> (head, the rule it breaks or None)
CASES: dict[str, tuple[ResponseHead, str | None]] = {
    "plain_200": (OK, None),
    "http_1_0": (head(version=(1, 0)), None),
    "lowest_status": (head(status=100), None),
    "highest_status": (head(status=599), None),
    "empty_reason": (head(reason=b""), None),
    "reason_with_tab_and_utf8": (head(reason="a\tb é".encode()), None),
    "value_with_utf8": (head((b"X-A", "é".encode())), None),
    "value_with_inner_space_and_tab": (head((b"X-A", b"a b\tc")), None),
    "equal_content_length_list": (head((b"Content-Length", b"2, 2")), None),
    "repeated_equal_content_length": (
        head((b"Content-Length", b"2"), (b"content-length", b"2")),
        None,
    ),
    "chunked_any_case": (head((b"Transfer-Encoding", b" Chunked ")), None),
    "http_2_0": (head(version=(2, 0)), "version_not_http_1"),
    "http_0_9": (head(version=(0, 9)), "version_not_http_1"),
    "status_0": (head(status=0), "status_outside_100_599"),
    "status_99": (head(status=99), "status_outside_100_599"),
    "status_600": (head(status=600), "status_outside_100_599"),
    "status_999": (head(status=999), "status_outside_100_599"),
    # Whether a 101 was asked for is the forwarder's call (tests/test_upgrade.py).
    "status_101": (head(status=101), None),
    "reason_with_soh": (head(reason=b"O\x01K"), "reason_phrase_with_control_character"),
    "reason_with_del": (head(reason=b"O\x7fK"), "reason_phrase_with_control_character"),
    "reason_with_cr": (head(reason=b"O\rK"), "reason_phrase_with_control_character"),
    "name_empty": (head((b"", b"x")), "field_name_not_a_token"),
    "name_with_space": (head((b"X A", b"x")), "field_name_not_a_token"),
    "name_with_colon": (head((b"X:A", b"x")), "field_name_not_a_token"),
    "name_with_obs_text": (head((b"X\xe9", b"x")), "field_name_not_a_token"),
    "value_with_nul": (head((b"X-A", b"a\x00b")), "field_value_with_control_character"),
    "value_with_cr": (head((b"X-A", b"a\rb")), "field_value_with_control_character"),
    "value_with_lf": (head((b"X-A", b"a\nb")), "field_value_with_control_character"),
    "value_with_soh": (head((b"X-A", b"a\x01b")), "field_value_with_control_character"),
    "value_with_del": (head((b"X-A", b"a\x7fb")), "field_value_with_control_character"),
    # obs-text is relayed byte for byte (proxy/wire/obs_text.py), UTF-8 or not.
    "value_latin1": (head((b"X-A", b"a\xffb")), None),
    "reason_latin1": (head(reason=b"O\xe9K"), None),
    "length_and_coding": (
        head((b"Content-Length", b"2"), (b"Transfer-Encoding", b"chunked")),
        "content_length_and_transfer_encoding",
    ),
    "two_different_lengths": (
        head((b"Content-Length", b"2"), (b"Content-Length", b"3")),
        "content_length_invalid",
    ),
    "different_lengths_in_a_list": (head((b"Content-Length", b"2, 3")), "content_length_invalid"),
    "length_with_sign": (head((b"Content-Length", b"+2")), "content_length_invalid"),
    "length_in_hex": (head((b"Content-Length", b"0x2")), "content_length_invalid"),
    "length_empty": (head((b"Content-Length", b"")), "content_length_invalid"),
    "coding_gzip": (
        head((b"Transfer-Encoding", b"gzip")),
        "transfer_coding_not_single_chunked",
    ),
    "coding_gzip_then_chunked": (
        head((b"Transfer-Encoding", b"gzip, chunked")),
        "transfer_coding_not_single_chunked",
    ),
    "coding_chunked_twice": (
        head((b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")),
        "transfer_coding_not_single_chunked",
    ),
    "coding_xchunked": (
        head((b"Transfer-Encoding", b"xchunked")),
        "transfer_coding_not_single_chunked",
    ),
    "coding_empty": (head((b"Transfer-Encoding", b"")), "transfer_coding_not_single_chunked"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_response_rule_table(name: str) -> None:
    """Each head breaks exactly the rule its row names, or none."""
    response, expected = CASES[name]
    rule = broken_rule(response)
    assert (rule.name if rule is not None else None) == expected


def test_every_rule_has_a_row_and_cites_an_rfc() -> None:
    """No rule goes untested, and each names the RFC section it holds."""
    covered = {expected for _, expected in CASES.values()}
    for rule in RULES:
        assert rule.name in covered
        assert rule.cite.startswith("RFC 9")
        assert "§" in rule.cite


def test_details_are_printable_ascii() -> None:
    """The details text survives Proxy-Status quoting unchanged (RFC 8941 §3.3.3)."""
    for rule in RULES:
        assert all(" " <= c <= "~" for c in rule.details)
        assert rule.cite.split()[1] in rule.details
