"""Recovery: jobs of dead workers, jobs lost between dequeue and start, and overdue delayed retries.

Liveness is RQ's own: a running job's execution entry in the StartedJobRegistry is kept alive by the worker's
heartbeats; an entry that expires belongs to a dead worker, and `StartedJobRegistry.cleanup()` hands the job
to tagger's failure callback (`AbandonedJobError`) and retries it. What RQ cannot see is a job a worker
popped from a queue (BLPOP, on several queues) and died before starting: it stays `queued` in no list. Tagger
keeps an index of the job ids it enqueued and sweeps it for such jobs.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import structlog
from redis import Redis
from redis.exceptions import LockError
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from worker.queue import keys
from worker.queue.keys import queues
from worker.settings import Settings

log = structlog.get_logger("tagger.recovery")
ENDED = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


@dataclass
class Recovered:
    """What one recovery pass did."""

    abandoned: list[str] = field(default_factory=list)  # running jobs of dead workers, handed to RQ's cleanup
    lost: list[str] = field(default_factory=list)  # jobs taken from a queue by a worker that died before starting
    promoted: list[str] = field(default_factory=list)  # delayed retries overdue while no scheduler ran
    skipped: bool = False  # another process was recovering at that moment

    @property
    def count(self) -> int:
        """How many jobs went back to work (or to the failed list)."""
        return len(self.abandoned) + len(self.lost) + len(self.promoted)


def lost_grace(settings: Settings) -> float:
    """Seconds a job must stay `queued` in no queue before it counts as lost (a live worker starts it in ms)."""
    return max(5.0, min(30.0, 2 * settings.lease_seconds))


def recover(settings: Settings, redis: Redis, sweep: bool = True) -> Recovered:
    """One recovery pass, by one process at a time across the fleet; RedisError propagates to the caller."""
    lock = redis.lock(keys.reaper_lock(settings), timeout=120, blocking=False)
    if not lock.acquire(blocking=False):
        return Recovered(skipped=True)
    try:
        done = Recovered(abandoned=reap_abandoned(settings, redis), promoted=promote_overdue(settings, redis))
        # One sweep per quarter grace across the fleet, except when a job seen lost has served its grace: then
        # it is requeued now, not at the next sweep (the figure the README gives).
        due = orphan_due(settings, redis)
        overdue = due is not None and due <= time.time()
        if sweep and (overdue or redis.set(keys.sweep_due(settings), "1", nx=True, px=int(lost_grace(settings) * 250))):
            done.lost = sweep_lost(settings, redis)
        return done
    finally:
        with contextlib.suppress(LockError):  # it expired meanwhile: nothing to release
            lock.release()


def orphan_due(settings: Settings, redis: Redis) -> float | None:
    """When the first job seen lost will have stayed lost for its grace (epoch seconds), or None."""
    now = time.time()
    # Not a time tagger wrote (Redis is untrusted input): the sweep marks it seen now.
    seen = [t for t in map(_time, redis.hvals(keys.orphans(settings))) if math.isfinite(t) and t <= now]
    return min(seen) + lost_grace(settings) if seen else None


def reap_abandoned(settings: Settings, redis: Redis) -> list[str]:
    """Hand running jobs whose heartbeats stopped to RQ's cleanup: retried, or failed as `abandoned`."""
    found = []
    for queue in queues(settings, redis):
        # The failure callback runs here, maybe outside the main thread: a timer, not SIGALRM, bounds it.
        registry = StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty)
        expired = registry.get_expired_job_ids()
        if expired:
            registry.cleanup()
            found += expired
    return found


def promote_overdue(settings: Settings, redis: Redis, grace: float = 5.0) -> list[str]:
    """Enqueue delayed retries that are overdue: RQ's scheduler may be down with a dead worker for a while."""
    promoted = []
    for queue in queues(settings, redis):
        registry = ScheduledJobRegistry(queue=queue)
        for job_id in registry.get_jobs_to_schedule(int(time.time() - grace)):
            if not registry.remove(job_id):
                continue  # the scheduler took it
            job = queue.fetch_job(job_id)
            if job is not None:
                queue.enqueue_job(job)
                promoted.append(job_id)
                log.info("promoted", job_id=job_id, post=job.meta.get("post"))
    return promoted


def track(settings: Settings, pipe: Redis, job_ids: list[str]) -> None:
    """Add job ids to the index of jobs tagger enqueued (in the caller's pipeline)."""
    if job_ids:
        now = time.time()
        pipe.zadd(keys.pending_index(settings), dict.fromkeys(job_ids, now))


def sweep_lost(settings: Settings, redis: Redis) -> list[str]:
    """Requeue jobs that stayed `queued` (or `started`) in no queue and no registry for `lost_grace` seconds."""
    index = keys.pending_index(settings)
    ids = [_text(i) for i in redis.zrange(index, 0, -1) if isinstance(i, bytes | str)]
    if not ids:
        return []
    mine = queues(settings, redis)
    listed: set[str] = set()
    started: set[str] = set()
    scheduled: set[str] = set()
    for queue in mine:
        listed.update(queue.get_job_ids())
        started.update(StartedJobRegistry(queue=queue).get_job_ids(cleanup=False))
        scheduled.update(ScheduledJobRegistry(queue=queue).get_job_ids(cleanup=False))
    ended, lost = [], []
    for job_id, job in zip(ids, Job.fetch_many(ids, connection=redis, serializer=JSONSerializer), strict=True):
        status = job.get_status(refresh=False) if job is not None else None
        if job is None or status is None or status in ENDED:
            ended.append(job_id)
        elif (
            (status == JobStatus.QUEUED and job_id not in listed and job_id not in started)
            or (status == JobStatus.STARTED and job_id not in started)
            or (status == JobStatus.SCHEDULED and job_id not in scheduled)
        ):
            lost.append(job)
    if ended:
        redis.zrem(index, *ended)
    seen = {_text(k): _time(v) for k, v in redis.hgetall(keys.orphans(settings)).items()}
    now = time.time()
    requeued = []
    for job in lost:
        first = seen.pop(job.id, None)
        if first is None:
            redis.hsetnx(keys.orphans(settings), job.id, str(now))
        elif not math.isfinite(first) or first > now:  # not a time we wrote (Redis is untrusted): seen now
            redis.hset(keys.orphans(settings), job.id, str(now))
        elif now - first >= lost_grace(settings) and redis.hdel(keys.orphans(settings), job.id):
            queue = Queue(job.origin, connection=redis, serializer=JSONSerializer)
            queue.intermediate_queue.remove(job.id)  # a single-queue worker's LMOVE leaves it there
            job.meta["lost"] = int(job.meta.get("lost", 0)) + 1
            job.save_meta()
            queue.enqueue_job(job)
            requeued.append(job.id)
            log.warning("recovered", job_id=job.id, post=job.meta.get("post"), reason="lost between dequeue and start")
    if seen:  # no longer orphaned (started, or ended)
        redis.hdel(keys.orphans(settings), *seen)
    return requeued


def _time(value: bytes | str) -> float:
    """A first-seen time read back from Redis, or NaN when it is not a number (planted, damaged)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def pending(settings: Settings, redis: Redis) -> int:
    """Jobs waiting in the queues or due from the scheduled registries (what a burst worker must not leave)."""
    count = 0
    for queue in queues(settings, redis):
        count += queue.count + len(ScheduledJobRegistry(queue=queue).get_jobs_to_schedule(int(time.time())))
    return count
