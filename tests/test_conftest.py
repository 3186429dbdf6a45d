"""The suite's own helpers in tests/conftest.py."""

from __future__ import annotations

import pytest

from tests.conftest import unavailable


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [("true", pytest.fail.Exception), (None, pytest.skip.Exception), ("1", pytest.skip.Exception)],
    ids=["ci_fails", "terminal_skips", "other_value_skips"],
)
def test_a_missing_outside_tool_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, ci: str | None, outcome: type[BaseException]
) -> None:
    """Under CI=true (.ci/run) a missing tool fails the test; elsewhere it skips, saying why."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    # Both caught here: a skip escaping this test would skip it, not fail it.
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception), match="no such tool") as e:
        unavailable("no such tool here")
    assert type(e.value) is outcome
