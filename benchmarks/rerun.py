"""Rerun benchmark: a second backfill over an unchanged corpus makes zero LLM calls; its time per 1,000 posts.

Usage: .venv/bin/python benchmarks/rerun.py [--copies 10]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import fake_settings, need_corpus, scratch_posts
from tests.fakellm import FakeLLM
from worker.backfill import plan, run_inline
from worker.logs import configure


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=10, help="copies of the corpus's posts")
    args = parser.parse_args()
    corpus = need_corpus()
    content = scratch_posts(corpus / "posts", copies=args.copies)
    fake = FakeLLM().start()
    settings = fake_settings(fake, corpus / "taxonomy", TAGGER_CONTENT_DIR=str(content))
    configure(settings)
    try:
        first = plan(settings)
        started = time.monotonic()
        summary = run_inline(settings, first.todo)
        first_seconds = time.monotonic() - started
        calls = fake.counts["requests"]
        started = time.monotonic()
        second = plan(settings)
        rerun_seconds = time.monotonic() - started
        again = run_inline(settings, second.todo)
        extra_calls = fake.counts["requests"] - calls
    finally:
        fake.stop()
        shutil.rmtree(content, ignore_errors=True)
    n = len(first.todo)
    print(f"posts {n}: first backfill {summary.done} done, {calls} LLM calls, {first_seconds:.1f}s")
    print(
        f"second backfill: {len(second.todo)} to classify, {second.fresh} fresh, {again.done} run, "
        f"{extra_calls} LLM calls; {rerun_seconds:.2f}s = {rerun_seconds / n * 1000:.1f}s per 1,000 posts"
    )


if __name__ == "__main__":
    main()
