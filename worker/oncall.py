"""On-call tools: failed jobs (list, show, retry, purge), queue status, and running workers."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from worker import untrusted
from worker.queue import keys
from worker.queue.connection import PRIORITIES
from worker.queue.enqueue import enqueue_posts
from worker.queue.fleet import SeenWorker, seen_workers
from worker.queue.keys import queues
from worker.queue.recovery import recover, track
from worker.queue.throttle import RedisThrottle, last_provider_error
from worker.queue.workers import DroppedEntry
from worker.settings import Settings


@dataclass(frozen=True)
class Failure:
    """One failed job as the on-call engineer sees it."""

    job_id: str
    queue: str
    post: str
    kind: str
    attempts: int
    failed_at: float
    message: str
    job: Job | None  # None when the job's data cannot be read (planted or damaged)


def failures(settings: Settings, redis: Redis, kind: str | None = None) -> list[Failure]:
    """Every failed job, newest first, optionally of one kind."""
    found = []
    for queue in queues(settings, redis):
        for job_id in FailedJobRegistry(queue=queue).get_job_ids():
            try:
                job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
                failure = _failure(job, queue.name)
            except Exception as exc:  # a planted or damaged job must not break the listing
                found.append(
                    Failure(job_id, queue.name, "?", "unreadable", 0, 0.0, f"job cannot be read: {exc!r}", None)
                )
                continue
            if kind is None or failure.kind == kind:
                found.append(failure)
    for raw in redis.lrange(keys.dropped(settings), 0, -1):
        try:
            entry = DroppedEntry.model_validate(untrusted.loads(raw))
        except ValueError as exc:  # planted or damaged: listed as such, never a crash of the listing
            entry = DroppedEntry(job_id="?", queue="?", reason=f"unreadable ({str(exc).splitlines()[0][:200]})", at=0)
        if kind is None or kind == "bad_job_id":
            message = f"not a job, dropped from the queue: {entry.reason}"
            found.append(Failure(entry.job_id, entry.queue, "?", "bad_job_id", 0, entry.at, message, None))
    return sorted(found, key=lambda f: -f.failed_at)


def _failure(job: Job, queue: str) -> Failure:
    """A failed job's facts from its meta, which Redis holds: a planted value is shown as it is, or as 0."""
    meta = job.meta if isinstance(job.meta, dict) else {}
    return Failure(
        job_id=job.id,
        queue=queue,
        post=str(meta.get("post", "?")),
        kind=str(meta.get("kind", "crash")),
        attempts=untrusted.whole(meta.get("attempts")),
        failed_at=untrusted.finite(meta.get("failed_at")),
        message=str(meta.get("error") or _last_line(job.exc_info)),
        job=job,
    )


def _name(value: Any) -> str:
    """An RQ status as people read it: `failed`, not `JobStatus.FAILED`."""
    return str(getattr(value, "value", value))


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def show(settings: Settings, redis: Redis, job_id: str) -> dict[str, Any] | None:
    """Everything known about one job: meta, status, error, traceback, raw reply."""
    job = next((j for j in Job.fetch_many([job_id], connection=redis, serializer=JSONSerializer) if j), None)
    if job is None:
        return None
    return {
        "job": job.id,
        "status": _name(job.get_status()),
        "queue": job.origin,
        "post": job.meta.get("post"),
        "kind": job.meta.get("kind"),
        "attempts": job.meta.get("attempts"),
        "retries_left": job.retries_left,
        "enqueued_at": str(job.enqueued_at),
        "started_at": str(job.started_at),
        "ended_at": str(job.ended_at),
        "error": job.meta.get("error"),
        "raw_reply": job.meta.get("raw_reply"),
        "traceback": job.meta.get("traceback") or job.exc_info,
    }


