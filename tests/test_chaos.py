"""A short chaos run: faults, killed workers and a concurrent writer lose and corrupt nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis as redis_lib

from benchmarks.chaos import run
from tests.conftest import SESSION, delete_keys

pytestmark = pytest.mark.redis


@pytest.fixture
def chaos_redis(redis_url: str) -> Iterator[str]:
    """The test Redis; RQ's job keys of the run (named by post, not by the run's prefix) are deleted after."""
    yield redis_url
    delete_keys(redis_lib.Redis.from_url(redis_url), f"rq{SESSION}*")


@pytest.mark.slow
def test_short_chaos_run_loses_and_corrupts_nothing(chaos_redis: str) -> None:
    report = run(chaos_redis, posts=30, workers=3, fault_rate=0.25, kills=3, limit=150)
    # Kills happen only while a worker is mid-job: how many fit in the run depends on the machine's speed.
    assert report.faults > 0 and 1 <= report.kills <= 3 and report.edits > 0
    assert report.lost == []
    assert report.corrupted == []
    assert report.stuck_started == 0
