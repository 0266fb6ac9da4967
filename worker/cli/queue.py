"""Queue subcommands: enqueue, backfill, work, failed, status (parse and print only)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker import backfill as backfill_lib
from worker import oncall
from worker.errors import TaggerError
from worker.logs import configure
from worker.providers import OFFLINE_NOTE
from worker.queue.jobs import confine, enqueue_posts
from worker.queue.keys import PRIORITIES, connect
from worker.queue.throttle import RedisThrottle
from worker.queue.workers import run_worker
from worker.settings import Settings


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Enqueue posts for the workers; prints one line per post."""
    settings = Settings()
    configure(settings, quiet=True)
    paths = list(args.paths)
    if args.stdin:
        paths += [line.strip() for line in sys.stdin if line.strip()]
    if args.changed_since:
        paths += backfill_lib.changed_since(settings, args.changed_since)
    code = 0
    accepted = []
    for path in paths:
        try:
            confine(path, settings)
            accepted.append(path)
        except TaggerError as exc:
            print(f"REFUSED {exc}", file=sys.stderr)
            code = 1
    for item in enqueue_posts(accepted, settings, connect(settings), args.priority):
        print(f"{item.job_id}  {item.action:<20} {item.path}")
    return code


def cmd_backfill(args: argparse.Namespace) -> int:
    """Classify a whole content folder, inline or through the queue."""
    settings = Settings().model_copy(update={"content_dir": Path(args.dir)})
    configure(settings, quiet=True)
    plan = backfill_lib.plan(settings, include_fresh=args.all, limit=args.limit, types=args.type)
    print(f"backfill: {len(plan.todo)} to classify, {plan.fresh} fresh (skipped), {len(plan.bad)} unreadable")
    for line in plan.bad:
        print(f"FAILED {line}", file=sys.stderr)
    if args.estimate:
        est = backfill_lib.estimate(settings, plan.todo, args.type)
        cost = (
            f"${est.cost:.4f}" if est.cost is not None else f"unknown (no price for {settings.model} in TAGGER_PRICES)"
        )
        print(
            f"estimate for {settings.model}: {est.posts} posts, {est.calls} calls, "
            f"{est.input_tokens} input tokens ({est.cached_tokens} cacheable, "
            f"{est.input_tokens - est.cached_tokens} uncached), {est.output_tokens} output tokens, cost {cost}"
        )
        return 0
    if args.inline:
        if settings.provider == "offline":
            print(OFFLINE_NOTE, file=sys.stderr)
        summary = backfill_lib.run_inline(settings, plan.todo, progress=_progress, types=args.type)
        print(
            f"\nbackfill: {summary.done} done, {summary.written} written, {len(summary.failed)} failed, "
            f"{summary.calls} provider calls, {summary.tokens} tokens"
        )
        for line in summary.retired:
            print(f"  removed, no longer in the taxonomy: {line}")
        for line in summary.failed:
            print(f"FAILED {line}", file=sys.stderr)
        return 1 if summary.failed or plan.bad else 0
    redis = connect(settings)
    results = enqueue_posts(plan.todo, settings, redis, args.priority, types=args.type)
    enqueued = [r for r in results if r.action == "enqueued"]
    print(f"backfill: enqueued {len(enqueued)}, already waiting {len(results) - len(enqueued)}")
    if not args.wait:
        return 0
    try:
        summary = backfill_lib.follow(settings, redis, [r.job_id for r in results], progress=_progress)
    except KeyboardInterrupt:
        print("\nbackfill: stopped waiting; the workers carry on")
        return 130
    print(f"\nbackfill: {summary.done} done, {len(summary.failed)} failed, {summary.tokens} tokens")
    return 1 if summary.failed else 0


def _progress(done: int, failed: int, total: int, started: float, tokens: int) -> None:
    finished = done + failed
    # On a terminal the bar redraws in place; in a log (cron, CI) it prints a line every tenth of the way.
    if not sys.stdout.isatty() and finished != total and finished * 10 // total == (finished - 1) * 10 // total:
        return
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = (done + failed) / elapsed
    eta = (total - done - failed) / rate if rate else 0
    width = 30
    filled = int(width * (done + failed) / max(total, 1))
    sys.stdout.write(
        ("\r" if sys.stdout.isatty() else "\n")
        + f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} done, {failed} failed, "
        f"{rate:.1f}/s, ETA {eta:.0f}s, {tokens} tokens "
    )
    sys.stdout.flush()


def cmd_work(args: argparse.Namespace) -> int:
    """Run RQ workers with tagger's settings (JSON serializer, scheduler, abandoned-job recovery)."""
    settings = Settings()
    configure(settings)
    if args.processes > 1:
        command = [
            sys.executable,
            "-m",
            "worker",
            "work",
            "--processes",
            "1",
            *(["--burst"] if args.burst else []),
            *(["--queues", *args.queues] if args.queues else []),
        ]
        children = [subprocess.Popen(command) for _ in range(args.processes)]
        try:
            return max(child.wait() for child in children)
        except KeyboardInterrupt:
            for child in children:
                child.terminate()
            return max(child.wait() for child in children)
    run_worker(settings, connect(settings), args.queues or PRIORITIES, burst=args.burst)
    return 0


