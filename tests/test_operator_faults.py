"""Queue promises broken the way production breaks them (real workers, real Redis): reruns, a killed supervisor, old jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.commands import tagger
from tests.fakellm import FakeLLM

pytestmark = pytest.mark.redis


def wait_for(condition: Callable[[], object], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


@pytest.mark.slow
def test_a_post_enqueued_while_its_rerun_waits_is_not_queued_twice(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, redis: redis_lib.Redis
) -> None:
    """Enqueue during a run schedules one rerun (`-again`); enqueuing again while that rerun waits is a no-op."""
    fake_llm.hold()  # each job's calls wait at the model until the test lets them go: no race with a latency
    wip, other = site / "site" / "posts" / "limiting-wip.md", sorted((site / "site" / "posts").glob("*.md"))[0]
    assert other != wip
    assert tagger(queue_env, "enqueue", str(wip), str(other)).returncode == 0
    queue = Queue(f"{queue_env['TAGGER_REDIS_PREFIX']}-default", connection=redis, serializer=JSONSerializer)
    first = queue.get_job_ids()[0]
    env = {**queue_env, "TAGGER_CONCURRENCY": "1", "TAGGER_REQUEST_TIMEOUT": "60"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "work"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert fake_llm.wait_held(1, timeout=60)  # the first post's job is running
        assert "rerun-after-current" in tagger(queue_env, "enqueue", str(wip)).stdout
        fake_llm.release(1)  # its call (its three types fit one) ends; the other post's call is held next
        # The rerun waits behind the other post while the only worker judges that one.
        assert wait_for(lambda: f"{first}-again" in queue.get_job_ids())
        again = tagger(queue_env, "enqueue", str(wip))
        assert again.returncode == 0
        assert "already-queued" in again.stdout, again.stdout
        waiting = [j for j in Job.fetch_many(queue.get_job_ids(), connection=redis, serializer=JSONSerializer) if j]
        assert sum(1 for j in waiting if j.meta.get("post") == "posts/limiting-wip.md") == 1
    finally:
        fake_llm.release()
        worker.terminate()
        worker.wait(timeout=60)


@pytest.mark.slow
def test_workers_stop_when_their_supervisor_is_killed(queue_env: dict[str, str], site: Path) -> None:
    """kill -9 to `tagger work --processes 2`: its workers finish and exit instead of running on unsupervised."""
    from tests.test_liveness import alive, kill_session, session_pids, spawn

    supervisor = spawn(queue_env, "work", "--processes", "2")
    try:
        assert wait_for(lambda: len(session_pids(supervisor.pid)) >= 3)  # the supervisor and 2 workers
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=30)
        assert wait_for(lambda: not [p for p in session_pids(supervisor.pid) if alive(p)], 30), "orphans run on"
    finally:
        kill_session(supervisor)


@pytest.mark.slow
def test_status_warns_when_a_delayed_retry_waits_and_no_worker_runs(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    """A transient failure waits as a delayed retry; with every worker gone nothing will ever run it: say so."""
    env = {**queue_env, "TAGGER_JOB_RETRY_DELAYS": "[600]"}
    fake_llm.inject(*["server_error"] * 10)
    assert tagger(env, "enqueue", str(site / "site" / "posts" / "limiting-wip.md")).returncode == 0
    assert tagger(env, "work", "--burst").returncode == 0
    info = json.loads(tagger(env, "status", "--json").stdout)
    assert info["queues"][f"{env['TAGGER_REDIS_PREFIX']}-default"]["scheduled"] == 1
    assert info["workers"] == []
    assert info["no_worker"] is True
    assert "no worker is running" in tagger(env, "status").stdout


@pytest.mark.slow
def test_a_job_from_an_old_tagger_version_names_its_post_and_retry_classifies_it(
    queue_env: dict[str, str], site: Path, redis: redis_lib.Redis
) -> None:
    """A job an earlier layout enqueued (`worker.jobs.classify_job`) is refused unrun, but not lost: `failed list`
    names its post, and `failed retry --all` (the table's advice) enqueues that post as a job of this version."""
    from worker.posts import read_post

    queue = Queue(f"{queue_env['TAGGER_REDIS_PREFIX']}-default", connection=redis, serializer=JSONSerializer)
    queue.enqueue_call(
        "worker.jobs.classify_job",
        args=["posts/limiting-wip.md"],
        job_id="post-0123456789abcdef01234567",
        meta={"post": "posts/limiting-wip.md", "attempts": 0},
    )
    assert tagger(queue_env, "work", "--burst").returncode == 0
    listed = tagger(queue_env, "failed", "list").stdout
    assert "foreign_job" in listed and "posts/limiting-wip.md" in listed, listed
    assert tagger(queue_env, "failed", "retry", "--all").returncode == 0
    assert tagger(queue_env, "work", "--burst").returncode == 0
    assert "Kanban" in read_post(site / "site" / "posts" / "limiting-wip.md").terms("tags")
    assert "foreign_job" not in tagger(queue_env, "failed", "list").stdout


@pytest.mark.slow
def test_backfill_wait_ends_when_vanished_jobs_are_a_rerun_or_a_deleted_post(
    queue_env: dict[str, str], site: Path, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis lost the jobs (restart without persistence) of a post whose followed job was its rerun (`-again`)
    and of a post deleted meanwhile: `backfill --wait` enqueues the first again and reports the second, and ends."""
    import threading

    from worker.backfill import Summary, follow
    from worker.queue.enqueue import enqueue_posts
    from worker.settings import Settings

    for name, value in queue_env.items():
        if name.startswith(("TAGGER_", "REDIS_", "OPENAI_")):
            monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    wip, gone = site / "site" / "posts" / "limiting-wip.md", site / "site" / "posts" / "shipping-daily.md"
    made = enqueue_posts([wip, gone], settings, redis)
    for item in made:
        Job.fetch(item.job_id, connection=redis, serializer=JSONSerializer).delete()  # what a restart loses
    gone.unlink()
    followed = [made[0].job_id + "-again", made[1].job_id]
    result: list[Summary] = []
    waiter = threading.Thread(
        target=lambda: result.append(
            follow(settings, redis, followed, posts=dict(zip(followed, [i.path for i in made], strict=True)))
        ),
        daemon=True,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "work"], env=queue_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        waiter.start()
        waiter.join(timeout=90)
        assert result, "backfill --wait never ended"
        assert result[0].done == 1
        assert len(result[0].failed) == 1 and "posts/shipping-daily.md" in result[0].failed[0]
    finally:
        worker.terminate()
        worker.wait(timeout=60)
