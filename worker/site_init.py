"""`tagger init`: start tagger on a site: a commented `.env`, a records folder and one term file per term in use."""

from __future__ import annotations

import json
import re
import tomllib
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from worker.envfile import EnvExample, default_value, example_text, field_names, parse_example, starter_file
from worker.errors import TaggerError, UsageError
from worker.paths import walk_posts
from worker.posts import normal_form, read_post
from worker.settings import Settings
from worker.taxonomy import RESERVED_KEYS, TYPE_NAME

HUGO_CONFIGS = tuple(
    f"{stem}.{ext}" for stem in ("hugo", "config") for ext in ("toml", "yaml", "yml", "json")
)  # Hugo reads hugo.* first, then config.*
JEKYLL_CONFIGS = ("_config.yml", "_config.yaml", "_config.toml")
RECORDS_FOLDER = ".tagger"  # hidden: Hugo, Jekyll and tagger's own post walk all leave dot-folders alone
TAXONOMY_FOLDER = "categories"
# Placeholders a person replaces; `taxonomy check` names each one still there, and the prompts never carry them.
PLACEHOLDER = "TODO"
# The settings a site has to think about, first in the `.env` init writes; every other one follows, commented out.
SETTINGS_THAT_MATTER = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "TAGGER_MODEL",
    "TAGGER_CONTENT_DIR",
    "TAGGER_TAXONOMY_DIR",
    "TAGGER_RECORDS_DIR",
    "TAGGER_EXCLUDE",
    "TAGGER_SELECTION",
    "REDIS_URL",
)


@dataclass(frozen=True)
class Generator:
    """The static site generator a site is built with, as far as its files tell."""

    name: str  # hugo | jekyll | unknown
    config: Path | None
    content_dir: str  # relative to the site root
    publish_dir: str  # what the generator writes the built site into, relative to the site root
    taxonomies: tuple[str, ...]  # the front-matter keys the generator reads as taxonomies


@dataclass(frozen=True)
class TermUse:
    """A term a site's posts already use: its spelling and how many posts carry it."""

    type: str
    title: str
    posts: int


@dataclass
class InitResult:
    """What `tagger init` found and did."""

    site: Path
    generator: Generator
    posts: int
    terms: list[TermUse]
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # files that already existed: never overwritten
    notes: list[str] = field(default_factory=list)
    next_commands: list[str] = field(default_factory=list)

    def term_keys(self) -> dict[str, int]:
        """Each term key the posts use, with how many distinct terms it holds."""
        return dict(Counter(t.type for t in self.terms))


def _read_config(path: Path) -> dict[str, Any]:
    """A generator's config file as a mapping (empty when it cannot be read: detection only needs a few keys)."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_generator(site: Path) -> Generator:
    """Hugo (`hugo.toml|yaml|json`, `config.*`, `config/_default/`), Jekyll (`_config.yml`), or unknown."""
    hugo = next((site / n for n in HUGO_CONFIGS if (site / n).is_file()), None)
    if hugo is None and (site / "config" / "_default").is_dir():
        hugo = next((p for p in sorted((site / "config" / "_default").iterdir()) if p.stem in ("hugo", "config")), None)
    if hugo is not None:
        config = {k.casefold(): v for k, v in _read_config(hugo).items()}
        taxonomies = config.get("taxonomies")
        keys = tuple(str(v) for v in taxonomies.values()) if isinstance(taxonomies, dict) else ("tags", "categories")
        return Generator(
            "hugo",
            hugo,
            str(config.get("contentdir") or "content"),
            str(config.get("publishdir") or "public"),
            keys,
        )
    jekyll = next((site / n for n in JEKYLL_CONFIGS if (site / n).is_file()), None)
    if jekyll is not None:
        config = _read_config(jekyll)
        source = str(config.get("source") or ".")
        return Generator("jekyll", jekyll, source, str(config.get("destination") or "_site"), ("tags", "categories"))
    content = "content" if (site / "content").is_dir() else "."
    return Generator("unknown", None, content, "public", ("tags", "categories"))


def _candidate_key(key: str) -> bool:
    return bool(TYPE_NAME.match(key)) and key.casefold() not in RESERVED_KEYS


def terms_in_use(content: Path, generator: Generator, settings: Settings) -> tuple[int, list[TermUse]]:
    """How many posts there are and the terms they carry under the generator's taxonomy keys (one spelling each)."""
    keys = [k for k in generator.taxonomies if _candidate_key(k)]
    counts: dict[tuple[str, str], int] = {}
    spelling: dict[tuple[str, str], str] = {}
    posts = 0
    for found in walk_posts(content, settings):
        if found.relative is None:
            continue
        posts += 1
        try:
            meta = read_post(content / found.relative, settings.max_front_matter_bytes).meta
        except TaggerError:
            continue  # an unreadable post has no terms to learn from; `taxonomy check` and backfill report it
        for key in keys:
            value = meta.get(key)
            values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
            for item in {normal_form(v): v.strip() for v in values if isinstance(v, str) and v.strip()}.items():
                counts[(key, item[0])] = counts.get((key, item[0]), 0) + 1
                spelling.setdefault((key, item[0]), item[1])
    uses = [TermUse(key, spelling[(key, norm)], n) for (key, norm), n in counts.items()]
    return posts, sorted(uses, key=lambda u: (keys.index(u.type), -u.posts, u.title.casefold()))


def slug(title: str) -> str:
    """A file name for a term: lower case ASCII words joined by hyphens (`C#` gives `c`)."""
    ascii_text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-") or "term"


