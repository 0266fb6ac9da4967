"""The Guarantees, each tried by the test that fails when it breaks (fast: in process, no queue workers).

Write-back changes only owned bytes, is verified by re-parsing and lands by rename; Human posts are never
written; a reply naming terms that were not asked is refused by the code, not only by the schema; secrets
(the API key and the Redis password) are redacted from every log line; foreign jobs are refused; a worker in
process does not take its own long call for a dead worker's.
"""

from __future__ import annotations

import faulthandler
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis as redis_lib
import structlog
import yaml
from rq import Callback, Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.conftest import REPO, SESSION, delete_keys
from tests.fakellm import FakeLLM, scripted_entry
from tests.owned_bytes import assert_only_owned_changed, foreign_bytes
from tests.waiting import wait_for
from worker.classifier import Classifier
from worker.errors import BadPost, InvalidReply, PostChanged, PostMissing
from worker.logs import configure, redact, secrets_of
from worker.posts import ORIGIN_KEY, Post, file_hash, read_post, render_changes, write_atomic
from worker.prompts import Prompt, load_templates
from worker.providers.base import Reply
from worker.records import load_record, record_path
from worker.reply import TermScores
from worker.results import Usage
from worker.settings import Settings
from worker.taxonomy import load_taxonomy

MakeSettings = Callable[..., Settings]

# --- only owned keys change, byte for byte -----------------------------------------------------

FIXTURES: dict[str, str] = {
    "nested-foreign-lists": (
        '---\ntitle: Nested\nauthor:\n  name: Sam\n  tags:\n    - inner\n    - "quoted inner"\n'
        "tags:\n  - Kept\nseries:\n- a\n- 'b'\n- \"c\"\nmenu:\n  main:\n    - name: x\n      weight: 1\n---\nbody\n"
    ),
    "quoted-items": "---\ntags:\n  - \"Kept\"\n  - 'Gone'\naliases:\n  - \"/old/\"\n  - '/older/'\n  - /oldest/\n---\nb\n",
    "flow-lists": '---\ntags: [Kept, "Gone"]\nkeywords: [a, \'b\', "c"]\ncategories: []\nextra: {a: [1, 2]}\n---\nb\n',
    "block-scalars": (
        "---\ntitle: Block\ndescription: |\n  tags:\n    - not a real key\n  more text\n\nsummary: >-\n  folded\n"
        "  text\ntags:\n- Kept\nnotes: |\n  kept\n---\nbody\n"
    ),
    "comments": (
        "---\n# leading comment\ntitle: 'Quoted: title'  # trailing\ntags:  # owned key comment\n  # in the list\n"
        "  - Kept\n  - Gone   # why\n# between keys\nweight: 3 # three\n---\nBody # not a comment\n"
    ),
    "crlf": '---\r\ntitle: Windows\r\ntags:\r\n- Kept\r\n- Gone\r\nlist:\r\n- a\r\n- "b"\r\ndate: 2024-01-01\r\n---\r\nBody\r\nline two\r\n',
    "bom": '\ufeff---\ntitle: BOM\nlist: ["x"]\n---\nbody\n',
    "owned-keys-absent": '---\ntitle: None yet\nweight: 1\nlist:\n  - "a"\n---\nbody\n',
    "blank-lines": "---\ntitle: Airy\n\ntags:\n  - Kept\n\n\nafter: 1\n\n---\n\nbody\n",
    "origin-present": "---\nClassificationContentOrigin: AI # set by tagger\ntitle: x\ntags: [Kept]\n---\nbody\n",
    "no-front-matter": "Just a body.\n",
    "toml-tables": (
        '+++\ntitle = "Toml"\ntags = [\n  "Kept",\n  "Gone",\n]\nlist = ["a", "b"]\n\n[params]\ntags = "not top level"\n'
        'series = [\n  "x",\n]\n\n[[menu.main]]\nname = "n"\n+++\nbody\n'
    ),
    "toml-crlf": '+++\r\ntitle = "T"\r\ncategories = ["Kept"]\r\n[params]\r\nx = 1\r\n+++\r\nbody\r\n',
    "flow-list-comment": "---\ntitle: x\ntags: [Kept, Gone]  # chosen: by hand\nweight: 1\n---\nb\n",
    "owned-key-colon-comment": "---\ntags:  # note: picked by hand\n  - Kept\n  - Gone\nafter: 1\n---\nb\n",
    "empty-header": "---\n---\nbody\n",
    "toml-owned-last-before-table": '+++\ntitle = "T"\ntags = [\n  "Kept",\n  "Gone",\n]\n[params]\nx = 1\n+++\nbody\n',
    "toml-quoted-keys": '+++\n"title" = "T"\n"tags" = ["Kept", "Gone"]\n\n[params]\n"tags" = "inner"\n+++\nb\n',
}
CHANGES: list[dict[str, list[str] | str]] = [
    {"tags": ["Kept", "New: tag", "Ünïcode"], "categories": ["Kanban"], ORIGIN_KEY: "AI"},
    {"tags": [], "categories": [], ORIGIN_KEY: "AI"},
    {"tags": ["Kept"]},
    {"concepts": ["Practice", 'It\'s "quoted"']},
]


