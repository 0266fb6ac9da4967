"""Hostile posts and term files through the real queue: clear errors or sane results, nothing else touched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands import tagger
from tests.test_posts import BOMB, OWNED
from worker.posts import foreign_changes, read_post
from worker.records import load_record

pytestmark = pytest.mark.redis

KANBAN = "A post about Kanban boards and WIP limits."
HOSTILE: dict[str, bytes] = {
    "malformed-yaml.md": b"---\ntitle: [unclosed\ntags: - a\n---\n" + KANBAN.encode(),
    "malformed-toml.md": b'+++\ntitle = "x\n+++\n' + KANBAN.encode(),
    "no-front-matter.md": KANBAN.encode() + b"\n",
    "empty.md": b"",
    "binary.md": bytes(range(256)) * 4,
    "invalid-utf8.md": b"---\ntitle: caf\xe9\n---\n" + KANBAN.encode(),
    "bom.md": b"\xef\xbb\xbf---\ntitle: BOM\n---\n" + KANBAN.encode() + b"\n",
    "crlf.md": b"---\r\ntitle: CRLF\r\ntags:\r\n- Lean\r\n---\r\n" + KANBAN.encode() + b"\r\n",
    "huge.md": b"---\ntitle: Huge\n---\n" + (KANBAN.encode() + b"\n") * 120_000,
    "duplicate-keys.md": b"---\ntitle: a\ntags: [x]\ntags: [y]\n---\n" + KANBAN.encode(),
    "list-front-matter.md": b"---\n- a\n- b\n---\n" + KANBAN.encode(),
    "string-tags.md": b"---\ntitle: Stringy\ntags: Lean\n---\n" + KANBAN.encode() + b"\n",
    "deleted.md": b"---\ntitle: soon gone\n---\n" + KANBAN.encode(),
    "swapped.md": b"---\ntitle: becomes a symlink\n---\n" + KANBAN.encode(),
    "alias-bomb.md": f"---\n{BOMB}title: *i\n---\n".encode() + KANBAN.encode(),
    "bool-tags.md": b"---\ntitle: Flagged\ntags: true\n---\n" + KANBAN.encode(),
    "huge-front-matter.md": b"---\ntitle: " + b"x" * 300_000 + b"\n---\n" + KANBAN.encode(),
}
FAILS = {
    "malformed-yaml.md": "bad_post",
    "malformed-toml.md": "bad_post",
    "binary.md": "bad_post",
    "invalid-utf8.md": "bad_post",
    "duplicate-keys.md": "bad_post",
    "list-front-matter.md": "bad_post",
    "deleted.md": "post_missing",
    "swapped.md": "outside_root",
    "alias-bomb.md": "bad_post",
    "bool-tags.md": "bad_post",
    "huge-front-matter.md": "bad_post",
}
WRITTEN = {"bom.md", "crlf.md", "huge.md", "string-tags.md"}  # no-front-matter.md: skipped (TAGGER_NO_FRONT_MATTER)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.mark.slow
def test_hostile_posts_and_terms_through_the_queue(queue_env: dict[str, str], site: Path) -> None:
    folder = site / "site" / "hostile"
    folder.mkdir()
    for name, data in HOSTILE.items():
        (folder / name).write_bytes(data)
    outside = site / "outside.md"
    outside.write_bytes(b"---\ntitle: outside\n---\n" + KANBAN.encode())
    (folder / "link-out.md").symlink_to(outside)
    (site / "taxonomy" / "tags" / "bare.md").write_text("---\ntitle: Boards\n---\n", encoding="utf-8")
    (site / "taxonomy" / "tags" / "broken.md").write_text("---\ntitle: [oops\n---\n", encoding="utf-8")
    env = queue_env
    paths = [str(p) for p in sorted(folder.iterdir())]
    enqueue = tagger(env, "enqueue", *paths)
    assert (
        "REFUSED" in enqueue.stderr and "link-out.md" in enqueue.stderr and "outside the content root" in enqueue.stderr
    )
    assert enqueue.stdout.count("enqueued") == len(HOSTILE)
    (folder / "deleted.md").unlink()
    (folder / "swapped.md").unlink()
    (folder / "swapped.md").symlink_to(outside)
    before = digest(site)
    originals = {name: data for name, data in HOSTILE.items()}

    work = subprocess.run(
        [sys.executable, "-m", "worker", "work", "--burst"], env=env, capture_output=True, text=True, timeout=300
    )
    assert work.returncode == 0, work.stderr[-2000:]

    listing = tagger(env, "failed", "list").stdout
    for name, kind in FAILS.items():
        line = next((row for row in listing.splitlines() if f"hostile/{name}" in row), "")
        assert f" {kind} " in line and line.split()[2] == "1", f"{name}: {line!r}"  # permanent: one attempt
    assert len([row for row in listing.splitlines() if "hostile/" in row]) == len(FAILS)

    after = digest(site)
    changed = {k for k in after if before.get(k) != after[k]}
    allowed = {f"site/hostile/{n}" for n in WRITTEN} | {k for k in after if k.endswith(".tagger.json")}
    assert changed <= allowed, changed - allowed
    assert outside.read_bytes().startswith(b"---\ntitle: outside\n")
    for name in WRITTEN:
        path = folder / name
        new = path.read_bytes()
        assert new != originals[name], name
        old_text, new_text = originals[name].decode("utf-8-sig"), new.decode("utf-8-sig")
        body = read_post(path).body
        assert old_text.endswith(body) and new_text.endswith(body), name
        assert foreign_changes(old_text, new_text, OWNED) == [], name
        assert "Kanban" in read_post(path).terms("tags"), name
    assert (folder / "no-front-matter.md").read_bytes() == originals["no-front-matter.md"]  # skipped by default
    assert (folder / "bom.md").read_bytes().startswith(b"\xef\xbb\xbf---")
    assert b"\r\n" in (folder / "crlf.md").read_bytes() and b"\n" not in (folder / "crlf.md").read_bytes().replace(
        b"\r\n", b""
    )
    # the lone string became a list; "Boards", a term with no Instructions, is judged on its title like any other
    assert read_post(folder / "string-tags.md").terms("tags") == ["Lean", "Boards", "Kanban"]
    assert load_record(folder / "huge.md").truncated_chars > 5_000_000
    assert {j.term for j in load_record(folder / "crlf.md").judgements} >= {"Boards", "Kanban"}
    assert not (folder / "empty.md").read_bytes()  # nothing to classify in an empty post: left alone
    assert not load_record(folder / "empty.md").judgements
