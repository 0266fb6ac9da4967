"""Values tagger did not just write (Redis values, replies, record files): JSON nested too deeply is refused as any
malformed value is, never a RecursionError that escapes the refusal and crashes the job or the command; counters
and times are numbers or 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_lib

from worker.errors import BadSignature, TaxonomyTampered
from worker.settings import Settings

DEEP = "[" * 100_000 + "]" * 100_000


def settings(**values: str) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_a_reply_nested_too_deeply_is_an_invalid_reply_to_ask_again() -> None:
    from worker.reply import parse_reply

    parsed = parse_reply(DEEP, (("tags", ("Kanban",)),))
    assert parsed.judgements == [] and "nested too deeply" in str(parsed.error)


def test_a_record_file_nested_too_deeply_counts_as_damaged(tmp_path: Path) -> None:
    from worker.records import Record, RecordStore

    post = tmp_path / "p.md"
    post.write_text("---\ntitle: p\n---\nbody\n", encoding="utf-8")
    store = RecordStore(settings(TAGGER_CONTENT_DIR=str(tmp_path)))
    store.path_for(post).write_text(DEEP, encoding="utf-8")
    assert store.load(post) == Record()  # an empty record: a re-judgement, as for any damaged record


@pytest.mark.parametrize("key", ["", "s6-signing-key-0123456789abcdef"])
def test_a_signed_value_or_published_taxonomy_nested_too_deeply_is_refused(key: str) -> None:
    from worker.queue.payload import check_published
    from worker.signing import verify_text

    values = {"TAGGER_SIGNING_KEY": key} if key else {}
    with pytest.raises(BadSignature, match="nested too deeply"):
        verify_text(settings(**values), "judgement", "job-1", DEEP)
    with pytest.raises(TaxonomyTampered, match="nested too deeply"):
        check_published(settings(**values), "v1", DEEP)


@pytest.mark.redis
def test_a_batch_state_nested_too_deeply_is_no_batch(redis: redis_lib.Redis, redis_prefix: str) -> None:
    from worker.batch_backfill import RedisBatchStore

    store = RedisBatchStore(settings(TAGGER_REDIS_PREFIX=redis_prefix), redis)
    redis.set(store._key("batch_1"), DEEP)
    redis.hset(store._key("batch_1", "collected"), "posts/a.md", DEEP)
    assert store.get("batch_1") is None and store.collected("batch_1") == {}


@pytest.mark.parametrize(
    ("value", "finite", "whole"),
    [(b"12", 12.0, 12), ("3.7", 3.7, 3), (5, 5.0, 5), (None, 0.0, 0), (b"lots", 0.0, 0), ("nan", 0.0, 0),
     (float("inf"), 0.0, 0), ("-4", -4.0, 0), ([1], 0.0, 0), ("1e999", 0.0, 0)],
)  # fmt: skip
def test_counters_and_times_read_back_are_numbers_or_0(value: object, finite: float, whole: int) -> None:
    from worker import untrusted

    assert untrusted.finite(value) == finite and untrusted.whole(value) == whole
