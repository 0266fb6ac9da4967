"""Deciding: from a post's judgements, select each type's terms, apply the human-edit rules, make the new record.

Pure: a post's bytes, its record and its judgements in; the owned-key changes, new text and new record out. No
file is read or written and no model is asked, so a remote worker decides with the same code.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from worker.posts import ORIGIN_KEY, Change, Post, normal_form, render_changes
from worker.records import Record, restored
from worker.results import Classification, Decision, Judged, Judgement
from worker.settings import Settings
from worker.taxonomy import Taxonomy
from worker.writeback import post_mode

log = structlog.get_logger("tagger.classifier")  # the name its events always had: log filters keep working


@dataclass(frozen=True)
class Decided:
    """What the decide step gives for a post: the outcome, the owned-key changes, the new text and record."""

    result: Classification
    changes: dict[str, Change]
    new_text: str | None  # None: the post is not rewritten
    record: Record


@dataclass(frozen=True)
class Due:
    """Why a post needs classifying again: a kind (`record_missing`, `not_written`, `unsettled`, `terms_missing`,
    `file_changed`, `stale`) and the facts."""

    kind: str
    detail: str


def drift(post: Post, stored: Record, types: Sequence[str] | None = None) -> Due | None:
    """Where the record (as stored, not reconciled) and the post as it is disagree, or None.

    The post's bytes are the truth: a write tagger announced must have landed and been settled, every term tagger
    assigned must be in the post (or removed by people), and the file must be the one tagger last wrote or read.
    """
    if not stored.file_hash:  # every decision names the file; judgements kept alone (a failed chunk, eval) do not
        detail = "the record holds judgements only, no decision" if stored.judgements else "no result record"
        return Due("record_missing", detail)
    if stored.pending is not None:
        if post.file_hash == stored.pending.before_file_hash:
            return Due("not_written", "a write tagger announced did not land (the post is as it was before it)")
        if post.file_hash == stored.file_hash:
            return Due("unsettled", "a write that landed is not confirmed in the record")
        return Due("unsettled", "a write tagger announced is not settled and the post changed since")
    if post.file_hash != stored.file_hash and restored(stored, post.file_hash):
        return Due("not_written", "the post is back at its bytes from before tagger's last write (restored?)")
    for term_type, titles in sorted(stored.assigned.items()):
        if types and term_type not in types:
            continue
        present = {normal_form(t) for t in post.terms(term_type)}
        removed = {normal_form(t) for t in stored.removed_by_people.get(term_type, [])}
        missing = [t for t in titles if normal_form(t) not in present and normal_form(t) not in removed]
        if missing:
            return Due("terms_missing", f"{term_type}: {', '.join(missing)} assigned but not in the post")
    if stored.file_hash != post.file_hash:
        return Due("file_changed", "the post is not the file tagger last wrote or read (edited, restored, copied)")
    return None


def retired(taxonomy: Taxonomy, record: Record) -> dict[str, list[str]]:
    """Terms tagger assigned that have left the taxonomy (removed or renamed), by type."""
    known = {(t.type, normal_form(t.title)) for t in taxonomy}
    out = {}
    for term_type, titles in record.assigned.items():
        gone = [t for t in titles if (term_type, normal_form(t)) not in known]
        if gone:
            out[term_type] = gone
    return out


def decide(
    post: Post,
    record: Record,
    judged: Judged,
    taxonomy: Taxonomy,
    settings: Settings,
    types: Sequence[str] | None = None,
    with_diff: bool = False,
) -> Decided:
    """Select and merge a post's judged terms: the changes to the owned keys and the new record."""
    wanted_types = [t for t in taxonomy.types() if not types or t in types]
    gone = retired(taxonomy, record)
    # A type that left the taxonomy altogether still has tagger's terms to take back.
    wanted_types += [t for t in gone if t not in wanted_types and (not types or t in types)]
    judgements, usage, hits, cut = judged.judgements, judged.usage, judged.cached, judged.cut_chars
    decisions: list[Decision] = []
    changes: dict[str, Change] = {}
    assigned = {k: v for k, v in record.assigned.items() if k not in wanted_types}
    removed_by_people = dict(record.removed_by_people)
    added_keys = set(record.added_keys)
    for term_type in wanted_types:
        present = post.terms(term_type)
        decision = select(
            term_type,
            [j for j in judgements if j.type == term_type],
            present,
            record.assigned.get(term_type, []),
            record.removed_by_people.get(term_type, []),
            settings,
        )
        decision.retired = [t for t in gone.get(term_type, []) if t in decision.removed]
        decisions.append(decision)
        key_absent = term_type not in post.meta
        if not decision.final and term_type in added_keys and not key_absent:
            changes[term_type] = None  # tagger added this key and has emptied it: leave no trace
            added_keys.discard(term_type)
        elif decision.final != present or (post.meta.get(term_type) is None and decision.final):
            changes[term_type] = decision.final
            if key_absent:
                added_keys.add(term_type)
        elif key_absent:
            added_keys.discard(term_type)  # a person removed the key: it is no longer tagger's
        assigned[term_type] = decision.assigned
        removed_by_people[term_type] = decision.removed_by_people
    if any(v for v in changes.values()) and not post.human_only and str(post.meta.get(ORIGIN_KEY, "")) != "AI":
        changes[ORIGIN_KEY] = "AI"
    new_text = None
    diff = ""
    if changes:
        rendered = render_changes(post, changes)
        if with_diff:  # only a dry run shows it: a job would compute it for nobody
            old_text = post.raw.decode("utf-8", errors="replace").lstrip("\ufeff")
            diff = "".join(
                difflib.unified_diff(
                    old_text.splitlines(keepends=True),
                    rendered.lstrip("\ufeff").splitlines(keepends=True),
                    fromfile=str(post.path),
                    tofile=str(post.path),
                )
            )
        new_text = None if post.human_only else rendered
    if post.human_only:
        assigned, added_keys = dict(record.assigned), set(record.added_keys)
    for decision in decisions:
        if decision.retired and new_text is not None:
            log.info("retired_terms_removed", post=str(post.path), type=decision.type, terms=decision.retired)
    # Judgements of types not asked this time stay in the record (the cache) while their terms exist.
    judged_now = {(j.type, j.term) for j in judgements}
    known = {(t.type, t.title) for t in taxonomy}
    kept = [
        j
        for j in record.judgements
        if j.type not in wanted_types and (j.type, j.term) in known and (j.type, j.term) not in judged_now
    ]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    new_record = Record(
        post=str(post.path),
        mode=f"{post_mode(post.path):04o}",
        content_hash=post.content_hash,
        before_file_hash=record.before_file_hash,
        earlier_file_hashes=record.earlier_file_hashes,
        assigned=assigned,
        removed_by_people=removed_by_people,
        added_keys=sorted(added_keys),
        judgements=judgements + kept,
        usage=usage if usage.calls else record.usage,
        truncated_chars=cut,
        updated_at=now,
    )
    result = Classification(
        post=str(post.path),
        content_hash=post.content_hash,
        assigned=assigned,
        removed_by_people=removed_by_people,
        judgements=judgements,
        usage=usage,
        truncated_chars=cut,
        decisions=decisions,
        cached_terms=hits,
        llm_seconds=round(judged.llm_seconds, 4),
        human_only=post.human_only,
        diff=diff,
    )
    return Decided(result, changes, new_text, new_record)


