"""Chaos run: posts through real workers while the fake LLM injects faults, workers are SIGKILLed at random,
Redis is restarted under them and a writer edits posts; then every worker is killed at once and only burst
workers (the cron pattern) finish the work. Checks that nothing was lost, corrupted or left in "started".

With --remote, the same with self-contained jobs: workers in an empty folder with no content or taxonomy
settings, and `tagger apply` writing the results into the content folder, also while the writer edits it.

Usage: .venv/bin/python benchmarks/chaos.py [--posts 300] [--workers 4] [--fault-rate 0.2] [--kills 8] [--remote]
(it starts a private redis-server, with an append-only file, so that it may restart it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis as redis_lib
from rq import Queue, Worker
from rq.defaults import RQ_KEY_PREFIX
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from benchmarks._support import REPO, delete_prefix
from tests.fakellm import FakeLLM
from worker.posts import ORIGIN_KEY, foreign_changes, read_post

FAULT_MIX = ("rate_limit", "server_error", "timeout", "broken_json", "schema_invalid", "refusal")
OWNED_TYPES = ("categories", "tags", "concepts")
EDIT = "\n\nA late paragraph from the editor, written while tagger was at work.\n"


@dataclass
class Report:
    """The figures a chaos run prints; `lost` and `corrupted` must be 0."""

    posts: int = 0
    faults: int = 0
    kills: int = 0
    redis_restarts: int = 0
    final_kill_busy: int = 0
    burst_runs: int = 0
    retries: int = 0
    recovered: int = 0
    edits: int = 0
    failed_before_retry: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    stuck_started: int = 0
    applies: int = 0  # remote mode: `tagger apply` runs
    reenqueued: int = 0  # remote mode: posts `apply` found edited since their job and enqueued again

    def lines(self) -> list[str]:
        """Human-readable figures."""
        return [
            f"posts {self.posts}, faults injected {self.faults}, workers killed {self.kills}, "
            f"jobs recovered from killed workers {self.recovered}, job re-runs {self.retries}, "
            f"concurrent edits {self.edits}, Redis restarts {self.redis_restarts}",
            f"final kill of every worker ({self.final_kill_busy} mid-job), then burst workers only: "
            f"{self.burst_runs} burst runs",
            f"failed before `failed retry --all`: {self.failed_before_retry or 'none'}",
            *([f"remote: {self.applies} apply runs, {self.reenqueued} re-enqueued by apply"] * bool(self.applies)),
            f"lost {len(self.lost)}, corrupted {len(self.corrupted)}, stuck in started {self.stuck_started}",
            *[f"  lost: {p}" for p in self.lost[:10]],
            *[f"  corrupted: {p}" for p in self.corrupted[:10]],
        ]


def make_content(root: Path, posts: int) -> None:
    """`posts` copies of the demo posts (one of them Human-only) in a scratch content folder."""
    demo = sorted((REPO / "examples" / "site").rglob("*.md"))
    for n in range(posts):
        source = demo[n % len(demo)]
        shutil.copyfile(source, root / f"{n:04d}-{source.name}")


def expected_terms(content: Path, env: dict[str, str]) -> dict[str, dict[str, list[str]]]:
    """What a clean run (no faults, no kills) assigns: classify a copy inline."""
    clean = Path(tempfile.mkdtemp(prefix="tagger-clean-"))
    shutil.copytree(content, clean, dirs_exist_ok=True)
    fake = FakeLLM().start()
    try:
        run_env = {**env, "OPENAI_BASE_URL": fake.base_url, "TAGGER_CONTENT_DIR": str(clean)}
        subprocess.run(
            [sys.executable, "-m", "worker", "backfill", "--inline", str(clean)],
            env=run_env,
            check=True,
            capture_output=True,
        )
    finally:
        fake.stop()
    result = {p.name: {t: read_post(p).terms(t) for t in OWNED_TYPES} for p in clean.glob("*.md")}
    shutil.rmtree(clean, ignore_errors=True)
    return result


def check_post(path: Path, original: bytes, edited: bool, expected: dict[str, list[str]]) -> str | None:
    """Why a post is corrupted or wrongly classified, or None."""
    try:
        post = read_post(path)
    except Exception as exc:
        return f"does not parse: {exc}"
    old = original.decode("utf-8")
    new = path.read_text(encoding="utf-8")
    old_body = read_post_body(old)
    if post.body != old_body + (EDIT if edited else ""):
        return "body differs from the input and the writer's edit"
    old_head, new_head = old[: len(old) - len(old_body)], new[: len(new) - len(post.body)]
    foreign = foreign_changes(old_head, new_head, (*OWNED_TYPES, ORIGIN_KEY))
    if foreign:
        return f"bytes outside the owned keys changed: {foreign}"
    got = {t: post.terms(t) for t in OWNED_TYPES}
    if got != expected:
        return f"classified {got}, a clean run gives {expected}"
    return None


def read_post_body(text: str) -> str:
    """The body of a post's text (what follows its front matter)."""
    for opener, closer in (("---", r"^---[ \t]*\r?\n"), ("+++", r"^\+\+\+[ \t]*\r?\n")):
        if text.startswith(opener):
            match = re.compile(closer, re.M).search(text, len(opener) + 1)
            return text[match.end() :] if match else ""
    return text


