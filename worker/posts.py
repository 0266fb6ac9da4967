"""Posts: read front matter (bounded), and write back only the keys tagger owns, atomically."""

from __future__ import annotations

import bisect
import contextlib
import difflib
import functools
import hashlib
import math
import os
import re
import socket
import stat
import tempfile
import time
import tomllib
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import tomlkit
import tomlkit.items
import yaml

from worker.errors import BadPost, PostChanged, PostMissing, PostReadOnly

ORIGIN_KEY = "ClassificationContentOrigin"
MAX_POST_BYTES = 20 * 1024 * 1024
MAX_FRONT_MATTER_BYTES = 256 * 1024
# Like Hugo's "document contains excessive aliasing": aliases that expand to more nodes than this are refused.
MAX_YAML_NODES = 10_000
TEMP_SUFFIX = ".tagger-tmp"
# A temp file older than this was left by a killed process: a live write takes seconds, not minutes.
STALE_TEMP_SECONDS = 15 * 60
# A temp file's name carries its writer (`.NAME~WRITER~PID~RANDOM.tagger-tmp`; WRITER: host name, boot and PID
# namespace, see `writer_id`), so one left by a dead process of this machine and namespace goes at once; any other
# (another host on a shared folder, a container with its own PIDs) waits for STALE_TEMP_SECONDS.
TEMP_MARK = "~"
Format = Literal["yaml", "toml", "none"]
Change = list[str] | str | None  # a list of terms, a scalar, or None to remove a key tagger added

# Blank lines before the opening delimiter are skipped, as Hugo does (they stay in the prefix, byte for byte).
_YAML_OPEN = re.compile(r"\A[ \t\r\n]*---[ \t]*\r?\n")
_YAML_CLOSE = re.compile(r"^(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.M)
_TOML_OPEN = re.compile(r"\A[ \t\r\n]*\+\+\+[ \t]*\r?\n")
_TOML_CLOSE = re.compile(r"^\+\+\+[ \t]*(?:\r?\n|\Z)", re.M)
_TOML_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
# A key/value line, dotted keys included (`params.tags = 1` is not the top-level `tags`).
_TOML_KEY = re.compile(rf"[ \t]*(?P<key>{_TOML_PART}(?:[ \t]*\.[ \t]*{_TOML_PART})*)[ \t]*=")
_TOML_TABLE = re.compile(r"[ \t]*\[")
_ITEM = re.compile(r"^(?P<indent>[ \t]*)-(?:[ \t]+|\r?$)")
_KEEP_SCALAR = re.compile(r":[ \t]*[|>][1-9]?\+[1-9]?[ \t]*(?:#.*)?\r?$")
# No-break and other odd spaces people paste into front matter.
_ODD_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
# Invisible characters (zero-width, word joiner, BOM, soft hyphen): "Kan\u200bban" looks exactly like "Kanban".
# Tabs after `:`, `,` or `[`, or before a comment: separators Hugo's YAML reads, which PyYAML alone refuses.
_SEPARATOR_TABS = re.compile(r"(?<=[:,\[])[ \t]*\t[ \t]*|[ \t]*\t[ \t]*(?=#)")
_INVISIBLE = re.compile("[\u00ad\u200b-\u200d\u2060\ufeff]")


def normal_form(term: str) -> str:
    """How terms are compared: Unicode NFC, case-folded, odd spaces collapsed, invisible characters dropped."""
    text = _ODD_SPACE.sub(" ", _INVISIBLE.sub("", unicodedata.normalize("NFC", term)))
    return " ".join(text.casefold().split())


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float | date | datetime):
        return str(value)
    return None


