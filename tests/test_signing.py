"""Signing (TAGGER_SIGNING_KEY): HMAC-SHA256 over canonical JSON, bound to a purpose and a context, never shown."""

from __future__ import annotations

import hmac
import io
import json
import time
from typing import Any

import pytest
import redis as redis_lib
import structlog

from worker.errors import BadSignature
from worker.logs import configure, secrets_of
from worker.queue.modes import MODE_TTL, RedisModeMemory
from worker.settings import Settings
from worker.signing import SIGNATURE, canonical, sign, sign_text, verify, verify_text

KEY = "signing-key-for-tests-0123456789"
DATA = {"post": "posts/a.md", "bytes": "LS0tCg==", "types": None, "n": 3, "ü": "é"}


def settings(key: str | None = KEY, **more: str) -> Settings:
    values: dict[str, Any] = {"TAGGER_SIGNING_KEY": key, **more} if key else more
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_canonical_bytes_do_not_depend_on_key_order_or_spacing() -> None:
    assert canonical({"b": 1, "a": [1, 2]}) == canonical(json.loads('{ "a" : [1,2], "b":1 }')) == b'{"a":[1,2],"b":1}'


def test_a_signed_value_verifies_and_comes_back_without_its_signature() -> None:
    signed = sign(settings(), "job", "post-1", DATA)
    assert signed[SIGNATURE].startswith("hmac-sha256:") and KEY not in json.dumps(signed)
    assert verify(settings(), "job", "post-1", json.loads(json.dumps(signed))) == DATA


@pytest.mark.parametrize(
    "change",
    [
        lambda s: {**s, "post": "posts/b.md"},  # a field altered
        lambda s: {**s, "extra": 1},  # a field added
        lambda s: {k: v for k, v in s.items() if k != "types"},  # a field dropped
        lambda s: {k: v for k, v in s.items() if k != SIGNATURE},  # the signature dropped
        lambda s: {**s, SIGNATURE: s[SIGNATURE][:-1] + ("0" if s[SIGNATURE][-1] != "0" else "1")},
        lambda s: {**s, SIGNATURE: 12},
    ],
)
def test_anything_altered_or_unsigned_is_refused(change: Any) -> None:
    signed = sign(settings(), "job", "post-1", DATA)
    with pytest.raises(BadSignature):
        verify(settings(), "job", "post-1", change(signed))


def test_a_signature_is_bound_to_its_purpose_context_and_key() -> None:
    signed = sign(settings(), "result", "post-1", DATA)
    for purpose, context, key in (("job", "post-1", KEY), ("result", "post-2", KEY), ("result", "post-1", KEY + "x")):
        with pytest.raises(BadSignature):
            verify(settings(key), purpose, context, signed)  # type: ignore[arg-type]


def test_without_a_key_nothing_is_signed_and_values_pass_to_validation() -> None:
    assert sign(settings(None), "job", "post-1", DATA) == DATA
    assert verify(settings(None), "job", "post-1", {**DATA, SIGNATURE: "anything"}) == DATA
    with pytest.raises(BadSignature):
        verify(settings(None), "job", "post-1", ["not", "an", "object"])


def test_texts_are_signed_and_checked_as_json_objects() -> None:
    text = sign_text(settings(), "judgement", "post-1", json.dumps(DATA))
    assert json.loads(verify_text(settings(), "judgement", "post-1", text.encode())) == DATA
    for bad in ("{not json", json.dumps(DATA), text.replace("posts/a.md", "posts/b.md")):
        with pytest.raises(BadSignature):
            verify_text(settings(), "judgement", "post-1", bad)


def test_the_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    verify(settings(), "job", "post-1", sign(settings(), "job", "post-1", DATA))
    assert len(seen) == 1


def test_the_signing_key_is_a_secret_never_logged_or_shown() -> None:
    configured = settings()
    assert KEY in secrets_of(configured)
    assert KEY not in repr(configured) and KEY not in str(configured.model_dump())
    stream = io.StringIO()
    configure(configured.model_copy(update={"log_format": "json"}), stream=stream)
    structlog.get_logger("t").info("event", detail=f"key is {KEY}")
    assert KEY not in stream.getvalue() and "***" in stream.getvalue()


# --- the structured-output mode remembered per endpoint (worker/queue/modes.py) ------------------------------

ENDPOINT = "http://127.0.0.1:9/v1|fake-model"


@pytest.mark.redis
def test_the_remembered_structured_mode_is_signed_and_bound_to_its_endpoint(
    redis: redis_lib.Redis, redis_prefix: str
) -> None:
    memory = RedisModeMemory(settings(TAGGER_REDIS_PREFIX=redis_prefix), redis)
    memory.remember(ENDPOINT, "json_object")
    stored = json.loads(redis.get(memory._key(ENDPOINT)) or b"")
    assert stored["mode"] == "json_object" and stored[SIGNATURE].startswith("hmac-sha256:")
    assert KEY not in json.dumps(stored) and 0 < redis.ttl(memory._key(ENDPOINT)) <= MODE_TTL
    # Another worker (another memory, the same key) trusts it.
    assert RedisModeMemory(settings(TAGGER_REDIS_PREFIX=redis_prefix), redis).recall(ENDPOINT) == "json_object"


@pytest.mark.redis
def test_a_forged_or_tampered_structured_mode_is_ignored_and_logged_once(
    redis: redis_lib.Redis, redis_prefix: str
) -> None:
    honest = RedisModeMemory(settings(TAGGER_REDIS_PREFIX=redis_prefix), redis)
    key = honest._key(ENDPOINT)
    later = int(time.time()) + MODE_TTL
    honest.remember(ENDPOINT, "json_object")
    signed = json.loads(redis.get(key) or b"")
    RedisModeMemory(settings(KEY + "x", TAGGER_REDIS_PREFIX=redis_prefix), redis).remember(ENDPOINT, "prompt")
    by_another_key = redis.get(key)
    honest.remember("http://127.0.0.1:9/v1|another-model", "prompt")
    forgeries = {
        "a bare mode": "prompt",
        "unsigned": json.dumps({"mode": "prompt", "until": later}),
        "signed with another key": by_another_key,
        "another endpoint's": redis.get(honest._key("http://127.0.0.1:9/v1|another-model")),
        "altered": json.dumps({**signed, "mode": "prompt"}),
        "lapsed": json.dumps(sign(settings(), "mode", ENDPOINT, {"mode": "prompt", "until": int(time.time()) - 1})),
        "not a mode": json.dumps(sign(settings(), "mode", ENDPOINT, {"mode": "pickle", "until": later})),
        "not JSON": b"pickle\x80",
        "nested too deeply": "[" * 100_000 + "]" * 100_000,  # a RecursionError, not a ValueError, from json
    }
    for name, value in forgeries.items():
        assert value, name
        redis.set(key, value)
        memory = RedisModeMemory(settings(TAGGER_REDIS_PREFIX=redis_prefix), redis)
        with structlog.testing.capture_logs() as logs:
            assert memory.recall(ENDPOINT) is None, name  # tagger probes again
            assert memory.recall(ENDPOINT) is None, name
        ignored = [e for e in logs if e["event"] == "structured_mode_ignored"]
        assert len(ignored) == 1 and ignored[0]["endpoint"] == ENDPOINT, (name, logs)
    # What the probe settles is remembered again, signed, and trusted.
    honest.remember(ENDPOINT, "json_object")
    assert RedisModeMemory(settings(TAGGER_REDIS_PREFIX=redis_prefix), redis).recall(ENDPOINT) == "json_object"
