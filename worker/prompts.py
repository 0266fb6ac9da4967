"""Prompt templates, shipped as package data (`worker.templates`), versioned by their hash, static parts first."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from string import Template

from worker.errors import TemplateUnreadable
from worker.taxonomy import Term

# The repository's top-level prompts/ folder, installed as this package (pyproject.toml maps it): one copy.
TEMPLATE_PACKAGE = "worker.templates"
TEMPLATES = ("system", "term", "post", "reask")
SCOPE_CHARS = 160
# How definitions are compacted (`compact_scope`, `compact_item`): part of the prompt version, so a change to the
# rules below is a new version and the judgements made with the old ones are asked again. Bump it with the rules.
COMPACTION = "c2"
_KIND = r"(?:category|tag|concept|classification|category/tag|tag/category)"
# Lead-ins that say nothing about a term: a sentence naming only the term itself ("Use this category only for
# discussions on Scrum."), labels ("Scope and Purpose:") and openers ("This category is dedicated to exploring").
_ONLY_FOR = re.compile(
    rf"^use this {_KIND} (?:only |exclusively )?for (?:discussions? (?:on|of|about)|content (?:about|on|focused on)|"
    r"posts? (?:about|on)) (?P<what>[^.]*)\.\s*",
    re.I,
)
_SCOPE_LEADS = tuple(
    re.compile(p, re.I)
    for p in (
        r"^please ensure that the " + _KIND + r" '[^']*' is (?:only|exclusively|strictly) applied to content "
        r"(?:related to|that (?:is )?(?:about|on)) ",
        r"^(?:scope and purpose|scope|purpose)\s*:\s*",
        r"^(?:this|the [\w\s&-]{1,60}?) " + _KIND + r" (?:is (?:dedicated|devoted) to (?:exploring |discussing )?|"
        r"encompasses |focuses (?:on|upon) |covers |is strictly for |is for |includes )",
        r"^the " + _KIND + r" of [\w\s&-]{1,60}? (?:focuses (?:on|upon)|encompasses|covers|includes) ",
        r"^the (?:scope|purpose) of (?:this " + _KIND + r"|[\w\s&-]{1,60}?) (?:is to (?:explore |examine |discuss )?|"
        r"encompasses |includes |covers )",
    )
)
# Filler at the start of a key topic or an exclusion; the words after it are kept, every one of them.
_ITEM_LEADS = (
    re.compile(r"^the\s+", re.I),
    re.compile(r"^(?:role|importance|significance|use) of (?:the\s+)?", re.I),
    # "Content that focuses solely on X" -> "solely on X"; "Discussions on X" -> "X".
    re.compile(r"^(?:any\s+)?(?:content|discussions?|topics?|posts?)(?:\s+(?:that|which|on|about))?\s+(?=\w)", re.I),
)
_AUXILIARY_NOT = re.compile(r"^(?:do|does)\s+(?=not\b)", re.I)
# The post's budget (TAGGER_MAX_POST_TOKENS) is cut in characters, at 4 a token: a bound, not an estimate.
CHARS_PER_TOKEN = 4
# estimate_tokens: the pieces a BPE tokenizer seldom merges across. Fit to OpenAI's o200k_base tokenizer on the
# nkdagility corpus (posts, term definitions, reply schemas, replies) and a quarter of the hugo-docs pages; each
# within 10% in total (docs/benchmarks.md), where 4 characters a token overstated definitions by half.
_LETTERS = re.compile(r"[A-Za-z]+")
_NUMBERS = re.compile(r"\d{1,3}")
_SYMBOLS = re.compile(r"[^\sA-Za-z\d]")
LETTERS_PER_TOKEN = 9
TOKENS_PER_SYMBOL = 0.7
# TAGGER_REPLY: the templates' $reply_rule (system) and $reply_again (re-ask) for each reply shape.
REPLY_RULES = {
    "all": (
        'Reply with {"judgements": {type: {term title: entry}}}: for every listed term, and only for the listed '
        "terms, one entry under its type, keyed by the term's title exactly as listed. Each entry has:"
    ),
    "relevant": (
        'Reply with {"judgements": {type: [entry, ...]}}: entries only for the listed terms that apply to this '
        "post, at most one entry per term; leave out every term that does not apply (a term left out counts as "
        "scoring 0). Each entry has:\n- term: the term's title exactly as listed"
    ),
}
REPLY_AGAIN = {
    "all": "with exactly one entry for each listed term and no other terms",
    "relevant": "with at most one entry for each listed term that applies, and no other terms",
}


@dataclass(frozen=True)
class Templates:
    """The prompt templates and their combined version hash."""

    system: Template
    term: Template
    post: Template
    reask: Template
    version: str


@dataclass(frozen=True)
class PostText:
    """The parts of a post that the model reads."""

    title: str
    description: str
    body: str


# The terms one call asks about, by type: ((type, (title, ...)), ...), in the order the prompt lists them.
Groups = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Prompt:
    """One call's messages, the term titles it asks about, and what they came from."""

    messages: tuple[dict[str, str], ...]
    names: tuple[str, ...]
    terms: tuple[Term, ...]
    post: PostText
    reply: str = "all"

    @property
    def groups(self) -> Groups:
        """The titles asked, by type (a call may ask about the terms of several types)."""
        types = dict.fromkeys(t.type for t in self.terms)
        return tuple((k, tuple(t.title for t in self.terms if t.type == k)) for k in types)


