"""The LLM's reply: its strict schema, the one check of the terms it names, and confidence from its sub-scores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker import untrusted
from worker.prompts import Groups, estimate_tokens
from worker.results import SUB_SCORES
from worker.settings import Weights

# A reason is read up to REASON_CHARS (a server that ignores maxLength is not failed for a long one); the schema asks
# for at most REASON_ASKED_CHARS, and the prompt for 12 words: what the estimate counts an entry's reason as.
REASON_CHARS = 600
REASON_ASKED_CHARS = 80
# The most a reply may hold (gpt-4o's and gpt-4o-mini's maximum completion tokens): a chunk whose reply could pass
# it is split.
MAX_REPLY_TOKENS = 16_384
# TAGGER_REQUEST_TIMEOUT is for a call of up to this many terms; a call asking more waits proportionally longer
# (its reply takes longer to write).
TIMEOUT_TERMS = 60
# What one term's entry holds besides its sub-scores.
ENTRY_FIELDS = (*SUB_SCORES, "reason")


class Scores(BaseModel):
    """One entry of a reply: the sub-scores and the reason (any number 0-10 is read; the schema asks integers)."""

    model_config = ConfigDict(extra="forbid")

    mentions: float = Field(ge=0, le=10)
    alignment: float = Field(ge=0, le=10)
    depth: float = Field(ge=0, le=10)
    intent: float = Field(ge=0, le=10)
    audience: float = Field(ge=0, le=10)
    signal: float = Field(ge=0, le=10)
    reason: str = Field(max_length=REASON_CHARS)


class TermScores(Scores):
    """One term's sub-scores (0-10) and a short reason, as the model must reply."""

    term: str
    type: str = ""  # the term's type, when the reply says it (a call asking several types)


class Entry(Scores):
    """An entry of a `TAGGER_REPLY=relevant` reply, which names its term."""

    term: str


class AllReply(BaseModel):
    """`TAGGER_REPLY=all`: per type, one entry keyed by each term's title."""

    model_config = ConfigDict(extra="forbid")

    judgements: dict[str, dict[str, Scores]]


class RelevantReply(BaseModel):
    """`TAGGER_REPLY=relevant`: per type, entries for the terms that apply."""

    model_config = ConfigDict(extra="forbid")

    judgements: dict[str, list[Entry]]


