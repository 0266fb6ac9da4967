"""Hugo's own documentation (992 pages nobody on this project wrote), backfilled inline with the project's fake.

Every page is given terms (the fake scores three terms high for every post), so every front-matter shape of the
site goes through the write-back. Afterwards each file is checked with `tests/owned_bytes.py` (code written
apart from the product): every byte outside the owned keys identical, every foreign key parsing to the same value.
Prints posts/s for planning, for the inline run and for `verify` afterwards, each against a baseline measured in
the same run: reading and parsing every post (the least planning or verifying can do), and reading, editing and
atomically writing every post with fixed terms, no judging and no record (the least a backfill that writes can do).

Usage: .venv/bin/python benchmarks/hugo_docs.py [--latency 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import REPO, fake_settings
from tests.fakellm import FakeLLM
from tests.owned_bytes import assert_only_owned_changed, foreign_values
from worker.backfill import plan, post_files, run_inline
from worker.logs import configure
from worker.posts import ORIGIN_KEY, read_post, render_changes, write_atomic
from worker.verify import verify

HUGO_DOCS = REPO.parent / "shared" / "corpus" / "hugo-docs"
SCORES = {"Kanban": 90.0, "Flow and Kanban": 85.0, "Practice": 90.0}


def copy_site(into: Path) -> Path:
    """A scratch copy of the site's pages (`en/`), byte for byte."""
    target = into / "content"
    shutil.copytree(HUGO_DOCS / "en", target, copy_function=shutil.copyfile)  # the shared copy is read-only
    return target


def check(originals: dict[Path, bytes]) -> tuple[int, int, list[str]]:
    """(written, unchanged, problems): each file against its original, at byte and parse level."""
    written = unchanged = 0
    problems: list[str] = []
    for path, old in originals.items():
        new = path.read_bytes()
        if new == old:
            unchanged += 1
            continue
        written += 1
        try:
            old_text, new_text = old.decode("utf-8"), new.decode("utf-8")
            assert_only_owned_changed(old_text, new_text)
            assert foreign_values(new_text) == foreign_values(old_text), "a foreign key parses differently"
        except AssertionError as exc:
            problems.append(f"{path}: {str(exc)[:200]}")
    return written, unchanged, problems


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.0, help="seconds the fake takes per call")
    args = parser.parse_args()
    if not HUGO_DOCS.is_dir():
        raise SystemExit(f"benchmark needs Hugo's docs at {HUGO_DOCS} (present in the project workspace)")
    scratch = Path(tempfile.mkdtemp(prefix="tagger-hugo-"))
    fake = FakeLLM(latency=args.latency).start()
    fake.score(SCORES, default=0)
    try:
        baseline_root = copy_site(scratch / "baseline")
        content = copy_site(scratch / "run")
        settings = fake_settings(fake, REPO / "categories", TAGGER_CONTENT_DIR=str(content))
        configure(settings)
        paths, _ = post_files(settings)
        originals = {p: p.read_bytes() for p in paths}

        started = time.monotonic()
        for path in post_files(settings.model_copy(update={"content_dir": baseline_root}))[0]:
            read_post(path)
        read_seconds = time.monotonic() - started
        started = time.monotonic()
        for path in post_files(settings.model_copy(update={"content_dir": baseline_root}))[0]:
            post = read_post(path)
            fixed = {"tags": ["Kanban"], "categories": [*post.terms("categories"), "Flow and Kanban"]}
            write_atomic(post, render_changes(post, {**fixed, "concepts": ["Practice"], ORIGIN_KEY: "AI"}))
        write_seconds = time.monotonic() - started

        started = time.monotonic()
        planned = plan(settings)
        plan_seconds = time.monotonic() - started
        started = time.monotonic()
        summary = run_inline(settings, planned.todo)
        run_seconds = time.monotonic() - started
        calls = fake.counts["requests"]
        again = plan(settings)
        started = time.monotonic()
        verified = verify(settings)
        verify_seconds = time.monotonic() - started
        verify_calls = fake.counts["requests"] - calls
    finally:
        fake.stop()
    written, unchanged, problems = check(originals)
    shutil.rmtree(scratch, ignore_errors=True)
    n = len(paths)
    print(f"hugo-docs: {n} posts; fake LLM latency {args.latency}s; {calls} calls")
    print(
        f"plan: {len(planned.todo)} to classify, {len(planned.skipped)} skipped, "
        f"{len(planned.no_front_matter)} without front matter; {plan_seconds:.2f}s = {n / plan_seconds:.0f} posts/s "
        f"(reading and parsing alone: {n / read_seconds:.0f} posts/s; "
        f"planning takes {plan_seconds / read_seconds:.1f}x)"
    )
    print(
        f"inline run: {summary.done} done, {summary.written} written, {len(summary.failed)} failed, "
        f"{len(summary.skipped)} skipped; {run_seconds:.2f}s = {summary.done / run_seconds:.0f} posts/s "
        f"(edit and atomic write alone: {n / write_seconds:.0f} posts/s; "
        f"the run takes {run_seconds / write_seconds:.1f}x)"
    )
    print(f"after: {written} written, {unchanged} unchanged, {len(problems)} outside the owned keys changed")
    print(f"second plan: {len(again.todo)} to classify, {again.fresh} fresh")
    print(
        f"verify: {verified.checked} posts checked, {len(verified.drifted)} drifted, {verify_calls} calls; "
        f"{verify_seconds:.2f}s = {verified.checked / verify_seconds:.0f} posts/s "
        f"(reading and parsing alone: {n / read_seconds:.0f} posts/s; "
        f"verify takes {verify_seconds / read_seconds:.1f}x)"
    )
    for line in (summary.failed + summary.skipped + planned.skipped + problems)[:20]:
        print(f"  {line}")
    if (
        summary.failed
        or summary.skipped
        or planned.skipped
        or problems
        or again.todo
        or verified.drifted
        or verify_calls
    ):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
