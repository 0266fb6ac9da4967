"""`tagger init [DIR]`: set a site up for tagger (the work is `worker.site_init.init_site`)."""

from __future__ import annotations

from pathlib import Path

import click

from worker.site_init import TAXONOMY_FOLDER, init_site

SHOWN_TERM_FILES = 10  # more are counted, not listed


@click.command("init")
@click.argument("folder", required=False, default=".", type=click.Path(path_type=Path), metavar="[DIR]")
def init_command(folder: Path) -> None:
    """Set up the site in DIR (default: here) for tagger; never overwrites a file.

    Detects the generator (Hugo, Jekyll), the content folder and the term keys the posts use; writes a commented
    .env, a records folder outside what the generator publishes (.tagger/) and categories/ with one term file per
    term the posts already use (or one example), then prints the next three commands.
    """
    result = init_site(folder)
    generator = result.generator
    found = f"{generator.name} site" + (f" ({generator.config.name})" if generator.config else "")
    click.echo(f"{found} at {result.site}: content in {generator.content_dir}/, {result.posts} posts")
    keys = result.term_keys()
    click.echo("term keys in use: " + (", ".join(f"{k} ({n} terms)" for k, n in keys.items()) if keys else "none"))
    for verb, paths, why in (("wrote", result.written, ""), ("kept ", result.kept, " (exists; not overwritten)")):
        terms = [p for p in paths if p.suffix == ".md"]
        for path in [p for p in paths if p not in terms] + (terms if len(terms) <= SHOWN_TERM_FILES else []):
            click.echo(f"  {verb} {path.relative_to(result.site)}{'/' if path.is_dir() else ''}{why}")
        if len(terms) > SHOWN_TERM_FILES:
            click.echo(f"  {verb} {len(terms)} term files under {TAXONOMY_FOLDER}/{why}")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo("next:")
    for command in result.next_commands:
        click.echo(f"  {command}")
