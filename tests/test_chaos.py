"""A short chaos run: faults, killed workers and a concurrent writer lose and corrupt nothing."""

from __future__ import annotations

import pytest

from benchmarks.chaos import run

pytestmark = pytest.mark.redis


def test_short_chaos_run_loses_and_corrupts_nothing(redis_url: str) -> None:
    report = run(redis_url, posts=30, workers=3, fault_rate=0.25, kills=3, limit=150)
    assert report.faults > 0 and report.kills == 3 and report.edits > 0
    assert report.lost == []
    assert report.corrupted == []
    assert report.stuck_started == 0
