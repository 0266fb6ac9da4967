"""Cancelling: queued jobs taken back off the queues (a running job finishes; its rerun request is dropped)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from redis.exceptions import WatchError
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from worker.errors import TaggerError, UsageError
from worker.paths import confine
from worker.queue import keys
from worker.queue.connection import PRIORITIES
from worker.queue.enqueue import job_id_for
from worker.queue.keys import queue_name
from worker.settings import Settings


@dataclass(frozen=True)
class Cancelled:
    """What `cancel` did with one job (or one target that named no job)."""

    target: str  # the job id or post as given
    job_id: str  # "" when the target names no job
    post: str
    action: str  # cancelled | running | not-waiting
    detail: str = ""


def cancel(
    settings: Settings,
    redis: Redis,
    targets: Sequence[str] = (),
    everything: bool = False,
    priorities: Sequence[str] | None = None,
) -> list[Cancelled]:
    """Take queued jobs (waiting on a queue or for a delayed retry) off the queues; a running job finishes.

    `targets` are job ids or posts (a post's jobs: its first and rerun ids, and its remote jobs); `everything`
    takes every waiting job of the queues of `priorities` (default: all). A post's running job is left to
    finish, but a rerun asked for while it runs is dropped. Each job is cancelled in a transaction that sees
    a worker take it meanwhile (then it is running, not cancelled).
    """
    if bool(targets) == everything:
        raise UsageError("name the jobs or posts to cancel, or cancel --all")
    chosen = [queue_name(settings, p) for p in (priorities or PRIORITIES)]
    waiting: dict[str, Queue] = {}  # job id -> its queue, for every waiting job of the chosen queues
    running: dict[str, Queue] = {}
    for name in chosen:
        queue = Queue(name, connection=redis, serializer=JSONSerializer)
        for job_id in [*queue.get_job_ids(), *ScheduledJobRegistry(queue=queue).get_job_ids(cleanup=False)]:
            waiting.setdefault(job_id, queue)
        for job_id in StartedJobRegistry(queue=queue).get_job_ids(cleanup=False):
            running.setdefault(job_id, queue)
    done: list[Cancelled] = []
    if everything:
        for job_id, queue in waiting.items():
            done.append(_cancel_one(redis, queue, job_id, job_id))
        return done
    for target in targets:
        ids = _ids_of(settings, target, [*waiting, *running])
        if not ids:
            done.append(Cancelled(target, "", _post_of(settings, target), "not-waiting", "no queued or running job"))
        for job_id in ids:
            if job_id in waiting:
                done.append(_cancel_one(redis, waiting[job_id], job_id, target))
            else:
                dropped = bool(redis.delete(keys.rerun(settings, job_id)))
                detail = "it finishes" + ("; the rerun asked for meanwhile is dropped" if dropped else "")
                done.append(Cancelled(target, job_id, _post(redis, job_id), "running", detail))
    return done


def _ids_of(settings: Settings, target: str, known: list[str]) -> list[str]:
    """The known job ids a target names: itself, or a post's (its id, its rerun's, its remote jobs')."""
    if target in known:
        return [target]
    try:
        relative = confine(target, settings)
    except TaggerError:
        return []
    base = job_id_for(relative, settings)
    return [j for j in dict.fromkeys(known) if j == base or j.startswith(base + "-")]


def _post_of(settings: Settings, target: str) -> str:
    try:
        return confine(target, settings)
    except TaggerError:
        return Path(target).as_posix() if "/" in target or target.endswith(".md") else "?"


def _post(redis: Redis, job_id: str) -> str:
    job = Job.fetch_many([job_id], connection=redis, serializer=JSONSerializer)[0]
    post = job.meta.get("post") if job is not None and isinstance(job.meta, dict) else None
    return str(post)[:1000] if post else "?"


def _cancel_one(redis: Redis, queue: Queue, job_id: str, target: str) -> Cancelled:
    """Cancel one waiting job atomically: if a worker took it meanwhile, it runs and is reported running."""
    scheduled = ScheduledJobRegistry(queue=queue)
    while True:
        with redis.pipeline() as pipe:
            try:
                pipe.watch(Job.key_for(job_id), queue.key, scheduled.key)
                listed = pipe.lpos(queue.key, job_id) is not None or pipe.zscore(scheduled.key, job_id) is not None
                if not listed:
                    return Cancelled(target, job_id, _post(redis, job_id), "running", "a worker took it: it finishes")
                job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
                post = str(job.meta.get("post") or "?")[:1000] if isinstance(job.meta, dict) else "?"
                pipe.multi()
                scheduled.remove(job_id, pipeline=pipe)
                job.cancel(pipeline=pipe)
                pipe.execute()
                return Cancelled(target, job_id, post, "cancelled")
            except WatchError:
                continue  # a worker or producer changed the job or its queue meanwhile: look again
            except (NoSuchJobError, InvalidJobOperation) as exc:
                return Cancelled(target, job_id, "?", "not-waiting", f"{type(exc).__name__}: {exc}"[:300])
