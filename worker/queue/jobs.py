"""The job runtime, the worker's side: one start-up for every job, the shared-folder job, the failure callback.

RQ calls `classify_job` (shared folder) and `worker.queue.remote.classify_remote` (self-contained) by import
path; both begin with `start_job`, which reads the process's context (worker/queue/context.py) and counts the
attempt. `on_failure` records why a job failed, for on-call.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

import structlog
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError, WatchError
from rq import Queue, get_current_job
from rq.exceptions import AbandonedJobError, StopRequested
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from worker import untrusted
from worker.errors import TaggerError, WrongJobMode, kind_of
from worker.logs import redact, secrets_of
from worker.paths import confine
from worker.queue import keys
from worker.queue.context import WorkerContext, WorkerState
from worker.queue.enqueue import RERUN_CHECKED, WAITING, job_data, other_id
from worker.queue.recovery import track
from worker.results import Usage
from worker.settings import Settings

log = structlog.get_logger("tagger.jobs")
RAW_REPLY_CHARS = 20_000
# Exceptions that mean the worker was stopped or its process torn down, not that the job is bad.
INTERRUPTED: tuple[type[BaseException], ...] = (AbandonedJobError, SystemExit, KeyboardInterrupt, StopRequested)


@dataclass(frozen=True)
class JobStart:
    """A job that has begun: RQ's job, its Redis, the process's context, a logger naming it, when it began."""

    job: Job
    redis: Redis
    context: WorkerContext
    log: Any  # structlog's bound logger
    started: float

    def seconds(self) -> float:
        """Seconds since the job began."""
        return round(time.monotonic() - self.started, 4)


def start_job(post: str, reruns: bool, **fields: Any) -> JobStart:
    """Begin the running job: count the attempt, log `started` (with `fields`) and hand over the context.

    `reruns`: the job takes rerun requests (shared-folder jobs); a retry takes them again.
    """
    job = get_current_job()
    assert job is not None and job.connection is not None
    context = WorkerState.current()
    job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
    if reruns:
        job.meta[RERUN_CHECKED] = False
    job.save_meta()
    bound = log.bind(job_id=job.id, post=post, attempt=job.meta["attempts"], **fields)
    bound.info("started")
    return JobStart(job, job.connection, context, bound, time.monotonic())


def classify_job(relative: str, types: list[str] | None = None) -> dict[str, Any]:
    """The RQ job: classify one post below the content root and write it back."""
    settings = WorkerState.current().settings
    if settings.job_mode == "remote":
        raise WrongJobMode(
            "a shared-folder job reached a worker for remote jobs (TAGGER_JOB_MODE=remote), which has no site "
            "files: run a shared-folder worker where the site is, or enqueue with --remote"
        )
    begun = start_job(relative, reruns=True, model=settings.model)
    job, redis = begun.job, begun.redis
    context = WorkerState.context = begun.context.reloaded(redis)
    # Bound as context too, so the classifier's events (`llm_call`) name the job and the post.
    with structlog.contextvars.bound_contextvars(job_id=job.id, post=relative):
        path = settings.content_root() / confine(relative, settings, from_cwd=False)
        assert context.classifier is not None
        result = context.classifier.classify(path, types=types)
    usage = result.usage
    begun.log.info(
        "written" if result.written else "skipped",
        calls=usage.calls,
        input_tokens=usage.input_tokens,
        cached_tokens=usage.cached_tokens,
        output_tokens=usage.output_tokens,
        duration=begun.seconds(),
        llm_seconds=result.llm_seconds,
    )
    rerun = _finish(redis, settings, job, usage)
    return {
        "post": relative,
        "written": result.written,
        "calls": usage.calls,
        "tokens": usage.input_tokens + usage.output_tokens,
        "rerun": rerun,  # the id of the post's run after this one, when a producer asked for it meanwhile
    }


def count_usage(pipe: Pipeline, settings: Settings, usage: Usage) -> None:
    """Add one finished job and its tokens and calls to this minute's counters (queued on `pipe`, first)."""
    minute = int(time.time() // 60)
    amounts = (1, usage.input_tokens + usage.output_tokens, usage.calls)
    for name, amount in zip(USAGE_COUNTERS, amounts, strict=True):
        pipe.incrby(keys.stats(settings, name, minute), amount)
        pipe.expire(keys.stats(settings, name, minute), 3 * 3600)


USAGE_COUNTERS = ("done", "tokens", "calls")
USAGE_COMMANDS = 2 * len(USAGE_COUNTERS)  # what count_usage queues: INCRBY and EXPIRE a counter


def execute_counted(pipe: Pipeline) -> list[Any]:
    """Run a job's closing transaction that begins with `count_usage`; the results of the commands after it.

    A counter someone overwrote with text fails its INCRBY alone: the count is lost (and logged), not the job. Any
    other command's error is raised.
    """
    results = pipe.execute(raise_on_error=False)
    counted, rest = results[:USAGE_COMMANDS], results[USAGE_COMMANDS:]
    failed = next((r for r in rest if isinstance(r, Exception)), None)
    if failed is not None:
        raise failed
    lost = [r for r in counted if isinstance(r, Exception)]
    if lost:
        log.warning("usage_not_counted", error=str(lost[0])[:200])
    return rest


def _finish(redis: Redis, settings: Settings, job: Job, usage: Usage) -> str | None:
    """End the job in one transaction (its usage counted, itself marked past its look for reruns); then enqueue the
    post's run after this one when a producer asked for it while this job ran: its id, or None.

    Marked past the look (producers watch its hash), a producer asking from then on enqueues a run itself instead of
    setting a request nobody would read; in the same transaction, the request set until then is read and deleted.
    """
    job.meta[RERUN_CHECKED] = True
    with redis.pipeline() as pipe:
        count_usage(pipe, settings, usage)
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))  # Job.save_meta, inside the transaction
        pipe.delete(keys.rerun(settings, job.id))
        asked = execute_counted(pipe)[-1]
    if not asked:
        return None
    queue = Queue(job.origin, connection=redis, serializer=JSONSerializer)  # the same queue
    again = other_id(job.id)
    while True:
        with redis.pipeline() as pipe:
            try:
                pipe.watch(Job.key_for(again))
                current = Job.fetch_many([again], connection=redis, serializer=JSONSerializer)[0]
                if current is not None and current.get_status(refresh=False) in {*WAITING, JobStatus.STARTED}:
                    return again  # a producer that saw this job ending enqueued it already (after the edit)
                pipe.multi()
                data = job_data(queue, job.meta["post"], again, settings, job.meta.get("types"))
                queue.enqueue_many([data], pipeline=pipe)
                track(settings, pipe, [again])
                pipe.execute()
                return again
            except WatchError:
                continue  # a producer enqueued or changed it meanwhile: look again