def term_file(term: TermUse) -> str:
    """A term file: title and type filled in, and Instructions whose placeholders say what to write."""
    title = json.dumps(term.title, ensure_ascii=False)  # a JSON string is a YAML string, quotes and colons included
    return (
        "---\n"
        f"title: {title}\n"
        f"ClassificationType: {term.type}\n"
        "# Instructions tell the model when this term applies. Replace every TODO line (`tagger taxonomy check`\n"
        "# lists the ones left): a scope, three to five key topics, and what to exclude.\n"
        "Instructions: |-\n"
        f"  {PLACEHOLDER}: one or two sentences on the content this term is for"
        f" ({term.posts} post{'s' if term.posts != 1 else ''} use it today).\n"
        "\n"
        "  **Key Topics:**\n"
        f"  - {PLACEHOLDER}: a topic a post about {term.title} covers\n"
        f"  - {PLACEHOLDER}: another one\n"
        "\n"
        "  **Strictly exclude:**\n"
        f"  - {PLACEHOLDER}: content that mentions {term.title} without being about it\n"
        "---\n"
    )


def example_term_file() -> str:
    """The shipped example term (Kanban), headed by a comment saying what to do with it."""
    text = (starter_file("taxonomy") / "tags" / "kanban.md").read_text(encoding="utf-8")
    head, rest = text.split("\n", 1)
    return (
        f"{head}\n"
        "# An example term file: your posts use no tags or categories yet. Copy it once per term of your\n"
        "# taxonomy (one file per term, in a folder named after its type), then delete or rewrite this one.\n"
        f"{rest}"
    )


def _env_line(name: str, value: str) -> str:
    return f"{name}={value}"


def env_file(values: dict[str, str], example: EnvExample | None = None) -> str:
    """A commented `.env`: the settings that matter, set; then every other setting, commented out at its default."""
    example = example or parse_example(example_text())
    lines = [
        "# tagger settings for this site, written by `tagger init`. Every setting: `tagger --help`, the docs'",
        "# settings reference, or .env.example. Relative folders are relative to this file's folder.",
        "",
        "# --- The settings that matter --------------------------------------------------",
    ]
    for name in SETTINGS_THAT_MATTER:
        documented = example.get(name)
        lines += [f"# {c}" for c in (documented.comment if documented else ())]
        lines.append(_env_line(name, values.get(name, default_value(name))))
    section = None
    for name in [s.name for s in example.settings] + [n for n in field_names() if example.get(n) is None]:
        if name in SETTINGS_THAT_MATTER:
            continue
        documented = example.get(name)
        title = documented.section if documented else "Other"
        if title != section:
            section = title
            lines += ["", f"# --- {title} (defaults; uncomment to change) ---"]
        lines += [f"# {c}" for c in (documented.comment if documented else ())]
        lines.append(f"# {_env_line(name, values.get(name, default_value(name)))}")
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, result: InitResult) -> None:
    """Write `path` unless it exists (then it is kept as it is: init never overwrites)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        result.kept.append(path)
        return
    result.written.append(path)


def init_site(site: Path) -> InitResult:
    """Set a site up for tagger (see the module docstring); files that exist are kept, never overwritten."""
    site = site.expanduser().resolve()
    if not site.is_dir():
        raise UsageError(f"{site} is not a folder (tagger init DIR: the site's root folder)")
    generator = detect_generator(site)
    content = (site / generator.content_dir).resolve()
    if not content.is_dir():
        raise UsageError(
            f"the {generator.name} site's content folder {content} does not exist"
            + (f" (from {generator.config.name})" if generator.config else "")
        )
    # Term files and the built site are not posts: excluded when they sit inside the content root (Jekyll's root).
    exclude = [
        p.relative_to(content).as_posix()
        for p in (site / TAXONOMY_FOLDER, site / generator.publish_dir)
        if p.resolve() == content or content in p.resolve().parents
    ]
    settings = Settings(TAGGER_CONTENT_DIR=content, TAGGER_EXCLUDE=tuple(exclude))
    posts, terms = terms_in_use(content, generator, settings)
    result = InitResult(site=site, generator=generator, posts=posts, terms=terms)
    content_setting = Path(generator.content_dir).as_posix()
    values = {
        "TAGGER_CONTENT_DIR": content_setting,
        "TAGGER_TAXONOMY_DIR": TAXONOMY_FOLDER,
        "TAGGER_RECORDS_DIR": RECORDS_FOLDER,
        "TAGGER_EXCLUDE": ",".join(exclude),
    }
    _write_new(site / ".env", env_file(values), result)
    records = site / RECORDS_FOLDER
    if records.is_dir():
        result.kept.append(records)
    else:
        records.mkdir(parents=True)
        result.written.append(records)
    taxonomy = site / TAXONOMY_FOLDER
    if terms:
        for term in terms:
            _write_new(taxonomy / term.type / f"{slug(term.title)}.md", term_file(term), result)
    elif not taxonomy.is_dir() or not any(taxonomy.rglob("*.md")):
        _write_new(taxonomy / "tags" / "kanban.md", example_term_file(), result)
    if generator.name == "jekyll" and content == site:
        result.notes.append(
            f"Jekyll publishes every markdown file it is not told to exclude: add `{TAXONOMY_FOLDER}` to `exclude:`"
            f" in {generator.config.name if generator.config else '_config.yml'}"
        )
    where = "" if site == Path.cwd().resolve() else f"cd {site} && "
    first = next((f for f in walk_posts(content, settings) if f.relative is not None), None)
    sample = (content / first.relative).relative_to(site).as_posix() if first and first.relative else content_setting
    result.next_commands = [
        f"{where}tagger taxonomy check",
        f"{where}tagger classify --dry-run {sample}",
        f"{where}tagger backfill {content_setting} --inline",
    ]
    return result
