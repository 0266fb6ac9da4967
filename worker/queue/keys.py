"""Tagger's queues in Redis: their names, what may run on them, and every key tagger owns.

RQ's own keys (jobs, queues, registries, workers) are reached only through RQ's API; the keys below are
tagger's, all under `TAGGER_REDIS_PREFIX`, and this module is the only place their names are spelled.
"""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from worker.queue.connection import PRIORITIES
from worker.settings import Settings

# The only function and callback a tagger worker runs; anything else found on the queues is refused.
JOB_FUNCTION = "worker.queue.jobs.classify_job"
REMOTE_FUNCTION = "worker.queue.remote.classify_remote"  # a self-contained job (TAGGER_JOB_MODE=remote)
JOB_FUNCTIONS = (JOB_FUNCTION, REMOTE_FUNCTION)
FAILURE_CALLBACK = "worker.queue.jobs.on_failure"


def queue_name(settings: Settings, priority: str) -> str:
    """The queue of one priority."""
    return f"{settings.redis_prefix}-{priority}"


def queue_names(settings: Settings) -> list[str]:
    """Queue names in priority order."""
    return [queue_name(settings, p) for p in PRIORITIES]


def queues(settings: Settings, redis: Redis) -> list[Queue]:
    """The queues, highest priority first, with RQ's JSON serializer (never pickle)."""
    return [Queue(name, connection=redis, serializer=JSONSerializer) for name in queue_names(settings)]


def redis_key(settings: Settings, *parts: str) -> str:
    """A key of tagger's own, under its prefix (use the named helpers below)."""
    return ":".join([settings.redis_prefix, *parts])


def pending_index(settings: Settings) -> str:
    """Sorted set of the job ids tagger enqueued and has not seen end (score: when enqueued)."""
    return redis_key(settings, "jobs")


def orphans(settings: Settings) -> str:
    """Hash: job id -> when it was first seen `queued` in no queue (lost between dequeue and start)."""
    return redis_key(settings, "orphans")


def reaper_lock(settings: Settings) -> str:
    """Lock held by the one process recovering jobs at a time (no job requeued twice)."""
    return redis_key(settings, "reaper")


def sweep_due(settings: Settings) -> str:
    """Set while the last sweep for lost jobs is recent: one sweep per interval across the fleet."""
    return redis_key(settings, "swept")


def rerun(settings: Settings, job_id: str) -> str:
    """Set when a producer asked for a post again while its job ran: run once more after it."""
    return redis_key(settings, "rerun", job_id)


def judged_chunks(settings: Settings, job_id: str) -> str:
    """Hash of a remote job's judgements so far (`type\0term` -> judgement JSON): its retry asks only the rest."""
    return redis_key(settings, "judged", job_id)


def stats(settings: Settings, name: str, minute: int) -> str:
    """Per-minute counter (done, tokens, calls)."""
    return redis_key(settings, "stats", name, str(minute))


def pause(settings: Settings) -> str:
    """The shared pause every worker honours before calling the provider (value: the reason)."""
    return redis_key(settings, "pause")


def last_rate_limit(settings: Settings) -> str:
    """When the provider last rate limited anyone (a job timing out after that is transient)."""
    return redis_key(settings, "rate-limited-at")


def provider_error(settings: Settings) -> str:
    """The last failed provider request any worker saw (JSON: kind, message without secrets, when)."""
    return redis_key(settings, "provider-error")


def limits_prefix(settings: Settings) -> str:
    """Prefix of the `limits` library's moving windows."""
    return redis_key(settings, "limits")


def dropped(settings: Settings) -> str:
    """List of entries found on the queues that were not jobs at all (odd ids), newest first, capped."""
    return redis_key(settings, "dropped")


def batch_index_key(settings: Settings, site: str) -> str:
    """The sorted set of one site's (checkout's) Batch API batches (score: creation time)."""
    return redis_key(settings, "batches", site)


def batch_key(settings: Settings, site: str, batch_id: str, part: str = "state") -> str:
    """One batch's state (`state`: what it holds) or its collection log (`collected`: post -> outcome), per site.

    Keyed to the site: two checkouts or two sites on one prefix never see (or hide) each other's posts, even
    when their providers' batch ids repeat.
    """
    return redis_key(settings, "batch", site, batch_id, part)


def taxonomy(settings: Settings, version: str) -> str:
    """A published taxonomy (terms and prompt templates) as JSON, content-addressed by its version."""
    return redis_key(settings, "taxonomy", version)


def structured_mode(settings: Settings, endpoint_digest: str) -> str:
    """The structured-output mode an endpoint (base URL and model, hashed) accepts, learnt by one worker for all."""
    return redis_key(settings, "structured", endpoint_digest)
