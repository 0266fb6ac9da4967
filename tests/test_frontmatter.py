"""Valid front matter is never refused: every shape real sites use is written with only the owned keys changed.

Each post in `tests/fixtures/frontmatter/` is one shape (empty values, multi-line flow lists and maps, block
scalars last, comments after the last key, `---` inside a block scalar, BOM/CRLF, TOML tables and arrays of
tables with owned key names inside them). Each is written three ways (terms added, emptied, keys removed) and
checked twice by code written apart from the product (`tests/owned_bytes.py`): byte level (every byte outside the
owned keys' spans identical) and parse level (every foreign key parses to the same value and type).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.fakellm import FakeLLM
from tests.owned_bytes import assert_only_owned_changed, foreign_values, split
from worker import posts
from worker.cli import main
from worker.errors import BadPost, PostChanged
from worker.posts import (
    ORIGIN_KEY,
    Change,
    Post,
    atomic_write,
    foreign_changes,
    read_post,
    render_changes,
    same_value,
    write_atomic,
)
from worker.records import Record, RecordStore
from worker.writeback import write_back

OWNED = ("tags", "categories", "concepts", ORIGIN_KEY)
FIXTURES = Path(__file__).parent / "fixtures" / "frontmatter"
NAMES = sorted(p.name for p in FIXTURES.glob("*.md"))


def _added(post: Post) -> dict[str, Change]:
    return {
        "tags": [*post.terms("tags")[1:], "New: tag", "Ünïcode"],
        "categories": [*post.terms("categories"), "Kanban"],
        "concepts": ["Flow"],
        ORIGIN_KEY: "AI",
    }


def _emptied(post: Post) -> dict[str, Change]:
    return {"tags": [], "categories": [], "concepts": [], ORIGIN_KEY: "AI"}


def _removed(post: Post) -> dict[str, Change]:
    return {key: None for key in OWNED}


CHANGES: dict[str, Callable[[Post], dict[str, Change]]] = {"added": _added, "emptied": _emptied, "removed": _removed}


def test_there_is_a_fixture_for_every_shape() -> None:
    shapes = ("null-", "flow-list-last", "flow-map", "block-scalar-last", "keep-scalar", "comments-after-last")
    shapes += ("dashes-in-block-scalar", "bom-crlf", "toml-array-of-tables", "toml-owned-names-in-tables")
    for shape in shapes:
        assert any(name.startswith(shape) for name in NAMES), shape


@pytest.mark.parametrize("how", sorted(CHANGES))
@pytest.mark.parametrize("name", NAMES)
def test_every_valid_shape_is_written_with_only_owned_keys_changed(tmp_path: Path, name: str, how: str) -> None:
    path = tmp_path / name
    original = (FIXTURES / name).read_bytes()
    path.write_bytes(original)
    post = read_post(path)
    changes = CHANGES[how](post)
    write_atomic(post, render_changes(post, changes))
    old, new = original.decode("utf-8"), path.read_bytes().decode("utf-8")
    assert_only_owned_changed(old, new)  # byte level, by code written apart from the product
    assert foreign_changes(old, new, OWNED) == []  # and by the product's own check
    assert foreign_values(new) == foreign_values(old)  # parse level: every foreign key, value and type
    assert split(new)[4] == split(old)[4]  # the body
    again = read_post(path)
    for key, value in changes.items():
        assert again.meta.get(key) == value, key
    if b"\r\n" in original:
        assert b"\n" not in path.read_bytes().replace(b"\r\n", b"")
    assert path.read_bytes().startswith(original[:3])  # BOM (or the opening delimiter) kept
    if how == "removed" and not any(k in post.meta for k in OWNED):
        assert path.read_bytes() == original


def test_a_new_key_after_a_flow_list_closed_in_column_zero_lands_after_it(tmp_path: Path) -> None:
    """Hugo's docs: `aliases: [` with one item a line and `]` alone, as the last key."""
    path = tmp_path / "types.md"
    path.write_bytes((FIXTURES / "flow-list-last.md").read_bytes())
    new = render_changes(read_post(path), {"tags": ["Templates"]})
    assert "  '/templates/home/',\n]\ntags:\n  - Templates\n---\n" in new


