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
from redis.exceptions import WatchError
from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from worker.errors import TaggerError, kind_of
from worker.logs import redact, secrets_of
from worker.paths import confine, existing_post
from worker.queue import keys
from worker.queue.keys import FAILURE_CALLBACK, JOB_FUNCTION, PRIORITIES, REMOTE_FUNCTION, queues
from worker.queue.recovery import track
from worker.queue.workers import WorkerContext, WorkerState
from worker.results import Usage
from worker.settings import Settings
from worker.taxonomy import Taxonomy, taxonomy_for

log = structlog.get_logger("tagger.jobs")
WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
RAW_REPLY_CHARS = 20_000
BATCH = 500  # posts per atomic enqueue
# Exceptions that mean the worker was stopped or its process torn down, not that the job is bad.
INTERRUPTED = ("AbandonedJobError", "SystemExit", "KeyboardInterrupt", "StopRequested")
AGAIN = "-again"  # a post's second job id: its run after the current one (the two ids take turns)
# Set in a running job's meta once it has looked for a rerun request: one asked later would never be seen.
RERUN_CHECKED = "rerun_checked"


def other_id(job_id: str) -> str:
    """The other of a post's two job ids (never `-again-again`), so producers still see one post."""
    return job_id.removesuffix(AGAIN) if job_id.endswith(AGAIN) else job_id + AGAIN


def job_id_for(relative: str, settings: Settings) -> str:
    """One job id per post (and tagger deployment: two prefixes on one Redis never share a job)."""
    return "post-" + hashlib.sha1(f"{settings.redis_prefix}\0{relative}".encode()).hexdigest()[:24]


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
    remote: bool | None = None,
) -> list[Enqueued]:
    """Enqueue posts (confined to the content root); a post already waiting is not enqueued twice.

    `remote` (default: TAGGER_JOB_MODE=remote) makes self-contained jobs: the taxonomy is published in Redis and
    each job carries its post (one job per post and content: an edited post gets a job of its own).

    Each path is checked on its own: one that is outside the root, not a post or missing comes back `refused`.
    Atomic against other producers: each batch reads the posts' job states and enqueues under WATCH, so two
    producers enqueuing the same posts at once make one pending job per post.
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
    payloads: dict[str, dict[str, Any]] | None = None
    taxonomy: Taxonomy | None = None
    if (remote if remote is not None else settings.job_mode == "remote") and relatives:
        taxonomy = taxonomy_for(settings)  # read once: published for the jobs and sizing their timeout
        relatives, payloads, too_big = _payloads(settings, redis, relatives, types, taxonomy)
        refused += too_big
    queue = Queue(keys.queue_name(settings, priority), connection=redis, serializer=JSONSerializer)
    timeout = job_timeout(settings, taxonomy) if relatives else 0
    results: list[Enqueued] = list(refused)
    for start in range(0, len(relatives), BATCH):
        batch = relatives[start : start + BATCH]
        results += _enqueue_batch(settings, redis, queue, batch, types, timeout, payloads)
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


def _payloads(
    settings: Settings, redis: Redis, relatives: list[str], types: Sequence[str] | None, taxonomy: Taxonomy
) -> tuple[list[str], dict[str, dict[str, Any]], list[Enqueued]]:
    """Publish the taxonomy and build each post's self-contained job; a post too big to carry is refused."""
    from worker.prompts import load_templates
    from worker.queue.remote import make_payload, publish

    version = publish(settings, redis, taxonomy, load_templates(settings.prompts_dir))
    payloads: dict[str, dict[str, Any]] = {}
    refused: list[Enqueued] = []
    for relative in relatives:
        try:
            payloads[relative] = make_payload(settings, relative, version, list(types) if types else None)
        except TaggerError as exc:
            refused.append(Enqueued(relative, "", "refused", f"{exc.kind}: {exc.message}"))
    return [r for r in relatives if r in payloads], payloads, refused


