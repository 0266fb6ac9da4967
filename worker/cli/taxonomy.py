"""`tagger taxonomy check` (every problem in the term files) and `publish` (the taxonomy into Redis)."""

from __future__ import annotations

from pathlib import Path

import click

from worker.backfill import post_files
from worker.cli.app import App, err, pass_app
from worker.taxonomy import load_taxonomy, taxonomy_for, type_key_problems


@click.group()
def taxonomy() -> None:
    """Taxonomy tools."""


@taxonomy.command()
@click.argument("folder", required=False, type=click.Path(path_type=Path), metavar="[DIR]")
@pass_app
def check(app: App, folder: Path | None) -> None:
    """Print every problem in the term files as `file: problem`; exit 1 when any.

    DIR is the term files folder (default: TAGGER_TAXONOMY_DIR).
    """
    settings = app.settings()
    loaded = load_taxonomy(folder or settings.taxonomy_dir, known_types=settings.selection)
    if settings.content_root().is_dir():  # a type's key must not be one the site's posts use for anything but terms
        loaded.problems += type_key_problems(loaded, post_files(settings)[0])
    for problem in loaded.problems:
        click.echo(problem)
    counts = ", ".join(f"{t}: {len(loaded.of_type(t))}" for t in loaded.types())
    err(f"{len(loaded)} terms ({counts}); {len(loaded.problems)} problems")
    if loaded.problems:
        raise click.exceptions.Exit(1)


@taxonomy.command()
@pass_app
def publish(app: App) -> None:
    """Publish the taxonomy and prompt templates in Redis for remote workers; prints the version.

    Content-addressed: the same terms and templates give the same version (`enqueue --remote` publishes too). A
    copy in Redis whose content does not match its version (altered there) is overwritten, and this says so.
    """
    from worker.prompts import load_templates
    from worker.queue.payload import publish as publish_taxonomy

    settings = app.configured()
    terms = taxonomy_for(settings)
    published = publish_taxonomy(settings, app.redis(), terms, load_templates(settings.prompts_dir))
    click.echo(published.version)
    if published.overwritten:
        err(f"overwrote what Redis held as {published.version}: {published.overwritten}")
    err(f"{len(terms)} terms published as {published.version}")
