"""The post's bytes are the truth: every memory of "done" is checked against the file, and `tagger verify` says so.

A write that did not land, a post restored by `git checkout`, a record copied from another checkout make the post
due again (and `verify` lists it); a person's removal stays a person's removal. `verify` lists each kind of drift,
exits 1 when any, and `--inline` heals what classifying can heal, with no LLM call for what is judged already.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests import commands
from tests.conftest import fill_disk
from tests.fakellm import FakeLLM
from worker.backfill import plan, run_inline
from worker.classifier import make_classifier
from worker.cli import main
from worker.errors import PostWriteFailed
from worker.posts import read_post
from worker.records import Pending
from worker.settings import Settings
from worker.verify import verify

SCORES = {"Kanban": 90.0, "Flow and Kanban": 85.0}


def posts_of(site: Path) -> Path:
    return site / "site" / "posts"


def cli_env(site: Path, fake: FakeLLM, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_", "REDIS_"))}
    env.update(
        TAGGER_PROVIDER="openai",
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY="sk-verify-0123456789",
        TAGGER_MODEL="fake-model",
        TAGGER_TAXONOMY_DIR=str(site / "taxonomy"),
        TAGGER_CONTENT_DIR=str(site / "site"),
        REDIS_URL="redis://127.0.0.1:1/0",  # nobody answers: verify says failed jobs were not checked
        **more,
    )
    return env


def kinds(settings: Settings) -> dict[str, str]:
    return {d.post: d.kind for d in verify(settings).drifted}


@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake_llm: FakeLLM) -> Settings:
    fake_llm.score(SCORES, default=0)
    return make_settings()


def test_a_write_that_did_not_land_is_due_again_and_verify_inline_heals_it(
    settings: Settings, site: Path, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = posts_of(site) / "limiting-wip.md"
    original = path.read_bytes()
    real_replace = os.replace

    def full_disk(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if str(dst) == str(path):  # the post's rename fails; its record (announced first) was written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(PostWriteFailed):
        make_classifier(settings).classify(path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == original
    # Before: "fresh (up to date)" for ever, since the record held every judgement.
    assert path in plan(settings).todo
    assert kinds(settings)["posts/limiting-wip.md"] == "not_written"
    calls = fake_llm.counts["requests"]
    run = CliRunner().invoke(main, ["verify", "--inline"], env=cli_env(site, fake_llm))
    assert run.exit_code == 0, run.output
    assert "not_written    posts/limiting-wip.md: a write tagger announced did not land" in run.stdout
    assert "verify again: 0 drifted" in run.stdout
    assert (
        fake_llm.counts["requests"] - calls == 2
    )  # one packed call for each post never classified; 0 for the unwritten one
    assert read_post(path).terms("tags") == ["Lean", "Kanban"]
    assert kinds(settings) == {}
    assert CliRunner().invoke(main, ["verify"], env=cli_env(site, fake_llm)).exit_code == 0


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def test_a_post_restored_by_git_checkout_is_due_again_and_gets_its_terms_back(
    settings: Settings, site: Path, fake_llm: FakeLLM
) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    content = site / "site"
    _git(content, "init", "-q")
    _git(content, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "posts", "--allow-empty")
    _git(content, "add", "posts")
    _git(content, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "posts")
    summary = run_inline(settings, plan(settings).todo)
    assert summary.written == 2 and kinds(settings) == {}
    path = posts_of(site) / "limiting-wip.md"
    assert "Kanban" in read_post(path).terms("tags")
    _git(content, "checkout", "--", "posts/limiting-wip.md")  # the post only; its record stays
    assert "Kanban" not in read_post(path).terms("tags")
    assert plan(settings).todo == [path]
    assert kinds(settings) == {"posts/limiting-wip.md": "not_written"}
    calls = fake_llm.counts["requests"]
    assert run_inline(settings, plan(settings).todo).written == 1
    assert fake_llm.counts["requests"] == calls  # judged already: no call
    assert read_post(path).terms("tags") == ["Lean", "Kanban"]  # not taken for a person's removal
    record = make_classifier(settings).records.load(path)
    assert record.assigned["tags"] == ["Kanban"] and not record.removed_by_people.get("tags")
    assert kinds(settings) == {}


def test_a_record_copied_from_another_checkout_makes_the_post_due_and_written(
    settings: Settings, site: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(site / "site", other)  # another checkout of the same site, before tagger ran there
    run_inline(settings, plan(settings).todo)
    for record in posts_of(site).glob("data.*.tagger.json"):
        shutil.copyfile(record, other / "posts" / record.name)
    elsewhere = settings.model_copy(update={"content_dir": other})
    path = other / "posts" / "limiting-wip.md"
    assert path in plan(elsewhere).todo
    assert kinds(elsewhere)["posts/limiting-wip.md"] == "not_written"
    run_inline(elsewhere, plan(elsewhere).todo)
    assert read_post(path).terms("tags") == ["Lean", "Kanban"]
    assert kinds(elsewhere) == {}


def test_a_term_a_person_removed_is_due_once_then_stays_removed(
    settings: Settings, site: Path, fake_llm: FakeLLM
) -> None:
    run_inline(settings, plan(settings).todo)
    path = posts_of(site) / "limiting-wip.md"
    path.write_text(path.read_text(encoding="utf-8").replace("  - Kanban\n", ""), encoding="utf-8")
    assert kinds(settings) == {"posts/limiting-wip.md": "terms_missing"}
    calls = fake_llm.counts["requests"]
    result = make_classifier(settings).classify(path)
    assert fake_llm.counts["requests"] == calls and not result.written
    assert read_post(path).terms("tags") == ["Lean"]
    assert make_classifier(settings).records.load(path).removed_by_people["tags"] == ["Kanban"]
    assert kinds(settings) == {} and plan(settings).todo == []


def test_verify_names_each_kind_of_drift_and_exits_1(settings: Settings, site: Path, fake_llm: FakeLLM) -> None:
    run_inline(settings, plan(settings).todo)
    folder = posts_of(site)
    classifier = make_classifier(settings)
    (folder / "new.md").write_text("---\ntitle: New\n---\nKanban boards.\n", encoding="utf-8")
    edited = folder / "shipping-daily.md"
    edited.write_text(edited.read_text(encoding="utf-8").replace("[params]", "weight = 3\n\n[params]"), "utf-8")
    unsettled = folder / "limiting-wip.md"
    record = classifier.records.load(unsettled)
    classifier.records.save(unsettled, record.model_copy(update={"pending": Pending(before_file_hash="0" * 16)}))
    (folder / "broken.md").write_text("---\ntitle: [unclosed\n---\nbody\n", encoding="utf-8")
    (folder / "readme.md").write_text("No front matter: skipped by default.\n", encoding="utf-8")
    run = CliRunner().invoke(main, ["verify"], env=cli_env(site, fake_llm))
    assert run.exit_code == 1
    lines = run.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == sorted(line.split()[1] for line in lines[:-1])
    by_post = {line.split()[1].rstrip(":"): line for line in lines[:-1]}
    assert by_post["posts/shipping-daily.md"].startswith("file_changed ")
    assert by_post["posts/limiting-wip.md"].startswith("unsettled ")
    assert by_post["posts/new.md"] == "record_missing posts/new.md: no result record"
    assert by_post["posts/broken.md"].startswith("unreadable     posts/broken.md: bad_post: malformed YAML")
    assert "posts/readme.md" not in by_post and "posts/backlog-by-value.md" not in by_post
    assert lines[-1] == (
        "verify: 6 posts checked (1 without front matter or content, not verified), 4 drifted: "
        "unsettled 1, record_missing 1, file_changed 1, unreadable 1"
    )
    assert "failed jobs not checked: Redis at redis://127.0.0.1:1/0 does not answer" in run.stderr
    as_json = json.loads(CliRunner().invoke(main, ["verify", "--json"], env=cli_env(site, fake_llm)).stdout)
    assert as_json["by_kind"] == {"unsettled": 1, "record_missing": 1, "file_changed": 1, "unreadable": 1}
    # A term's definition changed: its judgements are stale (judged with an older taxonomy).
    kanban = site / "taxonomy" / "tags" / "kanban.md"
    kanban.write_text(kanban.read_text(encoding="utf-8").replace("WIP limits and pull", "WIP limits, pull"), "utf-8")
    stale = {d.post: d for d in verify(settings).drifted}
    assert stale["posts/backlog-by-value.md"].kind == "stale"
    assert "the term's definition changed" in stale["posts/backlog-by-value.md"].detail
    calls = fake_llm.counts["requests"]
    (folder / "broken.md").unlink()
    healed = CliRunner().invoke(main, ["verify", "--inline"], env=cli_env(site, fake_llm))
    assert healed.exit_code == 0, healed.output
    assert fake_llm.counts["requests"] > calls  # the changed term is asked again: a real re-judgement
    assert verify(settings).drifted == []


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.md"))
        if p.is_file()
    }


def test_eval_leaves_every_post_byte_identical_in_all_its_forms(site: Path, fake_llm: FakeLLM, tmp_path: Path) -> None:
    fake_llm.score(SCORES, default=0)
    env = cli_env(site, fake_llm)
    before = digest(site / "site")
    runner = CliRunner()
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"post": "posts/limiting-wip.md", "tags": ["Kanban"]}) + "\n", encoding="utf-8")
    a, b = tmp_path / "a.env", tmp_path / "b.env"
    a.write_text("TAGGER_REPLY=all\n", encoding="utf-8")
    b.write_text("TAGGER_REPLY=relevant\n", encoding="utf-8")
    forms = [
        ["eval"],
        ["eval", "--json"],
        ["eval", "--report", str(tmp_path / "report.html")],
        ["eval", "--gold", str(gold)],
        ["eval", "--compare", str(a), str(b)],
    ]
    for form in forms:
        run = runner.invoke(main, form, env=env)
        assert run.exit_code == 0, (form, run.output)
        assert digest(site / "site") == before, form
    assert (tmp_path / "report.html").stat().st_size > 0
    assert fake_llm.counts["requests"] > 0  # the forms did judge


@pytest.mark.slow
@pytest.mark.redis
def test_a_full_disk_backfill_is_listed_by_verify_and_healed_by_verify_fix_and_a_worker(
    queue_env: dict[str, str], small_tmpfs: Path, site: Path, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """The posts on a full tmpfs (their records on another disk): the backfill's writes fail (post_write), space
    is freed, `verify` lists exactly those posts, `verify --fix` plus a burst worker heals them, `verify` exits 0."""
    fake_llm.score(SCORES, default=0)
    shutil.copytree(site / "site", small_tmpfs / "site")
    content = small_tmpfs / "site"
    env = {**queue_env, "TAGGER_CONTENT_DIR": str(content), "TAGGER_RECORDS_DIR": str(tmp_path / "records")}
    fill_disk(small_tmpfs)

    def tagger(*args: str) -> subprocess.CompletedProcess[str]:
        return commands.tagger(env, *args, timeout=120)

    before = digest(content)
    backfill = tagger("backfill", str(content), "--inline")
    assert backfill.returncode == 1
    failed = sorted(line.split()[1].rstrip(":") for line in backfill.stderr.splitlines() if line.startswith("FAILED"))
    assert failed == [str(content / "posts" / "limiting-wip.md"), str(content / "posts" / "shipping-daily.md")]
    assert all("post_write" in line for line in backfill.stderr.splitlines() if line.startswith("FAILED"))
    assert digest(content) == before  # nothing half-written
    (small_tmpfs / "filler").unlink()
    listed = tagger("verify")
    assert listed.returncode == 1, listed.stderr
    drifted = {line.split()[1].rstrip(":"): line.split()[0] for line in listed.stdout.splitlines()[:-1]}
    assert drifted == {"posts/limiting-wip.md": "not_written", "posts/shipping-daily.md": "not_written"}
    assert listed.stdout.splitlines()[-1] == "verify: 3 posts checked, 2 drifted: not_written 2"
    fix = tagger("verify", "--fix")
    assert fix.returncode == 1 and "fix: 2 enqueued" in fix.stdout, fix.stdout + fix.stderr
    calls = fake_llm.counts["requests"]
    work = tagger("work", "--burst")
    assert work.returncode == 0, work.stderr[-2000:]
    assert fake_llm.counts["requests"] == calls  # judged during the failed backfill: healing asks nothing
    healed = tagger("verify")
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert healed.stdout.splitlines()[-1] == "verify: 3 posts checked, 0 drifted"
    assert read_post(content / "posts" / "limiting-wip.md").terms("tags") == ["Lean", "Kanban"]
    assert "Kanban" in read_post(content / "posts" / "shipping-daily.md").terms("tags")


@pytest.mark.redis
def test_verify_fix_exits_1_when_it_enqueued_the_drift_and_3_when_redis_does_not_answer(
    queue_env: dict[str, str], fake_llm: FakeLLM
) -> None:
    """A script tells apart drift handed to the workers (1) from a fix that could not be enqueued (3)."""
    fake_llm.score(SCORES, default=0)
    down_env = {**queue_env, "REDIS_URL": "redis://127.0.0.1:1/0"}  # nobody answers
    # A fresh site: no post has a record yet, so every post drifted.
    down = commands.tagger(down_env, "verify", "--fix")
    assert down.returncode == 3, down.stdout + down.stderr
    assert "record_missing" in down.stdout and "drifted: record_missing" in down.stdout  # still checked and listed
    assert "verify --fix: nothing enqueued, Redis does not answer" in down.stderr and "Traceback" not in down.stderr
    up = commands.tagger(queue_env, "verify", "--fix")
    assert up.returncode == 1, up.stdout + up.stderr
    assert re.search(r"^fix: [1-9][0-9]* enqueued", up.stdout, re.M), up.stdout
    # Once nothing drifted: 0 with Redis, still 3 without it (failed jobs unchecked, nothing could be enqueued).
    assert commands.tagger(down_env, "verify", "--inline").returncode == 0
    assert commands.tagger(queue_env, "verify", "--fix").returncode == 0
    assert commands.tagger(down_env, "verify", "--fix").returncode == 3


@pytest.mark.slow
@pytest.mark.redis
def test_a_failed_job_pending_for_a_post_is_listed_until_it_is_run_again(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    fake_llm.score(SCORES, default=0)

    def tagger(*args: str) -> subprocess.CompletedProcess[str]:
        return commands.tagger(queue_env, *args, timeout=120)

    path = posts_of(site) / "limiting-wip.md"
    path.chmod(0o444)  # its job fails at once (post_read_only), not retried
    assert tagger("enqueue", str(path)).returncode == 0
    assert tagger("work", "--burst").returncode == 0
    path.chmod(0o644)
    assert tagger("backfill", "--inline", str(site / "site")).returncode == 0  # classified since, the job still failed
    listed = tagger("verify")
    assert listed.returncode == 1, listed.stdout + listed.stderr
    assert listed.stdout.splitlines()[0].startswith("failed_job     posts/limiting-wip.md: post_read_only: ")
    assert listed.stdout.splitlines()[-1] == "verify: 3 posts checked, 1 drifted: failed_job 1"
    assert "fix: 1 enqueued" in tagger("verify", "--fix").stdout
    assert tagger("work", "--burst").returncode == 0
    assert tagger("verify").returncode == 0


def test_a_post_restored_from_before_two_tagger_writes_gets_its_terms_back(
    settings: Settings, site: Path, fake_llm: FakeLLM
) -> None:
    """`git checkout` of the site from before tagger ran, after tagger wrote a post twice (a second write came with
    another model): the terms of both writes are absent, and that is not a person's removal."""
    path = posts_of(site) / "limiting-wip.md"
    original = path.read_bytes()
    fake_llm.score({"Kanban": 90.0, "Flow and Kanban": 0.0}, default=0)
    assert run_inline(settings, [path]).written == 1
    fake_llm.score(SCORES, default=0)
    second = settings.model_copy(update={"model": "another-model"})  # judged again: one more term, a second write
    assert run_inline(second, [path]).written == 1
    assert read_post(path).terms("categories") == ["Flow and Kanban"]
    path.write_bytes(original)  # what `git checkout <commit before tagger> -- posts/` does; the record stays
    assert kinds(second)["posts/limiting-wip.md"] == "not_written"  # was terms_missing
    calls = fake_llm.counts["requests"]
    assert run_inline(second, [path]).written == 1
    assert fake_llm.counts["requests"] == calls  # judged already: no call
    post = read_post(path)
    assert (post.terms("tags"), post.terms("categories")) == (["Lean", "Kanban"], ["Flow and Kanban"])
    record = make_classifier(second).records.load(path)  # not a person's removal
    assert not record.removed_by_people.get("tags") and not record.removed_by_people.get("categories")
    assert "posts/limiting-wip.md" not in kinds(second)


