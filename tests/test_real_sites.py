"""What real sites and Hugo do: odd spellings, odd files and odd front matter that once broke a promise."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import fill_disk
from worker.backfill import Plan, plan
from worker.classifier import Classifier, make_classifier
from worker.errors import BadPost, PostWriteFailed
from worker.posts import normal_form, read_post
from worker.settings import Settings
from worker.taxonomy import load_taxonomy


def test_an_invisible_character_inside_a_term_is_the_same_spelling() -> None:
    # "Kan\u200bban" renders exactly as "Kanban": tagger must not add a second, identical-looking spelling.
    assert normal_form("Kan\u200bban") == normal_form("Kanban") == "kanban"
    assert normal_form("Flow and Kan\u2060ban") == normal_form("Flow\u00ad and Kanban") == "flow and kanban"
    assert normal_form("Agile\u200b Coaching") == normal_form("Agile\u00a0Coaching") == "agile coaching"


def test_a_post_with_an_invisible_spelling_of_a_term_gets_no_second_spelling(
    classifier: Classifier, site: Path
) -> None:
    path = site / "site" / "posts" / "zwsp.md"
    path.write_text(
        "---\ntitle: Boards\ntags:\n  - Kan\u200bban\n---\nOur Kanban board and WIP limits.\n", encoding="utf-8"
    )
    classifier.classify(path)
    assert read_post(path).meta["tags"] == ["Kan\u200bban"]


@pytest.fixture
def site_on_a_full_disk(site: Path, small_tmpfs: Path) -> Path:
    """The demo site's content on a 256 KB tmpfs filled to the last byte."""
    shutil.copytree(site / "site", small_tmpfs / "site")
    fill_disk(small_tmpfs)
    return small_tmpfs


def test_a_full_disk_under_the_post_is_a_named_transient_failure_and_loses_nothing(
    make_settings: Callable[..., Settings], site_on_a_full_disk: Path, tmp_path: Path
) -> None:
    # The record fits (it lives elsewhere), the post's temp file does not: a full disk, retried, not a "crash".
    path = site_on_a_full_disk / "site" / "posts" / "limiting-wip.md"
    original = path.read_bytes()
    settings = make_settings(
        TAGGER_CONTENT_DIR=str(site_on_a_full_disk / "site"), TAGGER_RECORDS_DIR=str(tmp_path / "records")
    )
    classifier = make_classifier(settings)
    with pytest.raises(PostWriteFailed, match="No space left on device") as caught:
        classifier.classify(path)
    assert caught.value.kind == "post_write" and caught.value.transient
    assert path.read_bytes() == original
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tagger-tmp")]
    (site_on_a_full_disk / "filler").unlink()
    classifier.classify(path)
    assert read_post(path).terms("tags") == ["Lean", "Kanban"]
    assert classifier.records.load(path).assigned["tags"] == ["Kanban"]  # tagger's, not a person's


BODY = "Our Kanban board and WIP limits shortened cycle time.\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Hugo reads a post that starts with "{" as JSON front matter and "#+" as Org front matter: a YAML block
        # put in front would turn the post's own title and terms into body text.
        ('{\n"title": "Boards",\n"tags": ["Lean"]\n}\n' + BODY, "JSON front matter"),
        ('  \n{"title": "Boards"}\n' + BODY, "JSON front matter"),
        ("#+title: Boards\n#+tags[]: Lean\n\n" + BODY, "Org front matter"),
        # Hugo's front-matter keys are case-insensitive: "Tags" is the list Hugo shows; a second "tags" key is not.
        ("---\ntitle: Boards\nTags: [Lean]\n---\n" + BODY, "'Tags' is read by Hugo as 'tags'"),
        ("---\ntitle: Boards\nCategories:\n  - DevOps\n---\n" + BODY, "'Categories' is read by Hugo as 'categories'"),
    ],
)
def test_front_matter_hugo_reads_differently_is_refused_and_left_alone(
    classifier: Classifier, site: Path, text: str, message: str
) -> None:
    path = site / "site" / "posts" / "odd.md"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BadPost, match=message):
        classifier.classify(path)
    assert path.read_text(encoding="utf-8") == text


def test_a_fifo_named_like_a_post_is_skipped_and_never_blocks_a_backfill(
    make_settings: Callable[..., Settings], site: Path
) -> None:
    fifo = site / "site" / "posts" / "pipe.md"
    os.mkfifo(fifo)
    planned: list[Plan] = []
    walker = threading.Thread(target=lambda: planned.append(plan(make_settings())), daemon=True)
    walker.start()
    walker.join(timeout=10)
    if walker.is_alive():  # blocked opening the FIFO for reading: open its other end so the thread can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        walker.join(timeout=5)
        pytest.fail("planning a backfill blocked forever on a FIFO named pipe.md")
    assert fifo not in planned[0].todo and len(planned[0].todo) == 3
    assert any("pipe.md" in s and "not a regular file" in s for s in planned[0].skipped)


def test_a_type_spelled_with_other_case_is_a_problem_not_a_second_key(
    classifier: Classifier, make_settings: Callable[..., Settings], site: Path
) -> None:
    # Hugo reads "Tags:" and "tags:" as one key: one mis-cased term file must not make every post fail.
    term = site / "taxonomy" / "tags" / "kanban.md"
    term.write_text(term.read_text().replace("ClassificationType: tags", "ClassificationType: Tags"), encoding="utf-8")
    taxonomy = load_taxonomy(site / "taxonomy")
    assert sorted(taxonomy.types()) == ["categories", "concepts", "tags"]
    assert any("kanban.md" in p and "'Tags' differs from type 'tags' only by case" in p for p in taxonomy.problems)
    path = site / "site" / "posts" / "limiting-wip.md"
    make_classifier(make_settings()).classify(path)
    assert "Tags" not in read_post(path).meta
