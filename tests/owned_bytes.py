"""The write-back promise in bytes: everything outside the owned keys' spans is byte-identical.

Written apart from `worker/posts.py` on purpose (a check that reused the editor's own span finder would share
its bugs). A key's span is its line plus the lines of its value: for YAML the following blank, indented or
`- item` lines (trailing blank lines excluded) and, for a flow list, the lines up to its closing bracket; for TOML
the lines up to where the key and its value parse on their own (multi-line arrays and strings), top level only
(before the first table). Usable by tests and benchmarks alike: `foreign_bytes(old) == foreign_bytes(new)` and
`body(old) == body(new)`; `foreign_values(old) == foreign_values(new)` is the same promise at parse level."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable
from typing import Any

import yaml

OWNED = ("tags", "categories", "concepts", "ClassificationContentOrigin")
_YAML_KEY = re.compile(r"""^(?P<key>"[^"\n]*"|'[^'\n]*'|[^\s#'"\-?:\[{][^:\n]*?)[ \t]*:(?:[ \t]|\r?\n|$)""")
# `? key` alone on its line, its value on the next line after `: ` (YAML's explicit key).
_YAML_EXPLICIT_KEY = re.compile(r"""^\?[ \t]+(?P<key>"[^"\n]*"|'[^'\n]*'|[^\s#'"][^\n#]*?)[ \t]*(?:#.*)?\r?$""")
_TOML_KEY = re.compile(r"""^(?P<key>[A-Za-z0-9_-]+|"[^"\n]*")[ \t]*=""")
_TOML_TABLE = re.compile(r"^\s*\[")


def split(text: str) -> tuple[str, str, str, str, str]:
    """(format, opening, header, closing, body) with opening+header+closing+body == text (BOM in opening)."""
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    rest = text[len(bom) :]
    for fmt, fence in (("yaml", "---"), ("toml", "+++")):
        opening = re.match(rf"\s*{re.escape(fence)}[ \t]*\r?\n", rest)  # Hugo skips blank lines before it
        if not opening:
            continue
        closers = ("---", "...") if fmt == "yaml" else ("+++",)
        closing = re.compile(rf"^(?:{'|'.join(re.escape(c) for c in closers)})[ \t]*(?:\r?\n|\Z)", re.M)
        end = closing.search(rest, opening.end())
        if end:
            header = rest[opening.end() : end.start()]
            return fmt, bom + opening.group(0), header, end.group(0), rest[end.end() :]
    return "none", bom, "", "", rest


def _yaml_foreign(header: str, owned: Iterable[str]) -> str:
    lines = header.splitlines(keepends=True)
    keep: list[str] = []
    i = 0
    while i < len(lines):
        match = _YAML_KEY.match(lines[i]) or _YAML_EXPLICIT_KEY.match(lines[i])
        if not match or match.group("key").strip("\"'") not in owned:
            keep.append(lines[i])
            i += 1
            continue
        end = j = i + 1
        while j < len(lines):
            line = lines[j]
            if not line.strip():
                j += 1
            elif line[0] in " \t" or re.match(r"-(\s|$)", line) or (lines[i][0] == "?" and re.match(r":(\s|$)", line)):
                end = j = j + 1
            else:
                break
        while _open_brackets("".join(lines[i:end])) > 0 and end < len(lines):
            end += 1  # a flow list over several lines whose `]` sits in column 0
        i = end  # the trailing blank lines after the span stay foreign
    return "".join(keep)


def _open_brackets(text: str) -> int:
    """How many `[` / `{` are still open at the end of `text` (quoted text and comments aside)."""
    depth, quote = 0, ""
    for at, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"" and (at == 0 or text[at - 1] in " \t[{,:\n"):
            quote = ch
        elif ch == "#" and (at == 0 or text[at - 1] in " \t\n"):
            quote = "\n"  # a comment runs to the end of its line
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


def _toml_foreign(header: str, owned: Iterable[str]) -> str:
    lines = header.splitlines(keepends=True)
    keep: list[str] = []
    i = 0
    while i < len(lines):
        match = _TOML_KEY.match(lines[i])
        if not match:
            if _TOML_TABLE.match(lines[i]):
                return "".join(keep + lines[i:])  # a table: nothing after it is top level
            keep.append(lines[i])
            i += 1
            continue
        # The value ends at the first line where the key and its value parse on their own (a multi-line string
        # holding `[x]` or `tags = ...` lines is stepped over whole, foreign or owned).
        end = i + 1
        while end < len(lines):
            try:
                tomllib.loads("".join(lines[i:end]))
                break
            except tomllib.TOMLDecodeError:
                end += 1
        if match.group("key").strip('"') not in owned:
            keep.extend(lines[i:end])
        i = end
    return "".join(keep)


def foreign_bytes(text: str, owned: Iterable[str] = OWNED) -> str:
    """The post with the owned keys' spans cut out of its front matter (body and delimiters included)."""
    fmt, opening, header, closing, body = split(text)
    owned = tuple(owned)
    kept = _toml_foreign(header, owned) if fmt == "toml" else _yaml_foreign(header, owned)
    return opening + kept + closing + body


def _tree(node: yaml.Node | None) -> Any:
    """A YAML node as (tag, value) all the way down: the resolved type of every scalar, nothing constructed."""
    if node is None:
        return None
    if isinstance(node, yaml.MappingNode):
        return ("map", [(_tree(k), _tree(v)) for k, v in node.value])
    if isinstance(node, yaml.SequenceNode):
        return ("seq", [_tree(v) for v in node.value])
    return (node.tag, node.value)


def _typed(value: Any) -> Any:
    """A TOML value with every scalar's type kept (`1`, `1.0` and `true` differ; NaN equals NaN)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def foreign_values(text: str, owned: Iterable[str] = OWNED) -> dict[str, Any]:
    """Every top-level key of the front matter but the owned ones, parsed on its own terms (YAML: each scalar's
    resolved tag and text, duplicates kept in order; TOML: values with their types)."""
    fmt, _, header, _, _ = split(text)
    owned = tuple(owned)
    if fmt == "toml":
        return {k: _typed(v) for k, v in tomllib.loads(header).items() if k not in owned}
    if fmt == "none":
        return {}
    root = yaml.compose(header)
    if root is None:
        return {}
    assert isinstance(root, yaml.MappingNode), "front matter is not a mapping"
    out: dict[str, Any] = {}
    for key, value in root.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else repr(_tree(key))
        if name not in owned:
            out.setdefault(name, []).append(_tree(value))
    return out


def assert_only_owned_changed(old: str, new: str, owned: Iterable[str] = OWNED) -> None:
    """Fail with the first differing foreign line when anything outside the owned spans changed."""
    if split(old)[0] == "none":  # a post without front matter gains one holding owned keys only
        _, opening, header, _, body = split(new)
        old_bom, old_body = split(old)[1], split(old)[4]
        assert body == old_body and opening.startswith(old_bom), "the body of a post without front matter changed"
        assert not _yaml_foreign(header, tuple(owned)), f"a foreign key was added: {header!r}"
        return
    before, after = foreign_bytes(old, owned), foreign_bytes(new, owned)
    if before == after:
        return
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    at = next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    raise AssertionError(
        f"bytes outside the owned keys changed at foreign line {at + 1}: "
        f"{a[at] if at < len(a) else '<end>'!r} became {b[at] if at < len(b) else '<end>'!r}"
    )
