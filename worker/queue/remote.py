"""The self-contained job, the worker's side: decide a carried post and return the outcome; never touch a file.

A remote worker needs only REDIS_URL, the provider settings and the API key: the job carries the post, its
record and a published taxonomy version (worker/queue/payload.py); the worker decides with the classifier's own
`decide` step and returns the changes and the new record as the job's result, which `tagger apply` writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from redis import Redis, RedisError
from rq import get_current_job

from worker.classifier import Classifier, OnChunk
from worker.errors import TaggerError
from worker.logs import redact, secrets_of
from worker.posts import file_hash, post_from_bytes
from worker.providers import make_provider
from worker.queue import keys
from worker.queue.context import WorkerContext, WorkerState
from worker.queue.jobs import count_usage, execute_counted, start_job
from worker.queue.modes import RedisModeMemory
from worker.queue.payload import RemotePayload, load_published
from worker.queue.throttle import RedisThrottle
from worker.records import dumps, loads
from worker.results import Judgement, RemoteResult, Usage
from worker.settings import Settings
from worker.signing import sign, sign_text, verify, verify_text

log = structlog.get_logger("tagger.remote")
# How long a failed or interrupted remote job's judgements wait for its retry (`failed retry` included).
JUDGED_TTL = 7 * 86400


def save_chunk_judgements(settings: Settings, redis: Redis, job_id: str, judged: Sequence[Judgement]) -> None:
    """Store one chunk's judgements under the job, so a retry (after a failure or a kill -9) does not ask again."""
    if not judged:
        return
    key = keys.judged_chunks(settings, job_id)
    try:
        with redis.pipeline() as pipe:
            values = {
                f"{j.type}\0{j.term}": sign_text(settings, "judgement", job_id, j.model_dump_json()) for j in judged
            }
            pipe.hset(key, mapping=values)  # type: ignore[arg-type]
            pipe.expire(key, JUDGED_TTL)
            pipe.execute()
    except RedisError as exc:  # the chunk still counts in this run; only a retry would ask it again
        log.warning(
            "redis_unavailable", where="judged_chunks", job_id=job_id, error=redact(str(exc), secrets_of(settings))
        )


def judged_before(settings: Settings, redis: Redis, job_id: str) -> list[Judgement]:
    """The judgements earlier attempts of this job stored: an unreadable entry, or one unsigned or badly signed
    with TAGGER_SIGNING_KEY, is asked again. (The decision uses only terms of the job's taxonomy.)"""
    found = []
    for raw in redis.hvals(keys.judged_chunks(settings, job_id)):
        with contextlib.suppress(ValueError, TaggerError):
            found.append(Judgement.model_validate_json(verify_text(settings, "judgement", job_id, raw)))
    return found


def classifier_for(context: WorkerContext, redis: Redis, version: str) -> Classifier:
    """The classifier for a published taxonomy version, built once per process (kept in the worker's context)."""
    settings = context.settings

    def build() -> Classifier:
        taxonomy, templates = load_published(settings, redis, version)
        provider = make_provider(settings, templates, RedisThrottle(settings, redis), RedisModeMemory(settings, redis))
        log.info("taxonomy_loaded", version=version, terms=len(taxonomy))
        return Classifier(settings, taxonomy, templates, provider)

    return context.for_version(version, build)


def decide_remote(
    classifier: Classifier,
    payload: RemotePayload,
    judged: Sequence[Judgement] = (),
    on_chunk: OnChunk | None = None,
) -> tuple[RemoteResult, Usage, float]:
    """Decide one carried post with its carried record (no file is read or written); usage and LLM seconds.

    `judged`: judgements earlier attempts made, reused like the record's own where still valid. `on_chunk` gets
    each chunk's judgements as soon as that chunk is judged.
    """
    relative = payload.post
    raw = payload.raw()
    post = post_from_bytes(Path(relative), raw, classifier.settings.max_front_matter_bytes)
    record = loads(payload.record.encode("utf-8"))
    if judged:
        merged = {(j.type, j.term): j for j in [*record.judgements, *judged]}
        record = record.model_copy(update={"judgements": list(merged.values())})
    base: dict[str, Any] = {"post": relative, "content_hash": post.content_hash, "file_hash": post.file_hash}
    if classifier.skip_reason(post) is not None:
        record_text = dumps(record).decode("utf-8")
        unchanged = RemoteResult(**base, new_file_hash="", changes={}, added={}, removed={}, record=record_text)
        return unchanged, Usage(), 0.0
    decided = classifier.decide(post, record, payload.types, on_chunk=on_chunk)
    result = decided.result
    outcome = RemoteResult(
        **base,
        new_file_hash=file_hash(decided.new_text.encode("utf-8")) if decided.new_text is not None else "",
        changes=decided.changes if decided.new_text is not None else {},
        added={d.type: d.added for d in result.decisions if d.added},
        removed={d.type: d.removed for d in result.decisions if d.removed},
        record=dumps(decided.record).decode("utf-8"),
        calls=result.usage.calls,
        tokens=result.usage.input_tokens + result.usage.output_tokens,
    )
    return outcome, result.usage, result.llm_seconds


def classify_remote(data: dict[str, Any]) -> dict[str, Any]:
    """The RQ job for a self-contained post: decide it and return the outcome as the job's result."""
    job = get_current_job()
    assert job is not None
    # Checked before anything else: with TAGGER_SIGNING_KEY only a payload a producer signed for this job runs.
    settings = WorkerState.current().settings
    payload = RemotePayload.from_job(verify(settings, "job", job.id, data) if isinstance(data, dict) else data)
    begun = start_job(payload.post, reruns=False, taxonomy=payload.taxonomy)
    job, redis, bound = begun.job, begun.redis, begun.log
    classifier = classifier_for(begun.context, redis, payload.taxonomy)
    settings = classifier.settings
    judged = judged_before(settings, redis, job.id)
    if judged:
        bound.info("judgements_reused", judgements=len(judged))

    def keep_chunk(chunk: list[Judgement]) -> None:
        save_chunk_judgements(settings, redis, job.id, chunk)

    # Each chunk's judgements are kept as soon as they are in: a retry, even after a kill -9, asks only the rest.
    with structlog.contextvars.bound_contextvars(job_id=job.id, post=payload.post):
        outcome, usage, llm_seconds = decide_remote(classifier, payload, judged, on_chunk=keep_chunk)
    with redis.pipeline() as pipe:
        count_usage(pipe, settings, usage)
        pipe.delete(keys.judged_chunks(settings, job.id))  # the outcome's record holds them now
        execute_counted(pipe)
    bound.info(
        "decided",
        changes=sorted(outcome.changes),
        calls=usage.calls,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        duration=begun.seconds(),
        llm_seconds=llm_seconds,
    )
    return sign(settings, "result", job.id, outcome.model_dump())  # `apply` checks it against this job
