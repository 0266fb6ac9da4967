"""Security: only tagger's JSON jobs run, job paths stay in the content root, API keys never leak."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Callback, Queue
from rq.serializers import JSONSerializer

from tests.commands import tagger
from tests.fakellm import FakeLLM
from tests.redis_scan import count_keys, scan_for_secrets
from worker.posts import read_post

pytestmark = pytest.mark.redis


class Exploit:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def queue(env: dict[str, str], redis: redis_lib.Redis) -> Queue:
    return Queue(f"{env['TAGGER_REDIS_PREFIX']}-default", connection=redis, serializer=JSONSerializer)


@pytest.mark.slow
def test_planted_pickle_payload_is_refused_not_executed(
    queue_env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    q = queue(queue_env, redis)
    job = q.enqueue("worker.queue.jobs.classify_job", "posts/limiting-wip.md", job_id="planted")
    prefix = os.environ["RQ_KEY_PREFIX"]
    redis.hset(f"{prefix}:job:{job.id}", "data", zlib.compress(pickle.dumps(Exploit(marker))))
    work = tagger(queue_env, "work", "--burst")
    assert work.returncode == 0, work.stderr
    assert not marker.exists()
    listing = tagger(queue_env, "failed", "list").stdout
    assert "planted" in listing
    assert "not JSON" in tagger(queue_env, "failed", "show", "planted").stdout


@pytest.mark.slow
def test_a_foreign_function_on_the_queue_is_refused(
    queue_env: dict[str, str], redis: redis_lib.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    queue(queue_env, redis).enqueue("os.system", f"touch {marker}", job_id="foreign")
    assert tagger(queue_env, "work", "--burst").returncode == 0
    assert not marker.exists()
    assert "not worker.queue.jobs.classify_job" in tagger(queue_env, "failed", "show", "foreign").stdout


def plant_marker(job: object, *args: object) -> None:
    """A foreign callback: creates the file its job's meta names (it must never run)."""
    Path(job.meta["marker"]).touch()  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("callback", ["on_success", "on_failure", "on_stopped"])
def test_a_job_naming_a_foreign_callback_is_refused_without_running(
    queue_env: dict[str, str], redis: redis_lib.Redis, site: Path, tmp_path: Path, callback: str
) -> None:
    marker = tmp_path / "pwned"
    wip = site / "site" / "posts" / "limiting-wip.md"
    before = wip.read_bytes()
    queue(queue_env, redis).enqueue(
        "worker.queue.jobs.classify_job",
        "posts/limiting-wip.md",
        None,
        job_id="foreign-callback",
        meta={"marker": str(marker)},
        **{callback: Callback("tests.test_security.plant_marker")},
    )
    assert tagger(queue_env, "work", "--burst").returncode == 0
    assert not marker.exists()
    assert wip.read_bytes() == before  # the job itself did not run either
    listing = tagger(queue_env, "failed", "list").stdout
    assert "foreign-callback" in listing and "foreign_job" in listing
    assert "foreign callbacks" in tagger(queue_env, "failed", "show", "foreign-callback").stdout


@pytest.mark.slow
def test_a_job_path_outside_the_root_is_refused_by_the_worker(
    queue_env: dict[str, str], redis: redis_lib.Redis, site: Path
) -> None:
    outside = site / "outside.md"
    outside.write_text("---\ntitle: Kanban outside\n---\nKanban\n", encoding="utf-8")
    before = outside.read_bytes()
    queue(queue_env, redis).enqueue(
        "worker.queue.jobs.classify_job",
        "../outside.md",
        None,
        job_id="escape",
        on_failure=Callback("worker.queue.jobs.on_failure"),
    )
    assert tagger(queue_env, "work", "--burst").returncode == 0
    assert outside.read_bytes() == before
    listing = tagger(queue_env, "failed", "list").stdout
    assert "outside_root" in listing


