"""`tagger verify`: every post against its record; one line per post that drifted, a summary per kind."""

from __future__ import annotations

import json
from pathlib import Path

import click
from redis import RedisError

from worker import verify as verify_lib
from worker.cli.app import App, err, pass_app
from worker.logs import redact_url
from worker.providers import OFFLINE_NOTE

# Exit codes: nothing drifted (or --inline healed it all); posts drifted (listed, and enqueued with --fix); --fix
# could not enqueue, Redis does not answer (posts still checked and listed). 2 is click's, for a usage error.
CLEAN, DRIFTED, NOT_ENQUEUED = 0, 1, 3


@click.command("verify")
@click.argument("folder", metavar="[DIR]", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print every drifted post and the counts as JSON.")
@click.option("--fix", is_flag=True, help="Enqueue the drifted posts (high priority) for the workers to heal.")
@click.option("--inline", is_flag=True, help="Heal the drifted posts in this process (no Redis), then verify again.")
@click.option("--type", "types", multiple=True, metavar="TYPE", help="Only this classification type (repeatable).")
@pass_app
def verify(app: App, folder: Path | None, as_json: bool, fix: bool, inline: bool, types: tuple[str, ...]) -> None:
    """Check every post under DIR (default: the content root) against its result record, with no LLM call.

    A post drifted when its record is missing (record_missing), a write tagger announced did not land
    (not_written) or is not settled (unsettled), terms tagger assigned are absent from the post and were not
    removed by people (terms_missing), the post is not the file tagger last wrote or read (file_changed), it was
    judged with an older taxonomy, prompt or model or has changed since (stale), or a failed job is pending for
    it (failed_job, when Redis answers); a post that cannot be read is listed as unreadable. Prints
    `kind post: detail` per drifted post and a count per kind. --fix enqueues them; --inline classifies them
    here and exits by a second verification. Exit 0 when none drifted (with --inline: none left), 1 when posts
    drifted (--fix enqueued them), 3 when --fix could not enqueue because Redis does not answer (the posts are
    still checked and listed).
    """
    settings = app.configured()
    redis = None
    if not inline:
        try:
            redis = app.redis()
        except RedisError as exc:
            down = f"Redis at {redact_url(settings.redis_url)} does not answer ({exc})"
            err(f"tagger: failed jobs not checked: {down}")
    report = verify_lib.verify(settings, folder, types or None, redis)
    _show(report, as_json)
    if fix and not inline and redis is None:
        err("verify --fix: nothing enqueued, Redis does not answer (`verify --inline` heals in this process)")
        raise click.exceptions.Exit(NOT_ENQUEUED)
    if not report.drifted:
        return
    if fix and not inline:
        assert redis is not None
        try:
            enqueued = verify_lib.fix_queued(settings, report, redis, types or None)
        except RedisError as exc:
            err(f"verify --fix: Redis stopped answering while enqueuing ({exc}); run `verify --fix` again")
            raise click.exceptions.Exit(NOT_ENQUEUED) from exc
        actions: dict[str, int] = {}
        for item in enqueued:
            actions[item.action] = actions.get(item.action, 0) + 1
            if item.action == "refused":
                err(f"SKIPPED {item.path}: {item.reason}")
        if not as_json:
            click.echo(
                "fix: " + ", ".join(f"{n} {action}" for action, n in actions.items()) + " (tagger work heals them)"
            )
    elif inline:
        if settings.provider == "offline":
            err(OFFLINE_NOTE)
        summary = verify_lib.fix_inline(settings, report, types or None)
        for line in summary.skipped:
            err(f"SKIPPED {line}")
        for line in summary.failed:
            err(f"FAILED {line}")
        again = verify_lib.verify(settings, folder, types or None)
        if not as_json:
            click.echo(
                f"fix: {summary.done} classified, {summary.written} written, {len(summary.failed)} failed; "
                f"verify again: {len(again.drifted)} drifted"
            )
        if not again.drifted:
            return
    raise click.exceptions.Exit(DRIFTED)


def _show(report: verify_lib.Verification, as_json: bool) -> None:
    if as_json:
        data = {
            "checked": report.checked,
            "passed_over": report.passed_over,
            "failed_jobs_checked": report.failed_jobs_checked,
            "by_kind": report.by_kind(),
            "drifted": [{"post": d.post, "kind": d.kind, "detail": d.detail} for d in report.drifted],
        }
        click.echo(json.dumps(data, indent=1, ensure_ascii=False))
        return
    for drift in report.drifted:
        click.echo(f"{drift.kind:<14} {drift.post}: {drift.detail}")
    kinds = ", ".join(f"{kind} {n}" for kind, n in report.by_kind().items())
    passed = f" ({report.passed_over} without front matter or content, not verified)" if report.passed_over else ""
    click.echo(
        f"verify: {report.checked} posts checked{passed}, {len(report.drifted)} drifted"
        + (f": {kinds}" if kinds else "")
    )
