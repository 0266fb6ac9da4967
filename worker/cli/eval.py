"""`tagger eval`: judge posts without writing them and compare tagger's picks with gold labels (parse and print)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from worker.backfill import post_files
from worker.errors import TaggerError
from worker.evaluation import Evaluation, evaluate, load_gold, read_settings_file
from worker.logs import configure
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
        settings.json_mode,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _posts(settings: Settings, gold: dict[Path, dict[str, list[str]]] | None, limit: int | None) -> list[Path]:
    paths = sorted(gold) if gold is not None else post_files(settings.content_root())
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


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate tagger's picks against gold labels, under one or several settings."""
    base = Settings()
    updates: dict[str, object] = {}
    if args.dir:
        updates["content_dir"] = Path(args.dir)
    if args.provider:
        updates["provider_choice"] = args.provider
    if args.taxonomy:
        updates["taxonomy_dir"] = Path(args.taxonomy)
    base = base.model_copy(update=updates)
    configure(base, quiet=True)
    runs: list[tuple[str, Settings, Path | None]] = []
    if args.compare:
        for name in args.compare:
            settings = read_settings_file(Path(name), base).model_copy(update=updates)
            runs.append((name, settings, Path(args.cache_dir) / cache_key(settings)))
    else:
        runs.append(("settings", base, None))
    if not base.content_root().is_dir():
        print(
            f"tagger: no content folder at {base.content_root()} (give DIR or set TAGGER_CONTENT_DIR)", file=sys.stderr
        )
        return 2
    gold = load_gold(Path(args.gold), base.content_root()) if args.gold else None
    results = []
    for label, settings, cache_dir in runs:
        if settings.provider == "offline" and not args.json:
            print(f"[{label}] {OFFLINE_NOTE}", file=sys.stderr)
        paths = _posts(settings, gold, args.limit)
        results.append(evaluate(settings, paths, gold=gold, types=args.types or None, cache_dir=cache_dir, label=label))
    if args.report:
        Path(args.report).write_text(render(results), encoding="utf-8")
    if args.json:
        payload = [
            {
                **r.model_dump(mode="json"),
                "suggested_selection": {k: v.model_dump(exclude_none=True) for k, v in r.suggested_selection().items()},
            }
            for r in results
        ]
        print(json.dumps(payload if args.compare else payload[0], indent=1, ensure_ascii=False))
    else:
        lines: list[str] = []
        for r in results:
            lines += format_evaluation(r)
        if len(results) > 1:
            lines += ["", *format_comparison(results)]
        if args.report:
            lines.append(f"report: {args.report}")
        print("\n".join(lines))
    for r in results:
        for line in r.failed:
            print(f"FAILED [{r.label}] {line}", file=sys.stderr)
    return 1 if any(r.failed for r in results) else 0


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `tagger eval`."""
    p = sub.add_parser("eval", help="measure tagger's picks against the posts' own labels (writes no post)")
    p.add_argument("dir", nargs="?", metavar="DIR", help="content root (default TAGGER_CONTENT_DIR)")
    p.add_argument("--gold", metavar="FILE", help='JSON Lines: {"post": "<relative path>", "<type>": [terms]}')
    p.add_argument("--types", nargs="+", metavar="TYPE")
    p.add_argument("--limit", type=int, metavar="N")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--report", metavar="FILE.html", help="write a self-contained HTML report")
    p.add_argument("--compare", nargs="+", metavar="ENV", help="settings files to evaluate side by side")
    p.add_argument(
        "--cache-dir", default=str(DEFAULT_CACHE), help="judgement cache for --compare (default .tagger-eval)"
    )
    p.add_argument("--provider", choices=["openai", "offline"])
    p.add_argument("--taxonomy", metavar="DIR")
    p.set_defaults(func=cmd_eval)


def main(argv: Sequence[str]) -> int:
    """Run `tagger eval` alone (for tests)."""
    parser = argparse.ArgumentParser(prog="tagger eval")
    sub = parser.add_subparsers(dest="command", required=True)
    add_command(sub)
    args = parser.parse_args(["eval", *argv])
    try:
        code: int = args.func(args)
    except TaggerError as exc:
        print(f"tagger: {exc.kind}: {exc}", file=sys.stderr)
        return 2
    return code
