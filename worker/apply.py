"""`tagger apply`: write remote jobs' results into the site's repository, where the posts are.

Each result is written with the same write-back as a shared-folder worker's (only owned keys, atomic, the
record announced first), and only over the exact bytes the job judged: a post edited since is re-enqueued
(its new judgements kept in its record when its text is unchanged, so the new job asks nothing again).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from worker.errors import PostChanged, TaggerError
from worker.paths import confine, existing_post
from worker.polling import Progress, Tally, poll_until
from worker.posts import Post, file_hash, read_post, render_changes
from worker.queue.enqueue import Enqueued, enqueue_posts, job_id_for
from worker.queue.payload import Outcome
from worker.records import Record, RecordStore, reconcile
from worker.settings import Settings
from worker.writeback import post_mode, save, unwritten, write_back

log = structlog.get_logger("tagger.apply")
DONE = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
APPLIED = ("written", "unchanged", "already-applied")


@dataclass(frozen=True)
class Applied:
    """What `apply` did with one job."""

    job_id: str
    post: str
    action: str  # written | unchanged | already-applied | re-enqueued | failed | waiting | missing
    detail: str = ""  # a failure's `kind: message`, or why a post was re-enqueued
    files: tuple[Path, ...] = ()  # files this apply changed (the post, its record)
    new_job: str = ""  # the job a re-enqueued post got


@dataclass
class ApplyReport:
    """Everything one `apply` did, and the commit it made."""

    items: list[Applied] = field(default_factory=list)
    commit: str = ""

    @property
    def all_applied(self) -> bool:
        """True when every job's result is in the repository."""
        return all(i.action in APPLIED for i in self.items)

    @property
    def changed(self) -> list[Path]:
        """The files this apply changed, in order."""
        return list(dict.fromkeys(f for i in self.items for f in i.files))


def state_file(settings: Settings) -> Path:
    """Where the last remote `enqueue` keeps its job ids (TAGGER_STATE_FILE, else a per-prefix cache file)."""
    if settings.state_file is not None:
        return settings.state_file
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tagger" / f"{settings.redis_prefix}-last-enqueue.json"


def remember(settings: Settings, enqueued: Sequence[Enqueued]) -> None:
    """Keep the job ids of this enqueue for `apply --wait` (written atomically)."""
    path = state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    jobs = {e.job_id: e.path for e in enqueued if e.job_id}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"jobs": jobs}, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def follow_up(settings: Settings, report: ApplyReport) -> None:
    """Remember re-enqueued posts by their new jobs, so the next `apply --wait` waits for those."""
    jobs = {(i.new_job or i.job_id): i.post for i in report.items}
    remember(settings, [Enqueued(post, job_id, "enqueued") for job_id, post in jobs.items()])


