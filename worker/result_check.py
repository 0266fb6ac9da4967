"""A remote job's result checked where the repository is, then decided again here from the judgements it carries.

Everything in a result came back through Redis, so it is input like an LLM reply: its signature is checked
(TAGGER_SIGNING_KEY), it is parsed by a strict model (no extra field, no coercion), it must be the result of the
job that carried its post, and its path must lie in the content root. Then the changes are not taken from it:
they are decided again (worker/decide.py) from its judgements of the local taxonomy's terms for this post's text,
with the post as it is now and its local record (owned keys only, known terms only, the human-edit rules, the
caps). A claim of a key tagger does not own or of a term outside the taxonomy is a forged result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from worker.decide import Decided, decide
from worker.errors import BadResult, TaggerError
from worker.posts import ORIGIN_KEY, Post, normal_form
from worker.records import Record, loads
from worker.results import Judged, Judgement, RemoteResult
from worker.settings import Settings
from worker.signing import verify
from worker.taxonomy import Taxonomy


@dataclass(frozen=True)
class Checked:
    """A result that passed the checks: the result, and the new record it carries (parsed)."""

    result: RemoteResult
    record: Record


def parse_result(settings: Settings, job_id: str, value: Any) -> Checked:
    """The job's result checked (signature, strict shape, its record); BadResult with the reason otherwise."""
    try:
        data = verify(settings, "result", job_id, value)
    except TaggerError as exc:
        raise BadResult(exc.message) from exc
    try:
        result = RemoteResult.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'result'}: {e['msg']}" for e in exc.errors()[:5])
        raise BadResult(f"the result is not a remote job's outcome ({problems})") from exc
    try:
        record = loads(result.record.encode("utf-8"))
    except (ValueError, TypeError, KeyError, ValidationError) as exc:
        raise BadResult(f"the result's record cannot be read: {str(exc)[:200]}") from exc
    return Checked(result, record)


def expected_job_id(post_job_id: str, content_hash: str) -> str:
    """The id of the remote job that carries a post of this content (one job per post and content)."""
    return f"{post_job_id}-{content_hash[:12]}"


def claimed_problems(taxonomy: Taxonomy, result: RemoteResult, post: Post) -> list[str]:
    """What a result claims that no honest worker deciding on this taxonomy could: foreign keys, unknown terms.

    A type's new list may keep terms the post already lists (people's terms outside the taxonomy stay); any
    other term must be the taxonomy's.
    """
    known = {(t.type, normal_form(t.title)) for t in taxonomy}
    types = set(taxonomy.types())
    problems = []
    for key, value in result.changes.items():
        if key == ORIGIN_KEY:
            if value != "AI":
                problems.append(f"sets {ORIGIN_KEY} to {json.dumps(value)[:80]}")
        elif key not in types:
            problems.append(f"changes '{key[:80]}', a key tagger does not own")
        elif isinstance(value, str):
            problems.append(f"sets '{key}' to text, not a list of terms")
        elif isinstance(value, list):
            present = {normal_form(t) for t in post.terms(key)}
            unknown = [t for t in value if (key, normal_form(t)) not in known and normal_form(t) not in present]
            if unknown:
                problems.append(f"puts {key} outside the taxonomy: {', '.join(t[:60] for t in unknown[:3])}")
    for label, claimed in (("adds", result.added), ("removes", result.removed)):
        for key in claimed:
            if key not in types:
                problems.append(f"{label} terms of '{key[:80]}', not a type of the taxonomy")
    for key, terms in result.added.items():
        unknown = [t for t in terms if key in types and (key, normal_form(t)) not in known]
        if unknown:
            problems.append(f"adds {key} outside the taxonomy: {', '.join(t[:60] for t in unknown[:3])}")
    return problems


def usable_judgements(taxonomy: Taxonomy, post: Post, record: Record) -> list[Judgement]:
    """The carried judgements that judge a term of the local taxonomy, as defined here, for this post's text."""
    terms = {(t.type, t.title): t for t in taxonomy}
    usable = []
    for judgement in record.judgements:
        term = terms.get((judgement.type, judgement.term))
        if term is None or judgement.definition_hash != term.definition_hash:
            continue
        if judgement.content_hash != post.content_hash:
            continue
        usable.append(judgement)
    return usable


def decide_here(
    settings: Settings,
    taxonomy: Taxonomy,
    post: Post,
    record: Record,
    checked: Checked,
    types: list[str] | None,
) -> Decided:
    """The changes decided again here: the carried judgements that hold, the post as it is and its local record."""
    judgements = usable_judgements(taxonomy, post, checked.record)
    judged = Judged(
        judgements=judgements, usage=checked.record.usage, cached=len(judgements),
        cut_chars=checked.record.truncated_chars, llm_seconds=0.0,
    )  # fmt: skip
    return decide(post, record, judged, taxonomy, settings, types)
