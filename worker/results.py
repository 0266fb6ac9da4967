"""What classifying gives: judgements, token usage, per-type decisions, a post's whole result, a remote job's."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

SUB_SCORES = ("mentions", "alignment", "depth", "intent", "audience", "signal")
LEVELS = (("Primary", 80.0), ("Secondary", 60.0), ("Tertiary", 40.0))


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


@dataclass(frozen=True)
class Judged:
    """What judging a post's terms gave: judgements (cached where still valid) and what it took."""

    judgements: list[Judgement]
    usage: Usage
    cached: int  # judgements reused from the record
    cut_chars: int  # characters the token budget cut from the post
    llm_seconds: float


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


class RemoteResult(BaseModel):
    """A remote job's result: what to change in the post's owned keys and its new record.

    The worker builds it (worker/queue/remote.py) and `apply` reads it back from Redis (worker/result_check.py),
    so it is strict: exactly these fields, each of exactly its type, no coercion.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    post: StrictStr
    content_hash: StrictStr  # of the post the job judged
    file_hash: StrictStr  # of the bytes the job judged
    new_file_hash: StrictStr  # of the post once changed ("" when nothing changes)
    changes: dict[StrictStr, list[StrictStr] | StrictStr | None]  # as posts.Change: None removes a key
    added: dict[StrictStr, list[StrictStr]]
    removed: dict[StrictStr, list[StrictStr]]
    record: StrictStr  # the new record, as its JSON text
    calls: StrictInt = 0
    tokens: StrictInt = 0
