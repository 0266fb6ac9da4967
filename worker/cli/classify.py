"""`tagger classify`: classify posts now, in this process, and print what was decided."""

from __future__ import annotations

import json
from pathlib import Path

import click
import structlog

from worker.backfill import check_types
from worker.classifier import NO_FRONT_MATTER, make_classifier
from worker.cli.app import App, cut, err, pass_app
from worker.errors import NotAPost, OutsideContentRoot, PostReadOnly, TaggerError, kind_of
from worker.logs import redact, secrets_of
from worker.paths import content_root, existing_post
from worker.providers import OFFLINE_NOTE
from worker.results import Classification

SHOWN_TERMS = 12


def table(result: Classification) -> list[str]:
    """One block per type: the final terms, then the judged terms with column headers."""
    out: list[str] = []
    for decision in result.decisions:
        judged = sorted((j for j in result.judgements if j.type == decision.type), key=lambda j: -j.confidence)
        shown = [j for j in judged if j.level != "Ignored" or j.term in decision.final]
        out.append(f"  {decision.type}: {', '.join(decision.final) or '(none)'}")
        if shown:
            out.append(f"     {'term':<34} {'confidence':>10}  {'level':<9}  reason")
        for j in shown[:SHOWN_TERMS]:
            mark = "*" if j.term in decision.selected else " "
            out.append(f"   {mark} {cut(j.term, 34):<34} {j.confidence:>10.1f}  {j.level:<9}  {cut(j.reason, 70)}")
        # A Human post is never written: its changes are suggestions, and they are labelled as such.
        labels = (
            (("would add", decision.added), ("would remove", decision.removed))
            if result.human_only
            else (("added", decision.added), ("removed", decision.removed))
        )
        people = (("kept (human)", decision.kept_human), ("removed by people", decision.removed_by_people))
        for label, terms in (*labels, *people):
            if terms:
                out.append(f"     {label}: {', '.join(terms)}")
    return out


def state_of(result: Classification, dry_run: bool) -> str:
    """What happened to the post file, in words."""
    if result.human_only:
        return "not written: ClassificationContentOrigin is Human (suggestions in the record)"
    if dry_run:
        return "dry run" if result.diff else "dry run: no change"
    return "written" if result.written else "no change"


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the front-matter diff; write no post (judgements are kept in the record: the real run reuses them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full results as JSON.")
@click.option(
    "--provider", type=click.Choice(["openai", "offline"]), help="Use this provider instead of TAGGER_PROVIDER."
)
@click.option(
    "--taxonomy", type=click.Path(path_type=Path), metavar="DIR", help="Term files folder (TAGGER_TAXONOMY_DIR)."
)
@click.option("--type", "types", multiple=True, metavar="TYPE", help="Only this classification type (repeatable).")
@click.option("-v", "--verbose", is_flag=True, help="Log every LLM call on stderr.")
@pass_app
def classify(
    app: App,
    paths: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
    provider: str | None,
    taxonomy: Path | None,
    types: tuple[str, ...],
    verbose: bool,
) -> None:
    """Classify posts now and write their terms back.

    PATH is a post inside the content root, relative to the current folder. Paths outside the content root,
    symlinks out of it and files that are not posts are refused (REFUSED path: reason) and left untouched;
    a read-only post is left as it is (SKIPPED path: post_read_only: ...); a post that fails prints
    FAILED path: kind: message. Exit 1 when any was refused, skipped or failed.
    """
    updates: dict[str, object] = {}
    if provider:
        updates["provider_choice"] = provider
    if taxonomy:
        updates["taxonomy_dir"] = taxonomy
    settings = app.configured(quiet=not verbose, updates=updates)
    if settings.provider == "offline" and not as_json:
        err(OFFLINE_NOTE)
    classifier = make_classifier(settings)
    check_types(classifier, types)
    root = content_root(settings)
    problems: list[str] = []
    results = []
    for name in paths:
        try:
            relative = existing_post(name, settings)
        except (OutsideContentRoot, NotAPost) as exc:
            problems.append(f"REFUSED {exc}")
            continue
        except TaggerError as exc:
            problems.append(f"FAILED {name}: {exc.kind}: {exc.message}")
            continue
        try:
            with structlog.contextvars.bound_contextvars(post=relative):
                result = classifier.classify(root / relative, dry_run=dry_run, types=types or None)
        except PostReadOnly as exc:
            problems.append(f"SKIPPED {name}: {exc.kind}: {exc.message}")
            continue
        except Exception as exc:  # one post's failure (a read-only folder too) never stops the others
            message = exc.message if isinstance(exc, TaggerError) else f"{type(exc).__name__}: {exc}"
            problems.append(f"FAILED {name}: {kind_of(exc)}: {redact(message, secrets_of(settings))}")
            continue
        results.append(result)
        if result.skipped == NO_FRONT_MATTER:  # by TAGGER_NO_FRONT_MATTER=skip: reported, not a failure
            err(f"SKIPPED {name}: {NO_FRONT_MATTER}")
            continue
        if as_json:
            continue
        usage = result.usage
        lines = [
            f"{name}  [{state_of(result, dry_run)}; {usage.calls} calls, {usage.input_tokens} in / "
            f"{usage.output_tokens} out tokens, {result.cached_terms} cached]",
            *table(result),
        ]
        if dry_run and result.diff:
            lines.append(result.diff.rstrip("\n"))
        click.echo("\n".join(lines))
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in results], indent=1, ensure_ascii=False))
    for line in problems:
        err(line)
    if problems:
        raise click.exceptions.Exit(1)
