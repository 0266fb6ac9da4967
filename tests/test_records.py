"""Result records: the one name for the terms people removed, and records written under its old name."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.fakellm import FakeLLM
from worker.classifier import make_classifier
from worker.posts import read_post
from worker.records import dumps, loads, reconcile, record_path
from worker.settings import Settings

# A post whose `Kanban` a person removed, and the record tagger wrote for it before the rename (field `rejected`).
OLD = Path(__file__).parent / "fixtures" / "records"


def old_site(site: Path) -> Path:
    post = site / "site" / "posts" / "limiting-wip.md"
    shutil.copy(OLD / "limiting-wip.md", post)
    shutil.copy(OLD / "data.limiting-wip.tagger.json", record_path(post))
    return post


def test_a_record_in_the_old_format_loads_with_the_new_name_and_only_that_line_changes() -> None:
    old = (OLD / "data.limiting-wip.tagger.json").read_bytes()
    assert b'"rejected"' in old and b"removed_by_people" not in old  # the fixture is in the old format
    record = loads(old)
    assert record.removed_by_people == {"categories": [], "concepts": [], "tags": ["Kanban"]}
    new = dumps(record).decode().splitlines()
    changed = [(a, b) for a, b in zip(old.decode().splitlines(), new, strict=True) if a != b]
    assert changed == [
        (
            '"rejected": {"categories":[],"concepts":[],"tags":["Kanban"]},',
            '"removed_by_people": {"categories":[],"concepts":[],"tags":["Kanban"]},',
        )
    ]


def test_a_term_people_removed_under_the_old_name_is_not_readded_and_the_record_gets_the_new_name(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    post = old_site(site)
    fake_llm.score({"Kanban": 99})  # the model wants it back, and the record's judgements are another model's
    result = make_classifier(make_settings()).classify(post)
    assert fake_llm.counts["requests"] > 0
    assert read_post(post).terms("tags") == ["Lean"]
    tags = next(d for d in result.decisions if d.type == "tags")
    assert tags.removed_by_people == ["Kanban"] and "Kanban" not in tags.final
    text = record_path(post).read_text(encoding="utf-8")
    assert '"rejected"' not in text
    assert json.loads(text)["removed_by_people"]["tags"] == ["Kanban"]


def test_an_announced_write_in_the_old_format_is_settled_with_the_people_s_removals(site: Path) -> None:
    post = old_site(site)
    raw = json.loads(record_path(post).read_bytes())
    before = read_post(post).file_hash
    # A kill after the announcement, before the post was replaced: the old record's pending write names `rejected`.
    raw["file_hash"] = "0" * 16
    raw["pending"] = {"before_file_hash": before, "assigned": {"tags": []}, "rejected": {"tags": ["Kanban"]}}
    raw["rejected"] = {}
    record = reconcile(loads(json.dumps(raw).encode()), read_post(post))
    assert record.pending is None and record.removed_by_people == {"tags": ["Kanban"]}


def test_a_version_1_record_with_the_old_name_is_migrated() -> None:
    v1 = {"post": "posts/a.md", "assigned": {"tags": ["Lean"]}, "rejected": {"tags": ["Kanban"]}, "judgements": []}
    record = loads(json.dumps(v1).encode())
    assert record.removed_by_people == {"tags": ["Kanban"]} and record.assigned == {"tags": ["Lean"]}
    assert b'"removed_by_people": {"tags":["Kanban"]}' in dumps(record)
