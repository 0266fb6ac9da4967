"""Worker processes: a warm classifier per process, job leases, recovery, and refusing foreign jobs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from redis import Redis, RedisError
from rq import Queue, SimpleWorker
from rq.exceptions import DeserializationError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from worker.classifier import Classifier, make_classifier
from worker.queue.keys import FAILURE_CALLBACK, JOB_FUNCTION, PRIORITIES, queues, redis_key
from worker.queue.recovery import promote_overdue, recover_abandoned
from worker.queue.throttle import RedisThrottle
from worker.settings import Settings

log = structlog.get_logger("tagger.workers")


@contextmanager
def lease(redis: Redis, settings: Settings, job_id: str) -> Iterator[None]:
    """Hold a renewed lease while the job runs: a job whose lease lapses was abandoned by a dead worker."""
    key = redis_key(settings, "lease", job_id)
    stop = threading.Event()
    ttl = max(1, int(settings.lease_seconds))

    def renew() -> None:
        while not stop.wait(settings.lease_seconds / 3):
            try:
                redis.set(key, "1", ex=ttl)
            except RedisError:
                log.warning("lease_renewal_failed", job_id=job_id)  # keep trying: a lapsed lease means a rerun

    redis.set(key, "1", ex=ttl)
    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        redis.delete(key)


def _signature(settings: Settings) -> tuple[tuple[str, int, int], ...]:
    """What, on disk, a built classifier depends on: term files and prompt templates."""
    from worker.prompts import template_paths

    files = [*settings.taxonomy_dir.rglob("*.md"), *template_paths(settings.prompts_dir)]
    return tuple(sorted((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()))


@dataclass
class WorkerContext:
    """Built once per worker process and reused by its jobs: settings and a ready classifier."""

    settings: Settings
    classifier: Classifier
    signature: tuple[tuple[str, int, int], ...]

    @classmethod
    def build(cls, redis: Redis) -> WorkerContext:
        """Read settings, taxonomy and templates, and set up the provider."""
        settings = Settings()
        return cls(settings, make_classifier(settings, RedisThrottle(settings, redis)), _signature(settings))

    def fresh(self, redis: Redis) -> WorkerContext:
        """This context, or a rebuilt one when a term file or template changed on disk."""
        return self if _signature(self.settings) == self.signature else WorkerContext.build(redis)


class WorkerState:
    """The worker process's context, built before its first job."""

    # Process state on purpose: RQ calls a job function by import path, so this is how a classifier built
    # once (taxonomy, SSL context, the SDK's per-model classes, open connections) reaches every job.
    context: WorkerContext | None = None


def refusal(job: Job) -> str | None:
    """Why a job found on tagger's queues must not run, or None: only tagger's own job, in JSON."""
    try:
        name = job.func_name
    except DeserializationError:
        return "job data is not JSON (a pickled or foreign payload); not run"
    if name != JOB_FUNCTION:
        return f"job calls {name!r}, not {JOB_FUNCTION}; not run"
    callbacks = {job._success_callback_name, job._failure_callback_name, job._stopped_callback_name}
    foreign = sorted(str(c) for c in callbacks if c is not None and c != FAILURE_CALLBACK)
    if foreign:
        return f"job names foreign callbacks {foreign}; not run"
    return None


class TaggerWorker(SimpleWorker):
    """Runs jobs in this process (connections and classifier stay warm) and refuses anything not tagger's."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job, unless it is not tagger's own: then fail it without running any of its code."""
        problem = refusal(job)
        if problem is None:
            super().execute_job(job, queue)
            return
        # Callbacks are cleared first: a foreign job's failure callback is code too.
        job._success_callback_name = job._failure_callback_name = job._stopped_callback_name = None
        job.meta = {"kind": "foreign_job", "error": problem, "failed_at": time.time(), "attempts": 0}
        job.save_meta()
        job.set_status(JobStatus.FAILED)
        FailedJobRegistry(queue=queue).add(job, exc_string=f"refused: {problem}")
        log.error("refused", job_id=job.id, reason=problem)


def run_worker(settings: Settings, redis: Redis, priorities: Sequence[str] = PRIORITIES, burst: bool = False) -> None:
    """Work the queues (highest priority first) until stopped, or until empty with `burst`."""
    selected = [q for q in queues(settings, redis) if q.name.rsplit("-", 1)[-1] in priorities]
    stop = threading.Event()

    def reaper() -> None:
        while not stop.wait(max(0.5, settings.lease_seconds / 2)):
            recover_abandoned(settings, redis)
            promote_overdue(settings, redis)

    threading.Thread(target=reaper, daemon=True).start()
    WorkerState.context = WorkerContext.build(redis)
    # Jobs run in this process (no fork per job): connections and the classifier stay warm. A worker that
    # dies mid-job loses nothing: its lease lapses and the job is requeued.
    worker = TaggerWorker(selected, connection=redis, serializer=JSONSerializer)
    try:
        worker.work(burst=burst, with_scheduler=True)
    finally:
        stop.set()


def run_processes(settings: Settings, processes: int, priorities: Sequence[str] | None, burst: bool) -> int:
    """Run `processes` worker processes (each `tagger work --processes 1`) and wait for them; their worst exit code."""
    command = [
        sys.executable,
        "-m",
        "worker",
        "work",
        "--processes",
        "1",
        *(["--burst"] if burst else []),
        *[arg for priority in priorities or () for arg in ("--queue", priority)],
    ]
    children = [subprocess.Popen(command) for _ in range(processes)]
    try:
        return max(child.wait() for child in children)
    except KeyboardInterrupt:
        for child in children:
            child.terminate()
        return max(child.wait() for child in children)
