"""Enqueueing, the producer's side: one job per post (shared-folder or self-contained), never two waiting."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from redis import Redis
from redis.exceptions import WatchError
from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry
from rq.serializers import JSONSerializer

from worker.errors import TaggerError
from worker.paths import existing_post
from worker.prompts import load_templates
from worker.queue import keys
from worker.queue.connection import PRIORITIES
from worker.queue.keys import FAILURE_CALLBACK, JOB_FUNCTION, REMOTE_FUNCTION, queues
from worker.queue.payload import RemotePayload, make_payload, publish
from worker.queue.recovery import track
from worker.reply import call_timeout
from worker.settings import Settings
from worker.signing import sign
from worker.taxonomy import Taxonomy, taxonomy_for

log = structlog.get_logger("tagger.jobs")
WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}
BATCH = 500  # posts per atomic enqueue
AGAIN = "-again"  # a post's second job id: its run after the current one (the two ids take turns)
# Set in a running job's meta once it has looked for a rerun request: one asked later would never be seen.
RERUN_CHECKED = "rerun_checked"


def other_id(job_id: str) -> str:
    """The other of a post's two job ids (never `-again-again`), so producers still see one post."""
    return job_id.removesuffix(AGAIN) if job_id.endswith(AGAIN) else job_id + AGAIN


