"""Shared rate limits in a real Redis, fed by the fake server's headers and faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from tests.fakellm import FakeLLM
from worker.classifier import make_classifier
from worker.errors import QuotaExhausted, RateLimited
from worker.queue.throttle import RedisThrottle, _seconds
from worker.settings import Settings

pytestmark = pytest.mark.redis


@pytest.fixture
def throttled(
    make_settings: Callable[..., Settings], redis: redis_lib.Redis, redis_prefix: str
) -> Callable[..., tuple[Settings, RedisThrottle]]:
    """Settings with this test's own Redis prefix (its keys are deleted after the test), and a throttle."""

    def make(**overrides: object) -> tuple[Settings, RedisThrottle]:
        settings = make_settings(TAGGER_REDIS_PREFIX=redis_prefix, **overrides)
        return settings, RedisThrottle(settings, redis)

    return make


Throttled = Callable[..., tuple[Settings, RedisThrottle]]


def post(site: Path) -> Path:
    return site / "site" / "posts" / "limiting-wip.md"


def test_reset_header_formats() -> None:
    assert _seconds("1.5") == 1.5
    assert _seconds("6m0s") == 360.0
    assert _seconds("20ms") == pytest.approx(0.02)
    assert _seconds("garbage") is None


def test_headers_saying_nothing_left_pause_every_worker(throttled: Throttled, fake_llm: FakeLLM, site: Path) -> None:
    settings, throttle = throttled(TAGGER_PACK_TYPES=False)  # one call per type: three calls in a row
    fake_llm.success_headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    started = time.monotonic()
    make_classifier(settings, throttle).classify(post(site))
    # three calls (one per type): the 2nd and 3rd each waited for the shared pause the 1st response set
    assert time.monotonic() - started >= 2.0
    assert fake_llm.counts["requests"] == 3


def test_quota_pauses_the_others_without_calls(
    throttled: Throttled, redis: redis_lib.Redis, fake_llm: FakeLLM, site: Path
) -> None:
    settings, throttle = throttled(TAGGER_QUOTA_PAUSE=600)
    fake_llm.inject("quota")
    with pytest.raises(QuotaExhausted):
        make_classifier(settings, throttle).classify(post(site))
    assert throttle.reason() == "quota exhausted"
    other = make_classifier(settings, RedisThrottle(settings, redis))
    with pytest.raises(RateLimited, match="paused"):
        other.classify(post(site))
    assert fake_llm.counts["requests"] == 1


def test_requests_per_minute_are_shared(throttled: Throttled, redis: redis_lib.Redis) -> None:
    settings, throttle = throttled(TAGGER_RPM=2)
    second = RedisThrottle(settings, redis)
    throttle.wait(10, time.monotonic() + 1)
    second.wait(10, time.monotonic() + 1)
    with pytest.raises(RateLimited, match="local rate limit"):
        throttle.wait(10, time.monotonic() + 0.5)


def test_a_429_pauses_for_retry_after(throttled: Throttled, fake_llm: FakeLLM, site: Path) -> None:
    settings, throttle = throttled()
    fake_llm.retry_after = "1"
    fake_llm.inject("rate_limit")
    started = time.monotonic()
    make_classifier(settings, throttle).classify(post(site))
    assert time.monotonic() - started >= 1.0
    assert fake_llm.counts["requests"] == 2  # the post's one call (its types fit one), then its retry
    assert fake_llm.counts["rate_limit"] == 1


def test_a_429_seen_by_one_worker_pauses_another_workers_calls(
    throttled: Throttled, redis: redis_lib.Redis, fake_llm: FakeLLM, site: Path
) -> None:
    """The shared pause, not tenacity's own Retry-After wait: a second worker that never saw the 429 must hold."""
    pause = 2.0
    settings, first = throttled(TAGGER_MODEL="worker-a", TAGGER_RETRY_MAX_WAIT=10)
    fake_llm.retry_after = str(pause)
    fake_llm.inject("rate_limit")
    a = threading.Thread(target=make_classifier(settings, first).classify, args=(post(site),))
    a.start()
    deadline = time.monotonic() + 30
    while first.reason() is None:  # worker A has seen the 429 (`tagger status` shows this pause)
        assert time.monotonic() < deadline and a.is_alive(), "the 429 never paused the workers"
        time.sleep(0.01)
    seen = fake_llm.arrived_at[0]
    other_settings, _ = throttled(TAGGER_MODEL="worker-b", TAGGER_RETRY_MAX_WAIT=10)
    b = make_classifier(other_settings, RedisThrottle(other_settings, redis))  # its own throttle, same Redis
    b.classify(site / "site" / "posts" / "shipping-daily.md")
    a.join(timeout=60)
    arrivals = [(r["model"], t) for r, t in zip(fake_llm.requests, fake_llm.arrived_at, strict=True)]
    first_b = min(t for model, t in arrivals if model == "worker-b")
    assert first_b - seen >= pause - 0.1, f"worker B called {first_b - seen:.2f}s after A's 429 (pause {pause}s)"
    assert sum(1 for model, _ in arrivals if model == "worker-b") == 1  # B's call was held, not refused
