"""The `tagger` command: parses arguments and prints; the work happens in library functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from worker import __version__, backfill
from worker.classifier import make_classifier, type_key_problems
from worker.errors import TaggerError
from worker.judgements import Classification
from worker.logs import configure, redact, secrets_of
from worker.providers import OFFLINE_NOTE
from worker.settings import Settings
from worker.taxonomy import load_taxonomy


def _settings(args: argparse.Namespace) -> Settings:
    updates: dict[str, object] = {}
    if getattr(args, "provider", None):
        updates["provider_choice"] = args.provider
    if getattr(args, "taxonomy", None):
        updates["taxonomy_dir"] = Path(args.taxonomy)
    return Settings().model_copy(update=updates)


def _table(result: Classification, out: list[str]) -> None:
    for decision in result.decisions:
        judged = sorted((j for j in result.judgements if j.type == decision.type), key=lambda j: -j.confidence)
        shown = [j for j in judged if j.level != "Ignored" or j.term in decision.final]
        out.append(f"  {decision.type}: {', '.join(decision.final) or '(none)'}")
        for j in shown[:12]:
            mark = "*" if j.term in decision.selected else " "
            out.append(f"   {mark} {j.term:<34.34} {j.confidence:6.1f}  {j.level:<9} {j.reason[:70]}")
        for label, terms in (
            ("added", decision.added),
            ("removed", decision.removed),
            ("kept (human)", decision.kept_human),
            ("not re-added", decision.not_readded),
        ):
            if terms:
                out.append(f"     {label}: {', '.join(terms)}")


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify posts given on the command line."""
    settings = _settings(args)
    configure(settings, quiet=not args.verbose)
    if settings.provider == "offline" and not args.json:
        print(OFFLINE_NOTE, file=sys.stderr)
    classifier = make_classifier(settings)
    failures: list[str] = []
    results = []
    for name in args.paths:
        path = Path(name)
        try:
            result = classifier.classify(path, dry_run=args.dry_run)
        except TaggerError as exc:
            failures.append(f"{path}: {exc.kind}: {redact(exc.message, secrets_of(settings))}")
            continue
        results.append(result)
        if args.json:
            continue
        state = "dry run" if args.dry_run else "written" if result.written else "unchanged"
        if result.human_only:
            state = "not written: ClassificationContentOrigin is Human (suggestions in the record)"
        usage = result.usage
        lines = [
            f"{path}  [{state}; {usage.calls} calls, {usage.input_tokens} in / {usage.output_tokens} out tokens, "
            f"{result.cached_terms} cached]"
        ]
        _table(result, lines)
        if args.dry_run and result.diff:
            lines.append(result.diff.rstrip("\n"))
        print("\n".join(lines))
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in results], indent=1, ensure_ascii=False))
    for line in failures:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failures else 0


def cmd_taxonomy_check(args: argparse.Namespace) -> int:
    """Report every problem in the term files."""
    settings = Settings()
    root = Path(args.dir) if args.dir else settings.taxonomy_dir
    try:
        taxonomy = load_taxonomy(root, known_types=settings.selection)
    except TaggerError as exc:
        print(str(exc))
        return 1
    content = settings.content_root()
    if content.is_dir():  # a type's key must not be one the site's posts use for anything but terms
        taxonomy.problems += type_key_problems(taxonomy, backfill.post_files(content))
    for problem in taxonomy.problems:
        print(problem)
    counts = ", ".join(f"{t}: {len(taxonomy.of_type(t))}" for t in taxonomy.types())
    print(f"{len(taxonomy)} terms ({counts}); {len(taxonomy.problems)} problems", file=sys.stderr)
    return 1 if taxonomy.problems else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="tagger", description="LLM-backed taxonomy tagging for markdown posts")
    parser.add_argument("--version", action="version", version=f"tagger {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    classify = sub.add_parser("classify", help="classify posts now and write the terms back")
    classify.add_argument("paths", nargs="+", metavar="PATH")
    classify.add_argument("--dry-run", action="store_true", help="print the front-matter diff, write nothing")
    classify.add_argument("--json", action="store_true", help="print the full result as JSON")
    classify.add_argument("--provider", choices=["openai", "offline"])
    classify.add_argument("--taxonomy", metavar="DIR")
    classify.add_argument("-v", "--verbose", action="store_true", help="log every LLM call")
    classify.set_defaults(func=cmd_classify)

    taxonomy = sub.add_parser("taxonomy", help="taxonomy tools")
    tsub = taxonomy.add_subparsers(dest="taxonomy_command", required=True)
    check = tsub.add_parser("check", help="report problems in the term files")
    check.add_argument("dir", nargs="?")
    check.set_defaults(func=cmd_taxonomy_check)

    from worker.cli import queue as queuecli

    queuecli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tagger` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except TaggerError as exc:
        print(f"tagger: {exc.kind}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