def job_id_for(relative: str, settings: Settings) -> str:
    """One job id per post (and tagger deployment: two prefixes on one Redis never share a job)."""
    return "post-" + hashlib.sha1(f"{settings.redis_prefix}\0{relative}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Enqueued:
    """What a producer did with one post."""

    path: str
    job_id: str
    action: str  # enqueued | already-queued | rerun-after-current | refused
    reason: str = ""  # why a path was refused (outside the root, not a post, does not exist)


def enqueue_posts(
    paths: Iterable[Path | str],
    settings: Settings,
    redis: Redis,
    priority: str = "default",
    types: Sequence[str] | None = None,
    remote: bool | None = None,
) -> list[Enqueued]:
    """Enqueue posts (confined to the content root); a post already waiting is not enqueued twice.

    `remote` (default: TAGGER_JOB_MODE=remote) makes self-contained jobs: the taxonomy is published in Redis and
    each job carries its post (one job per post and content: an edited post gets a job of its own).

    Each path is checked on its own: one that is outside the root, not a post or missing comes back `refused`.
    Atomic against other producers: each batch reads the posts' job states and enqueues under WATCH, so two
    producers enqueuing the same posts at once make one pending job per post.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}")
    refused: list[Enqueued] = []
    accepted: list[str] = []
    for p in paths:
        try:
            accepted.append(existing_post(p, settings))
        except TaggerError as exc:
            refused.append(Enqueued(str(p), "", "refused", exc.message))
    relatives = list(dict.fromkeys(accepted))
    payloads: dict[str, RemotePayload] | None = None
    taxonomy: Taxonomy | None = None
    if (remote if remote is not None else settings.job_mode == "remote") and relatives:
        taxonomy = taxonomy_for(settings)  # read once: published for the jobs and sizing their timeout
        relatives, payloads, too_big = _payloads(settings, redis, relatives, types, taxonomy)
        refused += too_big
    queue = Queue(keys.queue_name(settings, priority), connection=redis, serializer=JSONSerializer)
    timeout = job_timeout(settings, taxonomy) if relatives else 0
    results: list[Enqueued] = list(refused)
    for start in range(0, len(relatives), BATCH):
        batch = relatives[start : start + BATCH]
        results += _enqueue_batch(settings, redis, queue, batch, types, timeout, payloads)
    for item in results:
        if item.action == "refused":
            log.info("enqueue_refused", post=item.path, reason=item.reason)
            continue
        log.info(
            "enqueued" if item.action == "enqueued" else "enqueue_skipped",
            job_id=item.job_id,
            post=item.path,
            action=item.action,
        )
    return results


def _payloads(
    settings: Settings, redis: Redis, relatives: list[str], types: Sequence[str] | None, taxonomy: Taxonomy
) -> tuple[list[str], dict[str, RemotePayload], list[Enqueued]]:
    """Publish the taxonomy and build each post's self-contained job; a post too big to carry is refused."""
    version = publish(settings, redis, taxonomy, load_templates(settings.prompts_dir)).version
    payloads: dict[str, RemotePayload] = {}
    refused: list[Enqueued] = []
    for relative in relatives:
        try:
            payloads[relative] = make_payload(settings, relative, version, list(types) if types else None)
        except TaggerError as exc:
            refused.append(Enqueued(relative, "", "refused", f"{exc.kind}: {exc.message}"))
    return [r for r in relatives if r in payloads], payloads, refused


def _enqueue_batch(
    settings: Settings,
    redis: Redis,
    queue: Queue,
    relatives: list[str],
    types: Sequence[str] | None,
    timeout: int,
    payloads: dict[str, RemotePayload] | None = None,
) -> list[Enqueued]:
    if payloads is None:
        ids = [job_id_for(r, settings) for r in relatives]
    else:  # one job per post and content: a job's result always matches the bytes it carried
        ids = [f"{job_id_for(r, settings)}-{payloads[r].content_hash[:12]}" for r in relatives]
    # A post's job and its rerun (`-again`) are one post: either waiting or running counts.
    both = [i for job_id in ids for i in (job_id, job_id + AGAIN)]
    # So is a job of the other mode waiting for the post (shared-folder, or remote for some content).
    others = _other_mode_ids(settings, redis, relatives, remote=payloads is not None)
    watched = list(dict.fromkeys([*both, *(i for found in others.values() for i in found)]))
    # A post enqueued again after failing or being cancelled leaves those lists: its new job has the same id.
    ended = [r for q in queues(settings, redis) for r in (FailedJobRegistry(queue=q), CanceledJobRegistry(queue=q))]
    while True:
        with redis.pipeline() as pipe:
            try:
                pipe.watch(*[Job.key_for(i) for i in watched])
                fetched = Job.fetch_many(watched, connection=redis, serializer=JSONSerializer)
                by_id = {i: j for i, j in zip(watched, fetched, strict=True) if j is not None}
                results: list[Enqueued] = []
                to_enqueue = []
                pipe.multi()
                for relative, job_id in zip(relatives, ids, strict=True):
                    pair = [by_id[i] for i in (job_id, job_id + AGAIN) if i in by_id]
                    other = [by_id[i] for i in others.get(relative, []) if i in by_id]
                    waiting = next((j.id for j in [*pair, *other] if j.get_status(refresh=False) in WAITING), None)
                    running = next((j for j in pair if j.get_status(refresh=False) == JobStatus.STARTED), None)
                    if waiting is not None:
                        results.append(Enqueued(relative, waiting, "already-queued"))
                    elif running is not None and payloads is not None:
                        results.append(Enqueued(relative, running.id, "already-queued"))  # running on these bytes
                    elif running is not None and running.meta.get(RERUN_CHECKED):
                        # Past its look for reruns (it is ending): a run of its own, under the post's other id.
                        again = other_id(running.id)
                        to_enqueue.append(job_data(queue, relative, again, settings, types, timeout))
                        results.append(Enqueued(relative, again, "enqueued"))
                    elif running is not None:
                        # Watched: a job marking itself past its look for reruns makes this transaction retry.
                        pipe.set(keys.rerun(settings, running.id), "1", ex=7 * 86400)
                        results.append(Enqueued(relative, running.id, "rerun-after-current"))
                    else:
                        payload = payloads[relative] if payloads is not None else None
                        to_enqueue.append(job_data(queue, relative, job_id, settings, types, timeout, payload))
                        results.append(Enqueued(relative, job_id, "enqueued"))
                if to_enqueue:
                    new_ids = [d.job_id for d in to_enqueue]
                    for registry in ended:
                        for job_id in new_ids:
                            registry.remove(job_id, pipeline=pipe)
                            registry.remove(job_id + AGAIN, pipeline=pipe)
                    queue.enqueue_many(to_enqueue, pipeline=pipe)
                    track(settings, pipe, new_ids)
                pipe.execute()
                return results
            except WatchError:
                continue  # another producer enqueued some of these posts meanwhile: read their states again


def _other_mode_ids(settings: Settings, redis: Redis, relatives: list[str], remote: bool) -> dict[str, list[str]]:
    """Per post, the ids its jobs of the other mode may have: for a remote producer the shared-folder ids, for a
    shared-folder producer the remote jobs (one per content) tagger has enqueued and not seen end."""
    shared = {job_id_for(r, settings): r for r in relatives}
    if remote:
        return {r: [job_id, job_id + AGAIN] for job_id, r in shared.items()}
    found: dict[str, list[str]] = {}
    for member, _ in redis.zscan_iter(keys.pending_index(settings), match="post-*-*"):
        job_id = member.decode() if isinstance(member, bytes) else str(member)
        head, _, tail = job_id.rpartition("-")
        if head in shared and tail != AGAIN.lstrip("-"):
            found.setdefault(shared[head], []).append(job_id)
    return found


def job_timeout(settings: Settings, taxonomy: Taxonomy | None = None) -> int:
    """RQ's job timeout: every wave of chunks (more chunks than TAGGER_CONCURRENCY run in waves) may use
    the provider's whole retry deadline, twice (one re-ask), plus a margin."""
    largest = settings.chunk_size
    try:
        taxonomy = taxonomy or taxonomy_for(settings)
        chunks = sum(-(-len(taxonomy.of_type(t)) // settings.chunk_size) for t in taxonomy.types())
        largest = min(largest, len(taxonomy))
    except TaggerError:
        chunks = settings.concurrency  # the workers will say what is wrong with the taxonomy
    waves = max(1, -(-chunks // settings.concurrency))
    call = call_timeout(settings.request_timeout, largest)  # a call asking many terms waits longer
    return int(waves * (2 * settings.retry_deadline + call) + 120)


def job_data(
    queue: Queue,
    relative: str,
    job_id: str,
    settings: Settings,
    types: Sequence[str] | None = None,
    timeout: int | None = None,
    payload: RemotePayload | None = None,
) -> Any:
    """RQ job data for classifying one post: JSON args, retries, failure callback, timeout.

    With `payload` (remote mode) the job carries the post and its result is kept TAGGER_RESULT_TTL for `apply`.
    """
    types_arg = list(types) if types else None
    return Queue.prepare_data(
        REMOTE_FUNCTION if payload is not None else JOB_FUNCTION,
        # A remote job's payload is signed with TAGGER_SIGNING_KEY (bound to the job): the worker refuses any other.
        args=[sign(settings, "job", job_id, payload.as_job())] if payload is not None else [relative, types_arg],
        job_id=job_id,
        timeout=timeout or job_timeout(settings),
        result_ttl=settings.result_ttl if payload is not None else 86400,
        failure_ttl=30 * 86400,
        description=f"classify {relative}" + (" (remote)" if payload is not None else ""),
        meta={"post": relative, "attempts": 0, "types": list(types) if types else None, "remote": payload is not None},
        retry=Retry(max=settings.job_retries, interval=settings.job_retry_delays) if settings.job_retries else None,
        on_failure=Callback(FAILURE_CALLBACK),
    )
