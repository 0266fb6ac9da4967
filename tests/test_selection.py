"""Selection, levels and weights, table-driven: `select()` on its own, then end to end through the fake model.

Each row names the rule in force, the confidence of each term and what the post and its record already say,
and the exact terms that must be selected and written. Boundary values (79.99 / 80 / 80.01) sit on every
threshold. A rule is a dict as in TAGGER_SELECTION, so a row for a new rule field (e.g. `max_total`) is one
more row with that key in its rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakellm import FakeLLM, scripted_entry
from worker.classifier import make_classifier
from worker.decide import select
from worker.posts import read_post
from worker.records import load_record
from worker.reply import TermScores, confidence
from worker.results import Judgement, level
from worker.settings import DEFAULT_RULES, OTHER_TYPES_RULE, SelectionRule, Settings, Weights

MakeSettings = Callable[..., Settings]


@dataclass(frozen=True)
class Row:
    """One case of selection for one type."""

    id: str
    type: str
    scores: dict[str, float]
    selected: list[str]
    rule: dict[str, Any] | None = None  # None: the default rule for the type
    present: list[str] = field(default_factory=list)  # what the post lists now
    assigned: list[str] = field(default_factory=list)  # what tagger assigned before (its record)
    removed_before: list[str] = field(default_factory=list)  # what people removed before (its record)
    final: list[str] | None = None  # what the post must list after; None: same as `selected`
    kept_human: list[str] = field(default_factory=list)
    removed_by_people: list[str] = field(default_factory=list)


ROWS = [
    # thresholds: default rules (tags top 15 >= 80, categories top 3 >= 75, concepts top 1 >= 80, others top 5 >= 80)
    Row("tags-boundary", "tags", {"A": 79.99, "B": 80.0, "C": 80.01}, ["C", "B"]),
    Row("categories-boundary", "categories", {"A": 74.99, "B": 75.0, "C": 75.01}, ["C", "B"]),
    Row("concepts-boundary", "concepts", {"A": 79.99, "B": 80.0}, ["B"]),
    Row("other-type-boundary", "topics", {"A": 79.99, "B": 80.0, "C": 100.0}, ["C", "B"]),
    Row("nothing-reaches", "tags", {"A": 79.99, "B": 0.0}, []),
    # top N: the best N by confidence
    Row("categories-top-3", "categories", {"A": 76, "B": 99, "C": 75, "D": 90, "E": 80}, ["B", "D", "E"]),
    Row("concepts-top-1", "concepts", {"A": 81, "B": 99, "C": 90}, ["B"]),
    Row("other-type-top-5", "topics", {t: 80.0 + i for i, t in enumerate("ABCDEFG")}, ["G", "F", "E", "D", "C"]),
    Row("tags-top-15", "tags", {f"T{i:02d}": 80.0 + i for i in range(17)}, [f"T{i:02d}" for i in range(16, 1, -1)]),
    # ties: equal confidences are ordered by title, so the same post always gets the same terms
    Row("tie-at-top-1", "concepts", {"Zeta": 95, "Alpha": 95, "Mid": 95}, ["Alpha"]),
    Row(
        "tie-across-top-2", "x", {"C": 90, "B": 90, "A": 90, "D": 91}, ["D", "A"], rule={"top": 2, "min_confidence": 50}
    ),
    # configured rules
    Row("custom-min-50", "tags", {"A": 50, "B": 49.99, "C": 60}, ["C", "A"], rule={"top": 5, "min_confidence": 50}),
    Row("custom-top-0", "tags", {"A": 100}, [], rule={"top": 0, "min_confidence": 0}),
    Row("custom-min-0", "tags", {"A": 0.0, "B": 0.0}, ["A", "B"], rule={"top": 9, "min_confidence": 0}),
    Row("custom-min-100", "tags", {"A": 100.0, "B": 99.99}, ["A"], rule={"top": 9, "min_confidence": 100}),
    Row("rule-for-an-odd-type", "Audience Level", {"A": 61, "B": 59}, ["A"], rule={"top": 1, "min_confidence": 60}),
    # people's terms count towards the cap (`top`, or `max_total` when set)
    Row("human-term-fills-top-1", "concepts", {"A": 99}, [], present=["Mine"], final=["Mine"], kept_human=["Mine"]),
    Row(
        "max-total-counts-human-terms",
        "tags",
        {"A": 90, "B": 85, "C": 80},
        ["A"],
        rule={"top": 3, "min_confidence": 50, "max_total": 2},
        present=["Mine"],
        final=["Mine", "A"],
        kept_human=["Mine"],
    ),
    Row(
        "max-total-above-top",
        "tags",
        {"A": 90, "B": 85, "C": 80},
        ["A", "B"],
        rule={"top": 2, "min_confidence": 50, "max_total": 5},
    ),
    Row("max-total-0", "tags", {"A": 100}, [], rule={"top": 5, "min_confidence": 0, "max_total": 0}),
    # human edits win
    Row("human-term-kept", "tags", {"A": 90}, ["A"], present=["Mine"], final=["Mine", "A"], kept_human=["Mine"]),
    Row(
        "human-term-kept-though-low",
        "tags",
        {"Mine": 10, "A": 90},
        ["A"],
        present=["Mine"],
        final=["Mine", "A"],
        kept_human=["Mine"],
    ),
    Row(
        "removed-by-a-person-not-readded",
        "tags",
        {"A": 99, "B": 90},
        ["B"],
        present=["B"],
        assigned=["A", "B"],
        final=["B"],
        removed_by_people=["A"],
    ),
    Row("removed-earlier-not-readded", "tags", {"A": 99}, [], removed_before=["A"], final=[], removed_by_people=["A"]),
    Row(
        "blocked-term-frees-its-slot",
        "concepts",
        {"A": 99, "B": 85},
        ["B"],
        removed_before=["A"],
        final=["B"],
        removed_by_people=["A"],
    ),
    Row("own-term-dropped-below-threshold", "tags", {"A": 79.99}, [], present=["A"], assigned=["A"], final=[]),
    Row(
        "own-terms-keep-their-order",
        "tags",
        {"A": 90, "B": 95},
        ["B", "A"],
        present=["A", "B"],
        assigned=["A", "B"],
        final=["A", "B"],
    ),
    Row(
        "human-term-also-selected",
        "tags",
        {"A": 95},
        ["A"],
        present=["A"],
        final=["A"],
        kept_human=["A"],
    ),
]


def judged(term_type: str, scores: dict[str, float]) -> list[Judgement]:
    """Judgements with these confidences (the rest of each judgement does not matter to selection)."""
    return [
        Judgement(
            type=term_type,
            term=term,
            scores={},
            confidence=value,
            level=level(value),
            reason="",
            definition_hash="d",
            content_hash="c",
            prompt_version="p",
            model="m",
            provider="test",
            judged_at="2026-01-01T00:00:00+00:00",
        )
        for term, value in scores.items()
    ]


def settings_for(row: Row, **values: Any) -> Settings:
    selection = {row.type: row.rule} if row.rule is not None else {}
    if selection:
        values["TAGGER_SELECTION"] = selection
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_select(row: Row) -> None:
    decision = select(
        row.type, judged(row.type, row.scores), row.present, row.assigned, row.removed_before, settings_for(row)
    )
    final = row.selected if row.final is None else row.final
    assert decision.selected == row.selected
    assert decision.final == final
    assert decision.added == [t for t in final if t not in row.present]
    assert decision.removed == [t for t in row.present if t not in final]
    assert decision.kept_human == row.kept_human
    assert decision.removed_by_people == row.removed_by_people


def test_a_type_without_a_rule_gets_the_catch_all_rule() -> None:
    settings = Settings(_env_file=None, TAGGER_SELECTION={"tags": {"top": 1, "min_confidence": 10}})  # type: ignore[call-arg]
    assert select("tags", judged("tags", {"A": 10, "B": 9.99}), [], [], [], settings).selected == ["A"]
    assert select("x", judged("x", {f"T{i}": 90 for i in range(7)}), [], [], [], settings).selected == [
        f"T{i}" for i in range(5)
    ]


# --- confidence and levels --------------------------------------------------------------------

CONFIDENCES = [
    # (sub-scores, weights or None for the defaults 15/25/25/15/10/10, confidence)
    ({"mentions": 10}, None, 15.0),
    ({"alignment": 10}, None, 25.0),
    ({"depth": 10}, None, 25.0),
    ({"intent": 10}, None, 15.0),
    ({"audience": 10}, None, 10.0),
    ({"signal": 10}, None, 10.0),
    ({"mentions": 10, "alignment": 10, "depth": 10, "intent": 10, "audience": 10, "signal": 10}, None, 100.0),
    ({"mentions": 8, "alignment": 8, "depth": 8, "intent": 8, "audience": 8, "signal": 8}, None, 80.0),
    ({"alignment": 10, "depth": 10, "intent": 10, "audience": 10, "signal": 10, "mentions": 8.66}, None, 97.99),
    ({"mentions": 10}, {"mentions": 50, "alignment": 50, "depth": 0, "intent": 0, "audience": 0, "signal": 0}, 50.0),
    # weights are normalised by their sum: 1/1/1/1/1/1 is an unweighted mean
    (
        {"mentions": 6, "signal": 0},
        {"mentions": 1, "alignment": 1, "depth": 1, "intent": 1, "audience": 1, "signal": 1},
        10.0,
    ),
    ({"signal": 10}, {"mentions": 0, "alignment": 0, "depth": 0, "intent": 0, "audience": 0, "signal": 3}, 100.0),
    ({"audience": 5}, {"mentions": 1, "alignment": 1, "depth": 1, "intent": 1, "audience": 2, "signal": 1}, 14.29),
]


@pytest.mark.parametrize(("subs", "weights", "expected"), CONFIDENCES)
def test_confidence_from_sub_scores_and_weights(
    subs: dict[str, float], weights: dict[str, float] | None, expected: float
) -> None:
    scores = TermScores.model_validate(scripted_entry("T", subs))
    assert confidence(scores, Weights(**weights) if weights else Weights()) == expected


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (100.0, "Primary"),
        (80.01, "Primary"),
        (80.0, "Primary"),
        (79.99, "Secondary"),
        (60.0, "Secondary"),
        (59.99, "Tertiary"),
        (40.0, "Tertiary"),
        (39.99, "Ignored"),
        (0.0, "Ignored"),
    ],
)
def test_levels(value: float, name: str) -> None:
    assert level(value) == name


@pytest.mark.parametrize("value", [79.99, 80.0, 80.01, 0.0, 100.0, 33.33])
def test_a_scripted_confidence_comes_back_exactly_under_any_weights(value: float) -> None:
    scores = TermScores.model_validate(scripted_entry("T", value))
    for weights in (Weights(), Weights(mentions=1, alignment=0, depth=0, intent=0, audience=0, signal=0)):
        assert confidence(scores, weights) == value


# --- end to end: the real SDK, the fake model scripted per term, the post on disk ----------------

WIP = Path("site/posts/limiting-wip.md")  # lists tags [Lean] and categories [] before tagger runs
E2E = [
    # (scripted confidences, settings, expected tags, categories and concepts on disk)
    (
        {"Kanban": 80.0, "Continuous Delivery": 79.99, "Technical Debt": 80.01, "Agile Product Management": 0},
        {},
        {"tags": ["Lean", "Technical Debt", "Kanban"], "categories": [], "concepts": []},
    ),
    (
        {"Flow and Kanban": 75.0, "DevOps": 74.99, "Product Management": 75.01, "Practice": 80, "Principle": 80},
        {},
        {"tags": ["Lean"], "categories": ["Product Management", "Flow and Kanban"], "concepts": ["Practice"]},
    ),
    (
        {"Kanban": 51, "Continuous Delivery": 50, "Technical Debt": 49.99, "DevOps": 100, "Principle": 99},
        {"TAGGER_SELECTION": {"tags": {"top": 2, "min_confidence": 50}, "concepts": {"top": 0, "min_confidence": 0}}},
        {"tags": ["Lean", "Kanban"], "categories": ["DevOps"], "concepts": []},
    ),
]


@pytest.mark.parametrize(("scripted", "overrides", "expected"), E2E, ids=["tags", "categories-concepts", "custom"])
def test_selection_end_to_end_through_the_fake_model(
    make_settings: MakeSettings,
    fake_llm: FakeLLM,
    site: Path,
    scripted: dict[str, float],
    overrides: dict[str, Any],
    expected: dict[str, list[str]],
) -> None:
    fake_llm.score(scripted, default=0)
    path = site / WIP
    result = make_classifier(make_settings(**overrides)).classify(path)
    post = read_post(path)
    assert {t: post.terms(t) for t in expected} == expected
    by_term = {j.term: j for j in result.judgements}
    for term, value in scripted.items():
        assert by_term[term].confidence == value
        assert by_term[term].level == level(value)
    assert load_record(path).assigned == {t: [x for x in v if x != "Lean"] for t, v in expected.items()}


def test_weights_setting_changes_what_is_selected(make_settings: MakeSettings, fake_llm: FakeLLM, site: Path) -> None:
    # Kanban is named (mentions 10) but the post is not about it; Technical Debt is the reverse.
    fake_llm.score(
        {
            "Kanban": {"mentions": 10, "alignment": 5, "depth": 5, "intent": 5, "audience": 10, "signal": 10},
            "Technical Debt": {"mentions": 0, "alignment": 10, "depth": 10, "intent": 10, "audience": 10, "signal": 10},
        },
        default=0,
    )
    path = site / WIP
    other = site / "site" / "posts" / "wip-copy.md"
    other.write_bytes(path.read_bytes())
    make_classifier(make_settings()).classify(path)  # default weights: Kanban 67.5, Technical Debt 85
    assert read_post(path).terms("tags") == ["Lean", "Technical Debt"]
    mentions_heavy = {"mentions": 60, "alignment": 10, "depth": 10, "intent": 10, "audience": 5, "signal": 5}
    make_classifier(make_settings(TAGGER_WEIGHTS=mentions_heavy)).classify(other)  # Kanban 85, Technical Debt 40
    assert read_post(other).terms("tags") == ["Lean", "Kanban"]


def test_naming_one_types_rule_keeps_the_other_types_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGGER_SELECTION", '{"tags": {"top": 2, "min_confidence": 90}}')
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.rule_for("tags") == SelectionRule(top=2, min_confidence=90)
    assert settings.rule_for("concepts") == DEFAULT_RULES["concepts"]
    assert settings.rule_for("categories") == DEFAULT_RULES["categories"]
    assert settings.rule_for("anything-else") == OTHER_TYPES_RULE
