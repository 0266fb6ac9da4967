"""`tagger apply`: write remote jobs' results into the site's repository, where the posts are.

Each result is written with the same write-back as a shared-folder worker's (only owned keys, atomic, the
record announced first), and only over the exact bytes the job judged: a post edited since is re-enqueued
(its new judgements kept in its record when its text is unchanged, so the new job asks nothing again).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydantic import BaseModel, Field
from redis import Redis, RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from worker import untrusted
from worker.errors import BadResult, CommitFailed, PostChanged, StateUnreadable, TaggerError
from worker.paths import confine, existing_post, site_id
from worker.polling import Progress, Tally, poll_until
from worker.posts import Post, atomic_write, file_hash, read_post
from worker.queue.enqueue import Enqueued, enqueue_posts, job_id_for
from worker.queue.keys import queue_name, queue_names
from worker.records import Record, RecordStore, reconcile
from worker.result_check import Checked, claimed_problems, decide_here, expected_job_id, parse_result
from worker.settings import Settings
from worker.taxonomy import Taxonomy, taxonomy_for
from worker.writeback import cache_record, post_mode, unwritten, write_back

log = structlog.get_logger("tagger.apply")
DONE = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
APPLIED = ("written", "unchanged", "already-applied")
FAILURE_TTL = 30 * 86400  # how long a bad result stays listed for `failed retry` (as a failed job does)
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # what RQ accepts as a job id
HASH = re.compile(r"[0-9a-f]{16,64}")  # posts.file_hash


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
    commit_error: str = ""  # why the commit failed: the writes stay noted for the next `apply --commit`
    earlier: list[str] = field(default_factory=list)  # posts an earlier, interrupted run wrote, committed now
    ignored: list[str] = field(default_factory=list)  # state file entries that failed their checks

    @property
    def all_applied(self) -> bool:
        """True when every job's result is in the repository."""
        return all(i.action in APPLIED for i in self.items)

    @property
    def changed(self) -> list[Path]:
        """The files this apply changed, in order."""
        return list(dict.fromkeys(f for i in self.items for f in i.files))


def state_file(settings: Settings) -> Path:
    """Where `apply` keeps its memory: TAGGER_STATE_FILE, else a cache file of this prefix and checkout.

    Keyed to the content root, so two checkouts on one runner (two pipelines) never share it.
    """
    if settings.state_file is not None:
        return settings.state_file
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tagger" / f"{settings.redis_prefix}-{site_id(settings)}-last-enqueue.json"


class ApplyState(BaseModel):
    """What `apply` remembers between runs: the last remote enqueue's jobs, and what it wrote but did not commit.

    `uncommitted`: post (relative to the content root) -> the hash of the bytes apply wrote into it ("" when only
    its record changed). Noted before each write, cleared once committed, so a run killed in between leaves
    the next `apply --commit` what to commit.
    """

    jobs: dict[str, str] = Field(default_factory=dict)
    uncommitted: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class LoadedState:
    """The state file as read: the entries that passed the checks, and what was ignored (with why)."""

    state: ApplyState
    ignored: list[str]


def load_state(settings: Settings) -> LoadedState:
    """The state file, each entry checked (it is input like any other); a file that is not JSON is an error."""
    path = state_file(settings)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return LoadedState(ApplyState(), [])
    except OSError as exc:
        raise StateUnreadable(f"cannot read the state file: {exc.strerror or exc}", path=path) from exc
    try:
        data = untrusted.loads(raw)
    except ValueError as exc:
        raise StateUnreadable(
            f"the state file is not JSON ({exc}); name the jobs to apply, or remove the file", path=path
        ) from exc
    if not isinstance(data, dict):
        raise StateUnreadable("the state file is not a JSON object; remove it", path=path)
    ignored: list[str] = []
    jobs: dict[str, str] = {}
    for job_id, post in _pairs(data.get("jobs"), "jobs", ignored):
        if JOB_ID.fullmatch(job_id):
            jobs[job_id] = post
        else:
            ignored.append(f"jobs: {job_id[:80]!r} is not a job id")
    uncommitted: dict[str, str] = {}
    for post, digest in _pairs(data.get("uncommitted"), "uncommitted", ignored):
        try:
            relative = confine(post, settings, from_cwd=False)
        except TaggerError as exc:
            ignored.append(f"uncommitted: {post[:200]!r}: {exc.kind}: {exc.message}")
            continue
        if digest and not HASH.fullmatch(digest):
            ignored.append(f"uncommitted: {post[:200]!r}: not a file hash")
            continue
        uncommitted[relative] = digest
    for extra in sorted(set(data) - {"jobs", "uncommitted"}):
        ignored.append(f"{extra[:80]!r} is not part of the state")
    return LoadedState(ApplyState(jobs=jobs, uncommitted=uncommitted), ignored)


