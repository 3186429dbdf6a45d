"""``make bench``'s wiring: plug-in studies are found, feature costs divide the right rows."""

from __future__ import annotations

import pytest

from benchmarks.run import feature_costs, plugin_scenarios
from benchmarks.scenarios import Measurement, Study


def test_plugin_modules_define_their_studies() -> None:
    """benchmarks.https, .scrape, .spans and .http2 each list a study."""
    found = {item.name for item in plugin_scenarios() if isinstance(item, Study)}
    assert found == {"https", "scrape", "span-cost", "http2"}


@pytest.mark.parametrize(
    ("feature", "with_it", "without"),
    [
        ("exemplars on / off (--exemplars false)", "ours", "ours-noexemplars"),
        ("span export at ratio 1.0 / off", "ours-spans", "ours"),
        ("everything on / --observe false", "ours", "ours-off"),
    ],
)
def test_feature_cost_is_cpu_with_over_without(feature: str, with_it: str, without: str) -> None:
    """Each feature's ratio divides the candidate with it by the one without it."""
    rows = {
        "ours": Measurement(cpu_us_per_request=300.0),
        "ours-noexemplars": Measurement(cpu_us_per_request=250.0),
        "ours-spans": Measurement(cpu_us_per_request=360.0),
        "ours-off": Measurement(cpu_us_per_request=200.0),
    }
    costs = {c["feature"]: c["cpu_ratio"] for c in feature_costs({"small-50": rows})}
    assert costs[feature] == pytest.approx(
        rows[with_it].cpu_us_per_request / rows[without].cpu_us_per_request  # type: ignore[operator]
    )


def test_feature_cost_left_out_without_both_rows() -> None:
    """A feature whose candidates did not both run has no ratio."""
    assert feature_costs({"small-50": {"ours": Measurement(cpu_us_per_request=300.0)}}) == []


def test_the_tunnel_benchmarks_tls_framing_keeps_the_proxys_reader_walking() -> None:
    """The "in TLS records" transfer reads as TLS 1.2 with http/1.1 to the tunnel's reader,
    so its figures include walking every record header, not a reader that gave up."""
    from benchmarks.sink import FRAMED_BLOCK, SERVER_HELLO, record
    from benchmarks.tunnel import CLIENT_HELLO
    from proxy.rules.tls_timing import TunnelTls

    tls = TunnelTls()
    for side, data in [
        ("client", CLIENT_HELLO),
        ("upstream", SERVER_HELLO),
        ("client", record(0x17, b"U") + FRAMED_BLOCK * 2),
    ]:
        assert tls(side, data, 0.0)
    assert (tls.version, tls.counting, tls.exchanges, tls.stopped) == ("TLSv1.2", True, 1, None)