class _PostLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a date it cannot build (`2024-13-45`) stays text, as Hugo reads it."""

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError:
            return self.construct_scalar(node)


_PostLoader.add_constructor("tag:yaml.org,2002:timestamp", _PostLoader.construct_yaml_timestamp)


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
        """The post's title (a scalar in the front matter), or its file name."""
        title = _scalar_text(self.meta.get("title"))
        return title if title and title.strip() else self.path.stem

    @property
    def description(self) -> str:
        """The post's description, if any."""
        value = self.meta.get("description")
        return value if isinstance(value, str) else ""

    @property
    def has_content(self) -> bool:
        """False for an empty post, or one with no title and no body: nothing to classify."""
        title = _scalar_text(self.meta.get("title"))
        return bool((title and title.strip()) or self.body.strip())

    @property
    def content_hash(self) -> str:
        """Hash of what is judged: title, description and body (not the owned keys)."""
        judged = "\x1f".join([self.title, self.description, self.body.replace("\r\n", "\n")])
        return hashlib.sha256(judged.encode("utf-8")).hexdigest()[:16]

    @property
    def file_hash(self) -> str:
        """Hash of the file's exact bytes: tells whether a write tagger intended has landed."""
        return file_hash(self.raw)

    @property
    def human_only(self) -> bool:
        """True when the post says its classification is the people's: tagger never writes it."""
        return str(self.meta.get(ORIGIN_KEY, "")).strip().lower() == "human"

    def terms(self, term_type: str) -> list[str]:
        """The titles listed under one classification key; a lone string is one term (as Hugo reads it).

        Any other value (a boolean, a number, a mapping) is reported as BadPost and the post left as it is.
        """
        for key in self.meta:
            if key != term_type and str(key).casefold() == term_type.casefold():
                raise BadPost(f"'{key}' is read by Hugo as '{term_type}' (keys ignore case); rename it", path=self.path)
        value = self.meta.get(term_type)
        if value is None:
            return []
        if isinstance(value, str):
            return [value] if value.strip() else []
        if isinstance(value, list):
            return [text for v in value if (text := _scalar_text(v)) is not None and text.strip()]
        raise BadPost(
            f"'{term_type}' is a {type(value).__name__}, not a list of terms; the post is left as it is",
            path=self.path,
        )


def file_hash(data: bytes) -> str:
    """Short SHA-256 of a file's bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


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
    # Hugo reads these as front matter too: a YAML block put in front would turn it into body text.
    for lead, name in (("{", "JSON"), ("#+", "Org")):
        if text.lstrip().startswith(lead):
            raise BadPost(
                f"{name} front matter is not supported (only YAML and TOML); the post is left as it is", path=path
            )
    return "none", "", "", "", text


def _alias_growth(root: yaml.Node) -> int:
    """How many nodes expanding the aliases would add to the document (-1 for a recursive alias)."""
    cap = 1 << 40  # far above any limit; keeps the arithmetic small on deep bombs
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = min(cap, 1 + sum(sizes[id(c)] for c in _children(node)))
            continue
        if key in sizes:
            continue
        if key in on_path:
            return -1
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)] - len(sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _compose(header: str) -> yaml.Node | None:
    """PyYAML's node graph of one document (nothing constructed)."""
    loader = _PostLoader(header)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _compose_yaml(path: Path, header: str) -> yaml.Node | None:
    """The header's node graph (nothing constructed), refusing alias bombs and recursive aliases."""
    try:
        node = _compose(header)
    except yaml.scanner.ScannerError:
        if "\t" not in header:
            raise
        # PyYAML refuses tabs YAML allows as separators (Hugo reads them): read them as spaces, one for one, so
        # every offset stays that of the file.
        try:
            node = _compose(_SEPARATOR_TABS.sub(lambda m: " " * len(m.group()), header))
        except yaml.YAMLError:
            pass
        else:
            return _check_aliases(path, node)
        raise
    return _check_aliases(path, node)


def _check_aliases(path: Path, node: yaml.Node | None) -> yaml.Node | None:
    """The node, unless its aliases recurse or expand past MAX_YAML_NODES (BadPost)."""
    if node is None:
        return None
    growth = _alias_growth(node)
    if growth < 0:
        raise BadPost("front matter has a recursive alias", path=path)
    if growth > MAX_YAML_NODES:
        raise BadPost(
            f"front matter contains excessive aliasing (aliases expand to over {MAX_YAML_NODES} nodes)", path=path
        )
    return node


