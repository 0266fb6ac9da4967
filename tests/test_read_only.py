"""Read-only posts are left alone; a rewritten post keeps its mode and owner."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from tests.commands import tagger
from tests.fakellm import FakeLLM
from worker import batch_backfill as batch
from worker.backfill import plan, run_inline
from worker.classifier import Classifier
from worker.errors import PostReadOnly
from worker.posts import read_only, read_post, write_atomic
from worker.records import record_path
from worker.settings import Settings
from worker.writeback import write_back

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner (chown) needs root")


def wip(site: Path) -> Path:
    return site / "site" / "posts" / "limiting-wip.md"


@pytest.mark.parametrize("mode", [0o444, 0o400, 0o555, 0o464], ids=oct)
def test_a_read_only_post_is_neither_judged_nor_written(
    classifier: Classifier, fake_llm: FakeLLM, site: Path, mode: int
) -> None:
    post = wip(site)
    os.chmod(post, mode)
    before = post.read_bytes()
    with pytest.raises(PostReadOnly) as caught:
        classifier.classify(post)
    assert caught.value.kind == "post_read_only" and not caught.value.transient
    assert caught.value.path == str(post) and f"{mode:04o}" in caught.value.message
    assert post.read_bytes() == before and post.stat().st_mode & 0o7777 == mode
    assert fake_llm.counts["requests"] == 0  # nothing is spent on a post that cannot be written
    assert not record_path(post).exists()


def test_a_locked_post_keeps_its_record_byte_identical(classifier: Classifier, fake_llm: FakeLLM, site: Path) -> None:
    post = wip(site)
    assert classifier.classify(post).written
    post.write_bytes(post.read_bytes() + b"\nA new paragraph about flow.\n")  # due again
    os.chmod(post, 0o444)
    text, record = post.read_bytes(), record_path(post).read_bytes()
    calls = fake_llm.counts["requests"]
    with pytest.raises(PostReadOnly):
        classifier.classify(post)
    assert post.read_bytes() == text and record_path(post).read_bytes() == record
    assert fake_llm.counts["requests"] == calls


def test_a_post_locked_after_it_was_judged_is_refused_and_its_record_claims_no_write(
    classifier: Classifier, site: Path
) -> None:
    post_path = wip(site)
    post = classifier.read(post_path)
    stored = classifier.records.load(post_path)
    decided = classifier.decide(post, stored)
    assert decided.new_text is not None
    os.chmod(post_path, 0o444)  # the owner locks it while the job was judging
    with pytest.raises(PostReadOnly):
        write_back(classifier.records, post_path, post, stored, stored, decided.new_text, decided.record)
    assert post_path.read_bytes() == post.raw
    record = classifier.records.load(post_path)
    assert record.pending is None and record.assigned == {} and record.added_keys == []
    assert not any(p.name.endswith(".tagger-tmp") for p in post_path.parent.iterdir())


def test_atomic_write_refuses_a_read_only_post_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "post.md"
    path.write_bytes(b"---\ntitle: Locked\n---\nbody\n")
    post = read_post(path)
    os.chmod(path, 0o444)
    with pytest.raises(PostReadOnly):
        write_atomic(post, "---\ntitle: Locked\ntags: [A]\n---\nbody\n")
    assert path.read_bytes() == post.raw and os.listdir(tmp_path) == ["post.md"]


@needs_root
@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664, 0o640], ids=oct)
def test_a_rewritten_post_keeps_its_mode_owner_and_group(classifier: Classifier, site: Path, mode: int) -> None:
    post = wip(site)
    os.chown(post, 4321, 8765)
    os.chmod(post, mode)
    inode = post.stat().st_ino
    assert classifier.classify(post).written
    after = post.stat()
    assert after.st_ino != inode  # replaced by rename, not edited in place
    assert (after.st_mode & 0o7777, after.st_uid, after.st_gid) == (mode, 4321, 8765)


def test_read_only_follows_the_bits_of_the_writers_class(tmp_path: Path) -> None:
    path = tmp_path / "post.md"
    path.write_bytes(b"body\n")
    for mode, locked in [(0o644, False), (0o200, False), (0o444, True), (0o464, True), (0o446, True)]:
        os.chmod(path, mode)
        # This process owns the file (or is root): only the owner's bit counts.
        assert read_only(path) is locked, oct(mode)


@needs_root
def test_another_users_post_is_not_replaced_through_a_writable_folder() -> None:
    """A user who may not write a post must not replace it by rename (which would also make it theirs)."""
    with tempfile.TemporaryDirectory() as scratch:  # not under tmp_path: pytest's base folder is root's alone
        os.chmod(scratch, 0o755)
        folder = Path(scratch) / "shared"
        folder.mkdir()
        os.chown(folder, NOBODY, NOBODY)  # nobody may create and rename files here
        _refused_for_nobody(folder)


def _refused_for_nobody(folder: Path) -> None:
    post = folder / "post.md"
    post.write_bytes(b"---\ntitle: Root's post\n---\nbody\n")
    os.chmod(post, 0o644)  # root's, not writable by nobody
    read = read_post(post)
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and tries the write tagger would make
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            write_atomic(read, read.raw.decode() + "more\n")
            code = 0
        except PostReadOnly:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3  # 0: replaced; 1: something else broke
    assert post.read_bytes() == read.raw and post.stat().st_uid == 0


def test_inline_backfill_skips_a_locked_post_and_writes_the_others(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings()
    os.chmod(wip(site), 0o444)
    before = wip(site).read_bytes()
    planned = plan(settings)
    assert wip(site) not in planned.todo and len(planned.todo) == 2
    [skipped] = planned.skipped
    assert skipped.startswith(f"{wip(site)}: post_read_only: ")
    # Locked between planning and classifying: counted as skipped, not failed.
    summary = run_inline(settings, [*planned.todo, wip(site)])
    assert summary.done == 2 and not summary.failed
    assert [line.split(": ")[:2] for line in summary.skipped] == [[str(wip(site)), "post_read_only"]]
    assert wip(site).read_bytes() == before


def test_classify_command_reports_a_locked_post_as_skipped(site: Path, fake_llm: FakeLLM) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_"))}
    env.update(
        TAGGER_TAXONOMY_DIR=str(site / "taxonomy"),
        TAGGER_CONTENT_DIR=str(site / "site"),
        OPENAI_BASE_URL=fake_llm.base_url,
        OPENAI_API_KEY="sk-cli-secret-0123456789",
        TAGGER_MODEL="fake",
    )
    other = site / "site" / "posts" / "shipping-daily.md"
    os.chmod(wip(site), 0o444)
    before = wip(site).read_bytes()
    run = tagger(env, "classify", str(wip(site)), str(other))
    assert run.returncode == 1
    assert f"SKIPPED {wip(site)}: post_read_only: the post is read-only (mode 0444)" in run.stderr
    assert "FAILED" not in run.stderr
    assert wip(site).read_bytes() == before and "written" in run.stdout
    backfill = tagger({**env, "REDIS_URL": "redis://127.0.0.1:1/0"}, "backfill", "--inline", str(site / "site"))
    assert backfill.returncode == 1
    assert "0 failed, 1 skipped" in backfill.stdout
    assert f"SKIPPED {wip(site)}: post_read_only:" in backfill.stderr


@pytest.mark.slow
@pytest.mark.redis
def test_a_queued_job_for_a_locked_post_fails_at_once_as_post_read_only(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, redis: redis_lib.Redis
) -> None:
    os.chmod(wip(site), 0o444)
    before = wip(site).read_bytes()
    assert tagger(queue_env, "enqueue", str(wip(site))).returncode == 0
    tagger(queue_env, "work", "--burst")
    listing = tagger(queue_env, "failed", "list").stdout
    assert "post_read_only" in listing, listing
    job_id = next(line.split()[0] for line in listing.splitlines() if "post_read_only" in line)
    shown = tagger(queue_env, "failed", "show", job_id).stdout
    assert "attempts: 1" in shown  # not transient: no retry (TAGGER_JOB_RETRIES is 1 here)
    assert wip(site).read_bytes() == before and fake_llm.counts["requests"] == 0
    assert not record_path(wip(site)).exists()


def test_batch_collect_leaves_a_post_locked_after_submission_and_reports_it(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings()
    store = batch.store_for(settings, None)
    batch.submit(settings, plan(settings).todo, store)
    os.chmod(wip(site), 0o444)
    before = wip(site).read_bytes()
    result = batch.collect(settings, store)
    assert [line.split(": ")[:2] for line in result.failed] == [[str(wip(site)), "post_read_only"]]
    assert wip(site).read_bytes() == before and len(result.written) + len(result.unchanged) == 2
