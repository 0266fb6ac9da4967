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

from tests.fakellm import FakeLLM
from tests.test_liveness import kill_session, posts, spawn, tagger
from tests.waiting import wait_for
from worker.settings import Settings

pytestmark = pytest.mark.redis


@pytest.mark.slow
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


@pytest.mark.slow
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
        (b"[" * 100_000 + b"]" * 100_000, "unreadable", "nested too deeply"),
    ],
    ids=["not-json", "odd-kind", "long-multiline-message", "nan-time", "a-list", "nested-too-deeply"],
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


def test_failed_lists_planted_dropped_entries_and_odd_job_meta_instead_of_crashing(
    make_settings: Callable[..., Settings], redis: redis_lib.Redis, redis_prefix: str
) -> None:
    """Redis is untrusted input: `tagger failed` shows what it can of a planted value and goes on."""
    from rq import Queue
    from rq.job import Job
    from rq.registry import FailedJobRegistry
    from rq.serializers import JSONSerializer

    from worker.oncall import failures
    from worker.queue import keys

    settings = make_settings(TAGGER_REDIS_PREFIX=redis_prefix)
    for planted in (
        b"[" * 100_000 + b"]" * 100_000,
        b"not json",
        b'{"job_id": 1}',
        b'{"job_id": "j", "queue": "q", "reason": "r", "at": "NaN"}',
    ):
        redis.lpush(keys.dropped(settings), planted)
    honest = {"job_id": "bad id", "queue": f"{redis_prefix}-default", "reason": "ValueError: Job ID", "at": 5.0}
    redis.lpush(keys.dropped(settings), json.dumps(honest))
    queue = Queue(f"{redis_prefix}-default", connection=redis, serializer=JSONSerializer)
    odd = Job.create("worker.queue.jobs.classify_job", connection=redis, serializer=JSONSerializer, id="odd-meta")
    odd.meta = {"post": "p.md", "kind": "crash", "attempts": "many", "failed_at": float("inf")}
    odd.save()
    registry = FailedJobRegistry(queue=queue)
    registry.add(odd, exc_string="boom")
    try:
        listed = failures(settings, redis)
    finally:
        registry.remove(odd)
        odd.delete()
    dropped = [f for f in listed if f.kind == "bad_job_id"]
    assert len(dropped) == 5 and sum("unreadable" in f.message for f in dropped) == 4
    assert any(f.job_id == "bad id" and f.failed_at == 5.0 and "Job ID" in f.message for f in dropped)
    [job] = [f for f in listed if f.job_id == "odd-meta"]
    assert (job.post, job.attempts, job.failed_at) == ("p.md", 0, 0.0)


def test_backfill_wait_reads_planted_results_and_meta_without_crashing(
    make_settings: Callable[..., Settings], redis: redis_lib.Redis, redis_prefix: str, site: Path, redis_url: str
) -> None:
    """Redis is untrusted input: a finished job whose result counts tokens in words, a failed job whose meta is not
    an object; `backfill --wait` counts them (0 tokens, one failure) and ends."""
    from rq.job import Job, JobStatus
    from rq.results import Result
    from rq.serializers import JSONSerializer

    from tests.conftest import SESSION, delete_keys
    from worker.backfill import follow
    from worker.queue.enqueue import enqueue_posts

    settings = make_settings(TAGGER_REDIS_PREFIX=redis_prefix, REDIS_URL=redis_url)
    try:
        done, failed = enqueue_posts(
            [posts(site) / "limiting-wip.md", posts(site) / "shipping-daily.md"], settings, redis
        )
        finished = Job.fetch(done.job_id, connection=redis, serializer=JSONSerializer)
        Result.create(finished, Result.Type.SUCCESSFUL, 600, return_value={"tokens": "lots", "rerun": 7})
        finished.set_status(JobStatus.FINISHED)
        broken = Job.fetch(failed.job_id, connection=redis, serializer=JSONSerializer)
        broken.meta = ["not", "an", "object"]  # type: ignore[assignment]
        broken.save_meta()
        broken.set_status(JobStatus.FAILED)
        summary = follow(settings, redis, [done.job_id, failed.job_id], poll=0.05)
        assert (summary.done, summary.tokens, summary.failed) == (1, 0, ["?: ?: "])
    finally:
        delete_keys(redis, f"rq{SESSION}*")


WARNING = "no live worker listens to"


@pytest.mark.slow
def test_producers_warn_when_no_live_worker_listens_to_their_queue(queue_env: dict[str, str], site: Path) -> None:
    wip, daily = posts(site) / "limiting-wip.md", posts(site) / "shipping-daily.md"
    alone = tagger(queue_env, "enqueue", str(wip))
    assert alone.returncode == 0 and f"{WARNING} {queue_env['TAGGER_REDIS_PREFIX']}-default" in alone.stderr
    backfill = tagger(queue_env, "backfill", str(site / "site" / "posts"))
    assert backfill.returncode == 0 and f"{WARNING} {queue_env['TAGGER_REDIS_PREFIX']}-low" in backfill.stderr
    worker = spawn(queue_env, "work", "--queue", "high")  # a worker, but not on the queue the producer uses
    try:
        assert wait_for(lambda: WARNING not in tagger(queue_env, "enqueue", "--priority", "high", str(daily)).stderr)
        elsewhere = tagger(queue_env, "enqueue", "--priority", "default", str(daily))
        assert WARNING in elsewhere.stderr
    finally:
        kill_session(worker)


