"""At-least-once under the faults operators meet: workers killed at the worst instant, Redis restarted or out of
memory, shutdown signals, racing producers, odd queue entries, leaked keys, partial failures, 429 storms.

Real worker processes; a private `redis-server` per test where the test restarts or fills it up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from tests.commands import tagger
from tests.fakellm import FakeLLM
from tests.waiting import wait_for
from worker.posts import read_post
from worker.records import load_record

pytestmark = pytest.mark.redis
WAIT = 90.0


class PrivateRedis:
    """A redis-server of this test's own, which it may stop, restart and fill up."""

    def __init__(self, folder: Path, persistent: bool) -> None:
        if not shutil.which("redis-server"):
            pytest.skip("redis-server is not on PATH (needed to restart Redis under the workers)")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.folder = folder
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--dir", str(self.folder), *persistence],
            stdout=subprocess.DEVNULL,
        )
        client = self.client()
        assert wait_for(lambda: _answers(client), 30), "private redis-server did not start"

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url, socket_timeout=5)


def _answers(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis-data", persistent=False)
    server.folder.mkdir()
    server.start()
    yield server
    server.stop()


def spawn(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """A tagger process in a session of its own (so the test can signal or kill all it started)."""
    log = os.environ.get("TAGGER_TEST_WORKER_LOG")  # set it to a file to read the workers' logs
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab") if log else subprocess.DEVNULL,
        start_new_session=True,
    )


def follow_backfill(env: dict[str, str], site: Path) -> subprocess.Popen[str]:
    """`tagger backfill --wait` of the whole site, running while the test breaks things under it."""
    # As from a terminal, where Ctrl-C is at its default. This process may have SIGINT ignored when it forks (seen
    # twice in full runs under xdist: SigIgn held SIGINT and SIGQUIT, as glibc's system() sets them in its caller
    # while it waits); a child inherits that, and Python (like any program) keeps a signal ignored that it was
    # started with, so Ctrl-C would not reach `backfill --wait` at all.
    terminal = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    return subprocess.Popen(
        [sys.executable, "-c", terminal, "-m", "worker", "backfill", "--wait", str(site / "site")],
        env={**env, "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def session_pids(sid: int) -> list[int]:
    """Live processes of a session (what a process group leader left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def kill_session(process: subprocess.Popen[bytes]) -> None:
    for pid in session_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def worker_processes(supervisors: list[subprocess.Popen[bytes]]) -> set[int]:
    """The live worker processes of `tagger work` supervisors (one each), once they all run."""
    pids = lambda: {p for s in supervisors for p in session_pids(s.pid) if _parent_of(p) == s.pid and alive(p)}  # noqa: E731
    assert wait_for(lambda: len(pids()) == len(supervisors), 60), "the worker processes never started"
    return pids()


def posts(site: Path) -> Path:
    return site / "site" / "posts"


def many_posts(site: Path, count: int) -> list[Path]:
    """`count` posts copied from the demo posts that tagger writes to (not the Human-only one)."""
    sources = [p for p in sorted(posts(site).glob("*.md")) if "Human" not in p.read_text(encoding="utf-8")]
    made = []
    for n in range(count):
        target = posts(site) / f"copy-{n:03d}-{sources[n % len(sources)].name}"
        shutil.copyfile(sources[n % len(sources)], target)
        made.append(target)
    return made


def written(paths: list[Path]) -> bool:
    """Every post classified and written back: tagger assigned it tags (Kanban, Continuous Delivery...)."""
    return all(
        load_record(p).assigned.get("tags") and set(load_record(p).assigned["tags"]) <= set(read_post(p).terms("tags"))
        for p in paths
    )


def queue_of(env: dict[str, str], client: redis_lib.Redis, priority: str) -> Queue:
    return Queue(f"{env['TAGGER_REDIS_PREFIX']}-{priority}", connection=client, serializer=JSONSerializer)


@pytest.mark.slow
def test_job_taken_by_a_worker_killed_before_starting_it_is_recovered(
    queue_env: dict[str, str], site: Path, private_redis: PrivateRedis
) -> None:
    """(a) STOP the worker while it waits in BLPOP, enqueue, kill -9: the popped job is written anyway."""
    queue_env = {**queue_env, "REDIS_URL": private_redis.url}
    redis = private_redis.client()
    wip = posts(site) / "limiting-wip.md"
    worker = spawn(queue_env, "work")
    try:
        # Only this test's worker talks to this Redis: a client blocked in BLPOP is it, waiting for a job.
        assert wait_for(lambda: any(c.get("cmd") == "blpop" for c in redis.client_list())), "never blocked in BLPOP"
        for pid in session_pids(worker.pid):
            os.kill(pid, signal.SIGSTOP)
        run = tagger(queue_env, "enqueue", str(wip))
        job_id = run.stdout.split()[0]
        queue = queue_of(queue_env, redis, "default")
        # Redis hands the job to the stopped worker's BLPOP: it leaves the queue and never starts.
        assert wait_for(lambda: queue.count == 0, 30)
    finally:
        kill_session(worker)
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED and job_id not in queue.get_job_ids()
    replacement = spawn(queue_env, "work")
    try:
        assert wait_for(lambda: written([wip])), "the job lost between dequeue and start was never run"
    finally:
        kill_session(replacement)
    assert tagger(queue_env, "failed", "list").stderr.strip() == "0 failed"


@pytest.mark.slow
def test_burst_workers_alone_recover_a_killed_workers_job(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, redis: redis_lib.Redis
) -> None:
    """(b) SIGKILL mid-job; then only `work --burst` runs (cron): the dead worker's job expires while that burst
    worker is busy with another post, and it recovers and runs the job before deciding it is done."""
    fake_llm.hold()  # every call waits at the model until released: the kill lands mid-job, however slow the machine
    wip, daily = posts(site) / "limiting-wip.md", posts(site) / "shipping-daily.md"
    killed_id = tagger(queue_env, "enqueue", str(wip)).stdout.split()[0]
    worker = spawn({**queue_env, "TAGGER_REQUEST_TIMEOUT": "60", "TAGGER_LEASE_SECONDS": "3"}, "work")
    assert fake_llm.wait_held(1, timeout=60)
    tagger(queue_env, "enqueue", str(daily))
    # The burst worker starts (and makes its start-up recovery) while the first worker still lives, so only its
    # look before quitting can find the job: its reaper passes every half of its 600 s lease.
    burst = subprocess.Popen(
        [sys.executable, "-m", "worker", "work", "--burst"],
        env={**queue_env, "TAGGER_LEASE_SECONDS": "600", "TAGGER_REQUEST_TIMEOUT": "60"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert fake_llm.wait_held(2, timeout=60), "the burst worker never took the other post"
        killed = Job.fetch(killed_id, connection=redis, serializer=JSONSerializer)
        assert killed.get_status() == JobStatus.STARTED, "the job was recovered while its worker lived"
        kill_session(worker)
        registry = StartedJobRegistry(queue=queue_of(queue_env, redis, "default"))
        assert wait_for(lambda: killed_id in registry.get_expired_job_ids(), 30)  # the dead worker's lease is over
        fake_llm.release()
        _, err = burst.communicate(timeout=120)
        assert burst.returncode == 0, err[-2000:]
    finally:
        fake_llm.release()
        kill_session(worker)
        if burst.poll() is None:
            os.killpg(burst.pid, signal.SIGKILL)
            burst.wait(timeout=30)
    assert written([wip, daily]), "the burst worker quit without running the dead worker's job"
    status = json.loads(tagger(queue_env, "status", "--json").stdout)
    assert all(q["running"] == 0 and q["awaiting_recovery"] == 0 for q in status["queues"].values())


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [False, True], ids=["no-persistence", "persistence"])
def test_workers_outlive_a_redis_restart_and_every_post_is_written(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, tmp_path: Path, persistent: bool
) -> None:
    """(c) Redis restarted for 3 s under a backfill with two workers: same pids alive, every post written."""
    server = PrivateRedis(tmp_path / "redis-data", persistent=persistent)
    server.folder.mkdir()
    server.start()
    env = {**queue_env, "REDIS_URL": server.url, "TAGGER_JOB_RETRIES": "5"}
    fake_llm.latency = 0.3
    made = many_posts(site, 16)
    workers = [spawn(env, "work"), spawn(env, "work")]
    try:
        processes = worker_processes(workers)  # the worker processes the supervisors started
        backfill = follow_backfill(env, site)
        assert wait_for(lambda: sum(1 for p in made if written([p])) >= 2, 60)
        server.stop()
        time.sleep(3)
        server.start()
        out, err = backfill.communicate(timeout=240)
        if not written(made):  # at most one more backfill
            again = tagger(env, "backfill", "--wait", str(site / "site"), timeout=240)
            out, err = out + again.stdout, err + again.stderr
        assert written([*made, posts(site) / "limiting-wip.md"]), out[-2000:] + err[-2000:]
        assert all(w.poll() is None for w in workers), "a supervisor exited during the Redis restart"
        assert worker_processes(workers) == processes, "a worker process died (and was restarted) during the restart"
        if not persistent:
            assert "vanished" in err or "again" in err
    finally:
        for w in workers:
            kill_session(w)
        server.stop()


@pytest.mark.slow
def test_workers_outlive_redis_out_of_memory(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, private_redis: PrivateRedis
) -> None:
    """(d) maxmemory reached (noeviction) under a backfill, then raised: workers alive, every post written."""
    env = {**queue_env, "REDIS_URL": private_redis.url, "TAGGER_JOB_RETRIES": "5"}
    client = private_redis.client()
    fake_llm.latency = 0.3
    made = many_posts(site, 12)
    workers = [spawn(env, "work"), spawn(env, "work")]
    try:
        processes = worker_processes(workers)  # the worker processes the supervisors started
        backfill = follow_backfill(env, site)
        assert wait_for(lambda: sum(1 for p in made if written([p])) >= 1, 60)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(used))
        with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
            for n in range(1000):
                client.set(f"filler{n}", "x" * 1000)  # fill it up to the limit
        time.sleep(5)
        assert all(w.poll() is None for w in workers), "a supervisor exited on OutOfMemoryError"
        # A worker that died would be restarted by its supervisor: the very processes it started must live.
        assert worker_processes(workers) == processes, "a worker process died on OutOfMemoryError"
        client.config_set("maxmemory", "0")
        out, err = backfill.communicate(timeout=240)
        if not written(made):
            again = tagger(env, "backfill", "--wait", str(site / "site"), timeout=240)
            out, err = out + again.stdout, err + again.stderr
        assert written(made), out[-2000:] + err[-2000:]
        assert all(w.poll() is None for w in workers) and worker_processes(workers) == processes
    finally:
        for w in workers:
            kill_session(w)


@pytest.mark.slow
def test_sigterm_to_supervisor_finishes_both_jobs_and_leaves_no_process(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, redis: redis_lib.Redis
) -> None:
    """(e) SIGTERM to the parent of `work --processes 2` mid-jobs: both written, exit 0, no process left."""
    fake_llm.latency = 2.0
    wip, daily = posts(site) / "limiting-wip.md", posts(site) / "shipping-daily.md"
    tagger(queue_env, "enqueue", str(wip), str(daily))
    env = {**queue_env, "TAGGER_SHUTDOWN_GRACE": "60", "TAGGER_REQUEST_TIMEOUT": "20"}
    parent = spawn(env, "work", "--processes", "2")
    try:
        started = StartedJobRegistry(queue=queue_of(queue_env, redis, "default"))
        assert wait_for(lambda: started.get_job_count(cleanup=False) == 2, 60), "both jobs never ran at once"
        os.kill(parent.pid, signal.SIGTERM)
        assert wait_for(lambda: written([wip, daily]), 90)
        ended = time.monotonic()  # both jobs' ends (within the 0.2 s poll): the workers may go now
        assert parent.wait(timeout=90) == 0
        assert time.monotonic() - ended < 10, f"exit {time.monotonic() - ended:.0f} s after the jobs ended"
        assert wait_for(lambda: not session_pids(parent.pid), 10), f"left behind: {session_pids(parent.pid)}"
    finally:
        kill_session(parent)


@pytest.mark.slow
def test_second_signal_stops_at_once_and_the_job_is_recovered(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, redis: redis_lib.Redis
) -> None:
    """A second SIGTERM stops the workers at once (not after the slow job); the job is then recovered."""
    fake_llm.latency = 30.0
    env = {**queue_env, "TAGGER_REQUEST_TIMEOUT": "60", "TAGGER_SHUTDOWN_GRACE": "120"}
    wip = posts(site) / "limiting-wip.md"
    tagger(env, "enqueue", str(wip))
    parent = spawn(env, "work", "--processes", "2")
    try:
        started = StartedJobRegistry(queue=queue_of(queue_env, redis, "default"))
        assert wait_for(lambda: started.get_job_count(cleanup=False) == 1, 60)
        os.kill(parent.pid, signal.SIGTERM)
        time.sleep(1.5)  # RQ ignores a repeat within a second (a terminal sends SIGINT to the whole group)
        stopped = time.monotonic()
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(timeout=60) == 0
        assert time.monotonic() - stopped < 20, "the second signal waited for the job"
        assert wait_for(lambda: not session_pids(parent.pid), 10)
    finally:
        kill_session(parent)
    assert not written([wip])
    fake_llm.latency = 0
    worker = spawn(queue_env, "work")
    try:
        assert wait_for(lambda: written([wip])), "the interrupted job was never run again"
    finally:
        kill_session(worker)


@pytest.mark.slow
def test_supervisor_restarts_a_child_that_dies(queue_env: dict[str, str], site: Path, redis: redis_lib.Redis) -> None:
    parent = spawn(queue_env, "work", "--processes", "2")
    try:
        children = lambda: [p for p in session_pids(parent.pid) if _parent_of(p) == parent.pid]  # noqa: E731
        assert wait_for(lambda: len(children()) == 2, 60)
        victim = children()[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(children()) == 2 and victim not in children(), 60)
        wip = posts(site) / "limiting-wip.md"
        tagger(queue_env, "enqueue", str(wip))
        assert wait_for(lambda: written([wip]))
    finally:
        os.kill(parent.pid, signal.SIGTERM)
        parent.wait(timeout=90)
        kill_session(parent)


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


@pytest.mark.slow
def test_two_producers_make_one_pending_job_per_post(
    queue_env: dict[str, str], site: Path, redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(f) Two `enqueue --stdin` of the same 50 posts at once, plus four threads: 50 jobs, each queued once."""
    from worker.queue.enqueue import enqueue_posts
    from worker.settings import Settings

    made = many_posts(site, 50)
    stdin = "".join(f"{p}\n" for p in made)
    producers = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", "enqueue", "--stdin"],
            env=queue_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for name, value in queue_env.items():
        if name.startswith(("TAGGER_", "REDIS_", "OPENAI_")):
            monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    threads = [
        threading.Thread(target=enqueue_posts, args=(made, settings, redis_lib.Redis.from_url(queue_env["REDIS_URL"])))
        for _ in range(4)
    ]
    for p in producers:
        assert p.stdin is not None
        p.stdin.write(stdin)
    for t in threads:
        t.start()
    for p in producers:
        assert p.stdin is not None
        p.stdin.close()
    outputs = [p.stdout.read() if p.stdout else "" for p in producers]
    assert all(p.wait(timeout=120) == 0 for p in producers)
    for t in threads:
        t.join()
    entries = queue_of(queue_env, redis, "default").get_job_ids()
    assert len(entries) == 50 and len(set(entries)) == 50, outputs
    assert sum(o.count(" enqueued ") for o in outputs) <= 50


@pytest.mark.slow
def test_odd_entry_on_a_queue_is_dropped_and_reported_not_fatal(
    queue_env: dict[str, str], site: Path, redis: redis_lib.Redis
) -> None:
    """(g) `RPUSH <queue> 'bad id/../x'`: the worker drops it with a log line, `failed list` shows it, and the
    next job still runs."""
    queue = queue_of(queue_env, redis, "default")
    redis.rpush(queue.key, "bad id/../x")
    wip = posts(site) / "limiting-wip.md"
    tagger(queue_env, "enqueue", str(wip))
    worker = spawn(queue_env, "work")
    try:
        assert wait_for(lambda: written([wip])), "the worker died on the odd entry"
        assert worker.poll() is None
    finally:
        kill_session(worker)
    listing = tagger(queue_env, "failed", "list")
    assert "bad_job_id" in listing.stdout and "bad id/../x" in listing.stdout


def _every_value(client: redis_lib.Redis) -> Iterator[bytes]:
    for key in client.scan_iter(count=1000):
        yield key
        kind = client.type(key)
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            values = [v for pair in client.hgetall(key).items() for v in pair]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        elif kind == b"stream":
            values = [v for _, fields in client.xrange(key) for pair in fields.items() for v in pair]
        else:
            values = []
        for value in values:
            yield value
            with contextlib.suppress(zlib.error):
                yield zlib.decompress(value)


@pytest.mark.slow
def test_api_key_echoed_by_the_provider_reaches_no_redis_key_or_value(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM, private_redis: PrivateRedis
) -> None:
    """(h) The provider echoes the key in its error: scan every key and value of Redis; the key is nowhere."""
    env = {**queue_env, "REDIS_URL": private_redis.url}
    fake_llm.inject("auth")
    wip = posts(site) / "limiting-wip.md"
    tagger(env, "enqueue", str(wip))
    work = tagger(env, "work", "--burst")
    assert work.returncode == 0, work.stderr[-2000:]
    listing = tagger(env, "failed", "list").stdout
    assert "auth" in listing
    secret = env["OPENAI_API_KEY"].encode()
    leaks = [v[:200] for v in _every_value(private_redis.client()) if secret in v]
    assert not leaks
    assert b"Incorrect API key" in b"".join(_every_value(private_redis.client()))  # the error itself is kept


@pytest.mark.slow
def test_retry_after_a_refused_chunk_asks_only_the_missing_chunks(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    """(i) First chunk judged, second refused: the retry asks only the chunks not yet judged."""
    env = {**queue_env, "TAGGER_CONCURRENCY": "1", "TAGGER_PACK_TYPES": "false"}  # one chunk per type
    wip = posts(site) / "limiting-wip.md"
    fake_llm.inject("ok", "refusal")
    tagger(env, "enqueue", str(wip))
    tagger(env, "work", "--burst")
    assert "refused" in tagger(env, "failed", "list").stdout
    chunks = len({j.type for j in load_record(wip).judgements}) + 2  # one type judged; two were not
    assert len({j.type for j in load_record(wip).judgements}) == 1
    before = fake_llm.counts["requests"]
    assert "requeued 1" in tagger(env, "failed", "retry", "--all").stdout
    tagger(env, "work", "--burst")
    assert written([wip])
    assert fake_llm.counts["requests"] - before == chunks - 1


@pytest.mark.slow
def test_a_429_storm_longer_than_a_chunk_deadline_ends_written(
    queue_env: dict[str, str], site: Path, fake_llm: FakeLLM
) -> None:
    """(j) 429s for longer than one chunk's retry deadline, on a post with more chunks than the concurrency."""
    env = {
        **queue_env,
        "TAGGER_CHUNK_SIZE": "4",
        "TAGGER_CONCURRENCY": "2",
        "TAGGER_RETRY_ATTEMPTS": "3",
        "TAGGER_RETRY_DEADLINE": "2",
        "TAGGER_RETRY_MAX_WAIT": "0.5",
        "TAGGER_JOB_RETRIES": "20",
        "TAGGER_JOB_RETRY_DELAYS": "[1]",
    }
    fake_llm.fault_rate, fake_llm.fault_mix, fake_llm.retry_after = 1.0, ("rate_limit",), "0.5"
    wip = posts(site) / "limiting-wip.md"
    tagger(env, "enqueue", str(wip))
    worker = spawn(env, "work")
    try:
        assert wait_for(lambda: fake_llm.counts["rate_limit"] >= 10, 60)
        time.sleep(4)  # the storm outlasts a chunk's 2 s deadline
        fake_llm.fault_rate = 0.0
        assert wait_for(lambda: written([wip])), "the post failed for good in the 429 storm"
    finally:
        kill_session(worker)
    assert fake_llm.counts["requests"] > 4
    assert "rate_limit" not in tagger(env, "failed", "list").stdout


@pytest.mark.slow
def test_backfill_wait_warns_when_no_worker_is_running(queue_env: dict[str, str], site: Path) -> None:
    """`backfill --wait` with no worker says so within seconds (and Ctrl-C stops waiting, not the jobs)."""
    backfill = follow_backfill(queue_env, site)
    started = time.monotonic()
    assert backfill.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(backfill.stderr or []), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("no worker is running: start 'tagger work'" in line for line in lines), 30)
        assert time.monotonic() - started < 30
        backfill.send_signal(signal.SIGINT)
        try:
            code = backfill.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # Seen once in a full run (not reproduced alone): say what the process did with SIGINT, and where it was.
            masks = [
                line for line in Path(f"/proc/{backfill.pid}/status").read_text().splitlines() if line.startswith("Sig")
            ]
            backfill.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack to stderr
            backfill.wait(timeout=10)
            time.sleep(0.5)  # the reader thread takes the last of stderr
            pytest.fail(f"backfill --wait ignored SIGINT for 30 s; {masks}; stderr:\n{''.join(lines)[-6000:]}")
        assert code == 130
    finally:
        if backfill.poll() is None:
            backfill.kill()  # never left running into the next test (its keys, its polling)
            backfill.wait(timeout=10)


def test_job_time_budget_covers_waves_of_chunks(make_settings: Callable[..., object]) -> None:
    """More chunks than TAGGER_CONCURRENCY run in waves: the job's timeout grows with the waves."""
    from worker.queue.enqueue import job_timeout

    one_wave = job_timeout(make_settings(TAGGER_CHUNK_SIZE=60, TAGGER_CONCURRENCY=4))  # type: ignore[arg-type]
    waves = job_timeout(make_settings(TAGGER_CHUNK_SIZE=1, TAGGER_CONCURRENCY=1))  # type: ignore[arg-type]
    settings = make_settings()
    per_wave = 2 * settings.retry_deadline + settings.request_timeout  # type: ignore[attr-defined]
    assert one_wave == int(per_wave + 120)  # 9 terms: within the TIMEOUT_TERMS a request timeout is for
    assert waves == int(9 * per_wave + 120)  # the demo taxonomy's 9 terms, one chunk each, one at a time


def test_job_timeout_while_rate_limited_is_transient(
    queue_env: dict[str, str], redis: redis_lib.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job out of time while the provider throttled is retried; out of time otherwise, it fails for good."""
    from datetime import UTC, datetime, timedelta

    from rq.timeouts import JobTimeoutException

    from worker.queue import keys
    from worker.queue.enqueue import job_data
    from worker.queue.jobs import on_failure
    from worker.settings import Settings

    for name, value in queue_env.items():
        if name.startswith(("TAGGER_", "REDIS_", "OPENAI_")):
            monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    queue = queue_of(queue_env, redis, "default")
    verdicts = []
    # Rate limited 10 s ago, never, and a value someone planted in Redis (untrusted input: as never, no crash).
    for limited, stored in (("yes", str(time.time() - 10)), ("no", None), ("planted", "not a time")):
        redis.delete(keys.last_rate_limit(settings))
        [job] = queue.enqueue_many([job_data(queue, "posts/x.md", f"timeout-{limited}", settings)])
        job.started_at = datetime.now(UTC) - timedelta(seconds=30)
        if stored is not None:
            redis.set(keys.last_rate_limit(settings), stored)
        on_failure(job, redis, JobTimeoutException, JobTimeoutException("out of time"), None)
        verdicts.append((job.meta["kind"], job.meta["transient"], bool(job.retries_left)))
    assert verdicts == [("job_timeout", True, True), ("job_timeout", False, False), ("job_timeout", False, False)]