@pytest.mark.parametrize("changes", CHANGES, ids=["replace", "empty", "drop-one", "new-key"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_a_write_back_changes_no_byte_outside_the_owned_keys(
    tmp_path: Path, name: str, changes: dict[str, list[str] | str]
) -> None:
    path = tmp_path / "post.md"
    path.write_bytes(FIXTURES[name].encode("utf-8"))
    post = read_post(path)
    new = render_changes(post, changes)
    assert_only_owned_changed(FIXTURES[name], new)
    assert_items_kept_and_aligned(FIXTURES[name], new, changes)
    path.write_bytes(new.encode("utf-8"))
    again = read_post(path)
    for key, value in changes.items():
        assert again.meta[key] == value
    assert {k: v for k, v in again.meta.items() if k not in changes} == {
        k: v for k, v in post.meta.items() if k not in changes
    }


def _owned_items(text: str, key: str) -> list[str]:
    """The `- item` lines of a YAML block list under a top-level owned key."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"{key}\s*:\s*(#.*)?$", line)), None)
    if start is None:
        return []
    items = []
    for line in lines[start + 1 :]:
        if re.match(r"\s*-(\s|$)", line):
            items.append(line)
        elif line.strip() and not line[0].isspace():
            break
    return items


def assert_items_kept_and_aligned(old: str, new: str, changes: dict[str, list[str] | str]) -> None:
    """An item that stays keeps its exact line (quotes, comment, indent); added items line up with the others."""
    for key, value in changes.items():
        if isinstance(value, str):
            continue
        after = _owned_items(new, key)
        for line in _owned_items(old, key):
            item = yaml.safe_load(line.split("-", 1)[1]) if line.split("-", 1)[1].strip() else None
            if item is not None and str(item) in value:
                assert line in after, f"{key}: kept item line {line!r} was rewritten"
        assert len({len(line) - len(line.lstrip()) for line in after}) <= 1, f"{key}: items not aligned: {after}"


def test_a_keep_trailing_block_scalar_last_in_the_header(tmp_path: Path) -> None:
    text = "---\ntitle: Block\ntags:\n- Kept\nnotes: |+\n  keep trailing\n\n---\nbody\n"
    path = tmp_path / "post.md"
    path.write_text(text, encoding="utf-8")
    new = render_changes(read_post(path), {"tags": ["Kept", "New"], ORIGIN_KEY: "AI"})
    assert_only_owned_changed(text, new)


def test_the_byte_check_sees_a_re_quoted_foreign_item_and_a_moved_comment() -> None:
    old = FIXTURES["quoted-items"]
    with pytest.raises(AssertionError, match="foreign line"):
        assert_only_owned_changed(old, old.replace("  - /oldest/", '  - "/oldest/"'))
    with pytest.raises(AssertionError, match="foreign line"):
        assert_only_owned_changed(FIXTURES["comments"], FIXTURES["comments"].replace("# between keys\n", ""))
    assert_only_owned_changed(old, old.replace("  - 'Gone'\n", ""))  # an owned item may go
    assert foreign_bytes(FIXTURES["toml-tables"]).count("tags") == 1  # [params].tags is foreign


@pytest.fixture
def everything_selected(fake_llm: FakeLLM) -> FakeLLM:
    """The fake model rates every term 95: every type's terms are selected, so every post gets edits."""
    fake_llm.score(default=95)
    return fake_llm


@pytest.mark.parametrize("name", sorted(set(FIXTURES) - {"no-front-matter"}))
def test_classifying_a_tricky_post_changes_only_owned_bytes(
    classifier: Classifier, everything_selected: FakeLLM, site: Path, name: str
) -> None:
    path = site / "site" / "posts" / f"{name}.md"
    path.write_bytes(FIXTURES[name].encode("utf-8"))
    result = classifier.classify(path)
    assert result.written
    new = path.read_bytes().decode("utf-8")
    assert_only_owned_changed(FIXTURES[name], new)
    assert "Kanban" in read_post(path).terms("tags")


TOML_EDITS = [
    (  # two multi-line arrays stay multi-line; a new key goes after them, before the blank line and the table
        '+++\ntags = [\n  "A",\n  "B",\n]\ncategories = [\n  "C",\n]\n\n[params]\nx = 1\n+++\nbody\n',
        {"tags": ["X"], "categories": ["Y"], ORIGIN_KEY: "AI"},
        '+++\ntags = [\n    "X",\n]\ncategories = [\n    "Y",\n]\nClassificationContentOrigin = "AI"\n\n[params]\nx = 1\n+++\nbody\n',
    ),
    (  # a quoted key, an indented table header, two blank lines, non-ASCII kept as it is
        '+++\n"tags" = ["A"]\ntitle = "T"\n\n\n  [params]\n  tags = ["inner"]\n+++\nb\n',
        {"tags": ["Ünï", "A"], "concepts": ["C"]},
        '+++\n"tags" = ["Ünï", "A"]\ntitle = "T"\nconcepts = ["C"]\n\n\n  [params]\n  tags = ["inner"]\n+++\nb\n',
    ),
    (  # an array of tables: new keys stay at the top level
        '+++\ntitle = "T"\n[[menu]]\nname = "m"\n+++\n',
        {"tags": ["A"]},
        '+++\ntitle = "T"\ntags = ["A"]\n[[menu]]\nname = "m"\n+++\n',
    ),
]


@pytest.mark.parametrize(("text", "changes", "expected"), TOML_EDITS, ids=["arrays", "quoted-key", "array-of-tables"])
def test_toml_write_back_exactly(tmp_path: Path, text: str, changes: dict[str, list[str] | str], expected: str) -> None:
    path = tmp_path / "p.md"
    path.write_text(text, encoding="utf-8")
    assert render_changes(read_post(path), changes) == expected


def test_a_refused_write_names_the_post(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    path.write_text("---\ntitle: x\n---\nbody\n", encoding="utf-8")
    post = read_post(path)
    new = render_changes(post, {"tags": ["A"]})
    path.write_text("---\ntitle: x\n---\nedited\n", encoding="utf-8")
    with pytest.raises(PostChanged) as changed:
        write_atomic(post, new)
    assert changed.value.path == str(path)
    path.unlink()
    with pytest.raises(PostMissing) as missing:
        write_atomic(post, new)
    assert missing.value.path == str(path) and not path.exists()
    assert list(tmp_path.iterdir()) == []


# --- every edit is verified by re-parsing before it is written -----------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "tags: &shared [Lean]\nkeywords: *shared\n",  # changing tags would change keywords too
        "tags: &shared\n  - Lean\nkeywords: *shared\n",
        "categories: &c []\nalso: *c\n",
    ],
)
def test_an_edit_that_would_change_a_foreign_key_is_refused_and_nothing_written(
    classifier: Classifier, everything_selected: FakeLLM, site: Path, header: str
) -> None:
    path = site / "site" / "posts" / "aliased.md"
    path.write_text(f"---\ntitle: Aliased\n{header}---\nKanban body\n", encoding="utf-8")
    before = path.read_bytes()
    with pytest.raises(BadPost):
        classifier.classify(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_an_edit_that_parses_to_other_values_is_refused_or_correct(tmp_path: Path) -> None:
    # A column-0 comment inside a list: the line editor cannot see its second item as part of the key.
    path = tmp_path / "p.md"
    path.write_text("---\ntags:\n- A\n# a comment\n- B\nnext: 1\n---\nbody\n", encoding="utf-8")
    post = read_post(path)
    try:
        new = render_changes(post, {"tags": ["A", "B", "C"]})
    except BadPost as exc:
        assert "could not be edited safely" in str(exc) or "malformed" in str(exc)
        return
    path.write_text(new, encoding="utf-8")
    assert read_post(path).meta == {"tags": ["A", "B", "C"], "next": 1}


def test_render_changes_refuses_what_does_not_parse_back(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    path.write_text("---\ntags: &t [A]\nalso: *t\n---\nbody\n", encoding="utf-8")
    with pytest.raises(BadPost, match=r"malformed YAML|could not be edited safely"):
        render_changes(read_post(path), {"tags": ["A", "B"]})


# --- files are replaced atomically: temp file, fsync, rename --------------------------------------


def test_a_write_back_replaces_the_file_by_rename_not_in_place(
    classifier: Classifier, everything_selected: FakeLLM, site: Path
) -> None:
    path = site / "site" / "posts" / "limiting-wip.md"
    before = path.read_bytes()
    inode = path.stat().st_ino
    link = site / "reader-holds-this.md"  # a hard link: what a reader that opened the old file still sees
    os.link(path, link)
    assert classifier.classify(path).written
    assert path.read_bytes() != before
    assert path.stat().st_ino != inode  # a new file was renamed over the post
    assert link.read_bytes() == before  # the old file was never written to
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_write_atomic_refuses_a_file_changed_since_it_was_read(tmp_path: Path) -> None:
    path = tmp_path / "p.md"
    path.write_text("---\ntitle: x\n---\nbody\n", encoding="utf-8")
    post = read_post(path)
    new = render_changes(post, {"tags": ["A"]})
    path.write_text("---\ntitle: x\n---\nedited\n", encoding="utf-8")
    inode = path.stat().st_ino
    with pytest.raises(Exception, match="changed on disk"):
        write_atomic(post, new)
    assert path.read_text(encoding="utf-8").endswith("edited\n") and path.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["p.md"]


def classify_in_thread(classifier: Classifier, path: Path) -> tuple[threading.Thread, list[BaseException]]:
    """Classify `path` in a started thread; the list receives what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            classifier.classify(path)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_an_edit_made_while_the_model_is_thinking_is_kept_and_judged(
    classifier: Classifier, everything_selected: FakeLLM, site: Path
) -> None:
    path = site / "site" / "posts" / "limiting-wip.md"
    everything_selected.hold()
    thread, errors = classify_in_thread(classifier, path)
    assert everything_selected.wait_held(1)  # the first call is with the model: the post was read
    path.write_text(path.read_text(encoding="utf-8") + "\nA late paragraph.\n", encoding="utf-8")
    everything_selected.release()
    thread.join(timeout=60)
    assert not thread.is_alive() and errors == []
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\nA late paragraph.\n")
    assert "Kanban" in read_post(path).terms("tags")
    assert load_record(path).content_hash == read_post(path).content_hash  # judged as edited


def test_two_taggers_writing_one_post_leave_its_terms_tagger_s(make_settings: MakeSettings, site: Path) -> None:
    """A worker and `tagger classify` (or two Batch collects) on one post: B has read it and waits on its model
    while A writes it. B's write must not put back the record it read: A's terms would look like a person's (the
    post holding them, the record not), and retiring a term would never take it back. Found by a red-team review."""
    from worker.classifier import make_classifier

    path = site / "site" / "posts" / "limiting-wip.md"
    slow = FakeLLM().start()  # B's model: held until A has written
    try:
        slow.hold()
        thread, errors = classify_in_thread(make_classifier(make_settings(OPENAI_BASE_URL=slow.base_url)), path)
        assert slow.wait_held(1)
        assert make_classifier(make_settings()).classify(path).written  # A
        with structlog.testing.capture_logs() as events:
            slow.release()
            thread.join(timeout=60)
    finally:
        slow.release()
        slow.stop()
    assert not thread.is_alive() and errors == []
    [kept] = [e for e in events if e["event"] == "record_kept"]  # B said why it wrote nothing
    assert kept["post"] == str(path) and kept["reason"].startswith("another writer's record")
    post, record = read_post(path), load_record(path)
    assert "Kanban" in post.terms("tags") and "Kanban" in record.assigned["tags"]  # still tagger's
    assert record.file_hash == post.file_hash and record.pending is None  # the record names the post as it is
    (site / "taxonomy" / "tags" / "kanban.md").unlink()  # the term is retired: tagger takes its own back
    make_classifier(make_settings()).classify(path)
    assert "Kanban" not in read_post(path).terms("tags")


def test_a_writer_waits_for_the_folder_s_write_lock(classifier: Classifier, fake_llm: FakeLLM, site: Path) -> None:
    """Writers of one folder take turns (an flock on the folder, held for the write alone): the checks before
    each rename then see every other tagger's finished write."""
    from worker.writeback import writing

    path = site / "site" / "posts" / "limiting-wip.md"
    before = path.read_bytes()
    with writing(path.parent):
        thread, errors = classify_in_thread(classifier, path)
        assert wait_for(lambda: fake_llm.counts["requests"] >= 1, timeout=30)  # judged (no latency) ...
        thread.join(timeout=1.0)  # ... then waiting for the lock, not writing
        assert thread.is_alive() and path.read_bytes() == before
    thread.join(timeout=60)
    assert not thread.is_alive() and errors == [] and "Kanban" in read_post(path).terms("tags")


def test_a_post_edited_at_every_pass_is_left_as_the_person_wrote_it_and_its_record_stays_settled(
    classifier: Classifier, fake_llm: FakeLLM, site: Path
) -> None:
    from worker.classifier import CHANGED_POST_PASSES

    path = site / "site" / "posts" / "limiting-wip.md"
    fake_llm.score({"Kanban": 95}, default=0)
    assert classifier.classify(path).written  # tagged once: the record holds what tagger assigned
    before = load_record(path)
    calls_per_pass = fake_llm.counts["requests"]
    fake_llm.score(default=95)  # now every term is selected: every pass has something to write
    path.write_text(path.read_text(encoding="utf-8") + "\nA first edit.\n", encoding="utf-8")
    fake_llm.hold()
    thread, errors = classify_in_thread(classifier, path)
    texts = []
    for n in range(CHANGED_POST_PASSES):  # each pass reads the post, and a person edits it before the write

        def asking(n: int = n) -> bool:  # this pass's first call is held
            return fake_llm.counts["requests"] > calls_per_pass * (1 + n) and fake_llm.held > 0

        assert wait_for(asking, timeout=10), f"pass {n + 1} never asked the model"
        texts.append(path.read_bytes())
        path.write_text(path.read_text(encoding="utf-8") + f"\nEdit {n}.\n", encoding="utf-8")
        fake_llm.release(calls=calls_per_pass)
    thread.join(timeout=30)
    fake_llm.release()
    assert not thread.is_alive()
    assert [type(e) for e in errors] == [PostChanged]  # given up after exactly CHANGED_POST_PASSES passes
    assert str(getattr(errors[0], "path", "")) == str(path)  # on-call sees which post
    assert fake_llm.counts["requests"] == calls_per_pass * (1 + CHANGED_POST_PASSES)
    assert path.read_bytes() == texts[-1] + f"\nEdit {CHANGED_POST_PASSES - 1}.\n".encode()  # the person's text
    after = load_record(path)
    assert after.pending is None  # no write announced and left unsettled
    assert after.file_hash == file_hash(texts[-1])  # the file as last read: the next run sees it changed
    assert after.content_hash == read_post_bytes(path, texts[-1]).content_hash  # its judgements are cached
    settled = {"pending", "judgements", "content_hash", "file_hash", "updated_at", "usage", "truncated_chars"}
    assert after.model_dump(exclude=settled) == before.model_dump(exclude=settled)  # earlier assignments stand
    assert before.assigned["tags"] == ["Kanban"]


def read_post_bytes(path: Path, data: bytes) -> Post:
    """The post as it was when it held `data` (parsed from a scratch copy beside it)."""
    scratch = path.with_name(f".scratch-{path.name}")
    scratch.write_bytes(data)
    try:
        return read_post(scratch)
    finally:
        scratch.unlink()


# --- Human posts are never written ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "---\ntitle: Kanban\nClassificationContentOrigin: Human\ntags: [Lean]\n---\nKanban body\n",
        "---\ntitle: Kanban\nClassificationContentOrigin: human\n---\nKanban body\n",
        "---\ntitle: Kanban\nClassificationContentOrigin: 'Human'  # a person's choice\ncategories: []\n---\nKanban\n",
        '+++\ntitle = "Kanban"\nClassificationContentOrigin = "Human"\ntags = ["Lean"]\n+++\nKanban body\n',
    ],
    ids=["yaml", "lower-case", "quoted", "toml"],
)
def test_a_human_post_is_never_written_even_when_every_term_qualifies(
    classifier: Classifier, everything_selected: FakeLLM, site: Path, text: str
) -> None:
    path = site / "site" / "posts" / "human.md"
    path.write_text(text, encoding="utf-8")
    before = path.read_bytes()
    result = classifier.classify(path)
    assert path.read_bytes() == before
    assert result.human_only and not result.written
    assert any(d.added for d in result.decisions)  # there was something to write: the rule held it back
    record = load_record(path)
    assert record.judgements and not any(record.assigned.values())
    again = classifier.classify(path)  # and again, from the cache
    assert path.read_bytes() == before and not again.written