def _pairs(value: object, name: str, ignored: list[str]) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        ignored.append(f"{name}: not a JSON object")
        return []
    pairs = []
    for key, item in value.items():
        if isinstance(item, str):
            pairs.append((key, item))
        else:
            ignored.append(f"{name}: {key[:80]!r} holds {type(item).__name__}, not text")
    return pairs


@contextmanager
def _state_locked(settings: Settings) -> Iterator[Path]:
    """The state file's path, held against other `apply` or `enqueue` runs of this checkout meanwhile."""
    path = state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _update_state(settings: Settings, change: Callable[[ApplyState], ApplyState]) -> None:
    """Read, change and write the state file atomically (fsynced: a kill -9 right after keeps it)."""
    with _state_locked(settings) as path:
        try:
            state = load_state(settings).state
        except StateUnreadable:
            state = ApplyState()  # written anew: what it held could not be read anyway
        data = change(state).model_dump_json(indent=1).encode("utf-8")
        atomic_write(path, data, mode=0o600)


def remember(settings: Settings, enqueued: Sequence[Enqueued]) -> None:
    """Keep the job ids of this enqueue for `apply --wait` (what is still uncommitted stays noted)."""
    jobs = {e.job_id: e.path for e in enqueued if e.job_id}
    _update_state(settings, lambda state: state.model_copy(update={"jobs": jobs}))


def follow_up(settings: Settings, report: ApplyReport) -> None:
    """Remember re-enqueued posts by their new jobs, so the next `apply --wait` waits for those."""
    jobs = {(i.new_job or i.job_id): i.post for i in report.items}
    remember(settings, [Enqueued(post, job_id, "enqueued") for job_id, post in jobs.items()])


def remembered(settings: Settings) -> dict[str, str]:
    """The job ids (and posts) of the last remote enqueue; empty when there was none."""
    return load_state(settings).state.jobs


def note_write(settings: Settings, relative: str, digest: str) -> None:
    """Note, before writing, that `relative` is about to get the bytes of hash `digest` (not yet committed)."""
    _update_state(settings, lambda s: s.model_copy(update={"uncommitted": {**s.uncommitted, relative: digest}}))


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
    """Write each finished job's result into its post and record; re-enqueue posts edited since their job.

    Every result is checked and its changes decided again here (worker/result_check.py); one that fails is
    that job's `bad_result` (failed in RQ, so `tagger failed retry` runs it again) and the others go on.
    With `commit`, each write is noted in the state file before it is made and cleared once committed, and what
    an earlier run wrote and did not commit (killed, or its commit refused) is committed too.
    """
    report = ApplyReport()
    taxonomy: Taxonomy | None = None
    for job_id in dict.fromkeys(ids):
        try:
            job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        except NoSuchJobError:
            post = (posts or {}).get(job_id, "")
            report.items.append(Applied(job_id, post, "missing", "no such job (result expired: TAGGER_RESULT_TTL)"))
            continue
        except (RedisError, TaggerError):
            raise
        except Exception as exc:
            report.items.append(Applied(job_id, "", "failed", f"bad_result: the job cannot be read: {exc!r}"[:300]))
            continue
        if taxonomy is None:
            taxonomy = taxonomy_for(settings)  # the local taxonomy: what every result is decided against
        item = _apply_job(settings, redis, job, commit, taxonomy)
        log.info("applied", job_id=job_id, post=item.post, action=item.action, detail=item.detail)
        report.items.append(item)
    if commit:
        commit_writes(settings, report)
    return report


def _apply_job(settings: Settings, redis: Redis, job: Job, noting: bool, taxonomy: Taxonomy) -> Applied:
    post_name = str(job.meta.get("post", ""))[:300]
    status = job.get_status(refresh=False)
    if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
        kind = job.meta.get("kind", str(status))
        return Applied(job.id, post_name, "failed", f"{kind}: {job.meta.get('error', '')}")
    if status != JobStatus.FINISHED:
        return Applied(job.id, post_name, "waiting", str(status))
    try:
        value = job.return_value()
    except (RedisError, TaggerError):
        raise
    except Exception as exc:
        value = BadResult(f"the result cannot be read: {exc!r}"[:300])
    if isinstance(value, dict) and "written" in value and "changes" not in value:
        return Applied(job.id, post_name, "failed", "not_remote: the job has no remote result (a shared-folder job?)")
    try:
        if isinstance(value, BadResult):
            raise value
        checked = parse_result(settings, job.id, value)
        return apply_outcome(settings, redis, job, checked, taxonomy, noting)
    except BadResult as exc:
        log.warning("bad_result", job_id=job.id, post=post_name, error=exc.message[:300])
        _fail(settings, redis, job, exc)
        return Applied(job.id, post_name, "failed", f"{exc.kind}: {exc.message}")
    except TaggerError as exc:
        return Applied(job.id, post_name, "failed", f"{exc.kind}: {exc.message}")


