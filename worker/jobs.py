"""Jobs on the queue: producers, the job function, failure policy and recovery of abandoned jobs."""

from __future__ import annotations

import hashlib
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from redis import Redis
from rq import Callback, Queue, Retry, SimpleWorker
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from worker.classifier import Classifier, make_classifier
from worker.errors import OutsideContentRoot, TaggerError, kind_of
from worker.logs import redact, secrets_of
from worker.settings import Settings
from worker.throttle import RedisThrottle

log = structlog.get_logger("tagger.jobs")
PRIORITIES = ("high", "default", "low")
WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
RAW_REPLY_CHARS = 20_000


JOB_FUNCTION = "worker.jobs.classify_job"
FAILURE_CALLBACK = "worker.jobs.on_failure"


def connect(settings: Settings) -> Redis:
    """A Redis connection for the configured URL (`rediss://` for TLS, password in the URL)."""
    return Redis.from_url(settings.redis_url)


def queue_names(settings: Settings) -> list[str]:
    """Queue names in priority order."""
    return [f"{settings.redis_prefix}-{p}" for p in PRIORITIES]


def queues(settings: Settings, redis: Redis) -> list[Queue]:
    """The queues, highest priority first, with RQ's JSON serializer (never pickle)."""
    return [Queue(name, connection=redis, serializer=JSONSerializer) for name in queue_names(settings)]


def confine(path: Path | str, settings: Settings, from_cwd: bool = True) -> str:
    """The path relative to the content root, or OutsideContentRoot (`..`, absolute paths, symlinks out).

    A relative path is taken from the current folder when it exists there (producers), else from the root.
    """
    root = settings.content_root()
    candidate = Path(path)
    if not candidate.is_absolute() and not (from_cwd and candidate.exists()):
        candidate = root / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise OutsideContentRoot(f"resolves outside the content root {root}", path=path)
    return resolved.relative_to(root).as_posix()


