"""Remote workers: jobs carry the post, results come back through Redis, `tagger apply` writes them.

Real Redis, real worker processes whose working folder is an empty temporary folder and whose settings name no
content or taxonomy folder (so they cannot read or write a post), and the fake OpenAI-compatible server.
"""

from __future__ import annotations

import json
import os
import re
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
from pydantic import ValidationError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.commands import tagger
from tests.conftest import wait_for_group_exit
from tests.fakellm import FakeLLM
from worker.classifier import make_classifier
from worker.posts import read_post
from worker.queue.payload import make_payload
from worker.queue.remote import decide_remote
from worker.records import record_path
from worker.result_check import parse_result
from worker.results import RemoteResult
from worker.settings import Settings
from worker.signing import sign

pytestmark = pytest.mark.redis
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]


@pytest.fixture
def producer(queue_env: dict[str, str], site: Path, tmp_path: Path) -> dict[str, str]:
    """The producer's environment: its own checkout of the site (a copy), remote jobs, a state file."""
    shutil.copytree(site / "site", tmp_path / "checkout")
    return {
        **queue_env,
        "TAGGER_CONTENT_DIR": str(tmp_path / "checkout"),
        "TAGGER_STATE_FILE": str(tmp_path / "state" / "last.json"),
    }


@pytest.fixture
def remote_worker(producer: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A worker's environment and working folder: Redis, provider and key only; an empty folder."""
    folder = tmp_path / "worker-machine"
    folder.mkdir()
    env = {k: v for k, v in producer.items() if k not in ("TAGGER_CONTENT_DIR", "TAGGER_TAXONOMY_DIR")}
    env.pop("TAGGER_STATE_FILE")
    env["TAGGER_JOB_MODE"] = "remote"
    return env, folder


def work(worker: tuple[dict[str, str], Path]) -> subprocess.CompletedProcess[str]:
    env, folder = worker
    run = tagger(env, "work", "--burst", cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(folder.iterdir()) == [], "a remote worker wrote into its working folder"
    return run


def front_matter(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): read_post(p).header for p in sorted(folder.rglob("*.md"))}


@pytest.mark.slow
def test_remote_flow_gives_the_same_front_matter_as_shared_folder_mode(
    queue_env: dict[str, str],
    producer: dict[str, str],
    remote_worker: tuple[dict[str, str], Path],
    site: Path,
    redis: redis_lib.Redis,
) -> None:
    checkout = Path(producer["TAGGER_CONTENT_DIR"])
    before = front_matter(checkout)
    # Shared-folder mode on the scratch site, as the baseline.
    shared = tagger(queue_env, "enqueue", *[str(p) for p in sorted((site / "site").rglob("*.md"))])
    assert shared.returncode == 0, shared.stderr
    assert tagger(queue_env, "work", "--burst").returncode == 0
    # Remote mode: the producer's checkout, a worker that has no files.
    enq = tagger(producer, "enqueue", "--remote", *[str(p) for p in sorted(checkout.rglob("*.md"))], cwd=checkout)
    assert enq.returncode == 0, enq.stderr
    job_id = enq.stdout.split()[0]
    stored = redis.hget(f"{os.environ['RQ_KEY_PREFIX']}:job:{job_id}", "data")
    assert isinstance(stored, bytes)
    data = json.loads(zlib.decompress(stored))
    assert data[0] == "worker.queue.remote.classify_remote"
    payload = data[2][0]
    assert payload["post"].startswith("posts/") and payload["taxonomy"].startswith("t-") and payload["bytes"]
    assert front_matter(checkout) == before  # nothing written yet: the producer only enqueued
    work(remote_worker)
    assert front_matter(checkout) == before, "a remote worker wrote into the producer's checkout"
    applied = tagger(producer, "apply", "--wait", "--timeout", "30", cwd=checkout)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    actions = {line.split()[2]: line.split()[1] for line in applied.stdout.splitlines() if line.startswith("post-")}
    after = front_matter(checkout)
    assert after == front_matter(site / "site") != before
    assert actions == {p: "written" if after[p] != before[p] else "unchanged" for p in before}
    for post in checkout.rglob("*.md"):
        assert record_path(post).exists()
    # Applying twice changes nothing.
    snapshot = {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()}
    again = tagger(producer, "apply", cwd=checkout)
    assert again.returncode == 0, again.stderr
    assert "written" not in again.stdout and "already-applied" in again.stdout
    assert {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()} == snapshot


@pytest.mark.slow
def test_a_post_edited_after_enqueue_is_not_overwritten_and_is_enqueued_again(
    producer: dict[str, str], remote_worker: tuple[dict[str, str], Path]
) -> None:
    checkout = Path(producer["TAGGER_CONTENT_DIR"])
    post = checkout / "posts" / "limiting-wip.md"
    assert tagger(producer, "enqueue", "--remote", str(post), cwd=checkout).returncode == 0
    edited = post.read_text(encoding="utf-8") + "\nA paragraph written after the enqueue.\n"
    post.write_text(edited, encoding="utf-8")
    work(remote_worker)
    applied = tagger(producer, "apply", cwd=checkout)
    assert applied.returncode == 2, applied.stdout + applied.stderr
    assert "re-enqueued" in applied.stdout and "text changed" in applied.stdout
    assert post.read_text(encoding="utf-8") == edited  # the person's edit won: nothing was written over it
    # The new job carries the edited post; the next round applies it.
    work(remote_worker)
    final = tagger(producer, "apply", "--wait", "--timeout", "30", cwd=checkout)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "written" in final.stdout
    assert post.read_text(encoding="utf-8").endswith("A paragraph written after the enqueue.\n")
    assert "Kanban" in read_post(post).terms("tags")


@pytest.mark.slow
def test_a_front_matter_edit_keeps_the_judgements_and_the_new_job_asks_nothing(
    producer: dict[str, str], remote_worker: tuple[dict[str, str], Path], fake_llm: FakeLLM
) -> None:
    checkout = Path(producer["TAGGER_CONTENT_DIR"])
    post = checkout / "posts" / "limiting-wip.md"
    assert tagger(producer, "enqueue", "--remote", str(post), cwd=checkout).returncode == 0
    text = post.read_text(encoding="utf-8")
    post.write_text(text.replace("\n---\n", "\nreviewed_by: Ana\n---\n", 1), encoding="utf-8")
    work(remote_worker)
    calls = fake_llm.counts["requests"]
    assert calls > 0
    applied = tagger(producer, "apply", cwd=checkout)
    assert applied.returncode == 2 and "judgements kept" in applied.stdout, applied.stdout + applied.stderr
    work(remote_worker)
    assert fake_llm.counts["requests"] == calls  # the cached judgements travelled in the job: nothing asked
    final = tagger(producer, "apply", cwd=checkout)
    assert final.returncode == 0, final.stdout + final.stderr
    assert read_post(post).meta["reviewed_by"] == "Ana" and "Kanban" in read_post(post).terms("tags")


@pytest.mark.slow
def test_a_job_naming_an_unpublished_taxonomy_fails_with_its_kind(
    producer: dict[str, str], remote_worker: tuple[dict[str, str], Path], redis: redis_lib.Redis
) -> None:
    checkout = Path(producer["TAGGER_CONTENT_DIR"])
    post = checkout / "posts" / "limiting-wip.md"
    assert tagger(producer, "enqueue", "--remote", str(post), cwd=checkout).returncode == 0
    published = list(redis.scan_iter(f"{producer['TAGGER_REDIS_PREFIX']}:taxonomy:*"))
    assert len(published) == 1
    redis.delete(*published)
    run = work(remote_worker)
    assert "taxonomy_unpublished" in run.stderr
    assert run.stderr.count('"event": "started"') == 1  # permanent: not retried
    applied = tagger(producer, "apply", cwd=checkout)
    assert applied.returncode == 1
    assert "failed" in applied.stderr and "taxonomy_unpublished" in applied.stderr
    failed = tagger(producer, "failed", "list")
    assert "taxonomy_unpublished" in failed.stdout + failed.stderr


def test_taxonomy_publish_is_content_addressed(producer: dict[str, str], site: Path) -> None:
    first = tagger(producer, "taxonomy", "publish")
    assert first.returncode == 0, first.stderr
    assert tagger(producer, "taxonomy", "publish").stdout == first.stdout
    term = next((site / "taxonomy").rglob("*.md"))
    text = term.read_text(encoding="utf-8")
    term.write_text(re.sub(r"(?m)^title:.*$", 'title: "A renamed term"', text, count=1), encoding="utf-8")
    changed = tagger(producer, "taxonomy", "publish")
    assert changed.stdout.strip().startswith("t-") and changed.stdout != first.stdout


def test_a_post_too_big_for_a_job_is_refused_with_a_clear_error(producer: dict[str, str]) -> None:
    checkout = Path(producer["TAGGER_CONTENT_DIR"])
    big = checkout / "posts" / "big.md"
    big.write_text("---\ntitle: Big\n---\n" + "word " * 2000, encoding="utf-8")
    small = checkout / "posts" / "limiting-wip.md"
    env = {**producer, "TAGGER_MAX_JOB_BYTES": "4096"}
    run = tagger(env, "enqueue", "--remote", str(big), str(small), cwd=checkout)
    assert run.returncode == 1
    assert "REFUSED posts/big.md: post_too_large" in run.stderr and "TAGGER_MAX_JOB_BYTES" in run.stderr
    assert "enqueued" in run.stdout and "limiting-wip.md" in run.stdout


def test_the_result_a_worker_returns_is_the_strict_model_apply_reads(make_settings: Callable[..., Settings]) -> None:
    """One type for a remote job's result: what the worker returns through Redis, apply parses back equal."""
    settings = make_settings(TAGGER_SIGNING_KEY="signing-key-for-tests-0123456789")
    payload = make_payload(settings, "posts/limiting-wip.md", "t-version", None)
    outcome, usage, _ = decide_remote(make_classifier(settings), payload)
    stored = json.loads(json.dumps(sign(settings, "result", "job-1", outcome.model_dump())))  # RQ's JSON serializer
    checked = parse_result(settings, "job-1", stored)
    assert checked.result == outcome and outcome.changes and outcome.calls == usage.calls > 0
    with pytest.raises(ValidationError):  # the worker cannot build a result apply would refuse
        RemoteResult(**{**outcome.model_dump(), "calls": str(usage.calls)})


@pytest.mark.slow
def test_apply_commit_makes_one_commit_of_exactly_the_posts_and_records(
    producer: dict[str, str], remote_worker: tuple[dict[str, str], Path]
) -> None:
    checkout = Path(producer["TAGGER_CONTENT_DIR"])
    subprocess.run([*GIT, "init", "-q"], cwd=checkout, check=True)
    subprocess.run([*GIT, "add", "."], cwd=checkout, check=True)
    subprocess.run([*GIT, "commit", "-qm", "base"], cwd=checkout, check=True)
    (checkout / "notes.txt").write_text("someone's work in progress\n", encoding="utf-8")
    subprocess.run([*GIT, "add", "notes.txt"], cwd=checkout, check=True)  # staged, not ours to commit
    posts = sorted((checkout / "posts").glob("*.md"))
    assert tagger(producer, "enqueue", "--remote", *map(str, posts), cwd=checkout).returncode == 0
    work(remote_worker)
    env = {**producer, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@e"
    applied = tagger(env, "apply", "--commit", cwd=checkout)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    written = [line.split()[2] for line in applied.stdout.splitlines() if line.split()[1:2] == ["written"]]
    assert written
    log = subprocess.run(["git", "log", "--format=%s"], cwd=checkout, capture_output=True, text=True).stdout
    assert log.splitlines() == [f"tagger apply: {len(written)} posts classified", "base"]
    shown = subprocess.run(
        ["git", "show", "--name-only", "--format=%B", "HEAD"], cwd=checkout, capture_output=True, text=True
    ).stdout
    files = sorted(line for line in shown.splitlines() if line.startswith("posts/") and "/" in line and " " not in line)
    expected = written + [record_path(p).relative_to(checkout).as_posix() for p in posts]  # every record is new
    assert files == sorted(expected)
    assert "notes.txt" not in shown
    status = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True).stdout
    assert status.strip() == "A  notes.txt"  # still staged, still not committed
    again = tagger(env, "apply", "--commit", cwd=checkout)
    assert again.returncode == 0 and "committed" not in again.stdout
    log = subprocess.run(["git", "log", "--format=%s"], cwd=checkout, capture_output=True, text=True).stdout
    assert len(log.splitlines()) == 2


@pytest.mark.slow
def test_apply_commit_with_the_records_kept_outside_the_repository_commits_the_posts(
    producer: dict[str, str], remote_worker: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    """TAGGER_RECORDS_DIR outside the checkout: the posts are committed, the records stay where they are (git
    refused the whole status for a path outside the repository, so nothing was ever committed: found by a
    red-team review)."""
    checkout = Path(producer["TAGGER_CONTENT_DIR"])
    env = {**producer, "TAGGER_RECORDS_DIR": str(tmp_path / "records-elsewhere"), "GIT_AUTHOR_NAME": "t"}
    env.update(GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@e")
    subprocess.run([*GIT, "init", "-q"], cwd=checkout, check=True)
    subprocess.run([*GIT, "add", "."], cwd=checkout, check=True)
    subprocess.run([*GIT, "commit", "-qm", "base"], cwd=checkout, check=True)
    posts = sorted((checkout / "posts").glob("*.md"))
    assert tagger(env, "enqueue", "--remote", *map(str, posts), cwd=checkout).returncode == 0
    work(remote_worker)
    applied = tagger(env, "apply", "--commit", cwd=checkout)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    written = [line.split()[2] for line in applied.stdout.splitlines() if line.split()[1:2] == ["written"]]
    shown = subprocess.run(
        ["git", "show", "--name-only", "--format=", "HEAD"], cwd=checkout, capture_output=True, text=True
    ).stdout
    assert written and sorted(shown.split()) == sorted(written)  # the posts, no record
    assert list((tmp_path / "records-elsewhere").rglob("*.tagger.json"))


def chunked(worker: tuple[dict[str, str], Path]) -> tuple[dict[str, str], Path]:
    """The remote worker asking one chunk (one type: no packing) at a time, so a test knows which were judged."""
    env, folder = worker
    return {**env, "TAGGER_CONCURRENCY": "1", "TAGGER_REQUEST_TIMEOUT": "60", "TAGGER_PACK_TYPES": "false"}, folder


def job_status(redis: redis_lib.Redis, job_id: str) -> JobStatus | None:
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status()


def enqueue_remote(producer: dict[str, str]) -> tuple[Path, Path, str]:
    """Enqueue the producer's limiting-wip post as a remote job: (checkout, post, job id)."""
    checkout = Path(producer["TAGGER_CONTENT_DIR"])
    post = checkout / "posts" / "limiting-wip.md"
    enq = tagger(producer, "enqueue", "--remote", str(post), cwd=checkout)
    assert enq.returncode == 0, enq.stderr
    return checkout, post, enq.stdout.split()[0]


@pytest.mark.slow
def test_a_remote_retry_after_a_failed_chunk_asks_only_the_chunks_not_judged_yet(
    producer: dict[str, str],
    remote_worker: tuple[dict[str, str], Path],
    fake_llm: FakeLLM,
    redis: redis_lib.Redis,
) -> None:
    checkout, post, job_id = enqueue_remote(producer)
    worker = chunked(remote_worker)
    fake_llm.inject("ok", "refusal")  # the first chunk is judged, the second refused (permanent)
    work(worker)
    assert job_status(redis, job_id) == JobStatus.FAILED
    assert "refused" in tagger(producer, "failed", "list").stdout
    asked = fake_llm.counts["requests"]
    assert asked == 2  # the third chunk was never asked
    chunks = 3  # one per type: tags, categories, concepts
    assert "requeued 1" in tagger(producer, "failed", "retry", "--all").stdout
    work(worker)
    assert job_status(redis, job_id) == JobStatus.FINISHED
    assert fake_llm.counts["requests"] - asked == chunks - 1  # the judged chunk was not paid for again
    applied = tagger(producer, "apply", cwd=checkout)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "Kanban" in read_post(post).terms("tags")
    prefix = producer["TAGGER_REDIS_PREFIX"]
    assert not list(redis.scan_iter(f"{prefix}:judged:*")), "a finished job's kept judgements were not removed"


@pytest.mark.slow
def test_a_remote_job_killed_between_chunks_is_retried_without_asking_the_judged_ones(
    producer: dict[str, str],
    remote_worker: tuple[dict[str, str], Path],
    fake_llm: FakeLLM,
    redis: redis_lib.Redis,
) -> None:
    checkout, post, job_id = enqueue_remote(producer)
    env, folder = chunked(remote_worker)
    fake_llm.hold()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "work"],
        env=env,
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert fake_llm.wait_held(1, timeout=60)
        fake_llm.release(1)  # the first chunk is answered; the second waits at the model
        deadline = time.monotonic() + 60
        while not (fake_llm.counts["requests"] == 2 and fake_llm.held == 1):
            assert time.monotonic() < deadline, "the second chunk never reached the model"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # kill -9 between chunks
        process.wait(timeout=60)
        wait_for_group_exit(process.pid)
    fake_llm.release()
    deadline = time.monotonic() + 60
    while job_status(redis, job_id) != JobStatus.FINISHED:  # recovery requeues it once the lease lapses
        assert time.monotonic() < deadline, f"the killed job was never run again: {job_status(redis, job_id)}"
        time.sleep(1)
        work((env, folder))
    assert fake_llm.counts["requests"] == 2 + 2  # two before the kill, then only the two chunks not judged
    applied = tagger(producer, "apply", cwd=checkout)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "Kanban" in read_post(post).terms("tags")


@pytest.mark.parametrize(
    "payload",
    [
        {"post": "posts/x.md"},  # fields missing
        "posts/x.md",  # not an object
        {
            "post": "posts/x.md",
            "bytes": "not base64!",
            "content_hash": "c" * 64,
            "file_hash": "f" * 64,
            "record": "{}",
            "taxonomy": "t-1",
        },
    ],
    ids=["missing-fields", "not-an-object", "bad-base64"],
)
@pytest.mark.slow
def test_a_remote_payload_that_is_not_taggers_fails_as_bad_payload_and_is_not_retried(
    queue_env: dict[str, str], redis: redis_lib.Redis, payload: object
) -> None:
    """A remote job's payload comes from Redis: it is validated like an LLM reply, and a bad one is permanent."""
    from rq import Callback, Queue, Retry

    queue = Queue(f"{queue_env['TAGGER_REDIS_PREFIX']}-default", connection=redis, serializer=JSONSerializer)
    queue.enqueue(
        "worker.queue.remote.classify_remote",
        payload,
        job_id="odd-payload",
        meta={"post": "posts/x.md", "attempts": 0},
        retry=Retry(max=2),
        on_failure=Callback("worker.queue.jobs.on_failure"),
    )
    work = tagger(queue_env, "work", "--burst")
    assert work.returncode == 0, work.stderr
    job = Job.fetch("odd-payload", connection=redis, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["kind"] == "bad_payload" and job.meta["transient"] is False
    assert job.meta["attempts"] == 0, "the job started before its payload was checked"
    assert "remote job payload is not tagger's" in job.meta["error"]
