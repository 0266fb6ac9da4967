"""The fleet of worker processes: `tagger work --processes N` supervises them; `tagger status` sees them."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from redis import Redis, RedisError
from rq import Worker
from rq.exceptions import SchedulerNotFound
from rq.scheduler import RQScheduler
from rq.scripts import release_lock
from rq.worker import BaseWorker

from worker.errors import TaggerError
from worker.logs import redact, secrets_of
from worker.providers import preload
from worker.queue.connection import PRIORITIES, connect
from worker.queue.keys import queue_name, queue_names
from worker.queue.startup import EXIT_CONFIG, start_failure
from worker.queue.workers import beat_interval, run_worker
from worker.settings import Settings

log = structlog.get_logger("tagger.fleet")
STRAY_GRACE = 5.0  # seconds an orphaned process of the fleet gets after SIGTERM before SIGKILL
PR_SET_PDEATHSIG = 1  # prctl(2) options (Linux)
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class SeenWorker:
    """An RQ worker on tagger's queues as its last heartbeat shows it."""

    worker: BaseWorker
    state: str  # the state it last reported (`idle`, `busy`, ...), whether or not it still lives
    heartbeat_age: float  # seconds since its last heartbeat, by this machine's clock
    alive: bool  # False: silent for longer than its beat interval plus TAGGER_SILENT_MARGIN, presumed dead


def seen_workers(settings: Settings, redis: Redis) -> list[SeenWorker]:
    """Every RQ worker on tagger's queues still in Redis, judged by its heartbeat's age.

    A killed worker's entry lingers in Redis (TAGGER_IDLE_BEAT + 75 s after its last beat) showing the state it
    died in; a worker whose beat is overdue by more than TAGGER_SILENT_MARGIN is presumed dead.
    """
    names = set(queue_names(settings))
    now = datetime.now(UTC)
    found = []
    for worker in Worker.all(connection=redis):
        if not names & set(worker.queue_names()) or worker.last_heartbeat is None:
            continue
        beat = worker.last_heartbeat if worker.last_heartbeat.tzinfo else worker.last_heartbeat.replace(tzinfo=UTC)
        age = max(0.0, (now - beat).total_seconds())
        state = str(getattr(worker.get_state(), "value", worker.get_state()))
        found.append(SeenWorker(worker, state, age, age <= beat_interval(settings, state) + settings.silent_margin))
    return found


def live_workers(settings: Settings, redis: Redis) -> list[BaseWorker]:
    """RQ workers on tagger's queues whose heartbeat is not overdue (see `seen_workers`)."""
    return [seen.worker for seen in seen_workers(settings, redis) if seen.alive]