@pytest.mark.parametrize(
    ("header", "key", "value"),
    [
        ("description:\ntitle: t", "description", None),
        ("title: t\nweight: ~\nx: 1", "weight", None),
        ("title: t\nsummary:   # only a comment", "summary", None),
        ("title: t\nratio: .nan", "ratio", float("nan")),
    ],
)
def test_empty_values_and_nan_do_not_make_a_post_unclassifiable(
    tmp_path: Path, header: str, key: str, value: Any
) -> None:
    path = tmp_path / "p.md"
    path.write_text(f"---\n{header}\n---\nbody\n", encoding="utf-8")
    post = read_post(path)
    write_atomic(post, render_changes(post, {"tags": ["Kanban"], ORIGIN_KEY: "AI"}))
    again = read_post(path)
    assert again.terms("tags") == ["Kanban"]
    assert key in again.meta and same_value(again.meta[key], value)


def test_the_reparse_check_compares_every_foreign_key_not_only_the_changed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editor that also changed a key it was not asked to (`weight`, 3 to 3.0) is caught by the re-parse of
    every key, before the byte check (whose message would name lines, not keys)."""
    path = tmp_path / "p.md"
    text = "---\ntitle: t\nweight: 3\n---\nbody\n"
    path.write_text(text, encoding="utf-8")
    real = posts._edit_yaml
    monkeypatch.setattr(posts, "_edit_yaml", lambda *a: real(*a).replace("weight: 3", "weight: 3.0"))
    with pytest.raises(BadPost, match=r"could not be edited safely \(keys weight\)"):
        render_changes(read_post(path), {"tags": ["Lean"]})
    assert path.read_text(encoding="utf-8") == text


def test_an_anchor_a_foreign_key_aliases_inside_an_owned_key_is_refused_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    text = "---\ntitle: t\ntags: &t [Kanban]\nmirror: *t\n---\nbody\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BadPost, match="could not be edited safely"):
        render_changes(read_post(path), {"tags": ["Lean"]})


def test_same_value_tells_types_apart() -> None:
    assert same_value({"a": [1, "x"]}, {"a": [1, "x"]})
    assert not same_value(1, True)
    assert not same_value(1, 1.0)
    assert not same_value({"a": 1}, {"a": 1, "b": None})
    assert same_value(float("nan"), float("nan"))


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Observed at the os boundary: what each fsync'd descriptor names, and when the rename happens."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "post.md"
    target.write_bytes(b"old")
    atomic_write(target, b"new", expected=b"old")
    assert target.read_bytes() == b"new"
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    temp = events[1][1].split(" -> ")[0]
    assert events[0][1] == temp and Path(temp).parent == tmp_path  # the temp file's data, before the rename
    assert events[1][1].endswith(f" -> {target}")
    assert events[2][1] == str(tmp_path)  # the folder, after the rename: the new name is durable


def _write_back_setup(tmp_path: Path) -> tuple[RecordStore, Path, Post, str, Record]:
    """A post in content/ and its record in a mirror tree under records/, so each file's folder is its own."""
    (tmp_path / "content").mkdir()
    path = tmp_path / "content" / "post.md"
    path.write_bytes(b"---\ntitle: A post\n---\nbody\n")
    post = read_post(path)
    store = RecordStore(content_root=tmp_path / "content", records_dir=tmp_path / "records")
    new_text = render_changes(post, {"tags": ["Kanban"], ORIGIN_KEY: "AI"})
    return store, path, post, new_text, Record(assigned={"tags": ["Kanban"]}, added_keys=["tags", ORIGIN_KEY])


