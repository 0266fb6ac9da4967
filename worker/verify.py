"""`tagger verify`: on-call's proof that nothing was lost. Every post against its record, and no LLM call.

A post drifted when its record is missing, when the record and the file disagree (a write tagger announced did
not land or is not settled, terms tagger assigned are absent from the file and were not removed by people, the
file is not the one tagger last wrote or read), when it was judged with an older taxonomy, prompt or model, or
when a failed job for it is pending. The post's bytes are the truth: every memory of "done" is checked against
them (see `Classifier.due`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

from worker.backfill import Summary, check_types, post_files, run_inline
from worker.classifier import make_classifier
from worker.errors import TaggerError, kind_of
from worker.oncall import failures
from worker.queue.enqueue import Enqueued, enqueue_posts
from worker.settings import Settings

FAILED_JOB = "failed_job"
UNREADABLE = "unreadable"
# The order kinds are listed in: what a person must look at first.
KINDS = ("not_written", "unsettled", "terms_missing", "record_missing", "file_changed", "stale", FAILED_JOB, UNREADABLE)


@dataclass(frozen=True)
class Drift:
    """One post that is not what its record says tagger left: its path, why (a kind), and the facts."""

    path: Path
    post: str  # relative to the content root
    kind: str
    detail: str


@dataclass
class Verification:
    """What `verify` found: how many posts were checked, which drifted, and whether failed jobs were looked at."""

    checked: int = 0
    drifted: list[Drift] = field(default_factory=list)
    passed_over: int = 0  # no front matter (TAGGER_NO_FRONT_MATTER=skip) or nothing to classify: nothing to verify
    failed_jobs_checked: bool = False
    failed_jobs_note: str = ""  # why failed jobs were not looked at (no Redis)

    def by_kind(self) -> dict[str, int]:
        """How many posts drifted, per kind, in the order of KINDS."""
        counts = Counter(d.kind for d in self.drifted)
        return {k: counts[k] for k in sorted(counts, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS))}

    def fixable(self) -> list[Path]:
        """The drifted posts classifying can heal (an unreadable post cannot be classified either)."""
        return [d.path for d in self.drifted if d.kind != UNREADABLE]


def verify(
    settings: Settings,
    folder: Path | str | None = None,
    types: Sequence[str] | None = None,
    redis: Redis | None = None,
) -> Verification:
    """Check every post under `folder` (default: the content root) against its record; read only, no call.

    With `redis`, a post whose job sits in the failed registry drifted too (`failed_job`).
    """
    classifier = make_classifier(settings)
    check_types(classifier, types)
    paths, _ = post_files(settings, folder)
    root = settings.content_root()
    report = Verification(failed_jobs_checked=redis is not None)
    failed: dict[str, str] = {}
    if redis is not None:
        for failure in failures(settings, redis):
            failed.setdefault(failure.post, f"{failure.kind}: {failure.message}"[:300])
    for path in paths:
        relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        report.checked += 1
        try:
            post = classifier.read(path)
            if classifier.skip_reason(post) is not None:
                report.passed_over += 1
                continue
            due = classifier.due(post, classifier.records.load(path), types)
        except Exception as exc:  # one post that cannot be read is reported, the rest still checked
            message = exc.message if isinstance(exc, TaggerError) else f"{type(exc).__name__}: {exc}"[:300]
            report.drifted.append(Drift(path, relative, UNREADABLE, f"{kind_of(exc)}: {message}"))
            continue
        job = failed.get(relative)
        if due is not None:
            detail = due.detail + (f" (a failed job is pending: {job})" if job else "")
            report.drifted.append(Drift(path, relative, due.kind, detail))
        elif job:
            report.drifted.append(Drift(path, relative, FAILED_JOB, job))
    report.drifted.sort(key=lambda d: d.post)
    return report


def fix_queued(
    settings: Settings, report: Verification, redis: Redis, types: Sequence[str] | None = None
) -> list[Enqueued]:
    """Enqueue every drifted post that classifying can heal (at high priority: it was promised already)."""
    return enqueue_posts(report.fixable(), settings, redis, "high", types=types)


def fix_inline(settings: Settings, report: Verification, types: Sequence[str] | None = None) -> Summary:
    """Classify every drifted post that classifying can heal, in this process."""
    return run_inline(settings, report.fixable(), types=types)
