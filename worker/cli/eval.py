"""`tagger eval`: judge posts without writing them and compare tagger's picks with gold labels (parse and print)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import click

from worker.backfill import check_types, post_files
from worker.classifier import make_classifier
from worker.cli.app import App, err, pass_app
from worker.evaluation import Evaluation, evaluate, load_gold, read_settings_file
from worker.paths import content_root
from worker.providers import OFFLINE_NOTE
from worker.report import render
from worker.settings import Settings

DEFAULT_CACHE = Path(".tagger-eval")


def cache_key(settings: Settings) -> str:
    """A folder name per judging configuration, so compared settings never reuse each other's judgements.

    Like the record's cache key, it names the model, not the endpoint (nor the templates: judgements carry their
    prompt version), so the same model behind another URL shares the cache.
    """
    parts = [
        settings.provider,
        settings.model,
        settings.chunk_size,
        settings.definitions,
        settings.reply,
        settings.max_post_tokens,
        settings.shortlist_min,
        settings.structured_mode,
        settings.pack_types,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _posts(
    settings: Settings, folder: Path | None, gold: dict[Path, dict[str, list[str]]] | None, limit: int | None
) -> list[Path]:
    if gold is not None:
        paths = sorted(gold)
    else:
        paths, skipped = post_files(settings, folder)
        for line in skipped:
            err(f"SKIPPED {line}")
    return paths[:limit] if limit is not None else paths


def format_evaluation(e: Evaluation) -> list[str]:
    """The text summary of one evaluation."""
    lines = [
        f"eval [{e.label}]: {e.posts} posts ({len(e.failed)} failed), provider {e.provider}, model {e.model}, "
        f"chunk size {e.chunk_size}, definitions {e.definitions}, reply {e.reply}",
        f"  {'type':<14}{'posts':>6}{'left out':>9}  {'rule':<12}{'micro P':>8}{'micro R':>8}{'micro F1':>9}"
        f"{'macro P':>8}{'macro R':>8}{'macro F1':>9}  best rule (F1)",
    ]
    for t in e.types:
        rule = f"top {t.rule.top} >= {t.rule.min_confidence:g}"
        best = f"top {t.best.top} >= {t.best.min_confidence:g} ({t.best.f1:.3f})" if t.best else "-"
        lines.append(
            f"  {t.type:<14}{t.posts:>6}{t.left_out:>9}  {rule:<12}{t.micro.precision:>8.3f}{t.micro.recall:>8.3f}"
            f"{t.micro.f1:>9.3f}{t.macro.precision:>8.3f}{t.macro.recall:>8.3f}{t.macro.f1:>9.3f}  {best}"
        )
    for t in e.types:
        if t.missed:
            lines.append(f"  most missed {t.type}: " + ", ".join(f"{m.term} ({m.posts})" for m in t.missed[:5]))
        if t.added:
            lines.append(f"  most added {t.type}: " + ", ".join(f"{a.term} ({a.posts})" for a in t.added[:5]))
        if t.outside_taxonomy:
            lines.append(f"  {t.type}: {t.outside_taxonomy} gold labels name no term of the taxonomy (not counted)")
    u, j, n = e.cost.usage, e.cost.judging, max(1, e.cost.posts)
    unpriced = "n/a (no price in TAGGER_PRICES)"
    money = unpriced if e.cost.dollars is None else f"${e.cost.dollars:.4f}"
    per_post = unpriced if e.cost.dollars_per_post is None else f"${e.cost.dollars_per_post:.5f}"
    lines.append(
        f"  this run: {u.calls} calls, {u.input_tokens} input tokens ({u.cached_tokens} cached), {u.output_tokens} "
        f"output tokens, {money}; {e.cost.cached_terms} of {e.cost.judged_terms} judgements from the cache"
    )
    lines.append(
        f"  judging a post costs: {j.calls / n:.1f} calls, {j.input_tokens / n:.0f} input tokens "
        f"({j.cached_tokens / n:.0f} cached), {j.output_tokens / n:.0f} output tokens, {per_post}"
    )
    if e.records_unsaved:
        lines.append(f"  {e.records_unsaved} records could not be saved (read-only site?): the next eval asks again")
    lines.append(f"  suggested: {e.suggested_selection_env()}")
    return lines


def format_comparison(evaluations: Sequence[Evaluation]) -> list[str]:
    """One row per settings file: F1 per type, calls, tokens and dollars per post."""
    types = list(dict.fromkeys(t.type for e in evaluations for t in e.types))
    width = max(len(e.label) for e in evaluations) + 2
    head = "".join(f"{'F1 ' + t:>16}" for t in types)
    lines = [f"{'settings':<{width}}{head}{'calls/post':>11}{'in/post':>10}{'out/post':>10}{'$/post':>11}"]
    for e in evaluations:
        f1 = {t.type: t.micro.f1 for t in e.types}
        n = max(1, e.cost.posts)
        u = e.cost.judging
        cells = "".join(f"{f1[t]:>16.3f}" if t in f1 else f"{'-':>16}" for t in types)
        per_post = "n/a" if e.cost.dollars_per_post is None else f"{e.cost.dollars_per_post:.5f}"
        lines.append(
            f"{e.label:<{width}}{cells}{u.calls / n:>11.1f}{u.input_tokens / n:>10.0f}"
            f"{u.output_tokens / n:>10.0f}{per_post:>11}"
        )
    return lines


@click.command("eval")
@click.argument("args", nargs=-1, metavar="[DIR] [A.env B.env...]")
@click.option("--gold", type=click.Path(path_type=Path), metavar="FILE", help="JSON Lines gold labels instead.")
@click.option(
    "--type", "--types", "types", multiple=True, metavar="TYPE", help="Only this classification type (repeatable)."
)
@click.option("--limit", type=click.IntRange(min=0), metavar="N", help="At most N posts (the first, by path).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option(
    "--report", type=click.Path(path_type=Path), metavar="FILE.html", help="Write a self-contained HTML report."
)
@click.option("--compare", is_flag=True, help="Evaluate under each settings file given after DIR, side by side.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_CACHE,
    show_default=True,
    help="Judgement cache of --compare, one folder per configuration.",
)
@click.option(
    "--provider", type=click.Choice(["openai", "offline"]), help="Use this provider instead of TAGGER_PROVIDER."
)
@click.option(
    "--taxonomy", type=click.Path(path_type=Path), metavar="DIR", help="Term files folder (TAGGER_TAXONOMY_DIR)."
)
@pass_app
def eval_command(
    app: App,
    args: tuple[str, ...],
    gold: Path | None,
    types: tuple[str, ...],
    limit: int | None,
    as_json: bool,
    report: Path | None,
    compare: bool,
    cache_dir: Path,
    provider: str | None,
    taxonomy: Path | None,
) -> None:
    """Measure tagger's picks against the posts' own labels; no post is written.

    Arguments: [DIR] [A.env B.env...], the settings files only with --compare.

    DIR is a folder inside the content root (default: the root). Gold labels are the terms in each post's front
    matter that tagger did not assign itself, or --gold FILE: JSON Lines, {"post": "<path relative to the content
    root>", "<type>": ["term", ...]}. Judgements are cached in the records, so a second eval makes no call.
    With --compare, the files after DIR are settings files (like .env) evaluated side by side. Exit 1 when a
    post failed.
    """
    folders = [Path(a) for a in args if Path(a).is_dir()]
    files = [Path(a) for a in args if not Path(a).is_dir()]
    if len(folders) > 1:
        raise click.UsageError(f"one folder at most, got {', '.join(map(str, folders))}")
    if files and not compare:
        raise click.UsageError(f"not a folder: {files[0]} (settings files go with --compare)")
    if compare and not files:
        raise click.UsageError("--compare needs settings files, e.g. tagger eval content --compare a.env b.env")
    updates: dict[str, object] = {}
    if provider:
        updates["provider_choice"] = provider
    if taxonomy:
        updates["taxonomy_dir"] = taxonomy
    base = app.configured(updates=updates)
    root = content_root(base)
    runs: list[tuple[str, Settings, Path | None]] = [("settings", base, None)]
    if compare:
        configured = [(str(f), read_settings_file(f, base).model_copy(update=updates)) for f in files]
        runs = [(label, s, cache_dir / cache_key(s)) for label, s in configured]
    labels = load_gold(gold, root) if gold else None
    results = []
    for label, settings, cache in runs:
        if settings.provider == "offline" and not as_json:
            err(f"[{label}] {OFFLINE_NOTE}")
        classifier = make_classifier(settings)
        check_types(classifier, types)
        paths = _posts(settings, folders[0] if folders else None, labels, limit)
        results.append(
            evaluate(
                settings, paths, gold=labels, types=types or None, cache_dir=cache, label=label, classifier=classifier
            )
        )
    if report:
        report.write_text(render(results), encoding="utf-8")
    if as_json:
        payload = [
            {
                **r.model_dump(mode="json"),
                "suggested_selection": {k: v.model_dump(exclude_none=True) for k, v in r.suggested_selection().items()},
            }
            for r in results
        ]
        click.echo(json.dumps(payload if compare else payload[0], indent=1, ensure_ascii=False))
    else:
        lines: list[str] = []
        for r in results:
            lines += format_evaluation(r)
        if len(results) > 1:
            lines += ["", *format_comparison(results)]
        if report:
            lines.append(f"report: {report}")
        click.echo("\n".join(lines))
    for r in results:
        for line in r.failed:
            err(f"FAILED [{r.label}] {line}")
    if any(r.failed for r in results):
        raise click.exceptions.Exit(1)
