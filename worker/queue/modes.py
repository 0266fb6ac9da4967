"""The structured-output mode each endpoint accepts, remembered in Redis so a fleet probes once.

What Redis holds is untrusted. The value is a JSON object, the mode and when it lapses, signed with
TAGGER_SIGNING_KEY when that is set and bound to its endpoint (base URL and model): with the key, a value someone
wrote into Redis (a weaker mode, say, so that no server enforces the reply's schema), one copied from another
endpoint or replayed after its week is ignored, and tagger probes again, saying so once.
"""

from __future__ import annotations

import hashlib
import json
import time

import structlog
from redis import Redis, RedisError

from worker import untrusted
from worker.errors import TaggerError
from worker.providers.modes import valid_mode
from worker.queue import keys
from worker.settings import Settings
from worker.signing import sign, verify

log = structlog.get_logger("tagger.modes")
# A server upgrade may start accepting a stricter mode: ask again after a week.
MODE_TTL = 7 * 86400


class RedisModeMemory:
    """One key per endpoint under TAGGER_REDIS_PREFIX; what is read back is checked like any reply."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._ignored: set[str] = set()  # endpoints whose refused value was already logged

    def _key(self, endpoint: str) -> str:
        return keys.structured_mode(self.settings, hashlib.sha256(endpoint.encode("utf-8")).hexdigest()[:16])

    def recall(self, endpoint: str) -> str | None:
        """The mode remembered for `endpoint`, or None: also when Redis cannot be read or holds a value tagger did
        not write for this endpoint (then tagger probes)."""
        try:
            raw = self.redis.get(self._key(endpoint))
        except RedisError:
            return None
        if raw is None:
            return None
        try:
            data = verify(self.settings, "mode", endpoint, untrusted.loads(raw))
        except (ValueError, TaggerError) as exc:
            self._ignore(endpoint, str(exc))
            return None
        mode, until = valid_mode(data.get("mode")), data.get("until")
        if mode is None or not isinstance(until, int) or until < time.time():
            self._ignore(endpoint, "not a mode" if mode is None else "lapsed: kept past its week")
            return None
        return mode

    def _ignore(self, endpoint: str, reason: str) -> None:
        """Log a refused value once per endpoint (each recall would otherwise repeat it)."""
        if endpoint not in self._ignored:
            self._ignored.add(endpoint)
            log.warning("structured_mode_ignored", endpoint=endpoint, reason=reason[:200], note="probing again")

    def remember(self, endpoint: str, mode: str) -> None:
        """Remember the mode for a week; Redis trouble only costs a probe next time."""
        value = sign(self.settings, "mode", endpoint, {"mode": mode, "until": int(time.time()) + MODE_TTL})
        try:
            self.redis.set(self._key(endpoint), json.dumps(value), ex=MODE_TTL)
        except RedisError as exc:
            log.warning("structured_mode_not_saved", error=type(exc).__name__)