def _load_yaml(path: Path, header: str) -> Any:
    """safe_load, refusing alias bombs, recursive aliases and duplicate top-level keys before anything is built."""
    node = _compose_yaml(path, header)
    if node is None:
        return None
    if isinstance(node, yaml.MappingNode):
        counts = Counter(k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.value != "<<")
        duplicates = sorted(k for k, n in counts.items() if n > 1)
        if duplicates:
            raise BadPost(f"duplicate front-matter keys: {', '.join(duplicates[:10])}", path=path)
    loader = _PostLoader("")  # dates it cannot build kept as text
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_header(path: Path, fmt: Format, header: str) -> dict[str, Any]:
    """Parse a front-matter header into a mapping, or raise BadPost."""
    if fmt == "none":
        return {}
    try:
        data = _load_yaml(path, header) if fmt == "yaml" else tomllib.loads(header)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadPost(f"malformed {fmt.upper()} front matter: {first}", path=path) from exc
    except RecursionError as exc:
        raise BadPost(f"{fmt.upper()} front matter is nested too deeply", path=path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadPost(f"front matter is a {type(data).__name__}, not a mapping", path=path)
    return {str(k): v for k, v in data.items()}


def read_post(path: Path, max_front_matter_bytes: int = MAX_FRONT_MATTER_BYTES) -> Post:
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
    return post_from_bytes(path, raw, max_front_matter_bytes)


def post_from_bytes(path: Path, raw: bytes, max_front_matter_bytes: int = MAX_FRONT_MATTER_BYTES) -> Post:
    """Parse a post's bytes (read here, or carried by a job) as if read from `path`."""
    text, bom = _decode(path, raw)
    fmt, prefix, header, suffix, body = _split(path, text)
    header_bytes = len(header.encode("utf-8"))
    if header_bytes > max_front_matter_bytes:
        raise BadPost(
            f"front matter is {header_bytes} bytes, above the {max_front_matter_bytes} byte limit"
            " (TAGGER_MAX_FRONT_MATTER_BYTES)",
            path=path,
        )
    meta = parse_header(path, fmt, header)
    newline = "\r\n" if "\r\n" in (header or text[:4096]) else "\n"
    return Post(path, raw, fmt, bom, header, prefix, suffix, meta, body, newline)


# --- write-back -------------------------------------------------------------------------------


def _yaml_scalar(value: str) -> str:
    dumped = yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=1 << 30)
    return dumped.strip()[1:-1]


