"""Recovery: jobs of dead workers and delayed retries whose scheduler died are put back on the queues."""

from __future__ import annotations

import time

import structlog
from redis import Redis
from rq.job import JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from worker.queue.keys import queues, redis_key
from worker.settings import Settings

log = structlog.get_logger("tagger.recovery")


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
            if redis.exists(redis_key(settings, "lease", job_id)):
                continue
            job = queue.fetch_job(job_id)
            if job is None or job.get_status() != JobStatus.STARTED:
                continue
            if job.started_at and time.time() - job.started_at.timestamp() < settings.lease_seconds:
                continue  # just started: the lease may not be set yet
            entries = [e.decode() for e in redis.zrange(registry.key, 0, -1) if isinstance(e, bytes)]
            stale = [e for e in entries if e.startswith(f"{job_id}:")]  # entries are "<job id>:<execution id>"
            if not stale or not redis.zrem(registry.key, *stale):
                continue  # another worker's reaper claimed it first
            abandoned = int(job.meta.get("abandoned", 0)) + 1
            job.meta.update(
                abandoned=abandoned, kind="abandoned", error="worker died while running the job", failed_at=time.time()
            )
            job.save_meta()
            if abandoned <= settings.abandoned_requeues:
                queue.enqueue_job(job)
                log.warning("retried", job_id=job_id, post=job.meta.get("post"), kind="abandoned", attempt=abandoned)
            else:
                job.set_status(JobStatus.FAILED)
                FailedJobRegistry(queue=queue).add(job, exc_string="abandoned: worker died while running the job")
                log.warning("failed", job_id=job_id, post=job.meta.get("post"), kind="abandoned", attempt=abandoned)
            recovered.append(job_id)
    return recovered