def failure_kind(value: BaseException) -> str:
    """A failed job's kind: tagger's own, `abandoned` for an interrupted worker, `job_timeout`, else `crash`."""
    if isinstance(value, INTERRUPTED):
        return "abandoned"
    if isinstance(value, JobTimeoutException):
        return "job_timeout"
    return kind_of(value)


def _transient(settings: Settings, connection: Redis, job: Job, value: BaseException) -> bool:
    """Whether a failure is worth retrying: tagger's transient kinds, interruptions, and Redis trouble."""
    if isinstance(value, TaggerError):
        return value.transient
    if isinstance(value, (*INTERRUPTED, RedisError, OSError)):
        return True
    if isinstance(value, JobTimeoutException):
        # Out of time while the provider was rate limiting (chunks waiting in the shared pause): transient.
        try:
            limited = untrusted.finite(connection.get(keys.last_rate_limit(settings)))  # not a time: 0
        except RedisError:
            return True
        started = job.started_at.timestamp() if job.started_at else 0.0
        return limited >= started
    return False


def on_failure(job: Job, connection: Redis, exc_type: Any, value: BaseException, tb: Any) -> None:
    """Record why a job failed; permanent failures are not retried."""
    settings = WorkerState.settings()  # the worker's own (its secrets), not only the environment's
    kind = failure_kind(value)
    transient = _transient(settings, connection, job, value)
    if kind == "abandoned":
        abandoned = int(job.meta.get("abandoned", 0)) + 1
        job.meta["abandoned"] = abandoned
        transient = abandoned <= settings.abandoned_requeues
        if transient and not job.retries_left:
            job.retries_left = 1  # a dead worker's job gets its own requeues, whatever retries it used
    if not transient:
        job.retries_left = 0
    secrets = secrets_of(settings)
    raw = value.raw_reply if isinstance(value, TaggerError) else None
    message = str(value) or type(value).__name__
    if kind == "abandoned":
        message = f"worker died or was stopped while running the job ({type(value).__name__})"
    job.meta.update(
        kind=kind,
        error=redact(message, secrets),
        raw_reply=redact(raw[:RAW_REPLY_CHARS], secrets) if raw else None,
        traceback=redact("".join(traceback.format_exception(exc_type, value, tb))[-8000:], secrets) if tb else None,
        failed_at=time.time(),
        transient=transient,
    )
    job.save_meta()
    log.warning(
        "failed" if not transient or not job.retries_left else "retried",
        job_id=job.id,
        post=job.meta.get("post"),
        attempt=job.meta.get("attempts"),
        kind=kind,
        error=job.meta["error"][:300],
    )