def test_the_demo_human_post_stays_untouched(classifier: Classifier, everything_selected: FakeLLM, site: Path) -> None:
    path = site / "site" / "posts" / "backlog-by-value.md"
    before = path.read_bytes()
    result = classifier.classify(path)
    assert path.read_bytes() == before and result.human_only and not result.written
    assert any(d.added for d in result.decisions)  # there were suggestions: the rule held them back


# --- only the taxonomy: the code refuses replies about terms it did not ask -----------------------


class ScriptedProvider:
    """A provider (the contract in worker/providers/base.py) that returns what the test says, unvalidated.

    The OpenAI provider's schema already rejects unknown terms; this stands in for a provider that does not,
    so the classifier's own check is what is tried.
    """

    name = "scripted"
    model = "scripted-model"

    def __init__(self, reply: Callable[[Prompt], list[str]]) -> None:
        self.reply = reply
        self.calls = 0

    def judge(self, prompt: Prompt) -> Reply:
        self.calls += 1
        entries = [TermScores.model_validate(scripted_entry(n, 95)) for n in self.reply(prompt)]
        return Reply(judgements=entries, usage=Usage(calls=1), raw=json.dumps([e.term for e in entries]))


def scripted_classifier(settings: Settings, reply: Callable[[Prompt], list[str]]) -> Classifier:
    taxonomy = load_taxonomy(settings.taxonomy_dir, known_types=settings.selection)
    return Classifier(settings, taxonomy, load_templates(settings.prompts_dir), ScriptedProvider(reply))


