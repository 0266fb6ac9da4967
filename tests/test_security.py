"""Security: only tagger's JSON jobs run, job paths stay in the content root, API keys never leak."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Callback, Queue
from rq.serializers import JSONSerializer

from worker.fakellm import FakeLLM

pytestmark = pytest.mark.redis


def tagger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", *args], env=env, capture_output=True, text=True, timeout=120)


class Exploit:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def queue(env: dict[str, str], redis: redis_lib.Redis) -> Queue:
    return Queue(f"{env['TAGGER_REDIS_PREFIX']}-default", connection=redis, serializer=JSONSerializer)


def test_planted_pickle_payload_is_refused_not_executed(
    queue_env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    q = queue(queue_env, redis)
    job = q.enqueue("worker.jobs.classify_job", "posts/limiting-wip.md", job_id="planted")
    prefix = os.environ["RQ_KEY_PREFIX"]
    redis.hset(f"{prefix}:job:{job.id}", "data", zlib.compress(pickle.dumps(Exploit(marker))))
    work = tagger(queue_env, "work", "--burst")
    assert work.returncode == 0, work.stderr
    assert not marker.exists()
    listing = tagger(queue_env, "failed", "list").stdout
    assert "planted" in listing
    assert "not JSON" in tagger(queue_env, "failed", "show", "planted").stdout


def test_a_foreign_function_on_the_queue_is_refused(
    queue_env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    queue(queue_env, redis).enqueue("os.system", f"touch {marker}", job_id="foreign")
    assert tagger(queue_env, "work", "--burst").returncode == 0
    assert not marker.exists()
    assert "not worker.jobs.classify_job" in tagger(queue_env, "failed", "show", "foreign").stdout


def test_a_job_path_outside_the_root_is_refused_by_the_worker(
    queue_env: dict[str, str], redis: redis_lib.Redis, site: Path
) -> None:
    outside = site / "outside.md"
    outside.write_text("---\ntitle: Kanban outside\n---\nKanban\n", encoding="utf-8")
    before = outside.read_bytes()
    queue(queue_env, redis).enqueue(
        "worker.jobs.classify_job",
        "../outside.md",
        None,
        job_id="escape",
        on_failure=Callback("worker.jobs.on_failure"),
    )
    assert tagger(queue_env, "work", "--burst").returncode == 0
    assert outside.read_bytes() == before
    listing = tagger(queue_env, "failed", "list").stdout
    assert "outside_root" in listing


def test_api_key_is_redacted_from_errors_logs_and_job_data(
    queue_env: dict[str, str], redis: redis_lib.Redis, fake_llm: FakeLLM, site: Path
) -> None:
    key = queue_env["OPENAI_API_KEY"]
    fake_llm.inject("auth")  # the fake echoes the key in its error message
    tagger(queue_env, "enqueue", str(site / "site" / "posts" / "limiting-wip.md"))
    work = tagger(queue_env, "work", "--burst")
    listing = tagger(queue_env, "failed", "list").stdout
    job_id = next(line.split()[0] for line in listing.splitlines() if " auth " in line)
    shown = tagger(queue_env, "failed", "show", job_id).stdout
    assert "Incorrect API key provided: ***" in shown
    stored = b"".join(v for v in redis.hgetall(f"{os.environ['RQ_KEY_PREFIX']}:job:{job_id}").values())
    for text in (
        work.stdout,
        work.stderr,
        listing,
        shown,
        zlib.decompress(stored[:0]) if False else stored.decode("latin-1"),
    ):
        assert key not in text


def test_tls_redis_urls_are_accepted(make_settings: object) -> None:
    from worker.queues import connect
    from worker.settings import Settings

    settings = Settings(_env_file=None, REDIS_URL="rediss://:secret@127.0.0.1:6390/0")  # type: ignore[call-arg]
    client = connect(settings)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert kwargs["password"] == "secret"
    assert json.dumps(kwargs["port"]) == "6390"
