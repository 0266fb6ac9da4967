"""Throughput benchmark: N posts through W real worker processes against the fake server.

Prints posts/s against the ideal for the fake latency (a post's calls run in parallel, so a post costs one
round trip per worker), measured from the first job's start to the last job's end in the workers' own
JSON logs (process start-up is reported apart); and, with latency 0, the time per job outside LLM calls.
With --remote, the same with self-contained jobs (TAGGER_JOB_MODE=remote: workers in an empty folder with no
content or taxonomy settings), then `tagger apply` in the producer's folder; prints the bytes per job of both modes.
Usage: .venv/bin/python benchmarks/throughput.py [--posts 120] [--workers 4] [--latency 0.5] [--remote]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import REPO, delete_prefix, demo_site, redis_url
from tests.fakellm import FakeLLM


@dataclass
class Run:
    """What one run of the workers showed."""

    wall: float
    busy: float
    job_seconds: list[float]
    llm_seconds: list[float]
    job_bytes: float = 0.0  # median serialized job data (JSON, before RQ compresses it)
    apply_seconds: float = 0.0  # remote mode: `tagger apply` of every result


JOB_SIZES = """
import json, os, statistics
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
redis = Redis.from_url(os.environ["REDIS_URL"])
names = [os.environ["TAGGER_REDIS_PREFIX"] + "-" + p for p in ("high", "default", "low")]
ids = [i for name in names for i in Queue(name, connection=redis).get_job_ids()]
jobs = Job.fetch_many(ids, connection=redis, serializer=JSONSerializer)
print(statistics.median(len(j.data) for j in jobs if j is not None))
"""


def job_sizes(env: dict[str, str]) -> float:
    """Median size of the queued jobs' data (RQ's API, in a process with the run's RQ_KEY_PREFIX)."""
    out = subprocess.run([sys.executable, "-c", JOB_SIZES], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout)


def run(url: str, posts: int, workers: int, latency: float, remote: bool = False) -> Run:
    """Enqueue `posts` posts, run `workers` burst workers, read their job events."""
    fake = FakeLLM(latency=latency).start()
    site = demo_site(posts)
    prefix = f"tp{os.getpid()}{int(latency * 1000)}{'r' if remote else ''}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_", "REDIS_"))}
    env.update(
        REDIS_URL=url,
        RQ_KEY_PREFIX=f"rq{prefix}",
        TAGGER_REDIS_PREFIX=prefix,
        TAGGER_PROVIDER="openai",
        OPENAI_BASE_URL=fake.base_url,
        OPENAI_API_KEY="sk-bench",
        TAGGER_MODEL="bench",
        TAGGER_TAXONOMY_DIR=str(REPO / "categories"),
        TAGGER_CONTENT_DIR=str(site),
        TAGGER_LOG_FORMAT="json",
    )
    tagger = [sys.executable, "-m", "worker"]
    elsewhere = Path(tempfile.mkdtemp(prefix="tagger-tp-worker-"))  # a remote worker's empty folder
    worker_env = dict(env)
    if remote:
        env["TAGGER_JOB_MODE"] = "remote"
        env["TAGGER_STATE_FILE"] = str(elsewhere.parent / f"{prefix}-state.json")
        worker_env = {k: v for k, v in env.items() if k not in ("TAGGER_CONTENT_DIR", "TAGGER_TAXONOMY_DIR")}
    try:
        subprocess.run([*tagger, "backfill", str(site)], env=env, check=True, capture_output=True)
        job_bytes = job_sizes(env)
        started = time.monotonic()
        work = subprocess.run(
            [*tagger, "work", "--burst", "--processes", str(workers)],
            env=worker_env,
            cwd=elsewhere if remote else None,
            check=True,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - started
        apply_seconds = 0.0
        if remote:
            ids = [json.loads(line)["job_id"] for line in work.stderr.splitlines() if '"decided"' in line]
            applied = time.monotonic()
            subprocess.run([*tagger, "apply", *ids], env=env, check=True, capture_output=True)
            apply_seconds = time.monotonic() - applied
        events = [json.loads(line) for line in work.stderr.splitlines() if line.startswith("{")]
        starts = [datetime.fromisoformat(e["timestamp"]) for e in events if e["event"] == "started"]
        ends = [e for e in events if e["event"] in ("written", "skipped", "decided")]
        if len(ends) != posts:
            raise SystemExit(f"only {len(ends)} of {posts} posts were classified")
        last = max(datetime.fromisoformat(e["timestamp"]) for e in ends)
        return Run(
            wall,
            (last - min(starts)).total_seconds(),
            [e["duration"] for e in ends],
            [e["llm_seconds"] for e in ends],
            job_bytes,
            apply_seconds,
        )
    finally:
        fake.stop()
        delete_prefix(url, f"rq{prefix}:*", f"{prefix}:*")
        shutil.rmtree(site, ignore_errors=True)
        shutil.rmtree(elsewhere, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--posts", type=int, default=120)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--remote", action="store_true", help="Also self-contained jobs, against shared-folder jobs.")
    args = parser.parse_args()
    with redis_url() as url:
        slow = run(url, args.posts, args.workers, args.latency)
        fast = run(url, args.posts, args.workers, 0.0)
        if args.remote:
            remote = run(url, args.posts, args.workers, args.latency, remote=True)
            shared_rate, remote_rate = args.posts / slow.busy, args.posts / remote.busy
            print(
                f"remote jobs: {remote_rate:.2f} posts/s against {shared_rate:.2f} shared-folder = "
                f"{remote_rate / shared_rate:.0%}; median job data {remote.job_bytes / 1024:.1f} KiB against "
                f"{slow.job_bytes / 1024:.2f} KiB; apply of {args.posts} results {remote.apply_seconds:.1f}s"
            )
            print(
                f"remote jobs: {remote_rate:.2f} posts/s against an ideal of {args.workers / args.latency:.2f} posts/s "
                f"= {remote_rate * args.latency / args.workers:.1%} (first job start to last job end)"
            )
    ideal = args.workers / args.latency
    measured = args.posts / slow.busy
    job = statistics.median(fast.job_seconds)
    outside = statistics.median(j - w for j, w in zip(fast.job_seconds, fast.llm_seconds, strict=True))
    print(f"posts {args.posts}, workers {args.workers}, fake latency {args.latency}s, one call per post")
    print(
        f"throughput: {measured:.2f} posts/s against an ideal of {ideal:.2f} posts/s = {measured / ideal:.1%} "
        f"(first job start to last job end; {slow.wall:.1f}s with process start-up)"
    )
    print(
        f"latency {args.latency}: median job {statistics.median(slow.job_seconds) * 1000:.0f} ms, "
        f"median time in LLM calls {statistics.median(slow.llm_seconds) * 1000:.0f} ms"
    )
    print(
        f"latency 0: median job {job * 1000:.0f} ms, of which outside LLM calls {outside * 1000:.0f} ms "
        f"= {outside / args.latency:.0%} of one {args.latency}s round trip"
    )


if __name__ == "__main__":
    main()
