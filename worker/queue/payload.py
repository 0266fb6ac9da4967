"""Remote jobs' data, the producer's side: the published taxonomy and the payload a job carries.

The producer publishes its taxonomy (terms and prompt templates) in Redis under a content-addressed version and
puts the post's bytes, content hash and cached judgements into the job (`RemotePayload`). A remote worker
(worker/queue/remote.py) decides the post and returns a `RemoteResult` (worker/results.py); `tagger apply`
(worker/apply.py) checks and writes it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis import Redis

from worker import untrusted
from worker.errors import BadPayload, BadSignature, PostTooLarge, TaxonomyError, TaxonomyTampered, TaxonomyUnpublished
from worker.posts import post_from_bytes
from worker.prompts import TEMPLATES, Templates
from worker.queue import keys
from worker.records import RecordStore, dumps, reconcile
from worker.settings import Settings
from worker.signing import sign, verify
from worker.taxonomy import Taxonomy, Term, type_problem

log = structlog.get_logger("tagger.remote")


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


@dataclass(frozen=True)
class Published:
    """What `publish` did: the version, and whether Redis held other content under its name (put back)."""

    version: str
    overwritten: str = ""  # why the copy in Redis was replaced ("" when it was right or absent)


def publish(settings: Settings, redis: Redis, taxonomy: Taxonomy, templates: Templates) -> Published:
    """Store the taxonomy in Redis under its version (signed with TAGGER_SIGNING_KEY).

    A no-op when Redis already holds it; a copy whose content does not match its name (or whose signature does
    not hold) is overwritten with the true content, and the result says why.
    """
    document = taxonomy_document(taxonomy, templates, settings.content_root())
    version = version_of(document)
    key = keys.taxonomy(settings, version)
    stored = json.dumps(sign(settings, "taxonomy", version, document), ensure_ascii=False)
    if redis.set(key, stored, nx=True):
        log.info("taxonomy_published", version=version, terms=len(taxonomy))
        return Published(version)
    try:
        check_published(settings, version, redis.get(key))
    except TaxonomyError as exc:
        redis.set(key, stored)
        log.warning("taxonomy_overwritten", version=version, reason=exc.message[:300])
        return Published(version, exc.message)
    return Published(version)


def check_published(settings: Settings, version: str, raw: bytes | str | None) -> dict[str, Any]:
    """A published taxonomy document, verified: its signature (TAGGER_SIGNING_KEY), its content against its
    name, and the checks a local taxonomy passes (no reserved key as a type); TaxonomyTampered otherwise."""
    if raw is None:
        raise TaxonomyUnpublished(
            f"taxonomy version {version} is not published in Redis (run `tagger taxonomy publish` where the"
            " taxonomy is, or enqueue again with --remote, which publishes it)"
        )
    try:
        data = untrusted.loads(raw)
        document = verify(settings, "taxonomy", version, data)
    except (ValueError, BadSignature) as exc:
        raise TaxonomyTampered(f"taxonomy version {version} in Redis is not what tagger published: {exc}") from exc
    if version_of(document) != version:
        raise TaxonomyTampered(
            f"taxonomy version {version} in Redis does not match its name (its content was changed after it was"
            " published; `tagger taxonomy publish` where the taxonomy is puts it back)"
        )
    terms = document.get("terms")
    if not isinstance(terms, list) or not terms:
        raise TaxonomyTampered(f"taxonomy version {version} in Redis holds no terms")
    for term in terms:
        term_type = term.get("type") if isinstance(term, dict) else None
        problem = type_problem(term_type) if isinstance(term_type, str) else "a term without a type"
        if problem:
            raise TaxonomyTampered(f"taxonomy version {version} in Redis is refused: {problem}")
    return document


def load_published(settings: Settings, redis: Redis, version: str) -> tuple[Taxonomy, Templates]:
    """The taxonomy and templates published under `version`, verified; TaxonomyUnpublished or TaxonomyTampered."""
    document = check_published(settings, version, redis.get(keys.taxonomy(settings, version)))
    try:
        terms = [
            Term(**{**t, "key_topics": tuple(t["key_topics"]), "exclusions": tuple(t["exclusions"])})
            for t in document["terms"]
        ]
        texts = document["templates"]
        templates = Templates(**{n: Template(texts[n]) for n in TEMPLATES}, version=document["templates_version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TaxonomyTampered(f"taxonomy version {version} in Redis is not a taxonomy: {exc!r}"[:300]) from exc
    return Taxonomy(terms=terms), templates


class RemotePayload(BaseModel):
    """What a remote job carries for one post; read back from Redis, so validated like an LLM reply."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    post: str = Field(min_length=1)  # the post's path relative to the content root
    body: str = Field(alias="bytes")  # the post's bytes, base64
    content_hash: str = Field(min_length=12)
    file_hash: str = Field(min_length=1)
    record: str  # the post's record, as its JSON text
    taxonomy: str = Field(min_length=1)  # the published taxonomy version
    types: list[str] | None = None

    @classmethod
    def from_job(cls, data: Any) -> RemotePayload:
        """The payload of a job's argument, or BadPayload (permanent: retrying cannot fix it)."""
        try:
            payload = cls.model_validate(data)
            payload.raw()
        except (ValidationError, ValueError) as exc:
            raise BadPayload(f"remote job payload is not tagger's: {' '.join(str(exc).split())[:300]}") from exc
        return payload

    def raw(self) -> bytes:
        """The post's bytes."""
        return base64.b64decode(self.body, validate=True)

    def as_job(self) -> dict[str, Any]:
        """The job's argument (JSON: RQ's serializer)."""
        return self.model_dump(by_alias=True)


def make_payload(settings: Settings, relative: str, version: str, types: list[str] | None) -> RemotePayload:
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
    return RemotePayload(
        post=relative,
        body=base64.b64encode(raw).decode("ascii"),
        content_hash=post.content_hash,
        file_hash=post.file_hash,
        record=dumps(record).decode("utf-8"),
        taxonomy=version,
        types=types,
    )
