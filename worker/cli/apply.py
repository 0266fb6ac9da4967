"""`tagger apply`: write remote jobs' results into the posts here (parse and print; the work is in worker.apply)."""

from __future__ import annotations

import click

from worker import apply as apply_lib
from worker.cli.app import App, err, pass_app, progress

# Exit codes: everything applied (and committed); something failed or is missing; some posts re-enqueued or still
# running; posts written but the commit failed (they stay noted: the next `apply --commit` commits them).
ALL_APPLIED, FAILED, NOT_YET, NOT_COMMITTED = 0, 1, 2, 3


@click.command("apply")
@click.argument("refs", nargs=-1, metavar="[JOB_OR_POST]...")
@click.option("--wait", is_flag=True, help="Wait for the jobs to end first, showing progress.")
@click.option(
    "--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True, metavar="S", help="Wait at most S s."
)
@click.option("--commit", is_flag=True, help="Make one git commit of exactly the posts and records changed.")
@pass_app
def apply_command(app: App, refs: tuple[str, ...], wait: bool, timeout: float, commit: bool) -> None:
    """Write finished remote jobs' results into the posts and records here.

    JOB_OR_POST is a job id or a post; none: the jobs the last `enqueue --remote` made (kept in
    TAGGER_STATE_FILE). A post is written only over the exact bytes its job judged (owned keys only, atomic);
    one edited since is enqueued again. Prints `job-id action post`. Applying twice changes nothing.
    Exit 0 when everything was applied, 1 when a job failed or is missing, 2 when posts were re-enqueued or
    jobs are still running (run apply again later), 3 when the commit failed (the next `apply --commit` commits
    what this one wrote, as it commits what a run killed before its commit wrote).
    """
    settings = app.configured()
    redis = app.redis()
    posts = apply_lib.remembered(settings) if not refs else {}
    ids = apply_lib.job_ids(settings, refs) if refs else list(posts)
    if not ids:
        err("apply: no jobs named and no remembered enqueue (run `tagger enqueue --remote` first)")
        raise click.exceptions.Exit(FAILED)
    if wait:
        apply_lib.wait_for(redis, ids, timeout, progress=progress)
        click.echo()  # the progress bar's line ends here, as backfill's does
    report = apply_lib.apply(settings, redis, ids, posts, commit=commit)
    if not refs and any(i.new_job for i in report.items):
        apply_lib.follow_up(settings, report)
    for item in report.items:
        detail = f"  ({item.detail})" if item.detail else ""
        line = f"{item.job_id}  {item.action:<16} {item.post}{detail}"
        (err if item.action in ("failed", "missing") else click.echo)(line)
    counts = {a: sum(1 for i in report.items if i.action == a) for a in dict.fromkeys(i.action for i in report.items)}
    click.echo("apply: " + ", ".join(f"{n} {a}" for a, n in counts.items()))
    for line in report.ignored:
        err(f"apply: state file entry ignored: {line}")
    if report.earlier:
        click.echo(f"apply: {len(report.earlier)} posts written by an earlier apply that did not commit them")
    if report.commit:
        click.echo(f"apply: committed {report.commit}")
    if report.commit_error:
        err(f"apply: {report.commit_error}; the writes are kept for the next `tagger apply --commit`")
        raise click.exceptions.Exit(NOT_COMMITTED)
    if any(i.action in ("failed", "missing") for i in report.items):
        raise click.exceptions.Exit(FAILED)
    if not report.all_applied:
        raise click.exceptions.Exit(NOT_YET)
