"""The queue with a real Redis and real RQ worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.commands import tagger
from tests.conftest import wait_for_group_exit
from tests.fakellm import FakeLLM
from worker.posts import read_post
from worker.queue.enqueue import AGAIN, RERUN_CHECKED, enqueue_posts
from worker.records import load_record, record_path
from worker.settings import Settings

pytestmark = pytest.mark.redis


def posts(site: Path) -> Path:
    return site / "site" / "posts"


@pytest.mark.slow
def test_enqueue_then_burst_worker_writes_posts_with_json_jobs(
    queue_env: dict[str, str], site: Path, redis: redis_lib.Redis
) -> None:
    wip = posts(site) / "limiting-wip.md"
    run = tagger(queue_env, "enqueue", str(wip))
    assert run.returncode == 0, run.stderr
    job_id, action = run.stdout.split()[:2]
    assert action == "enqueued"
    data = redis.hget(f"{os.environ['RQ_KEY_PREFIX']}:job:{job_id}", "data")
    assert data is not None
    decoded = json.loads(zlib.decompress(data))
    assert decoded[0] == "worker.queue.jobs.classify_job" and decoded[2] == ["posts/limiting-wip.md", None]
    again = tagger(queue_env, "enqueue", str(wip))
    assert "already-queued" in again.stdout
    work = tagger(queue_env, "work", "--burst")
    assert work.returncode == 0, work.stderr
    assert "Kanban" in read_post(wip).terms("tags")
    assert record_path(wip).exists()
    events = [json.loads(line)["event"] for line in work.stderr.splitlines() if line.startswith("{")]
    assert "started" in events and "written" in events


@pytest.mark.slow
def test_backfill_twice_enqueues_nothing_the_second_time(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    first = tagger(queue_env, "backfill", str(site / "site"))
    assert "enqueued 3" in first.stdout, first.stdout + first.stderr
    assert tagger(queue_env, "work", "--burst").returncode == 0
    calls = fake_llm.counts["requests"]
    second = tagger(queue_env, "backfill", str(site / "site"))
    assert "0 to classify, 3 fresh" in second.stdout
    assert "enqueued 0" in second.stdout
    assert fake_llm.counts["requests"] == calls


def test_backfill_inline_needs_no_redis(queue_env: dict[str, str], site: Path) -> None:
    env = {**queue_env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    run = tagger(env, "backfill", "--inline", str(site / "site"))
    assert run.returncode == 0, run.stderr
    assert "3 done, 2 written, 0 failed" in run.stdout


@pytest.mark.slow
def test_backfill_type_limits_what_is_judged(queue_env: dict[str, str], site: Path, redis: redis_lib.Redis) -> None:
    wip = posts(site) / "limiting-wip.md"
    run = tagger(queue_env, "backfill", "--type", "tags", str(site / "site"))
    assert "enqueued 3" in run.stdout, run.stdout + run.stderr
    assert tagger(queue_env, "work", "--burst").returncode == 0
    post = read_post(wip)
    assert "Kanban" in post.terms("tags") and post.terms("categories") == []
    assert {j.type for j in load_record(wip).judgements} == {"tags"}


def test_paths_outside_the_content_root_are_refused(queue_env: dict[str, str], site: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.md"
    outside.write_text("---\ntitle: x\n---\n", encoding="utf-8")
    link = posts(site) / "link.md"
    link.symlink_to(outside)
    for path in (str(posts(site) / ".." / ".." / "outside.md"), str(outside), str(link), "../outside.md"):
        run = tagger(queue_env, "enqueue", path)
        assert run.returncode == 1 and "outside the content root" in run.stderr, path
        assert "enqueued" not in run.stdout


@pytest.mark.slow
def test_failure_kinds_land_in_failed_list_and_retry_fixes(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    bad = posts(site) / "bad.md"
    bad.write_text("---\ntitle: [broken\n---\nbody\n", encoding="utf-8")
    fake_llm.inject("quota")
    assert tagger(queue_env, "enqueue", str(bad), str(posts(site) / "limiting-wip.md")).returncode == 0
    tagger(queue_env, "work", "--burst")
    listing = tagger(queue_env, "failed", "list").stdout
    assert "bad_post" in listing and "quota" in listing
    assert "sk-queue-secret" not in listing
    bad_id = next(line.split()[0] for line in listing.splitlines() if "bad_post" in line)
    shown = tagger(queue_env, "failed", "show", bad_id).stdout
    assert "malformed YAML" in shown and "attempts: 1" in shown
    status = tagger(queue_env, "status").stdout
    assert "PAUSED" in status and "quota exhausted" in status and "bad_post 1" in status and "quota 1" in status
    assert "resumed" in tagger(queue_env, "resume").stdout
    bad.write_text("---\ntitle: Fixed Kanban post\n---\nAll about Kanban.\n", encoding="utf-8")
    retried = tagger(queue_env, "failed", "retry", "--all", "--error", "bad_post")
    assert f"requeued 1: {bad_id}" in retried.stdout
    tagger(queue_env, "work", "--burst")
    assert "Kanban" in read_post(bad).terms("tags")
    listing = tagger(queue_env, "failed", "list").stdout
    assert "bad_post" not in listing and "quota" in listing
    assert "nothing to do" in tagger(queue_env, "failed", "retry", "--all", "--error", "bad_post").stdout


@pytest.mark.slow
def test_transient_failure_is_retried_by_rq(queue_env: dict[str, str], site: Path, fake_llm: FakeLLM) -> None:
    fake_llm.inject("server_error")
    wip = posts(site) / "limiting-wip.md"
    tagger(queue_env, "enqueue", str(wip))
    tagger(queue_env, "work", "--burst")
    assert "Kanban" in read_post(wip).terms("tags")
    assert tagger(queue_env, "failed", "list").stderr.strip() == "0 failed"


@pytest.mark.slow
def test_killed_worker_job_is_recovered(queue_env: dict[str, str], site: Path, fake_llm: FakeLLM) -> None:
    fake_llm.hold()  # the job's calls wait at the model: the kill lands mid-job, however slow the machine
    wip = posts(site) / "limiting-wip.md"
    original = wip.read_bytes()
    tagger(queue_env, "enqueue", str(wip))
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "work"],
        env={**queue_env, "TAGGER_REQUEST_TIMEOUT": "60"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert fake_llm.wait_held(1, timeout=60)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    wait_for_group_exit(worker.pid)
    assert wip.read_bytes() == original
    fake_llm.release()
    # Asked until the lease has lapsed (`running` leaves out expired entries), however slow the machine: a fixed
    # pause assumed a `status` process's start-up on top.
    deadline = time.monotonic() + 60
    while "running 0" not in (status := tagger(queue_env, "status")).stdout and time.monotonic() < deadline:
        assert status.returncode == 0, status.stderr
        time.sleep(0.25)
    tagger(queue_env, "work", "--burst")
    assert "Kanban" in read_post(wip).terms("tags")
    assert "running 0" in tagger(queue_env, "status").stdout


@pytest.mark.slow
def test_edit_during_a_running_job_is_kept_and_classified_again(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    fake_llm.hold()  # the job's calls wait at the model until the edit is made: no race with a latency window
    wip = posts(site) / "limiting-wip.md"
    tagger(queue_env, "enqueue", str(wip))
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "work", "--burst"],
        env={**queue_env, "TAGGER_REQUEST_TIMEOUT": "60"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert fake_llm.wait_held(1, timeout=60)
    wip.write_text(
        wip.read_text(encoding="utf-8") + "\nAn editor's late paragraph about continuous delivery.\n", encoding="utf-8"
    )
    fake_llm.release()
    assert worker.wait(timeout=60) == 0
    text = wip.read_text(encoding="utf-8")
    assert text.endswith("An editor's late paragraph about continuous delivery.\n")
    assert "Kanban" in read_post(wip).terms("tags")
    assert fake_llm.counts["requests"] > 1  # judged again after the edit (the post's types fit one call)


@pytest.mark.slow
def test_stdin_producer_and_backfill_wait(queue_env: dict[str, str], site: Path) -> None:
    run = tagger(
        queue_env,
        "enqueue",
        "--stdin",
        stdin=f"{posts(site) / 'limiting-wip.md'}\n{posts(site) / 'shipping-daily.md'}\n",
    )
    assert run.stdout.count("enqueued") == 2, run.stderr
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "work", "--processes", "2"],
        env=queue_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        waited = tagger(queue_env, "backfill", "--all", "--wait", str(site / "site"))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
        wait_for_group_exit(worker.pid)  # its --processes children too: none may write keys after the test
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "3 done, 0 failed" in waited.stdout
    assert "Continuous Delivery" in read_post(posts(site) / "shipping-daily.md").terms("tags")


def test_changed_since_enqueues_exactly_what_a_push_changed(queue_env: dict[str, str], site: Path) -> None:
    content = site / "site"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=content, check=True)
    subprocess.run([*git, "add", "."], cwd=content, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=content, check=True)
    edited = posts(site) / "shipping-daily.md"
    edited.write_text(edited.read_text(encoding="utf-8") + "\nMore.\n", encoding="utf-8")
    run = tagger(queue_env, "enqueue", "--changed-since", "HEAD")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("enqueued") == 1 and "posts/shipping-daily.md" in run.stdout


@pytest.mark.slow
def test_backfill_wait_follows_the_rerun_a_producer_asked_for_while_the_job_ran(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    """A post enqueued again while its job runs gets a rerun; `backfill --wait` counts it done only after that
    rerun ran, and the post ends judged on its last text."""
    env = {**queue_env, "TAGGER_REQUEST_TIMEOUT": "60"}  # held calls must not time out
    solo = site / "site" / "solo"
    solo.mkdir()
    post = solo / "wip.md"
    shutil.copy(posts(site) / "limiting-wip.md", post)
    fake_llm.hold()
    backfill = subprocess.Popen(
        [sys.executable, "-m", "worker", "backfill", "--wait", str(solo)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = spawn_worker(env)
    try:
        assert fake_llm.wait_held(1, timeout=60)  # the backfill's job is running
        with post.open("a", encoding="utf-8") as f:
            f.write("\nAn editor's paragraph about continuous delivery.\n")
        again = tagger(env, "enqueue", str(post))
        assert "rerun-after-current" in again.stdout, again.stdout + again.stderr
        os.killpg(first.pid, signal.SIGTERM)  # finish the current job, then stop: its rerun stays queued
        fake_llm.release()
        assert first.wait(timeout=60) == 0
        wait_for_group_exit(first.pid)
        # Edited after the first job's last read: only the rerun can judge this text.
        with post.open("a", encoding="utf-8") as f:
            f.write("\nA second paragraph, about technical debt.\n")
        fake_llm.hold()
        second = spawn_worker(env)
        try:
            assert fake_llm.wait_held(1, timeout=60)  # the rerun is at the model
            assert backfill.poll() is None, "backfill --wait returned before the post's rerun ran"
            fake_llm.release()
            out, err = backfill.communicate(timeout=120)
        finally:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(timeout=60)
            wait_for_group_exit(second.pid)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
        if backfill.poll() is None:
            backfill.kill()
            backfill.wait(timeout=60)
    assert backfill.returncode == 0, out + err
    assert "backfill: 1 done, 0 failed" in out, out + err
    tags = read_post(post).terms("tags")
    assert "Continuous Delivery" in tags and "Technical Debt" in tags, tags
    assert load_record(post).content_hash == read_post(post).content_hash


def spawn_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "work"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_a_post_asked_for_while_its_job_is_ending_gets_a_run_of_its_own(
    queue_env: dict[str, str], site: Path, redis: redis_lib.Redis, make_settings: Callable[..., Settings]
) -> None:
    """Between a job's look for rerun requests and RQ marking it finished, a request would never be read: the
    producer sees the job past that look and enqueues the post's other job id instead."""
    settings = make_settings(REDIS_URL=queue_env["REDIS_URL"], TAGGER_REDIS_PREFIX=queue_env["TAGGER_REDIS_PREFIX"])
    wip = posts(site) / "limiting-wip.md"
    first = enqueue_posts([wip], settings, redis)[0]
    assert first.action == "enqueued"
    job = Job.fetch(first.job_id, connection=redis, serializer=JSONSerializer)
    job.set_status(JobStatus.STARTED)  # running, and as the job marks itself just before its look for reruns:
    job.meta[RERUN_CHECKED] = True
    job.save_meta()
    second = enqueue_posts([wip], settings, redis)[0]
    assert (second.action, second.job_id) == ("enqueued", first.job_id + AGAIN)
    again = Job.fetch(second.job_id, connection=redis, serializer=JSONSerializer)
    assert again.get_status() == JobStatus.QUEUED and again.meta["post"] == "posts/limiting-wip.md"
    # While it still runs, before that look, a request is recorded for the job to read.
    job.meta[RERUN_CHECKED] = False
    job.save_meta()
    Job.fetch(second.job_id, connection=redis, serializer=JSONSerializer).set_status(JobStatus.FINISHED)
    third = enqueue_posts([wip], settings, redis)[0]
    assert (third.action, third.job_id) == ("rerun-after-current", first.job_id)