def _closed(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


@lru_cache(maxsize=512)
def _reply_schema(groups: Groups, reply: str) -> str:
    score = {"type": "integer", "enum": list(range(11))}
    scores = {name: {"$ref": "#/$defs/score"} for name in SUB_SCORES}
    reason = {"type": "string", "maxLength": REASON_ASKED_CHARS}
    defs: dict[str, Any] = {"score": score}
    if reply == "all":
        # One required property per term: a strict server or a grammar cannot leave a term out, repeat or add one.
        defs["entry"] = _closed({**scores, "reason": reason})
        per_type = {t: _closed({title: {"$ref": "#/$defs/entry"} for title in titles}) for t, titles in groups}
    else:
        per_type = {
            t: {
                "type": "array",
                "items": _closed({"term": {"type": "string", "enum": list(titles)}, **scores, "reason": reason}),
                "maxItems": len(titles),
            }
            for t, titles in groups
        }
    return json.dumps({**_closed({"judgements": _closed(per_type)}), "$defs": defs})


# A reason as the prompt asks it: words, not one 80-letter run (a tokenizer counts a word, not its letters).
_REASON_WORDS = ("the post applies this term's key topics to its own teams in detail " * 2)[:REASON_ASKED_CHARS]


def entry_tokens(reply: str, title: str) -> int:
    """Tokens of one entry at most, as the schema asks it: two-digit sub-scores, a reason of its maxLength."""
    entry: dict[str, Any] = {**dict.fromkeys(SUB_SCORES, 10), "reason": _REASON_WORDS}
    text = json.dumps({title: entry})[1:-1] if reply == "all" else json.dumps({"term": title, **entry})
    return estimate_tokens(text + ", ")


def reply_tokens(groups: Groups, reply: str = "all", share: float = 1.0) -> int:
    """Output tokens of a reply to `groups` at most (`share`: of the terms that get an entry)."""
    entries = sum(entry_tokens(reply, title) for _, titles in groups for title in titles)
    envelope = estimate_tokens('{"judgements": {}}' + "".join(f'"{t}": [], ' for t, _ in groups))
    return round(entries * share + envelope)


def call_timeout(request_timeout: float, terms: int) -> float:
    """A call's timeout: TAGGER_REQUEST_TIMEOUT for up to TIMEOUT_TERMS terms, proportionally more beyond."""
    return request_timeout * max(1.0, terms / TIMEOUT_TERMS)


def reply_schema(groups: Groups, reply: str = "all") -> dict[str, Any]:
    """The reply's JSON schema, in OpenAI's strict subset and enforceable by a grammar.

    Sub-scores are integer enums 0-10 (a grammar ignores minimum/maximum), one shared definition; with `all`,
    each type is an object with one required property per term asked, keyed by its title.
    """
    schema: dict[str, Any] = json.loads(_reply_schema(groups, reply))
    return schema


# OpenAI's documented limits for a strict schema (Structured Outputs, "Supported schemas"; read again 2026-12-06,
# unchanged): 5,000 object
# properties in all, 10 levels of nesting, 1,000 enum values in all, 120,000 characters of property names, definition
# names, enum and const values in all, and 15,000 characters for the values of an enum of more than 250 values.
MAX_PROPERTIES, MAX_NESTING, MAX_ENUM_VALUES, MAX_NAME_CHARS = 5000, 10, 1000, 120_000
LARGE_ENUM, LARGE_ENUM_CHARS = 250, 15_000


def _titles(node: dict[str, Any]) -> tuple[str, ...]:
    """The titles a type's node of a reply schema asks: its properties (`all`) or its items' enum (`relevant`)."""
    enum = ((node.get("items") or {}).get("properties") or {}).get("term", {}).get("enum") or []
    return tuple(node.get("properties") or enum)


def over_limits(schema: dict[str, Any]) -> str | None:
    """Which of OpenAI's strict-mode limits `schema` passes, or None (definitions are counted once); and whether a
    reply in it could pass MAX_REPLY_TOKENS."""
    properties = enum_values = name_chars = 0
    deepest = 0
    large_enum = ""

    def walk(node: Any, depth: int) -> None:
        nonlocal properties, enum_values, name_chars, deepest, large_enum
        if not isinstance(node, dict):
            return
        deepest = max(deepest, depth)
        props = node.get("properties") or {}
        properties += len(props)
        name_chars += sum(len(k) for k in props)
        values = node.get("enum") or []
        enum_values += len(values)
        chars = sum(len(str(v)) for v in values)
        name_chars += chars
        if len(values) > LARGE_ENUM and chars > LARGE_ENUM_CHARS:
            large_enum = f"an enum of {len(values)} values holds {chars} characters (at most {LARGE_ENUM_CHARS})"
        for name, sub in (node.get("$defs") or {}).items():
            name_chars += len(name)
            walk(sub, depth)
        for sub in props.values():
            walk(sub, depth + 1)
        if "items" in node:
            walk(node["items"], depth + 1)
        for sub in node.get("anyOf") or []:
            walk(sub, depth)

    walk(schema, 1)
    per_type = (schema.get("properties", {}).get("judgements") or {}).get("properties") or {}
    groups = tuple((t, _titles(node)) for t, node in per_type.items())
    most = reply_tokens(groups, "all")  # every term may get an entry (a `relevant` reply may name them all)
    problems = [
        f"a reply of up to {most} tokens (at most {MAX_REPLY_TOKENS})" if most > MAX_REPLY_TOKENS else "",
        f"{properties} properties (at most {MAX_PROPERTIES})" if properties > MAX_PROPERTIES else "",
        f"{deepest} levels of nesting (at most {MAX_NESTING})" if deepest > MAX_NESTING else "",
        f"{enum_values} enum values (at most {MAX_ENUM_VALUES})" if enum_values > MAX_ENUM_VALUES else "",
        f"{name_chars} characters of names and values (at most {MAX_NAME_CHARS})"
        if name_chars > MAX_NAME_CHARS
        else "",
        large_enum,
    ]
    return "; ".join(p for p in problems if p) or None


NOT_RELEVANT = "not relevant"


def not_relevant(term: str, term_type: str = "") -> TermScores:
    """A term a `TAGGER_REPLY=relevant` reply left out: judged, every sub-score 0."""
    return TermScores(
        term=term, mentions=0, alignment=0, depth=0, intent=0, audience=0, signal=0, reason=NOT_RELEVANT, type=term_type
    )


def reply_problem(names: Sequence[str], got: Sequence[str], complete: bool = True) -> str | None:
    """Why the terms a reply names are not the terms asked (`names`, all of them when `complete`), or None."""
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


@dataclass(frozen=True)
class ParsedReply:
    """A reply read against the terms asked: its entries (each with its type), or why it is not usable."""

    judgements: list[TermScores]
    error: str | None = None


def parse_reply(content: str, groups: Groups, reply: str = "all") -> ParsedReply:
    """Read a reply's JSON for the terms asked; every unknown, missing or repeated term is an error."""
    model: type[AllReply] | type[RelevantReply] = AllReply if reply == "all" else RelevantReply
    try:
        # Not strict about control characters inside strings: llama.cpp's JSON grammar lets a raw newline into a
        # reason (seen on llama-cpp-python), which says nothing about the judgement.
        data = untrusted.loads(content, strict=False)
    except ValueError as exc:
        return ParsedReply([], f"invalid JSON: {exc}")
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        return ParsedReply([], "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:8]))
    asked = dict(groups)
    problems = []
    unknown_types = [t for t in parsed.judgements if t not in asked]
    if unknown_types:
        problems.append(f"types that were not asked: {', '.join(unknown_types)}")
    missing_types = [t for t in asked if t not in parsed.judgements]
    if missing_types and reply == "all":
        problems.append(f"missing types: {', '.join(missing_types)}")
    entries: list[TermScores] = []
    for term_type, titles in groups:
        given = parsed.judgements.get(term_type)
        if given is None:
            continue
        if isinstance(given, dict):
            got = list(given)
            entries += [TermScores(term=t, type=term_type, **v.model_dump()) for t, v in given.items()]
        else:
            got = [e.term for e in given]
            entries += [TermScores(type=term_type, **e.model_dump()) for e in given]
        problem = reply_problem(titles, got, complete=reply == "all")
        if problem:
            problems.append(f"{term_type}: {problem}" if len(groups) > 1 else problem)
    return ParsedReply([] if problems else entries, "; ".join(problems) or None)


def confidence(scores: TermScores, weights: Weights) -> float:
    """Confidence 0-100 computed from the sub-scores and weights, never by the model."""
    total = sum(getattr(weights, s) for s in SUB_SCORES)
    value: float = sum(getattr(scores, s) * getattr(weights, s) for s in SUB_SCORES) * 10 / total
    return round(value, 2)