def _lines(text: str) -> list[str]:
    """Lines split at LF only, each with its ending (CRLF stays whole): what `^` means to the delimiters."""
    parts = text.split("\n")
    return [f"{part}\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _value_last(header: str, node: yaml.Node) -> int:
    """Offset of a value's last character: for a block list or map, that of its last item (not the comments after)."""
    while isinstance(node, yaml.SequenceNode | yaml.MappingNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(last, tuple) else last
    at = node.end_mark.index
    while at > 0 and header[at - 1].isspace():
        at -= 1
    return at - 1


def _yaml_blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """Map each top-level key to its [start, end) line span (trailing blank lines excluded).

    Where keys start and values end is PyYAML's word (a flow list closed by `]` in column 0, a quoted scalar over
    several lines, an empty value); indented lines, list items and blank lines that follow up to the next key
    (comments among the items) belong to the key too.
    """
    header = "".join(lines)
    try:
        node = _compose_yaml(Path("<front matter>"), header)
    except (yaml.YAMLError, RecursionError) as exc:
        raise BadPost("malformed YAML front matter", path=Path("<front matter>")) from exc
    if not isinstance(node, yaml.MappingNode) or node.flow_style:
        return {}
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def line_at(offset: int) -> int:
        return max(0, bisect.bisect_right(starts, offset) - 1)

    pairs = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
    key_lines = [line_at(k.start_mark.index) for k, _ in pairs]
    spans: dict[str, tuple[int, int]] = {}
    for n, (key, value) in enumerate(pairs):
        i = key_lines[n]
        limit = key_lines[n + 1] if n + 1 < len(pairs) else len(lines)
        end = j = max(i + 1, line_at(_value_last(header, value)) + 1)
        while j < limit:
            line = lines[j]
            if line.strip() == "":
                j += 1
                continue
            if line[0] in " \t" or _ITEM.match(line):
                end = j = j + 1
                continue
            break
        spans[key.value] = (i, max(i + 1, min(end, limit)))
    return spans


def _list_indent(lines: list[str]) -> str:
    for line in lines:
        m = _ITEM.match(line)
        if m:
            return m.group("indent")
    return "  "


def _render_yaml_list(key_line: str, block: list[str], new: list[str], nl: str, indent: str) -> list[str]:
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
    # A flow list stays one (also one opened on the line below the key): one line, its comment kept.
    below = next((line.strip() for line in block[1:] if line.strip() and not line.lstrip().startswith("#")), "")
    if inline.startswith("[") or (not inline and below.startswith("[")):
        return [f"{key_part} [{', '.join(_yaml_scalar(v) for v in new)}]{comment}{nl}"]
    kept: list[str] = []
    present: set[str] = set()
    item_indent = indent
    for line in block[1:]:
        item = _ITEM.match(line)
        if not item:
            kept.append(line)
            continue
        item_indent = item.group("indent")
        text = line[item.end() :]
        value = _scalar_text(yaml.safe_load(text)) if text.strip() else None
        if value is not None and value in new and value not in present:
            present.add(value)
            kept.append(line if line.endswith(("\n", "\r")) else line + nl)
    additions = [f"{item_indent}- {_yaml_scalar(v)}{nl}" for v in new if v not in present]
    last_item = max((i for i, line in enumerate(kept) if _ITEM.match(line)), default=-1)
    kept[last_item + 1 : last_item + 1] = additions
    first = f"{key_part}{comment}{nl}" if inline else key_line if key_line.endswith("\n") else key_line + nl
    return [first, *kept]


def _edit_yaml(header: str, changes: Mapping[str, Change], nl: str) -> str:
    lines = _lines(header)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += nl
    spans = _yaml_blocks(lines)
    indent = _list_indent(lines)
    # New keys go right after the last key's block, before any trailing blank lines or comments, unless that
    # block is a keep-chomping scalar (`|+`, `>+`): its trailing blank lines are part of its value.
    insert_at = max((end for _, end in spans.values()), default=len(lines))
    last = max(spans.values(), default=None)
    if last is not None and _KEEP_SCALAR.search(lines[last[0]]):
        insert_at = len(lines)
    edits: list[tuple[int, int, list[str]]] = []
    appended: list[str] = []
    for key, value in changes.items():
        span = spans.get(key)
        if value is None:
            if span:
                edits.append((*span, []))
            continue
        if isinstance(value, str):
            rendered = [f"{key}: {_yaml_scalar(value)}{nl}"]
        else:
            # An explicit key (`? tags` then `: [x]`) is written anew as `tags:`: its lines hold no `key:` to reuse.
            explicit = span is not None and lines[span[0]].startswith("?")
            block = lines[span[0] : span[1]] if span and not explicit else [f"{key}:{nl}"]
            rendered = _render_yaml_list(block[0], block, value, nl, indent)
        if span:
            edits.append((*span, rendered))
        else:
            appended.extend(rendered)
    if appended:
        edits.append((insert_at, insert_at, appended))
    for start, end, rendered in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        lines[start:end] = rendered
    return "".join(lines)


def _edit_toml(header: str, changes: Mapping[str, Change], nl: str) -> str:
    """Edit top-level keys with tomlkit (a round-trip TOML library), keeping the file's newlines."""
    doc = tomlkit.parse(header.replace("\r\n", "\n"))
    # tomlkit puts a blank line above the first table when it inserts a key before it: keep the file's own spacing.
    indents = [(item, item.trivia.indent) for _, item in doc.body if isinstance(item, tomlkit.items.Table)]
    for key, value in changes.items():
        if value is None:
            if key in doc:
                del doc[key]
        elif isinstance(value, str):
            doc[key] = value
        else:
            old = doc.get(key)
            array = tomlkit.array()
            array.extend(value)
            if isinstance(old, tomlkit.items.Array) and "\n" in old.as_string():
                array.multiline(True)
            doc[key] = array
    for item, indent in indents:
        item.trivia.indent = indent
    text = tomlkit.dumps(doc)
    return text.replace("\n", nl) if nl != "\n" else text


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down (`1`, `1.0` and `true` differ; NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def render_changes(post: Post, changes: Mapping[str, Change]) -> str:
    """The post's full new text with only `changes` applied (None removes a key); verified before it is used."""
    nl = post.newline
    if post.format == "toml":
        header = _edit_toml(post.header, changes, nl)
        prefix, suffix = post.prefix, post.suffix
    else:
        header = _edit_yaml(post.header, changes, nl)
        prefix, suffix = (post.prefix, post.suffix) if post.format == "yaml" else (f"---{nl}", f"---{nl}")
    try:
        new_meta = parse_header(post.path, "toml" if post.format == "toml" else "yaml", header)
    except BadPost as exc:
        raise BadPost(
            f"front matter could not be edited safely: the edit does not parse ({exc.message})", path=post.path
        ) from exc
    # Every key of the header, not only the changed ones: a foreign key must parse to the same value and type.
    expected = dict(post.meta)
    for key, value in changes.items():
        if value is None:
            expected.pop(key, None)
        else:
            expected[key] = value
    differing = sorted(
        k
        for k in {*new_meta, *expected}
        if k not in new_meta or k not in expected or not same_value(new_meta[k], expected[k])
    )
    if differing:
        raise BadPost(f"front matter could not be edited safely (keys {', '.join(differing[:10])})", path=post.path)
    new_text = ("\ufeff" if post.bom else "") + prefix + header + suffix + post.body
    foreign = foreign_changes(post.raw.decode("utf-8"), new_text, changes.keys())
    if foreign:
        raise BadPost(f"front matter could not be edited safely: {foreign[0]}", path=post.path)
    return new_text


# --- the owned-key check -------------------------------------------------------------------------


def _toml_value_end(header: str, pos: int) -> int:
    """Offset just past the line that ends the TOML value starting at `pos` (strings, arrays, tables)."""
    depth = 0
    i = pos
    n = len(header)
    while i < n:
        ch = header[i]
        if header.startswith(('"""', "'''"), i):
            close = header.find(header[i : i + 3], i + 3)
            i = n if close < 0 else close + 3
            continue
        if ch in "\"'":
            j = i + 1
            while j < n and header[j] != ch and header[j] != "\n":
                j += 2 if ch == '"' and header[j] == "\\" else 1
            i = j + 1
            continue
        if ch == "#":
            nl_at = header.find("\n", i)
            i = n if nl_at < 0 else nl_at
            continue
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "\n" and depth <= 0:
            return i + 1
        i += 1
    return n


def _toml_spans(header: str, owned: set[str]) -> list[tuple[int, int]]:
    """[start, end) offsets of the owned top-level keys: each value is stepped over whole (a line inside a
    multi-line string or array is never read as a key or a table), and the top level ends at the first table."""
    spans: list[tuple[int, int]] = []
    at, n = 0, len(header)
    while at < n:
        line_end = header.find("\n", at)
        line_end = n if line_end < 0 else line_end + 1
        line = header[at:line_end]
        if _TOML_TABLE.match(line):
            break  # `[table]` or `[[array of tables]]`: what follows is not top level
        m = _TOML_KEY.match(line)
        if not m:
            at = line_end  # blank, a comment (or something TOML refused when the post was read)
            continue
        end = _toml_value_end(header, at + m.end())
        key = m.group("key")
        if (key[1:-1] if key[0] in "\"'" and key[-1] == key[0] else key) in owned:
            spans.append((at, end))
        at = end
    return spans


def _owned_spans(fmt: Format, header: str, owned: set[str]) -> list[tuple[int, int]]:
    """[start, end) character offsets in `header` of the owned top-level keys."""
    if fmt == "toml":
        return _toml_spans(header, owned)
    lines = _lines(header)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    spans: list[tuple[int, int]] = []
    for key, (start, end) in _yaml_blocks(lines).items():
        if key in owned:
            spans.append((offsets[start], offsets[end]))
    return sorted(spans)


def _parts(text: str, owned: set[str]) -> tuple[str, Format, str, list[str], str, str]:
    """(BOM, format, opening delimiter, foreign header lines, closing delimiter, body) of a post's text."""
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    fmt, prefix, header, suffix, body = _split(Path("<text>"), text[len(bom) :])
    foreign: list[str] = []
    at = 0
    for start, end in _owned_spans(fmt, header, owned):
        foreign.append(header[at:start])
        at = end
    foreign.append(header[at:])
    return bom, fmt, prefix, "".join(foreign).splitlines(keepends=True), suffix, body


def foreign_changes(old_text: str, new_text: str, owned_keys: Iterable[str]) -> list[str]:
    """What changed outside the owned keys' spans (empty when every other byte is identical)."""
    owned = set(owned_keys)
    try:
        old = _parts(old_text, owned)
        new = _parts(new_text, owned)
    except BadPost as exc:
        return [exc.message]
    problems: list[str] = []
    (old_bom, old_fmt, old_open, old_lines, old_close, old_body) = old
    (new_bom, new_fmt, new_open, new_lines, new_close, new_body) = new
    if old_bom != new_bom:
        problems.append("the byte-order mark changed")
    if old_body != new_body:
        problems.append("the body changed")
    if old_fmt != "none" and (old_fmt, old_open, old_close) != (new_fmt, new_open, new_close):
        problems.append("the front-matter delimiters changed")
    if old_lines != new_lines:
        diff = [
            line
            for line in difflib.unified_diff(old_lines, new_lines, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
        problems.append(f"non-owned front-matter lines changed: {diff[:6]!r}")
    return problems


# --- files ---------------------------------------------------------------------------------------


def read_only(path: Path) -> bool:
    """True when the file's mode bits deny tagger's user class write access (`chmod 444`, `chmod u-w`).

    The mode bits, not `os.access`: root may write anything, and a rename replaces a file whatever its bits,
    so only the bits say that the site's owner locked the file. Root and the file's owner are judged by the
    owner bits, members of its group by the group bits, anyone else by the other bits.
    """
    try:
        info = path.stat()
    except OSError:
        return False
    uid = os.geteuid()
    if uid in (0, info.st_uid):
        bit = stat.S_IWUSR
    elif info.st_gid == os.getegid() or info.st_gid in os.getgroups():
        bit = stat.S_IWGRP
    else:
        bit = stat.S_IWOTH
    return not info.st_mode & bit


def check_writable(path: Path) -> None:
    """Raise PostReadOnly for a post whose mode bits say it is locked."""
    if read_only(path):
        mode = f"{path.stat().st_mode & 0o7777:04o}"
        raise PostReadOnly(f"the post is read-only (mode {mode}); left as it is (chmod u+w to classify it)", path=path)


def write_atomic(post: Post, new_text: str) -> None:
    """Replace the post with `new_text` atomically, unless it changed since it was read."""
    atomic_write(post.path, new_text.encode("utf-8"), expected=post.raw)


def atomic_write(path: Path, data: bytes, expected: bytes | None = None, mode: int | None = None) -> None:
    """Write via a temp file in the same folder, fsync and rename; with `expected`, only over those bytes.

    With `expected` (a post), a file that is read-only by its mode bits is refused (PostReadOnly). The new file
    gets `mode`, else the mode (and, where the user may, the owner and group) of the file it replaces, else 0644.
    """
    replace_file(stage_file(path, data), expected=expected, mode=mode)


@dataclass(frozen=True)
class Staged:
    """New bytes for `path`, written and fsynced to a temp file beside it, not yet renamed over it."""

    path: Path
    temp: Path

    def discard(self) -> None:
        """Remove the temp file (the write is not made)."""
        self.temp.unlink(missing_ok=True)


def stage_file(path: Path, data: bytes) -> Staged:
    """The first half of an atomic write: `data` in a temp file in `path`'s folder, fsynced (see `replace_file`).

    Split from the rename so a caller can make the data durable while it does something that must come first
    (the write-back announces the write in the record meanwhile): fsyncs running together cost about one.
    """
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Staged(path, Path(tmp))


def replace_file(staged: Staged, expected: bytes | None = None, mode: int | None = None, durable: bool = True) -> None:
    """The second half of an atomic write: rename the staged file over its path, then fsync the folder.

    `expected`, `mode`: as for `atomic_write`. The temp file is removed when the rename is not made. Not `durable`:
    the folder is not fsynced, so a power cut may lose the rename (never the file's bytes, fsynced before it).
    """
    path, tmp = staged.path, staged.temp
    try:
        if expected is not None:
            try:
                current = path.read_bytes()
            except FileNotFoundError as exc:
                raise PostMissing("post was deleted while it was being classified", path=path) from exc
            if current != expected:
                raise PostChanged("post changed on disk while it was being classified", path=path)
            check_writable(path)
        try:
            old = path.stat()
        except FileNotFoundError:
            old = None
        if old is not None:
            # A rename gives the file the writer's owner; only root (or the owner, for its groups) may keep it.
            with contextlib.suppress(PermissionError):
                os.chown(tmp, old.st_uid, old.st_gid)
        if mode is None:
            mode = old.st_mode & 0o7777 if old is not None else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        staged.discard()
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def clean_stale_temps(folder: Path, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove tagger's own temp files (`.*.tagger-tmp`) that killed processes left in `folder`.

    A temp file whose writer was a process of this host that has ended goes at once; any other only when older
    than `older_than` seconds (a temp file a live process is writing is young).
    """
    removed: list[Path] = []
    cutoff = time.time() - older_than
    try:
        candidates = list(folder.glob(f".*{TEMP_SUFFIX}"))
    except OSError:
        return removed
    for path in candidates:
        try:
            if path.is_file() and not path.is_symlink() and (_writer_gone(path) or path.stat().st_mtime < cutoff):
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def _temp_prefix(name: str) -> str:
    """`.NAME~WRITER~PID~`, the name cut so the whole stays far under a file system's 255 bytes."""
    while len(name.encode("utf-8")) > 100:
        name = name[:-1]
    return f".{name}{TEMP_MARK}{writer_id()}{TEMP_MARK}{os.getpid()}{TEMP_MARK}"


@functools.cache
def writer_id() -> str:
    """Where this process's PIDs mean something: `HOST@BOOT-PIDNS` (Linux), else `HOST` alone.

    A host name is not enough: a container on the host's network (`docker run --network host`) shares it but not
    its PIDs, and two machines on a shared folder may share a name. The boot id tells machines (and boots) apart,
    the PID namespace's inode containers.
    """
    host = socket.gethostname()[:64].replace(TEMP_MARK, "-")
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip().replace("-", "")[:12]
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except (OSError, ValueError):
        return host
    return f"{host}@{boot}-{namespace}"


def _writer_gone(temp: Path) -> bool:
    """Whether the temp file names a process of this machine and PID namespace that no longer runs (False when it
    cannot tell: another writer's, an older tagger's name, anything odd)."""
    parts = temp.name.removesuffix(TEMP_SUFFIX).rsplit(TEMP_MARK, 3)
    own = writer_id()
    if len(parts) != 4 or parts[1] != own or "@" not in own:
        return False  # another machine's or namespace's, or no namespace to tell by: only its age tells
    if not (parts[2].isascii() and parts[2].isdigit() and 0 < len(parts[2]) <= 10):
        return False  # not a pid tagger wrote ("²" is a digit to str.isdigit; 20 digits overflow os.kill)
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False  # it runs (as another user) or cannot be asked
    return False