def remembered(settings: Settings) -> dict[str, str]:
    """The job ids (and posts) of the last remote enqueue; empty when there was none."""
    try:
        data = json.loads(state_file(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    jobs = data.get("jobs") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in jobs.items()} if isinstance(jobs, dict) else {}


def job_ids(settings: Settings, refs: Sequence[str]) -> list[str]:
    """Job ids for what was named: job ids as given; a post by the job its current content has."""
    ids: list[str] = []
    for ref in refs:
        if ref.startswith("post-") and not Path(ref).exists():
            ids.append(ref)
            continue
        relative = existing_post(ref, settings)
        content_hash = read_post(settings.content_root() / relative, settings.max_front_matter_bytes).content_hash
        ids.append(f"{job_id_for(relative, settings)}-{content_hash[:12]}")
    return ids


def wait_for(
    redis: Redis,
    ids: Sequence[str],
    timeout: float,
    progress: Progress | None = None,
) -> None:
    """Wait until every job has ended (finished, failed, gone) or `timeout` seconds have passed."""

    def look() -> Tally:
        jobs = Job.fetch_many(list(ids), connection=redis, serializer=JSONSerializer)
        statuses = [j.get_status(refresh=False) if j is not None else None for j in jobs]
        done = sum(1 for s in statuses if s == JobStatus.FINISHED)
        ended = sum(1 for s in statuses if s is None or s in DONE)
        return Tally(done, ended - done, len(ids), finished=ended == len(ids))

    poll_until(look, 0.5, progress, timeout=timeout)


def apply(
    settings: Settings,
    redis: Redis,
    ids: Sequence[str],
    posts: dict[str, str] | None = None,
    commit: bool = False,
) -> ApplyReport:
    """Write each finished job's result into its post and record; re-enqueue posts edited since their job."""
    report = ApplyReport()
    for job_id in dict.fromkeys(ids):
        try:
            job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        except NoSuchJobError:
            post = (posts or {}).get(job_id, "")
            report.items.append(Applied(job_id, post, "missing", "no such job (result expired: TAGGER_RESULT_TTL)"))
            continue
        item = _apply_job(settings, redis, job)
        log.info("applied", job_id=job_id, post=item.post, action=item.action, detail=item.detail)
        report.items.append(item)
    if commit and report.changed:
        report.commit = git_commit(settings, report)
    return report


def _apply_job(settings: Settings, redis: Redis, job: Job) -> Applied:
    post_name = str(job.meta.get("post", ""))
    status = job.get_status(refresh=False)
    if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
        kind = job.meta.get("kind", str(status))
        return Applied(job.id, post_name, "failed", f"{kind}: {job.meta.get('error', '')}")
    if status != JobStatus.FINISHED:
        return Applied(job.id, post_name, "waiting", str(status))
    value = job.return_value()
    if not isinstance(value, dict) or "changes" not in value:
        return Applied(job.id, post_name, "failed", "not_remote: the job has no remote result (a shared-folder job?)")
    try:
        return apply_outcome(settings, redis, job.id, Outcome.from_json(value))
    except TaggerError as exc:
        return Applied(job.id, post_name, "failed", f"{exc.kind}: {exc.message}")


def apply_outcome(settings: Settings, redis: Redis, job_id: str, outcome: Outcome) -> Applied:
    """Apply one result: write it over the exact bytes it was made from, or re-enqueue the post."""
    root = settings.content_root()
    path = root / confine(outcome.post, settings, from_cwd=False)
    store = RecordStore(root, settings.records_dir)
    record_file = store.path_for(path)
    before = _bytes(record_file)
    post = read_post(path, settings.max_front_matter_bytes)
    stored = store.load(path)
    record = reconcile(stored, post)
    new_record = outcome.new_record().model_copy(update={"mode": f"{post_mode(path):04o}"})
    if outcome.new_file_hash and post.file_hash == outcome.new_file_hash:
        return Applied(job_id, outcome.post, "already-applied")
    if post.file_hash != outcome.file_hash:
        return _again(settings, redis, job_id, outcome, path, store, post, record, new_record)
    new_text = render_changes(post, outcome.changes) if outcome.changes else None
    if new_text is not None and file_hash(new_text.encode("utf-8")) != outcome.new_file_hash:
        # Rendered here from the same bytes as on the worker: a difference means different tagger versions.
        raise TaggerError(f"the change renders differently here than on the worker (job {job_id})", path=path)
    try:
        written = write_back(store, path, post, stored, record, new_text, new_record)
    except PostChanged:
        return _again(settings, redis, job_id, outcome, path, store, read_post(path), record, new_record)
    files = tuple(f for f, changed in ((path, written), (record_file, _bytes(record_file) != before)) if changed)
    return Applied(job_id, outcome.post, "written" if written else "unchanged", files=files)


def _again(
    settings: Settings,
    redis: Redis,
    job_id: str,
    outcome: Outcome,
    path: Path,
    store: RecordStore,
    post: Post,
    record: Record,
    new_record: Record,
) -> Applied:
    """The post changed since its job: keep the judgements when its text is the same, and enqueue it again."""
    reason = "edited since enqueue (front matter only: judgements kept)"
    if post.content_hash == outcome.content_hash:
        save(store, path, unwritten(new_record, record, post))
    else:
        reason = "edited since enqueue (text changed)"
    enqueued = enqueue_posts([path], settings, redis, remote=True)
    job = next((e.job_id for e in enqueued if e.job_id), "")
    return Applied(job_id, outcome.post, "re-enqueued", f"{reason}; new job {job}", new_job=job)


def _bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def git_commit(settings: Settings, report: ApplyReport) -> str:
    """One git commit of exactly the files `apply` changed (other staged or edited files stay out)."""
    root = settings.content_root()
    files = [str(f) for f in report.changed]
    written = [i.post for i in report.items if i.action == "written"]
    lines = [f"tagger apply: {len(written)} posts classified", ""]
    lines += [f"- {i.post} ({i.action})" for i in report.items if i.files]
    git = ["git", "-C", str(root)]
    subprocess.run([*git, "add", "--", *files], check=True, capture_output=True)
    run = subprocess.run(
        [*git, "commit", "--only", "-m", "\n".join(lines), "--", *files], capture_output=True, text=True
    )
    if run.returncode != 0:
        raise TaggerError(f"git commit failed: {(run.stderr or run.stdout).strip()[:300]}", path=root)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    return head.stdout.strip()