@pytest.mark.slow
def test_cancel_takes_queued_and_delayed_jobs_off_the_queues_and_a_running_job_finishes(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, redis: redis_lib.Redis
) -> None:
    from tests.test_liveness import many_posts, queue_of, written

    env = {**queue_env, "TAGGER_JOB_RETRIES": "2", "TAGGER_JOB_RETRY_DELAYS": "[2]", "TAGGER_REQUEST_TIMEOUT": "60"}
    wip, daily, backlog = (posts(site) / n for n in ("limiting-wip.md", "shipping-daily.md", "backlog-by-value.md"))
    fake_llm.inject("rate_limit")  # the first job fails once: a delayed retry waits in RQ's scheduler
    tagger(env, "enqueue", str(backlog))
    assert tagger(env, "work", "--burst").returncode == 0
    retrying = json.loads(tagger(env, "status", "--json").stdout)["retrying"]["rate_limit"]
    assert retrying["jobs"] == 1
    due = float(retrying["next_try"])  # when the delayed retry would run (epoch seconds)
    ids = {p: tagger(env, "enqueue", str(p)).stdout.split()[0] for p in (wip, daily)}
    low = many_posts(site, 2)
    tagger(env, "enqueue", "--priority", "low", *map(str, low))

    by_post = tagger(env, "cancel", str(wip), str(backlog))  # a queued job and a delayed retry
    assert by_post.returncode == 0, by_post.stderr
    assert f"{ids[wip]}  cancelled" in by_post.stdout and "posts/backlog-by-value.md" in by_post.stdout
    assert by_post.stdout.strip().endswith("cancelled 2")
    by_id = tagger(env, "cancel", ids[daily], "posts/nope.md")
    assert (
        by_id.returncode == 1
        and f"{ids[daily]}  cancelled" in by_id.stdout
        and "NOT FOUND posts/nope.md" in by_id.stderr
    )
    only_high = tagger(env, "cancel", "--all", "--queue", "high")
    assert only_high.stdout.strip() == "nothing cancelled"
    assert len(queue_of(env, redis, "low").get_job_ids()) == 2
    everything = tagger(env, "cancel", "--all")
    assert everything.stdout.strip().endswith("cancelled 2") and not queue_of(env, redis, "low").get_job_ids()

    time.sleep(max(0.0, due + 0.5 - time.time()))  # past the cancelled retry's due time: it must not come back
    assert tagger(env, "work", "--burst").returncode == 0
    assert not written([wip, daily, backlog, *low])
    info = json.loads(tagger(env, "status", "--json").stdout)
    assert info["retrying"] == {} and all(q["queued"] == 0 for q in info["queues"].values())

    fake_llm.hold()  # a running job is not cancelled: it finishes
    tagger(env, "enqueue", str(wip))
    worker = spawn(env, "work")
    try:
        assert fake_llm.wait_held(1, timeout=60)
        running = tagger(env, "cancel", str(wip))
        assert "running (finishes)" in running.stdout and running.stdout.strip().endswith("nothing cancelled")
        fake_llm.release()
        assert wait_for(lambda: written([wip]), 60)
    finally:
        fake_llm.release()
        kill_session(worker)
    again = tagger(env, "enqueue", str(daily))  # a cancelled post enqueued again runs
    assert "enqueued" in again.stdout
    assert tagger(env, "work", "--burst").returncode == 0 and written([daily])


def test_backfill_wait_ends_when_its_jobs_are_cancelled(
    make_settings: Callable[..., Settings], redis: redis_lib.Redis, redis_prefix: str, site: Path, redis_url: str
) -> None:
    from tests.conftest import SESSION, delete_keys
    from worker.backfill import follow
    from worker.queue.cancel import cancel
    from worker.queue.enqueue import enqueue_posts

    settings = make_settings(TAGGER_REDIS_PREFIX=redis_prefix, REDIS_URL=redis_url)
    try:
        [item] = enqueue_posts([posts(site) / "limiting-wip.md"], settings, redis)
        assert [c.action for c in cancel(settings, redis, everything=True)] == ["cancelled"]
        summary = follow(settings, redis, [item.job_id], poll=0.05)
        assert summary.done == 0 and summary.failed == [
            "posts/limiting-wip.md: cancelled: taken off the queue (tagger cancel)"
        ]
    finally:
        delete_keys(redis, f"rq{SESSION}*")