def _enqueue_batch(
    settings: Settings,
    redis: Redis,
    queue: Queue,
    relatives: list[str],
    types: Sequence[str] | None,
    timeout: int,
    payloads: dict[str, dict[str, Any]] | None = None,
) -> list[Enqueued]:
    if payloads is None:
        ids = [job_id_for(r, settings) for r in relatives]
    else:  # one job per post and content: a job's result always matches the bytes it carried
        ids = [f"{job_id_for(r, settings)}-{payloads[r]['content_hash'][:12]}" for r in relatives]
    # A post's job and its rerun (`-again`) are one post: either waiting or running counts.
    both = [i for job_id in ids for i in (job_id, job_id + AGAIN)]
    failed = [FailedJobRegistry(queue=q) for q in queues(settings, redis)]
    while True:
        with redis.pipeline() as pipe:
            try:
                pipe.watch(*[Job.key_for(i) for i in both])
                jobs = Job.fetch_many(both, connection=redis, serializer=JSONSerializer)
                results: list[Enqueued] = []
                to_enqueue = []
                pipe.multi()
                for n, (relative, job_id) in enumerate(zip(relatives, ids, strict=True)):
                    pair = [j for j in jobs[2 * n : 2 * n + 2] if j is not None]
                    waiting = next((j.id for j in pair if j.get_status(refresh=False) in WAITING), None)
                    running = next((j for j in pair if j.get_status(refresh=False) == JobStatus.STARTED), None)
                    if waiting is not None:
                        results.append(Enqueued(relative, waiting, "already-queued"))
                    elif running is not None and payloads is not None:
                        results.append(Enqueued(relative, running.id, "already-queued"))  # running on these bytes
                    elif running is not None and running.meta.get(RERUN_CHECKED):
                        # Past its look for reruns (it is ending): a run of its own, under the post's other id.
                        again = other_id(running.id)
                        to_enqueue.append(job_data(queue, relative, again, settings, types, timeout))
                        results.append(Enqueued(relative, again, "enqueued"))
                    elif running is not None:
                        # Watched: a job marking itself past its look for reruns makes this transaction retry.
                        pipe.set(keys.rerun(settings, running.id), "1", ex=7 * 86400)
                        results.append(Enqueued(relative, running.id, "rerun-after-current"))
                    else:
                        payload = payloads[relative] if payloads is not None else None
                        to_enqueue.append(job_data(queue, relative, job_id, settings, types, timeout, payload))
                        results.append(Enqueued(relative, job_id, "enqueued"))
                if to_enqueue:
                    new_ids = [d.job_id for d in to_enqueue]
                    # A post enqueued again after failing leaves the failed list: its new job has the same id.
                    for registry in failed:
                        for job_id in new_ids:
                            registry.remove(job_id, pipeline=pipe)
                            registry.remove(job_id + AGAIN, pipeline=pipe)
                    queue.enqueue_many(to_enqueue, pipeline=pipe)
                    track(settings, pipe, new_ids)
                pipe.execute()
                return results
            except WatchError:
                continue  # another producer enqueued some of these posts meanwhile: read their states again