def _fail_with_an_echoed_key(queue_env: dict[str, str], fake_llm: FakeLLM, site: Path) -> tuple[str, str, str]:
    """Run one job whose provider echoes the API key in its error; the worker's output, listing and `failed show`."""
    fake_llm.inject("auth")  # the fake echoes the key in its error message
    tagger(queue_env, "enqueue", str(site / "site" / "posts" / "limiting-wip.md"))
    work = tagger(queue_env, "work", "--burst")
    listing = tagger(queue_env, "failed", "list").stdout
    job_id = next(line.split()[0] for line in listing.splitlines() if " auth " in line)
    shown = tagger(queue_env, "failed", "show", job_id).stdout
    assert fake_llm.counts["auth"] == 1
    return work.stdout + work.stderr, listing, shown


def _patterns(env: dict[str, str]) -> list[str]:
    return [f"{os.environ['RQ_KEY_PREFIX']}*", f"{env['TAGGER_REDIS_PREFIX']}*"]


@pytest.mark.slow
def test_api_key_is_redacted_from_errors_logs_and_job_data(
    queue_env: dict[str, str], redis: redis_lib.Redis, fake_llm: FakeLLM, site: Path
) -> None:
    key = queue_env["OPENAI_API_KEY"]
    output, listing, shown = _fail_with_an_echoed_key(queue_env, fake_llm, site)
    assert "Incorrect API key provided: ***" in shown
    for text in (output, listing, shown):
        assert key not in text
    # Where the data lands: every key tagger and RQ wrote, decompressed (RQ's results stream: the next test).
    patterns = _patterns(queue_env)
    assert count_keys(redis, patterns) > 3
    hits = [h for h in scan_for_secrets(redis, patterns, [key]) if ":results:" not in h.key]
    assert hits == [], [str(h) for h in hits]


@pytest.mark.slow
def test_api_key_is_nowhere_in_redis_not_even_in_rqs_results_stream(
    queue_env: dict[str, str], redis: redis_lib.Redis, fake_llm: FakeLLM, site: Path
) -> None:
    key = queue_env["OPENAI_API_KEY"]
    _fail_with_an_echoed_key(queue_env, fake_llm, site)
    hits = scan_for_secrets(redis, _patterns(queue_env), [key])
    assert hits == [], [str(h) for h in hits]


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server speaking only TLS, with a password, on a free port; its rediss:// URL."""
    if not shutil.which("openssl") or not shutil.which("redis-server"):
        pytest.skip("openssl or redis-server is not on PATH")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(cert),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    for _ in range(50):
        try:
            redis_lib.Redis.from_url(url).ping()
            break
        except redis_lib.RedisError:
            if server.poll() is not None:
                pytest.skip("this redis-server was built without TLS")
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait()


@pytest.mark.slow
def test_queue_works_over_tls_with_a_password(queue_env: dict[str, str], tls_redis: str, site: Path) -> None:
    env = {**queue_env, "REDIS_URL": tls_redis}
    wip = site / "site" / "posts" / "limiting-wip.md"
    assert tagger(env, "enqueue", str(wip)).returncode == 0
    work = tagger(env, "work", "--burst")
    assert work.returncode == 0, work.stderr[-2000:]
    assert "Kanban" in read_post(wip).terms("tags")
    assert "s3cret" not in work.stderr
    plain = {**env, "REDIS_URL": tls_redis.replace("rediss://", "redis://")}
    assert tagger(plain, "status").returncode != 0  # the server speaks nothing but TLS


def test_apply_s_state_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The producer's state names its jobs and posts: written 0600 whatever the umask, and kept so on rewrite."""
    from worker.apply import remember
    from worker.queue.enqueue import Enqueued
    from worker.settings import Settings

    state = tmp_path / "state" / "last.json"
    settings = Settings(_env_file=None, TAGGER_CONTENT_DIR=str(tmp_path), TAGGER_STATE_FILE=str(state))  # type: ignore[call-arg]
    old = os.umask(0o022)
    try:
        for job in ("job-1", "job-2"):
            remember(settings, [Enqueued("posts/a.md", job, "enqueued")])
            assert state.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
