"""Classify a post: judge its terms (cached), select per type, merge with human terms, write back."""

from __future__ import annotations

import contextvars
import difflib
import functools
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from worker.errors import InvalidReply, PostChanged, PostReadOnly, PostWriteFailed, RecordWriteFailed, TaggerError
from worker.judgements import (
    Classification,
    Decision,
    Judgement,
    TermScores,
    Usage,
    confidence,
    level,
    not_relevant,
)
from worker.posts import (
    ORIGIN_KEY,
    Change,
    Post,
    check_writable,
    clean_stale_temps,
    file_hash,
    normal_form,
    read_post,
    render_changes,
    write_atomic,
)
from worker.prompts import CHARS_PER_TOKEN, PostText, Prompt, Templates, build_prompt, prompt_version
from worker.providers import OfflineProvider, Provider
from worker.providers.base import Throttle
from worker.records import Pending, Record, RecordStore, reconcile
from worker.settings import Settings
from worker.taxonomy import Taxonomy, Term

log = structlog.get_logger("tagger.classifier")
CHANGED_POST_PASSES = 3
# Most of the token budget goes to the body: a title or description past these shares of it is cut.
TITLE_SHARE, DESCRIPTION_SHARE = 1 / 16, 1 / 8
NOTHING_TO_CLASSIFY = "nothing to classify"


@dataclass(frozen=True)
class Judged:
    """What judging a post's terms gave: judgements (cached where still valid) and what it took."""

    judgements: list[Judgement]
    usage: Usage
    cached: int  # judgements reused from the record
    cut_chars: int  # characters the token budget cut from the post
    llm_seconds: float


@dataclass(frozen=True)
class Decided:
    """What the decide step gives for a post: the outcome, the owned-key changes, the new text and record."""

    result: Classification
    changes: dict[str, Change]
    new_text: str | None  # None: the post is not rewritten
    record: Record


