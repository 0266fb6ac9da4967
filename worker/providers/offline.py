"""The offline provider: a deterministic word-overlap baseline, not an LLM."""

from __future__ import annotations

import re
from collections import Counter

from worker.prompts import Prompt
from worker.providers.base import Reply
from worker.reply import TermScores
from worker.results import Usage

OFFLINE_NOTE = (
    "tagger: using the offline provider: a rough word-overlap baseline, not an LLM "
    "(set OPENAI_API_KEY or OPENAI_BASE_URL, or TAGGER_PROVIDER, to use a model)"
)


_WORD = re.compile(r"[a-z][a-z0-9+#-]{2,}")
_STOP = frozenset(
    [
        "the",
        "and",
        "for",
        "with",
        "that",
        "this",
        "from",
        "into",
        "their",
        "about",
        "what",
        "which",
        "when",
        "where",
        "how",
        "are",
        "was",
        "were",
        "been",
        "have",
        "has",
        "not",
        "but",
        "all",
        "any",
        "can",
        "its",
        "use",
        "used",
        "using",
        "such",
        "than",
        "them",
        "they",
        "these",
        "those",
        "more",
        "most",
        "other",
        "some",
        "only",
        "also",
        "should",
        "would",
        "could",
        "will",
        "may",
        "might",
        "must",
        "each",
        "within",
        "across",
        "between",
        "through",
        "over",
        "under",
        "discussions",
        "content",
        "category",
        "categories",
        "topics",
        "topic",
        "include",
        "including",
        "related",
        "practices",
        "practice",
        "role",
    ]
)


def _words(text: str) -> list[str]:
    return [w.rstrip("s") for w in _WORD.findall(text.lower()) if w not in _STOP]


class OfflineProvider:
    """Deterministic, local, no network: scores by overlap with each term's title and key topics.

    A rough baseline for demos and dry runs, not an LLM.
    """

    name = "offline"
    model = "offline-overlap-v1"

    def judge(self, prompt: Prompt) -> Reply:
        """Score each term from word overlap between the post and the term's definition."""
        text = f"{prompt.post.title}\n{prompt.post.description}\n{prompt.post.body}".lower()
        counts = Counter(_words(text))
        total = max(1, sum(counts.values()))
        judgements = []
        for term in prompt.terms:
            phrase_hits = len(re.findall(rf"(?<![a-z0-9]){re.escape(term.title.lower())}(?![a-z0-9])", text))
            vocabulary = set(_words(" ".join(term.key_topics) + " " + term.scope)) or set(_words(term.title))
            matched = [w for w in vocabulary if counts[w]]
            coverage = len(matched) / max(1, len(vocabulary))
            density = sum(counts[w] for w in matched) / total
            title_words = set(_words(term.title))
            in_title = bool(title_words & set(_words(prompt.post.title)))
            named = len(title_words & set(counts)) / max(1, len(title_words))
            mentions = min(10.0, phrase_hits * 2.5 + named * 4)
            alignment = min(10.0, coverage * 20)
            depth = min(10.0, density * 60)
            intent = min(10.0, (4.0 if in_title else 0.0) + mentions / 3 + coverage * 8)
            judgements.append(
                TermScores(
                    term=term.title,
                    type=term.type,  # a call may ask two types that share a title (a category and a tag "Scrum")
                    mentions=round(mentions, 1),
                    alignment=round(alignment, 1),
                    depth=round(depth, 1),
                    intent=round(intent, 1),
                    audience=round(alignment * 0.9, 1),
                    signal=round(min(10.0, (alignment + depth) / 2), 1),
                    reason=f"offline overlap: title named {phrase_hits}x, {len(matched)}/{len(vocabulary)} topic words",
                )
            )
        return Reply(judgements=judgements, usage=Usage(calls=1), raw="")
