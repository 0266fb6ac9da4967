"""Reading posts and writing back only the owned keys, atomically."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from worker.errors import BadPost, PostChanged, PostMissing
from worker.posts import (
    ORIGIN_KEY,
    TEMP_SUFFIX,
    clean_stale_temps,
    foreign_changes,
    normal_form,
    read_post,
    render_changes,
    stage_file,
    write_atomic,
    writer_id,
)

OWNED = ("tags", "categories", "concepts", ORIGIN_KEY)
FIXTURES = Path(__file__).parent / "fixtures" / "posts"


def assert_only_owned_changed(path: Path, changes: dict[str, list[str] | str]) -> str:
    post = read_post(path)
    new = render_changes(post, changes)
    old = post.raw.decode("utf-8")
    assert foreign_changes(old, new, OWNED) == [], path
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


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.md")))
def test_fixture_posts_change_only_owned_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    original = (FIXTURES / name).read_bytes()
    path.write_bytes(original)
    post = read_post(path)
    changes: dict[str, list[str] | str] = {
        "tags": [*post.terms("tags")[1:], "New: tag", "Ünïcode"],
        "categories": ["Kanban"],
        "concepts": ["Flow"],
        ORIGIN_KEY: "AI",
    }
    new = assert_only_owned_changed(path, changes)
    if b"\r\n" in original:
        assert "\n" not in new.replace("\r\n", "")
    if name.startswith("toml"):
        assert new.startswith("+++")
        # new keys go with the other top-level keys, before the first table
        assert "[params]" not in new or new.index("concepts") < new.index("[params]")
    if name == "toml-tables.md":
        assert read_post(path).meta["params"]["tags"] == "not top level"


def test_the_owned_key_check_catches_what_a_line_shape_check_lets_through() -> None:
    old = "---\ntitle: x\nlist:\n- a\n- b\ntags:\n- A\n---\nbody\n"
    reindented = old.replace("- a\n- b", "  - a\n  - b")
    assert foreign_changes(old, reindented, OWNED)
    assert foreign_changes(old, old.replace("- A", "- B"), OWNED) == []
    assert foreign_changes(old, old.replace("body", "Body"), OWNED) == ["the body changed"]
    toml = '+++\ntags = [\n  "A",\n]\ntitle = "t"\n+++\n'
    assert foreign_changes(toml, toml.replace('"A",', '"B", "C",'), OWNED) == []
    assert foreign_changes(toml, toml.replace('"t"', '"u"'), OWNED)


def test_new_keys_go_right_after_the_last_key_and_emptied_added_keys_can_be_removed(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    path.write_text("---\ntitle: x\ntags:\n- A\n\n# closing comment\n\n---\nbody\n", encoding="utf-8")
    new = render_changes(read_post(path), {"concepts": ["Flow"]})
    assert new == "---\ntitle: x\ntags:\n- A\nconcepts:\n- Flow\n\n# closing comment\n\n---\nbody\n"
    path.write_text(new, encoding="utf-8")
    removed = render_changes(read_post(path), {"concepts": None})
    assert removed == "---\ntitle: x\ntags:\n- A\n\n# closing comment\n\n---\nbody\n"
    toml = tmp_path / "t.md"
    toml.write_text('+++\ntitle = "x"\nconcepts = ["Flow"]\n\n[params]\na = 1\n+++\n', encoding="utf-8")
    assert render_changes(read_post(toml), {"concepts": None}) == '+++\ntitle = "x"\n\n[params]\na = 1\n+++\n'


def test_a_string_under_a_type_key_is_one_term_and_other_scalars_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    path.write_text("---\ntags: Kanban Method\ncategories: true\nconcepts: 3\n---\nbody\n", encoding="utf-8")
    post = read_post(path)
    assert post.terms("tags") == ["Kanban Method"]
    for key in ("categories", "concepts"):
        with pytest.raises(BadPost, match="not a list of terms; the post is left as it is"):
            post.terms(key)


def test_normal_form_folds_case_unicode_form_and_odd_spaces() -> None:
    assert normal_form("Caf\u0065\u0301") == normal_form("Café") == "café"
    assert normal_form(" Kanban ") == normal_form("KANBAN") == "kanban"
    assert normal_form("Agile\u00a0Coaching") == normal_form("agile coaching") == normal_form("Agile\u200b Coaching")


def test_stale_temp_files_are_cleaned_and_young_ones_kept(tmp_path: Path) -> None:
    old = tmp_path / ".p.md.abc.tagger-tmp"
    young = tmp_path / ".p.md.def.tagger-tmp"
    other = tmp_path / ".someone-elses.tmp"
    for path in (old, young, other):
        path.write_text("partial", encoding="utf-8")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    assert clean_stale_temps(tmp_path) == [old]
    assert not old.exists() and young.exists() and other.exists()


def test_a_temp_file_of_a_dead_writer_of_this_host_goes_at_once_others_wait_for_their_age(tmp_path: Path) -> None:
    # A writer killed -9 mid-write leaves a temp file that names it: a rerun need not wait 15 minutes to tidy up.
    # (tests/test_pipelines.py kills a real `apply` at each write and checks that its rerun leaves a clean tree.)
    live = stage_file(tmp_path / ("p" * 240 + ".md"), b"being written").temp  # this process's: alive
    assert len(live.name.encode()) < 255  # a long post name still gives a temp name a file system takes
    me, pid = writer_id(), os.getpid()
    assert me.startswith(f"{socket.gethostname()[:64]}@") and f"~{me}~{pid}~" in live.name
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    dead = tmp_path / f".q.md~{me}~{no_such_pid}~abc{TEMP_SUFFIX}"
    elsewhere = tmp_path / f".r.md~another-host~{no_such_pid}~abc{TEMP_SUFFIX}"  # a shared folder's other writer
    # The same host name in another PID namespace (a container on the host's network) or another boot: its pids
    # are not ours to ask.
    container = tmp_path / f".c.md~{me.rsplit('-', 1)[0]}-1~{no_such_pid}~abc{TEMP_SUFFIX}"
    bare_host = tmp_path / f".h.md~{socket.gethostname()[:64]}~{no_such_pid}~abc{TEMP_SUFFIX}"  # before boot ids
    unnamed = tmp_path / f".s.md.abc{TEMP_SUFFIX}"  # an older tagger's name: no writer to ask
    odd = [
        tmp_path / f".{n}.md~{me}~{p}~abc{TEMP_SUFFIX}"
        for n, p in (("t", "9" * 20), ("u", "\u00b2"), ("v", ""), ("w", "9" * 10))  # 10 digits: no pid_t
    ]
    tilde = tmp_path / f".my~notes.md~{me}~{no_such_pid}~abc{TEMP_SUFFIX}"  # a post name with the mark in it
    for path in (dead, elsewhere, container, bare_host, unnamed, tilde, *odd):
        path.write_bytes(b"partial")
    assert sorted(clean_stale_temps(tmp_path)) == sorted([dead, tilde])  # odd pids ("²" is a digit) raise nothing
    assert not dead.exists() and all(p.exists() for p in (live, elsewhere, container, bare_host, unnamed, *odd))


@pytest.mark.slow  # starts a process in a namespace of its own
def test_a_live_writers_temp_file_is_kept_by_a_cleaner_in_another_pid_namespace(tmp_path: Path) -> None:
    # A real second PID namespace on this host (what `docker run --network host` gives): same host name, and the
    # writer's pid does not exist there. Found by a red-team review: the writer was taken for dead.
    live = stage_file(tmp_path / "a.md", b"being written").temp
    # And here: another live writer of this machine and namespace (a sleeping process) keeps its file, unsignalled.
    other_writer = subprocess.Popen(["sleep", "60"])
    try:
        theirs = tmp_path / f".b.md~{writer_id()}~{other_writer.pid}~abc{TEMP_SUFFIX}"
        theirs.write_bytes(b"partial")
        assert clean_stale_temps(tmp_path) == [] and theirs.exists() and other_writer.poll() is None
    finally:
        other_writer.kill()
        other_writer.wait()
    code = f"from pathlib import Path; from worker.posts import clean_stale_temps; clean_stale_temps(Path({str(tmp_path)!r}))"
    probe = subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no unprivileged PID namespace here (unshare: {probe.stderr.decode()[-200:].strip()})")
    other = subprocess.run(
        ["unshare", "-Urpf", "--mount-proc", sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert other.returncode == 0, other.stderr
    assert live.exists()


# --- hostile front matter: each case must end within seconds and a few tens of MB -------------------------

BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)
HOSTILE = {
    "alias-bomb-title": f"---\n{BOMB}title: *i\n---\nbody\n",
    "alias-bomb-tags": f"---\n{BOMB}tags: *i\n---\nbody\n",
    "recursive-alias": "---\ntitle: &x [*x]\n---\nbody\n",
    "deep-nesting": "---\ntitle: " + "[" * 50_000 + "]" * 50_000 + "\n---\nbody\n",
    "100k-keys": "---\n" + "".join(f"k{i}: {i}\n" for i in range(100_000)) + "k7: dup\n---\nbody\n",
    "20k-keys": "---\n" + "".join(f"k{i}: {i}\n" for i in range(20_000)) + "k7: dup\n---\nbody\n",
    "huge-title": "---\ntitle: " + "x" * 1_100_000 + "\n---\nbody\n",
}
HOSTILE_RESULT = {
    "alias-bomb-title": "excessive aliasing",
    "alias-bomb-tags": "excessive aliasing",
    "recursive-alias": "recursive alias",
    "deep-nesting": "nested too deeply|malformed",
    "100k-keys": "above the 262144 byte limit",
    "20k-keys": "duplicate front-matter keys: k7",
    "huge-title": "above the 262144 byte limit",
}
CHILD = textwrap.dedent(
    """
    import re, resource, sys, time
    from pathlib import Path
    from worker.errors import BadPost
    from worker.posts import read_post
    path, limit, expected = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.process_time()  # CPU seconds: the parse's own work, however busy the machine is
    try:
        post = read_post(path, limit)
        post.title, post.terms("tags")
        outcome = "read"
    except BadPost as exc:
        outcome = exc.message
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    print(f"{time.process_time() - started:.2f}s {grown}MB {outcome}")
    assert re.search(expected, outcome), outcome
    """
)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # `ulimit -v` 1 GB: a runaway dies, not the box


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_front_matter_ends_within_seconds_and_tens_of_mb(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.md"
    path.write_text(HOSTILE[name], encoding="utf-8")
    limit = 256 * 1024
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(limit), HOSTILE_RESULT[name]],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    seconds, grown, _ = run.stdout.split(" ", 2)
    assert float(seconds[:-1]) < 10, run.stdout  # CPU seconds the parse took
    assert int(grown[:-2]) < 60, run.stdout  # MB the parse added to the process's peak
    assert elapsed < 30


TOML_VALUES = {
    "bracket-in-string": ('tags = ["a]b", "c"]', 'tags = ["a]b", "d"]'),
    "bracket-in-literal": ("tags = ['x[y', 'z']", "tags = ['x[y', 'w']"),
    "escaped-quote": ('tags = ["q\\"]", "r"]', 'tags = ["q\\"]", "s"]'),
    "escaped-backslash": ('tags = ["b\\\\", "r"]', 'tags = ["b\\\\", "s"]'),
    "comment-with-bracket": (
        'tags = [\n  "a", # ] is not the end\n  "b",\n]',
        'tags = [\n  "a", # ] is not the end\n  "c",\n]',
    ),
    "multi-line-basic": ('tags = """one\n]\n"""', 'tags = """one\n]\nx"""'),
    "multi-line-literal": ("tags = '''one\n[\n'''", "tags = '''one\n[\nx'''"),
    "multi-line-empty": ('tags = """"""', 'tags = """x"""'),
    "inline-table-item": ('tags = [{ a = "]" }, "b"]', 'tags = [{ a = "]" }, "c"]'),
    "table-item-on-its-line": ('tags = [\n  { a = 1 },\n  "b",\n]', 'tags = [\n  { a = 1 },\n  "c",\n]'),
    "nested-array": ('tags = [\n  ["a"],\n  "b",\n]', 'tags = [\n  ["a"],\n  "c",\n]'),
    "empty-string": ('tags = ["", "b"]', 'tags = ["", "c"]'),
    "trailing-comment": ('tags = ["a"]  # [why]', 'tags = ["b"]  # [why]'),
}


@pytest.mark.parametrize("name", sorted(TOML_VALUES))
def test_a_toml_owned_value_ends_where_toml_says_it_does(name: str) -> None:
    owned, changed = TOML_VALUES[name]
    old = f'+++\ntitle = "T"\n{owned}\nnext = "n"\nnotes = """\nn"""\n+++\nbody\n'
    assert foreign_changes(old, old.replace(owned, changed), OWNED) == []  # all of the value is owned
    assert foreign_changes(old, old.replace('next = "n"', 'next = "m"'), OWNED)  # the next key is not
    assert foreign_changes(old, old.replace('\nn"""', '\nm"""'), OWNED)  # nor a multi-line string after it
    assert foreign_changes(old, old.replace('title = "T"', 'title = "U"'), OWNED)  # nor the one before
    last = f'+++\ntitle = "T"\n{owned}\n+++\nbody\n'  # the value is the header's last
    assert foreign_changes(last, last.replace(owned, changed), OWNED) == []