def _prctl(option: int, value: int) -> bool:
    """Linux prctl(2); False where there is none (the fleet then falls back on polling)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _die_with_parent(parent: int) -> bool:
    """Have the kernel send SIGTERM to this process when `parent` dies; False where it cannot."""
    if not _prctl(PR_SET_PDEATHSIG, signal.SIGTERM):
        return False
    if os.getppid() != parent:  # it died before the request: act as the kernel would have
        os.kill(os.getpid(), signal.SIGTERM)
    return True


_forking: list[int] = []  # the pid of the process about to fork (set by the at-fork hook below)


def _before_fork() -> None:
    _forking[:] = [os.getpid()]


def _after_fork_in_child() -> None:
    """A process a worker forks (RQ's scheduler) dies with it: kill -9 of the worker leaves nothing running."""
    # The worker's own signal handlers are not the scheduler's: until RQ installs the scheduler's, a SIGTERM ends it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    if _forking:
        _die_with_parent(_forking[0])


def unheard(settings: Settings, redis: Redis, priority: str) -> str | None:
    """The queue of `priority` when no live worker takes jobs from it (producers warn), else None."""
    name = queue_name(settings, priority)
    return None if any(name in worker.queue_names() for worker in live_workers(settings, redis)) else name


def _child(settings: Settings, priorities: Sequence[str], burst: bool, supervisor: int) -> None:
    """One supervised worker process (with RQ's scheduler as its own child)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    # The supervisor was killed (kill -9, OOM): stop like on SIGTERM (finish the job) rather than run on unseen.
    if not _die_with_parent(supervisor):
        threading.Thread(target=_orphan_watch, args=(supervisor,), daemon=True).start()
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    try:
        run_worker(settings, connect(settings), priorities, burst)
    except TaggerError as exc:  # only its start (the warm context) raises: a job's failure is the job's
        # One line, and a code that tells the supervisor a restart would fail the same way.
        print(f"tagger: {redact(start_failure(exc), secrets_of(settings))}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)


def _orphan_watch(supervisor: int) -> None:
    """Where the kernel cannot signal a supervisor's death: poll for it, then stop like on SIGTERM."""
    while os.getppid() == supervisor:
        time.sleep(1.0)
    log.warning("supervisor_gone", supervisor=supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


def _children_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has ended; without /proc, signal 0 decides)."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Strays:
    """Processes of the fleet whose parent died (a killed worker's scheduler), adopted by the supervisor.

    The supervisor is a child subreaper: an orphan of the fleet becomes its child instead of init's. It is sent
    SIGTERM (RQ's scheduler then releases its locks), SIGKILL after STRAY_GRACE, and reaped.
    """

    def __init__(self) -> None:
        self.signalled: dict[int, float] = {}
        self.seen = False  # any stray at all: some process of the fleet died untidily

    def handle(self, known: set[int], now: float) -> None:
        """Signal and reap this process's children that are not the supervised workers in `known`."""
        for pid in _children_of(os.getpid()):
            if pid in known:
                continue
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    self.signalled.pop(pid, None)
                    continue
            first = self.signalled.setdefault(pid, now)
            self.seen = True
            with contextlib.suppress(ProcessLookupError):
                if first == now:
                    log.warning("stray_process", pid=pid, action="SIGTERM")
                    os.kill(pid, signal.SIGTERM)
                elif now - first > STRAY_GRACE:
                    log.warning("stray_process", pid=pid, action="SIGKILL")
                    os.kill(pid, signal.SIGKILL)

    def drain(self, known: set[int], timeout: float = STRAY_GRACE + 2) -> None:
        """At exit: until no stray is left (SIGKILL after STRAY_GRACE), or `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.handle(known, time.monotonic())
            if not [p for p in _children_of(os.getpid()) if p not in known]:
                return
            time.sleep(0.1)


def release_dead_schedulers(settings: Settings, redis: Redis, fleet: set[int]) -> list[str]:
    """Release RQ scheduler locks on tagger's queues held by a scheduler of this fleet that no longer runs.

    A scheduler killed with -9 cannot release its locks; they would block scheduling for a minute. Only a
    holder whose pid this supervisor saw in its fleet, on this host, is released (never another machine's).
    """
    released = []
    host = socket.gethostname()
    for name in queue_names(settings):
        key = RQScheduler.get_locking_key(name)
        holder = redis.get(key)
        if holder is None:
            continue
        owner = holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)
        try:
            scheduler = RQScheduler.fetch(owner, redis)
        except (SchedulerNotFound, KeyError, ValueError):
            continue  # not registered yet, or its record expired: its lock expires with it
        if scheduler.hostname != host or scheduler.pid not in fleet or _running(scheduler.pid):
            continue
        if release_lock(redis, key, owner):
            released.append(name)
            redis.delete(scheduler.key)
            log.info("scheduler_lock_released", queue=name, scheduler_pid=scheduler.pid)
    return released


def run_processes(
    settings: Settings, processes: int, priorities: Sequence[str] | None = PRIORITIES, burst: bool = False
) -> int:
    """Run and supervise `processes` worker processes; returns the exit code (0 on a clean stop).

    A child that dies is restarted, except one that failed its start-up check (EXIT_CONFIG): then the fleet
    stops and the code is EXIT_CONFIG. SIGTERM/SIGINT reach every child, which finishes its job (within
    TAGGER_SHUTDOWN_GRACE, else it is stopped); a second signal stops them at once (their jobs are recovered).
    The children share the command's process group: Ctrl-C on a terminal reaches them all, and RQ ignores the
    repeat that forwarding makes. Every process the fleet causes ends with it: a worker dies with the
    supervisor, RQ's scheduler with its worker, and an orphan of the fleet is adopted (the supervisor is a
    child subreaper), stopped and reaped; a killed scheduler's locks are released.
    """
    priorities = list(priorities or PRIORITIES)
    context = multiprocessing.get_context("fork")
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    subreaper = _prctl(PR_SET_CHILD_SUBREAPER, 1)
    fleet: set[int] = set()  # every pid of the fleet seen: workers and their children
    strays = Strays()

    def start() -> Any:
        child = context.Process(target=_child, args=(settings, list(priorities), burst, os.getpid()), daemon=False)
        child.start()
        assert child.pid is not None
        fleet.add(child.pid)
        log.info("worker_started", pid=child.pid)
        return child

    preload(settings)
    children = [start() for _ in range(processes)]
    handled = 0
    stop_at: float | None = None
    forced_at: float | None = None
    looked_at = 0.0
    config_failed = False
    died = False  # a worker died (and was restarted): its scheduler may have died holding its locks
    restarts: dict[int, float] = {}
    try:
        while True:
            now = time.monotonic()
            while handled < len(received):
                signum = received[handled]
                handled += 1
                if stop_at is None:
                    stop_at = now
                    log.info("stopping", signal=signum, grace=settings.shutdown_grace)
                else:
                    forced_at = forced_at or now
                    log.warning("stopping_now", signal=signum)
                for child in children:
                    if child.is_alive():
                        os.kill(child.pid, signal.SIGTERM)
            if stop_at is not None and forced_at is None and now - stop_at > settings.shutdown_grace:
                forced_at = now
                log.warning("grace_over", grace=settings.shutdown_grace)
                for child in children:
                    if child.is_alive():
                        os.kill(child.pid, signal.SIGTERM)  # a second signal: RQ's cold shutdown
            if forced_at is not None and now - forced_at > 5:
                for child in children:
                    if child.is_alive():
                        for pid in [*_children_of(child.pid), child.pid]:  # RQ's scheduler, then the worker
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
            if now - looked_at >= 1.0:  # learn the workers' children (RQ's scheduler); adopt orphans
                looked_at = now
                for child in children:
                    if child.is_alive():
                        fleet.update(_children_of(child.pid))
                strays.handle({c.pid for c in children}, now)
            failed_start = [c for c in children if c.exitcode == EXIT_CONFIG]
            if failed_start and not config_failed:
                config_failed = True
                stop_at = stop_at or now  # a worker that cannot start will not start next time either
                log.error("worker_start_failed", pid=failed_start[0].pid, exitcode=EXIT_CONFIG)
                for child in children:
                    if child.is_alive():
                        os.kill(child.pid, signal.SIGTERM)
            dead = [
                slot
                for slot, child in enumerate(children)
                if not child.is_alive() and stop_at is None and not (burst and child.exitcode == 0)
            ]
            for slot in dead:
                if now - restarts.get(slot, 0.0) < 2.0:
                    continue  # a child that keeps dying is restarted at most every 2 s
                children[slot].join()
                log.warning("worker_died", pid=children[slot].pid, exitcode=children[slot].exitcode)
                strays.handle({c.pid for c in children}, now)  # never reap a worker: multiprocessing must
                _release(settings, fleet)
                died = True
                restarts[slot] = now
                children[slot] = start()
            if not dead and not any(c.is_alive() for c in children) and (stop_at is not None or burst):
                break
            time.sleep(0.2)
    finally:
        for child in children:
            child.join(timeout=1)
        strays.drain({c.pid for c in children})
        if died or strays.seen or forced_at is not None:  # a tidy stop leaves no lock: no Redis call on the way out
            _release(settings, fleet)
        if subreaper:
            _prctl(PR_SET_CHILD_SUBREAPER, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if config_failed:
        return EXIT_CONFIG
    return 0 if stop_at is not None else max((c.exitcode or 0) for c in children)


def _release(settings: Settings, fleet: set[int]) -> None:
    """Release the locks of the fleet's dead schedulers; Redis trouble only costs a line (the locks expire)."""
    try:
        release_dead_schedulers(settings, connect(settings), fleet)
    except RedisError as exc:
        error = redact(str(exc), secrets_of(settings))[:300]
        log.warning("redis_unavailable", where="supervisor", error=error)