def _fail(settings: Settings, redis: Redis, job: Job, exc: TaggerError) -> None:
    """Mark the job failed with its kind, so `failed list` shows it and `failed retry` runs it again."""
    origin = job.origin if job.origin in queue_names(settings) else queue_name(settings, "default")
    job.meta.update(kind=exc.kind, error=exc.message[:2000], failed_at=time.time(), transient=False)
    try:
        job.save_meta()  # type: ignore[no-untyped-call]
        with redis.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            FailedJobRegistry(name=origin, connection=redis, serializer=JSONSerializer).add(
                job, ttl=FAILURE_TTL, exc_string=f"{exc.kind}: {exc.message}"[:2000], pipeline=pipe
            )
            pipe.execute()
    except RedisError as error:  # shown as failed all the same; only `failed retry` will not list it
        log.warning("redis_unavailable", where="bad_result", job_id=job.id, error=str(error)[:300])


def _types(job: Job) -> list[str] | None:
    """The types the job was asked for (from its meta: anything but a list of names means every type)."""
    types = job.meta.get("types")
    if isinstance(types, list) and types and all(isinstance(t, str) for t in types):
        return [str(t) for t in types]
    return None


def apply_outcome(
    settings: Settings, redis: Redis, job: Job, checked: Checked, taxonomy: Taxonomy, noting: bool = False
) -> Applied:
    """Apply one checked result: its changes decided again here over the exact bytes it was made from.

    A post edited since is re-enqueued. `noting`: note the write in the state file first (for `--commit`: a
    kill after it leaves it to commit).
    """
    result = checked.result
    try:
        relative = confine(result.post, settings, from_cwd=False)
    except TaggerError as exc:
        raise BadResult(f"{exc.kind}: {exc.message}") from exc
    if job.id != expected_job_id(job_id_for(relative, settings), result.content_hash):
        raise BadResult(
            f"the result names {result.post[:200]} (content {result.content_hash[:12]}), not this job's post"
        )
    root = settings.content_root()
    path = root / relative
    store = RecordStore(root, settings.records_dir)
    record_file = store.path_for(path)
    before = _bytes(record_file)
    post = read_post(path, settings.max_front_matter_bytes)
    problems = claimed_problems(taxonomy, result, post)
    if problems:
        raise BadResult("the result " + "; ".join(problems))
    stored = store.load(path)
    record = reconcile(stored, post)
    types = _types(job)
    if result.new_file_hash and post.file_hash == result.new_file_hash and record.file_hash == post.file_hash:
        # Written before (this post's record says tagger wrote these very bytes): a result's own claim is not enough.
        return Applied(job.id, relative, "already-applied")
    if post.file_hash != result.file_hash:
        return _again(settings, redis, job.id, relative, checked, taxonomy, path, store, post, stored, types)
    decided = decide_here(settings, taxonomy, post, record, checked, types)
    new_text = decided.new_text
    new_hash = file_hash(new_text.encode("utf-8")) if new_text is not None else ""
    detail = ""
    if new_hash != result.new_file_hash:
        # The same judgements decide the same here unless the taxonomy or tagger differ between here and the worker.
        detail = "decided here from its judgements (the worker's result differed: taxonomy or version changed?)"
        log.warning("result_decided_differently", job_id=job.id, post=relative)
    new_record = decided.record.model_copy(update={"mode": f"{post_mode(path):04o}"})
    if noting:
        note_write(settings, relative, new_hash)
    try:
        written = write_back(store, path, post, stored, record, new_text, new_record)
    except PostChanged:
        return _again(settings, redis, job.id, relative, checked, taxonomy, path, store, read_post(path), stored, types)
    files = tuple(f for f, changed in ((path, written), (record_file, _bytes(record_file) != before)) if changed)
    return Applied(job.id, relative, "written" if written else "unchanged", detail, files=files)


