"""On-call subcommands: failed (list, show, retry, purge), status, resume (parse and print only)."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime

import click

from worker import errors, oncall
from worker.cli.app import App, Fail, cut, err, pass_app
from worker.queue.throttle import RedisThrottle

# Kinds a failed job can carry besides the errors' own: set by RQ, recovery, the worker's refusal, `failed list`.
OTHER_KINDS = ("abandoned", "job_timeout", "crash", "foreign_job", "unreadable")
MESSAGE_WIDTH = 100


def known_kinds() -> list[str]:
    """Every failure kind tagger records."""
    found: set[str] = set(OTHER_KINDS)
    todo: list[type[errors.TaggerError]] = [errors.TaggerError]
    while todo:
        cls = todo.pop()
        found.add(cls.kind)
        todo.extend(cls.__subclasses__())
    return sorted(found)


def _check_kind(kind: str | None, present: list[str]) -> None:
    if kind is not None and kind not in known_kinds() and kind not in present:
        raise Fail(f"usage: no failure kind {kind!r}; kinds: {', '.join(known_kinds())}")


@click.group()
def failed() -> None:
    """Failed jobs: list, show, retry, purge."""


@failed.command("list")
@click.option("--error", "kind", metavar="KIND", help="Only failures of this kind (e.g. quota, bad_post).")
@pass_app
def list_(app: App, kind: str | None) -> None:
    """List failed jobs, newest first: job, kind, tries, when, post and message."""
    settings = app.configured()  # warnings go to stderr, never into the printed table or JSON
    redis = app.redis()
    rows = oncall.failures(settings, redis)
    _check_kind(kind, [f.kind for f in rows])
    rows = [f for f in rows if kind is None or f.kind == kind]
    click.echo(f"{'job':<30} {'kind':<14} {'tries':>5}  {'when (UTC)':<19}  post: message")
    for f in rows:
        when = datetime.fromtimestamp(f.failed_at, UTC).strftime("%Y-%m-%d %H:%M:%S") if f.failed_at else "?"
        click.echo(
            f"{f.job_id:<30} {f.kind:<14} {f.attempts:>5}  {when:<19}  {f.post}: {cut(f.message, MESSAGE_WIDTH)}"
        )
    waiting = oncall.awaiting_recovery(settings, redis)
    err(f"{len(rows)} failed" + (f", {waiting} awaiting recovery (worker died)" if waiting else ""))


@failed.command()
@click.argument("jobs", nargs=-1, required=True, metavar="JOB...")
@pass_app
def show(app: App, jobs: tuple[str, ...]) -> None:
    """Show everything known about each JOB (an id from `failed list`): error, traceback, raw reply."""
    settings = app.configured()  # warnings go to stderr, never into the printed table or JSON
    redis = app.redis()
    missing = []
    for job_id in jobs:
        info = oncall.show(settings, redis, job_id)
        if info is None:
            missing.append(job_id)
            continue
        for key, value in info.items():
            text = value if isinstance(value, str) else json.dumps(value)
            click.echo(f"{key}:\n{text}" if isinstance(value, str) and "\n" in value else f"{key}: {text}")
        click.echo(f"next: {oncall.next_step(info)}")
    if missing:
        raise Fail(f"usage: no such job: {', '.join(missing)} (ids are in `tagger failed list`)")


@failed.command()
@click.argument("jobs", nargs=-1, metavar="[JOB]...")
@click.option("--all", "retry_all", is_flag=True, help="Retry every failed job (of --error KIND, if given).")
@click.option("--error", "kind", metavar="KIND", help="With --all: only failures of this kind.")
@pass_app
def retry(app: App, jobs: tuple[str, ...], retry_all: bool, kind: str | None) -> None:
    """Requeue the failed JOBs named, or all of them with --all."""
    if bool(jobs) == retry_all:
        raise click.UsageError("name the failed jobs to retry, or use --all [--error KIND]")
    settings = app.configured()  # warnings go to stderr, never into the printed table or JSON
    redis = app.redis()
    _check_kind(kind, [f.kind for f in oncall.failures(settings, redis)])
    done = oncall.retry(settings, redis, None if retry_all else list(jobs), kind)
    click.echo(f"requeued {len(done)}: {' '.join(done)}" if done else "nothing to do")
    unknown = [j for j in jobs if j not in done]
    if unknown:
        raise Fail(f"usage: not a failed job: {', '.join(unknown)} (ids are in `tagger failed list`)")


@failed.command()
@click.option("--yes", is_flag=True, help="Delete without asking.")
@pass_app
def purge(app: App, yes: bool) -> None:
    """Delete every failed job (asks first)."""
    settings = app.configured()  # warnings go to stderr, never into the printed table or JSON
    redis = app.redis()
    count = len(oncall.failures(settings, redis))
    if not count:
        click.echo("nothing to do")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise Fail(f"usage: purge would delete {count} failed jobs: not on a terminal to ask, add --yes")
        if not click.confirm(f"delete {count} failed jobs?", default=False):
            click.echo("not deleted")
            raise click.exceptions.Exit(1)
    click.echo(f"deleted {oncall.purge(settings, redis)} failed jobs")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@pass_app
def status(app: App, as_json: bool) -> None:
    """Queues, workers, failures and throughput.

    Queue depths, workers, failures by kind, the last minutes' posts, calls and tokens, and the shared pause.
    """
    settings = app.configured()
    info = oncall.queue_status(settings, app.redis())
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    if info["paused"]:
        click.echo(
            f"PAUSED for {info['paused']['seconds']}s: {info['paused']['reason']} (workers hold their LLM calls)"
        )
    for name, depth in info["queues"].items():
        click.echo(f"{name:<24} " + "  ".join(f"{k} {v}" for k, v in depth.items()))
    if info["no_worker"]:
        click.echo("WARNING: jobs are waiting and no worker is running: start 'tagger work'")
    silent = info["silent_workers"]
    click.echo(f"workers: {len(info['workers'])}" + (f" (and {len(silent)} silent, presumed dead)" if silent else ""))
    for w in info["workers"]:
        click.echo(f"  {w['name']} {w['state']} (heartbeat {w['heartbeat_age']:.0f}s ago) {w['job'] or ''}".rstrip())
    for w in silent:
        was = f"; was {w['last_state']}" + (f" on {w['job']}" if w["job"] else "")
        click.echo(f"  {w['name']} silent (no heartbeat for {w['heartbeat_age']:.0f} s; presumed dead{was})")
    click.echo("failed by kind: " + (", ".join(f"{k} {v}" for k, v in info["failed_by_kind"].items()) or "none"))
    now = time.time()
    click.echo("waiting for a retry:" + ("" if info["retrying"] else " none"))
    for kind, waiting in info["retrying"].items():
        due = waiting["next_try"] - now
        when = f"next try in {due:.0f} s" if due > 0 else f"overdue by {-due:.0f} s"
        reason = f": {cut(waiting['reason'], MESSAGE_WIDTH)}" if waiting["reason"] else ""
        click.echo(f"  {kind} {waiting['jobs']} ({when}){reason}")
    seen = info["last_provider_error"]
    recent = f"{info['provider_errors']} in the last {info['last_minutes']} min"
    if seen is None:
        click.echo(f"provider errors: none seen ({recent})")
    else:
        ago = f"{max(0.0, now - seen['at']):.0f} s ago" if seen["at"] else "at an unknown time"
        message = cut(seen["message"], MESSAGE_WIDTH)
        click.echo(f"last provider error: {seen['kind']} {ago} ({recent}): {message}")
    minutes = info["last_minutes"]
    click.echo(
        f"last {minutes} min: {info['done']} posts ({info['done'] / minutes:.1f}/min), {info['calls']} LLM calls, "
        f"{info['tokens']} tokens"
    )


@click.command()
@pass_app
def resume(app: App) -> None:
    """Lift the shared pause (after quota was topped up).

    Quota exhaustion and 429s pause every worker's LLM calls; this lifts the pause at once.
    """
    settings = app.configured()
    lifted = RedisThrottle(settings, app.redis()).resume()
    click.echo("resumed: workers may call the LLM again" if lifted else "nothing to do: not paused")
