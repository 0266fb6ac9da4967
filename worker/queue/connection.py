"""The connection to Redis and the queues' priorities: what a command needs before it touches any key."""

from __future__ import annotations

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as RedisRetry

from worker.settings import Settings

PRIORITIES = ("high", "default", "low")


def connect(settings: Settings) -> Redis:
    """A Redis connection for the configured URL (`rediss://` for TLS, password in the URL).

    Each command is retried a few times on connection errors, timeouts and `LOADING` (a restarting Redis),
    so a short blip costs a pause, not an exception; longer outages are handled by the callers' loops.
    """
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry=RedisRetry(ExponentialBackoff(cap=2.0, base=0.1), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, BusyLoadingError],
    )