def _observe(monkeypatch: pytest.MonkeyPatch, hold: Callable[[str], None] = lambda name: None) -> list[tuple[str, str]]:
    """Each fsync (when it returns, named by its descriptor's path) and rename, from every thread, in order.

    `hold(name)` runs before an fsync, to make it wait for something another thread does."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsyncing", name))
        hold(name)
        real_fsync(fd)
        events.append(("fsync", name))

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(src, dst, *args, **kwargs)
        events.append(("replace", f"{src} -> {dst}"))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_write_back_fsyncs_each_files_data_before_its_rename_and_each_rename_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol's order at the os boundary: announcing record durable, then the post, then the confirmation."""
    store, path, post, new_text, new_record = _write_back_setup(tmp_path)
    events = _observe(monkeypatch)
    assert write_back(store, path, post, Record(), Record(), new_text, new_record)
    monkeypatch.undo()
    renames = [(i, e[1].split(" -> ")) for i, e in enumerate(events) if e[0] == "replace"]
    record, folders = store.path_for(path), {"post": str(path.parent), "record": str(store.path_for(path).parent)}
    assert [dst for _, (_, dst) in renames] == [str(record), str(path), str(record)]  # announce, post, confirm
    for i, (temp, _) in renames:
        assert ("fsync", temp) in events[:i]  # each file's new bytes are durable before they are renamed in
    (announce, _), (post_rename, _), (confirm, _) = renames
    assert ("fsync", folders["record"]) in events[announce:post_rename]  # the announcement, durable first
    assert ("fsync", folders["post"]) in events[post_rename:confirm]  # the post, durable before the confirmation
    # The confirmation's rename is left to the kernel: lost to a power cut, the announcement is settled instead.
    assert ("fsync", folders["record"]) not in events[confirm:]
    assert path.read_text(encoding="utf-8") == new_text
    assert store.load(path).pending is None and store.load(path).file_hash == read_post(path).file_hash
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tagger-tmp")]


def test_write_back_fsyncs_the_posts_new_bytes_while_the_record_announces_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fsyncs that may overlap do: the post's temp file beside the announcing record's, the confirming record's
    beside the post's folder. Each held fsync waits for the other; written one after the other, the wait times out."""
    store, path, post, new_text, new_record = _write_back_setup(tmp_path)
    records = str(store.path_for(path).parent)
    post_temp, confirm_temp = threading.Event(), threading.Event()
    overlapped: list[str] = []

    def hold(name: str) -> None:
        in_records = name.startswith(records + "/") and name.endswith(".tagger-tmp")
        if name.startswith(str(path.parent) + "/") and name.endswith(".tagger-tmp"):
            post_temp.set()
        elif in_records and not overlapped:  # the announcing record's temp file: first in the records folder
            overlapped.append("announce" if post_temp.wait(5) else "announce alone")
        elif in_records:
            confirm_temp.set()
        elif name == str(path.parent) and len(overlapped) == 1:  # the post's folder, after its rename
            overlapped.append("post folder" if confirm_temp.wait(5) else "post folder alone")

    _observe(monkeypatch, hold)
    assert write_back(store, path, post, Record(), Record(), new_text, new_record)
    monkeypatch.undo()
    assert overlapped == ["announce", "post folder"]
    assert path.read_text(encoding="utf-8") == new_text and store.load(path).pending is None


def test_a_write_back_refused_after_staging_leaves_no_temp_file(tmp_path: Path) -> None:
    store, path, post, new_text, new_record = _write_back_setup(tmp_path)
    path.write_bytes(post.raw + b"edited meanwhile\n")
    with pytest.raises(PostChanged):
        write_back(store, path, post, Record(), Record(), new_text, new_record)
    assert path.read_bytes() == post.raw + b"edited meanwhile\n"
    assert store.load(path).pending is None and store.load(path).assigned == {}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tagger-tmp")]


FOREIGN_EDITS = {
    "toml-owned-names-in-tables.md": ["in a table", "in another table", "inside a string", "not.a.table", "a dotted"],
    "toml-array-of-tables.md": ["inside an array of tables", "not top level"],
    "toml-only-arrays-of-tables.md": ["cascaded"],
    "flow-map-last.md": ["not tagger's"],
    "flow-list-last.md": ["/templates/home/"],
    "flow-list-middle.md": ["/column/zero/", "a comment inside"],
    "dashes-in-block-scalar.md": ["not: the end"],
    "nested-map-last.md": ["inner", "trailing comment"],
}


@pytest.mark.parametrize("name", sorted(FOREIGN_EDITS))
def test_the_byte_check_sees_an_edit_to_a_foreign_key_that_shares_an_owned_name(name: str) -> None:
    """Owned key names inside tables, arrays of tables, strings, flow maps and nested maps are foreign."""
    old = (FIXTURES / name).read_text(encoding="utf-8")
    for text in FOREIGN_EDITS[name]:
        assert text in old, text
        new = old.replace(text, text[:-1] + ("Z" if text[-1] != "Z" else "Y"))
        assert foreign_changes(old, new, OWNED), f"{name}: an edit of {text!r} went unseen"


