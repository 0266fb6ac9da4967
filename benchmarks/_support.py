"""Helpers shared by the benchmark scripts: corpus paths, scratch copies, a Redis to use."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.fakellm import FakeLLM
from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus" / "nkdagility"


def need_corpus() -> Path:
    """The corpus folder, or exit with a clear message."""
    if not CORPUS.is_dir():
        raise SystemExit(f"benchmark needs the corpus at {CORPUS} (present in the project workspace and CI)")
    return CORPUS


def scratch_posts(source: Path, copies: int = 1) -> Path:
    """A scratch content folder holding `copies` copies of every post under `source`."""
    root = Path(tempfile.mkdtemp(prefix="tagger-bench-"))
    for n in range(copies):
        for post in sorted(source.rglob("index.md")) or sorted(source.rglob("*.md")):
            target = root / f"c{n}" / post.parent.name / post.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(post, target)
    return root


def demo_site(posts: int) -> Path:
    """A scratch content folder with `posts` copies of the demo posts that tagger may write (not `Human` ones)."""
    root = Path(tempfile.mkdtemp(prefix="tagger-demo-"))
    demo = [p for p in sorted((REPO / "examples" / "site").rglob("*.md")) if "Human" not in p.read_text()]
    for n in range(posts):
        source = demo[n % len(demo)]
        shutil.copyfile(source, root / f"{n:05d}-{source.name}")
    return root


@contextmanager
def redis_url() -> Iterator[str]:
    """A Redis on 127.0.0.1:6379 when one answers, else a redis-server started for the run."""
    default = "redis://127.0.0.1:6379/0"
    try:
        if redis.Redis.from_url(default, socket_timeout=1).ping():
            yield default
            return
    except redis.RedisError:
        pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(["redis-server", "--port", str(port), "--save", ""], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(50):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.RedisError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()


def delete_prefix(url: str, *patterns: str) -> None:
    """Remove the keys a benchmark created (never the whole database)."""
    client = redis.Redis.from_url(url)
    for pattern in patterns:
        for key in client.scan_iter(pattern, count=1000):
            client.delete(key)


def fake_settings(fake: FakeLLM, taxonomy: Path, **overrides: object) -> Settings:
    """Settings that send every call to the fake server, quiet logs, and `overrides` (env names)."""
    values: dict[str, object] = {
        "TAGGER_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-bench",
        "TAGGER_MODEL": "bench",
        "TAGGER_TAXONOMY_DIR": str(taxonomy),
        "TAGGER_CONCURRENCY": 8,
        "TAGGER_LOG_LEVEL": "WARNING",
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]