class PrivateRedis:
    """A redis-server of the run's own (append-only file, as in production), which the run may restart."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.folder = Path(tempfile.mkdtemp(prefix="tagger-chaos-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or start again) on the same port and data folder."""
        command = ["redis-server", "--port", str(self.port), "--dir", str(self.folder), "--save", ""]
        self.process = subprocess.Popen([*command, "--appendonly", "yes"], stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                if redis_lib.Redis.from_url(self.url).ping():
                    return
            except redis_lib.RedisError:
                time.sleep(0.1)
        raise SystemExit("private redis-server did not start")

    def stop(self) -> None:
        """Shut down (SIGTERM: Redis flushes its append-only file)."""
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None

    def restart(self, down: float = 3.0) -> None:
        """Down for `down` seconds, then back."""
        self.stop()
        time.sleep(down)
        self.start()


def run(
    url: str,
    posts: int,
    workers: int,
    fault_rate: float,
    kills: int,
    limit: float,
    seed: int = 7,
    restart_redis: Callable[[], None] | None = None,
    remote: bool = False,
) -> Report:
    """One chaos run; returns its figures. `restart_redis` (when given) restarts Redis halfway through the kills."""
    rnd = random.Random(seed)
    content = Path(tempfile.mkdtemp(prefix="tagger-chaos-"))
    make_content(content, posts)
    originals = {p.name: p.read_bytes() for p in content.glob("*.md")}
    prefix = f"chaos{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_", "REDIS_"))}
    env.update(
        REDIS_URL=url,
        RQ_KEY_PREFIX=RQ_KEY_PREFIX,  # this process reads the workers' RQ keys: same prefix
        TAGGER_REDIS_PREFIX=prefix,
        TAGGER_PROVIDER="openai",
        OPENAI_API_KEY="sk-chaos",
        TAGGER_MODEL="chaos",
        TAGGER_TAXONOMY_DIR=str(REPO / "categories"),
        TAGGER_CONTENT_DIR=str(content),
        TAGGER_REQUEST_TIMEOUT="1",
        TAGGER_RETRY_ATTEMPTS="3",
        TAGGER_RETRY_DEADLINE="10",
        TAGGER_RETRY_MAX_WAIT="0.5",
        TAGGER_JOB_RETRIES="4",
        TAGGER_JOB_RETRY_DELAYS="[1]",
        TAGGER_LEASE_SECONDS="2",
        TAGGER_ABANDONED_REQUEUES="10",
        TAGGER_LOG_LEVEL="WARNING",
    )
    expected = expected_terms(content, env)
    elsewhere = Path(tempfile.mkdtemp(prefix="tagger-chaos-worker-"))  # a remote worker's empty folder
    if remote:
        env.update(TAGGER_JOB_MODE="remote", TAGGER_STATE_FILE=str(elsewhere.parent / f"{prefix}-state.json"))
    worker_env = {k: v for k, v in env.items() if not remote or k not in ("TAGGER_CONTENT_DIR", "TAGGER_TAXONOMY_DIR")}
    fake = FakeLLM(latency=0.3, seed=seed).start()
    fake.fault_rate, fake.fault_mix, fake.retry_after, fake.timeout_sleep = fault_rate, FAULT_MIX, "0.2", 1.5
    env["OPENAI_BASE_URL"] = fake.base_url
    worker_env["OPENAI_BASE_URL"] = fake.base_url
    cwd = elsewhere if remote else None
    report = Report(posts=posts)
    tagger = [sys.executable, "-m", "worker"]

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*tagger, "work"],
            env=worker_env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    pool = [start_worker() for _ in range(workers)]
    edited: set[str] = set()
    stop = threading.Event()

    def applier() -> None:  # remote mode: `tagger apply` keeps writing results while the writer edits posts
        while not stop.wait(1.0):
            run = subprocess.run([*tagger, "apply"], env=env, capture_output=True, text=True)
            report.applies += 1
            report.reenqueued += run.stdout.count(" re-enqueued ")

    def apply_until_done() -> None:
        for _ in range(8):
            run = subprocess.run([*tagger, "apply"], env=env, capture_output=True, text=True)
            report.applies += 1
            report.reenqueued += run.stdout.count(" re-enqueued ")
            if run.returncode == 0:
                return
            if run.returncode == 1:
                subprocess.run([*tagger, "failed", "retry", "--all"], env=env, capture_output=True)
            report.burst_runs += _burst_until_settled(env, workers, time.monotonic() + limit, worker_env, cwd)

    def writer() -> None:
        for path in rnd.sample(sorted(content.glob("*.md")), k=max(1, posts // 10)):
            if stop.wait(rnd.uniform(0.05, 0.6)):
                return
            with path.open("a", encoding="utf-8") as handle:  # a person's editor appending, not atomic
                handle.write(EDIT)
            edited.add(path.name)

    try:
        subprocess.run([*tagger, "backfill", str(content)], env=env, check=True, capture_output=True)
        client = redis_lib.Redis.from_url(url)
        queue = Queue(f"{prefix}-low", connection=client, serializer=JSONSerializer)  # where backfill enqueues
        writing = threading.Thread(target=writer)
        writing.start()
        applying = threading.Thread(target=applier) if remote else None
        if applying:
            applying.start()
        deadline = time.monotonic() + limit
        next_kill = time.monotonic() + rnd.uniform(0.2, 1.0)
        while time.monotonic() < deadline and report.kills < kills:
            if restart_redis and not report.redis_restarts and report.kills >= kills // 2:
                restart_redis()  # the workers (and their reapers and schedulers) must ride it out
                report.redis_restarts += 1
            try:
                busy = {w.pid for w in Worker.all(connection=client, queue=queue) if w.get_current_job_id()}
            except redis_lib.RedisError:
                time.sleep(0.2)
                continue
            # `tagger work` supervises its worker process: the victim is the command whose child is busy.
            victims = [w for w in pool if w.pid in busy or w.pid in {_parent(pid) for pid in busy}]
            if time.monotonic() >= next_kill and victims:
                victim = rnd.choice(victims)  # a worker in the middle of a job
                pool.remove(victim)
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                report.kills += 1
                pool.append(start_worker())
                next_kill = time.monotonic() + rnd.uniform(0.2, 1.0)
            time.sleep(0.05)
        writing.join()
        if applying:
            stop.set()
            applying.join()
        report.edits = len(edited)
        # Every worker killed at once, busy or not; from now on only burst workers run (cron's pattern).
        report.final_kill_busy = len([w for w in Worker.all(connection=client, queue=queue) if w.get_current_job_id()])
        for worker in pool:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        pool = []
        report.burst_runs += _burst_until_settled(env, workers, time.monotonic() + limit, worker_env, cwd)
        failed = json.loads(
            subprocess.run([*tagger, "status", "--json"], env=env, capture_output=True, text=True).stdout
        )["failed_by_kind"]
        report.failed_before_retry = failed
        fake.fault_rate = 0.0
        subprocess.run([*tagger, "resume"], env=env, capture_output=True)
        subprocess.run([*tagger, "failed", "retry", "--all"], env=env, capture_output=True)
        if remote:
            report.burst_runs += _burst_until_settled(env, workers, time.monotonic() + limit, worker_env, cwd)
            apply_until_done()
        # Posts edited after their last pass were enqueued again by nobody: a backfill picks them up.
        subprocess.run([*tagger, "backfill", str(content)], env=env, capture_output=True)
        report.burst_runs += _burst_until_settled(env, workers, time.monotonic() + limit, worker_env, cwd)
        if remote:
            apply_until_done()
        if remote and any(elsewhere.iterdir()):
            report.corrupted.append(f"a remote worker wrote into its folder: {sorted(elsewhere.iterdir())[:3]}")
    finally:
        stop.set()
        for worker in pool:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in pool:
            worker.wait(timeout=60)
        fake.stop()
    report.faults = sum(fake.counts[f] for f in FAULT_MIX)
    job_ids = [k.decode().split(":")[-1] for k in client.scan_iter(f"{RQ_KEY_PREFIX}:job:post-*")]
    ours = [
        j
        for j in Job.fetch_many(job_ids, connection=client, serializer=JSONSerializer)
        if j is not None and j.origin.startswith(f"{prefix}-")
    ]
    for job in ours:
        if job is not None:
            report.retries += max(0, int(job.meta.get("attempts", 1)) - 1)
            report.recovered += int(job.meta.get("abandoned", 0))
    for priority in ("high", "default", "low"):
        queue = Queue(f"{prefix}-{priority}", connection=client, serializer=JSONSerializer)
        report.stuck_started += StartedJobRegistry(queue=queue).get_job_count(cleanup=False)
    stale = subprocess.run(
        [*tagger, "backfill", "--estimate", str(content)], env=env, capture_output=True, text=True
    ).stdout
    for name, original in originals.items():
        path = content / name
        problem = check_post(path, original, name in edited, expected[name])
        if problem:
            report.corrupted.append(f"{name}: {problem}")
    match = re.search(r"(\d+) to classify", stale)
    if match and int(match.group(1)):
        report.lost.append(f"{match.group(1)} posts still need classifying: {stale.splitlines()[0]}")
    for job in ours:
        try:
            job.delete()
        except ValueError:  # RQ: an execution of a killed worker expired before its index entry
            job.cleanup(ttl=1)
    delete_prefix(url, f"{RQ_KEY_PREFIX}:*{prefix}-*", f"{prefix}:*")
    shutil.rmtree(content, ignore_errors=True)
    shutil.rmtree(elsewhere, ignore_errors=True)
    return report


def _parent(pid: int) -> int:
    """The parent of a process (Linux /proc), or -1."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _burst_until_settled(
    env: dict[str, str],
    workers: int,
    deadline: float,
    worker_env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Run rounds of `workers` burst workers until nothing is queued, scheduled, running or awaiting recovery;
    returns how many burst workers ran."""
    tagger = [sys.executable, "-m", "worker"]
    quiet = runs = 0
    while time.monotonic() < deadline:
        status = json.loads(
            subprocess.run([*tagger, "status", "--json"], env=env, capture_output=True, text=True).stdout
        )
        busy = sum(
            q["queued"] + q["running"] + q["scheduled"] + q["awaiting_recovery"] for q in status["queues"].values()
        )
        quiet = quiet + 1 if busy == 0 else 0
        if quiet >= 2:
            break
        burst = [
            subprocess.Popen(
                [*tagger, "work", "--burst"],
                env=worker_env or env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        for process in burst:
            process.wait()
        runs += len(burst)
        time.sleep(1.0)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--posts", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--limit", type=float, default=600.0, help="seconds allowed for each phase")
    parser.add_argument("--remote", action="store_true", help="self-contained jobs, workers with no files, apply")
    args = parser.parse_args()
    server = PrivateRedis()
    server.start()
    try:
        report = run(
            server.url,
            args.posts,
            args.workers,
            args.fault_rate,
            args.kills,
            args.limit,
            restart_redis=server.restart,
            remote=args.remote,
        )
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
    print("\n".join(report.lines()))
    if report.lost or report.corrupted or report.stuck_started:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
