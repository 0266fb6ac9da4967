"""Backfill through the provider's Batch API: submit a site's requests, follow them, collect (idempotent), cancel.

Submission plans each post exactly as the classifier would (cached terms skipped, the same prompts and chunks)
and sends the very request bodies of the synchronous path. Collection runs the classifier on each post with a
provider that answers from the batch (`BatchReplies`), so validation, selection, records and the write-back are
the synchronous path's own. A post that changed since submission, a failed line, an invalid reply and every
request of an expired or cancelled batch go to the normal queue (or into a new batch): nothing is dropped, and
the judgements of a returned post's good lines are kept in its record, so its retry asks only what failed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
from pydantic import BaseModel, Field
from redis import Redis

from worker import backfill, untrusted
from worker.classifier import Classifier, make_classifier
from worker.decide import drift
from worker.errors import InvalidReply, NotInBatch, TaggerError
from worker.paths import confine, site_id
from worker.polling import Progress, Tally, poll_until
from worker.posts import Post, atomic_write, file_hash, read_post
from worker.prompts import Prompt
from worker.providers.batch_api import (
    TERMINAL,
    BatchAPI,
    BatchReplies,
    LineResult,
    batch_api,
    body_digest,
    read_results,
)
from worker.providers.batch_api import request_line as line_for
from worker.providers.openai import OpenAIProvider
from worker.queue.enqueue import enqueue_posts
from worker.queue.keys import batch_index_key, batch_key
from worker.records import RecordStore
from worker.settings import Settings
from worker.signing import sign, verify

log = structlog.get_logger("tagger.batch")
STATE_FILE = ".tagger-batches.json"
PENDING = "pending-"  # the id of a batch's state between its upload and `batches.create`
PENDING_GRACE = 600.0  # seconds a submission may take between upload and create before it counts as killed
KEEP_SECONDS = 30 * 86400  # how long Redis keeps a batch's state
COLLECTED_FILE = ".tagger-batches.collected.jsonl"


class PostEntry(BaseModel):
    """One post in a batch: its path below the content root, its content hash then, its requests."""

    path: str
    content_hash: str
    requests: dict[str, str] = Field(default_factory=dict)  # custom_id -> digest of the request body


class BatchState(BaseModel):
    """What tagger knows of one batch it submitted."""

    id: str
    input_file_id: str
    created_at: float
    model: str
    requests: int
    bytes: int
    estimated_cost: float | None = None
    types: list[str] | None = None
    posts: dict[str, PostEntry] = Field(default_factory=dict)  # post key -> entry


class BatchStore(Protocol):
    """Where batch state lives: Redis under tagger's prefix, or a state file for `--inline`."""

    def add(self, state: BatchState) -> None:
        """Remember a new batch (or save it again)."""
        ...

    def get(self, batch_id: str) -> BatchState | None:
        """One batch, or None."""
        ...

    def all(self) -> list[BatchState]:
        """Every batch, oldest first."""
        ...

    def collected(self, batch_id: str) -> dict[str, str]:
        """Posts of a batch already settled by `collect` (post key -> outcome)."""
        ...

    def mark(self, batch_id: str, outcomes: dict[str, str]) -> None:
        """Record that posts were settled (written, unchanged, enqueued, rebatched...)."""
        ...

    def drop(self, batch_id: str) -> None:
        """Forget a batch."""
        ...