def cmd_failed(args: argparse.Namespace) -> int:
    """List, show, retry or purge failed jobs."""
    settings = Settings()
    configure(settings, quiet=True)  # warnings go to stderr, never into the printed table or JSON
    redis = connect(settings)
    if args.action == "list":
        rows = oncall.failures(settings, redis, args.error)
        print(f"{'job':<30} {'kind':<14} {'tries':>5}  {'when':<19}  post / message")
        for f in rows:
            when = datetime.fromtimestamp(f.failed_at, UTC).strftime("%Y-%m-%d %H:%M:%S") if f.failed_at else "?"
            print(f"{f.job_id:<30} {f.kind:<14} {f.attempts:>5}  {when:<19}  {f.post}: {f.message[:100]}")
        print(f"{len(rows)} failed", file=sys.stderr)
        return 0
    if args.action == "show":
        code = 0
        for job_id in args.jobs:
            info = oncall.show(settings, redis, job_id)
            if info is None:
                print(f"{job_id}: no such job", file=sys.stderr)
                code = 1
                continue
            for key, value in info.items():
                text = value if isinstance(value, str) else json.dumps(value)
                print(f"{key}:\n{text}" if isinstance(value, str) and "\n" in value else f"{key}: {text}")
        return code
    if args.action == "retry":
        if not args.jobs and not args.all:
            print("name job ids, or --all [--error KIND]", file=sys.stderr)
            return 2
        done = oncall.retry(settings, redis, None if args.all else args.jobs, args.error)
        print(f"requeued {len(done)}: {' '.join(done)}" if done else "nothing to do")
        return 0
    if args.action == "purge":
        count = len(oncall.failures(settings, redis))
        if not count:
            print("nothing to do")
            return 0
        if not args.yes and input(f"delete {count} failed jobs? [y/N] ").strip().lower() != "y":
            print("not deleted")
            return 1
        print(f"deleted {oncall.purge(settings, redis)} failed jobs")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print queue depths, workers, failures by kind, throughput and tokens."""
    settings = Settings()
    configure(settings, quiet=True)  # warnings go to stderr, never into the printed table or JSON
    info = oncall.status(settings, connect(settings))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    if info["paused"]:
        print(f"PAUSED for {info['paused']['seconds']}s: {info['paused']['reason']} (workers hold their LLM calls)")
    for name, depth in info["queues"].items():
        print(f"{name:<24} " + "  ".join(f"{k} {v}" for k, v in depth.items()))
    print(
        f"workers: {len(info['workers'])}"
        + "".join(f"\n  {w['name']} {w['state']} {w['job'] or ''}" for w in info["workers"])
    )
    print("failed by kind: " + (", ".join(f"{k} {v}" for k, v in info["failed_by_kind"].items()) or "none"))
    minutes = info["last_minutes"]
    print(
        f"last {minutes} min: {info['done']} posts ({info['done'] / minutes:.1f}/min), {info['calls']} LLM calls, "
        f"{info['tokens']} tokens"
    )
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Lift the shared pause that quota exhaustion or 429s put on every worker."""
    settings = Settings()
    configure(settings, quiet=True)  # warnings go to stderr, never into the printed table or JSON
    lifted = RedisThrottle(settings, connect(settings)).resume()
    print("resumed: workers may call the LLM again" if lifted else "nothing to do: not paused")
    return 0


def add_commands(sub: Any) -> None:
    """Register the queue subcommands on the main parser."""
    enqueue = sub.add_parser("enqueue", help="enqueue posts for the workers")
    enqueue.add_argument("paths", nargs="*", metavar="PATH")
    enqueue.add_argument("--priority", choices=PRIORITIES, default="default")
    enqueue.add_argument("--stdin", action="store_true", help="also read paths from stdin, one per line")
    enqueue.add_argument("--changed-since", metavar="GIT_REV", help="posts changed in the content folder since REV")
    enqueue.set_defaults(func=cmd_enqueue)

    backfill = sub.add_parser("backfill", help="classify a whole content folder")
    backfill.add_argument("dir", metavar="DIR")
    backfill.add_argument("--wait", action="store_true", help="follow completion with a progress bar")
    backfill.add_argument("--inline", action="store_true", help="run in this process, no Redis")
    backfill.add_argument("--all", action="store_true", help="include posts whose record is fresh")
    backfill.add_argument("--limit", type=int)
    backfill.add_argument("--type", action="append", help="only this classification type (repeatable)")
    backfill.add_argument("--priority", choices=PRIORITIES, default="low")
    backfill.add_argument("--estimate", action="store_true", help="print calls, tokens and cost; call nothing")
    backfill.set_defaults(func=cmd_backfill)

    work = sub.add_parser("work", help="run workers")
    work.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    work.add_argument("--processes", type=int, default=1)
    work.add_argument("--queues", nargs="+", choices=PRIORITIES)
    work.set_defaults(func=cmd_work)

    failed = sub.add_parser("failed", help="failed jobs: list, show, retry, purge")
    failed.add_argument("action", choices=["list", "show", "retry", "purge"])
    failed.add_argument("jobs", nargs="*", metavar="JOB")
    failed.add_argument("--all", action="store_true")
    failed.add_argument("--error", metavar="KIND", help="only failures of this kind")
    failed.add_argument("--yes", action="store_true", help="purge without asking")
    failed.set_defaults(func=cmd_failed)

    status = sub.add_parser("status", help="queues, workers, failures, throughput")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    resume = sub.add_parser("resume", help="lift the shared pause after quota exhaustion or 429s")
    resume.set_defaults(func=cmd_resume)
