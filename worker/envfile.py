"""The settings as an env file: `.env.example`'s sections and comments, with the defaults `Settings` holds."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from worker.settings import Settings

EXAMPLE_NAME = ".env.example"
_SECTION = re.compile(r"^# -+ (?P<title>.+?) -+\s*$")
_ASSIGNMENT = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def starter_file(name: str) -> Traversable:
    """A file or folder `tagger init` starts a site from: `.env.example`, or `taxonomy` (the example term files).

    Installed, they are in the package `worker.starter`; in a checkout (editable install), at the repository's
    root, where `taxonomy` is `categories/`.
    """
    try:
        return files("worker.starter") / name
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent
        return root / ("categories" if name == "taxonomy" else name)


def example_text() -> str:
    """The text of `.env.example` as it ships."""
    return starter_file(EXAMPLE_NAME).read_text(encoding="utf-8")


@dataclass(frozen=True)
class EnvSetting:
    """One setting as `.env.example` documents it."""

    name: str
    example: str  # the value written in .env.example
    comment: tuple[str, ...]  # the comment lines above it (shared by settings written one after the other)
    section: str


@dataclass(frozen=True)
class EnvExample:
    """`.env.example` read back: its opening comment and its settings, in file order."""

    preamble: tuple[str, ...]
    settings: tuple[EnvSetting, ...]

    def sections(self) -> list[str]:
        """Section titles in file order."""
        return list(dict.fromkeys(s.section for s in self.settings))

    def get(self, name: str) -> EnvSetting | None:
        """The setting called `name`, if documented."""
        return next((s for s in self.settings if s.name == name), None)


def parse_example(text: str) -> EnvExample:
    """Sections (`# --- Title ---`), comments and `NAME=value` lines of an env file written like `.env.example`."""
    preamble: list[str] = []
    settings: list[EnvSetting] = []
    section = ""
    comment: list[str] = []
    last_was_setting = False
    for line in text.splitlines():
        heading = _SECTION.match(line)
        if heading:
            section, comment, last_was_setting = heading["title"], [], False
            continue
        if line.startswith("#"):
            if last_was_setting:
                comment = []  # a new comment block starts: the previous one covered the settings above
            body = line[1:].removeprefix(" ")
            (comment if section else preamble).append(body)
            last_was_setting = False
            continue
        found = _ASSIGNMENT.match(line)
        if found:
            settings.append(EnvSetting(found["name"], found["value"], tuple(comment), section))
            last_was_setting = True
    return EnvExample(tuple(preamble), tuple(settings))


def field_names() -> list[str]:
    """Every setting's environment name (its alias), in the order `Settings` declares them."""
    return [info.alias or name for name, info in Settings.model_fields.items()]


def _field(name: str) -> Any:
    for key, info in Settings.model_fields.items():
        if (info.alias or key) == name:
            return info
    raise KeyError(name)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(exclude_none=True))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def env_value(value: Any) -> str:
    """A value written as an env file holds it (the form `Settings` reads back)."""
    if value is None or isinstance(value, SecretStr):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # globs: comma-separated, as .env.example writes them
    plain = _plain(value)
    if isinstance(plain, dict | list):
        return json.dumps(plain, separators=(",", ":"))
    return str(plain)


def default_value(name: str) -> str:
    """The default of the setting called `name` (e.g. `TAGGER_CHUNK_SIZE`), as an env file would write it."""
    return env_value(_field(name).get_default(call_default_factory=True))


def type_label(name: str) -> str:
    """The setting's type as a person reads it (`int`, `Path | None`, `'compact' | 'full'`)."""
    annotation = _field(name).annotation
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"typing\.Literal\[([^\]]*)\]", lambda m: m[1].replace(", ", " | "), text)
    text = re.sub(r"^typing\.Optional\[(.*)\]$", r"\1 | None", text)
    text = re.sub(r"\b(?:typing|pathlib|pydantic\.types|worker\.settings|pydantic)\.", "", text)
    return text.replace("NoneType", "None").replace("Annotated[", "").replace(", NoDecode]", "")
