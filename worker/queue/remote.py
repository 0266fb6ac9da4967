"""Self-contained jobs for workers on other machines: the job carries the post, the result carries the outcome.

The producer publishes its taxonomy (terms and prompt templates) in Redis under a content-addressed version and
puts the post's bytes, content hash and cached judgements into the job. A remote worker needs only REDIS_URL,
the provider settings and the API key: it decides with the classifier's own `decide` step and returns the
changes and the new record as the job's result; `tagger apply` (worker/apply.py) writes them where the
repository is. The worker never touches a file.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, ClassVar

import structlog
from redis import Redis, RedisError

from worker.classifier import Classifier, OnChunk
from worker.errors import PostTooLarge, TaxonomyUnpublished
from worker.logs import redact, secrets_of
from worker.posts import Change, file_hash, post_from_bytes
from worker.prompts import TEMPLATES, Templates
from worker.queue import keys
from worker.records import Record, RecordStore, dumps, loads, reconcile
from worker.results import Judgement, Usage
from worker.settings import Settings
from worker.taxonomy import Taxonomy, Term

log = structlog.get_logger("tagger.remote")
WARM_VERSIONS = 4  # taxonomy versions a worker process keeps built
# How long a failed or interrupted remote job's judgements wait for its retry (`failed retry` included).
JUDGED_TTL = 7 * 86400


def taxonomy_document(taxonomy: Taxonomy, templates: Templates, root: Path | None = None) -> dict[str, Any]:
    """The taxonomy and templates as JSON data (term paths relative to the content root where inside it)."""
    terms = []
    for term in taxonomy:
        data = dataclasses.asdict(term)
        if root is not None:
            with contextlib.suppress(ValueError):  # a term file outside the root keeps its path
                data["path"] = Path(term.path).resolve().relative_to(root).as_posix()
        terms.append(data)
    texts = {name: getattr(templates, name).template for name in TEMPLATES}
    return {"terms": terms, "templates": texts, "templates_version": templates.version}


def version_of(document: dict[str, Any]) -> str:
    """The content address of a taxonomy document: the same terms and templates give the same version."""
    canonical = json.dumps(document, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "t-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def publish(settings: Settings, redis: Redis, taxonomy: Taxonomy, templates: Templates) -> str:
    """Store the taxonomy in Redis under its version (a no-op when already there); returns the version."""
    document = taxonomy_document(taxonomy, templates, settings.content_root())
    version = version_of(document)
    if redis.set(keys.taxonomy(settings, version), json.dumps(document, ensure_ascii=False), nx=True):
        log.info("taxonomy_published", version=version, terms=len(taxonomy))
    return version


def load_published(settings: Settings, redis: Redis, version: str) -> tuple[Taxonomy, Templates]:
    """The taxonomy and templates published under `version`, or TaxonomyUnpublished (permanent)."""
    raw = redis.get(keys.taxonomy(settings, version))
    if raw is None:
        raise TaxonomyUnpublished(
            f"taxonomy version {version} is not published in Redis (run `tagger taxonomy publish` where the"
            " taxonomy is, or enqueue again with --remote, which publishes it)"
        )
    document = json.loads(raw)
    terms = [
        Term(**{**t, "key_topics": tuple(t["key_topics"]), "exclusions": tuple(t["exclusions"])})
        for t in document["terms"]
    ]
    texts = document["templates"]
    templates = Templates(**{n: Template(texts[n]) for n in TEMPLATES}, version=document["templates_version"])
    return Taxonomy(terms=terms), templates


def make_payload(settings: Settings, relative: str, version: str, types: list[str] | None) -> dict[str, Any]:
    """What a remote job carries for one post: its path, bytes, hashes, cached judgements, taxonomy version."""
    root = settings.content_root()
    path = root / relative
    size = path.stat().st_size
    if size > settings.max_job_bytes:
        raise PostTooLarge(
            f"post is {size} bytes, above the {settings.max_job_bytes} bytes a remote job carries"
            " (TAGGER_MAX_JOB_BYTES)",
            path=relative,
        )
    raw = path.read_bytes()
    post = post_from_bytes(path, raw, settings.max_front_matter_bytes)
    record = reconcile(RecordStore(root, settings.records_dir).load(path), post)
    return {
        "post": relative,
        "bytes": base64.b64encode(raw).decode("ascii"),
        "content_hash": post.content_hash,
        "file_hash": post.file_hash,
        "record": dumps(record).decode("utf-8"),
        "taxonomy": version,
        "types": types,
    }


@dataclass(frozen=True)
class Outcome:
    """A remote job's result: what to change in the post's owned keys and the post's new record."""

    post: str
    content_hash: str  # of the post the job judged
    file_hash: str  # of the bytes the job judged
    new_file_hash: str  # of the post once changed ("" when nothing changes)
    changes: dict[str, Change]
    added: dict[str, list[str]]
    removed: dict[str, list[str]]
    record: str  # the new record, as its JSON text
    calls: int = 0
    tokens: int = 0

    def as_json(self) -> dict[str, Any]:
        """The job result (JSON: RQ's serializer)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        """An outcome from a job result."""
        return cls(**data)

    def new_record(self) -> Record:
        """The new record."""
        return loads(self.record.encode("utf-8"))


def keep_judged(settings: Settings, redis: Redis, job_id: str, judged: Sequence[Judgement]) -> None:
    """Store one chunk's judgements under the job, so a retry (after a failure or a kill -9) does not ask again."""
    if not judged:
        return
    key = keys.judged_chunks(settings, job_id)
    try:
        with redis.pipeline() as pipe:
            pipe.hset(key, mapping={f"{j.type}\0{j.term}": j.model_dump_json() for j in judged})
            pipe.expire(key, JUDGED_TTL)
            pipe.execute()
    except RedisError as exc:  # the chunk still counts in this run; only a retry would ask it again
        log.warning(
            "redis_unavailable", where="judged_chunks", job_id=job_id, error=redact(str(exc), secrets_of(settings))
        )


