"""Terms and the taxonomy they form, loaded from one markdown file per term, and checked against the posts."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import frontmatter
import yaml
from frontmatter.default_handlers import YAMLHandler

from worker.errors import BadPost, TaggerError, TaxonomyError
from worker.posts import MAX_FRONT_MATTER_BYTES, parse_header, read_post
from worker.settings import Settings

TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# Keys a post uses for something other than a list of terms (Hugo's, Jekyll's and tagger's own): a type named
# after one would make tagger rewrite a post's title or draft flag as a list of terms.
RESERVED_KEYS = frozenset(
    k.casefold()
    for k in (
        "title", "date", "draft", "slug", "description", "aliases", "weight", "lastmod", "publishDate",
        "expiryDate", "url", "layout", "type", "kind", "summary", "keywords", "linkTitle", "menu", "menus",
        "outputs", "resources", "cascade", "build", "headless", "isCJKLanguage", "markup", "translationKey",
        "params", "sitemap", "images", "videos", "audio", "permalink", "published", "excerpt", "lang", "language",
        "author", "toc", "id", "ClassificationType", "ClassificationContentOrigin", "Instructions",
    )
)  # fmt: skip
_HEADING = re.compile(r"^\s*(\*\*|__|#+\s*)?(?P<label>[^*:_#]{0,80}?)\s*(\*\*|__)?\s*:?\s*(\*\*|__)?\s*:?\s*$")
_KEY_TOPICS = re.compile(r"key\s+topics", re.I)
_EXCLUDE = re.compile(r"(strictly\s+exclude|strict\s+exclusions|exclusions|exclude)", re.I)
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(?P<text>.+)$")
_MARKUP = re.compile(r"\*\*|__|`")
# A line `tagger init` wrote for a person to replace: never sent in a prompt, and `taxonomy check` names it.
PLACEHOLDER = re.compile(r"^TODO\b")
HOW_TO_FILL = {
    "scope": "write one or two sentences at the top of Instructions on the content this term is for",
    "topics": "list three to five topics a post about it covers, as bullets under a **Key Topics:** line",
    "exclude": "list what looks related but is not about it, as bullets under a **Strictly exclude:** line",
}


def _clean(text: str) -> str:
    return " ".join(_MARKUP.sub("", text).split()).strip(" -*")


@dataclass(frozen=True)
class Term:
    """One taxonomy term: identified by its type and title together."""

    title: str
    type: str
    slug: str
    instructions: str
    scope: str
    key_topics: tuple[str, ...]
    exclusions: tuple[str, ...]
    origin: str
    path: str
    definition_hash: str
    declared_type: bool = True

    @property
    def key(self) -> str:
        """Stable identifier, unique within a taxonomy."""
        return f"{self.type}/{self.title}"


@dataclass
class Taxonomy:
    """The set of terms tagger may assign, grouped by type."""

    terms: list[Term]
    problems: list[str] = field(default_factory=list)

    def types(self) -> list[str]:
        """Types in first-seen order."""
        return list(dict.fromkeys(t.type for t in self.terms))

    def of_type(self, term_type: str) -> list[Term]:
        """The terms of one type."""
        return [t for t in self.terms if t.type == term_type]

    def get(self, term_type: str, title: str) -> Term | None:
        """The term with this type and title, if any."""
        return next((t for t in self.terms if t.type == term_type and t.title == title), None)

    def __iter__(self) -> Iterator[Term]:
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)


def placeholders(text: str) -> list[str]:
    """The parts of an Instructions text (`scope`, `topics`, `exclude`) that still hold a TODO placeholder."""
    found: list[str] = []
    split_instructions(text, found)
    return list(dict.fromkeys(found))


def split_instructions(text: str, placeholders_found: list[str] | None = None) -> tuple[str, list[str], list[str]]:
    """Split an Instructions text into a scope, its key topics and its exclusions (placeholder lines left out)."""
    scope: list[str] = []
    topics: list[str] = []
    exclusions: list[str] = []
    section = "scope"
    prose = False  # the exclusions written as a paragraph under their heading, not as bullets
    for line in text.splitlines():
        bullet = _BULLET.match(line)
        heading = None if bullet else _HEADING.match(line)
        if heading and _KEY_TOPICS.search(heading.group("label") or ""):
            section = "topics"
            continue
        if not bullet and _EXCLUDE.match(_clean(line)):
            section = "exclude"
            rest = _EXCLUDE.split(_clean(line), maxsplit=1)[-1].strip(" :-")
            if rest:
                exclusions.append(rest)
            prose = bool(rest)  # "**Strictly exclude** discussions that ..." may go on on the next line
            continue
        if PLACEHOLDER.match(_clean(bullet.group("text") if bullet else line)):
            if placeholders_found is not None:
                placeholders_found.append("scope" if section == "after" else section)
            continue
        if bullet:
            item = _clean(bullet.group("text"))
            {"topics": topics, "exclude": exclusions, "scope": scope}[section].append(item)
            prose = False
        elif line.strip():
            if section == "topics" and topics:
                section = "after"  # prose after the topic list is neither scope nor a topic
            if section in ("scope", "after"):
                scope.append(_clean(line))
            elif section == "exclude" and (prose or not exclusions) and not line.rstrip().endswith(":"):
                # "**Strictly exclude:**" then a paragraph: that paragraph is the exclusion (prose after bullets
                # is not, such as "Ensure that all discussions remain focused ...", nor "Do not use it for:").
                if prose:
                    exclusions[-1] = f"{exclusions[-1]} {_clean(line)}"
                else:
                    exclusions.append(_clean(line))
                prose = True
        else:
            prose = False
    return " ".join(s for s in scope if s), topics, exclusions


def _term_type(meta: dict[str, Any], path: Path) -> str:
    declared = meta.get("ClassificationType")
    if isinstance(declared, str) and declared.strip():
        return declared.strip()
    folder = path.parent.parent if path.name == "_index.md" else path.parent
    return folder.name


def _slug(meta: dict[str, Any], path: Path) -> str:
    if isinstance(meta.get("slug"), str):
        return str(meta["slug"])
    return path.parent.name if path.name == "_index.md" else path.stem


class _BoundedYAML(YAMLHandler):
    """python-frontmatter's YAML handler with the posts' bounded parser (alias bombs refused)."""

    def load(self, fm: str, **kwargs: object) -> Any:
        return parse_header(Path("<term>"), "yaml", fm)


def term_from_file(path: Path) -> tuple[Term | None, list[str]]:
    """Parse one term file; returns the term (None when unusable) and its problems."""
    try:
        if path.stat().st_size > MAX_FRONT_MATTER_BYTES * 4:
            return None, [f"unreadable front matter (file is over {MAX_FRONT_MATTER_BYTES * 4} bytes)"]
        post = frontmatter.load(str(path), handler=_BoundedYAML())
    except BadPost as exc:
        return None, [f"unreadable front matter ({exc.message})"]
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, OSError) as exc:
        return None, [f"unreadable front matter ({type(exc).__name__}: {str(exc).splitlines()[0]})"]
    meta = dict(post.metadata)
    problems: list[str] = []
    title = meta.get("title")
    if not isinstance(title, str) or not title.strip():
        return None, ["no title"]
    instructions = meta.get("Instructions")
    if not isinstance(instructions, str) or not instructions.strip():
        problems.append(
            "no Instructions: add `Instructions: |-` with a scope, key topics and exclusions"
            f" ({HOW_TO_FILL['scope']}; then {HOW_TO_FILL['topics']}; then {HOW_TO_FILL['exclude']})"
        )
        instructions = ""
    todo = placeholders(instructions)
    for part in todo:
        problems.append(f"TODO left in Instructions ({part}): {HOW_TO_FILL[part]}")
    scope, topics, exclusions = split_instructions(instructions)
    if instructions and not topics and "topics" not in todo:
        problems.append(f"no key topics in Instructions: {HOW_TO_FILL['topics']}")
    if not scope:
        description = meta.get("description")
        scope = _clean(description) if isinstance(description, str) else title
    term_type = _term_type(meta, path)
    declared = meta.get("ClassificationType")
    if declared is not None and not (isinstance(declared, str) and TYPE_NAME.match(declared.strip())):
        problems.append(f"unknown ClassificationType {declared!r}")
        return None, problems
    origin = str(meta.get("ClassificationContentOrigin") or "Human")
    digest = hashlib.sha256("\x1f".join([term_type, title.strip(), instructions, scope]).encode("utf-8")).hexdigest()[
        :16
    ]
    term = Term(
        title=title.strip(),
        type=term_type,
        slug=_slug(meta, path),
        instructions=instructions,
        scope=scope,
        key_topics=tuple(topics),
        exclusions=tuple(exclusions),
        origin=origin,
        path=str(path),
        definition_hash=digest,
        declared_type=declared is not None,
    )
    return term, problems


def type_problem(term_type: str) -> str | None:
    """Why `term_type` cannot be a classification type (its key would clash with a post's own keys), or None."""
    if not TYPE_NAME.match(term_type):
        return f"'{term_type}' is not a valid type name"
    if term_type.casefold() in RESERVED_KEYS:
        return f"type '{term_type}' is a reserved front-matter key (posts use it for something else)"
    return None


def _term_files(root: Path) -> Iterable[Path]:
    """Term files under `root`; files and folders whose name starts with a dot (`.archive/`) are not terms."""
    return sorted(
        p
        for p in root.rglob("*.md")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def load_taxonomy(root: Path, known_types: Iterable[str] = ()) -> Taxonomy:
    """Load every term file under `root`; problems are collected, unusable files skipped."""
    if not root.is_dir():
        raise TaxonomyError(
            f"no taxonomy folder at {root.absolute()}: set TAGGER_TAXONOMY_DIR or give it on the command line"
            " (the folder of term files, one markdown file per term)",
            path=root,
        )
    terms: list[Term] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    loaded: list[tuple[Path, Term]] = []
    for path in _term_files(root):
        term, term_problems = term_from_file(path)
        problems.extend(f"{path}: {p}" for p in term_problems)
        if term is not None:
            loaded.append((path, term))
    declared = {t.type for _, t in loaded if t.declared_type} | set(known_types)
    # Hugo reads front-matter keys ignoring case: of spellings of one type, the one most terms use is the type.
    uses = Counter(t.type for _, t in loaded)
    spelling = {t: min(uses, key=lambda u: (u.casefold() != t.casefold(), -uses[u], u)) for t in uses}
    for path, term in loaded:
        refused = type_problem(term.type)
        if not refused and spelling[term.type] != term.type:
            refused = (
                f"type '{term.type}' differs from type '{spelling[term.type]}' only by case (Hugo reads them as one)"
            )
        if refused:
            problems.append(f"{path}: {refused}; not loaded")
            continue
        if term.type not in declared:
            problems.append(
                f"{path}: missing ClassificationType and folder '{term.type}' is not a known type; not loaded"
            )
            continue
        if (term.type, term.title) in seen:
            problems.append(
                f"{path}: duplicate title '{term.title}' in type '{term.type}'"
                f" (first in {seen[(term.type, term.title)]})"
            )
            continue
        seen[(term.type, term.title)] = str(path)
        terms.append(term)
    if not terms:
        raise TaxonomyError(f"no usable term files under {root}", path=root)
    return Taxonomy(terms=terms, problems=problems)


def taxonomy_for(settings: Settings) -> Taxonomy:
    """The configured taxonomy (TAGGER_TAXONOMY_DIR, TAGGER_SELECTION's types), read without building a classifier."""
    return load_taxonomy(settings.taxonomy_dir, known_types=settings.selection)


def type_key_problems(taxonomy: Taxonomy, posts: Iterable[Path], shown: int = 5) -> list[str]:
    """Types whose key some post uses for something other than a list of terms (a boolean, number, mapping)."""
    misuse: dict[str, list[str]] = {}
    for path in posts:
        try:
            meta = read_post(path).meta
        except TaggerError:
            continue
        for term_type in taxonomy.types():
            value = meta.get(term_type)
            if value is not None and not isinstance(value, str | list):
                misuse.setdefault(term_type, []).append(f"{path} ({type(value).__name__})")
    problems = []
    for term_type, where in misuse.items():
        more = f" and {len(where) - shown} more" if len(where) > shown else ""
        problems.append(
            f"type '{term_type}': posts use this key for something other than a list of terms:"
            f" {', '.join(where[:shown])}{more}"
        )
    return problems
