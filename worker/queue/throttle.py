"""Rate limits shared by every worker through Redis, fed by the provider's rate-limit headers."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping

import structlog
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from redis import Redis, RedisError

from worker import untrusted
from worker.errors import RateLimited
from worker.logs import redact, secrets_of
from worker.queue import keys
from worker.settings import Settings

log = structlog.get_logger("tagger.throttle")
PROVIDER_ERROR_KEEP = 7 * 86400  # seconds the last provider error stays for `status`
MESSAGE_CHARS = 500


class ProviderErrorSeen(BaseModel):
    """The last failed provider request any worker saw, as `status` shows it (validated when read back)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: str = Field(pattern=r"^[a-z_]{1,40}$")
    message: str
    at: float = Field(ge=0)  # when, seconds since the epoch

    @field_validator("message")
    @classmethod
    def _one_line(cls, value: str) -> str:
        """One printable line, bounded: the stored text is untrusted (anyone with Redis access wrote it)."""
        return " ".join("".join(c if c.isprintable() else " " for c in value).split())[:MESSAGE_CHARS]

    @field_validator("at")
    @classmethod
    def _a_time(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("not a time")
        return value


def last_provider_error(settings: Settings, redis: Redis) -> ProviderErrorSeen | None:
    """The last provider error the fleet saw, or None; a stored value that is not one is reported as such."""
    raw = redis.get(keys.provider_error(settings))
    if raw is None:
        return None
    try:
        seen = ProviderErrorSeen.model_validate(untrusted.loads(raw))
    except (ValueError, TypeError, ValidationError) as exc:
        detail = str(exc).splitlines()[0]
        return ProviderErrorSeen(kind="unreadable", message=f"the stored provider error is not valid: {detail}", at=0)
    return seen.model_copy(update={"message": redact(seen.message, secrets_of(settings))})


def _seconds(value: str | None) -> float | None:
    """Parse '1.5', '20ms', '6m0s' or '1s' (OpenAI's reset headers) into seconds."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(value):
        ch = value[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if value[i : i + 2] == "ms" else ch
        if unit not in units or not number:
            return None
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total


class RedisThrottle:
    """Requests- and tokens-per-minute windows plus a shared pause, all in Redis."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.pause_key = keys.pause(settings)
        storage = RedisStorage(
            "redis://", connection_pool=redis.connection_pool, key_prefix=keys.limits_prefix(settings)
        )
        self.limiter = MovingWindowRateLimiter(storage)
        self.rpm = RateLimitItemPerMinute(settings.rpm) if settings.rpm else None
        self.tpm = RateLimitItemPerMinute(settings.tpm) if settings.tpm else None

    def pause(self, seconds: float, reason: str) -> None:
        """Make every worker hold its requests for `seconds` (never shortens a longer pause)."""
        ms = int(seconds * 1000)
        if ms <= 0 or self.redis.pttl(self.pause_key) >= ms:
            return
        self.redis.set(self.pause_key, reason, px=ms)
        log.warning("paused", reason=reason, seconds=round(seconds, 2))

    def resume(self) -> bool:
        """Lift the shared pause now (e.g. after topping up quota); True when there was one."""
        return bool(self.redis.delete(self.pause_key))

    def reason(self) -> str | None:
        """Why workers are paused now, or None."""
        value = self.redis.get(self.pause_key)
        return value.decode() if isinstance(value, bytes) else value

    def wait(self, tokens: int, deadline: float) -> None:
        """Wait for the shared pause and the RPM/TPM windows; RateLimited if that outlasts the deadline."""
        tokens = max(1, min(tokens, self.tpm.amount if self.tpm else tokens))
        while True:
            left = deadline - time.monotonic()
            pause_ms = self.redis.pttl(self.pause_key)
            if pause_ms > 0:
                reason = self.reason() or "paused"
                if pause_ms / 1000 > left:
                    raise RateLimited(f"provider paused for {pause_ms / 1000:.0f}s ({reason}); retry later")
                time.sleep(pause_ms / 1000)
                continue
            ok = (self.rpm is None or self.limiter.test(self.rpm, "rpm")) and (
                self.tpm is None or self.limiter.test(self.tpm, "tpm", cost=tokens)
            )
            if ok:
                if self.rpm:
                    self.limiter.hit(self.rpm, "rpm")
                if self.tpm:
                    self.limiter.hit(self.tpm, "tpm", cost=tokens)
                return
            resets = [
                self.limiter.get_window_stats(item, name).reset_time
                for item, name in ((self.rpm, "rpm"), (self.tpm, "tpm"))
                if item is not None
            ]
            sleep = max(0.05, min(resets) - time.time()) if resets else 0.05
            if sleep > left:
                raise RateLimited(
                    f"local rate limit (rpm {self.settings.rpm}, tpm {self.settings.tpm}) outlasts the deadline"
                )
            time.sleep(min(sleep, 1.0))

    def failed(self, kind: str, message: str) -> None:
        """Keep the last failed request for `status` and count it this minute; Redis trouble is not the caller's."""
        now = time.time()
        note = {"kind": kind, "message": redact(message, secrets_of(self.settings))[:MESSAGE_CHARS], "at": now}
        counter = keys.stats(self.settings, "provider_errors", int(now // 60))
        with contextlib.suppress(RedisError), self.redis.pipeline() as pipe:
            pipe.set(keys.provider_error(self.settings), json.dumps(note), ex=PROVIDER_ERROR_KEEP)
            pipe.incr(counter)
            pipe.expire(counter, 3 * 3600)
            pipe.execute()

    def observe(self, status: int, headers: Mapping[str, str], quota: bool = False) -> None:
        """Pause everyone on exhausted quota, on 429, or when the provider says nothing is left."""
        if quota:
            self.pause(self.settings.quota_pause, "quota exhausted")
            return
        if status == 429:
            # Remembered so that a job timing out while the provider throttled counts as transient.
            self.redis.set(keys.last_rate_limit(self.settings), str(time.time()), ex=86400)
            after = _seconds(headers.get("retry-after")) or 1.0
            self.pause(min(after, self.settings.retry_max_wait), "rate limited (429)")
            return
        for kind in ("requests", "tokens"):
            if headers.get(f"x-ratelimit-remaining-{kind}") == "0":
                reset = _seconds(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.pause(min(reset, self.settings.retry_max_wait), f"no {kind} left this window")
