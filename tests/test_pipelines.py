"""Pipelines never lose a write: `apply --commit` killed anywhere, fresh checkouts, restored trees, shared runners.

Everything through the CLI, real Redis, real RQ workers, the fake OpenAI server (and its Batch API) and real git
repositories in tmp. A kill lands at a named boundary through a `sitecustomize` the test puts on the killed
process's PYTHONPATH (it wraps `os.replace` and `subprocess.run` and SIGKILLs its own process there), so no
assertion depends on timing.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Queue
from rq.serializers import JSONSerializer

from tests.commands import tagger, tagger_process
from tests.fakellm import FakeLLM

pytestmark = [pytest.mark.redis, pytest.mark.slow]  # they start tagger and worker processes
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
KILL_HOOK = textwrap.dedent(
    """
    import os, signal, subprocess

    _kind, _, _count = os.environ.get("TAGGER_TEST_KILL_AT", "").partition(":")
    _seen = [0]

    def _die():
        os.kill(os.getpid(), signal.SIGKILL)

    def _count_and_die():
        _seen[0] += 1
        if _seen[0] >= int(_count or 1):
            _die()

    _replace = os.replace

    def _replacing(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        if _kind == "post" and str(dst).endswith(".md"):
            _count_and_die()  # the post is replaced; its record still announces the write
        if _kind == "record" and str(dst).endswith(".tagger.json"):
            _count_and_die()

    _run = subprocess.run

    def _running(args, *rest, **kwargs):
        is_commit = isinstance(args, (list, tuple)) and "commit" in args
        if is_commit and _kind == "before-commit":
            _die()  # every post written and staged, nothing committed
        done = _run(args, *rest, **kwargs)
        if is_commit and _kind == "after-commit":
            _die()  # committed; apply's own memory not yet updated
        return done

    if _kind:
        os.replace = _replacing
        subprocess.run = _running
    """
)


def git(checkout: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=checkout, capture_output=True, text=True, check=True).stdout


def make_checkout(site: Path, checkout: Path, copies: int = 3) -> None:
    """The demo posts plus copies (each its own job), committed in a git repository of its own."""
    shutil.copytree(site / "site", checkout)
    wip = (checkout / "posts" / "limiting-wip.md").read_text("utf-8")
    for n in range(1, copies + 1):
        (checkout / "posts" / f"wip-{n}.md").write_text(wip + f"\nCopy {n} of the post.\n", "utf-8")
    git(checkout, "init", "-q")
    git(checkout, "add", ".")
    git(checkout, "commit", "-qm", "base")


def posts(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text("utf-8") for p in sorted(folder.rglob("*.md"))}


def honest(env: dict[str, str], checkout: Path, tmp_path: Path, name: str = "honest") -> dict[str, str]:
    """Each post as shared-folder `classify` leaves it (remote mode and Batch API give the same front matter)."""
    copy = tmp_path / name
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git"))
    run = tagger({**env, "TAGGER_CONTENT_DIR": str(copy)}, "classify", *sorted(posts(copy)), cwd=copy)
    assert run.returncode == 0, run.stdout + run.stderr
    return posts(copy)


def committed(checkout: Path) -> dict[str, str]:
    """The posts as HEAD holds them."""
    names = git(checkout, "ls-tree", "-r", "--name-only", "HEAD").split()
    return {n: git(checkout, "show", f"HEAD:{n}") for n in names if n.endswith(".md")}


def remote_env(queue_env: dict[str, str], checkout: Path, tmp_path: Path) -> dict[str, str]:
    return {
        **queue_env,
        **GIT_ENV,
        "TAGGER_CONTENT_DIR": str(checkout),
        "TAGGER_STATE_FILE": str(tmp_path / "state" / f"{checkout.name}.json"),
    }


def remote_work(env: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "worker-machine"
    folder.mkdir(exist_ok=True)
    worker = {k: v for k, v in env.items() if k not in ("TAGGER_CONTENT_DIR", "TAGGER_TAXONOMY_DIR")}
    worker.pop("TAGGER_STATE_FILE", None)
    run = tagger({**worker, "TAGGER_JOB_MODE": "remote"}, "work", "--burst", cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]


# --- apply --commit killed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kill_at", ["post:1", "record:3", "post:4", "before-commit", "after-commit"])
def test_apply_commit_killed_anywhere_then_run_again_commits_every_write(
    kill_at: str, queue_env: dict[str, str], site: Path, tmp_path: Path
) -> None:
    checkout = tmp_path / "checkout"
    make_checkout(site, checkout)
    env = remote_env(queue_env, checkout, tmp_path)
    expected = honest(env, checkout, tmp_path)
    enq = tagger(env, "enqueue", "--remote", *sorted(posts(checkout)), cwd=checkout)
    assert enq.returncode == 0, enq.stderr
    remote_work(env, tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK, "utf-8")
    killed = tagger_process(  # a process: the hook kills it
        {**env, "PYTHONPATH": str(hook), "TAGGER_TEST_KILL_AT": kill_at}, "apply", "--commit", cwd=checkout
    )
    assert killed.returncode == -9, f"the hook did not kill apply at {kill_at}: {killed.stdout}{killed.stderr}"
    rerun = tagger(env, "apply", "--commit", cwd=checkout)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert posts(checkout) == expected, "a post does not hold its result"
    assert committed(checkout) == expected, "a written post was never committed: " + rerun.stdout + rerun.stderr
    assert git(checkout, "status", "--porcelain").strip() == "", "files were left uncommitted"
    # The commits hold exactly tagger's posts and records.
    files = git(checkout, "log", "--format=", "--name-only", "HEAD~1..HEAD" if kill_at != "after-commit" else "HEAD")
    assert all(f.endswith((".md", ".tagger.json")) for f in files.split())
    # And a third run has nothing left to do.
    third = tagger(env, "apply", "--commit", cwd=checkout)
    assert third.returncode == 0 and "committed" not in third.stdout, third.stdout + third.stderr


def test_apply_says_by_its_exit_code_when_the_commit_failed_and_a_rerun_commits(
    queue_env: dict[str, str], site: Path, tmp_path: Path
) -> None:
    checkout = tmp_path / "checkout"
    make_checkout(site, checkout, copies=0)
    env = remote_env(queue_env, checkout, tmp_path)
    expected = honest(env, checkout, tmp_path)
    assert tagger(env, "enqueue", "--remote", *sorted(posts(checkout)), cwd=checkout).returncode == 0
    remote_work(env, tmp_path)
    hooks = checkout / ".git" / "hooks"
    (hooks / "pre-commit").write_text("#!/bin/sh\necho 'refused by a hook' >&2\nexit 1\n", "utf-8")
    (hooks / "pre-commit").chmod(0o755)
    refused = tagger(env, "apply", "--commit", cwd=checkout)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "refused by a hook" in refused.stderr and "Traceback" not in refused.stderr
    assert posts(checkout) == expected
    (hooks / "pre-commit").unlink()
    rerun = tagger(env, "apply", "--commit", cwd=checkout)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert committed(checkout) == expected
    assert git(checkout, "status", "--porcelain").strip() == ""


# --- several pipelines on one runner ------------------------------------------------------------------------


def test_two_pipelines_on_one_runner_keep_their_own_apply_state(
    queue_env: dict[str, str], site: Path, tmp_path: Path
) -> None:
    """Two checkouts (two CI jobs on one runner), one Redis prefix, the default state file location."""
    first, second = tmp_path / "ci-1" / "site", tmp_path / "ci-2" / "site"
    make_checkout(site, first)
    make_checkout(site, second)
    for post in (second / "posts").glob("wip-*.md"):  # the second pipeline's branch edited its copies
        post.write_text(post.read_text("utf-8") + "\nEdited on the second branch.\n", "utf-8")
    git(second, "commit", "-qam", "edit")
    base = {**queue_env, **GIT_ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    envs = {c: {**base, "TAGGER_CONTENT_DIR": str(c)} for c in (first, second)}
    expected = {c: honest(envs[c], c, tmp_path, f"honest-{c.parent.name}") for c in (first, second)}
    for checkout in (first, second):
        enq = tagger(envs[checkout], "enqueue", "--remote", *sorted(posts(checkout)), cwd=checkout)
        assert enq.returncode == 0, enq.stderr
    remote_work(envs[first], tmp_path)
    for checkout in (first, second):
        run = tagger(envs[checkout], "apply", "--commit", cwd=checkout)
        assert run.returncode == 0, run.stdout + run.stderr
        assert posts(checkout) == committed(checkout) == expected[checkout]


# --- Batch API state ----------------------------------------------------------------------------------------


def batch_env(queue_env: dict[str, str], checkout: Path, fake: FakeLLM) -> dict[str, str]:
    return {
        **queue_env,
        "TAGGER_CONTENT_DIR": str(checkout),
        "OPENAI_BASE_URL": fake.base_url,
        "TAGGER_BATCH_POLL": "0.1",
    }


def backfill_batch(env: dict[str, str], checkout: Path) -> subprocess.CompletedProcess[str]:
    run = tagger(env, "backfill", str(checkout), "--batch", "--wait", cwd=checkout)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.mark.parametrize("provider", ["one provider", "batch ids repeat"])
def test_two_fresh_checkouts_of_one_site_each_get_every_post_written_by_batch_backfill(
    provider: str, queue_env: dict[str, str], site: Path, tmp_path: Path, fake_llm: FakeLLM
) -> None:
    """Two CI workspaces of one site on one Redis prefix. `batch ids repeat`: the second run talks to a fresh
    provider (a second fake server numbers its batches from 1 again), as a restarted or another account may."""
    first, second = tmp_path / "ws-1" / "site", tmp_path / "ws-2" / "site"
    make_checkout(site, first)
    make_checkout(site, second)
    expected = honest(batch_env(queue_env, first, fake_llm), first, tmp_path)
    other = FakeLLM().start() if provider == "batch ids repeat" else fake_llm
    try:
        for checkout, fake in ((first, fake_llm), (second, other)):
            run = backfill_batch(batch_env(queue_env, checkout, fake), checkout)
            assert posts(checkout) == expected, run.stdout + run.stderr
    finally:
        if other is not fake_llm:
            other.stop()


@pytest.mark.parametrize("provider", ["one provider", "batch ids repeat"])
def test_a_restored_working_tree_is_written_again_by_batch_backfill(
    provider: str, queue_env: dict[str, str], site: Path, tmp_path: Path, fake_llm: FakeLLM
) -> None:
    checkout = tmp_path / "ws" / "site"
    make_checkout(site, checkout)
    env = batch_env(queue_env, checkout, fake_llm)
    expected = honest(env, checkout, tmp_path)
    backfill_batch(env, checkout)
    assert posts(checkout) == expected
    git(checkout, "checkout", "--", ".")  # the working tree restored; the records stay (untracked)
    git(checkout, "clean", "-qfdx")  # and a fresh workspace has no records either
    other = FakeLLM().start() if provider == "batch ids repeat" else fake_llm
    try:
        run = backfill_batch(batch_env(queue_env, checkout, other), checkout)
        assert posts(checkout) == expected, run.stdout + run.stderr
    finally:
        if other is not fake_llm:
            other.stop()


def test_two_sites_sharing_a_prefix_never_hide_each_others_posts(
    queue_env: dict[str, str], site: Path, tmp_path: Path, fake_llm: FakeLLM
) -> None:
    """Two sites with the same post paths on one Redis prefix, each with its own provider account (batch ids
    of one may repeat the other's: a second fake server numbers its batches from 1 again)."""
    one, two = tmp_path / "site-one", tmp_path / "site-two"
    make_checkout(site, one)
    make_checkout(site, two)
    for post in (two / "posts").glob("*.md"):
        post.write_text(post.read_text("utf-8") + "\nThe second site's own words.\n", "utf-8")
    other = FakeLLM().start()
    try:
        expected = {
            one: honest(batch_env(queue_env, one, fake_llm), one, tmp_path, "honest-one"),
            two: honest(batch_env(queue_env, two, other), two, tmp_path, "honest-two"),
        }
        backfill_batch(batch_env(queue_env, one, fake_llm), one)
        run = backfill_batch(batch_env(queue_env, two, other), two)
        assert posts(one) == expected[one]
        assert posts(two) == expected[two], run.stdout + run.stderr
    finally:
        other.stop()


# --- one pending job per post -------------------------------------------------------------------------------


def test_one_pending_job_per_post_across_shared_folder_and_remote_producers(
    queue_env: dict[str, str], site: Path, tmp_path: Path, redis: redis_lib.Redis
) -> None:
    checkout = tmp_path / "checkout"
    make_checkout(site, checkout, copies=0)
    shared = {**queue_env, "TAGGER_CONTENT_DIR": str(checkout)}
    remote = remote_env(queue_env, checkout, tmp_path)
    a, b = "posts/limiting-wip.md", "posts/shipping-daily.md"
    assert tagger(shared, "enqueue", a, cwd=checkout).returncode == 0
    assert tagger(remote, "enqueue", "--remote", b, cwd=checkout).returncode == 0
    second_a = tagger(remote, "enqueue", "--remote", a, cwd=checkout)
    second_b = tagger(shared, "enqueue", b, cwd=checkout)
    assert "already-queued" in second_a.stdout, second_a.stdout + second_a.stderr
    assert "already-queued" in second_b.stdout, second_b.stdout + second_b.stderr
    queued = [
        job_id
        for name in ("high", "default", "low")
        for job_id in Queue(
            f"{queue_env['TAGGER_REDIS_PREFIX']}-{name}", connection=redis, serializer=JSONSerializer
        ).job_ids
    ]
    assert len(queued) == 2, queued
