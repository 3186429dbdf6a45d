"""A short soak: mixed traffic with aborts and upstream resets leaves nothing behind."""

from __future__ import annotations

from benchmarks.soak import Plan, soak


async def test_short_soak_leaks_nothing_and_counts_everything() -> None:
    """50 clients for 4 s: no leaked fds or tasks, exact bodies, and every request counted."""
    # Two seconds of warm-up leave memory short of its working size: a wider margin.
    report = await soak(Plan(clients=50, seconds=4, warm_up=2, rss_margin_mb=50))
    print("\n".join(report.lines()))
    assert report.problems() == []
    outcomes = report.tally.outcomes
    # Every kind of fault was exercised, not only clean traffic.
    for kind in (
        "abandoned download aborted",
        "abandoned upload aborted",
        "abandoned tunnel aborted",
        "reset before headers status 502",
        "reset mid-body visibly incomplete",
        "download ok",
        "upload ok",
        "tunnel ok",
    ):
        assert outcomes[kind] > 0, kind
