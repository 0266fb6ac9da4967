"""Reading posts and writing back only the owned keys, atomically."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
import yaml

from worker.errors import BadPost, PostChanged, PostMissing
from worker.posts import ORIGIN_KEY, read_post, render_changes, write_atomic

OWNED = ("tags", "categories", "concepts", ORIGIN_KEY)
# Owned: list items, owned key lines, TOML array continuation lines of an owned key, delimiters.
OWNED_LINE = re.compile(rf"^(\s*-(\s|$)|({'|'.join(OWNED)})\s*[:=]|\s*(\".*\",?|\])\s*$|\+\+\+|---)")


def changed_lines(old: str, new: str) -> list[str]:
    """Every line removed or added between two texts."""
    out = []
    matcher = difflib.SequenceMatcher(
        None, old.splitlines(keepends=True), new.splitlines(keepends=True), autojunk=False
    )
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            out += matcher.a[i1:i2] + matcher.b[j1:j2]
    return out


def assert_only_owned_changed(path: Path, changes: dict[str, list[str] | str]) -> str:
    post = read_post(path)
    new = render_changes(post, changes)
    old = post.raw.decode("utf-8")
    for line in changed_lines(old, new):
        assert OWNED_LINE.match(line.lstrip("\ufeff")), f"{path}: non-owned line changed: {line!r}"
    assert new.endswith(post.body)
    path.write_text(new, encoding="utf-8", newline="")
    again = read_post(path)
    for key, value in post.meta.items():
        if key not in changes:
            assert again.meta[key] == value, key
    for key, value in changes.items():
        assert again.meta[key] == value
    return new


def test_round_trip_over_every_corpus_post(corpus: Path, tmp_path: Path) -> None:
    posts = sorted(corpus.glob("posts/*/index.md"))
    assert len(posts) >= 40
    for source in posts:
        target = tmp_path / source.parent.name / "index.md"
        target.parent.mkdir()
        target.write_bytes(source.read_bytes())
        post = read_post(target)
        changes: dict[str, list[str] | str] = {
            "tags": [*post.terms("tags")[1:], "Brand New Tag", "Quote: needed"],
            "categories": [*post.terms("categories")[:1], "Kanban"],
            ORIGIN_KEY: "AI",
        }
        assert_only_owned_changed(target, changes)


TRICKY = {
    "comments.md": "---\n# leading comment\ntitle: 'Quoted: title'  # trailing\ntags:\n  # a comment in the list\n  - One\n  - \"Two, quoted\"\nweight: 3\n---\nBody # not a comment\n",
    "crlf.md": "---\r\ntitle: Windows lines\r\ntags:\r\n- A\r\ndate: 2024-01-01\r\n---\r\nBody\r\nline two\r\n",
    "block.md": "---\ntitle: Block\ndescription: |\n  tags:\n    - not a real key\n  more text\nsummary: >-\n  folded\n  text\ncategories: [One, Two]\n---\nbody\n",
    "unicode.md": "---\ntitle: Café ☕ naïve\ntags: [Ünïcode]\n---\nZürich — “quotes”\n",
    "none.md": "Just a body with no front matter.\n",
    "string.md": "---\ntitle: Lone\ntags: Scrum\n---\nbody\n",
    "bom.md": "\ufeff---\ntitle: BOM\n---\nbody\n",
    "nested.md": "---\ntitle: Nested\nheadline:\n  tags:\n    - inner\n  title: inner title\nlist:\n- a\n- b\n---\nbody\n",
    "toml.md": '+++\ntitle = "Toml"\ntags = [\n  "A",\n  "B",\n]\n\n[params]\ntags = "not top level"\n+++\nbody\n',
}


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_tricky_posts_change_only_owned_lines(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(TRICKY[name].encode("utf-8"))
    new = assert_only_owned_changed(
        path, {"tags": ["One", "New: tag", "Ünïcode"], "categories": ["Kanban"], ORIGIN_KEY: "AI"}
    )
    if name == "crlf.md":
        assert "\n" not in new.replace("\r\n", "")
    if name == "bom.md":
        assert path.read_bytes().startswith(b"\xef\xbb\xbf---")
    if name == "toml.md":
        assert read_post(path).meta["params"]["tags"] == "not top level"


def test_unchanged_items_keep_their_original_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    path.write_text("---\ntags:\n    - 'Kept'   # why\n    - Gone\n---\n", encoding="utf-8")
    new = render_changes(read_post(path), {"tags": ["Kept", "Added"]})
    assert new == "---\ntags:\n    - 'Kept'   # why\n    - Added\n---\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("---\ntitle: [unclosed\n---\n", "malformed YAML"),
        ("---\n- a\n- b\n---\n", "not a mapping"),
        ("---\ntitle: a\ntitle: b\n---\n", "duplicate front-matter keys"),
        ("---\ntitle: never closed\n", "never closed"),
        ("+++\ntitle = \n+++\n", "malformed TOML"),
        ("---\ntags: {a: 1}\n---\n", "not a list"),
    ],
)
def test_bad_front_matter_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.md"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BadPost, match=message):
        read_post(path).terms("tags")


def test_binary_and_invalid_utf8_and_missing(tmp_path: Path) -> None:
    (tmp_path / "bin.md").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin.md").write_bytes("---\ntitle: caf\xe9\n---\n".encode("latin-1"))
    with pytest.raises(BadPost, match="binary"):
        read_post(tmp_path / "bin.md")
    with pytest.raises(BadPost, match="UTF-8"):
        read_post(tmp_path / "latin.md")
    with pytest.raises(PostMissing):
        read_post(tmp_path / "gone.md")


def test_write_refuses_when_the_file_changed_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    path.write_text("---\ntitle: x\n---\nbody\n", encoding="utf-8")
    post = read_post(path)
    new = render_changes(post, {"tags": ["A"]})
    path.write_text("---\ntitle: x\n---\nedited by a person\n", encoding="utf-8")
    with pytest.raises(PostChanged):
        write_atomic(post, new)
    assert path.read_text(encoding="utf-8").endswith("edited by a person\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.md"]


def test_write_back_keeps_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    path.write_text("---\ntitle: x\n---\n", encoding="utf-8")
    path.chmod(0o640)
    post = read_post(path)
    write_atomic(post, render_changes(post, {"tags": ["A"]}))
    assert path.stat().st_mode & 0o777 == 0o640
    assert yaml.safe_load(path.read_text().split("---")[1])["tags"] == ["A"]
