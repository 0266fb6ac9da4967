"""The LLM's reply schema, and judgements scored in code from its sub-scores."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from worker.settings import Weights

SUB_SCORES = ("mentions", "alignment", "depth", "intent", "audience", "signal")
LEVELS = (("Primary", 80.0), ("Secondary", 60.0), ("Tertiary", 40.0))


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


def missing_or_repeated(reply: ReplyBase, names: Sequence[str], complete: bool = True) -> str | None:
    """Why a schema-valid reply still does not answer the terms asked (all of them when `complete`), or None."""
    got = [j.term for j in reply.judgements]
    missing = [n for n in names if n not in got] if complete else []
    repeated = sorted({n for n in got if got.count(n) > 1})
    problems = []
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


def level(value: float) -> str:
    """Primary >= 80, Secondary >= 60, Tertiary >= 40, else Ignored."""
    return next((name for name, floor in LEVELS if value >= floor), "Ignored")


class Usage(BaseModel):
    """Tokens one or more calls used."""

    calls: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0

    def add(self, other: Usage) -> Usage:
        """The sum of two usages."""
        return Usage(
            calls=self.calls + other.calls,
            input_tokens=self.input_tokens + other.input_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


class Judgement(BaseModel):
    """One term judged for one post, as kept in the result record (and the cache key)."""

    type: str
    term: str
    scores: dict[str, float]
    confidence: float
    level: str
    reason: str
    definition_hash: str
    content_hash: str
    prompt_version: str
    model: str
    provider: str
    judged_at: str

    def cache_key(self) -> tuple[str, str, str, str]:
        """What must be unchanged for this judgement to be reused."""
        return (self.definition_hash, self.content_hash, self.prompt_version, self.model)


class Decision(BaseModel):
    """What tagger decided for one type of one post."""

    type: str
    selected: list[str]
    final: list[str]
    added: list[str]
    removed: list[str]
    kept_human: list[str]
    removed_by_people: list[str]  # terms tagger assigned that people removed (now or before): never re-added
    assigned: list[str] = Field(default_factory=list)
    retired: list[str] = Field(default_factory=list)


class Classification(BaseModel):
    """The whole result for one post: judgements, decisions and what was written."""

    post: str
    content_hash: str
    judgements: list[Judgement]
    decisions: list[Decision]
    assigned: dict[str, list[str]]
    removed_by_people: dict[str, list[str]]
    usage: Usage
    cached_terms: int
    llm_seconds: float = 0.0
    truncated_chars: int = 0
    written: bool = False
    human_only: bool = False
    skipped: str = ""
    diff: str = ""
