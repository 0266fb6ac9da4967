"""Judging a post's terms with the cache, and classifying a post (judge, decide, write back) end to end."""

from __future__ import annotations

import contextvars
import functools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from worker.decide import Decided, Due, decide, drift, retired
from worker.errors import InvalidReply, PostChanged, TaggerError
from worker.posts import Post, check_writable, read_post
from worker.prompts import CHARS_PER_TOKEN, PostText, Prompt, Templates, build_prompt, prompt_version
from worker.providers import OfflineProvider, Provider
from worker.providers.base import ModeMemory, Throttle
from worker.records import Record, RecordStore, reconcile
from worker.reply import TermScores, confidence, not_relevant, over_limits, reply_problem, reply_schema
from worker.results import Classification, Judged, Judgement, Usage, level
from worker.settings import Settings
from worker.taxonomy import Taxonomy, Term, taxonomy_for
from worker.writeback import cache_record, write_back

log = structlog.get_logger("tagger.classifier")
CHANGED_POST_PASSES = 3
# Most of the token budget goes to the body: a title or description past these shares of it is cut.
TITLE_SHARE, DESCRIPTION_SHARE = 1 / 16, 1 / 8
NOTHING_TO_CLASSIFY = "nothing to classify"
NO_FRONT_MATTER = "no front matter"
# Called with each chunk's judgements as soon as that chunk is judged (from the chunk's thread).
OnChunk = Callable[[list[Judgement]], None]