def estimate_tokens(text: str) -> int:
    """Tokens in `text`, estimated without a tokenizer (none to download): a token per word of up to 9 letters
    (one per 9 letters beyond), per number of up to 3 digits, per letter of another script, 0.7 per symbol."""
    words = sum((len(w) + LETTERS_PER_TOKEN - 1) // LETTERS_PER_TOKEN for w in _LETTERS.findall(text))
    symbols = _SYMBOLS.findall(text)
    wide = sum(1 for c in symbols if not c.isascii())  # CJK, accented letters: about a token each
    return round(words + len(_NUMBERS.findall(text)) + wide + TOKENS_PER_SYMBOL * (len(symbols) - wide)) + 1


def template_files(folder: Path | None = None) -> dict[str, Traversable]:
    """Where each template is read from: `folder` (TAGGER_PROMPTS_DIR) if given, else the installed package."""
    source: Traversable = folder if folder is not None else resources.files(TEMPLATE_PACKAGE)
    return {name: source / f"{name}.md" for name in TEMPLATES}


def template_paths(folder: Path | None = None) -> list[Path]:
    """The template files as paths on disk, to notice edits (none when the package is inside a zip)."""
    return [f for f in template_files(folder).values() if isinstance(f, Path)]


def load_templates(folder: Path | None = None) -> Templates:
    """Read the templates; the version changes whenever any of them does."""
    texts: dict[str, str] = {}
    for name, file in template_files(folder).items():
        try:
            texts[name] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            needed = ", ".join(f"{n}.md" for n in TEMPLATES)
            origin = "TAGGER_PROMPTS_DIR" if folder is not None else f"the installed package {TEMPLATE_PACKAGE}"
            raise TemplateUnreadable(
                f"prompt template unreadable: {reason} (from {origin}, which needs {needed})", path=str(file)
            ) from exc
    digest = hashlib.sha256("\x1e".join(texts[n] for n in TEMPLATES).encode("utf-8")).hexdigest()[:12]
    return Templates(**{n: Template(t) for n, t in texts.items()}, version=f"p-{digest}")


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    sentence_end = cut.rfind(". ")
    return cut[: sentence_end + 1] if sentence_end > limit // 2 else cut.rsplit(" ", 1)[0] + "…"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def compact_scope(title: str, scope: str) -> str:
    """A term's scope without its lead-ins (a sentence naming only the term, labels, openers), then clipped."""
    text = scope.strip()
    only = _ONLY_FOR.match(text)
    named = only.group("what").strip(" '\"*").casefold() if only else ""
    if only and named in (title.casefold(), f"{title.casefold()}s"):  # "Tool": "... discussions on Tools."
        text = text[only.end() :]
    changed = True
    while changed:  # "Scope and Purpose: This category is dedicated to exploring ..." has two
        changed = False
        for lead in _SCOPE_LEADS:
            shorter = lead.sub("", text, count=1)
            if shorter != text and shorter.strip():
                text, changed = _capital(shorter.strip()), True
    return _clip(text or scope.strip(), SCOPE_CHARS)


def compact_item(item: str) -> str:
    """A key topic or an exclusion without its filler lead-in and final period; every other word is kept."""
    text = " ".join(item.split()).rstrip(".;").strip()
    for lead in _ITEM_LEADS:
        shorter = lead.sub("", text, count=1)
        if shorter.strip():
            text = shorter
    return _AUXILIARY_NOT.sub("", text)


def prompt_version(
    templates: Templates,
    definitions: str = "compact",
    reply: str = "all",
    mode: str = "json_schema",
    packed: bool = True,
) -> str:
    """The version judgements are cached under: everything that changes a judgement's prompt.

    The templates' hash, the definitions and how they are compacted (COMPACTION), the reply shape, the structured-
    output mode (without a strict schema the schema rides in the system message) and whether types share a call.
    """
    shape = f"{definitions}.{COMPACTION}" if definitions == "compact" else definitions
    return "-".join((templates.version, shape, reply, mode, "packed" if packed else "per-type"))


def render_term(templates: Templates, term: Term, definitions: str = "compact") -> str:
    """A term's definition: compact (its scope, every key topic and every exclusion, lead-ins and filler dropped)
    or `full` (its whole Instructions text). Deterministic: the same term gives the same bytes (the prefix cache)."""
    if definitions == "full":
        return f"## {term.title}\n{term.instructions.strip()}"
    return templates.term.safe_substitute(
        title=term.title,
        scope=compact_scope(term.title, term.scope),
        key_topics="; ".join(compact_item(t) for t in term.key_topics) or "(none listed)",
        exclusions="; ".join(compact_item(e) for e in term.exclusions) or "(none listed)",
    ).strip()


def build_prompt(
    templates: Templates, terms: Sequence[Term], post: PostText, definitions: str = "compact", reply: str = "all"
) -> Prompt:
    """Messages for judging `post` against `terms` (of one type or several): rubric and terms first, post last.

    The definitions of every type come first, grouped by type, and the post once, last: a post's tokens are
    paid once per call, not once per type.
    """
    types = list(dict.fromkeys(t.type for t in terms))
    rendered = "\n\n".join(
        f'Terms of type "{term_type}":\n\n'
        + "\n\n".join(render_term(templates, t, definitions) for t in terms if t.type == term_type)
        for term_type in types
    )
    rule = REPLY_RULES[reply]
    system = templates.system.safe_substitute(term_type=", ".join(types), terms=rendered, reply_rule=rule).strip()
    if "$reply_rule" not in templates.system.template and reply != "all":
        system += f"\n\n{rule.removesuffix(' Each entry has:')}"  # own templates written before TAGGER_REPLY
    user = templates.post.safe_substitute(title=post.title, description=post.description, body=post.body).strip()
    return Prompt(
        messages=({"role": "system", "content": system}, {"role": "user", "content": user}),
        names=tuple(t.title for t in terms),
        terms=tuple(terms),
        post=post,
        reply=reply,
    )


def reask_message(templates: Templates, error: str, reply: str = "all") -> dict[str, str]:
    """The follow-up message that carries a validation error back to the model."""
    text = templates.reask.safe_substitute(error=error[:2000], reply_again=REPLY_AGAIN[reply])
    return {"role": "user", "content": text.strip()}
