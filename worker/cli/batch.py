"""Batch API subcommands: `backfill --batch` submission and `batch status | collect | cancel` (parse and print)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker import batch as batch_lib
from worker.logs import configure
from worker.queue.keys import connect
from worker.settings import Settings


def _store(settings: Settings, inline: bool) -> tuple[batch_lib.BatchStore, Any]:
    redis = None if inline else connect(settings)
    return batch_lib.store_for(settings, redis), redis


def _cost(value: float | None, settings: Settings) -> str:
    return f"${value:.4f}" if value is not None else f"unknown (no price for {settings.model} in TAGGER_PRICES)"


def submit(
    settings: Settings, todo: list[Path], types: Sequence[str] | None, inline: bool, wait: bool, progress: Any
) -> int:
    """Submit a planned backfill as batches; with `wait`, follow and collect them."""
    store, redis = _store(settings, inline)
    done = batch_lib.submit(settings, todo, store, types)
    for state in done.batches:
        print(
            f"batch {state.id}: {state.requests} requests, {len(state.posts)} posts, {state.bytes} bytes, "
            f"estimated {_cost(state.estimated_cost, settings)} at batch prices"
        )
    print(
        f"backfill --batch: {len(done.batches)} batches, {done.requests} requests, "
        f"estimated cost {_cost(done.estimated_cost, settings)} at batch prices"
        + (f"; {len(done.settled)} posts needed no request" if done.settled else "")
    )
    for line in done.failed:
        print(f"FAILED {line}", file=sys.stderr)
    if not wait or not done.batches:
        if done.batches:
            print(
                f"then: tagger batch status{' --inline' if inline else ''}; "
                f"tagger batch collect{' --inline' if inline else ''}"
            )
        return 1 if done.failed else 0
    ids = [b.id for b in done.batches]
    try:
        batch_lib.wait(settings, store, ids, progress)
    except KeyboardInterrupt:
        print("\nbackfill: stopped waiting; the batches carry on (tagger batch collect later)")
        return 130
    print()
    return _print_collected(batch_lib.collect(settings, store, ids, redis), settings) or int(bool(done.failed))


def _print_collected(result: batch_lib.Collected, settings: Settings) -> int:
    print(
        f"collect: {len(result.written)} written, {len(result.unchanged)} unchanged, "
        f"{len(result.enqueued)} enqueued, {len(result.rebatched)} rebatched, {len(result.inline)} classified inline, "
        f"{result.already} settled before, {len(result.unfinished)} batches unfinished"
    )
    for line in result.enqueued:
        print(f"  enqueued {line}")
    for line in result.rebatched:
        print(f"  rebatched {line}")
    for line in result.inline:
        print(f"  inline {line}")
    for state in result.new_batches:
        print(f"batch {state.id}: {state.requests} requests, estimated {_cost(state.estimated_cost, settings)}")
    for batch_id in result.unfinished:
        print(f"  unfinished {batch_id} (collect again when it is done)")
    for line in result.failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_batch(args: argparse.Namespace) -> int:
    """`tagger batch status | collect | cancel [BATCH...]`."""
    settings = Settings()
    configure(settings, quiet=True)
    store, redis = _store(settings, args.inline)
    if args.action == "status":
        rows = batch_lib.status(settings, store, args.batches)
        print(
            f"{'batch':<28} {'status':<11} {'done':>7} {'failed':>7} {'total':>7} {'posts':>6} {'settled':>7} "
            f"{'age':>8}  est. cost"
        )
        for r in rows:
            print(
                f"{r.id:<28} {r.status:<11} {r.completed:>7} {r.failed:>7} {r.total:>7} {r.posts:>6} "
                f"{r.settled:>7} {_age(r.age):>8}  {_cost(r.estimated_cost, settings)}"
            )
        print(f"{len(rows)} batches", file=sys.stderr)
        return 0
    if args.action == "cancel":
        for batch_id, state in batch_lib.cancel(settings, store, args.batches):
            print(f"{batch_id}: {state}")
        return 0
    return _print_collected(batch_lib.collect(settings, store, args.batches, redis, rebatch=args.rebatch), settings)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def add_commands(sub: Any) -> None:
    """Register `batch` on the main parser."""
    batch = sub.add_parser("batch", help="Batch API backfills: status, collect, cancel")
    batch.add_argument("action", choices=["status", "collect", "cancel"])
    batch.add_argument("batches", nargs="*", metavar="BATCH", help="batch ids (default: all of tagger's)")
    batch.add_argument("--inline", action="store_true", help="state in a file under the records folder, no Redis")
    batch.add_argument("--rebatch", action="store_true", help="collect: send what failed into a new batch")
    batch.set_defaults(func=cmd_batch)