def select(
    term_type: str,
    judgements: list[Judgement],
    present: list[str],
    previously_assigned: list[str],
    removed_by_people: list[str],
    settings: Settings,
) -> Decision:
    """Choose a type's terms and merge them with what the post already lists.

    Terms match by their normal form (case, Unicode form and odd spaces aside); the post's spelling is kept and
    no second spelling is added. Terms a person added stay and count towards the rule's cap; a term tagger
    assigned that a person removed is never re-added.
    """
    rule = settings.rule_for(term_type)
    nf = normal_form
    present_n = {nf(t) for t in present}
    assigned_n = {nf(t) for t in previously_assigned}
    removed_now = [t for t in previously_assigned if nf(t) not in present_n]
    by_people = sorted(set(removed_by_people) | set(removed_now))
    blocked = {nf(t) for t in by_people}
    human = [t for t in present if nf(t) not in assigned_n]
    human_n = {nf(t) for t in human}
    ranked = sorted(judgements, key=lambda j: (-j.confidence, j.term))
    room = max(0, rule.cap - len(human_n))
    selected: list[str] = []
    for judgement in ranked:
        term = nf(judgement.term)
        if len(selected) >= rule.top or judgement.confidence < rule.min_confidence:
            break
        if term in blocked or term in {nf(t) for t in selected}:
            continue
        if term not in human_n:
            if not room:
                continue
            room -= 1
        selected.append(judgement.term)
    selected_n = {nf(t) for t in selected}
    final = [t for t in present if nf(t) in human_n or nf(t) in selected_n]
    final += [t for t in selected if nf(t) not in present_n]
    return Decision(
        type=term_type,
        selected=selected,
        final=final,
        added=[t for t in final if nf(t) not in present_n],
        removed=[t for t in present if t not in final],
        kept_human=[t for t in human if t in final],
        removed_by_people=by_people,
        assigned=[t for t in final if nf(t) in selected_n and nf(t) not in human_n],
    )
