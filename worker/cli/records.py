"""`tagger records move`: records between beside the posts and TAGGER_RECORDS_DIR (worker.records_move)."""

from __future__ import annotations

from pathlib import Path

import click

from worker.cli.app import App, err, pass_app
from worker.records_move import move_records


@click.group()
def records() -> None:
    """Result records (each post's judgements, the cache): where they live."""


@records.command()
@click.option(
    "--to",
    "to_dir",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="The records folder (default: TAGGER_RECORDS_DIR).",
)
@click.option("--beside", is_flag=True, help="Move the records out of the folder, back beside their posts.")
@pass_app
def move(app: App, to_dir: Path | None, beside: bool) -> None:
    """Move records into the records folder (or --beside, back beside the posts), their cache kept.

    Records beside the posts sit inside the content folder, which a generator publishes; in TAGGER_RECORDS_DIR
    (e.g. .tagger at the site root) they do not. The bytes move as they are, so nothing is judged again.
    """
    report = move_records(app.settings(), to_dir=to_dir, beside=beside)
    click.echo(f"moved {len(report.moved)} records from {report.source} to {report.target}")
    if report.replaced_stale:
        click.echo(f"removed {len(report.replaced_stale)} older copies (the copy tagger reads was kept)")
    setting = app.settings().records_dir
    if beside and setting is not None:
        err("now unset TAGGER_RECORDS_DIR (in .env), or the next run moves each record back into it")
    if not beside and to_dir is not None and (setting is None or setting.resolve() != to_dir.resolve()):
        err(f"now set TAGGER_RECORDS_DIR={to_dir} (in .env), or tagger keeps reading and writing records beside posts")