@pytest.mark.parametrize(
    "reply",
    [
        lambda p: [*p.names, "Injected Term"],
        lambda p: [*p.names[:-1], "Injected Term"],
        lambda p: list(p.names[1:]),
        lambda p: [*p.names, p.names[0]],
        lambda p: ["Injected Term"],
    ],
    ids=["extra", "swapped", "missing", "repeated", "only-unknown"],
)
def test_a_reply_about_terms_not_asked_is_refused_by_the_code(
    make_settings: MakeSettings, site: Path, reply: Callable[[Prompt], list[str]]
) -> None:
    path = site / "site" / "posts" / "limiting-wip.md"
    before = path.read_bytes()
    with pytest.raises(InvalidReply) as caught:
        scripted_classifier(make_settings(), reply).classify(path)
    assert caught.value.raw_reply
    assert path.read_bytes() == before and not record_path(path).exists()


def test_a_provider_answering_exactly_what_was_asked_is_accepted(make_settings: MakeSettings, site: Path) -> None:
    path = site / "site" / "posts" / "limiting-wip.md"
    result = scripted_classifier(make_settings(), lambda p: list(reversed(p.names))).classify(path)
    assert result.written and "Kanban" in read_post(path).terms("tags")


# --- secrets are redacted from every log line -----------------------------------------------------

API_KEY = "sk-live-abcdef0123456789"
PASSWORD = "redis-pa55word"


@contextmanager
def configured(settings: Settings, stream: io.StringIO, quiet: bool | None = None) -> Iterator[None]:
    """`configure()` for one test; the process's logging (handlers, record factory, structlog) restored after."""
    factory = logging.getLogRecordFactory()
    root = logging.getLogger()
    handlers = list(root.handlers)
    for handler in handlers:
        root.removeHandler(handler)
    try:
        if quiet is None:
            configure(settings, stream=stream)  # the default a worker and most commands use
        else:
            configure(settings, stream=stream, quiet=quiet)
        yield
    finally:
        logging.setLogRecordFactory(factory)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        structlog.reset_defaults()


@pytest.fixture
def logged() -> Iterator[Callable[[], str]]:
    """Logging configured for a Redis URL with a password and an API key; returns what was logged so far."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        OPENAI_API_KEY=API_KEY,
        REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:6379/0",
        TAGGER_LOG_FORMAT="json",
    )
    stream = io.StringIO()
    with configured(settings, stream):
        yield stream.getvalue


def test_secrets_are_the_api_key_and_the_redis_password() -> None:
    settings = Settings(_env_file=None, OPENAI_API_KEY=API_KEY, REDIS_URL=f"rediss://u:{PASSWORD}@h:1/0")  # type: ignore[call-arg]
    assert sorted(secrets_of(settings)) == sorted([API_KEY, PASSWORD])
    assert secrets_of(Settings(_env_file=None)) == []  # type: ignore[call-arg]
    assert redact(f"a {API_KEY} b {PASSWORD} c", [API_KEY, PASSWORD]) == "a *** b *** c"
    assert redact("short abc", ["abc"]) == "short abc"  # too short to be a secret worth blanking everywhere
    assert redact("pw s3cret, s3cret", ["s3cret"]) == "pw ***, ***"  # six characters: long enough


def test_structlog_events_are_redacted(logged: Callable[[], str]) -> None:
    log = structlog.get_logger("tagger.test")
    log.warning("connecting", url=f"redis://:{PASSWORD}@127.0.0.1:6379/0", key=API_KEY, n=3)
    try:
        raise RuntimeError(f"Incorrect API key provided: {API_KEY}; redis password {PASSWORD}")
    except RuntimeError:
        log.exception("failed")
    text = logged()
    assert API_KEY not in text and PASSWORD not in text
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert events[0]["url"] == "redis://:***@127.0.0.1:6379/0" and events[0]["key"] == "***" and events[0]["n"] == 3
    assert "Incorrect API key provided: ***" in events[1]["exception"]


def test_stdlib_log_records_and_tracebacks_are_redacted(logged: Callable[[], str]) -> None:
    rq_log = logging.getLogger("rq.worker")
    rq_log.error("Worker: connected to %s", f"redis://:{PASSWORD}@127.0.0.1:6379/0")
    try:
        raise ValueError(f"bad key {API_KEY}")
    except ValueError:
        rq_log.exception("job failed with %s", API_KEY)
    text = logged()
    assert API_KEY not in text and PASSWORD not in text
    connected, failed = (json.loads(line) for line in text.splitlines())
    # RQ's own lines: one JSON object each, like tagger's events, with the logger's name, level and UTC time.
    assert connected["event"] == "Worker: connected to redis://:***@127.0.0.1:6379/0"
    assert connected["logger"] == "rq.worker" and connected["level"] == "error"
    assert datetime.fromisoformat(connected["timestamp"]).utcoffset() == timedelta(0)
    assert failed["event"].startswith("job failed with ***")
    assert "ValueError: bad key ***" in failed["exception"]  # the traceback is kept, redacted


def test_a_handler_someone_else_adds_gets_records_and_tracebacks_already_redacted(
    logged: Callable[[], str],
) -> None:
    other = io.StringIO()  # a library's or an operator's own handler, with the standard formatter
    handler = logging.StreamHandler(other)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    rq_log = logging.getLogger("rq.worker")
    rq_log.addHandler(handler)
    try:
        try:
            raise ValueError(f"bad key {API_KEY}")
        except ValueError:
            rq_log.exception("job failed with %s on %s", API_KEY, f"redis://:{PASSWORD}@h:6379/0")
    finally:
        rq_log.removeHandler(handler)
    text = other.getvalue()
    assert text.startswith("rq.worker ERROR job failed with *** on redis://:***@h:6379/0\n")
    assert "ValueError: bad key ***" in text and API_KEY not in text and PASSWORD not in text


def test_a_url_is_printed_without_its_password() -> None:
    from worker.logs import redact_url

    assert redact_url(f"redis://:{PASSWORD}@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("rediss://user:p@ss:w@host:1/2") == "rediss://user:***@host:1/2"  # "@" left unencoded
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_configured_again_redacts_the_new_secrets_and_no_longer_the_old(tmp_path: Path) -> None:
    other_key = "sk-other-9876543210fedcba"
    first = Settings(_env_file=None, OPENAI_API_KEY=API_KEY, TAGGER_LOG_FORMAT="json")  # type: ignore[call-arg]
    second = Settings(_env_file=None, OPENAI_API_KEY=other_key, TAGGER_LOG_FORMAT="json")  # type: ignore[call-arg]
    stream, earlier = io.StringIO(), io.StringIO()
    log = structlog.get_logger("tagger.test")  # taken and used before configure() again: follows it
    with configured(first, earlier, quiet=False):
        log.warning("first")
        configure(second, stream=stream)
        logging.getLogger("rq.worker").error("keys %s %s", API_KEY, other_key)
        log.warning("keys", first=API_KEY, second=other_key)
        # The record factory is replaced, not stacked: one layer over the factory that was there before.
        assert not hasattr(getattr(logging.getLogRecordFactory(), "tagger_wraps", None), "tagger_wraps")
    assert json.loads(earlier.getvalue())["event"] == "first"
    rq_line, event = (json.loads(line) for line in stream.getvalue().splitlines())
    assert rq_line["event"] == f"keys {API_KEY} ***"
    assert event["first"] == API_KEY and event["second"] == "***"


@pytest.mark.parametrize(
    ("log_format", "level", "quiet", "shown"),
    [
        ("auto", "INFO", False, {"info", "warning"}),  # not a terminal: JSON
        ("json", "WARNING", False, {"warning"}),
        ("json", "DEBUG", True, {"warning"}),  # quiet: warnings and worse only
        ("console", "info", False, {"info", "warning"}),
        ("json", "INFO", None, {"info", "warning"}),  # not quiet unless asked
        ("json", "LOUD", False, {"info", "warning"}),  # an unknown level: INFO
    ],
)
def test_log_format_and_level(log_format: str, level: str, quiet: bool | None, shown: set[str]) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, OPENAI_API_KEY=API_KEY, TAGGER_LOG_FORMAT=log_format, TAGGER_LOG_LEVEL=level
    )
    stream = io.StringIO()
    with configured(settings, stream, quiet=quiet):
        log = structlog.get_logger("tagger.test")
        log.debug("debug_event", key=API_KEY)
        log.info("info_event", key=API_KEY)
        log.warning("warning_event", key=API_KEY)
    lines = stream.getvalue().splitlines()
    assert API_KEY not in stream.getvalue()
    assert {name for name in ("debug", "info", "warning") if any(f"{name}_event" in line for line in lines)} == shown
    if log_format == "console":
        assert not any(line.startswith("{") for line in lines)
        assert "\x1b[" not in stream.getvalue()  # no colour codes: the console format is read in files too
    else:
        events = [json.loads(line) for line in lines]
        assert all(e["key"] == "***" and e["level"] in shown for e in events)
        assert all(datetime.fromisoformat(e["timestamp"]).utcoffset() == timedelta(0) for e in events)


# --- only tagger's own jobs run -------------------------------------------------------------------


@pytest.fixture
def rq_queue(redis: redis_lib.Redis, redis_prefix: str) -> Iterator[Queue]:
    """A queue named like tagger's, with this test's prefix; this session's RQ keys are deleted after."""
    delete_keys(redis, f"rq{SESSION}*")
    yield Queue(f"{redis_prefix}-default", connection=redis, serializer=JSONSerializer)
    delete_keys(redis, f"rq{SESSION}*")