def judged_before(settings: Settings, redis: Redis, job_id: str) -> list[Judgement]:
    """The judgements earlier attempts of this job stored (an unreadable entry is asked again)."""
    found = []
    for raw in redis.hvals(keys.judged_chunks(settings, job_id)):
        with contextlib.suppress(ValueError):
            found.append(Judgement.model_validate_json(raw))
    return found


class RemoteState:
    """Per worker process: the settings and a warm classifier per taxonomy version (a few, least recent out)."""

    settings: ClassVar[Settings | None] = None
    classifiers: ClassVar[OrderedDict[str, Classifier]] = OrderedDict()


def classifier_for(redis: Redis, version: str) -> Classifier:
    """The classifier for a published taxonomy version, built once per process."""
    from worker.providers import make_provider
    from worker.queue.throttle import RedisThrottle

    if RemoteState.settings is None:
        RemoteState.settings = Settings()
    settings = RemoteState.settings
    cached = RemoteState.classifiers.get(version)
    if cached is not None:
        RemoteState.classifiers.move_to_end(version)
        return cached
    taxonomy, templates = load_published(settings, redis, version)
    provider = make_provider(settings, templates, RedisThrottle(settings, redis))
    built = Classifier(settings, taxonomy, templates, provider)
    RemoteState.classifiers[version] = built
    while len(RemoteState.classifiers) > WARM_VERSIONS:
        RemoteState.classifiers.popitem(last=False)
    log.info("taxonomy_loaded", version=version, terms=len(taxonomy))
    return built


def decide_remote(
    classifier: Classifier,
    payload: dict[str, Any],
    judged: Sequence[Judgement] = (),
    on_chunk: OnChunk | None = None,
) -> tuple[Outcome, Usage, float]:
    """Decide one carried post with its carried record (no file is read or written); usage and LLM seconds.

    `judged`: judgements earlier attempts made, reused like the record's own where still valid. `on_chunk` gets
    each chunk's judgements as soon as that chunk is judged.
    """
    relative = payload["post"]
    raw = base64.b64decode(payload["bytes"])
    post = post_from_bytes(Path(relative), raw, classifier.settings.max_front_matter_bytes)
    record = loads(payload["record"].encode("utf-8"))
    if judged:
        merged = {(j.type, j.term): j for j in [*record.judgements, *judged]}
        record = record.model_copy(update={"judgements": list(merged.values())})
    base = {"post": relative, "content_hash": post.content_hash, "file_hash": post.file_hash}
    if not post.has_content:
        unchanged = Outcome(**base, new_file_hash="", changes={}, added={}, removed={}, record=dumps(record).decode())
        return unchanged, Usage(), 0.0
    decided = classifier.decide(post, record, payload.get("types"), on_chunk=on_chunk)
    result = decided.result
    outcome = Outcome(
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


def classify_remote(payload: dict[str, Any]) -> dict[str, Any]:
    """The RQ job for a self-contained post: decide it and return the outcome as the job's result."""
    from rq import get_current_job

    from worker.queue.jobs import count_usage

    job = get_current_job()
    assert job is not None and job.connection is not None
    redis: Redis = job.connection
    job.meta["attempts"] = int(job.meta.get("attempts", 0)) + 1
    job.save_meta()
    started = time.monotonic()
    relative = payload["post"]
    bound = log.bind(job_id=job.id, post=relative, attempt=job.meta["attempts"], taxonomy=payload["taxonomy"])
    bound.info("started")
    classifier = classifier_for(redis, payload["taxonomy"])
    settings = classifier.settings
    judged = judged_before(settings, redis, job.id)
    if judged:
        bound.info("judgements_reused", judgements=len(judged))

    def keep_chunk(chunk: list[Judgement]) -> None:
        keep_judged(settings, redis, job.id, chunk)

    # Each chunk's judgements are kept as soon as they are in: a retry, even after a kill -9, asks only the rest.
    with structlog.contextvars.bound_contextvars(job_id=job.id, post=relative):
        outcome, usage, llm_seconds = decide_remote(classifier, payload, judged, on_chunk=keep_chunk)
    redis.delete(keys.judged_chunks(settings, job.id))  # the outcome's record holds them now
    count_usage(redis, settings, usage)
    bound.info(
        "decided",
        changes=sorted(outcome.changes),
        calls=usage.calls,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        duration=round(time.monotonic() - started, 4),
        llm_seconds=llm_seconds,
    )
    return outcome.as_json()
