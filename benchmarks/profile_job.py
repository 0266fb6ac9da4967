"""Where a worker's time goes outside the model's wait: N posts through one worker in this process, profiled.

The fake server answers at once (latency 0) in a process of its own, so everything the profile shows is tagger's
and RQ's own work per job (reading, prompting, validation, records, writing, Redis round trips) and the SDK's
side of each HTTP call. Prints the wall time per job and the profile's top functions (own time and cumulative).
Usage: .venv/bin/python benchmarks/profile_job.py [--posts 60] [--remote] [--top 25] [--sort tottime|cumulative]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

PREFIX = f"pj{os.getpid()}"
os.environ["RQ_KEY_PREFIX"] = f"rq{PREFIX}"  # RQ reads it at import: set before anything imports rq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import REPO, delete_prefix, demo_site, redis_url  # noqa: E402

SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks._support import FakeLLM
fake = FakeLLM(latency=0.0).start()
print(fake.base_url, flush=True)
sys.stdin.read()
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--posts", type=int, default=60)
    parser.add_argument("--remote", action="store_true", help="self-contained jobs (TAGGER_JOB_MODE=remote)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    parser.add_argument("--cpu", action="store_true", help="CPU time (the process's own work) instead of wall time")
    args = parser.parse_args()
    # The fake server in a process of its own: its work is not tagger's and must not be in the profile.
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(REPO)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    base_url = server.stdout.readline().strip()
    site = demo_site(args.posts)
    try:
        with redis_url() as url:
            os.environ.update(
                REDIS_URL=url,
                TAGGER_REDIS_PREFIX=PREFIX,
                TAGGER_PROVIDER="openai",
                OPENAI_BASE_URL=base_url,
                OPENAI_API_KEY="sk-bench",
                TAGGER_MODEL="bench",
                TAGGER_TAXONOMY_DIR=str(REPO / "categories"),
                TAGGER_CONTENT_DIR=str(site),
                TAGGER_LOG_LEVEL="WARNING",
                TAGGER_JOB_MODE="remote" if args.remote else "shared",
            )
            from redis import Redis

            from worker.logs import configure
            from worker.queue.enqueue import enqueue_posts
            from worker.queue.workers import run_worker
            from worker.settings import Settings

            settings = Settings(_env_file=None)  # type: ignore[call-arg]
            configure(settings, quiet=True)
            redis = Redis.from_url(url)
            try:
                enqueue_posts(sorted(site.glob("*.md")), settings, redis)
                if args.remote:
                    # a remote worker has no folders: only what the job and Redis carry
                    settings = settings.model_copy(update={"content_dir": None, "taxonomy_dir": None})
                profile = cProfile.Profile(time.process_time) if args.cpu else cProfile.Profile()
                cpu = time.process_time()
                started = time.perf_counter()
                profile.enable()
                run_worker(settings, redis, burst=True)
                profile.disable()
                wall = time.perf_counter() - started
                cpu = time.process_time() - cpu
            finally:
                delete_prefix(url, f"rq{PREFIX}:*", f"{PREFIX}:*", f"{PREFIX}-*")
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats(args.sort).print_stats(args.top)
        mode = "remote" if args.remote else "shared-folder"
        print(
            f"{args.posts} {mode} jobs, one worker in-process, fake latency 0: {wall / args.posts * 1000:.1f} ms/job "
            f"wall, {cpu / args.posts * 1000:.1f} ms/job CPU (worker start-up included; profile clock: "
            f"{'CPU' if args.cpu else 'wall'})"
        )
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:8000])
    finally:
        server.stdin.close() if server.stdin else None
        server.wait(timeout=30)
        shutil.rmtree(site, ignore_errors=True)


if __name__ == "__main__":
    main()
