"""Batch API subcommands: `backfill --batch` submission and `batch status | collect | cancel` (parse and print)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click
from redis import Redis

from worker.cli.app import App, err, pass_app
from worker.polling import Progress
from worker.settings import Settings

if TYPE_CHECKING:
    from worker import batch_backfill as batch_types

# `worker.batch_backfill` loads the SDK: the batch commands import it when they run, so the others start faster.


def _cost(value: float | None, settings: Settings) -> str:
    return f"${value:.4f}" if value is not None else f"unknown (no price for {settings.model} in TAGGER_PRICES)"


def submit(
    settings: Settings,
    todo: list[Path],
    types: Sequence[str] | None,
    redis: Redis | None,
    wait: bool,
    progress: Progress,
) -> bool:
    """Submit a planned backfill as batches (`backfill --batch`); with `wait`, follow and collect. True if all went."""
    from worker import batch_backfill

    store = batch_backfill.store_for(settings, redis)
    done = batch_backfill.submit(settings, todo, store, types)
    for state in done.batches:
        click.echo(
            f"batch {state.id}: {state.requests} requests, {len(state.posts)} posts, {state.bytes} bytes, "
            f"estimated {_cost(state.estimated_cost, settings)} at batch prices"
        )
    settled = f"; {len(done.settled)} posts needed no request" if done.settled else ""
    if done.in_flight:
        settled += f"; {len(done.in_flight)} posts already in a batch not yet collected (tagger batch collect)"
    click.echo(
        f"backfill --batch: {len(done.batches)} batches, {done.requests} requests, "
        f"estimated cost {_cost(done.estimated_cost, settings)} at batch prices{settled}"
    )
    for line in done.failed:
        err(f"FAILED {line}")
    inline = " --inline" if redis is None else ""
    # The batches that hold posts of this backfill already (not collected for this checkout yet) are followed too.
    ids = [b.id for b in done.batches] + [i for i in done.holding if i not in {b.id for b in done.batches}]
    if not wait or not ids:
        if ids:
            click.echo(f"then: tagger batch status{inline}; tagger batch collect{inline}")
        return not done.failed
    try:
        batch_backfill.wait(settings, store, ids, progress)
    except KeyboardInterrupt:
        click.echo(f"\nbackfill: stopped waiting; the batches carry on (tagger batch collect{inline} later)")
        raise click.exceptions.Exit(130) from None
    click.echo()
    collected = batch_backfill.collect(settings, store, ids, redis)
    return _print_collected(collected, settings) and not done.failed


def _print_collected(result: batch_types.Collected, settings: Settings) -> bool:
    click.echo(
        f"collect: {len(result.written)} written, {len(result.unchanged)} unchanged, {len(result.enqueued)} enqueued, "
        f"{len(result.rebatched)} rebatched, {len(result.inline)} classified inline, {result.already} settled "
        f"before, {len(result.unfinished)} batches unfinished"
    )
    for label, lines in (("enqueued", result.enqueued), ("rebatched", result.rebatched), ("inline", result.inline)):
        for line in lines:
            click.echo(f"  {label} {line}")
    for state in result.new_batches:
        click.echo(f"batch {state.id}: {state.requests} requests, estimated {_cost(state.estimated_cost, settings)}")
    for batch_id in result.unfinished:
        click.echo(f"  unfinished {batch_id} (collect again when it is done)")
    for line in result.failed:
        err(f"FAILED {line}")
    return not result.failed


def _setup(app: App, inline: bool) -> tuple[Settings, batch_types.BatchStore, Redis | None]:
    from worker import batch_backfill

    settings = app.configured()  # warnings go to stderr, never into the printed table
    redis = None if inline else app.redis()
    return settings, batch_backfill.store_for(settings, redis), redis


INLINE_HELP = "State in a file under the records folder (else the content root): no Redis."


@click.group()
def batch() -> None:
    """Batch API backfills (`backfill DIR --batch`): status, collect, cancel."""


@batch.command()
@click.argument("batches", nargs=-1, metavar="[BATCH]...")
@click.option("--inline", is_flag=True, help=INLINE_HELP)
@pass_app
def status(app: App, batches: tuple[str, ...], inline: bool) -> None:
    """List tagger's batches (or each BATCH id given): state, request counts, posts settled, age, estimated cost."""
    from worker import batch_backfill

    settings, store, _ = _setup(app, inline)
    rows = batch_backfill.batch_rows(settings, store, batches)
    click.echo(
        f"{'batch':<28} {'status':<11} {'done':>7} {'failed':>7} {'total':>7} {'posts':>6} {'settled':>7} "
        f"{'age':>8}  est. cost"
    )
    for r in rows:
        click.echo(
            f"{r.id:<28} {r.status:<11} {r.completed:>7} {r.failed:>7} {r.total:>7} {r.posts:>6} "
            f"{r.settled:>7} {_age(r.age):>8}  {_cost(r.estimated_cost, settings)}"
        )
    err(f"{len(rows)} batches")


@batch.command()
@click.argument("batches", nargs=-1, metavar="[BATCH]...")
@click.option("--inline", is_flag=True, help=INLINE_HELP + " What failed is classified in this process.")
@click.option("--rebatch", is_flag=True, help="Send what failed into a new batch instead of the queue.")
@pass_app
def collect(app: App, batches: tuple[str, ...], inline: bool, rebatch: bool) -> None:
    """Write back the posts of finished batches (all of tagger's, or each BATCH id given).

    What failed goes to the queue (or a new batch with --rebatch). Safe to run again at any time.
    """
    from worker import batch_backfill

    settings, store, redis = _setup(app, inline)
    if not _print_collected(batch_backfill.collect(settings, store, batches, redis, rebatch=rebatch), settings):
        raise click.exceptions.Exit(1)


@batch.command()
@click.argument("batches", nargs=-1, metavar="[BATCH]...")
@click.option("--inline", is_flag=True, help=INLINE_HELP)
@pass_app
def cancel(app: App, batches: tuple[str, ...], inline: bool) -> None:
    """Cancel tagger's unfinished batches (or each BATCH id given); `batch collect` then queues their posts."""
    from worker import batch_backfill

    settings, store, _ = _setup(app, inline)
    for batch_id, state in batch_backfill.cancel(settings, store, batches):
        click.echo(f"{batch_id}: {state}")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
