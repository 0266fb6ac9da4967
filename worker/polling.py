"""Waiting for work to end: one polling loop that reports progress (backfill --wait, batches, apply --wait)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# What a progress printer is told: done, failed, total, when the wait started (monotonic), tokens used.
Progress = Callable[[int, int, int, float, int], None]


@dataclass(frozen=True)
class Tally:
    """How far a wait has come at one look."""

    done: int
    failed: int
    total: int
    tokens: int = 0
    finished: bool = False  # nothing left to wait for


def poll_until(
    look: Callable[[], Tally | None],
    interval: float,
    progress: Progress | None = None,
    timeout: float | None = None,
) -> Tally | None:
    """Call `look` until it says finished (or `timeout` s pass), reporting each tally and waiting `interval` s.

    `look` returns None when it learnt nothing (it waited out trouble itself): it is called again at once.
    Returns the last tally (None if there never was one).
    """
    started = time.monotonic()
    last: Tally | None = None
    while True:
        tally = look()
        if tally is None:
            continue
        last = tally
        if progress:
            progress(tally.done, tally.failed, tally.total, started, tally.tokens)
        if tally.finished or (timeout is not None and time.monotonic() - started >= timeout):
            return last
        time.sleep(interval)