# What to do about a failed job, by kind: the fix, then the command that runs it again.
RETRY = "then `tagger failed retry {job}`"
NEXT_STEPS = {
    "auth": "fix the provider credentials (OPENAI_API_KEY) the workers use, " + RETRY,
    "quota": "top up the provider account, lift the pause with `tagger resume`, " + RETRY,
    "rate_limit": "the provider kept rate limiting: lower TAGGER_RPM/TAGGER_TPM or wait; " + RETRY,
    "unavailable": "the provider kept failing (see `tagger status`: last provider error); once it answers, " + RETRY,
    "timeout": "the provider kept timing out: raise TAGGER_REQUEST_TIMEOUT or wait until it is faster; " + RETRY,
    "job_timeout": "the job ran out of time (a slow provider, a huge taxonomy): see the error; " + RETRY,
    "invalid_reply": "the model's reply failed validation twice (raw_reply above): try another model or a "
    "smaller TAGGER_CHUNK_SIZE; " + RETRY,
    "refused": "the model refused the post (raw_reply above): check the post, or try another model; " + RETRY,
    "truncated": "the reply was cut off: lower TAGGER_CHUNK_SIZE (fewer terms per call); " + RETRY,
    "bad_post": "fix the post's front matter ({post}; `tagger classify --dry-run` shows the problem), " + RETRY,
    "post_too_large": "the post is over TAGGER_MAX_JOB_BYTES: raise it, or classify it with `tagger classify`",
    "post_missing": "the post is gone: nothing to do (`tagger failed purge` clears the list)",
    "post_read_only": "the post is locked (no write bit): make it writable if tagger should edit it, " + RETRY,
    "outside_root": "the post is outside the content root: check TAGGER_CONTENT_DIR on the workers",
    "not_a_post": "the file is not a post (TAGGER_POST_GLOBS, TAGGER_EXCLUDE): nothing to do, or fix the settings",
    "taxonomy_unpublished": "publish the taxonomy where it lives (`tagger taxonomy publish`), " + RETRY,
    "taxonomy": "fix the taxonomy the workers read (`tagger taxonomy check`), " + RETRY,
    "templates": "fix the prompt templates the workers read (TAGGER_PROMPTS_DIR), " + RETRY,
    "abandoned": "its worker died each time (killed, out of memory?): check the workers' memory and logs, " + RETRY,
    "foreign_job": "not tagger's job, never run: `tagger failed retry {job}` enqueues its post as a job of this "
    "version when it names one; `tagger failed purge` deletes it",
    "bad_job_id": "not a job at all, dropped from the queue: `tagger failed purge` clears it",
    "job_mode": "start a shared-folder worker where the site is (or enqueue the post with --remote), " + RETRY,
    "unreadable": "its data cannot be read: `tagger failed purge` deletes it",
}


def next_step(info: dict[str, Any]) -> str:
    """What to do next about a job `show` described: the fix for its failure kind and the command to run."""
    job, status = str(info.get("job")), str(info.get("status"))
    if status != "failed":
        return f"not failed but {status}: `tagger status` shows the queues, workers and retries waiting"
    kind, post = str(info.get("kind") or "crash"), str(info.get("post") or "?")
    default = "an unexpected error (traceback above): report it with the traceback, " + RETRY
    return NEXT_STEPS.get(kind, default).format(job=job, post=post)


def retry(settings: Settings, redis: Redis, job_ids: list[str] | None = None, kind: str | None = None) -> list[str]:
    """Requeue failed jobs: the ones named, or all (of one kind); returns the ids requeued."""
    wanted = set(job_ids or [])
    recover(settings, redis)  # a dead worker's job counts too once it is failed as abandoned
    done = []
    for failure in failures(settings, redis, kind):
        if (job_ids is not None and failure.job_id not in wanted) or failure.job is None:
            continue
        job = failure.job
        if failure.kind == "foreign_job":
            if _enqueue_again(settings, redis, failure):
                done.append(job.id)
            continue
        job.meta.update(kind=None, error=None, raw_reply=None, traceback=None, abandoned=0)
        job.retries_left = settings.job_retries or None
        job.save()
        FailedJobRegistry(name=failure.queue, connection=redis, serializer=JSONSerializer).requeue(job.id)
        with redis.pipeline() as pipe:
            track(settings, pipe, [job.id])
            pipe.execute()
        done.append(job.id)
    return done


def _enqueue_again(settings: Settings, redis: Redis, failure: Failure) -> bool:
    """A refused job is never run: when it names a post (an older tagger's job), enqueue that post as a job of
    this version (confined like any producer's path) and delete the refused one."""
    if failure.post == "?":
        return False
    priority = failure.queue.rsplit("-", 1)[-1]
    path = settings.content_root() / failure.post
    item = enqueue_posts([path], settings, redis, priority if priority in PRIORITIES else "default")[0]
    if item.action == "refused":
        return False
    if item.job_id == failure.job_id:
        return True  # the post's own id: its new job replaced the refused one
    FailedJobRegistry(name=failure.queue, connection=redis, serializer=JSONSerializer).remove(failure.job_id)
    if failure.job is not None:
        failure.job.delete(remove_from_queue=False)
    return True


def purge(settings: Settings, redis: Redis) -> int:
    """Delete every failed job (and the record of dropped queue entries); returns how many."""
    count = 0
    for failure in failures(settings, redis):
        if failure.kind == "bad_job_id":
            continue
        registry = FailedJobRegistry(name=failure.queue, connection=redis, serializer=JSONSerializer)
        try:
            registry.remove(failure.job or failure.job_id, delete_job=True)
        except ValueError:
            # RQ cannot delete a job whose last execution expired before its index entry (a killed worker's):
            # out of the failed list now, and its hash expires within a minute.
            registry.remove(failure.job_id)
            if failure.job is not None:
                failure.job.cleanup(ttl=60)
        count += 1
    count += redis.llen(keys.dropped(settings))
    redis.delete(keys.dropped(settings))
    return count


