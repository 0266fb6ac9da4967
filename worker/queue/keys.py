"""Tagger's queues in Redis: their names, the connection, and what may run on them."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from worker.settings import Settings

PRIORITIES = ("high", "default", "low")
# The only function and callback a tagger worker runs; anything else found on the queues is refused.
JOB_FUNCTION = "worker.queue.jobs.classify_job"
FAILURE_CALLBACK = "worker.queue.jobs.on_failure"


def connect(settings: Settings) -> Redis:
    """A Redis connection for the configured URL (`rediss://` for TLS, password in the URL)."""
    return Redis.from_url(settings.redis_url)


def queue_names(settings: Settings) -> list[str]:
    """Queue names in priority order."""
    return [f"{settings.redis_prefix}-{p}" for p in PRIORITIES]


def queues(settings: Settings, redis: Redis) -> list[Queue]:
    """The queues, highest priority first, with RQ's JSON serializer (never pickle)."""
    return [Queue(name, connection=redis, serializer=JSONSerializer) for name in queue_names(settings)]


def redis_key(settings: Settings, *parts: str) -> str:
    """A key of tagger's own (leases, pause, stats), under its prefix."""
    return ":".join([settings.redis_prefix, *parts])
