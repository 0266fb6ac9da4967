"""Posts: read front matter, and write back only the keys tagger owns, atomically."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from worker.errors import BadPost, PostChanged, PostMissing

ORIGIN_KEY = "ClassificationContentOrigin"
MAX_POST_BYTES = 20 * 1024 * 1024
Format = Literal["yaml", "toml", "none"]

_YAML_OPEN = re.compile(r"\A---[ \t]*\r?\n")
_YAML_CLOSE = re.compile(r"^(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.M)
_TOML_OPEN = re.compile(r"\A\+\+\+[ \t]*\r?\n")
_TOML_CLOSE = re.compile(r"^\+\+\+[ \t]*(?:\r?\n|\Z)", re.M)
_YAML_KEY = re.compile(r"""^(?P<key>"[^"]*"|'[^']*'|[^\s#:'"\-?&*!|>%@`{\[][^:#]*?)\s*:(?:[ \t]|\r?$)""")
_TOML_KEY = re.compile(r"""^(?P<key>[A-Za-z0-9_-]+|"[^"]*")\s*=""")
_ITEM = re.compile(r"^(?P<indent>[ \t]*)-(?:[ \t]+|\r?$)")


@dataclass(frozen=True)
class Post:
    """A post as read from disk: its exact bytes and what its front matter says."""

    path: Path
    raw: bytes
    format: Format
    bom: bool
    header: str
    prefix: str
    suffix: str
    meta: dict[str, Any]
    body: str
    newline: str

    @property
    def title(self) -> str:
        """The post's title, or its file name."""
        title = self.meta.get("title")
        return str(title) if title else self.path.stem

    @property
    def description(self) -> str:
        """The post's description, if any."""
        value = self.meta.get("description")
        return str(value) if isinstance(value, str) else ""

    @property
    def content_hash(self) -> str:
        """Hash of what is judged: title, description and body (not the owned keys)."""
        judged = "\x1f".join([self.title, self.description, self.body.replace("\r\n", "\n")])
        return hashlib.sha256(judged.encode("utf-8")).hexdigest()[:16]

    @property
    def human_only(self) -> bool:
        """True when the post says its classification is the people's: tagger never writes it."""
        return str(self.meta.get(ORIGIN_KEY, "")).strip().lower() == "human"

    def terms(self, term_type: str) -> list[str]:
        """The titles listed under one classification key (a lone string counts as one)."""
        value = self.meta.get(term_type)
        if value is None:
            return []
        if isinstance(value, str):
            return [value.strip()] if value.strip() else []
        if isinstance(value, list):
            return [str(v) for v in value if v is not None and str(v).strip()]
        raise BadPost(f"'{term_type}' is a {type(value).__name__}, not a list of terms", path=self.path)


def _decode(path: Path, raw: bytes) -> tuple[str, bool]:
    if b"\x00" in raw[:8192]:
        raise BadPost("binary file, not a text post", path=path)
    bom = raw.startswith(b"\xef\xbb\xbf")
    try:
        return raw[3 if bom else 0 :].decode("utf-8"), bom
    except UnicodeDecodeError as exc:
        raise BadPost(f"not valid UTF-8 (byte {exc.start})", path=path) from exc


def _split(path: Path, text: str) -> tuple[Format, str, str, str, str]:
    """Return (format, prefix, header, suffix, body) with prefix+header+suffix+body == text."""
    for fmt, opener, closer in (("yaml", _YAML_OPEN, _YAML_CLOSE), ("toml", _TOML_OPEN, _TOML_CLOSE)):
        start = opener.match(text)
        if not start:
            continue
        end = closer.search(text, start.end())
        if not end:
            raise BadPost(f"{fmt.upper()} front matter is never closed", path=path)
        return fmt, text[: start.end()], text[start.end() : end.start()], end.group(0), text[end.end() :]  # type: ignore[return-value]
    return "none", "", "", "", text


def _top_level_keys(header: str, pattern: re.Pattern[str]) -> list[str]:
    return [m.group("key").strip("\"'") for line in header.splitlines() if (m := pattern.match(line))]


def parse_header(path: Path, fmt: Format, header: str) -> dict[str, Any]:
    """Parse a front-matter header into a mapping, or raise BadPost."""
    if fmt == "none":
        return {}
    try:
        data = yaml.safe_load(header) if fmt == "yaml" else tomllib.loads(header)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadPost(f"malformed {fmt.upper()} front matter: {first}", path=path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadPost(f"front matter is a {type(data).__name__}, not a mapping", path=path)
    if fmt == "yaml":
        keys = _top_level_keys(header, _YAML_KEY)
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise BadPost(f"duplicate front-matter keys: {', '.join(duplicates)}", path=path)
    return {str(k): v for k, v in data.items()}


def read_post(path: Path) -> Post:
    """Read and parse a post, or raise BadPost/PostMissing with the reason."""
    try:
        size = path.stat().st_size
        if size > MAX_POST_BYTES:
            raise BadPost(f"file is {size} bytes, above the {MAX_POST_BYTES} byte limit", path=path)
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise PostMissing("post file does not exist", path=path) from exc
    except IsADirectoryError as exc:
        raise BadPost("is a directory, not a post", path=path) from exc
    except OSError as exc:
        raise BadPost(f"cannot read: {exc.strerror}", path=path) from exc
    text, bom = _decode(path, raw)
    fmt, prefix, header, suffix, body = _split(path, text)
    meta = parse_header(path, fmt, header)
    newline = "\r\n" if "\r\n" in (header or text[:4096]) else "\n"
    return Post(path, raw, fmt, bom, header, prefix, suffix, meta, body, newline)


# --- write-back -------------------------------------------------------------------------------


def _yaml_scalar(value: str) -> str:
    dumped = yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=1 << 30)
    return dumped.strip()[1:-1]


def _yaml_blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Map each top-level key to its [start, end) line span (trailing blank lines excluded)."""
    starts = [(i, m.group("key").strip("\"'")) for i, line in enumerate(lines) if (m := _YAML_KEY.match(line))]
    spans: dict[str, tuple[int, int]] = {}
    for i, key in starts:
        end = i + 1
        j = i + 1
        while j < len(lines):
            line = lines[j]
            if line.strip() == "":
                j += 1
                continue
            if line[0] in " \t" or _ITEM.match(line):
                end = j = j + 1
                continue
            break
        spans[key] = (i, end)
    return spans


def _list_indent(lines: list[str]) -> str:
    for line in lines:
        m = _ITEM.match(line)
        if m:
            return m.group("indent")
    return "  "


def _render_yaml_list(
    key_line: str, block: list[str], old: list[str], new: list[str], nl: str, indent: str
) -> list[str]:
    """Render a YAML list key, reusing the original lines of items that stay."""
    head = key_line.rstrip("\r\n")
    comment = ""
    m = re.search(r"\s+#.*$", head)
    if m and ":" in head[: m.start()]:
        comment, head = m.group(0), head[: m.start()]
    key_part = head.split(":", 1)[0] + ":"
    inline = head.split(":", 1)[1].strip()
    if not new:
        return [f"{key_part} []{comment}{nl}"]
    if inline.startswith("[") and old:
        return [f"{key_part} [{', '.join(_yaml_scalar(v) for v in new)}]{comment}{nl}"]
    items = block[1:]
    kept: list[str] = []
    item_indent = indent
    for line in items:
        item = _ITEM.match(line)
        if not item:
            kept.append(line)
            continue
        item_indent = item.group("indent")
        value = yaml.safe_load(line[item.end() :]) if line[item.end() :].strip() else None
        if value is not None and str(value) in new:
            kept.append(line if line.endswith(("\n", "\r")) else line + nl)
    present = set()
    for line in kept:
        item = _ITEM.match(line)
        if item:
            present.add(str(yaml.safe_load(line[item.end() :])))
    additions = [f"{item_indent}- {_yaml_scalar(v)}{nl}" for v in new if v not in present]
    last_item = max((i for i, line in enumerate(kept) if _ITEM.match(line)), default=-1)
    kept[last_item + 1 : last_item + 1] = additions
    first = f"{key_part}{comment}{nl}" if inline else key_line if key_line.endswith("\n") else key_line + nl
    return [first, *kept]


def _edit_yaml(header: str, changes: Mapping[str, list[str] | str], nl: str) -> str:
    lines = header.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += nl
    spans = _yaml_blocks(lines)
    indent = _list_indent(lines)
    replacements: list[tuple[int, int, list[str]]] = []
    appended: list[str] = []
    for key, value in changes.items():
        if isinstance(value, str):
            rendered = [f"{key}: {_yaml_scalar(value)}{nl}"]
        else:
            span = spans.get(key)
            old_block = lines[span[0] : span[1]] if span else [f"{key}:{nl}"]
            parsed = yaml.safe_load("".join(old_block)) if span else None
            old_value = parsed.get(key) if isinstance(parsed, dict) else None
            old = [str(v) for v in old_value] if isinstance(old_value, list) else []
            rendered = _render_yaml_list(old_block[0], old_block, old, value, nl, indent)
        if key in spans:
            replacements.append((*spans[key], rendered))
        else:
            appended.extend(rendered)
    for start, end, rendered in sorted(replacements, reverse=True):
        lines[start:end] = rendered
    return "".join(lines) + "".join(appended)


def _toml_value(value: list[str] | str) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in value) + "]"


def _edit_toml(header: str, changes: Mapping[str, list[str] | str], nl: str) -> str:
    lines = header.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += nl
    table_at = next(
        (i for i, line in enumerate(lines) if line.lstrip().startswith("[") and not _TOML_KEY.match(line)),
        len(lines),
    )
    for key, value in changes.items():
        rendered = f"{key} = {_toml_value(value)}{nl}"
        start = next(
            (i for i in range(table_at) if (m := _TOML_KEY.match(lines[i])) and m.group("key").strip('"') == key),
            None,
        )
        if start is None:
            at = table_at
            while at > 0 and not lines[at - 1].strip():
                at -= 1
            lines.insert(at, rendered)
            table_at += 1
            continue
        end = start + 1
        while end <= table_at:
            try:
                tomllib.loads("".join(lines[start:end]))
                break
            except tomllib.TOMLDecodeError:
                end += 1
        lines[start:end] = [rendered]
        table_at -= end - start - 1
    return "".join(lines)


def render_changes(post: Post, changes: Mapping[str, list[str] | str]) -> str:
    """The post's full new text with only `changes` applied; verified by re-parsing."""
    nl = post.newline
    if post.format == "toml":
        header = _edit_toml(post.header, changes, nl)
        prefix, suffix = post.prefix, post.suffix
    else:
        header = _edit_yaml(post.header, changes, nl)
        prefix, suffix = (post.prefix, post.suffix) if post.format == "yaml" else (f"---{nl}", f"---{nl}")
    new_meta = parse_header(post.path, "toml" if post.format == "toml" else "yaml", header)
    expected = {**post.meta, **changes}
    if new_meta != expected:
        differing = sorted(k for k in set(new_meta) | set(expected) if new_meta.get(k) != expected.get(k))
        raise BadPost(f"front matter could not be edited safely (keys {', '.join(differing)})", path=post.path)
    return ("\ufeff" if post.bom else "") + prefix + header + suffix + post.body


def write_atomic(post: Post, new_text: str) -> None:
    """Replace the post with `new_text` atomically, unless it changed since it was read."""
    atomic_write(post.path, new_text.encode("utf-8"), expected=post.raw)


def atomic_write(path: Path, data: bytes, expected: bytes | None = None) -> None:
    """Write via a temp file in the same folder, fsync and rename; with `expected`, only over those bytes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tagger-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if expected is not None:
            try:
                current = path.read_bytes()
                os.chmod(tmp, path.stat().st_mode & 0o7777)
            except FileNotFoundError as exc:
                raise PostMissing("post was deleted while it was being classified", path=path) from exc
            if current != expected:
                raise PostChanged("post changed on disk while it was being classified", path=path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