def awaiting_recovery(settings: Settings, redis: Redis) -> int:
    """Jobs whose worker died (heartbeats stopped, or taken from a queue and never started), not yet requeued."""
    expired = sum(len(StartedJobRegistry(queue=q).get_expired_job_ids()) for q in queues(settings, redis))
    return expired + redis.hlen(keys.orphans(settings))


def _worker(seen: SeenWorker) -> dict[str, Any]:
    return {
        "name": seen.worker.name,
        "host": seen.worker.hostname,
        "pid": seen.worker.pid,
        "state": seen.state if seen.alive else "silent",
        "last_state": seen.state,
        "job": seen.worker.get_current_job_id(),
        "heartbeat_age": round(seen.heartbeat_age, 1),
    }


RETRYING_READ = 500  # delayed retries read per queue for `status` (the soonest due; a remote job carries its post)


def retrying(settings: Settings, redis: Redis, reason_chars: int = 300) -> dict[str, dict[str, Any]]:
    """Per failure kind, the delayed retries waiting: how many, the reason of the one due first, and when.

    Job data read back from Redis is untrusted: kinds and reasons are cut to one bounded line.
    """
    found: dict[str, dict[str, Any]] = {}
    for queue in queues(settings, redis):
        registry = ScheduledJobRegistry(queue=queue)
        ids = registry.get_job_ids(0, RETRYING_READ - 1, cleanup=False)  # soonest due first
        timed: set[str] = set()  # kinds whose soonest job in this queue was looked at
        for job_id, job in zip(ids, Job.fetch_many(ids, connection=redis, serializer=JSONSerializer), strict=True):
            meta = job.meta if job is not None and isinstance(job.meta, dict) else {}
            kind = "".join(c for c in str(meta.get("kind") or "scheduled") if c.isalnum() or c == "_")[:40]
            seen = found.setdefault(kind, {"jobs": 0, "reason": "", "next_try": math.inf})
            seen["jobs"] += 1
            if kind in timed:
                continue
            timed.add(kind)
            try:
                due = registry.get_scheduled_time(job_id).timestamp()
            except NoSuchJobError:  # the scheduler took it meanwhile
                continue
            if due < seen["next_try"]:
                seen.update(next_try=due, reason=" ".join(str(meta.get("error") or "").split())[:reason_chars])
    return {kind: found[kind] for kind in sorted(found) if math.isfinite(found[kind]["next_try"])}


def queue_status(settings: Settings, redis: Redis, minutes: int = 5) -> dict[str, Any]:
    """Queue depths, running and scheduled jobs, workers, failures by kind, recent throughput and tokens."""
    recover(settings, redis)
    depth = {}
    for queue in queues(settings, redis):
        started = StartedJobRegistry(queue=queue)
        expired = len(started.get_expired_job_ids())
        depth[queue.name] = {
            "queued": queue.count,
            "running": started.get_job_count(cleanup=False) - expired,
            "awaiting_recovery": expired,
            "scheduled": ScheduledJobRegistry(queue=queue).count,
            "failed": FailedJobRegistry(queue=queue).count,
        }
    lost = redis.hlen(keys.orphans(settings))
    if lost:  # taken from a queue by a worker that died before starting; requeued after a short grace
        first = next(iter(depth.values()))
        first["awaiting_recovery"] += lost
    kinds: dict[str, int] = {}
    for failure in failures(settings, redis):
        kinds[failure.kind] = kinds.get(failure.kind, 0) + 1
    now = int(time.time() // 60)
    stats = {}
    for name in ("done", "tokens", "calls", "provider_errors"):
        names = [keys.stats(settings, name, m) for m in range(now - minutes + 1, now + 1)]
        stats[name] = sum(untrusted.whole(v) for v in redis.mget(names))
    provider_error = last_provider_error(settings, redis)
    seen = seen_workers(settings, redis)
    workers = [w for w in seen if w.alive]
    # A delayed retry waits too: only a worker's scheduler ever runs it.
    waiting = sum(d["queued"] + d["awaiting_recovery"] + d["scheduled"] for d in depth.values())
    throttle = RedisThrottle(settings, redis)
    pause_ms = redis.pttl(throttle.pause_key)
    reason = throttle.reason() if pause_ms > 0 else None
    return {
        "paused": {"reason": reason, "seconds": round(pause_ms / 1000, 1)} if reason else None,
        "queues": depth,
        "failed_by_kind": kinds,
        "retrying": retrying(settings, redis),
        "last_provider_error": provider_error.model_dump() if provider_error else None,
        "last_minutes": minutes,
        **stats,
        "workers": [_worker(w) for w in workers],
        # Killed workers linger in RQ until their entry expires: shown, never counted as running.
        "silent_workers": [_worker(w) for w in seen if not w.alive],
        "no_worker": bool(waiting and not workers),
    }