class RedisBatchStore:
    """Batch state in Redis, per site: one JSON value per batch, a sorted index, and a hash of settled posts.

    Read back as untrusted input: a state that fails validation (or, with TAGGER_SIGNING_KEY, its signature) is
    left out (its posts are then not in flight, so the next backfill sends them again: nothing is lost).
    """

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.site = site_id(settings)

    def _key(self, batch_id: str, part: str = "state") -> str:
        return batch_key(self.settings, self.site, batch_id, part)

    def add(self, state: BatchState) -> None:
        """Remember a new batch (or save it again); batches are forgotten 30 days after they were made."""
        value = sign(self.settings, "batch", f"{self.site}:{state.id}", state.model_dump(mode="json"))
        index = batch_index_key(self.settings, self.site)
        with self.redis.pipeline() as pipe:
            pipe.set(self._key(state.id), json.dumps(value, ensure_ascii=False), ex=KEEP_SECONDS)
            pipe.zadd(index, {state.id: state.created_at})
            pipe.zremrangebyscore(index, 0, time.time() - KEEP_SECONDS)
            pipe.execute()

    def drop(self, batch_id: str) -> None:
        """Forget a batch."""
        with self.redis.pipeline() as pipe:
            pipe.delete(self._key(batch_id), self._key(batch_id, "collected"))
            pipe.zrem(batch_index_key(self.settings, self.site), batch_id)
            pipe.execute()

    def get(self, batch_id: str) -> BatchState | None:
        """One batch, or None (also when what Redis holds is not a batch state tagger wrote for it)."""
        raw = self.redis.get(self._key(batch_id))
        if not raw:
            return None
        try:
            data = verify(self.settings, "batch", f"{self.site}:{batch_id}", untrusted.loads(raw))
            state = BatchState.model_validate(data)
        except (ValueError, TaggerError) as exc:
            log.warning("batch_state_refused", batch=batch_id, error=str(exc)[:300])
            return None
        if state.id != batch_id:
            log.warning("batch_state_refused", batch=batch_id, error=f"the state names batch {state.id}")
            return None
        return state

    def all(self) -> list[BatchState]:
        """Every batch, oldest first."""
        ids = [_text(i) for i in self.redis.zrange(batch_index_key(self.settings, self.site), 0, -1)]
        return [s for s in (self.get(i) for i in ids) if s is not None]

    def collected(self, batch_id: str) -> dict[str, str]:
        """Posts of a batch already settled (post key -> outcome); an entry that fails its checks is left out."""
        out: dict[str, str] = {}
        for key, value in self.redis.hgetall(self._key(batch_id, "collected")).items():
            post = _text(key)
            try:
                data = untrusted.loads(value)
                if not isinstance(data, dict):
                    data = {"outcome": _text(value)}  # written before outcomes were signed
                outcome = verify(self.settings, "batch", f"{self.site}:{batch_id}:{post}", data).get("outcome")
            except (ValueError, TaggerError):
                outcome = None
            if isinstance(outcome, str):
                out[post] = outcome
        return out

    def mark(self, batch_id: str, outcomes: dict[str, str]) -> None:
        """Record that posts were settled."""
        if outcomes:
            key = self._key(batch_id, "collected")
            values = {
                post: json.dumps(sign(self.settings, "batch", f"{self.site}:{batch_id}:{post}", {"outcome": outcome}))
                for post, outcome in outcomes.items()
            }
            with self.redis.pipeline() as pipe:
                pipe.hset(key, mapping=values)  # type: ignore[arg-type]
                pipe.expire(key, KEEP_SECONDS)
                pipe.execute()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FileBatchStore:
    """Batch state in files under the records location (no Redis): the batches, and an append-only log."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_FILE
        self.log = folder / COLLECTED_FILE

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _load(self) -> dict[str, BatchState]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        return {k: BatchState.model_validate(v) for k, v in data.get("batches", {}).items()}

    def add(self, state: BatchState) -> None:
        """Remember a new batch (the file is replaced atomically)."""
        with self._locked():
            batches = self._load()
            batches[state.id] = state
            self._save(batches)

    def drop(self, batch_id: str) -> None:
        """Forget a batch, and its lines of the log: a provider may give its id to a new batch."""
        with self._locked():
            batches = self._load()
            if batches.pop(batch_id, None) is not None:
                self._save(batches)
            try:
                lines = self.log.read_bytes().splitlines(keepends=True)
            except FileNotFoundError:
                return
            kept = [line for line in lines if self._batch_of(line) != batch_id]
            if len(kept) != len(lines):
                atomic_write(self.log, b"".join(kept))

    @staticmethod
    def _batch_of(line: bytes) -> str | None:
        try:
            row = untrusted.loads(line)
        except ValueError:
            return None
        return row.get("batch") if isinstance(row, dict) else None

    def _save(self, batches: dict[str, BatchState]) -> None:
        data = {"batches": {k: v.model_dump(mode="json") for k, v in batches.items()}}
        atomic_write(self.path, json.dumps(data, indent=1).encode("utf-8"))

    def get(self, batch_id: str) -> BatchState | None:
        """One batch, or None."""
        return self._load().get(batch_id)

    def all(self) -> list[BatchState]:
        """Every batch, oldest first."""
        return sorted(self._load().values(), key=lambda s: s.created_at)

    def collected(self, batch_id: str) -> dict[str, str]:
        """Posts of a batch already settled (a line cut short by a crash is ignored)."""
        out: dict[str, str] = {}
        try:
            lines = self.log.read_bytes().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                row = untrusted.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("batch") == batch_id and "post" in row and "outcome" in row:
                out[str(row["post"])] = str(row["outcome"])
        return out

    def mark(self, batch_id: str, outcomes: dict[str, str]) -> None:
        """Append settled posts to the log and fsync it."""
        if not outcomes:
            return
        with self._locked(), open(self.log, "ab") as handle:
            if handle.tell() and not self.log.read_bytes().endswith(b"\n"):
                handle.write(b"\n")  # a line a kill cut short stays alone on its line (and is ignored)
            for key, outcome in outcomes.items():
                handle.write(json.dumps({"batch": batch_id, "post": key, "outcome": outcome}).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())


def state_folder(settings: Settings) -> Path:
    """Where the `--inline` state file lives: the records folder, else the content root."""
    return (settings.records_dir or settings.content_root()).expanduser().resolve()


def store_for(settings: Settings, redis: Redis | None) -> BatchStore:
    """Redis when given, else the state file."""
    return RedisBatchStore(settings, redis) if redis is not None else FileBatchStore(state_folder(settings))


def post_key(relative: str) -> str:
    """A short key for a post's path below the content root (part of each request's custom_id)."""
    return hashlib.sha1(relative.encode("utf-8")).hexdigest()[:16]


def pending_prompts(classifier: Classifier, post: Post, types: Sequence[str] | None) -> list[Prompt]:
    """The prompts the classifier would send for this post now (cached terms and the shortlist skipped)."""
    _, todo = classifier.split_cached(post, classifier.terms_for(post, types), classifier.load_record(post))
    if classifier.settings.shortlist_min and todo:
        _, todo = classifier.shortlist(post, todo)
    prompts, _ = classifier.prompts_for(post, todo)
    return prompts


@dataclass
class Submitted:
    """What `submit` did."""

    batches: list[BatchState] = field(default_factory=list)
    requests: int = 0
    estimated_cost: float | None = None
    settled: dict[str, str] = field(default_factory=dict)  # posts that needed no request: path -> outcome
    in_flight: list[str] = field(default_factory=list)  # posts already in a batch not yet collected
    holding: list[str] = field(default_factory=list)  # the batches those posts are in (collect them too)
    failed: list[str] = field(default_factory=list)


@dataclass
class _Pack:
    posts: dict[str, PostEntry] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    requests: int = 0


def settled(settings: Settings, store: BatchStore, state: BatchState) -> dict[str, str]:
    """Posts of a batch settled for good (post key -> outcome), checked against the files.

    A post sent elsewhere (the queue, a new batch, this process) is settled; one collected as written or
    unchanged only while its file still holds the bytes collect left and its record agrees with it (the
    freshness rule's `drift`): a restored or fresh checkout, or a file a write never reached, is collected again
    (collect is idempotent).
    """
    root = settings.content_root()
    store_of_records = RecordStore(root, settings.records_dir)
    out: dict[str, str] = {}
    for key, outcome in store.collected(state.id).items():
        word, _, digest = outcome.partition(" ")
        if word in ("written", "unchanged"):
            entry = state.posts.get(key)
            if entry is None or not digest or not _holds(settings, store_of_records, entry.path, digest):
                continue
        out[key] = outcome
    return out


def _holds(settings: Settings, records: RecordStore, relative: str, digest: str) -> bool:
    """Whether the post is the file collect left (hash `digest`) and its record and file agree."""
    try:
        path = settings.content_root() / confine(relative, settings, from_cwd=False)
        post = read_post(path, settings.max_front_matter_bytes)
    except (OSError, TaggerError):
        return False
    return post.file_hash == digest and drift(post, records.load(path)) is None


def _hash_of(settings: Settings, root: Path, relative: str) -> str:
    try:
        return file_hash((root / confine(relative, settings, from_cwd=False)).read_bytes())
    except (OSError, TaggerError):
        return ""


def in_flight(settings: Settings, store: BatchStore) -> dict[str, tuple[str, str]]:
    """Posts in batches not yet collected: post key -> (the content hash they were submitted with, the batch)."""
    out: dict[str, tuple[str, str]] = {}
    for state in store.all():
        if state.id.startswith(PENDING):  # no batch made (yet): a killed submission must not hold its posts back
            continue
        done = settled(settings, store, state)
        out.update({key: (e.content_hash, state.id) for key, e in state.posts.items() if key not in done})
    return out


def submit(
    settings: Settings,
    todo: Sequence[Path],
    store: BatchStore,
    types: Sequence[str] | None = None,
    again: bool = False,
    replacing: str = "",
) -> Submitted:
    """Write the posts' requests as JSON Lines, split within the provider's limits, upload and start batches.

    A post already waiting, unchanged, in a batch not yet collected is not sent twice (unless `again`); when
    `replacing` a batch (its posts sent anew), that batch's hold on them does not count, a newer batch's does (a
    collect killed after its rebatch was made, then run again, does not pay for the posts a second time).
    """
    classifier = make_classifier(settings)
    api = batch_api(classifier.provider)
    provider = api.provider
    if not again:
        _adopt(api, store)
    busy = {} if again else {k: held for k, held in in_flight(settings, store).items() if held[1] != replacing}
    for batch_id in {held for _, held in busy.values()}:
        if not api.known(batch_id):  # made by another provider or account (or one reset): it answers nothing here
            log.warning("batch_unknown_to_provider", batch=batch_id)
            store.drop(batch_id)
            busy = {key: held for key, held in busy.items() if held[1] != batch_id}
    result = Submitted()
    packs: list[_Pack] = []
    for path in todo:
        try:
            relative = confine(path, settings)
            post = classifier.read(path)
        except TaggerError as exc:
            result.failed.append(f"{path}: {exc.kind}: {exc.message}")
            continue
        held = busy.get(post_key(relative))
        if held is not None and held[0] == post.content_hash:
            result.in_flight.append(relative)
            result.holding = list(dict.fromkeys([*result.holding, held[1]]))
            continue
        prompts = pending_prompts(classifier, post, types)
        if not prompts:  # nothing to ask (retired terms to take back, say): settle it now, without a call
            result.settled[str(path)] = _settle_now(classifier, provider, path, types)
            continue
        key = post_key(relative)
        entry = PostEntry(path=relative, content_hash=post.content_hash)
        lines = bytearray()
        for chunk, prompt in enumerate(prompts):
            body = provider.request_body(prompt)
            custom_id = f"{key}-{chunk}-{post.content_hash[:16]}"
            entry.requests[custom_id] = body_digest(body)
            lines += line_for(custom_id, body)
        if len(prompts) > settings.batch_max_requests or len(lines) > settings.batch_max_bytes:
            result.failed.append(
                f"{path}: batch_limit: {len(prompts)} requests, {len(lines)} bytes exceed one batch file's limits"
                " (TAGGER_BATCH_MAX_REQUESTS, TAGGER_BATCH_MAX_BYTES)"
            )
            continue
        # A post's requests stay in one file, so one batch settles the post.
        pack = packs[-1] if packs else None
        if (
            pack is None
            or pack.requests + len(prompts) > settings.batch_max_requests
            or len(pack.data) + len(lines) > settings.batch_max_bytes
        ):
            pack = _Pack()
            packs.append(pack)
        pack.posts[key] = entry
        pack.paths.append(path)
        pack.data += lines
        pack.requests += len(prompts)
    for number, pack in enumerate(packs, 1):
        file_id = api.upload(bytes(pack.data), f"tagger-backfill-{int(time.time())}-{number}.jsonl")
        state = BatchState(
            id=PENDING + file_id,
            input_file_id=file_id,
            created_at=time.time(),
            model=settings.model,
            requests=pack.requests,
            bytes=len(pack.data),
            estimated_cost=backfill.estimate(settings, pack.paths, types, batch=True).cost,
            types=list(types) if types else None,
            posts=pack.posts,
        )
        # Saved before the batch exists: a kill between `create` and the save below is settled by `_adopt`.
        store.add(state)
        batch = api.create(file_id, {"tagger": settings.redis_prefix, "posts": str(len(pack.posts))})
        state = state.model_copy(update={"id": batch.id, "created_at": float(batch.created_at or state.created_at)})
        if store.get(batch.id) is not None:  # an id the provider gave before (another account, a restart)
            log.warning("batch_id_reused", batch=batch.id)
            store.drop(batch.id)  # its old collection log must not settle this batch's posts
        store.add(state)
        store.drop(PENDING + file_id)
        log.info("batch_submitted", batch=batch.id, posts=len(pack.posts), requests=pack.requests, bytes=len(pack.data))
        result.batches.append(state)
        result.requests += pack.requests
        if state.estimated_cost is not None:
            result.estimated_cost = (result.estimated_cost or 0.0) + state.estimated_cost
    return result


def _settle_now(classifier: Classifier, provider: OpenAIProvider, path: Path, types: Sequence[str] | None) -> str:
    try:
        written = dataclasses.replace(classifier, provider=BatchReplies(provider, {})).classify(path, types=types)
    except TaggerError as exc:
        return f"failed: {exc.kind}: {exc.message}"
    return "written" if written.written else "unchanged"


@dataclass
class BatchRow:
    """One batch as `batch status` shows it."""

    id: str
    status: str
    total: int
    completed: int
    failed: int
    age: float
    estimated_cost: float | None
    posts: int
    settled: int


def batch_rows(settings: Settings, store: BatchStore, ids: Sequence[str] = ()) -> list[BatchRow]:
    """Tagger's batches (or those named) with the provider's state and counts."""
    api = _api(settings)
    rows = []
    for state in _selected(store, ids, api):
        batch = api.retrieve(state.id)
        counts = batch.request_counts
        rows.append(
            BatchRow(
                id=state.id,
                status=batch.status,
                total=counts.total if counts and counts.total else state.requests,
                completed=counts.completed if counts else 0,
                failed=counts.failed if counts else 0,
                age=time.time() - state.created_at,
                estimated_cost=state.estimated_cost,
                posts=len(state.posts),
                settled=len(settled(settings, store, state)),
            )
        )
    return rows


def _api(settings: Settings) -> BatchAPI:
    """The Batch API of the configured provider (no taxonomy needed to look at batches)."""
    from worker.prompts import load_templates
    from worker.providers import make_provider

    return batch_api(make_provider(settings, load_templates(settings.prompts_dir)))


def _adopt(api: BatchAPI, store: BatchStore) -> None:
    """Settle submissions a kill interrupted: a batch the provider made from the file is adopted, else dropped."""
    pending = {s.input_file_id: s for s in store.all() if s.id.startswith(PENDING)}
    if not pending:
        return
    for batch in api.list():
        state = pending.pop(batch.input_file_id, None)
        if state is not None:
            store.add(state.model_copy(update={"id": batch.id, "created_at": float(batch.created_at)}))
            store.drop(state.id)
    for state in pending.values():  # no batch was made: nothing was charged, and the posts are not fresh
        if time.time() - state.created_at > PENDING_GRACE:
            store.drop(state.id)


def _selected(store: BatchStore, ids: Sequence[str], api: BatchAPI | None = None) -> list[BatchState]:
    if api is not None:
        _adopt(api, store)
    if not ids:
        return [s for s in store.all() if not s.id.startswith(PENDING)]
    states = []
    for batch_id in ids:
        state = store.get(batch_id)
        if state is None:
            raise TaggerError(f"no batch {batch_id} in tagger's batch state")
        states.append(state)
    return states


def cancel(settings: Settings, store: BatchStore, ids: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Cancel tagger's unfinished batches (or those named); `collect` then sends their requests elsewhere."""
    api = _api(settings)
    done: list[tuple[str, str]] = []
    for state in _selected(store, ids, api):
        batch = api.retrieve(state.id)
        if batch.status not in TERMINAL and batch.status != "cancelling":
            batch = api.cancel(state.id)
        done.append((state.id, batch.status))
    return done


def wait(
    settings: Settings, store: BatchStore, ids: Sequence[str], progress: Progress | None = None, poll: float = 0
) -> list[str]:
    """Follow batches until each is finished (completed, failed, expired or cancelled); their final states."""
    api = _api(settings)
    statuses: list[str] = []

    def look() -> Tally:
        batches = [api.retrieve(state.id) for state in _selected(store, ids, api)]
        statuses[:] = [b.status for b in batches]
        done = sum(b.request_counts.completed for b in batches if b.request_counts)
        failed = sum(b.request_counts.failed for b in batches if b.request_counts)
        total = sum(b.request_counts.total for b in batches if b.request_counts) or 1
        return Tally(done, failed, total, finished=all(s in TERMINAL for s in statuses))

    poll_until(look, poll or settings.batch_poll, progress)
    return statuses


@dataclass
class Collected:
    """What `collect` did, by post."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    enqueued: list[str] = field(default_factory=list)  # "path: why"
    rebatched: list[str] = field(default_factory=list)
    inline: list[str] = field(default_factory=list)  # classified in this process (no Redis)
    failed: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # batch ids still running
    already: int = 0
    new_batches: list[BatchState] = field(default_factory=list)


def collect(
    settings: Settings,
    store: BatchStore,
    ids: Sequence[str] = (),
    redis: Redis | None = None,
    rebatch: bool = False,
) -> Collected:
    """Write back every finished batch's posts; send the rest to the queue (or inline, or a new batch).

    Idempotent: each settled post is logged in the store, and a post written before a crash is fresh, so a
    second run writes it no more.
    """
    classifier = make_classifier(settings)
    api = batch_api(classifier.provider)
    summary = Collected()
    for state in _selected(store, ids, api):
        done = settled(settings, store, state)
        if len(done) >= len(state.posts):
            summary.already += len(state.posts)
            continue
        batch = api.retrieve(state.id)
        if batch.status not in TERMINAL:
            summary.unfinished.append(state.id)
            continue
        results = read_results(api.content(batch.output_file_id), api.content(batch.error_file_id))
        if batch.status == "failed" and batch.errors and batch.errors.data:
            why = "; ".join(f"{e.code}: {e.message}" for e in batch.errors.data[:3])
            results = {}
        else:
            why = f"not answered (batch {batch.status})"
        retry: dict[str, tuple[PostEntry, str]] = {}
        for key, entry in state.posts.items():
            if key in done:
                summary.already += 1
                continue
            try:
                relative = confine(entry.path, settings, from_cwd=False)
            except TaggerError as exc:  # the state names a path out of the root: never read or written
                summary.failed.append(f"{entry.path}: {exc.kind}: {exc.message}")
                store.mark(state.id, {key: f"refused: {exc.kind}"})
                continue
            entry = entry.model_copy(update={"path": relative})
            outcome = _collect_post(classifier, api, state, entry, results, why)
            log.info("batch_collected", batch=state.id, post=entry.path, outcome=outcome[:300])
            if outcome in ("written", "unchanged"):
                # With the bytes the file holds now: "settled" is later checked against the file.
                store.mark(state.id, {key: f"{outcome} {_hash_of(settings, settings.content_root(), entry.path)}"})
                (summary.written if outcome == "written" else summary.unchanged).append(entry.path)
            else:
                retry[key] = (entry, outcome)
        _retry(settings, store, state, retry, redis, rebatch, summary)
    return summary


def _collect_post(
    classifier: Classifier,
    api: BatchAPI,
    state: BatchState,
    entry: PostEntry,
    results: dict[str, LineResult],
    why: str,
) -> str:
    """`written` or `unchanged`, else why the post goes back to the queue.

    A post that goes back keeps, in its record, the judgements of its good lines: its retry asks only the rest.
    """
    path = classifier.settings.content_root() / entry.path
    bodies = {
        digest: str(line.body)
        for cid, digest in entry.requests.items()
        if (line := results.get(cid)) is not None and line.body is not None
    }
    judged = dataclasses.replace(classifier, provider=BatchReplies(api.provider, bodies))
    failed = next((cid for cid in entry.requests if entry.requests[cid] not in bodies), None)
    try:
        post = classifier.read(path)
        if post.content_hash != entry.content_hash:
            return "the post changed after it was submitted"
        if failed is not None:
            line = results.get(failed)
            _cache_answered(judged, path, state, bodies)
            return line.error if line is not None else why
        result = judged.classify(path, types=state.types)
    except TaggerError as exc:
        if failed is None and isinstance(exc, InvalidReply | NotInBatch):
            _cache_answered(judged, path, state, bodies)  # a bad reply: keep the other lines' judgements
        return f"{exc.kind}: {exc.message}"
    return "written" if result.written else "unchanged"


def _cache_answered(judged: Classifier, path: Path, state: BatchState, bodies: dict[str, str]) -> None:
    if not bodies:
        return
    try:
        kept = judged.cache_answered(path, state.types)
    except TaggerError as exc:  # a record that cannot be written: the retry asks every chunk, nothing is lost
        log.warning("batch_judgements_not_kept", batch=state.id, post=str(path), kind=exc.kind)
        return
    log.info("batch_judgements_kept", batch=state.id, post=str(path), judgements=kept)


def _retry(
    settings: Settings,
    store: BatchStore,
    state: BatchState,
    retry: dict[str, tuple[PostEntry, str]],
    redis: Redis | None,
    rebatch: bool,
    summary: Collected,
) -> None:
    """Posts a batch did not settle: the normal queue, a new batch, or (no Redis) this process."""
    if not retry:
        return
    root = settings.content_root()
    paths = [root / entry.path for entry, _ in retry.values()]
    if rebatch:
        again = submit(settings, paths, store, state.types, replacing=state.id)
        summary.new_batches += again.batches
        summary.rebatched += [f"{e.path}: {why}" for e, why in retry.values()]
        summary.failed += again.failed
        ids = ",".join(dict.fromkeys([*(b.id for b in again.batches), *again.holding]))
        store.mark(state.id, {key: f"rebatched {ids}" for key in retry})
        return
    if redis is not None:
        made = enqueue_posts(paths, settings, redis, "low", types=state.types)
        refused = {root / e.path: e.reason for e in made if e.action == "refused"}  # absolute or relative
        outcomes = {}
        for key, (entry, why) in retry.items():
            problem = refused.get(root / entry.path)
            if problem is None:  # a refused post (moved, deleted) is not said to be queued: the next backfill finds it
                summary.enqueued.append(f"{entry.path}: {why}")
            else:
                summary.failed.append(f"{entry.path}: {why}; not enqueued: {problem}")
            outcomes[key] = (f"enqueued: {why}" if problem is None else f"refused: {problem}")[:300]
        store.mark(state.id, outcomes)
        return
    inline = backfill.run_inline(settings, paths, types=state.types)
    summary.inline += [f"{e.path}: {why}" for e, why in retry.values()]
    summary.failed += inline.failed + inline.skipped  # a read-only post was not written either
    failed = {line.split(": ", 1)[0] for line in inline.failed + inline.skipped}
    store.mark(
        state.id,
        {key: "inline" if str(root / e.path) not in failed else "inline failed" for key, (e, _) in retry.items()},
    )
