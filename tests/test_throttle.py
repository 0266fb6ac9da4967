"""Shared rate limits in a real Redis, fed by the fake server's headers and faults."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from worker.classifier import make_classifier
from worker.errors import QuotaExhausted, RateLimited
from worker.fakellm import FakeLLM
from worker.queue.throttle import RedisThrottle, _seconds
from worker.settings import Settings

pytestmark = pytest.mark.redis


def throttled(
    make_settings: Callable[..., Settings], redis: redis_lib.Redis, **overrides: object
) -> tuple[Settings, RedisThrottle]:
    settings = make_settings(TAGGER_REDIS_PREFIX=f"taggertest-{uuid.uuid4().hex[:8]}", **overrides)
    return settings, RedisThrottle(settings, redis)


def post(site: Path) -> Path:
    return site / "site" / "posts" / "limiting-wip.md"


def test_reset_header_formats() -> None:
    assert _seconds("1.5") == 1.5
    assert _seconds("6m0s") == 360.0
    assert _seconds("20ms") == pytest.approx(0.02)
    assert _seconds("garbage") is None


def test_headers_saying_nothing_left_pause_every_worker(
    make_settings: Callable[..., Settings], redis: redis_lib.Redis, fake_llm: FakeLLM, site: Path
) -> None:
    settings, throttle = throttled(make_settings, redis)
    fake_llm.success_headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    started = time.monotonic()
    make_classifier(settings, throttle).classify(post(site))
    # three calls (one per type): the 2nd and 3rd each waited for the shared pause the 1st response set
    assert time.monotonic() - started >= 2.0
    assert fake_llm.counts["requests"] == 3


def test_quota_pauses_the_others_without_calls(
    make_settings: Callable[..., Settings], redis: redis_lib.Redis, fake_llm: FakeLLM, site: Path
) -> None:
    settings, throttle = throttled(make_settings, redis, TAGGER_QUOTA_PAUSE=600)
    fake_llm.inject("quota")
    with pytest.raises(QuotaExhausted):
        make_classifier(settings, throttle).classify(post(site))
    assert throttle.reason() == "quota exhausted"
    other = make_classifier(settings, RedisThrottle(settings, redis))
    with pytest.raises(RateLimited, match="paused"):
        other.classify(post(site))
    assert fake_llm.counts["requests"] == 1


def test_requests_per_minute_are_shared(make_settings: Callable[..., Settings], redis: redis_lib.Redis) -> None:
    settings, throttle = throttled(make_settings, redis, TAGGER_RPM=2)
    second = RedisThrottle(settings, redis)
    throttle.wait(10, time.monotonic() + 1)
    second.wait(10, time.monotonic() + 1)
    with pytest.raises(RateLimited, match="local rate limit"):
        throttle.wait(10, time.monotonic() + 0.5)


def test_a_429_pauses_for_retry_after(
    make_settings: Callable[..., Settings], redis: redis_lib.Redis, fake_llm: FakeLLM, site: Path
) -> None:
    settings, throttle = throttled(make_settings, redis)
    fake_llm.retry_after = "1"
    fake_llm.inject("rate_limit")
    started = time.monotonic()
    make_classifier(settings, throttle).classify(post(site))
    assert time.monotonic() - started >= 1.0
    assert fake_llm.counts["requests"] == 4
    assert fake_llm.counts["rate_limit"] == 1
