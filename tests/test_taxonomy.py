"""Loading term files and checking them for problems."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.commands import tagger
from tests.conftest import REPO
from tests.test_posts import BOMB
from worker.classifier import make_classifier
from worker.posts import read_post
from worker.taxonomy import load_taxonomy, split_instructions, term_from_file

SEED = REPO.parent / "shared" / "seeds" / "agile-product-management.md"


def test_default_taxonomy_holds_the_seed_and_several_types() -> None:
    taxonomy = load_taxonomy(REPO / "categories")
    assert {"categories", "tags", "concepts"} <= set(taxonomy.types())
    seed = taxonomy.get("tags", "Agile Product Management")
    assert seed is not None
    assert len(seed.key_topics) == 8
    assert seed.exclusions and "traditional project management" in seed.exclusions[0]
    assert taxonomy.problems == []


def test_instruction_variants_are_split() -> None:
    scope, topics, exclude = split_instructions(
        "**Use this category only for X.**\nX is about y.\n\n**Key Topics to Discuss:**\n- one\n- two\n\n"
        "**Strict Exclusions:**\n- bad one\n- bad two\n"
    )
    assert scope.startswith("Use this category only for X.")
    assert topics == ["one", "two"]
    assert exclude == ["bad one", "bad two"]
    _, _, inline = split_instructions(
        "Scope.\n**Key topics that should be discussed under this category include:**\n- a\n\n**Strictly exclude** anything else."
    )
    assert inline == ["anything else."]


def test_corpus_terms_are_identified_by_type_and_title(corpus: Path) -> None:
    taxonomy = load_taxonomy(corpus / "taxonomy", known_types=["categories", "tags", "concepts"])
    assert len(taxonomy) == 118
    categories = {t.title for t in taxonomy.of_type("categories")}
    tags = {t.title for t in taxonomy.of_type("tags")}
    assert len(categories & tags) == 12
    assert all(t.key_topics for t in taxonomy if t.instructions and "Key" in t.instructions)
    kanban = taxonomy.get("categories", "Kanban")
    assert kanban is not None and kanban.type == "categories" and kanban.exclusions


def test_definition_hash_changes_with_instructions(tmp_path: Path) -> None:
    path = tmp_path / "tags" / "x.md"
    path.parent.mkdir()
    path.write_text("---\ntitle: X\nInstructions: 'Scope.\n\n  **Key Topics:**\n\n  - a'\n---\n", encoding="utf-8")
    first, _ = term_from_file(path)
    path.write_text(
        "---\ntitle: X\nInstructions: 'Other scope.\n\n  **Key Topics:**\n\n  - a'\n---\n", encoding="utf-8"
    )
    second, _ = term_from_file(path)
    assert first and second and first.type == "tags" and first.definition_hash != second.definition_hash


def test_taxonomy_check_reports_planted_problems(tmp_path: Path) -> None:
    root = tmp_path / "tax"
    (root / "tags").mkdir(parents=True)
    (root / "weird").mkdir()
    good = "---\ntitle: {t}\nInstructions: |\n  Scope.\n  **Key Topics:**\n  - topic\n---\n"
    (root / "tags" / "ok.md").write_text(good.format(t="Fine"), encoding="utf-8")
    (root / "tags" / "dup.md").write_text(good.format(t="Fine"), encoding="utf-8")
    (root / "tags" / "noinst.md").write_text("---\ntitle: Bare\n---\n", encoding="utf-8")
    (root / "tags" / "notopics.md").write_text("---\ntitle: Vague\nInstructions: just prose\n---\n", encoding="utf-8")
    (root / "tags" / "broken.md").write_text("---\ntitle: [oops\n---\n", encoding="utf-8")
    (root / "tags" / "badtype.md").write_text(
        "---\ntitle: T\nClassificationType: [x]\nInstructions: x\n---\n", encoding="utf-8"
    )
    (root / "weird" / "lost.md").write_text(good.format(t="Lost"), encoding="utf-8")
    (root / "tags" / "bomb.md").write_text(f"---\n{BOMB}title: *i\n---\n", encoding="utf-8")
    run = tagger(dict(os.environ), "taxonomy", "check", str(root), cwd=tmp_path)
    assert run.returncode == 1
    out = run.stdout
    assert "duplicate title 'Fine' in type 'tags'" in out
    assert "noinst.md: no Instructions" in out
    assert "notopics.md: no key topics" in out
    assert "broken.md: unreadable front matter" in out
    assert "badtype.md: unknown ClassificationType" in out
    assert "lost.md: missing ClassificationType and folder 'weird' is not a known type" in out
    assert "bomb.md: unreadable front matter (front matter contains excessive aliasing" in out
    clean = tagger(dict(os.environ), "taxonomy", "check", str(REPO / "categories"))
    assert clean.returncode == 0, clean.stdout


def test_reserved_keys_and_hidden_folders_are_not_types(tmp_path: Path, make_settings: Any, site: Path) -> None:
    root = site / "taxonomy"
    term = "---\ntitle: {t}\n{extra}Instructions: |\n  Scope.\n  **Key Topics:**\n  - topic\n---\n"
    (root / "tags" / "title-type.md").write_text(term.format(t="Hijack", extra="ClassificationType: title\n"), "utf-8")
    (root / "draft").mkdir()
    (root / "draft" / "x.md").write_text(term.format(t="Draft term", extra="ClassificationType: draft\n"), "utf-8")
    (root / ".archive").mkdir()
    (root / ".archive" / "old.md").write_text(term.format(t="Archived", extra="ClassificationType: tags\n"), "utf-8")
    taxonomy = load_taxonomy(root, known_types=["categories", "tags", "concepts"])
    assert set(taxonomy.types()) == {"categories", "tags", "concepts"}
    assert not [t for t in taxonomy if t.title in ("Hijack", "Draft term", "Archived")]
    problems = "\n".join(taxonomy.problems)
    assert "title-type.md: type 'title' is a reserved front-matter key" in problems
    assert "x.md: type 'draft' is a reserved front-matter key" in problems
    assert "Archived" not in problems and ".archive" not in problems
    check = tagger(dict(os.environ), "taxonomy", "check", str(root), cwd=tmp_path)
    assert check.returncode == 1 and "reserved front-matter key" in check.stdout
    post = site / "site" / "posts" / "limiting-wip.md"
    make_classifier(make_settings()).classify(post)
    meta = read_post(post).meta
    assert meta["title"] == "Why limiting work in progress speeds everything up" and meta["draft"] is False


def test_writing_a_term_pages_own_tags_keeps_its_definition_hash(tmp_path: Path) -> None:
    path = tmp_path / "tags" / "x.md"
    path.parent.mkdir()
    path.write_text(
        "---\ntitle: X\nInstructions: 'Scope.\n\n  **Key Topics:**\n\n  - a'\n---\nbody\n", encoding="utf-8"
    )
    first, _ = term_from_file(path)
    path.write_text(path.read_text().replace("title: X\n", "title: X\ntags:\n- Y\ncategories: [Z]\n"), "utf-8")
    second, _ = term_from_file(path)
    assert first and second and first.definition_hash == second.definition_hash


def test_taxonomy_check_refuses_a_type_whose_key_posts_use_for_something_else(site: Path) -> None:
    level = site / "taxonomy" / "level"
    level.mkdir()
    (level / "expert.md").write_text(
        "---\ntitle: Expert\nClassificationType: level\nInstructions: |\n  S.\n  **Key Topics:**\n  - t\n---\n", "utf-8"
    )
    (site / "site" / "posts" / "levelled.md").write_text("---\ntitle: L\nlevel: 3\n---\nbody\n", encoding="utf-8")
    env = {**os.environ, "TAGGER_CONTENT_DIR": str(site / "site")}
    check = tagger(env, "taxonomy", "check", str(site / "taxonomy"), cwd=site)
    assert check.returncode == 1
    assert "type 'level': posts use this key for something other than a list of terms" in check.stdout
    assert "levelled.md (int)" in check.stdout
