"""The fleet of worker processes: `tagger work --processes N` supervises them; `tagger status` sees them."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from redis import Redis
from rq import Worker
from rq.worker import BaseWorker

from worker.queue.connection import PRIORITIES, connect
from worker.queue.keys import queue_names
from worker.queue.workers import beat_interval, run_worker
from worker.settings import Settings

log = structlog.get_logger("tagger.fleet")
# A worker silent for its beat interval plus this is presumed dead: room for a slow Redis, a loaded machine
# and clocks a few seconds apart (the beat's time is the worker's clock).
SILENT_MARGIN = 10.0


@dataclass(frozen=True)
class SeenWorker:
    """An RQ worker on tagger's queues as its last heartbeat shows it."""

    worker: BaseWorker
    state: str  # the state it last reported (`idle`, `busy`, ...), whether or not it still lives
    heartbeat_age: float  # seconds since its last heartbeat, by this machine's clock
    alive: bool  # False: silent for longer than its beat interval plus SILENT_MARGIN, presumed dead


def seen_workers(settings: Settings, redis: Redis) -> list[SeenWorker]:
    """Every RQ worker on tagger's queues still in Redis, judged by its heartbeat's age.

    A killed worker's entry lingers in Redis (WORKER_TTL + 60 s after its last beat) showing the state it died
    in; a worker whose beat is overdue by more than SILENT_MARGIN is presumed dead.
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
        found.append(SeenWorker(worker, state, age, age <= beat_interval(settings, state) + SILENT_MARGIN))
    return found


def live_workers(settings: Settings, redis: Redis) -> list[BaseWorker]:
    """RQ workers on tagger's queues whose heartbeat is not overdue (see `seen_workers`)."""
    return [seen.worker for seen in seen_workers(settings, redis) if seen.alive]


def _child(settings: Settings, priorities: Sequence[str], burst: bool, supervisor: int) -> None:
    """One supervised worker process (with RQ's scheduler as its own child)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    threading.Thread(target=_orphan_watch, args=(supervisor,), daemon=True).start()
    run_worker(settings, connect(settings), priorities, burst)


def _orphan_watch(supervisor: int) -> None:
    """The supervisor was killed (kill -9, OOM): stop like on SIGTERM (finish the job) rather than run on unseen."""
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


def run_processes(
    settings: Settings, processes: int, priorities: Sequence[str] | None = PRIORITIES, burst: bool = False
) -> int:
    """Run and supervise `processes` worker processes; returns the exit code (0 on a clean stop).

    A child that dies is restarted. SIGTERM/SIGINT reach every child, which finishes its job (within
    TAGGER_SHUTDOWN_GRACE, else it is stopped); a second signal stops them at once (their jobs are recovered).
    The children share the command's process group: Ctrl-C on a terminal reaches them all, and RQ ignores the
    repeat that forwarding makes.
    """
    priorities = list(priorities or PRIORITIES)
    context = multiprocessing.get_context("fork")
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def start() -> Any:
        child = context.Process(target=_child, args=(settings, list(priorities), burst, os.getpid()), daemon=False)
        child.start()
        log.info("worker_started", pid=child.pid)
        return child

    children = [start() for _ in range(processes)]
    handled = 0
    stop_at: float | None = None
    forced_at: float | None = None
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
                restarts[slot] = now
                children[slot] = start()
            if not dead and not any(c.is_alive() for c in children) and (stop_at is not None or burst):
                break
            time.sleep(0.2)
    finally:
        for child in children:
            child.join(timeout=1)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0 if stop_at is not None else max((c.exitcode or 0) for c in children)
