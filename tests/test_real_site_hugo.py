"""Hugo's own documentation (992 pages nobody on this project wrote): every page is written with only the owned
keys changed, or has nothing to change; none is refused; `verify` then finds no drift, with no call.

Runs the inline backfill over a scratch copy with the project's fake (three terms scored high for every post, so
every page's front matter is edited), then checks each file with `tests/owned_bytes.py` (written apart from the
product) at byte level and at parse level. fsync is skipped in this test only (the bytes are the subject here,
not durability; `tests/test_frontmatter.py` observes the fsyncs). Skipped when `../shared/corpus/hugo-docs` is
absent.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakellm import FakeLLM
from tests.owned_bytes import assert_only_owned_changed, foreign_values
from worker.backfill import plan, post_files, run_inline
from worker.settings import Settings
from worker.verify import verify

HUGO_DOCS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "hugo-docs"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def hugo_docs(tmp_path: Path) -> Path:
    if not (HUGO_DOCS / "en").is_dir():
        pytest.skip(f"Hugo's docs are not at {HUGO_DOCS} (the shared corpus is absent)")
    target = tmp_path / "content"
    shutil.copytree(HUGO_DOCS / "en", target, copy_function=shutil.copyfile)  # the shared copy is read-only
    return target


@pytest.mark.slow  # 992 pages classified and written: tens of seconds idle, minutes on a loaded machine
def test_every_hugo_docs_page_is_written_with_only_owned_keys_changed(
    hugo_docs: Path,
    fake_llm: FakeLLM,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    fake_llm.score({"Kanban": 90.0, "Flow and Kanban": 85.0, "Practice": 90.0}, default=0)
    settings = make_settings(
        TAGGER_CONTENT_DIR=str(hugo_docs), TAGGER_TAXONOMY_DIR=str(REPO / "categories"), TAGGER_CONCURRENCY=4
    )
    paths, not_posts = post_files(settings)
    assert len(paths) == 992 and not not_posts
    originals = {p: p.read_bytes() for p in paths}
    planned = plan(settings)
    assert (len(planned.todo), planned.skipped, planned.no_front_matter) == (992, [], [])
    summary = run_inline(settings, planned.todo)
    assert (summary.done, summary.failed, summary.skipped) == (992, [], [])
    written = 0
    for path, old in originals.items():
        new = path.read_bytes()
        if new == old:
            continue
        written += 1
        old_text, new_text = old.decode("utf-8"), new.decode("utf-8")
        assert_only_owned_changed(old_text, new_text)  # byte level
        assert foreign_values(new_text) == foreign_values(old_text), path  # parse level: every foreign key
    assert written == summary.written == 992  # every page got terms: every shape went through the editor
    again = plan(settings)
    assert (len(again.todo), again.fresh) == (0, 992)
    calls = fake_llm.counts["requests"]
    started = time.monotonic()
    verified = verify(settings)
    elapsed = time.monotonic() - started
    assert (verified.checked, verified.drifted, fake_llm.counts["requests"]) == (992, [], calls)
    # About 3 s on the project's 2-core machine (docs/benchmarks.md); the bound leaves room for a loaded machine.
    assert elapsed < 20, f"verify of 992 posts took {elapsed:.1f}s"
