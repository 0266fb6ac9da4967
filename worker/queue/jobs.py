"""Jobs: producers enqueue one job per post; the job classifies it; failures are recorded for on-call."""

from __future__ import annotations

import hashlib
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from redis import Redis
from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from worker.errors import TaggerError, kind_of
from worker.logs import redact, secrets_of
from worker.paths import confine, existing_post
from worker.queue.keys import FAILURE_CALLBACK, JOB_FUNCTION, PRIORITIES, queues, redis_key
from worker.queue.workers import WorkerContext, WorkerState, lease
from worker.settings import Settings

log = structlog.get_logger("tagger.jobs")
WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
RAW_REPLY_CHARS = 20_000


def job_id_for(relative: str) -> str:
    """One job id per post, so a post has at most one pending job."""
    return "post-" + hashlib.sha1(relative.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class Enqueued:
    """What a producer did with one post."""

    path: str
    job_id: str
    action: str  # enqueued | already-queued | rerun-after-current | refused
    reason: str = ""  # why a path was refused (outside the root, not a post, does not exist)


def enqueue_posts(
    paths: Iterable[Path | str],
    settings: Settings,
    redis: Redis,
    priority: str = "default",
    types: Sequence[str] | None = None,
) -> list[Enqueued]:
    """Enqueue posts (confined to the content root); a post already waiting is not enqueued twice.

    Each path is checked on its own: one that is outside the root, not a post or missing comes back `refused`.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}")
    refused: list[Enqueued] = []
    accepted: list[str] = []
    for p in paths:
        try:
            accepted.append(existing_post(p, settings))
        except TaggerError as exc:
            refused.append(Enqueued(str(p), "", "refused", exc.message))
    relatives = list(dict.fromkeys(accepted))
    ids = [job_id_for(r) for r in relatives]
    with redis.pipeline() as pipe:
        for job_id in ids:
            pipe.hget(f"{Job.redis_job_namespace_prefix}{job_id}", "status")
        statuses = [s.decode() if s else None for s in pipe.execute()]
    queue = Queue(f"{settings.redis_prefix}-{priority}", connection=redis, serializer=JSONSerializer)
    results: list[Enqueued] = list(refused)
    to_enqueue = []
    for relative, job_id, status in zip(relatives, ids, statuses, strict=True):
        if status in WAITING:
            results.append(Enqueued(relative, job_id, "already-queued"))
        elif status == JobStatus.STARTED:
            redis.set(redis_key(settings, "rerun", job_id), "1", ex=7 * 86400)
            results.append(Enqueued(relative, job_id, "rerun-after-current"))
        else:
            to_enqueue.append(job_data(queue, relative, job_id, settings, types))
            results.append(Enqueued(relative, job_id, "enqueued"))
    if to_enqueue:
        # A post enqueued again after failing leaves the failed list: its new job carries the same id.
        with redis.pipeline() as pipe:
            for q in queues(settings, redis):
                pipe.zrem(FailedJobRegistry(queue=q).key, *[d.job_id for d in to_enqueue])
            pipe.execute()
        queue.enqueue_many(to_enqueue)
    for item in results:
        if item.action == "refused":
            log.info("enqueue_refused", post=item.path, reason=item.reason)
            continue
        log.info(
            "enqueued" if item.action == "enqueued" else "enqueue_skipped",
            job_id=item.job_id,
            post=item.path,
            action=item.action,
        )
    return results


def job_data(queue: Queue, relative: str, job_id: str, settings: Settings, types: Sequence[str] | None = None) -> Any:
    """RQ job data for classifying one post: JSON args, retries, failure callback, timeout."""
    return Queue.prepare_data(
        JOB_FUNCTION,
        args=[relative, list(types) if types else None],
        job_id=job_id,
        timeout=settings.job_timeout,
        result_ttl=86400,
        failure_ttl=30 * 86400,
        description=f"classify {relative}",
        meta={"post": relative, "attempts": 0, "types": list(types) if types else None},
        retry=Retry(max=settings.job_retries, interval=settings.job_retry_delays) if settings.job_retries else None,
        on_failure=Callback(FAILURE_CALLBACK),
    )


def classify_job(relative: str, types: list[str] | None = None) -> dict[str, Any]:
    """The RQ job: classify one post below the content root and write it back."""
    from rq import get_current_job

    job = get_current_job()
    assert job is not None and job.connection is not None
    redis: Redis = job.connection
    context = WorkerState.context = (WorkerState.context or WorkerContext.build(redis)).fresh(redis)
    settings = context.settings
    job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
    job.save_meta()
    started = time.monotonic()
    bound = log.bind(job_id=job.id, post=relative, attempt=job.meta["attempts"], model=settings.model)
    bound.info("started")
    # Bound as context too, so the classifier's events (`llm_call`) name the job and the post.
    with structlog.contextvars.bound_contextvars(job_id=job.id, post=relative), lease(redis, settings, job.id):
        path = settings.content_root() / confine(relative, settings, from_cwd=False)
        result = context.classifier.classify(path, types=types)
    usage = result.usage
    minute = int(time.time() // 60)
    with redis.pipeline() as pipe:
        for name, amount in (("done", 1), ("tokens", usage.input_tokens + usage.output_tokens), ("calls", usage.calls)):
            pipe.incrby(redis_key(settings, "stats", name, str(minute)), amount)
            pipe.expire(redis_key(settings, "stats", name, str(minute)), 3 * 3600)
        pipe.execute()
    bound.info(
        "written" if result.written else "skipped",
        calls=usage.calls,
        input_tokens=usage.input_tokens,
        cached_tokens=usage.cached_tokens,
        output_tokens=usage.output_tokens,
        duration=round(time.monotonic() - started, 4),
        llm_seconds=result.llm_seconds,
    )
    _rerun_if_edited(redis, settings, job)
    return {
        "post": relative,
        "written": result.written,
        "calls": usage.calls,
        "tokens": usage.input_tokens + usage.output_tokens,
    }


def _rerun_if_edited(redis: Redis, settings: Settings, job: Job) -> None:
    if redis.delete(redis_key(settings, "rerun", job.id)):
        # A producer asked again while this job ran: run once more after it, on the same queue.
        queue = Queue(job.origin, connection=redis, serializer=JSONSerializer)
        queue.enqueue_many([job_data(queue, job.meta["post"], job.id + "-again", settings, job.meta.get("types"))])


def on_failure(job: Job, connection: Redis, exc_type: Any, value: BaseException, tb: Any) -> None:
    """Record why a job failed; permanent failures are not retried."""
    settings = Settings()
    kind = kind_of(value)
    transient = isinstance(value, TaggerError) and value.transient
    if kind == "abandoned":
        transient = True
    if not transient:
        job.retries_left = 0
    secrets = secrets_of(settings)
    raw = value.raw_reply if isinstance(value, TaggerError) else None
    job.meta.update(
        kind=kind,
        error=redact(str(value) or type(value).__name__, secrets),
        raw_reply=redact(raw[:RAW_REPLY_CHARS], secrets) if raw else None,
        traceback=redact("".join(traceback.format_exception(exc_type, value, tb))[-8000:], secrets) if tb else None,
        failed_at=time.time(),
        transient=transient,
    )
    job.save_meta()
    connection.delete(redis_key(settings, "lease", job.id))
    log.warning(
        "failed" if not transient or not job.retries_left else "retried",
        job_id=job.id,
        post=job.meta.get("post"),
        attempt=job.meta.get("attempts"),
        kind=kind,
        error=job.meta["error"][:300],
    )