def test_a_page_bundle_copied_to_start_a_new_post_does_not_inherit_the_old_posts_record(
    settings: Settings, site: Path, fake_llm: FakeLLM
) -> None:
    """`cp -r old-post new-post` (the record beside `index.md` comes along), then the new post written with its
    terms cleared: the old post's terms are not the new post's removals, so they are not blocked for ever."""
    old = posts_of(site) / "old-post" / "index.md"
    old.parent.mkdir()
    shutil.move(posts_of(site) / "limiting-wip.md", old)
    assert run_inline(settings, [old]).written == 1
    assert read_post(old).terms("tags") == ["Lean", "Kanban"]
    new = posts_of(site) / "new-post" / "index.md"
    shutil.copytree(old.parent, new.parent)
    text = new.read_text(encoding="utf-8")
    new.write_text(text.replace("  - Kanban\n", "").replace("Why limiting", "How limiting"), encoding="utf-8")
    assert "Kanban" not in read_post(new).terms("tags")
    assert kinds(settings)["posts/new-post/index.md"] == "record_missing"  # was terms_missing
    assert run_inline(settings, [new]).written == 1
    assert read_post(new).terms("tags") == ["Lean", "Kanban"]  # was never given again: "removed by people"
    record = make_classifier(settings).records.load(new)
    assert record.post == "posts/new-post/index.md" and not record.removed_by_people.get("tags")
    assert make_classifier(settings).records.load(old).assigned["tags"] == ["Kanban"]  # the old post's, as it was
