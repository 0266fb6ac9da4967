"""The LLM's reply: its strict schema, the one check of the terms it names, and confidence from its sub-scores."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from worker.results import SUB_SCORES
from worker.settings import Weights


class TermScores(BaseModel):
    """One term's sub-scores (0-10) and a short reason, as the model must reply."""

    model_config = ConfigDict(extra="forbid")

    term: str
    mentions: float = Field(ge=0, le=10)
    alignment: float = Field(ge=0, le=10)
    depth: float = Field(ge=0, le=10)
    intent: float = Field(ge=0, le=10)
    audience: float = Field(ge=0, le=10)
    signal: float = Field(ge=0, le=10)
    reason: str = Field(max_length=600)


class ReplyBase(BaseModel):
    """Base of the per-call reply models: a list of judgements."""

    model_config = ConfigDict(extra="forbid")

    judgements: list[TermScores]


@lru_cache(maxsize=512)
def reply_model(names: tuple[str, ...]) -> type[ReplyBase]:
    """A strict reply model whose `term` may only be one of `names` (the terms asked about)."""
    term_type: Any = Literal[names]
    entry: Any = create_model("TermJudgement", __base__=TermScores, term=(term_type, ...))
    return create_model("Judgements", __base__=ReplyBase, judgements=(list[entry], ...))


NOT_RELEVANT = "not relevant"


def not_relevant(term: str) -> TermScores:
    """A term a `TAGGER_REPLY=relevant` reply left out: judged, every sub-score 0."""
    return TermScores(term=term, mentions=0, alignment=0, depth=0, intent=0, audience=0, signal=0, reason=NOT_RELEVANT)


def reply_problem(names: Sequence[str], got: Sequence[str], complete: bool = True) -> str | None:
    """Why the terms a reply names are not the terms asked (`names`, all of them when `complete`), or None.

    The one check of a reply's terms: the provider re-asks with its text, the classifier refuses what still fails.
    """
    unknown = [t for t in got if t not in names]
    missing = [n for n in names if n not in got] if complete else []
    repeated = sorted({n for n in got if got.count(n) > 1})
    problems = []
    if unknown:
        problems.append(f"terms that were not asked: {', '.join(unknown)}")
    if missing:
        problems.append(f"missing terms: {', '.join(missing)}")
    if repeated:
        problems.append(f"repeated terms: {', '.join(repeated)}")
    return "; ".join(problems) or None


def confidence(scores: TermScores, weights: Weights) -> float:
    """Confidence 0-100 computed from the sub-scores and weights, never by the model."""
    total = sum(getattr(weights, s) for s in SUB_SCORES)
    value: float = sum(getattr(scores, s) * getattr(weights, s) for s in SUB_SCORES) * 10 / total
    return round(value, 2)