@dataclass(frozen=True)
class Classifier:
    """Everything needed to classify posts: settings, taxonomy, templates and a provider."""

    settings: Settings
    taxonomy: Taxonomy
    templates: Templates
    provider: Provider

    @property
    def records(self) -> RecordStore:
        """Where this classifier reads and writes result records."""
        return RecordStore(self.settings.content_root(), self.settings.records_dir)

    def read(self, path: Path) -> Post:
        """Read a post within the configured front-matter size limit."""
        return read_post(path, self.settings.max_front_matter_bytes)

    def load_record(self, post: Post) -> Record:
        """The post's record, with an announced-but-unconfirmed write settled against the post on disk."""
        return reconcile(self.records.load(post.path), post)

    def classify(self, path: Path, *, dry_run: bool = False, types: Sequence[str] | None = None) -> Classification:
        """Classify one post and write it back; a post edited meanwhile is read and judged again."""
        for attempt in range(1, CHANGED_POST_PASSES + 1):
            post = self.read(path)
            if not post.has_content:
                log.info("skipped", post=str(path), reason=NOTHING_TO_CLASSIFY)
                return Classification(
                    post=str(path), content_hash=post.content_hash, judgements=[], decisions=[], assigned={},
                    removed_by_people={}, usage=Usage(), cached_terms=0, skipped=NOTHING_TO_CLASSIFY,
                )  # fmt: skip
            if not dry_run and not post.human_only:
                check_writable(path)  # a locked post is not judged either: no call spent on what cannot be written
            if not dry_run:
                for folder in {path.parent, self.records.path_for(path).parent}:
                    for stale in clean_stale_temps(folder):
                        log.info("stale_temp_removed", file=str(stale))
            stored = self.records.load(path)
            record = reconcile(stored, post)
            try:
                decided = self.decide(post, record, types, with_diff=dry_run)
            except TaggerError as exc:
                # Judgements of the chunks that succeeded are kept, so a retry asks only the missing ones.
                if exc.partial and not dry_run:
                    self.keep(path, record, exc.partial)
                raise
            if dry_run:
                return decided.result
            try:
                decided.result.written = write_back(
                    self.records, path, post, stored, record, decided.new_text, decided.record
                )
            except PostChanged:
                log.info("post_changed_during_classification", post=str(path), attempt=attempt)
                if attempt == CHANGED_POST_PASSES:
                    raise
                continue
            return decided.result
        raise AssertionError("unreachable")

    def keep(self, path: Path, record: Record, judgements: Sequence[Judgement]) -> None:
        """Add judgements to the post's record (the cache) without touching its assignments."""
        kept = {(j.type, j.term): j for j in [*record.judgements, *judgements]}
        save(self.records, path, record.model_copy(update={"judgements": list(kept.values())}))

    def keep_answered(self, path: Path, types: Sequence[str] | None = None) -> int:
        """Judge every chunk of the post the provider can answer and keep those judgements; how many were kept.

        For replies already paid for (a batch's good lines): a chunk that fails is passed over, not fatal, so the
        retry of the post asks only the chunks that failed. Nothing is written to the post.
        """
        post = self.read(path)
        record = self.load_record(post)
        _, todo = self.split_cached(post, self.terms_for(post, types), record)
        if self.settings.shortlist_min and todo:
            _, todo = self.shortlist(post, todo)
        prompts, _ = self.prompts_for(post, todo)
        answered: list[Judgement] = []
        for prompt in prompts:
            try:
                answered += self._judge_prompt(prompt, post.content_hash)[0]
            except TaggerError as exc:
                log.info("chunk_not_kept", post=str(path), type=prompt.terms[0].type, kind=exc.kind)
        if answered:
            now = datetime.now(UTC).isoformat(timespec="seconds")  # one time stamp, as `judge` gives a run
            self.keep(path, record, [j.model_copy(update={"judged_at": now}) for j in answered])
        return len(answered)

    def terms_for(self, post: Post, types: Sequence[str] | None = None) -> list[Term]:
        """The terms to judge a post against: a term page is never judged against its own term."""
        own = _resolved(post.path)
        return [t for t in self.terms_of(types) if _term_file(t.path) != own]

    def retired(self, record: Record) -> dict[str, list[str]]:
        """Terms tagger assigned that have left the taxonomy (removed or renamed), by type."""
        known = {(t.type, normal_form(t.title)) for t in self.taxonomy}
        out = {}
        for term_type, titles in record.assigned.items():
            gone = [t for t in titles if (term_type, normal_form(t)) not in known]
            if gone:
                out[term_type] = gone
        return out

    def is_fresh(self, post: Post, record: Record, types: Sequence[str] | None = None) -> bool:
        """True when the record answers for this post, taxonomy, prompt and model: nothing to ask or remove."""
        if not post.has_content:
            return True
        _, todo = self.split_cached(post, self.terms_for(post, types), record)
        retired = self.retired(record)
        return not todo and not any(t for k, t in retired.items() if not types or k in types)

    @property
    def prompt_version(self) -> str:
        """What judgements are cached under: templates, definitions and reply shape."""
        return prompt_version(self.templates, self.settings.definitions, self.settings.reply)

    def judge(self, post: Post, terms: Sequence[Term], record: Record) -> Judged:
        """Judgements for `terms` (cached where still valid), with usage, cache hits, chars cut and LLM seconds."""
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
        # Each call runs in a copy of this context, so its `llm_call` event keeps the job id and post bound by the job.
        futures = [pool.submit(contextvars.copy_context().run, run, prompt) for prompt in prompts]
        try:
            for future in futures:
                judged, used = future.result()
                fresh.extend(judged)
                usage = usage.add(used)
        except TaggerError as exc:
            pool.shutdown(wait=True, cancel_futures=True)
            done = [f.result()[0] for f in futures if f.done() and not f.cancelled() and f.exception() is None]
            exc.partial = [j for judged in done for j in judged]
            raise
        finally:
            # One failed chunk fails the post: chunks not yet started spend no calls.
            pool.shutdown(wait=True, cancel_futures=True)
        # One time stamp per run, so a record's judgements share it (one header field, not one per line).
        now = datetime.now(UTC).isoformat(timespec="seconds")
        fresh = [j.model_copy(update={"judged_at": now}) for j in fresh]
        seconds = time.monotonic() - waited if prompts else 0.0
        return Judged(judgements=keep + fresh, usage=usage, cached=len(keep), cut_chars=cut, llm_seconds=seconds)

    def prompts_for(self, post: Post, terms: Sequence[Term]) -> tuple[list[Prompt], int]:
        """One prompt per chunk of terms of one type, and how many characters the token budget cut.

        Title, description and body share the budget: title and description get a bounded share, the body the rest.
        """
        budget = self.settings.max_post_tokens * CHARS_PER_TOKEN
        title = post.title[: int(budget * TITLE_SHARE)]
        description = post.description[: int(budget * DESCRIPTION_SHARE)]
        body = post.body[: budget - len(title) - len(description)]
        cut = len(post.title) + len(post.description) + len(post.body) - len(title) - len(description) - len(body)
        return self.prompts_for_text(PostText(title, description, body), terms), cut

    def prompts_for_text(self, text: PostText, terms: Sequence[Term]) -> list[Prompt]:
        """One prompt per even chunk of terms of one type."""
        prompts = []
        for term_type in dict.fromkeys(t.type for t in terms):
            of_type = [t for t in terms if t.type == term_type]
            # Even chunks (41 terms at 40 a chunk become 21 + 20, not 40 + 1).
            count = -(-len(of_type) // self.settings.chunk_size)
            size = -(-len(of_type) // count)
            s = self.settings
            prompts += [
                build_prompt(self.templates, of_type[i : i + size], text, s.definitions, s.reply)
                for i in range(0, len(of_type), size)
            ]
        return prompts

    def split_cached(self, post: Post, terms: Sequence[Term], record: Record) -> tuple[list[Judgement], list[Term]]:
        """Judgements still valid for this post, term, prompt and model; and the terms that need asking."""
        cached = record.cached()
        keep: list[Judgement] = []
        todo: list[Term] = []
        for term in terms:
            old = cached.get((term.type, term.title))
            wanted = (term.definition_hash, post.content_hash, self.prompt_version, self.provider.model)
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
                    prompt_version=self.prompt_version,
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
        got = [j.term for j in reply.judgements]
        complete = prompt.reply == "all"
        repeated = sorted({t for t in got if got.count(t) > 1})
        if unknown or repeated or (complete and len(got) != len(terms)):
            problem = f"terms that were not asked: {unknown}" if unknown else f"repeated terms: {repeated}"
            raise InvalidReply(
                f"reply names {problem}" if unknown or repeated else "reply misses terms", raw_reply=reply.raw
            )
        # TAGGER_REPLY=relevant: a term the model left out is recorded as judged, every sub-score 0.
        scores = [*reply.judgements, *(not_relevant(n) for n in prompt.names if n not in got)]
        judgements = self._judgements(by_name, scores, content_hash, self.provider.name)
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

    def decide(
        self, post: Post, record: Record, types: Sequence[str] | None = None, with_diff: bool = False
    ) -> Decided:
        """Judge (cached where valid), select and merge: the changes to the owned keys and the new record.

        Works on a post's bytes and record alone (no file is read or written), so a remote worker runs it too.
        """
        wanted_types = [t for t in self.taxonomy.types() if not types or t in types]
        retired = self.retired(record)
        # A type that left the taxonomy altogether still has tagger's terms to take back.
        wanted_types += [t for t in retired if t not in wanted_types and (not types or t in types)]
        terms = self.terms_for(post, types)
        outcome = self.judge(post, terms, record)
        judgements, usage, hits, cut = outcome.judgements, outcome.usage, outcome.cached, outcome.cut_chars
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
                self.settings,
            )
            decision.retired = [t for t in retired.get(term_type, []) if t in decision.removed]
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
        judged = {(j.type, j.term) for j in judgements}
        known = {(t.type, t.title) for t in self.taxonomy}
        kept = [
            j
            for j in record.judgements
            if j.type not in wanted_types and (j.type, j.term) in known and (j.type, j.term) not in judged
        ]
        now = datetime.now(UTC).isoformat(timespec="seconds")
        new_record = Record(
            post=str(post.path),
            mode=f"{post_mode(post.path):04o}",
            content_hash=post.content_hash,
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
            llm_seconds=round(outcome.llm_seconds, 4),
            human_only=post.human_only,
            diff=diff,
        )
        return Decided(result, changes, new_text, new_record)


def write_back(
    store: RecordStore, path: Path, post: Post, stored: Record, record: Record, new_text: str | None, new_record: Record
) -> bool:
    """Write a decision: announce it in the record, replace the post atomically, confirm; True when written.

    `record` is `stored` reconciled with `post`. A post that changed since it was read raises PostChanged
    after its new judgements are cached in the record (so judging it again is cheap).
    """
    if new_text is None:
        save(store, path, new_record.model_copy(update={"file_hash": post.file_hash}), previous=stored)
        return False
    # Announce the write first: a failed record write leaves the post untouched, and a kill or any other
    # failure after this line is settled by `reconcile` from the post's file hash at the next run.
    announced = new_record.model_copy(
        update={
            "file_hash": file_hash(new_text.encode("utf-8")),
            "pending": Pending(
                before_file_hash=post.file_hash,
                assigned=record.assigned,
                removed_by_people=record.removed_by_people,
                added_keys=record.added_keys,
            ),
        }
    )
    save(store, path, announced)
    try:
        write_atomic(post, new_text)
    except PostChanged:
        # Judgements already made are cached in the record, so the next pass is cheap.
        save(store, path, unwritten(new_record, record, post))
        raise
    except PostReadOnly:
        # The announcement is taken back and no judgement kept: the post stays due, reported until it is unlocked.
        save(store, path, record.model_copy(update={"pending": None}))
        raise
    except OSError as exc:
        # The announced record is settled from the post's file hash at the next run, as after a kill.
        raise PostWriteFailed(f"cannot replace the post: {exc.strerror or exc}", path=path) from exc
    try:
        save(store, path, announced.model_copy(update={"pending": None}))
    except RecordWriteFailed as exc:
        # The announced record already names this write: the next run confirms it from the file hash.
        log.warning("record_confirm_failed", post=str(path), error=exc.message)
    return True


def unwritten(new_record: Record, record: Record, post: Post) -> Record:
    """The new judgements with the earlier assignments: the post was not replaced."""
    return new_record.model_copy(
        update={
            "assigned": record.assigned,
            "removed_by_people": record.removed_by_people,
            "added_keys": record.added_keys,
            "file_hash": post.file_hash,
            "pending": None,
        }
    )


def save(store: RecordStore, path: Path, record: Record, previous: Record | None = None) -> None:
    """Write a post's record (not when only its time stamp would change); a failure is RecordWriteFailed."""
    if previous is not None and _same(previous, record) and store.path_for(path).exists():
        return  # nothing but the time would change: keep the file (and its git history) as it is
    try:
        store.save(path, record)
    except OSError as exc:
        raise RecordWriteFailed(f"cannot write the result record: {exc.strerror or exc}", path=path) from exc


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


def post_mode(path: Path) -> int:
    """The post file's permission bits (0 when it cannot be read)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


@functools.lru_cache(maxsize=8192)
def _term_file(path: str) -> Path:
    return _resolved(Path(path))


def _same(old: Record, new: Record) -> bool:
    """True when two records differ at most in their time stamp."""
    skip = {"updated_at", "post"}
    return old.model_dump(exclude=skip) == new.model_dump(exclude=skip)


def type_key_problems(taxonomy: Taxonomy, posts: Iterable[Path], shown: int = 5) -> list[str]:
    """Types whose key some post uses for something other than a list of terms (a boolean, number, mapping)."""
    misuse: dict[str, list[str]] = {}
    for path in posts:
        try:
            meta = read_post(path).meta
        except TaggerError:
            continue
        for term_type in taxonomy.types():
            value = meta.get(term_type)
            if value is not None and not isinstance(value, str | list):
                misuse.setdefault(term_type, []).append(f"{path} ({type(value).__name__})")
    problems = []
    for term_type, where in misuse.items():
        more = f" and {len(where) - shown} more" if len(where) > shown else ""
        problems.append(
            f"type '{term_type}': posts use this key for something other than a list of terms:"
            f" {', '.join(where[:shown])}{more}"
        )
    return problems


def make_classifier(settings: Settings, throttle: Throttle | None = None) -> Classifier:
    """A classifier wired from settings: taxonomy folder, prompt templates and provider."""
    from worker.prompts import load_templates
    from worker.providers import make_provider
    from worker.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(settings.taxonomy_dir, known_types=settings.selection)
    templates = load_templates(settings.prompts_dir)
    return Classifier(settings, taxonomy, templates, make_provider(settings, templates, throttle))