def _job(queue: Queue, func: str, **options: object) -> Job:
    return Job.create(
        func,
        args=["posts/x.md", None],
        connection=queue.connection,
        serializer=JSONSerializer,
        origin=queue.name,
        **options,  # type: ignore[arg-type]
    )


def test_refusal_accepts_only_tagger_job_and_callback(rq_queue: Queue) -> None:
    from worker.queue.keys import FAILURE_CALLBACK, JOB_FUNCTION
    from worker.queue.workers import refusal

    assert refusal(_job(rq_queue, JOB_FUNCTION)) is None
    assert refusal(_job(rq_queue, JOB_FUNCTION, on_failure=Callback(FAILURE_CALLBACK))) is None
    assert "not worker.queue.jobs.classify_job" in str(refusal(_job(rq_queue, "os.system")))
    pickled = _job(rq_queue, JOB_FUNCTION)
    pickled.save()
    rq_queue.connection.hset(pickled.key, "data", zlib.compress(pickle.dumps(("os.system", None, ["true"], {}))))
    planted = Job.fetch(pickled.id, connection=rq_queue.connection, serializer=JSONSerializer)
    assert "job data is not JSON" in str(refusal(planted))
    for option in ("on_success", "on_failure", "on_stopped"):
        job = _job(rq_queue, JOB_FUNCTION, **{option: Callback("tests.test_security.plant_marker")})
        assert "foreign callbacks ['tests.test_security.plant_marker']" in str(refusal(job)), option


@pytest.mark.parametrize(
    ("func", "options", "reason"),
    [
        ("tests.test_promises.plant", {}, "not worker.queue.jobs.classify_job"),
        ("worker.queue.jobs.classify_job", {"on_success": "tests.test_promises.plant"}, "foreign callbacks"),
        ("worker.queue.jobs.classify_job", {"on_failure": "tests.test_promises.plant"}, "foreign callbacks"),
    ],
    ids=["function", "success-callback", "failure-callback"],
)
def test_a_worker_fails_a_foreign_job_without_running_any_of_it(
    rq_queue: Queue, worker_env: Settings, tmp_path: Path, func: str, options: dict[str, str], reason: str
) -> None:
    from worker.queue.workers import TaggerWorker

    marker = tmp_path / "ran"
    callbacks = {name: Callback(target) for name, target in options.items()}
    meta = {"post": "posts/older-layout.md"}  # an older tagger's job names its post: on-call must still see it
    job = rq_queue.enqueue(func, str(marker), job_id="foreign", meta=meta, **callbacks)  # type: ignore[arg-type]
    worker = TaggerWorker([rq_queue], connection=rq_queue.connection, serializer=JSONSerializer, settings=worker_env)
    before = time.time()
    with structlog.testing.capture_logs() as events:
        assert worker.work(burst=True)
    after = time.time()
    assert not marker.exists()
    job.refresh()
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["kind"] == "foreign_job" and reason in job.meta["error"] and job.meta["post"] == meta["post"]
    [refused] = [e for e in events if e["event"] == "refused"]
    assert refused["job_id"] == "foreign" and refused["reason"] == job.meta["error"]
    assert job.meta["attempts"] == 0 and before <= job.meta["failed_at"] <= after  # on-call sees when
    assert job.id in FailedJobRegistry(queue=rq_queue).get_job_ids()


def plant(*args: object) -> None:
    """A foreign job function or callback: touches the file named by its first argument (must never run)."""
    target = args[0]
    path = target if isinstance(target, str) else getattr(target, "args", [""])[0]
    Path(path).touch()


# --- a worker in this process: warm classifier, leases that outlive a long call, overdue retries ---


@pytest.fixture
def worker_env(
    monkeypatch: pytest.MonkeyPatch, make_settings: MakeSettings, redis_url: str, redis_prefix: str, rq_queue: Queue
) -> Settings:
    """The environment a worker reads its settings from (as `tagger work` would), and those settings."""
    values = {
        "REDIS_URL": redis_url,
        "TAGGER_REDIS_PREFIX": redis_prefix,
        "TAGGER_LEASE_SECONDS": "0.4",
        "TAGGER_REQUEST_TIMEOUT": "60",
        "TAGGER_JOB_RETRIES": "0",
        "TAGGER_CONCURRENCY": "4",
    }
    settings = make_settings(**values)
    for name, value in {
        **values,
        "TAGGER_PROVIDER": "openai",
        "OPENAI_BASE_URL": str(settings.openai_base_url),
        "OPENAI_API_KEY": API_KEY,
        "TAGGER_MODEL": settings.model,
        "TAGGER_TAXONOMY_DIR": str(settings.taxonomy_dir),
        "TAGGER_CONTENT_DIR": str(settings.content_dir),
        "TAGGER_LOG_FORMAT": "json",
    }.items():
        monkeypatch.setenv(name, value)
    return settings


def run_burst_worker(settings: Settings, redis: redis_lib.Redis, limit: float = 30.0) -> None:
    """`run_worker(burst=True)` in this process; a worker still running after `limit` seconds is shut down
    (RQ's own shutdown command) and the test fails, instead of hanging (a worker swallows most exceptions)."""
    from rq import Worker
    from rq.command import send_shutdown_command

    from worker.queue.workers import run_worker

    finished = threading.Event()

    def watchdog() -> None:
        if not finished.wait(limit):
            for worker in Worker.all(connection=redis):
                if worker.pid == os.getpid():  # this process's worker, not a worker process another test left
                    send_shutdown_command(redis, worker.name)
        if not finished.wait(15):
            # RQ's work loop can swallow both the shutdown and mutmut's timeout signal while it blocks on an empty
            # queue: end the whole process loudly rather than hang the run (a hung worker is a failed test).
            print("the burst worker ignored its shutdown command; exiting", file=sys.stderr, flush=True)
            faulthandler.dump_traceback()
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        run_worker(settings, redis, burst=True)
    finally:
        finished.set()
    assert time.monotonic() - started < limit, "the burst worker did not stop by itself"
    # RQ installs its handlers in this (pytest's) process: a worker that returns must put back those it found.
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers, "the worker left its handlers"


