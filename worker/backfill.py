"""Backfill: find the posts that need work, run them inline or follow them through the queue."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from redis import Redis, RedisError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from worker import untrusted
from worker.classifier import NO_FRONT_MATTER, Classifier, make_classifier
from worker.errors import PostReadOnly, SettingsError, TaggerError, TaxonomyError, kind_of
from worker.paths import confine_folder, not_a_post, walk_posts
from worker.polling import Progress, Tally, poll_until
from worker.posts import check_writable
from worker.prompts import estimate_tokens
from worker.queue.enqueue import enqueue_posts
from worker.queue.fleet import live_workers
from worker.queue.recovery import recover
from worker.queue.workers import Backoff
from worker.reply import reply_schema, reply_tokens
from worker.settings import Settings


@dataclass
class Plan:
    """Posts to classify, how many were fresh, which were skipped (`path: reason`, one per post), and the files
    left alone because they have no front matter (`TAGGER_NO_FRONT_MATTER=skip`: by setting, not a problem)."""

    todo: list[Path] = field(default_factory=list)
    fresh: int = 0
    skipped: list[str] = field(default_factory=list)
    no_front_matter: list[Path] = field(default_factory=list)


@dataclass
class Summary:
    """How a backfill ended."""

    done: int = 0
    written: int = 0
    calls: int = 0
    tokens: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: kind: message" of posts left alone (read-only)
    retired: list[str] = field(default_factory=list)  # "path: type: terms" tagger took back (left the taxonomy)


def post_files(settings: Settings, folder: Path | str | None = None) -> tuple[list[Path], list[str]]:
    """The posts under `folder` (default: the content root) as resolved paths, and the skipped files' reasons."""
    start = confine_folder(folder, settings) if folder is not None else settings.content_root()
    if folder is None and not start.is_dir():
        raise SettingsError(f"the content root {settings.content_root_label()} is not a folder")
    posts: list[Path] = []
    skipped: list[str] = []
    root = settings.content_root()
    for found in walk_posts(start, settings):
        if found.relative is None:
            skipped.append(f"{found.path}: {found.skipped}")
        else:
            posts.append(root / found.relative)
    return posts, skipped


def check_types(classifier: Classifier, types: Sequence[str] | None) -> None:
    """Refuse a type the taxonomy does not have (a typo would otherwise judge nothing)."""
    known = classifier.taxonomy.types()
    unknown = [t for t in types or () if t not in known]
    if unknown:
        raise TaxonomyError(
            f"no type {', '.join(map(repr, unknown))} in the taxonomy {classifier.settings.taxonomy_dir}; "
            f"its types: {', '.join(known) or '(none)'}"
        )


def plan(
    settings: Settings,
    include_fresh: bool = False,
    limit: int | None = None,
    types: Sequence[str] | None = None,
    folder: Path | str | None = None,
) -> Plan:
    """Which posts under `folder` need classifying: record missing or stale (all with `include_fresh`).

    Each post is planned on its own: one that cannot be read, or is read-only and due, is skipped with its
    reason, the rest go on.
    """
    classifier = make_classifier(settings)
    check_types(classifier, types)
    paths, skipped = post_files(settings, folder)
    result = Plan(skipped=skipped)
    for path in paths:
        if limit is not None and len(result.todo) >= limit:
            break
        try:
            post = classifier.read(path)
            if classifier.skip_reason(post) == NO_FRONT_MATTER:
                result.no_front_matter.append(path)
                continue
            fresh = classifier.is_fresh(
                post, classifier.records.load(path), types
            )  # as stored: checked against the file
            if not (fresh and not include_fresh) and not post.human_only:
                check_writable(path)
        except Exception as exc:  # one post that breaks the parser (deep nesting, odd bytes) must not stop the plan
            message = exc.message if isinstance(exc, TaggerError) else f"{type(exc).__name__}: {exc}"[:300]
            result.skipped.append(f"{path}: {kind_of(exc)}: {message}")
            continue
        if fresh and not include_fresh:
            result.fresh += 1
        else:
            result.todo.append(path)
    return result


# TAGGER_REPLY=relevant answers only for the terms that apply: assumed about 15% of those asked (the corpus's own
# front matter picks 8% of its terms; a model names some more as applying than a selection keeps).
RELEVANT_SHARE = 0.15
CACHE_MIN_TOKENS = 1024
CACHE_STEP = 128


@dataclass
class Estimate:
    """What classifying some posts would cost, computed without calling anything."""

    posts: int = 0
    calls: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None