@dataclass(frozen=True)
class Classifier:
    """Everything needed to classify posts: settings, taxonomy, templates and a provider."""

    settings: Settings
    taxonomy: Taxonomy
    templates: Templates
    provider: Provider

    @property
    def _calls(self) -> ThreadPoolExecutor:
        """The threads a post's calls run on, TAGGER_CONCURRENCY at most: started once a process, reused by each post.

        A pool per post started (and joined) its threads for every job: on a busy machine, milliseconds per job
        that are not the model's wait. A forked child gets a pool of its own (the parent's threads are not in it).
        """
        cached: tuple[int, ThreadPoolExecutor] | None = self.__dict__.get("_pool")
        if cached is None or cached[0] != os.getpid():
            pool = ThreadPoolExecutor(max_workers=max(1, self.settings.concurrency), thread_name_prefix="tagger-call")
            cached = self.__dict__["_pool"] = (os.getpid(), pool)  # a cache beside the frozen fields, not one of them
        return cached[1]

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

    def skip_reason(self, post: Post) -> str | None:
        """Why a post is left alone unjudged: no front matter (`TAGGER_NO_FRONT_MATTER=skip`), or nothing in it."""
        if not post.has_content:
            return NOTHING_TO_CLASSIFY
        if post.format == "none" and self.settings.no_front_matter == "skip":
            return NO_FRONT_MATTER
        return None

    def classify(self, path: Path, *, dry_run: bool = False, types: Sequence[str] | None = None) -> Classification:
        """Classify one post and write it back; a post edited meanwhile is read and judged again."""
        for attempt in range(1, CHANGED_POST_PASSES + 1):
            post = self.read(path)
            reason = self.skip_reason(post)
            if reason is not None:
                log.info("skipped", post=str(path), reason=reason)
                return Classification(
                    post=str(path), content_hash=post.content_hash, judgements=[], decisions=[], assigned={},
                    removed_by_people={}, usage=Usage(), cached_terms=0, skipped=reason,
                )  # fmt: skip
            if not dry_run and not post.human_only:
                check_writable(path)  # a locked post is not judged either: no call spent on what cannot be written
            stored = self.records.load(path)
            record = reconcile(stored, post)
            chunks: list[Judgement] = []
            try:
                judged = self.judge(post, self.terms_for(post, types), record, on_chunk=chunks.extend)
            except TaggerError:
                # Judgements of the chunks that succeeded are kept, so a retry asks only the missing ones.
                if chunks and not dry_run:
                    self.cache_judgements(path, stored, record, chunks)
                raise
            decided = decide(post, record, judged, self.taxonomy, self.settings, types, with_diff=dry_run)
            if dry_run:
                if decided.result.usage.calls:
                    self.cache_dry_run(path, stored, record, decided.result.judgements)
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

    def cache_judgements(self, path: Path, stored: Record, record: Record, judgements: Sequence[Judgement]) -> None:
        """Add judgements to the post's record (the cache) without touching its assignments; `stored` is the record
        as read (another writer's newer record is kept instead)."""
        kept = {(j.type, j.term): j for j in [*record.judgements, *judgements]}
        cache_record(self.records, path, stored, record.model_copy(update={"judgements": list(kept.values())}))

    def cache_dry_run(self, path: Path, stored: Record, record: Record, judgements: Sequence[Judgement]) -> None:
        """Keep a dry run's judgements in the record (the cache): the real run reuses them instead of paying again.

        Only judgements: no post is written and nothing is marked assigned. A record that cannot be written costs
        the cache, not the dry run.
        """
        kept = {(j.type, j.term): j for j in [*record.judgements, *judgements]}
        # No file hash: the record's assignments no longer answer for these judgements, so the post is not fresh
        # and the next backfill decides and writes it, from these judgements, with no call.
        undecided = record.model_copy(update={"judgements": list(kept.values()), "file_hash": ""})
        try:
            cache_record(self.records, path, stored, undecided)
        except (TaggerError, OSError) as exc:
            log.info("dry_run_judgements_not_kept", post=str(path), error=str(exc))

    def cache_answered(self, path: Path, types: Sequence[str] | None = None) -> int:
        """Judge every chunk of the post the provider can answer and keep those judgements; how many were kept.

        For replies already paid for (a batch's good lines): a chunk that fails is passed over, not fatal, so the
        retry of the post asks only the chunks that failed. Nothing is written to the post.
        """
        post = self.read(path)
        stored = self.records.load(path)
        record = reconcile(stored, post)
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
            answered = [j.model_copy(update={"judged_at": now}) for j in answered]
            self.cache_judgements(path, stored, record, answered)
        return len(answered)

    def terms_for(self, post: Post, types: Sequence[str] | None = None) -> list[Term]:
        """The terms to judge a post against: a term page is never judged against its own term."""
        own = _resolved(post.path)
        return [t for t in self.terms_of(types) if _term_file(t.path) != own]

    def is_fresh(self, post: Post, record: Record, types: Sequence[str] | None = None) -> bool:
        """True when the post as it is on disk is what the record says tagger left, and the record answers for this
        taxonomy, prompt and model: nothing to ask, write, settle or remove. `record` as stored (not reconciled)."""
        return self.due(post, record, types) is None

    def due(self, post: Post, stored: Record, types: Sequence[str] | None = None) -> Due | None:
        """Why the post needs classifying again, or None. The post's bytes are the truth: the record is checked
        against the file (the hash tagger wrote or saw, the terms it assigned, a write it announced), then against
        the taxonomy, prompt and model its judgements were made with. Reading only: no call, nothing written."""
        if self.skip_reason(post) is not None:
            return None
        found = drift(post, stored, types)
        if found is not None:
            return found
        _, todo = self.split_cached(post, self.terms_for(post, types), stored)
        if todo:
            return Due("stale", self._why_stale(post, todo, stored))
        left = {k: t for k, t in retired(self.taxonomy, stored).items() if t and (not types or k in types)}
        if left:
            gone = "; ".join(f"{k}: {', '.join(t)}" for k, t in sorted(left.items()))
            return Due("stale", f"assigned terms left the taxonomy ({gone})")
        return None

    def _why_stale(self, post: Post, todo: Sequence[Term], record: Record) -> str:
        """What changed since the judgements were made: the post, a term, the prompt or the model."""
        cached = record.cached()
        reasons: Counter[str] = Counter()
        for term in todo:
            old = cached.get((term.type, term.title))
            if old is None:
                reasons["never judged"] += 1
            elif old.content_hash != post.content_hash:
                reasons["the post changed"] += 1
            elif old.definition_hash != term.definition_hash:
                reasons["the term's definition changed"] += 1
            elif old.prompt_version != self.prompt_version:
                reasons["an older prompt"] += 1
            else:
                reasons[f"another model ({old.model})"] += 1
        return "; ".join(f"{n} terms: {why}" for why, n in reasons.most_common())

    @property
    def prompt_version(self) -> str:
        """What judgements are cached under: templates, definitions, reply shape, structured mode and packing."""
        s = self.settings
        mode = str(getattr(self.provider, "mode", "none"))  # the offline baseline has no structured mode
        return prompt_version(self.templates, s.definitions, s.reply, mode, s.pack_types)

    def judge(self, post: Post, terms: Sequence[Term], record: Record, on_chunk: OnChunk | None = None) -> Judged:
        """Judgements for `terms` (cached where still valid), with usage, cache hits, chars cut and LLM seconds.

        `on_chunk` gets each chunk's judgements as soon as they are in, also when another chunk then fails.
        """
        keep, todo = self.split_cached(post, terms, record)
        content_hash = post.content_hash
        if self.settings.shortlist_min and todo:
            skipped, todo = self.shortlist(post, todo)
            keep += skipped
        prompts, cut = self.prompts_for(post, todo)
        usage = Usage()
        fresh: list[Judgement] = []
        failed = threading.Event()

        def run(prompt: Prompt) -> tuple[list[Judgement], Usage]:
            if failed.is_set():
                return [], Usage()
            try:
                judged, used = self._judge_prompt(prompt, content_hash)
                if on_chunk is not None:
                    on_chunk(judged)
            except BaseException:
                failed.set()
                raise
            return judged, used

        waited = time.monotonic()
        # Each call runs in a copy of this context, so its `llm_call` event keeps the job id and post bound by the job.
        futures = [self._calls.submit(contextvars.copy_context().run, run, prompt) for prompt in prompts]
        try:
            for future in futures:
                judged, used = future.result()
                fresh.extend(judged)
                usage = usage.add(used)
        except TaggerError as exc:
            for future in futures:  # the chunks not started spend nothing; those started end before they count
                future.cancel()
            wait(futures)
            # Every call counts (eval's cost line): those of the chunks that succeeded and of those that failed.
            spent = exc.usage or Usage()
            for future in futures:
                if future.done() and not future.cancelled():
                    other = future.exception()
                    if other is None:
                        spent = spent.add(future.result()[1])
                    elif other is not exc and isinstance(other, TaggerError):
                        spent = spent.add(other.usage or Usage())
            exc.usage = spent
            raise
        finally:
            # One failed chunk fails the post: chunks not yet started spend no calls; those started end first.
            for future in futures:
                future.cancel()
            wait(futures)
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
        """One prompt per chunk: whole types packed together while they fit a chunk, a bigger type in even chunks.

        The post is paid once per call, so the types that fit one call share it. A chunk whose reply schema would
        pass OpenAI's strict-mode limits is split in two.
        """
        s = self.settings
        chunks: list[list[Term]] = []
        packed: list[Term] = []
        for term_type in dict.fromkeys(t.type for t in terms):
            of_type = [t for t in terms if t.type == term_type]
            if len(of_type) > s.chunk_size:
                # Even chunks (41 terms at 40 a chunk become 21 + 20, not 40 + 1).
                count = -(-len(of_type) // s.chunk_size)
                size = -(-len(of_type) // count)
                chunks += [of_type[i : i + size] for i in range(0, len(of_type), size)]
            elif s.pack_types and len(packed) + len(of_type) <= s.chunk_size:
                packed += of_type
            elif not s.pack_types:
                chunks.append(of_type)
            else:
                chunks.append(packed)
                packed = of_type
        if packed:
            chunks.append(packed)
        prompts: list[Prompt] = []
        for chunk in chunks:
            prompts += self._within_limits(build_prompt(self.templates, chunk, text, s.definitions, s.reply))
        return prompts

    def _within_limits(self, prompt: Prompt) -> list[Prompt]:
        """The prompt, or its halves (again if need be) when its reply schema passes a strict-mode limit."""
        if len(prompt.terms) < 2 or not over_limits(reply_schema(prompt.groups, prompt.reply)):
            return [prompt]
        half = len(prompt.terms) // 2
        s = self.settings
        return [
            *self._within_limits(
                build_prompt(self.templates, prompt.terms[:half], prompt.post, s.definitions, s.reply)
            ),
            *self._within_limits(
                build_prompt(self.templates, prompt.terms[half:], prompt.post, s.definitions, s.reply)
            ),
        ]

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
            by_name = {(t.type, t.title): t for t in prompt.terms}
            replies = [_typed(prompt, j) for j in OfflineProvider().judge(prompt).judgements]
            for judgement in self._judgements(by_name, replies, post.content_hash, "shortlist"):
                if judgement.confidence < self.settings.shortlist_min:
                    skipped.append(judgement.model_copy(update={"reason": f"not asked: {judgement.reason}"}))
                else:
                    ask.append(by_name[(judgement.type, judgement.term)])
        return skipped, ask

    def _judgements(
        self, by_name: dict[tuple[str, str], Term], replies: Sequence[TermScores], content_hash: str, provider: str
    ) -> list[Judgement]:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        judgements = []
        for scores in replies:
            term = by_name[(scores.type, scores.term)]
            value = confidence(scores, self.settings.weights)
            judgements.append(
                Judgement(
                    type=term.type,
                    term=term.title,
                    scores={k: v for k, v in scores.model_dump().items() if k not in ("term", "reason", "type")},
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
        by_name = {(t.type, t.title): t for t in terms}
        # A provider may name a term by its title alone: within the prompt's terms it names one type, or none.
        given = [_typed(prompt, j) for j in reply.judgements]
        asked_types = {t for t, _ in prompt.groups}
        # The provider checked this too; checked again here, so that no provider can add a term outside the taxonomy.
        problems = [f"terms that were not asked: {', '.join(j.term for j in given if j.type not in asked_types)}"]
        problems = problems if any(j.type not in asked_types for j in given) else []
        for term_type, titles in prompt.groups:
            got_of_type = [j.term for j in given if j.type == term_type]
            problem = reply_problem(titles, got_of_type, complete=prompt.reply == "all")
            if problem:
                problems.append(problem)
        if problems:
            raise InvalidReply(f"reply does not answer the terms asked: {'; '.join(problems)}", raw_reply=reply.raw)
        got = {(j.type, j.term) for j in given}
        # TAGGER_REPLY=relevant: a term the model left out is recorded as judged, every sub-score 0.
        scores = [*given, *(not_relevant(t.title, t.type) for t in terms if (t.type, t.title) not in got)]
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
        self,
        post: Post,
        record: Record,
        types: Sequence[str] | None = None,
        with_diff: bool = False,
        on_chunk: OnChunk | None = None,
    ) -> Decided:
        """Judge the post's terms (cached where valid), then decide: the owned-key changes and the new record.

        Works on a post's bytes and record alone (no file is read or written), so a remote worker runs it too.
        """
        judged = self.judge(post, self.terms_for(post, types), record, on_chunk)
        return decide(post, record, judged, self.taxonomy, self.settings, types, with_diff)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


@functools.lru_cache(maxsize=8192)
def _term_file(path: str) -> Path:
    return _resolved(Path(path))


def make_classifier(
    settings: Settings, throttle: Throttle | None = None, memory: ModeMemory | None = None
) -> Classifier:
    """A classifier wired from settings: taxonomy folder, prompt templates and provider."""
    from worker.prompts import load_templates
    from worker.providers import make_provider

    taxonomy = taxonomy_for(settings)
    templates = load_templates(settings.prompts_dir)
    return Classifier(settings, taxonomy, templates, make_provider(settings, templates, throttle, memory))


def _typed(prompt: Prompt, scores: TermScores) -> TermScores:
    """The entry with its term's type: as the reply said, else the one type of the prompt's terms with that title."""
    if scores.type:
        return scores
    types = [t.type for t in prompt.terms if t.title == scores.term]
    return scores.model_copy(update={"type": types[0]}) if len(types) == 1 else scores