def test_a_worker_in_process_classifies_and_a_long_call_is_not_taken_for_dead(
    worker_env: Settings, fake_llm: FakeLLM, site: Path, rq_queue: Queue
) -> None:
    from worker.queue.enqueue import enqueue_posts
    from worker.queue.recovery import reap_abandoned

    redis = rq_queue.connection
    # A lease of 1 s: the entry lives 2 s (whole seconds, plus one), so beats slower than that would be seen.
    settings = worker_env.model_copy(update={"lease_seconds": 1.0})
    wip = site / "site" / "posts" / "limiting-wip.md"
    [queued] = enqueue_posts([wip], settings, redis)
    fake_llm.hold()
    recovered: list[str] = []

    def watch() -> None:  # another worker's recovery, looking while the job's calls are held for 5 leases
        if fake_llm.wait_held(1):  # the demo taxonomy's three types fit one call
            for _ in range(10):
                time.sleep(settings.lease_seconds / 2)
                recovered.extend(reap_abandoned(settings, redis))
        fake_llm.release()

    watcher = threading.Thread(target=watch)
    watcher.start()
    run_burst_worker(settings, redis)
    watcher.join(timeout=60)
    assert recovered == []
    assert fake_llm.counts["requests"] == 1
    assert "Kanban" in read_post(wip).terms("tags")
    job = rq_queue.fetch_job(queued.job_id)
    assert job is not None and job.get_status() == JobStatus.FINISHED and job.meta["attempts"] == 1
    assert StartedJobRegistry(queue=rq_queue).count == 0


def test_an_odd_entry_on_a_queue_is_dropped_and_recorded_and_the_next_job_runs(
    worker_env: Settings, fake_llm: FakeLLM, site: Path, rq_queue: Queue
) -> None:
    from worker.queue import keys
    from worker.queue.enqueue import enqueue_posts

    redis = rq_queue.connection
    queue = Queue(f"{worker_env.redis_prefix}-default", connection=redis, serializer=JSONSerializer)
    redis.rpush(queue.key, "bad id/../x")  # not a job id RQ accepts: its worker would stop on it
    wip = site / "site" / "posts" / "limiting-wip.md"
    enqueue_posts([wip], worker_env, redis)
    before = time.time()
    with structlog.testing.capture_logs() as events:
        run_burst_worker(worker_env, redis)
    after = time.time()
    assert "Kanban" in read_post(wip).terms("tags")  # the next job ran
    [entry] = [json.loads(raw) for raw in redis.lrange(keys.dropped(worker_env), 0, -1)]
    assert entry["job_id"] == "bad id/../x" and entry["queue"] == queue.name
    assert entry["reason"].startswith("ValueError: Job ID")  # RQ's own words for why it is not a job
    assert before <= entry["at"] <= after  # on-call sees what, why and when (however slow the machine)
    [dropped] = [e for e in events if e["event"] == "dropped"]
    assert dropped["job_id"] == "bad id/../x" and dropped["reason"] == entry["reason"]


def test_a_failed_jobs_stored_traceback_keeps_its_story_but_not_the_key(
    worker_env: Settings, fake_llm: FakeLLM, site: Path, rq_queue: Queue
) -> None:
    from worker.queue.enqueue import enqueue_posts

    redis = rq_queue.connection
    key = secrets_of(worker_env)[0]
    fake_llm.inject("auth")  # the provider's 401 echoes the key it was sent, as real ones do
    [queued] = enqueue_posts([site / "site" / "posts" / "limiting-wip.md"], worker_env, redis)
    run_burst_worker(worker_env, redis)
    job = rq_queue.fetch_job(queued.job_id)
    assert job is not None and job.get_status() == JobStatus.FAILED
    result = job.latest_result()  # what `rq info`, dashboards and on-call read, kept for the failure TTL
    assert result is not None and result.exc_string is not None
    assert "AuthenticationError" in result.exc_string and "***" in result.exc_string
    assert key not in result.exc_string and key not in json.dumps(job.meta)
    assert job.id in FailedJobRegistry(queue=rq_queue).get_job_ids()


