"""Backfill: find the posts that need work, run them inline or follow them through the queue."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from worker.classifier import make_classifier
from worker.errors import TaggerError
from worker.prompts import estimate_tokens
from worker.queue.recovery import recover_abandoned
from worker.settings import Settings

Progress = Callable[[int, int, int, float, int], None]


@dataclass
class Plan:
    """Posts to classify, how many were fresh, and which could not be read."""

    todo: list[Path] = field(default_factory=list)
    fresh: int = 0
    bad: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """How a backfill ended."""

    done: int = 0
    written: int = 0
    calls: int = 0
    tokens: int = 0
    failed: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)  # "path: type: terms" tagger took back (left the taxonomy)


def post_files(root: Path) -> list[Path]:
    """Markdown posts under the content root (hidden files and folders skipped)."""
    return sorted(
        p
        for p in root.rglob("*.md")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def plan(
    settings: Settings, include_fresh: bool = False, limit: int | None = None, types: Sequence[str] | None = None
) -> Plan:
    """Which posts need classifying: those whose record is missing or stale (all with `include_fresh`)."""
    classifier = make_classifier(settings)
    result = Plan()
    for path in post_files(settings.content_root()):
        if limit is not None and len(result.todo) >= limit:
            break
        try:
            post = classifier.read(path)
        except TaggerError as exc:
            result.bad.append(f"{path}: {exc.kind}: {exc.message}")
            continue
        fresh = classifier.is_fresh(post, classifier.load_record(post), types)
        if fresh and not include_fresh:
            result.fresh += 1
        else:
            result.todo.append(path)
    return result


OUTPUT_TOKENS_PER_TERM = 60
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


def estimate(settings: Settings, todo: list[Path], types: Sequence[str] | None = None) -> Estimate:
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
            system = prompt.messages[0]["content"]
            result.calls += 1
            result.input_tokens += sum(estimate_tokens(m["content"]) for m in prompt.messages)
            result.output_tokens += OUTPUT_TOKENS_PER_TERM * len(prompt.names)
            prefix = estimate_tokens(system)
            # Providers cache a repeated prefix of at least 1,024 tokens, in steps of 128.
            if system in seen and prefix >= CACHE_MIN_TOKENS:
                result.cached_tokens += prefix // CACHE_STEP * CACHE_STEP
            seen.add(system)
    price = settings.prices.get(settings.model)
    if price:
        uncached = result.input_tokens - result.cached_tokens
        result.cost = (
            uncached * price.input + result.cached_tokens * price.cached_input + result.output_tokens * price.output
        ) / 1_000_000
    return result


def run_inline(
    settings: Settings, todo: list[Path], progress: Progress | None = None, types: Sequence[str] | None = None
) -> Summary:
    """Classify posts in this process (no Redis)."""
    classifier = make_classifier(settings)
    summary = Summary()
    started = time.monotonic()
    for path in todo:
        try:
            result = classifier.classify(path, types=types)
        except TaggerError as exc:
            summary.failed.append(f"{path}: {exc.kind}: {exc.message}")
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
    settings: Settings, redis: Redis, job_ids: list[str], progress: Progress | None = None, poll: float = 0.5
) -> Summary:
    """Wait until every job finished or failed for good, reporting progress."""
    summary = Summary()
    started = time.monotonic()
    pending = set(job_ids)
    while pending:
        recover_abandoned(settings, redis)
        for job in Job.fetch_many(list(pending), connection=redis, serializer=JSONSerializer):
            if job is None:
                continue
            status = job.get_status(refresh=False)
            if status == JobStatus.FINISHED:
                pending.discard(job.id)
                summary.done += 1
                value = job.return_value() or {}
                summary.tokens += int(value.get("tokens", 0)) if isinstance(value, dict) else 0
            elif status == JobStatus.FAILED:
                pending.discard(job.id)
                summary.failed.append(f"{job.meta.get('post')}: {job.meta.get('kind')}: {job.meta.get('error')}")
        if progress:
            progress(summary.done, len(summary.failed), len(job_ids), started, summary.tokens)
        if pending:
            time.sleep(poll)
    return summary


def changed_since(settings: Settings, rev: str) -> list[str]:
    """Markdown posts in the content folder changed (added or modified) since a git revision."""
    root = settings.content_root()
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, check=True)
    out = subprocess.run(
        ["git", "diff", "--name-only", "--diff-filter=AMR", rev, "--", "."],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    base = Path(top.stdout.strip())
    return [str(base / line) for line in out.stdout.splitlines() if line.endswith(".md") and (base / line).exists()]
