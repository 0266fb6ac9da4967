"""A worker process: its context built at start, RQ heartbeats, refusal of foreign jobs, recovery, Redis trouble."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import structlog
from pydantic import BaseModel, Field
from redis import Redis, RedisError
from rq import Queue, SimpleWorker
from rq.exceptions import DeserializationError, StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from worker.logs import redact, secrets_of
from worker.queue import keys
from worker.queue.connection import PRIORITIES
from worker.queue.context import WorkerContext, WorkerState
from worker.queue.keys import FAILURE_CALLBACK, JOB_FUNCTION, JOB_FUNCTIONS, queues
from worker.queue.recovery import orphan_due, pending, recover
from worker.settings import Settings

log = structlog.get_logger("tagger.workers")
# RQ's `dequeue_timeout` (an idle worker's wait on the queues, after which it beats) is its worker TTL - 15 s;
# RQ keeps a worker's entry that TTL + 60 s after its last beat, dead or not.
RQ_TTL_OVER_DEQUEUE = 15
BEAT_SPACING = 1.0  # s: RQ's heartbeats and state writes repeated within this are not sent again
MAINTENANCE_INTERVAL = 30  # RQ's registry maintenance, which also restarts a scheduler that died
DROPPED_KEEP = 1000
STOPPING = threading.Event()  # set by SIGTERM/SIGINT in a worker process


def refusal(job: Job) -> str | None:
    """Why a job found on tagger's queues must not run, or None: only tagger's own job, in JSON."""
    try:
        name = job.func_name
    except DeserializationError:
        return "job data is not JSON (a pickled or foreign payload); not run"
    if name not in JOB_FUNCTIONS:
        return f"job calls {name!r}, not {JOB_FUNCTION}; not run"
    # The stored callback names, read without importing them (importing a foreign module runs its code).
    stored = job.to_dict(include_meta=False, include_result=False)
    names = {stored.get(f"{kind}_callback_name") for kind in ("success", "failure", "stopped")}
    foreign = sorted(str(c) for c in names if c and c != FAILURE_CALLBACK)
    if foreign:
        return f"job names foreign callbacks {foreign}; not run"
    return None


class DroppedEntry(BaseModel):
    """An entry taken off a queue that was not a readable job, as kept for `tagger failed` (read back validated)."""

    job_id: str
    queue: str
    reason: str
    at: float = Field(allow_inf_nan=False)


class Backoff:
    """Growing waits (0.5 s doubling to 30 s) while Redis is in trouble; reset once it answers."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap, self.current = first, cap, first

    def next(self) -> float:
        """The wait to use now; the next one is longer."""
        delay, self.current = self.current, min(self.cap, self.current * 2)
        return delay

    def reset(self) -> None:
        """Redis answered: start again from the shortest wait."""
        self.current = self.first