def _offline_env(site: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_"))}
    env.update(TAGGER_TAXONOMY_DIR=str(site / "taxonomy"), TAGGER_CONTENT_DIR=str(site / "site"))
    return {**env, "TAGGER_PROVIDER": "offline", **more}


def test_a_file_without_front_matter_is_skipped_by_default_and_counted(site: Path, fake_llm: FakeLLM) -> None:
    """Jekyll copies such a file as a static file: giving it front matter would publish it as a page."""
    readme = site / "site" / "posts" / "readme.md"
    text = b"Kanban and flow, work in progress limits, pull systems.\n"
    readme.write_bytes(text)
    runner = CliRunner()
    env = _offline_env(site)
    one = runner.invoke(main, ["classify", str(readme)], env=env)
    assert one.exit_code == 0, one.output
    assert one.stderr.splitlines()[-1] == f"SKIPPED {readme}: no front matter"
    run = runner.invoke(main, ["backfill", "--inline", str(site / "site")], env=env)
    assert run.exit_code == 0, run.output
    assert "0 fresh (up to date), 1 skipped (1 without front matter)" in run.stdout
    assert f"SKIPPED {readme}: no front matter" in run.stderr.splitlines()
    assert "3 done, 2 written" in run.stdout  # the other posts went on (the Human one is judged, not written)
    assert readme.read_bytes() == text
    assert not list(readme.parent.glob("data.readme.tagger.json"))
    # `add` (Hugo renders every markdown file as a page): judged and given a YAML block, the body unchanged
    fake_llm.score({"Kanban": 90}, default=0)
    model = {"TAGGER_PROVIDER": "openai", "OPENAI_BASE_URL": fake_llm.base_url, "OPENAI_API_KEY": "sk-fm-0123456789"}
    added = runner.invoke(main, ["classify", str(readme)], env={**env, **model, "TAGGER_NO_FRONT_MATTER": "add"})
    assert added.exit_code == 0, added.output
    new = readme.read_bytes()
    assert new.startswith(b"---\n") and new.endswith(b"---\n" + text)
    assert read_post(readme).meta.get(ORIGIN_KEY) == "AI" and "Kanban" in read_post(readme).terms("tags")


@pytest.mark.parametrize("name", ["leading-blank-lines.md", "toml-leading-blank-line.md"])
def test_front_matter_after_leading_blank_lines_is_read_as_hugo_reads_it_not_given_a_second_block(
    tmp_path: Path, name: str
) -> None:
    """Hugo skips blank lines before the opening delimiter: with TAGGER_NO_FRONT_MATTER=add, a block put in front
    turned the page's own front matter into body text (title and terms lost); with `skip` the page was never
    classified."""
    path = tmp_path / name
    original = (FIXTURES / name).read_bytes()
    path.write_bytes(original)
    post = read_post(path)
    assert post.format in ("yaml", "toml") and post.terms("tags") == ["Lean"]
    new = render_changes(post, {"tags": ["Lean", "Kanban"]})
    assert new.count("---" if post.format == "yaml" else "+++") == 2
    assert new.startswith(original.decode("utf-8")[: original.index(b"---" if post.format == "yaml" else b"+++")])


def test_tabs_as_separators_are_read_as_hugo_reads_them_and_kept(tmp_path: Path) -> None:
    """`key:<tab>value` and `value<tab># comment` are valid YAML (Hugo reads them); PyYAML alone refuses them."""
    path = tmp_path / "tabs.md"
    text = "---\ntitle:\tTabs after the colon\nweight: 3\t# a comment after a tab\ntags:\t[Lean,\tFlow]\n---\nBody.\n"
    path.write_text(text, encoding="utf-8")
    post = read_post(path)
    assert (post.title, post.meta["weight"], post.terms("tags")) == ("Tabs after the colon", 3, ["Lean", "Flow"])
    write_atomic(post, render_changes(post, {"tags": ["Lean", "Flow", "Kanban"], ORIGIN_KEY: "AI"}))
    new = path.read_text(encoding="utf-8")
    assert_only_owned_changed(text, new)  # byte level: the tabs of the foreign keys stay
    again = read_post(path)
    assert again.terms("tags") == ["Lean", "Flow", "Kanban"]
    assert {k: v for k, v in again.meta.items() if k not in OWNED} == {
        k: v for k, v in post.meta.items() if k not in OWNED
    }