def _again(
    settings: Settings,
    redis: Redis,
    job_id: str,
    relative: str,
    checked: Checked,
    taxonomy: Taxonomy,
    path: Path,
    store: RecordStore,
    post: Post,
    stored: Record,
    types: list[str] | None,
) -> Applied:
    """The post changed since its job: keep the judgements when its text is the same, and enqueue it again.

    `stored`: the record as read; another writer's newer record is kept instead.
    """
    reason = "edited since enqueue (front matter only: judgements kept)"
    if post.content_hash == checked.result.content_hash:
        record = reconcile(stored, post)
        decided = decide_here(settings, taxonomy, post, record, checked, types)
        cache_record(store, path, stored, unwritten(decided.record, record, post))
    else:
        reason = "edited since enqueue (text changed)"
    enqueued = enqueue_posts([path], settings, redis, remote=True)
    job = next((e.job_id for e in enqueued if e.job_id), "")
    return Applied(job_id, relative, "re-enqueued", f"{reason}; new job {job}", new_job=job)


def _bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def commit_writes(settings: Settings, report: ApplyReport) -> None:
    """One git commit of what this run and any interrupted earlier run wrote; the result goes into `report`.

    A noted post is committed only while its bytes are still the ones apply wrote (a person's later edit stays
    out), with its record (tagger's own file); other staged or edited files stay out. Once committed, or when
    nothing is left to commit, the notes are cleared; a refused commit keeps them for the next `apply --commit`.
    """
    root = settings.content_root()
    loaded = load_state(settings)
    report.ignored += loaded.ignored
    store = RecordStore(root, settings.records_dir)
    files: list[Path] = list(report.changed)
    this_run = {i.post for i in report.items if i.files}
    for relative, digest in loaded.state.uncommitted.items():
        path = root / relative
        if digest and _hash_of(path) == digest:
            files.append(path)
            if relative not in this_run:
                report.earlier.append(relative)
        files.append(store.path_for(path))
    files = list(dict.fromkeys(f for f in files if f.exists()))
    noted = set(loaded.state.uncommitted)
    try:
        dirty = _dirty(root, files)
        if dirty:
            report.commit = git_commit(settings, report, dirty)
    except CommitFailed as exc:
        report.commit_error = exc.message
        log.warning("commit_failed", error=exc.message)
        return
    # Committed, or nothing of it left to commit: forget those notes (not ones another run made meanwhile).
    _update_state(
        settings,
        lambda s: s.model_copy(update={"uncommitted": {k: v for k, v in s.uncommitted.items() if k not in noted}}),
    )


def _hash_of(path: Path) -> str:
    try:
        return file_hash(path.read_bytes())
    except OSError:
        return ""


def _dirty(root: Path, files: Sequence[Path]) -> list[Path]:
    """The files of the repository git sees as changed against HEAD (staged or not) or untracked.

    Files outside the repository (records kept elsewhere with TAGGER_RECORDS_DIR) are not its to commit: git
    would refuse the whole status for them.
    """
    top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        raise CommitFailed(f"not a git repository: {(top.stderr or top.stdout).strip()[:300]}", path=root)
    base = Path(top.stdout.strip()).resolve()
    files = [f for f in files if f.resolve().is_relative_to(base)]
    if not files:
        return []
    run = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "-z", "--untracked-files=all", "--", *map(str, files)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise CommitFailed(f"git status failed: {(run.stderr or run.stdout).strip()[:300]}", path=root)
    changed = {(base / entry[3:]).resolve() for entry in run.stdout.split("\0") if len(entry) > 3}
    return [f for f in files if f.resolve() in changed]


def git_commit(settings: Settings, report: ApplyReport, files: Sequence[Path]) -> str:
    """One git commit of exactly `files` (other staged or edited files stay out); the new commit's short hash."""
    root = settings.content_root()
    written = [i.post for i in report.items if i.action == "written"] + report.earlier
    lines = [f"tagger apply: {len(written)} posts classified", ""]
    lines += [f"- {i.post} ({i.action})" for i in report.items if i.files]
    lines += [f"- {post} (written by an earlier apply)" for post in report.earlier]
    git = ["git", "-C", str(root)]
    names = [str(f) for f in files]
    added = subprocess.run([*git, "add", "--", *names], capture_output=True, text=True)
    run = (
        added
        if added.returncode
        else subprocess.run(
            [*git, "commit", "--only", "-m", "\n".join(lines), "--", *names], capture_output=True, text=True
        )
    )
    if run.returncode != 0:
        raise CommitFailed(f"git commit failed: {(run.stderr or run.stdout).strip()[:300]}", path=root)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    return head.stdout.strip()