class TaggerWorker(SimpleWorker):
    """Runs jobs in this process (connections and classifier stay warm) and refuses anything not tagger's.

    Liveness is RQ's: while a job runs, a thread sends RQ's heartbeats (worker, execution, job) every third of
    TAGGER_LEASE_SECONDS, and the execution's entry in the StartedJobRegistry expires TAGGER_LEASE_SECONDS
    after the last one. A worker that dies (kill -9, OOM, lost machine) stops beating, and any process's
    recovery hands its job back through RQ's `StartedJobRegistry.cleanup()`.
    """

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        self.beaten = self.state_written = -math.inf  # when this process last sent a heartbeat, and a state
        super().__init__(*args, **kwargs)
        self.settings = settings
        # RQ scores registry entries in whole seconds: one more second so a beat is never due before it lapses.
        self.liveness_ttl = math.ceil(settings.lease_seconds) + 1
        self.secrets = secrets_of(settings)
        self.stop_requested = False

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """How long a running job's entry lives without a heartbeat (short: a dead worker is found fast)."""
        return self.liveness_ttl

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat (three commands) as one round trip, and once where RQ beats several times in a row.

        Between two jobs RQ beats three times within a few milliseconds (and once more inside its suspension check);
        each was a round trip between jobs, not the model's time. A beat keeps the worker its TTL + 60 s, so one
        skipped within BEAT_SPACING of the last changes nothing an observer can see.
        """
        beat = time.monotonic()
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
        elif timeout is None and beat - self.beaten < BEAT_SPACING:
            return
        else:
            with self.connection.pipeline(transaction=False) as pipe:
                super().heartbeat(timeout, pipeline=pipe)
                pipe.execute()
        self.beaten = beat

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's, without writing again, as RQ does between two jobs, the state written less than BEAT_SPACING ago."""
        written = time.monotonic()
        if pipeline is None and state == self.get_state() and written - self.state_written < BEAT_SPACING:
            return
        super().set_state(state, pipeline)
        self.state_written = written

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: finish the current job, then stop (a second signal stops at once)."""
        self.stop_requested = True
        STOPPING.set()
        super().request_stop(signum, frame)

    def unsubscribe(self) -> None:
        """RQ's, without its unbounded wait: redis-py's `stop()` joins the command thread, which may be in a 60 s wait.

        The flag is cleared first, so the UNSUBSCRIBE reply that wakes the thread also ends it; it is a daemon
        thread, so one still waiting after a second does not hold the process.
        """
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None:
            return
        try:
            thread.stop(timeout=0)  # redis >= 8: clears the flag, waits 0 s
        except TypeError:
            thread.stop()  # older redis: only clears the flag
        with contextlib.suppress(RedisError, OSError):
            pubsub.unsubscribe()
        thread.join(timeout=1)
        with contextlib.suppress(RedisError, OSError):
            pubsub.close()

    def stop_scheduler(self) -> None:
        """RQ's, then the locks of a scheduler that died holding them (kill -9) are released, not left a minute."""
        super().stop_scheduler()
        scheduler = self.scheduler
        if scheduler is not None:
            with contextlib.suppress(RedisError):
                scheduler.release_locks()  # only the locks still held under this scheduler's name
                scheduler.register_death()

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job with heartbeats, unless it is not tagger's own: then fail it without running its code."""
        problem = refusal(job)
        if problem is not None:
            self._refuse(job, queue, problem)
            return
        done = threading.Event()
        beating = threading.Thread(target=self._beat, args=(job, done), daemon=True)
        beating.start()
        try:
            super().execute_job(job, queue)
        finally:
            done.set()

    def _beat(self, job: Job, done: threading.Event) -> None:
        interval = beat_interval(self.settings, "busy")
        while not done.wait(interval):
            execution: Execution | None = self.execution
            if execution is None:
                continue
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:  # keep beating: a missed beat only risks running the job twice
                log.warning("redis_unavailable", where="heartbeat", job_id=job.id, error=self._clean(exc))

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        """RQ stores the traceback (results stream, failed registry): redact secrets from it first."""
        super().handle_job_failure(job, queue, started_job_registry, redact(exc_string, self.secrets), execution)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's dequeue, except that an entry that is not a readable job is dropped with a log line."""
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except RedisError:
                raise
            except Exception as exc:
                job_id = getattr(exc, "job_id", None)
                if job_id is None:
                    raise
                self._drop(str(job_id), getattr(getattr(exc, "queue", None), "name", "?"), exc)

    def _refuse(self, job: Job, queue: Queue, problem: str) -> None:
        post = job.meta.get("post")  # an older tagger's job names its post: on-call must see which one
        job.meta = {"kind": "foreign_job", "error": problem, "failed_at": time.time(), "attempts": 0}
        if isinstance(post, str):
            job.meta["post"] = post[:1000]
        # Failed here, never through RQ's failure handling: a foreign job's callbacks are code too, never run.
        job.save_meta()
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            FailedJobRegistry(queue=queue).add(job, exc_string=f"refused: {problem}", pipeline=pipe)
            pipe.execute()
        log.error("refused", job_id=job.id, reason=problem)

    def _drop(self, job_id: str, queue: str, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {self._clean(exc)}"
        entry = DroppedEntry(job_id=job_id, queue=queue, reason=reason, at=time.time())
        with self.connection.pipeline() as pipe:
            pipe.lpush(keys.dropped(self.settings), entry.model_dump_json())
            pipe.ltrim(keys.dropped(self.settings), 0, DROPPED_KEEP - 1)
            pipe.execute()
        log.error("dropped", job_id=job_id, queue=queue, reason=reason)

    def _clean(self, exc: BaseException) -> str:
        return redact(str(exc), self.secrets)[:300]


def _reaper(settings: Settings, redis: Redis, stop: threading.Event) -> None:
    """Recover dead workers' and lost jobs every half lease (and when a lost job's grace ends), whatever Redis
    does meanwhile."""
    backoff = Backoff()
    interval = max(0.5, settings.lease_seconds / 2)
    while not stop.wait(_until_next_pass(settings, redis, interval)):
        try:
            recover(settings, redis)
            backoff.reset()
        except RedisError as exc:
            delay = backoff.next()
            error = redact(str(exc), secrets_of(settings))
            log.warning("redis_unavailable", where="reaper", error=error, retry_in=delay)
            if stop.wait(delay):
                return
        except Exception:
            log.exception("reaper_error")  # never let recovery die with the first surprise


def _until_next_pass(settings: Settings, redis: Redis, interval: float) -> float:
    """Half a lease, or less when a job seen lost ends its grace sooner (it is requeued then, not later)."""
    try:
        due = orphan_due(settings, redis)
    except RedisError:
        return interval  # the pass itself will say what Redis does
    return interval if due is None else min(interval, max(0.2, due - time.time() + 0.05))


def beat_interval(settings: Settings, state: str) -> float:
    """Seconds between a worker's heartbeats in an RQ state: a third of a lease while busy, else RQ's idle wait."""
    return max(0.2, settings.lease_seconds / 3) if state == "busy" else float(settings.idle_beat)


def run_worker(settings: Settings, redis: Redis, priorities: Sequence[str] = PRIORITIES, burst: bool = False) -> None:
    """Work the queues (highest priority first) until stopped, or until nothing is left with `burst`.

    Recovery runs at start, in a background reaper, and before a burst worker decides it is done. Redis
    trouble (restart, LOADING, out of memory, failover) never ends the process: it waits with backoff and a
    log line, then works again.
    """
    selected = [q for q in queues(settings, redis) if q.name.rsplit("-", 1)[-1] in priorities]
    handlers = _signal_handlers()  # RQ installs its own for SIGINT/SIGTERM: put back as found when this returns
    stop = threading.Event()
    threading.Thread(target=_reaper, args=(settings, redis, stop), daemon=True).start()
    backoff = Backoff()
    secrets = secrets_of(settings)
    try:
        while not STOPPING.is_set():
            try:
                current = WorkerState.context
                if current is None or current.settings != settings:
                    # The process's context, built at start (a context left by another run is not this worker's).
                    WorkerState.context = WorkerContext.start(settings, redis)
                recover(settings, redis)
                worker = TaggerWorker(
                    selected,
                    connection=redis,
                    serializer=JSONSerializer,
                    settings=settings,
                    worker_ttl=settings.idle_beat + RQ_TTL_OVER_DEQUEUE,
                    maintenance_interval=MAINTENANCE_INTERVAL,
                )
                worker.work(burst=burst, with_scheduler=True)
                if worker.stop_requested or STOPPING.is_set():
                    return
                if burst:
                    # Before deciding it is done: jobs of dead workers and lost jobs go back to the queues.
                    recover(settings, redis)
                    if not pending(settings, redis):
                        return
                    continue
                problem = "the worker loop ended on an error (see above)"
            except RedisError as exc:
                problem = f"{type(exc).__name__}: {redact(str(exc), secrets)[:300]}"
            delay = backoff.next()
            log.warning("redis_unavailable", where="worker", error=problem, retry_in=delay)
            STOPPING.wait(delay)
    except StopRequested:
        return  # a signal arrived between two runs of RQ's loop
    finally:
        stop.set()
        _restore_signal_handlers(handlers)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _signal_handlers() -> dict[int, Any]:
    """The handlers of the stop signals now (a worker run in a process that goes on, a test's, must leave none)."""
    return {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    """Put back the stop signals' handlers (only the main thread may set them; RQ's are set there too)."""
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
