"""The README stays true to the code: the two commands first, every setting, every metric."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from proxy.config import OPTIONS
from proxy.observe.metrics import Metrics

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    """The first code block is exactly make run and make test."""
    block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["make run", "make test"]


def test_every_setting_is_in_the_settings_table() -> None:
    """Each flag appears with its environment twin and its default."""
    for option in OPTIONS:
        default = option.default_text
        row = f"| `{option.flag}` | `{option.env}` | `{default}` |"
        assert row in README, row


def test_every_exported_metric_is_documented() -> None:
    """Each metric family the collector describes has a row in the metrics table."""
    registry = CollectorRegistry()
    Metrics((1.0,)).register(registry, in_flight=lambda: 0)
    names = {metric.name for metric in registry.collect()}
    documented = set(re.findall(r"^\| `(proxy_[a-z_]+)`", README, re.MULTILINE))
    # prometheus_client reports counters without their _total suffix.
    assert {n if n in documented else n + "_total" for n in names} <= documented
