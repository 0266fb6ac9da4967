"""Classify a post: judge its terms (cached), select per type, merge with human terms, write back."""

from __future__ import annotations

import difflib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from worker.errors import InvalidReply, PostChanged
from worker.judgements import Classification, Decision, Judgement, TermScores, Usage, confidence, level
from worker.posts import ORIGIN_KEY, Post, read_post, render_changes, write_atomic
from worker.prompts import CHARS_PER_TOKEN, PostText, Prompt, Templates, build_prompt
from worker.providers import OfflineProvider, Provider
from worker.providers.base import Throttle
from worker.records import Record, load_record, save_record
from worker.settings import Settings
from worker.taxonomy import Taxonomy, Term

log = structlog.get_logger("tagger.classifier")
CHANGED_POST_PASSES = 3


@dataclass(frozen=True)
class Classifier:
    """Everything needed to classify posts: settings, taxonomy, templates and a provider."""

    settings: Settings
    taxonomy: Taxonomy
    templates: Templates
    provider: Provider

    def classify(self, path: Path, *, dry_run: bool = False, types: Sequence[str] | None = None) -> Classification:
        """Classify one post and write it back; a post edited meanwhile is read and judged again."""
        for attempt in range(1, CHANGED_POST_PASSES + 1):
            post = read_post(path)
            record = load_record(path)
            result, new_text, new_record = self._decide(post, record, types)
            if dry_run:
                return result
            try:
                if new_text is not None:
                    write_atomic(post, new_text)
                    result.written = True
            except PostChanged:
                # Judgements already made are cached in the record, so the next pass is cheap.
                save_record(
                    path,
                    new_record.model_copy(update={"assigned": record.assigned, "rejected": record.rejected}),
                )
                log.info("post_changed_during_classification", post=str(path), attempt=attempt)
                if attempt == CHANGED_POST_PASSES:
                    raise
                continue
            save_record(path, new_record)
            return result
        raise AssertionError("unreachable")

    def judge(
        self, post: Post, terms: Sequence[Term], record: Record
    ) -> tuple[list[Judgement], Usage, int, int, float]:
        """Judgements for `terms` (cached where still valid), usage, cache hits, chars cut and seconds in LLM calls."""
        keep, todo = self.split_cached(post, terms, record)
        content_hash = post.content_hash
        if self.settings.shortlist_min and todo:
            skipped, todo = self.shortlist(post, todo)
            keep += skipped
        prompts, cut = self.prompts_for(post, todo)
        usage = Usage()
        fresh: list[Judgement] = []
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.settings.concurrency, len(prompts) or 1)))
        failed = threading.Event()

        def run(prompt: Prompt) -> tuple[list[Judgement], Usage]:
            if failed.is_set():
                return [], Usage()
            try:
                return self._judge_prompt(prompt, content_hash)
            except BaseException:
                failed.set()
                raise

        waited = time.monotonic()
        futures = [pool.submit(run, prompt) for prompt in prompts]
        try:
            for future in futures:
                judged, used = future.result()
                fresh.extend(judged)
                usage = usage.add(used)
        finally:
            # One failed chunk fails the post: chunks not yet started spend no calls.
            pool.shutdown(wait=True, cancel_futures=True)
        return keep + fresh, usage, len(keep), cut, time.monotonic() - waited if prompts else 0.0

    def prompts_for(self, post: Post, terms: Sequence[Term]) -> tuple[list[Prompt], int]:
        """One prompt per chunk of terms of one type, and how many body characters the token budget cut."""
        budget = self.settings.max_post_tokens * CHARS_PER_TOKEN
        cut = max(0, len(post.body) - budget)
        return self.prompts_for_text(PostText(post.title, post.description, post.body[:budget]), terms), cut

    def prompts_for_text(self, text: PostText, terms: Sequence[Term]) -> list[Prompt]:
        """One prompt per even chunk of terms of one type."""
        prompts = []
        for term_type in dict.fromkeys(t.type for t in terms):
            of_type = [t for t in terms if t.type == term_type]
            # Even chunks (41 terms at 40 a chunk become 21 + 20, not 40 + 1).
            count = -(-len(of_type) // self.settings.chunk_size)
            size = -(-len(of_type) // count)
            prompts += [build_prompt(self.templates, of_type[i : i + size], text) for i in range(0, len(of_type), size)]
        return prompts

    def split_cached(self, post: Post, terms: Sequence[Term], record: Record) -> tuple[list[Judgement], list[Term]]:
        """Judgements still valid for this post, term, prompt and model; and the terms that need asking."""
        cached = record.cached()
        keep: list[Judgement] = []
        todo: list[Term] = []
        for term in terms:
            old = cached.get((term.type, term.title))
            wanted = (term.definition_hash, post.content_hash, self.templates.version, self.provider.model)
            if old is not None and old.cache_key() == wanted:
                keep.append(old)
            else:
                todo.append(term)
        return keep, todo

    def terms_of(self, types: Sequence[str] | None) -> list[Term]:
        """The taxonomy's terms, optionally only of some types."""
        return [t for t in self.taxonomy if not types or t.type in types]

    def shortlist(self, post: Post, terms: Sequence[Term]) -> tuple[list[Judgement], list[Term]]:
        """Split terms into those a local overlap ranking finds hopeless (recorded, not asked) and the rest."""
        prompts, _ = self.prompts_for(post, terms)
        skipped: list[Judgement] = []
        ask: list[Term] = []
        for prompt in prompts:
            by_name = {t.title: t for t in prompt.terms}
            for judgement in self._judgements(
                by_name, OfflineProvider().judge(prompt).judgements, post.content_hash, "shortlist"
            ):
                if judgement.confidence < self.settings.shortlist_min:
                    skipped.append(judgement.model_copy(update={"reason": f"not asked: {judgement.reason}"}))
                else:
                    ask.append(by_name[judgement.term])
        return skipped, ask

    def _judgements(
        self, by_name: dict[str, Term], replies: Sequence[TermScores], content_hash: str, provider: str
    ) -> list[Judgement]:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        judgements = []
        for scores in replies:
            term = by_name[scores.term]
            value = confidence(scores, self.settings.weights)
            judgements.append(
                Judgement(
                    type=term.type,
                    term=term.title,
                    scores={k: v for k, v in scores.model_dump().items() if k not in ("term", "reason")},
                    confidence=value,
                    level=level(value),
                    reason=scores.reason,
                    definition_hash=term.definition_hash,
                    content_hash=content_hash,
                    prompt_version=self.templates.version,
                    model=self.provider.model,
                    provider=provider,
                    judged_at=now,
                )
            )
        return judgements

    def _judge_prompt(self, prompt: Prompt, content_hash: str) -> tuple[list[Judgement], Usage]:
        terms = prompt.terms
        reply = self.provider.judge(prompt)
        by_name = {t.title: t for t in terms}
        unknown = [j.term for j in reply.judgements if j.term not in by_name]
        if unknown or len(reply.judgements) != len(terms):
            raise InvalidReply(f"reply names terms that were not asked: {unknown}", raw_reply=reply.raw)
        judgements = self._judgements(by_name, reply.judgements, content_hash, self.provider.name)
        log.info(
            "llm_call",
            model=self.provider.model,
            terms=len(terms),
            type=terms[0].type,
            input_tokens=reply.usage.input_tokens,
            cached_tokens=reply.usage.cached_tokens,
            output_tokens=reply.usage.output_tokens,
            calls=reply.usage.calls,
        )
        return judgements, reply.usage

    def _decide(
        self, post: Post, record: Record, types: Sequence[str] | None
    ) -> tuple[Classification, str | None, Record]:
        wanted_types = [t for t in self.taxonomy.types() if not types or t in types]
        terms = self.terms_of(types)
        judgements, usage, hits, cut, llm_seconds = self.judge(post, terms, record)
        decisions: list[Decision] = []
        changes: dict[str, list[str] | str] = {}
        assigned = {k: v for k, v in record.assigned.items() if k not in wanted_types}
        rejected = dict(record.rejected)
        for term_type in wanted_types:
            decision = select(
                term_type,
                [j for j in judgements if j.type == term_type],
                post.terms(term_type),
                record.assigned.get(term_type, []),
                record.rejected.get(term_type, []),
                self.settings,
            )
            decisions.append(decision)
            if decision.final != post.terms(term_type) or (post.meta.get(term_type) is None and decision.final):
                changes[term_type] = decision.final
            owned = [t for t in decision.final if t in decision.selected and t not in decision.kept_human]
            assigned[term_type] = owned
            rejected[term_type] = decision.not_readded
        if changes and not post.human_only and str(post.meta.get(ORIGIN_KEY, "")) != "AI":
            changes[ORIGIN_KEY] = "AI"
        new_text = None
        diff = ""
        if changes:
            rendered = render_changes(post, changes)
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
            assigned = dict(record.assigned)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        new_record = Record(
            post=str(post.path),
            content_hash=post.content_hash,
            assigned=assigned,
            rejected=rejected,
            judgements=judgements,
            usage=usage,
            truncated_chars=cut,
            updated_at=now,
        )
        shared = new_record.model_dump(
            include={"post", "content_hash", "assigned", "rejected", "judgements", "usage", "truncated_chars"}
        )
        result = Classification(
            **shared,
            decisions=decisions,
            cached_terms=hits,
            llm_seconds=round(llm_seconds, 4),
            human_only=post.human_only,
            diff=diff,
        )
        return result, new_text, new_record


def select(
    term_type: str,
    judgements: list[Judgement],
    present: list[str],
    previously_assigned: list[str],
    rejected: list[str],
    settings: Settings,
) -> Decision:
    """Choose a type's terms and merge them with what the post already lists.

    Terms a person added stay; a term tagger assigned that a person removed is never re-added.
    """
    rule = settings.rule_for(term_type)
    removed_by_human = [t for t in previously_assigned if t not in present]
    blocked = set(rejected) | set(removed_by_human)
    ranked = sorted(judgements, key=lambda j: (-j.confidence, j.term))
    eligible = [j.term for j in ranked if j.confidence >= rule.min_confidence]
    selected = [t for t in eligible if t not in blocked][: rule.top]
    human = [t for t in present if t not in previously_assigned]
    final = [t for t in present if t in human or t in selected]
    final += [t for t in selected if t not in final]
    return Decision(
        type=term_type,
        selected=selected,
        final=final,
        added=[t for t in final if t not in present],
        removed=[t for t in present if t not in final],
        kept_human=[t for t in human if t in final],
        not_readded=sorted(blocked),
    )


def make_classifier(settings: Settings, throttle: Throttle | None = None) -> Classifier:
    """A classifier wired from settings: taxonomy folder, prompt templates and provider."""
    from worker.prompts import load_templates
    from worker.providers import make_provider
    from worker.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(settings.taxonomy_dir, known_types=settings.selection)
    templates = load_templates(settings.prompts_dir)
    return Classifier(settings, taxonomy, templates, make_provider(settings, templates, throttle))
