"""Record benchmark: bytes of result record per post on the corpus, and record lines a one-paragraph edit changes.

Usage: .venv/bin/python benchmarks/records.py
Runs against whatever `worker` is importable (PYTHONPATH=<other checkout> measures another version).
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import fake_settings, need_corpus, scratch_posts
from tests.fakellm import FakeLLM
from worker.backfill import plan, run_inline

EDIT = " This sentence was added in a one-paragraph edit."


def records(root: Path) -> dict[Path, str]:
    """Every result record under the content root, by the post folder it belongs to."""
    return {p.parent: p.read_text(encoding="utf-8") for p in sorted(root.rglob("data.*.tagger.json"))}


def verdicts(text: str) -> dict[tuple[str, str], tuple[float, str]]:
    """Each judgement's confidence and reason, from either record format (v1 objects or v2 rows)."""
    out = {}
    for j in json.loads(text)["judgements"]:
        if isinstance(j, dict):
            out[(j["type"], j["term"])] = (j["confidence"], j["reason"])
        else:
            out[(j[0], j[1])] = (j[2], j[5])
    return out


def edit_one_paragraph(post: Path) -> bool:
    """Append a sentence to the first prose paragraph of the body (after the front matter)."""
    text = post.read_text(encoding="utf-8")
    head = re.match(r"\A---\n.*?\n---\n", text, re.S)
    start = head.end() if head else 0
    for paragraph in re.split(r"\n\s*\n", text[start:]):
        line = paragraph.strip()
        if len(line) > 40 and not line.startswith(("#", "!", "<", "{{", "|", "-", "*", "`")):
            at = text.index(paragraph, start) + len(paragraph.rstrip())
            post.write_text(text[:at] + EDIT + text[at:], encoding="utf-8")
            return True
    return False


def main() -> None:
    corpus = need_corpus()
    content = scratch_posts(corpus / "posts")
    fake = FakeLLM().start()
    settings = fake_settings(fake, corpus / "taxonomy", TAGGER_CONTENT_DIR=str(content))
    try:
        run_inline(settings, plan(settings).todo)
        before = records(content)
        posts = sorted(content.rglob("index.md"))
        post_bytes = statistics.mean(p.stat().st_size for p in posts)
        sizes = [len(text.encode("utf-8")) for text in before.values()]
        lines = [text.count("\n") + 1 for text in before.values()]
        edited = [p for p in posts if edit_one_paragraph(p)]
        run_inline(settings, edited)
        after = records(content)
        changed = []
        added = []
        verdicts_changed = []
        for post in edited:
            old_verdicts, new_verdicts = verdicts(before[post.parent]), verdicts(after[post.parent])
            verdicts_changed.append(sum(1 for k, v in new_verdicts.items() if old_verdicts.get(k) != v))
            old, new = before[post.parent].splitlines(), after[post.parent].splitlines()
            diff = [
                d
                for d in difflib.unified_diff(old, new, lineterm="", n=0)
                if d[:1] in "+-" and d[:3] not in ("+++", "---")
            ]
            changed.append(sum(1 for d in diff if d.startswith("-")))
            added.append(sum(1 for d in diff if d.startswith("+")))
    finally:
        fake.stop()
        shutil.rmtree(content, ignore_errors=True)
    print(f"posts {len(posts)} (mean {post_bytes / 1024:.1f} KB), records {len(sizes)}")
    print(
        f"record bytes per post: mean {statistics.mean(sizes) / 1024:.1f} KB, max {max(sizes) / 1024:.1f} KB;"
        f" lines per record: mean {statistics.mean(lines):.0f}"
    )
    print(
        f"one-paragraph edit ({len(edited)} posts): record lines removed+added per post (git diff):"
        f" median {statistics.median(changed) + statistics.median(added):.0f},"
        f" mean {statistics.mean(changed) + statistics.mean(added):.0f}; lines changed"
        f" median {statistics.median(changed):.0f}, max {max(changed)}"
    )
    extra = [c - v for c, v in zip(changed, verdicts_changed, strict=True)]
    print(
        f"judgements whose verdict changed: mean {statistics.mean(verdicts_changed):.1f};"
        f" lines changed beyond those: median {statistics.median(extra):.0f}, max {max(extra)}"
    )


if __name__ == "__main__":
    main()