def estimate(settings: Settings, todo: list[Path], types: Sequence[str] | None = None, batch: bool = False) -> Estimate:
    """Calls, tokens (the part a prefix cache can serve) and cost for `todo` with the configured model."""
    classifier = make_classifier(settings.model_copy(update={"provider_choice": "openai"}))
    seen: set[str] = set()
    result = Estimate()
    for path in todo:
        try:
            post = classifier.read(path)
        except TaggerError:
            continue
        _, asked = classifier.split_cached(post, classifier.terms_for(post, types), classifier.load_record(post))
        prompts, _ = classifier.prompts_for(post, asked)
        result.posts += 1
        for prompt in prompts:
            # The reply schema is billed as input too, and rides in the prefix (in response_format, or at the end
            # of the system message without a strict server): one prefix, cached as a whole.
            system = prompt.messages[0]["content"] + json.dumps(reply_schema(prompt.groups, prompt.reply))
            result.calls += 1
            result.input_tokens += estimate_tokens(system) + estimate_tokens(prompt.messages[1]["content"])
            share = 1.0 if settings.reply == "all" else RELEVANT_SHARE
            # Each entry as the schema asks it (two-digit scores, a reason of its maxLength): a bound, not a wish.
            result.output_tokens += reply_tokens(prompt.groups, settings.reply, share)
            prefix = estimate_tokens(system)
            # Providers cache a repeated prefix of at least 1,024 tokens, in steps of 128.
            if system in seen and prefix >= CACHE_MIN_TOKENS:
                result.cached_tokens += prefix // CACHE_STEP * CACHE_STEP
            seen.add(system)
    price = settings.prices.get(settings.model)
    if price and batch:
        price = price.batch()
    if price:
        uncached = result.input_tokens - result.cached_tokens
        result.cost = (
            uncached * price.input + result.cached_tokens * price.cached_input + result.output_tokens * price.output
        ) / 1_000_000
    return result


@dataclass(frozen=True)
class Ratio:
    """What one configuration costs against one call per term, synchronously (the baseline)."""

    reply: str
    batch: bool
    cost: float
    ratio: float


def estimate_ratios(settings: Settings, todo: list[Path], types: Sequence[str] | None = None) -> list[Ratio]:
    """Dollars for `all` and `relevant`, synchronous and through the Batch API, against one call per term.

    Empty when the model has no price. The chunking, definitions and packing are the settings' own.
    """
    baseline = estimate(settings.model_copy(update={"chunk_size": 1, "reply": "all"}), todo, types).cost
    if not baseline:
        return []
    ratios = []
    for reply in ("all", "relevant"):
        for batch in (False, True):
            cost = estimate(settings.model_copy(update={"reply": reply}), todo, types, batch=batch).cost
            if cost:
                ratios.append(Ratio(reply=reply, batch=batch, cost=cost, ratio=baseline / cost))
    return ratios


def run_inline(
    settings: Settings, todo: list[Path], progress: Progress | None = None, types: Sequence[str] | None = None
) -> Summary:
    """Classify posts in this process (no Redis); one post's failure never stops the others."""
    classifier = make_classifier(settings)
    check_types(classifier, types)
    summary = Summary()
    started = time.monotonic()
    root = settings.content_root()
    for path in todo:
        post = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        try:
            with structlog.contextvars.bound_contextvars(post=post):
                result = classifier.classify(path, types=types)
        except PostReadOnly as exc:
            summary.skipped.append(f"{path}: {exc.kind}: {exc.message}")
        except Exception as exc:  # a read-only folder or a parser crash fails this post only
            message = exc.message if isinstance(exc, TaggerError) else f"{type(exc).__name__}: {exc}"[:300]
            summary.failed.append(f"{path}: {kind_of(exc)}: {message}")
            spent = getattr(exc, "usage", None)
            if spent is not None:  # a failed post's calls were made (and paid for) too
                summary.calls += spent.calls
                summary.tokens += spent.input_tokens + spent.output_tokens
        else:
            summary.done += 1
            summary.written += int(result.written)
            summary.calls += result.usage.calls
            summary.tokens += result.usage.input_tokens + result.usage.output_tokens
            summary.retired += [f"{path}: {d.type}: {', '.join(d.retired)}" for d in result.decisions if d.retired]
        if progress:
            progress(summary.done, len(summary.failed), len(todo), started, summary.tokens)
    return summary


