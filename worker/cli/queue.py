"""Queue subcommands: enqueue, backfill, work, cancel (parse and print only; the work is in library functions)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from pydantic import ValidationError
from redis import Redis

from worker import backfill as backfill_lib
from worker.apply import remember
from worker.classifier import NO_FRONT_MATTER
from worker.cli.app import App, Fail, Misconfigured, err, pass_app, progress
from worker.errors import TaggerError
from worker.paths import content_root
from worker.providers import OFFLINE_NOTE
from worker.queue.cancel import cancel as cancel_jobs
from worker.queue.connection import PRIORITIES
from worker.queue.enqueue import Enqueued, enqueue_posts
from worker.queue.fleet import run_processes, unheard
from worker.queue.startup import EXIT_CONFIG, check_start
from worker.records_move import published_records_warning
from worker.settings import Settings

ID_WIDTH = 29  # "post-" and 24 hex digits (remote jobs add the content hash)


@click.command()
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option(
    "--priority", type=click.Choice(PRIORITIES), default="default", show_default=True, help="Queue to put them on."
)
@click.option("--stdin", "from_stdin", is_flag=True, help="Also read paths from stdin, one per line.")
@click.option(
    "--changed-since",
    metavar="GIT_REV",
    help="Also the posts under the content root that git says changed since GIT_REV (deleted ones are reported).",
)
@click.option(
    "--remote",
    is_flag=True,
    help="Self-contained jobs for workers on other machines (also TAGGER_JOB_MODE=remote); then `tagger apply`.",
)
@pass_app
def enqueue(
    app: App, paths: tuple[str, ...], priority: str, from_stdin: bool, changed_since: str | None, remote: bool
) -> None:
    """Enqueue posts for the workers.

    Prints `job-id action path` for each post (action: enqueued, already-queued, rerun-after-current).
    PATH is a post inside the content root, relative to the current folder. A path outside the root, a
    symlink out of it, a file that is not a post or that does not exist is refused (REFUSED path: reason,
    exit 1); the others are still enqueued.
    """
    if not paths and not from_stdin and not changed_since:
        raise click.UsageError("name the posts to enqueue, or use --stdin or --changed-since")
    settings = app.configured()
    root = content_root(settings)
    names = list(paths)
    if from_stdin:
        names += [line.strip() for line in sys.stdin if line.strip()]
    deleted: list[str] = []
    if changed_since:
        changes = backfill_lib.changed_since(settings, changed_since)
        names += changes.changed
        deleted = changes.deleted
    remote = remote or settings.job_mode == "remote"
    redis = app.redis()
    results = enqueue_posts(names, settings, redis, priority, remote=remote) if names else []
    if remote:
        remember(settings, [r for r in results if r.action != "refused"])  # for `tagger apply --wait`
    refused = False
    for item in results:
        if item.action == "refused":
            err(f"REFUSED {item.path}: {item.reason}")
            refused = True
        else:
            click.echo(f"{item.job_id:<{ID_WIDTH}}  {item.action:<20} {item.path}")
    for path in deleted:
        click.echo(f"{'-':<{ID_WIDTH}}  {'skipped (deleted)':<20} {Path(path).relative_to(root).as_posix()}")
    warn_if_unheard(settings, redis, priority, results)
    if refused:
        raise click.exceptions.Exit(1)


@click.command()
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--wait", is_flag=True, help="Follow the jobs with a progress bar until they are done.")
@click.option("--inline", is_flag=True, help="Classify in this process: no Redis, no workers.")
@click.option("--estimate", is_flag=True, help="Print posts, calls, tokens and cost; call nothing.")
@click.option("--batch", is_flag=True, help="Through the provider's Batch API: half the price, done within 24 h.")
@click.option("--all", "include_fresh", is_flag=True, help="Include posts whose result record is fresh.")
@click.option("--limit", type=click.IntRange(min=0), metavar="N", help="At most N posts.")
@click.option("--type", "types", multiple=True, metavar="TYPE", help="Only this classification type (repeatable).")
@click.option(
    "--priority", type=click.Choice(PRIORITIES), default="low", show_default=True, help="Queue to put the jobs on."
)
@pass_app
def backfill(
    app: App,
    folder: Path,
    wait: bool,
    inline: bool,
    estimate: bool,
    batch: bool,
    include_fresh: bool,
    limit: int | None,
    types: tuple[str, ...],
    priority: str,
) -> None:
    """Classify a whole folder: every post whose record is missing or stale.

    DIR is a folder inside the content root (the root itself or a subfolder). Files that cannot be planned are
    reported as SKIPPED path: reason and the rest go on; exit 1 when anything was skipped or failed.
    """
    settings = app.configured()
    redis = None if inline or estimate else app.redis()  # before planning: a big site plans for a while
    plan = backfill_lib.plan(settings, include_fresh=include_fresh, limit=limit, types=types or None, folder=folder)
    click.echo(f"backfill: content root {settings.content_root_label()}")
    published = published_records_warning(settings)
    if published:
        err(published)  # once per run: a site publishing its records is a setting to fix, not a per-post problem
    unmarked = len(plan.no_front_matter)
    click.echo(
        f"backfill {folder}: {len(plan.todo)} to classify, {plan.fresh} fresh (up to date), "
        f"{len(plan.skipped) + unmarked} skipped" + (f" ({unmarked} without front matter)" if unmarked else "")
    )
    for path in plan.no_front_matter:  # by TAGGER_NO_FRONT_MATTER=skip: reported, not a failure
        err(f"SKIPPED {path}: {NO_FRONT_MATTER}")
    for line in plan.skipped:
        err(f"SKIPPED {line}")
    skipped = bool(plan.skipped)
    if estimate:
        est = backfill_lib.estimate(settings, plan.todo, types or None, batch=batch)
        price = (
            f"${est.cost:.4f}" if est.cost is not None else f"unknown (no price for {settings.model} in TAGGER_PRICES)"
        )
        click.echo(
            f"estimate for {settings.model}: {est.posts} posts, {est.calls} calls, "
            f"{est.input_tokens} input tokens ({est.cached_tokens} cacheable, "
            f"{est.input_tokens - est.cached_tokens} uncached), {est.output_tokens} output tokens, cost {price}"
            + (" at batch prices" if batch else "")
        )
        one_per_term = settings.model_copy(update={"chunk_size": 1, "reply": "all"})
        baseline = backfill_lib.estimate(one_per_term, plan.todo, types or None)
        if est.cost and baseline.cost and est.posts:
            click.echo(
                f"per post: ${est.cost / est.posts:.5f} (definitions {settings.definitions}, reply {settings.reply}, "
                f"chunks of {settings.chunk_size}); one call per term: ${baseline.cost / est.posts:.5f} "
                f"({baseline.cost / est.cost:.1f}x)"
            )
        if est.posts:
            for r in backfill_lib.estimate_ratios(settings, plan.todo, types or None):
                click.echo(
                    f"  reply {r.reply:<8} {'batch' if r.batch else 'sync':<5} ${r.cost / est.posts:.5f} a post, "
                    f"{r.ratio:.1f}x cheaper than one call per term synchronously"
                )
        return
    if batch:
        from worker.cli.batch_commands import submit

        if not submit(settings, plan.todo, types or None, redis, wait, progress) or skipped:
            raise click.exceptions.Exit(1)
        return
    if inline:
        if settings.provider == "offline":
            err(OFFLINE_NOTE)
        summary = backfill_lib.run_inline(settings, plan.todo, progress=progress, types=types or None)
        skipped_count = len(plan.skipped) + unmarked + len(summary.skipped)
        click.echo(
            f"\nbackfill: {summary.done} done, {summary.written} written, {len(summary.failed)} failed, "
            f"{skipped_count} skipped, {summary.calls} provider calls, {summary.tokens} tokens"
        )
        for line in summary.retired:
            click.echo(f"  removed, no longer in the taxonomy: {line}")
        for line in summary.skipped:
            err(f"SKIPPED {line}")
        for line in summary.failed:
            err(f"FAILED {line}")
        if summary.failed or summary.skipped or skipped:
            raise click.exceptions.Exit(1)
        return
    assert redis is not None
    results = enqueue_posts(plan.todo, settings, redis, priority, types=types or None)
    for item in results:
        if item.action == "refused":  # changed between planning and enqueuing (deleted, swapped for a symlink)
            err(f"SKIPPED {item.path}: {item.reason}")
            skipped = True
    queued = [r for r in results if r.action != "refused"]
    if settings.job_mode == "remote":
        remember(settings, queued)  # for `tagger apply --wait`
    enqueued = [r for r in queued if r.action == "enqueued"]
    click.echo(f"backfill: enqueued {len(enqueued)}, already waiting {len(queued) - len(enqueued)}")
    warn_if_unheard(settings, redis, priority, queued)
    if wait and queued:
        try:
            summary = backfill_lib.follow(
                settings,
                redis,
                [r.job_id for r in queued],
                progress=progress,
                posts={r.job_id: r.path for r in queued},
                notice=lambda text: err(f"\nbackfill: {text}"),
                priority=priority,
            )
        except KeyboardInterrupt:
            click.echo("\nbackfill: stopped waiting; the workers carry on")
            raise click.exceptions.Exit(130) from None
        click.echo(f"\nbackfill: {summary.done} done, {len(summary.failed)} failed, {summary.tokens} tokens")
        for line in summary.failed:
            err(f"FAILED {line}")
        skipped = skipped or bool(summary.failed)
    if skipped:
        raise click.exceptions.Exit(1)


def warn_if_unheard(settings: Settings, redis: Redis, priority: str, results: list[Enqueued]) -> None:
    """One line on stderr when jobs wait on a queue no live worker listens to (they would wait silently)."""
    name = unheard(settings, redis, priority) if any(r.action != "refused" for r in results) else None
    if name is not None:
        err(f"tagger: warning: no live worker listens to {name}: the jobs wait until one does ('tagger work')")


@click.command()
@click.argument("targets", nargs=-1, metavar="[JOB|POST]...")
@click.option("--all", "everything", is_flag=True, help="Cancel every queued job (of the --queue given).")
@click.option(
    "--queue",
    "priorities",
    multiple=True,
    type=click.Choice(PRIORITIES),
    help="Only jobs on this queue (repeatable; default all).",
)
@pass_app
def cancel(app: App, targets: tuple[str, ...], everything: bool, priorities: tuple[str, ...]) -> None:
    """Take queued jobs off the queues: each JOB|POST named (a job id or a post's path), or all with --all.

    A job waiting on a queue or for a delayed retry is cancelled (enqueue its post again to run it); a running
    job finishes, and a rerun asked for while it runs is dropped. Prints `job-id action post` for each job;
    exit 1 when a JOB or POST named has no queued or running job.
    """
    if bool(targets) == everything:
        raise click.UsageError("name the jobs or posts to cancel, or use --all [--queue Q]")
    settings = app.configured()
    results = cancel_jobs(settings, app.redis(), list(targets), everything, priorities or None)
    missing = False
    for item in results:
        if not item.job_id:
            err(f"NOT FOUND {item.target}: {item.detail}")
            missing = True
            continue
        action = {"running": "running (finishes)"}.get(item.action, item.action)
        detail = f"  ({item.detail})" if item.detail else ""
        click.echo(f"{item.job_id:<{ID_WIDTH}}  {action:<20} {item.post}{detail}")
    count = sum(1 for r in results if r.action == "cancelled")
    click.echo(f"cancelled {count}" if count else "nothing cancelled")
    if missing:
        raise click.exceptions.Exit(1)


@click.command()
@click.option("--burst", is_flag=True, help="Stop when the queues are empty.")
@click.option(
    "--processes", type=click.IntRange(min=1), default=1, show_default=True, metavar="N", help="Worker processes."
)
@click.option(
    "--queue",
    "--queues",
    "priorities",
    multiple=True,
    type=click.Choice(PRIORITIES),
    help="Work only this queue (repeatable; default all, highest priority first).",
)
@pass_app
def work(app: App, burst: bool, processes: int, priorities: tuple[str, ...]) -> None:
    """Run workers.

    RQ workers with tagger's settings: JSON serializer, the scheduler for delayed retries, recovery of jobs
    whose worker died, Redis trouble waited out. The processes are supervised (one that dies is restarted);
    SIGTERM/SIGINT lets each current job finish within TAGGER_SHUTDOWN_GRACE, a second one stops at once.

    Exit codes: 78 (EX_CONFIG) when it cannot start until its settings or files are fixed (one line says what;
    never restarted, and deploy/tagger-worker.service tells systemd not to either); 1 on any other error, Redis
    not answering included (it may answer later: restarting is right then).
    """
    # Checked once here: what is wrong is one line and EXIT_CONFIG, not a traceback from every child, restarted.
    # Redis not answering is exit 1: it may answer later, so a service manager's restart is right then.
    try:
        settings = app.configured(quiet=False)
        serving = check_start(settings, app.redis(), priorities or None)
    except ValidationError as exc:
        raise Misconfigured(exc) from exc
    except TaggerError as exc:
        if exc.transient:
            raise
        raise Misconfigured(exc) from exc
    click.echo(serving.line(processes, burst))
    code = run_processes(settings, processes, priorities or None, burst)
    if code == EXIT_CONFIG:
        raise click.exceptions.Exit(EXIT_CONFIG)  # the worker said why in one line; it is not restarted
    if code:
        raise Fail(f"a worker process exited with code {code}")