def job_id_for(relative: str) -> str:
    """One job id per post, so a post has at most one pending job."""
    return "post-" + hashlib.sha1(relative.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class Enqueued:
    """What a producer did with one post."""

    path: str
    job_id: str
    action: str  # enqueued | already-queued | rerun-after-current


def _key(settings: Settings, *parts: str) -> str:
    return ":".join([settings.redis_prefix, *parts])


def enqueue_posts(
    paths: Iterable[Path | str],
    settings: Settings,
    redis: Redis,
    priority: str = "default",
    types: Sequence[str] | None = None,
) -> list[Enqueued]:
    """Enqueue posts (confined to the content root); a post already waiting is not enqueued twice."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}")
    relatives = list(dict.fromkeys(confine(p, settings) for p in paths))
    ids = [job_id_for(r) for r in relatives]
    with redis.pipeline() as pipe:
        for job_id in ids:
            pipe.hget(f"{Job.redis_job_namespace_prefix}{job_id}", "status")
        statuses = [s.decode() if s else None for s in pipe.execute()]
    queue = Queue(f"{settings.redis_prefix}-{priority}", connection=redis, serializer=JSONSerializer)
    results: list[Enqueued] = []
    to_enqueue = []
    for relative, job_id, status in zip(relatives, ids, statuses, strict=True):
        if status in WAITING:
            results.append(Enqueued(relative, job_id, "already-queued"))
        elif status == JobStatus.STARTED:
            redis.set(_key(settings, "rerun", job_id), "1", ex=7 * 86400)
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


@contextmanager
def lease(redis: Redis, settings: Settings, job_id: str) -> Iterator[None]:
    """Hold a renewed lease while the job runs: a job whose lease lapses was abandoned by a dead worker."""
    key = _key(settings, "lease", job_id)
    stop = threading.Event()
    ttl = max(1, int(settings.lease_seconds))

    def renew() -> None:
        while not stop.wait(settings.lease_seconds / 3):
            redis.set(key, "1", ex=ttl)

    redis.set(key, "1", ex=ttl)
    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        redis.delete(key)


def _signature(settings: Settings) -> tuple[tuple[str, int, int], ...]:
    """What, on disk, a built classifier depends on: term files and prompt templates."""
    from worker.prompts import DEFAULT_DIR

    files = [*settings.taxonomy_dir.rglob("*.md"), *(settings.prompts_dir or DEFAULT_DIR).glob("*.md")]
    return tuple(sorted((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()))


@dataclass
class WorkerContext:
    """Built once per worker process and reused by its jobs: settings and a ready classifier."""

    settings: Settings
    classifier: Classifier
    signature: tuple[tuple[str, int, int], ...]

    @classmethod
    def build(cls, redis: Redis) -> WorkerContext:
        """Read settings, taxonomy and templates, and set up the provider."""
        settings = Settings()
        return cls(settings, make_classifier(settings, RedisThrottle(settings, redis)), _signature(settings))

    def fresh(self, redis: Redis) -> WorkerContext:
        """This context, or a rebuilt one when a term file or template changed on disk."""
        return self if _signature(self.settings) == self.signature else WorkerContext.build(redis)


class WorkerState:
    """The worker process's context, built before its first job."""

    # Process state on purpose: RQ calls a job function by import path, so this is how a classifier built
    # once (taxonomy, SSL context, the SDK's per-model classes, open connections) reaches every job.
    context: WorkerContext | None = None


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
    with lease(redis, settings, job.id):
        path = settings.content_root() / confine(relative, settings, from_cwd=False)
        result = context.classifier.classify(path, types=types)
    usage = result.usage
    minute = int(time.time() // 60)
    with redis.pipeline() as pipe:
        for name, amount in (("done", 1), ("tokens", usage.input_tokens + usage.output_tokens), ("calls", usage.calls)):
            pipe.incrby(_key(settings, "stats", name, str(minute)), amount)
            pipe.expire(_key(settings, "stats", name, str(minute)), 3 * 3600)
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
    if redis.delete(_key(settings, "rerun", job.id)):
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
    connection.delete(_key(settings, "lease", job.id))
    log.warning(
        "failed" if not transient or not job.retries_left else "retried",
        job_id=job.id,
        post=job.meta.get("post"),
        attempt=job.meta.get("attempts"),
        kind=kind,
        error=job.meta["error"][:300],
    )


def promote_overdue(settings: Settings, redis: Redis, grace: float = 5.0) -> list[str]:
    """Enqueue delayed retries that are overdue: RQ's scheduler may be gone with a killed worker for a while."""
    promoted = []
    for queue in queues(settings, redis):
        registry = ScheduledJobRegistry(queue=queue)
        for job_id in registry.get_jobs_to_schedule(int(time.time() - grace)):
            if not redis.zrem(registry.key, job_id):
                continue  # another worker or the scheduler took it
            job = queue.fetch_job(job_id)
            if job is not None:
                queue.enqueue_job(job)
                promoted.append(job_id)
    return promoted


def recover_abandoned(settings: Settings, redis: Redis) -> list[str]:
    """Requeue started jobs whose lease lapsed (worker killed); fail them as `abandoned` after a few times."""
    recovered = []
    for queue in queues(settings, redis):
        registry = StartedJobRegistry(queue=queue)
        for job_id in registry.get_job_ids(cleanup=False):
            if redis.exists(_key(settings, "lease", job_id)):
                continue
            job = queue.fetch_job(job_id)
            if job is None or job.get_status() != JobStatus.STARTED:
                continue
            if job.started_at and time.time() - job.started_at.timestamp() < settings.lease_seconds:
                continue  # just started: the lease may not be set yet
            abandoned = int(job.meta.get("abandoned", 0)) + 1
            job.meta.update(
                abandoned=abandoned, kind="abandoned", error="worker died while running the job", failed_at=time.time()
            )
            job.save_meta()
            entries = [e.decode() for e in redis.zrange(registry.key, 0, -1) if isinstance(e, bytes)]
            stale = [e for e in entries if e.startswith(f"{job_id}:")]  # entries are "<job id>:<execution id>"
            if stale:
                redis.zrem(registry.key, *stale)
            if abandoned <= settings.abandoned_requeues:
                queue.enqueue_job(job)
                log.warning("retried", job_id=job_id, post=job.meta.get("post"), kind="abandoned", attempt=abandoned)
            else:
                job.set_status(JobStatus.FAILED)
                FailedJobRegistry(queue=queue).add(job, exc_string="abandoned: worker died while running the job")
                log.warning("failed", job_id=job_id, post=job.meta.get("post"), kind="abandoned", attempt=abandoned)
            recovered.append(job_id)
    return recovered


def refusal(job: Job) -> str | None:
    """Why a job found on tagger's queues must not run, or None: only tagger's own job, in JSON."""
    try:
        name = job.func_name
    except DeserializationError:
        return "job data is not JSON (a pickled or foreign payload); not run"
    if name != JOB_FUNCTION:
        return f"job calls {name!r}, not {JOB_FUNCTION}; not run"
    callbacks = {job._success_callback_name, job._failure_callback_name, job._stopped_callback_name}
    foreign = sorted(str(c) for c in callbacks if c is not None and c != FAILURE_CALLBACK)
    if foreign:
        return f"job names foreign callbacks {foreign}; not run"
    return None


class TaggerWorker(SimpleWorker):
    """Runs jobs in this process (connections and classifier stay warm) and refuses anything not tagger's."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job, unless it is not tagger's own: then fail it without running any of its code."""
        problem = refusal(job)
        if problem is None:
            super().execute_job(job, queue)
            return
        # Callbacks are cleared first: a foreign job's failure callback is code too.
        job._success_callback_name = job._failure_callback_name = job._stopped_callback_name = None
        job.meta = {"kind": "foreign_job", "error": problem, "failed_at": time.time(), "attempts": 0}
        job.save_meta()
        job.set_status(JobStatus.FAILED)
        FailedJobRegistry(queue=queue).add(job, exc_string=f"refused: {problem}")
        log.error("refused", job_id=job.id, reason=problem)