def follow(
    settings: Settings,
    redis: Redis,
    job_ids: list[str],
    progress: Progress | None = None,
    poll: float = 0.5,
    posts: Mapping[str, str] | None = None,
    notice: Callable[[str], None] | None = None,
    priority: str = "low",
) -> Summary:
    """Wait until every job finished or failed for good, reporting progress.

    A job that ends having queued its post's rerun (a producer asked for the post while it ran) is followed by
    that rerun: the post counts as done or failed by the rerun's outcome.

    Recovery runs at every poll. Redis trouble is waited out (reconnecting). A job that vanished from Redis
    (restarted without persistence) is enqueued again when its post is known (`posts`: job id -> post
    relative to the content root). `notice` hears what the user must know: no live worker, Redis down,
    posts enqueued again.
    """
    say = notice or (lambda _: None)
    summary = Summary()
    pending = set(job_ids)
    known = dict(posts or {})
    backoff = Backoff()
    down_since: float | None = None
    next_worker_check = time.monotonic() + min(2.0, poll * 4)
    warned_no_worker = False

    def look() -> Tally | None:
        nonlocal down_since, next_worker_check, warned_no_worker
        try:
            recover(settings, redis)
            ids = list(pending)
            vanished = []
            for job_id, job in zip(ids, Job.fetch_many(ids, connection=redis, serializer=JSONSerializer), strict=True):
                if job is None:
                    vanished.append(job_id)
                    continue
                status = job.get_status(refresh=False)
                meta = job.meta if isinstance(job.meta, dict) else {}  # Redis is untrusted input
                if status == JobStatus.FINISHED:
                    pending.discard(job.id)
                    value = job.return_value() or {}
                    value = value if isinstance(value, dict) else {}
                    summary.tokens += untrusted.whole(value.get("tokens"))
                    rerun = value.get("rerun")
                    if isinstance(rerun, str) and rerun:
                        # Asked for again while it ran (edited): the post is done when its rerun is.
                        pending.add(rerun)
                        if job.id in known:
                            known[rerun] = known[job.id]
                        continue
                    summary.done += 1
                elif status == JobStatus.FAILED:
                    pending.discard(job.id)
                    summary.failed.append(f"{meta.get('post', '?')}: {meta.get('kind', '?')}: {meta.get('error', '')}")
                elif status in (JobStatus.CANCELED, JobStatus.STOPPED):  # `tagger cancel`: nothing to wait for
                    pending.discard(job.id)
                    summary.failed.append(f"{meta.get('post', '?')}: cancelled: taken off the queue (tagger cancel)")
            again = [known[j] for j in vanished if j in known]
            if again:
                root = settings.content_root()
                # The vanished ids leave (a rerun's `-again` id too, which is not the post's first id).
                pending.difference_update(j for j in vanished if j in known)
                for item in enqueue_posts([root / p for p in again], settings, redis, priority):
                    if item.action == "refused":  # deleted (or made a non-post) meanwhile: nothing to wait for
                        summary.failed.append(f"{item.path}: refused: {item.reason}")
                        continue
                    pending.add(item.job_id)
                    known[item.job_id] = item.path
                say(f"enqueued {len(again)} posts again: their jobs vanished from Redis (restart without persistence?)")
            for job_id in vanished:
                if job_id not in known:
                    pending.discard(job_id)
                    summary.failed.append(f"{job_id}: vanished: the job is gone from Redis; run the backfill again")
            if time.monotonic() >= next_worker_check and pending:
                next_worker_check = time.monotonic() + 5
                live = bool(live_workers(settings, redis))
                if not live and not warned_no_worker:
                    say("no worker is running: start 'tagger work'")
                warned_no_worker = not live
            if down_since is not None:
                say(f"Redis is back after {time.monotonic() - down_since:.0f}s")
                down_since = None
            backoff.reset()
        except RedisError as exc:
            if down_since is None:
                down_since = time.monotonic()
                say(f"Redis unavailable ({type(exc).__name__}); waiting for it")
            time.sleep(backoff.next())
            return None
        return Tally(summary.done, len(summary.failed), len(job_ids), summary.tokens, finished=not pending)

    if pending:
        poll_until(look, poll, progress)
    return summary


@dataclass(frozen=True)
class Changes:
    """Posts a git range added or modified, and posts it deleted (absolute paths)."""

    changed: list[str]
    deleted: list[str]


def changed_since(settings: Settings, rev: str) -> Changes:
    """Posts under the content root changed since a git revision (renames count as a delete and an add)."""
    root = settings.content_root()
    if not root.is_dir():
        raise SettingsError(f"the content root {settings.content_root_label()} is not a folder")
    try:
        out = subprocess.run(
            ["git", "diff", "--relative", "--name-status", "-z", "-M", rev, "--", "."],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except FileNotFoundError as exc:
        raise SettingsError("--changed-since needs git on PATH") from exc
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or "").strip().splitlines()
        raise SettingsError(
            f"git diff {rev} failed in {root}: {reason[0] if reason else f'exit {exc.returncode}'}"
        ) from exc
    fields = out.split("\0")
    changed: list[str] = []
    deleted: list[str] = []
    i = 0
    while i < len(fields) and fields[i]:
        status = fields[i]
        if status[0] in "RC":
            old, new, i = fields[i + 1], fields[i + 2], i + 3
            if status[0] == "R":
                deleted.append(old)
            changed.append(new)
        else:
            (deleted if status[0] == "D" else changed).append(fields[i + 1])
            i += 2
    keep = [p for p in changed if not not_a_post(p, settings)]
    gone = [p for p in deleted if not not_a_post(p, settings) and not (root / p).exists()]
    return Changes([str(root / p) for p in keep], [str(root / p) for p in gone])
