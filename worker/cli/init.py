"""`tagger init [DIR]`: set a site up for tagger (the work is `worker.site_init.init_site`)."""

from __future__ import annotations

from pathlib import Path

import click

from worker.site_init import init_site


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
    for path in result.written:
        click.echo(f"  wrote {path.relative_to(result.site)}{'/' if path.is_dir() else ''}")
    for path in result.kept:
        click.echo(f"  kept  {path.relative_to(result.site)}{'/' if path.is_dir() else ''} (exists; not overwritten)")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo("next:")
    for command in result.next_commands:
        click.echo(f"  {command}")
