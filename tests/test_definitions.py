"""Term definitions in prompts: compacted without losing a key topic or an exclusion, byte-stable, and versioned."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakellm import FakeLLM
from worker.classifier import make_classifier
from worker.prompts import compact_item, compact_scope, load_templates, render_term
from worker.records import load_record
from worker.settings import Settings
from worker.taxonomy import Taxonomy, load_taxonomy, term_from_file

MakeSettings = Callable[..., Settings]
REPO = Path(__file__).resolve().parent.parent
SEED = REPO.parent / "shared" / "seeds" / "agile-product-management.md"
CORPUS_TAXONOMY = REPO.parent / "shared" / "corpus" / "nkdagility" / "taxonomy"
# The only words compaction may take out of a key topic or an exclusion: articles, the subject "content that" /
# "discussions on", and "the role / importance / significance / use of". Never a negation, a qualifier or a topic word.
DROPPABLE = frozenset(
    [
        "the",
        "any",
        "content",
        "discussion",
        "discussions",
        "topic",
        "topics",
        "post",
        "posts",
        "that",
        "which",
        "on",
        "about",
        "do",
        "does",
        "role",
        "importance",
        "significance",
        "use",
        "of",
    ]
)


def _words(text: str) -> Counter[str]:
    return Counter(w.strip(".;").casefold() for w in text.split() if w.strip(".;"))


def _taxonomy(source: str) -> Taxonomy:
    if source == "repository":
        return load_taxonomy(REPO / "categories")
    path = SEED if source == "seed" else CORPUS_TAXONOMY
    if not path.exists():
        pytest.skip(f"{path} is absent (only present in the project's workspace and CI)")
    if source == "seed":
        term, _ = term_from_file(SEED)
        assert term is not None
        return Taxonomy(terms=[term])
    return load_taxonomy(path)


@pytest.mark.parametrize("source", ["seed", "repository", "nkdagility"])
def test_every_key_topic_and_every_exclusion_survives_compaction(source: str) -> None:
    templates = load_templates()
    taxonomy = _taxonomy(source)
    items = 0
    for term in taxonomy:
        definition = render_term(templates, term)
        for item in (*term.key_topics, *term.exclusions):
            compact = compact_item(item)
            assert compact in definition, (term.title, item)
            dropped = _words(item) - _words(compact)
            assert set(dropped) <= DROPPABLE, (term.title, item, dropped)
            assert not _words(compact) - _words(item), (term.title, item)  # nothing added either
            items += 1
    assert items >= {"seed": 9, "repository": 20, "nkdagility": 1000}[source]


def test_compaction_is_stable_and_the_seed_reads_as_expected() -> None:
    templates = load_templates()
    seed = load_taxonomy(REPO / "categories").get("tags", "Agile Product Management")
    assert seed is not None
    definition = render_term(templates, seed)
    reloaded = load_taxonomy(REPO / "categories").get("tags", "Agile Product Management")
    assert reloaded is not None
    again = render_term(load_templates(), reloaded)
    assert definition.encode() == again.encode()  # same input, same bytes: the provider's prefix cache depends on it
    assert definition.splitlines()[:2] == [
        "## Agile Product Management",
        "Scope: The methodologies and practices that aim to maximise product value through alignment of strategy, customer needs, and continuous delivery.",
    ]
    assert "Use this category" not in definition
    assert "Product Owner in Agile frameworks, particularly in Scrum;" in definition  # "The role of the" dropped
    assert definition.count(";") + 2 >= len(seed.key_topics) + len(seed.exclusions)


@pytest.mark.parametrize(
    ("title", "scope", "expected"),
    [
        (
            "Enterprise Agility",
            "Use this category only for discussions on Enterprise Agility. Scope and Purpose: The Enterprise Agility"
            " category is dedicated to exploring the principles that enable organisations to respond.",
            "The principles that enable organisations to respond.",
        ),
        ("Tool", "Use this category only for discussions on Tools. This category encompasses software.", "Software."),
        (
            "Resilience and Change",
            "Please ensure that the category/tag 'Resilience and Change' is exclusively applied to content related to"
            " Strategies for organisational resilience.",
            "Strategies for organisational resilience.",
        ),
        # A lead-in that says more than the term's name is meaning, not boilerplate: kept.
        (
            "Throughput",
            "Use this tag only for discussions on Throughput as a delivery metric. It counts work items.",
            "Use this tag only for discussions on Throughput as a delivery metric. It counts work items.",
        ),
    ],
)
def test_scope_lead_ins_that_only_name_the_term_are_dropped(title: str, scope: str, expected: str) -> None:
    assert compact_scope(title, scope) == expected


def test_exclusions_keep_their_negations_and_qualifiers() -> None:
    assert compact_item("Content that does not align with Lean.") == "not align with Lean"
    assert compact_item("Content focused solely on tools, without a link to flow.") == (
        "focused solely on tools, without a link to flow"
    )
    assert compact_item("Discussions unrelated to Scrum.") == "unrelated to Scrum"
    assert compact_item("The role of the Product Owner.") == "Product Owner"


def test_a_change_of_structured_mode_packing_or_compaction_misses_the_cache(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.prompts

    path = site / "site" / "posts" / "limiting-wip.md"
    first = make_classifier(make_settings())
    first.classify(path, dry_run=True)
    record = load_record(path)
    assert record.judgements

    def kept(classifier_settings: Settings) -> int:
        classifier = make_classifier(classifier_settings)
        post = classifier.read(path)
        keep, _ = classifier.split_cached(post, classifier.terms_for(post), record)
        return len(keep)

    assert kept(make_settings()) == len(first.taxonomy)  # unchanged: every judgement from the cache
    assert kept(make_settings(TAGGER_STRUCTURED="json_object")) == 0  # the schema rides in the prompt instead
    assert kept(make_settings(TAGGER_PACK_TYPES="false")) == 0  # one call per type: other terms beside each
    monkeypatch.setattr(worker.prompts, "COMPACTION", "c-next")
    assert kept(make_settings()) == 0  # compaction rules changed: the definitions the model read changed


def test_a_judgement_cached_by_the_previous_version_is_asked_again(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    path = site / "site" / "posts" / "limiting-wip.md"
    classifier = make_classifier(make_settings())
    classifier.classify(path, dry_run=True)
    record = load_record(path)
    # Before definitions were compacted losslessly, judgements were cached under the templates' hash alone.
    before = [j.model_copy(update={"prompt_version": classifier.templates.version}) for j in record.judgements]
    old = record.model_copy(update={"judgements": before})
    post = classifier.read(path)
    keep, todo = classifier.split_cached(post, classifier.terms_for(post), old)
    assert not keep and len(todo) == len(classifier.taxonomy)
    assert re.fullmatch(r"p-[0-9a-f]{12}-compact\.c\d+-all-json_schema-packed", classifier.prompt_version)


def test_an_exclusion_written_as_a_paragraph_under_its_heading_is_kept(tmp_path: Path) -> None:
    # As two of the corpus's terms write it (Value Stream Management, Tenet): until now read as no exclusion at all.
    path = tmp_path / "tenet.md"
    path.write_text(
        "---\ntitle: Tenet\nClassificationType: concepts\nInstructions: |-\n  Guiding rules of a method.\n\n"
        "  **Key Topics:**\n  - Tenets of Scrum\n\n  **Exclusions:**  \n  Discussions that do not focus on guiding\n"
        "  rules, such as general opinions.\n\n  Ensure that all discussions stay on tenets.\n---\n",
        encoding="utf-8",
    )
    term, problems = term_from_file(path)
    assert term is not None and not problems
    assert term.exclusions == ("Discussions that do not focus on guiding rules, such as general opinions.",)
    definition = render_term(load_templates(), term)
    assert "Exclude: not focus on guiding rules, such as general opinions" in definition
    assert "Ensure that" not in definition  # advice to writers after the exclusion is neither scope nor exclusion
