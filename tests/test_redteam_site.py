"""A site owner's red team: odd spellings, odd files and odd reports that broke a promise once."""

from __future__ import annotations

from pathlib import Path

from worker.classifier import Classifier
from worker.posts import normal_form, read_post


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