def test_a_worker_waits_longer_each_time_redis_fails_up_to_30_s_and_starts_over_once_it_answers() -> None:
    from worker.queue.workers import Backoff

    backoff = Backoff()
    assert [backoff.next() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    backoff.reset()
    assert backoff.next() == 0.5
    assert Backoff(first=2, cap=5).next() == 2


def test_sigterm_between_jobs_stops_the_worker_loop_and_the_process(worker_env: Settings, rq_queue: Queue) -> None:
    from rq.exceptions import StopRequested

    from worker.queue.workers import STOPPING, TaggerWorker

    worker = TaggerWorker([rq_queue], connection=rq_queue.connection, serializer=JSONSerializer, settings=worker_env)
    try:
        with pytest.raises(StopRequested):  # idle: RQ stops at once
            worker.request_stop(signal.SIGTERM, None)
        assert worker.stop_requested and STOPPING.is_set()  # and run_worker does not start another loop
    finally:
        STOPPING.clear()


def test_a_worker_works_for_its_own_settings_not_a_context_left_in_the_process(
    worker_env: Settings,
    fake_llm: FakeLLM,
    site: Path,
    rq_queue: Queue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.queue.context import WorkerContext, WorkerState
    from worker.queue.enqueue import enqueue_posts

    redis = rq_queue.connection
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(site / "site", elsewhere)
    before = (elsewhere / "posts" / "limiting-wip.md").read_bytes()
    # A context built for another content root earlier in this process (another run, another test).
    monkeypatch.setattr(
        WorkerState, "context", WorkerContext.build(worker_env.model_copy(update={"content_dir": elsewhere}), redis)
    )
    wip = site / "site" / "posts" / "limiting-wip.md"
    enqueue_posts([wip], worker_env, redis)
    run_burst_worker(worker_env, redis)
    assert "Kanban" in read_post(wip).terms("tags")
    assert (elsewhere / "posts" / "limiting-wip.md").read_bytes() == before


def test_a_warm_worker_context_is_rebuilt_when_a_term_file_or_template_changes(
    worker_env: Settings, site: Path, rq_queue: Queue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.queue.context import WorkerContext

    redis = rq_queue.connection
    prompts = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", prompts)
    monkeypatch.setenv("TAGGER_PROMPTS_DIR", str(prompts))
    context = WorkerContext.build(Settings(), redis)
    assert context.reloaded(redis) is context  # nothing changed: the same warm classifier
    kanban = context.classifier.taxonomy.get("tags", "Kanban")
    term = site / "taxonomy" / "tags" / "kanban.md"
    term.write_text(term.read_text(encoding="utf-8").replace("WIP limits", "work-in-progress limits"), encoding="utf-8")
    rebuilt = context.reloaded(redis)
    assert rebuilt is not context
    changed = rebuilt.classifier.taxonomy.get("tags", "Kanban")
    assert kanban is not None and changed is not None and changed.definition_hash != kanban.definition_hash
    assert rebuilt.reloaded(redis) is rebuilt
    (prompts / "system.md").write_text((prompts / "system.md").read_text(encoding="utf-8") + "\nBe brief.\n")
    again = rebuilt.reloaded(redis)
    assert again is not rebuilt
    assert again.classifier.templates.version != rebuilt.classifier.templates.version


@pytest.mark.parametrize(
    ("lease", "grace"), [(0.4, 5.0), (2.5, 5.0), (3.0, 6.0), (10.0, 20.0), (15.0, 30.0), (100.0, 30.0)]
)
def test_a_job_counts_as_lost_after_two_leases_but_never_under_5_or_over_30_seconds(
    make_settings: MakeSettings, lease: float, grace: float
) -> None:
    from worker.queue.recovery import lost_grace

    assert lost_grace(make_settings(TAGGER_LEASE_SECONDS=lease)) == grace


def test_a_job_a_worker_took_and_never_started_is_requeued_once_after_the_grace(
    worker_env: Settings, site: Path, rq_queue: Queue
) -> None:
    from worker.queue import keys
    from worker.queue.enqueue import enqueue_posts
    from worker.queue.recovery import lost_grace, recover

    redis = rq_queue.connection
    posts = site / "site" / "posts"
    (posts / "waiting.md").write_text(
        "---\ntitle: Waiting\n---\nA post about Kanban and WIP limits.\n", encoding="utf-8"
    )
    names = ["backlog-by-value.md", "waiting.md", "limiting-wip.md", "shipping-daily.md"]
    taken, waiting, running, done = enqueue_posts([posts / name for name in names], worker_env, redis)
    queue = Queue(f"{worker_env.redis_prefix}-default", connection=redis, serializer=JSONSerializer)
    for job_id in (taken.job_id, running.job_id, done.job_id):
        queue.remove(job_id)  # taken from the queue by a worker (BLPOP) ...
    running_job = queue.fetch_job(running.job_id)
    done_job = queue.fetch_job(done.job_id)
    assert running_job is not None and done_job is not None
    with redis.pipeline() as pipe:  # ... one is running (a live worker's execution), one has ended,
        Execution.create(running_job, ttl=600, pipeline=pipe, worker_name="alive")
        running_job.set_status(JobStatus.STARTED, pipeline=pipe)
        pipe.execute()
    done_job.set_status(JobStatus.FINISHED)  # ... and the worker that took `taken` died before starting it.

    first = recover(worker_env, redis)  # the default recovery sweeps: `taken` is seen orphaned, not yet requeued
    assert first.lost == [] and not first.skipped
    assert redis.zscore(keys.pending_index(worker_env), done.job_id) is None  # ended: out of the index
    assert redis.hkeys(keys.orphans(worker_env)) == [taken.job_id.encode()]
    assert recover(worker_env, redis).lost == []  # one sweep per interval across the fleet
    redis.delete(keys.sweep_due(worker_env))
    assert (
        recover(worker_env, redis).lost == []
    )  # swept again, but its grace has not passed: a live worker may start it
    # The grace has passed (backdated rather than waited for) and the next sweep is due.
    redis.hset(keys.orphans(worker_env), taken.job_id, str(time.time() - lost_grace(worker_env) - 0.1))
    redis.delete(keys.sweep_due(worker_env))
    assert recover(worker_env, redis).lost == [taken.job_id]
    assert queue.job_ids == [waiting.job_id, taken.job_id]  # back on its queue, after the one still waiting
    requeued = queue.fetch_job(taken.job_id)
    assert requeued is not None and requeued.meta["lost"] == 1 and requeued.get_status() == JobStatus.QUEUED
    assert redis.hlen(keys.orphans(worker_env)) == 0
    redis.delete(keys.sweep_due(worker_env))
    assert recover(worker_env, redis).lost == []  # once: it is queued again, not lost
    assert recover(worker_env, redis, sweep=False).lost == []


def test_one_recovery_at_a_time_and_a_dead_recoverer_blocks_the_fleet_at_most_two_minutes(
    worker_env: Settings, rq_queue: Queue
) -> None:
    from worker.queue import keys
    from worker.queue.recovery import recover

    redis = rq_queue.connection
    other = redis.lock(keys.reaper_lock(worker_env), timeout=120)
    assert other.acquire(blocking=False)  # another process is recovering
    started = time.monotonic()
    assert recover(worker_env, redis).skipped  # it does not wait for the other one
    assert time.monotonic() - started < 5
    other.release()
    seen: list[str] = []
    with redis.monitor() as monitor:  # what recovery asks Redis for its lock, as Redis received it

        def listen() -> None:
            for command in monitor.listen():
                if keys.reaper_lock(worker_env) in command["command"] and command["command"].startswith("SET"):
                    seen.append(command["command"])
                    return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        time.sleep(0.2)
        assert not recover(worker_env, redis).skipped
        listener.join(timeout=10)
    assert len(seen) == 1, seen
    words = seen[0].replace('"', "").split()
    assert "NX" in words and "PX" in words  # taken only when free, and it expires if its holder dies
    assert 0 < int(words[words.index("PX") + 1]) <= 120_000
    assert redis.exists(keys.reaper_lock(worker_env)) == 0  # released when done


def test_an_overdue_retry_is_put_back_on_its_queue(worker_env: Settings, rq_queue: Queue) -> None:
    from datetime import UTC, datetime, timedelta

    from worker.queue.recovery import promote_overdue

    redis = rq_queue.connection
    overdue = rq_queue.enqueue_at(datetime.now(UTC) - timedelta(seconds=60), "worker.queue.jobs.classify_job", "x.md")
    recent = rq_queue.enqueue_at(datetime.now(UTC) - timedelta(seconds=1), "worker.queue.jobs.classify_job", "y.md")
    later = rq_queue.enqueue_at(datetime.now(UTC) + timedelta(seconds=600), "worker.queue.jobs.classify_job", "z.md")
    assert promote_overdue(worker_env, redis, grace=5) == [overdue.id]  # the scheduler had 5 s to do it
    assert rq_queue.job_ids == [overdue.id]
    assert promote_overdue(worker_env, redis, grace=5) == []  # once
    assert promote_overdue(worker_env, redis, grace=0) == [recent.id]
    assert later.get_status() == JobStatus.SCHEDULED


# --- a worker's shutdown, a dead scheduler's locks, and the lost-job figures ---------------------------


def _in_frame(thread: threading.Thread, *names: str) -> bool:
    """Whether `thread` is now running inside functions of all these names (its stack, innermost first)."""
    frame = sys._current_frames().get(thread.ident or -1)
    seen = set()
    while frame is not None:
        seen.add(frame.f_code.co_name)
        frame = frame.f_back
    return set(names) <= seen


def test_a_worker_ends_its_pubsub_thread_at_once_even_when_it_waits_on_its_60_s_timer(
    worker_env: Settings, rq_queue: Queue
) -> None:
    """RQ's teardown joined redis-py's pubsub thread without a limit while it sat in a 60 s wait: slow exits."""
    from worker.queue.workers import TaggerWorker

    worker = TaggerWorker([rq_queue], connection=rq_queue.connection, serializer=JSONSerializer, settings=worker_env)
    worker.subscribe()
    thread = worker.pubsub_thread
    assert thread is not None and wait_for(lambda: worker.pubsub.subscribed, 10)
    # The instant that made exits slow: the thread has read UNSUBSCRIBE's reply and waits up to 60 s to be
    # subscribed again (redis-py's get_message), and the teardown then waits for it.
    worker.pubsub.unsubscribe()
    assert wait_for(lambda: _in_frame(thread, "get_message", "wait"), 10)
    ended = threading.Event()
    stopping = threading.Thread(target=lambda: (worker.unsubscribe(), ended.set()), daemon=True)
    started = time.monotonic()
    stopping.start()
    assert ended.wait(5), "the teardown waited for the pubsub thread's 60 s timer"
    assert time.monotonic() - started < 3


def test_rqs_repeated_beats_and_state_writes_between_two_jobs_are_sent_once(
    worker_env: Settings, rq_queue: Queue
) -> None:
    """RQ beats three times and writes the idle state twice between two jobs, milliseconds apart: a round trip each
    was time between jobs. Repeats within BEAT_SPACING are not sent; a change, a pipelined beat or a later one is."""
    from worker.queue.workers import BEAT_SPACING, TaggerWorker

    redis = rq_queue.connection
    worker = TaggerWorker([rq_queue], connection=redis, serializer=JSONSerializer, settings=worker_env)
    worker.register_birth()
    try:
        worker.heartbeat()
        first = redis.hget(worker.key, "last_heartbeat")
        worker.heartbeat()
        worker.heartbeat()
        assert redis.hget(worker.key, "last_heartbeat") == first  # not sent again
        assert redis.ttl(worker.key) > worker.worker_ttl  # the first beat keeps the worker seen
        with redis.pipeline() as pipe:
            worker.heartbeat(pipeline=pipe)  # inside another round trip (RQ's suspension check): always sent
            pipe.execute()
        pipelined = redis.hget(worker.key, "last_heartbeat")
        assert pipelined != first
        worker.beaten -= BEAT_SPACING  # as if a second had passed (a job ran)
        worker.heartbeat()
        assert redis.hget(worker.key, "last_heartbeat") != pipelined

        worker.set_state("idle")
        redis.hset(worker.key, "state", "probe")  # shows whether the next write reaches Redis
        worker.set_state("idle")
        assert redis.hget(worker.key, "state") == b"probe"  # the same state again at once: not written
        worker.set_state("busy")
        assert redis.hget(worker.key, "state") == b"busy"  # a change always is
        worker.state_written -= BEAT_SPACING
        redis.hset(worker.key, "state", "probe")
        worker.set_state("busy")
        assert redis.hget(worker.key, "state") == b"busy"  # and the same state a second later
    finally:
        worker.register_death()


def test_a_scheduler_that_died_holding_its_locks_has_them_released_by_its_worker(
    worker_env: Settings, rq_queue: Queue
) -> None:
    """kill -9 of RQ's scheduler leaves its locks for a minute; the worker's teardown releases them."""
    from rq.scheduler import RQScheduler

    from worker.queue.workers import TaggerWorker

    redis = rq_queue.connection
    worker = TaggerWorker([rq_queue], connection=redis, serializer=JSONSerializer, settings=worker_env)
    scheduler = worker.scheduler = RQScheduler([rq_queue], connection=redis, serializer=JSONSerializer)
    assert scheduler.acquire_locks() == {rq_queue.name}  # held under its name, as by a scheduler killed since
    scheduler.register_birth()
    other = RQScheduler.get_locking_key(f"{worker_env.redis_prefix}-low")
    redis.set(other, "another-scheduler")  # another fleet's lock: not this worker's to release
    worker.stop_scheduler()
    assert redis.get(RQScheduler.get_locking_key(rq_queue.name)) is None
    assert not redis.exists(scheduler.key) and redis.get(other) == b"another-scheduler"


def lose(settings: Settings, redis: redis_lib.Redis, post: Path) -> str:
    """Enqueue `post`, then take its job off the queue as a worker's BLPOP would before dying: lost."""
    from worker.queue.enqueue import enqueue_posts

    [item] = enqueue_posts([post], settings, redis)
    Queue(f"{settings.redis_prefix}-default", connection=redis, serializer=JSONSerializer).remove(item.job_id)
    return item.job_id


def requeued_at(redis: redis_lib.Redis, job_id: str) -> float | None:
    """When recovery put a lost job back on its queue, or None."""
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    return job.enqueued_at.timestamp() if job.meta.get("lost") and job.enqueued_at else None


def test_a_lost_job_is_requeued_when_its_grace_ends_not_up_to_half_a_lease_later(
    worker_env: Settings, rq_queue: Queue, site: Path
) -> None:
    """README: requeued once it stayed lost for its grace after a sweep first saw it. With 20 s leases the
    reaper passes every 10 s; a job whose grace ends in 1 s is requeued then, even if a sweep just ran."""
    from worker.queue import keys
    from worker.queue.recovery import lost_grace
    from worker.queue.workers import _reaper

    redis = rq_queue.connection
    settings = worker_env.model_copy(update={"lease_seconds": 20.0})
    stop = threading.Event()
    try:
        job_id = lose(settings, redis, site / "site" / "posts" / "limiting-wip.md")
        first_seen = time.time() - lost_grace(settings) + 1.0  # seen by a sweep grace - 1 s ago
        redis.hset(keys.orphans(settings), job_id, str(first_seen))
        redis.set(keys.sweep_due(settings), "1", px=60_000)  # and a sweep just ran somewhere in the fleet
        threading.Thread(target=_reaper, args=(settings, redis, stop), daemon=True).start()
        assert wait_for(lambda: requeued_at(redis, job_id) is not None, 8), "not requeued when its grace ended"
        when = requeued_at(redis, job_id)
        assert when is not None and lost_grace(settings) <= when - first_seen <= lost_grace(settings) + 2.0
    finally:
        stop.set()


@pytest.mark.parametrize("remote", [False, True], ids=["shared-folder", "remote"])
def test_a_usage_counter_someone_overwrote_loses_its_count_not_the_job(
    worker_env: Settings, fake_llm: FakeLLM, site: Path, rq_queue: Queue, remote: bool
) -> None:
    """Redis is untrusted input: a job's end counts its usage in its transaction; a counter that holds text
    fails that INCRBY alone, and the job still ends done (before, every job of that minute failed and retried)."""
    from worker.queue import keys
    from worker.queue.enqueue import enqueue_posts

    redis = rq_queue.connection
    minute = int(time.time() // 60)
    for m in (minute, minute + 1):  # the job may end in the next minute
        redis.set(keys.stats(worker_env, "done", m), "not a number", ex=600)
    wip = site / "site" / "posts" / "limiting-wip.md"
    [entry] = enqueue_posts([wip], worker_env, redis, remote=remote)
    with structlog.testing.capture_logs() as events:
        run_burst_worker(worker_env, redis)
    assert remote or "Kanban" in read_post(wip).terms("tags")  # a remote job's result waits for `apply`
    assert Job.fetch(entry.job_id, connection=redis, serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    assert any(e["event"] == "usage_not_counted" for e in events)
    assert (
        int(redis.get(keys.stats(worker_env, "calls", minute)) or 0)
        + int(redis.get(keys.stats(worker_env, "calls", minute + 1)) or 0)
        == 1
    )  # the other counters still count


@pytest.mark.parametrize(
    "stored",
    [b"not a time", b"nan", b"inf", str(time.time() + 3600).encode()],
    ids=["not a time", "nan", "inf", "an hour ahead"],  # the same names in every collecting process (xdist)
)
def test_a_first_seen_time_in_redis_that_is_not_one_counts_as_seen_now(
    worker_env: Settings, rq_queue: Queue, site: Path, stored: bytes
) -> None:
    """Redis is untrusted input: a planted first-seen value neither requeues the job at once nor stalls it."""
    from worker.queue import keys
    from worker.queue.recovery import orphan_due, recover

    redis = rq_queue.connection
    job_id = lose(worker_env, redis, site / "site" / "posts" / "limiting-wip.md")
    redis.hset(keys.orphans(worker_env), job_id, stored)
    assert orphan_due(worker_env, redis) is None
    before = time.time()
    assert recover(worker_env, redis).lost == []  # not requeued on a planted time
    reset = float(redis.hget(keys.orphans(worker_env), job_id) or 0)
    assert before <= reset <= time.time()  # seen now: requeued once its grace from now has passed
    due = orphan_due(worker_env, redis)
    assert due is not None and abs(due - reset - 5.0) < 0.01
