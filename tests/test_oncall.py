"""What on-call meets in an outage: status names the provider's errors and the retries waiting; failed show says
what to do; producers warn when no worker listens; cancel takes queued jobs back.

Real `tagger` commands and workers, real Redis, the fake OpenAI server over HTTP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from tests.test_liveness import posts, tagger
from worker.fakellm import FakeLLM
from worker.settings import Settings

pytestmark = pytest.mark.redis


def test_status_names_a_429_storm_and_the_retries_it_left_waiting(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    """Every call answered 429: status shows the rate-limit retry with its reason and next try, and the last
    provider error (kind, message, when) without the API key, instead of `failed: none` and silence."""
    fake_llm.fault_rate, fake_llm.fault_mix = 1.0, ("rate_limit",)
    env = {**queue_env, "TAGGER_JOB_RETRIES": "2", "TAGGER_JOB_RETRY_DELAYS": "[300]"}
    tagger(env, "enqueue", str(posts(site) / "limiting-wip.md"))
    burst = tagger(env, "work", "--burst")
    assert burst.returncode == 0, burst.stderr[-2000:]
    info = json.loads(tagger(env, "status", "--json").stdout)
    assert info["failed_by_kind"] == {}
    waiting = info["retrying"]["rate_limit"]
    assert waiting["jobs"] == 1 and "rate limited" in waiting["reason"]
    assert 200 < waiting["next_try"] - time.time() <= 300
    seen = info["last_provider_error"]
    assert seen["kind"] == "rate_limit" and "HTTP 429" in seen["message"] and "Rate limit reached" in seen["message"]
    assert time.time() - seen["at"] < 120 and info["provider_errors"] >= 1
    shown = tagger(env, "status")
    assert shown.returncode == 0
    text = shown.stdout
    assert "waiting for a retry:" in text and "  rate_limit 1 (next try in " in text
    assert "last provider error: rate_limit " in text and "RateLimitError (HTTP 429)" in text
    assert env["OPENAI_API_KEY"] not in text + shown.stderr + json.dumps(info)


def test_an_auth_error_echoing_the_key_is_kept_without_it_and_failed_show_ends_with_what_to_do(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    fake_llm.fault_rate, fake_llm.fault_mix = 1.0, ("auth",)  # the server echoes the key it was sent
    job_id = tagger(queue_env, "enqueue", str(posts(site) / "limiting-wip.md")).stdout.split()[0]
    assert tagger(queue_env, "work", "--burst").returncode == 0
    info = json.loads(tagger(queue_env, "status", "--json").stdout)
    assert info["failed_by_kind"] == {"auth": 1}
    assert info["last_provider_error"]["kind"] == "auth"
    assert queue_env["OPENAI_API_KEY"] not in json.dumps(info) and "***" in info["last_provider_error"]["message"]
    shown = tagger(queue_env, "failed", "show", job_id)
    assert shown.returncode == 0
    last = shown.stdout.strip().splitlines()[-1]
    assert (
        last
        == f"next: fix the provider credentials (OPENAI_API_KEY) the workers use, then `tagger failed retry {job_id}`"
    )


@pytest.mark.parametrize(
    ("stored", "kind", "message"),
    [
        (b"not json", "unreadable", "not valid"),
        (json.dumps({"kind": "rate limit; rm -rf", "message": "x", "at": 1.0}).encode(), "unreadable", "not valid"),
        (json.dumps({"kind": "auth", "message": "line\none\x1b[31m" + "y" * 5000, "at": 1.0}).encode(), "auth", ""),
        (json.dumps({"kind": "auth", "message": "m", "at": "NaN"}).encode(), "unreadable", "not valid"),
        (json.dumps(["auth", "m", 1]).encode(), "unreadable", "not valid"),
    ],
    ids=["not-json", "odd-kind", "long-multiline-message", "nan-time", "a-list"],
)
def test_the_stored_provider_error_is_validated_when_read_back(
    make_settings: Callable[..., Settings],
    redis: redis_lib.Redis,
    redis_prefix: str,
    stored: bytes,
    kind: str,
    message: str,
) -> None:
    """Redis is untrusted input: a planted value is reported as unreadable or cut to one bounded line."""
    from worker.queue import keys
    from worker.queue.throttle import MESSAGE_CHARS, last_provider_error

    settings = make_settings(TAGGER_REDIS_PREFIX=redis_prefix)
    redis.set(keys.provider_error(settings), stored)
    seen = last_provider_error(settings, redis)
    assert seen is not None and seen.kind == kind and message in seen.message
    assert "\n" not in seen.message and "\x1b" not in seen.message and len(seen.message) <= MESSAGE_CHARS