def job_timeout(settings: Settings, taxonomy: Taxonomy | None = None) -> int:
    """RQ's job timeout: every wave of chunks (more chunks than TAGGER_CONCURRENCY run in waves) may use
    the provider's whole retry deadline, twice (one re-ask), plus a margin."""
    try:
        taxonomy = taxonomy or taxonomy_for(settings)
        chunks = sum(-(-len(taxonomy.of_type(t)) // settings.chunk_size) for t in taxonomy.types())
    except TaggerError:
        chunks = settings.concurrency  # the workers will say what is wrong with the taxonomy
    waves = max(1, -(-chunks // settings.concurrency))
    return int(waves * (2 * settings.retry_deadline + settings.request_timeout) + 120)


def job_data(
    queue: Queue,
    relative: str,
    job_id: str,
    settings: Settings,
    types: Sequence[str] | None = None,
    timeout: int | None = None,
    payload: dict[str, Any] | None = None,
) -> Any:
    """RQ job data for classifying one post: JSON args, retries, failure callback, timeout.

    With `payload` (remote mode) the job carries the post and its result is kept TAGGER_RESULT_TTL for `apply`.
    """
    return Queue.prepare_data(
        REMOTE_FUNCTION if payload is not None else JOB_FUNCTION,
        args=[payload] if payload is not None else [relative, list(types) if types else None],
        job_id=job_id,
        timeout=timeout or job_timeout(settings),
        result_ttl=settings.result_ttl if payload is not None else 86400,
        failure_ttl=30 * 86400,
        description=f"classify {relative}" + (" (remote)" if payload is not None else ""),
        meta={"post": relative, "attempts": 0, "types": list(types) if types else None, "remote": payload is not None},
        retry=Retry(max=settings.job_retries, interval=settings.job_retry_delays) if settings.job_retries else None,
        on_failure=Callback(FAILURE_CALLBACK),
    )


def classify_job(relative: str, types: list[str] | None = None) -> dict[str, Any]:
    """The RQ job: classify one post below the content root and write it back."""
    from rq import get_current_job

    job = get_current_job()
    assert job is not None and job.connection is not None
    redis: Redis = job.connection
    context = WorkerState.context = (
        WorkerState.context or WorkerContext.build(WorkerState.settings or Settings(), redis)
    ).fresh(redis)
    settings = context.settings
    job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
    job.meta[RERUN_CHECKED] = False  # a retry takes rerun requests again
    job.save_meta()
    started = time.monotonic()
    bound = log.bind(job_id=job.id, post=relative, attempt=job.meta["attempts"], model=settings.model)
    bound.info("started")
    # Bound as context too, so the classifier's events (`llm_call`) name the job and the post.
    with structlog.contextvars.bound_contextvars(job_id=job.id, post=relative):
        path = settings.content_root() / confine(relative, settings, from_cwd=False)
        result = context.classifier.classify(path, types=types)
    usage = result.usage
    count_usage(redis, settings, usage)
    bound.info(
        "written" if result.written else "skipped",
        calls=usage.calls,
        input_tokens=usage.input_tokens,
        cached_tokens=usage.cached_tokens,
        output_tokens=usage.output_tokens,
        duration=round(time.monotonic() - started, 4),
        llm_seconds=result.llm_seconds,
    )
    rerun = _rerun_if_edited(redis, settings, job)
    return {
        "post": relative,
        "written": result.written,
        "calls": usage.calls,
        "tokens": usage.input_tokens + usage.output_tokens,
        "rerun": rerun,  # the id of the post's run after this one, when a producer asked for it meanwhile
    }


def count_usage(redis: Redis, settings: Settings, usage: Usage) -> None:
    """Add one finished job and its tokens and calls to this minute's counters."""
    minute = int(time.time() // 60)
    with redis.pipeline() as pipe:
        for name, amount in (("done", 1), ("tokens", usage.input_tokens + usage.output_tokens), ("calls", usage.calls)):
            pipe.incrby(keys.stats(settings, name, minute), amount)
            pipe.expire(keys.stats(settings, name, minute), 3 * 3600)
        pipe.execute()


def _rerun_if_edited(redis: Redis, settings: Settings, job: Job) -> str | None:
    """Enqueue the post's run after this one when a producer asked for it while this job ran; its id, or None.

    The job first marks itself past this look (producers watch its hash): a producer asking from then on
    enqueues a run itself instead of setting a request nobody would read.
    """
    job.meta[RERUN_CHECKED] = True
    job.save_meta()
    if not redis.delete(keys.rerun(settings, job.id)):
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


def _transient(settings: Settings, connection: Redis, job: Job, value: BaseException) -> bool:
    """Whether a failure is worth retrying: tagger's transient kinds, interruptions, and Redis trouble."""
    from redis.exceptions import RedisError

    if isinstance(value, TaggerError):
        return value.transient
    if type(value).__name__ in INTERRUPTED or isinstance(value, RedisError | OSError):
        return True
    if type(value).__name__ == "JobTimeoutException":
        # Out of time while the provider was rate limiting (chunks waiting in the shared pause): transient.
        try:
            limited = float(connection.get(keys.last_rate_limit(settings)) or 0)
        except RedisError:
            return True
        started = job.started_at.timestamp() if job.started_at else 0.0
        return limited >= started
    return False


def on_failure(job: Job, connection: Redis, exc_type: Any, value: BaseException, tb: Any) -> None:
    """Record why a job failed; permanent failures are not retried."""
    settings = WorkerState.settings or Settings()  # the worker's own (its secrets), not only the environment's
    kind = kind_of(value)
    if type(value).__name__ in INTERRUPTED:
        kind = "abandoned"
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
