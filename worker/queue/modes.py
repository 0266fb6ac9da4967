"""The structured-output mode each endpoint accepts, remembered in Redis so a fleet probes once."""

from __future__ import annotations

import hashlib

import structlog
from redis import Redis, RedisError

from worker.providers.modes import valid_mode
from worker.queue import keys
from worker.settings import Settings

log = structlog.get_logger("tagger.modes")
# A server upgrade may start accepting a stricter mode: ask again after a week.
MODE_TTL = 7 * 86400


class RedisModeMemory:
    """One key per endpoint under TAGGER_REDIS_PREFIX; what is read back is checked like any reply."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis

    def _key(self, endpoint: str) -> str:
        return keys.structured_mode(self.settings, hashlib.sha256(endpoint.encode("utf-8")).hexdigest()[:16])

    def recall(self, endpoint: str) -> str | None:
        """The mode remembered for `endpoint`, or None (also when Redis cannot be read: then tagger probes)."""
        try:
            return valid_mode(self.redis.get(self._key(endpoint)))
        except RedisError:
            return None

    def remember(self, endpoint: str, mode: str) -> None:
        """Remember the mode for a week; Redis trouble only costs a probe next time."""
        try:
            self.redis.set(self._key(endpoint), mode, ex=MODE_TTL)
        except RedisError as exc:
            log.warning("structured_mode_not_saved", error=type(exc).__name__)
