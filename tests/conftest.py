"""Shared fixtures: the fake OpenAI server, settings pointing at it, a scratch site, the corpus, Redis.

Redis hygiene: every key a test creates lives under this session's prefixes (`rq<session>`, `tagger<session>`)
and is deleted by the fixture that made the prefix; a key still there after a test's own clean-up is deleted (so
the next test starts clean, whatever the order) and fails that test at its teardown, and the run.
"""

from __future__ import annotations

import os

# RQ reads its key prefix at import time: give this test session keys of its own before anything imports rq.
SESSION = f"tt{os.getpid()}"
os.environ["RQ_KEY_PREFIX"] = f"rq{SESSION}"

import contextlib
import itertools
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.fakellm import FakeLLM
from worker.classifier import Classifier, make_classifier
from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus" / "nkdagility"
SESSION_PATTERNS = (f"rq{SESSION}*", f"tagger{SESSION}*")
_numbers = itertools.count(1)
_leftovers: list[str] = []  # "test id: keys" for keys a test's own clean-up left behind


def liveness_env(seconds: float) -> dict[str, str]:
    """Worker environment that declares a running job's worker dead after about `seconds` without a sign of life."""
    return {"TAGGER_LEASE_SECONDS": str(seconds)}


def wait_for_group_exit(pgid: int, timeout: float = 30.0) -> None:
    """Wait until every process of a process group (a worker and the children it forked) has exited.

    Waiting for the parent alone is not enough: a child still shutting down writes RQ keys after the test.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of group {pgid} still running after {timeout}s")


# Programs a test may run without being marked slow: quick tools, not tagger, Python, Redis or a browser.
QUICK_PROGRAMS = frozenset({"git", "mount", "umount"})


def _program(args: Any) -> str:
    first = args if isinstance(args, str | bytes | os.PathLike) else next(iter(args), "")
    name = os.fsdecode(first)
    return os.path.basename(name.split()[0] if isinstance(args, str | bytes) and name.strip() else name)


@pytest.fixture(autouse=True)
def _processes_are_marked_slow(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts a process (tagger, Python, redis-server, a browser...) must be marked `slow`.

    `make test-fast` (`-m "not slow"`) is the in-process tests: this keeps the marks true as tests are added.
    """
    if request.node.get_closest_marker("slow"):
        return
    real_init = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[Any], args: Any, *more: Any, **options: Any) -> None:
        if _program(args) not in QUICK_PROGRAMS:
            raise AssertionError(f"{request.node.nodeid} starts {_program(args)!r}: mark it @pytest.mark.slow")
        real_init(self, args, *more, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(autouse=True)
def _no_worker_state_from_another_test() -> Iterator[None]:
    """A worker run in this process leaves process state (its context, for jobs RQ calls by import path; the stop
    flag): each test starts without any, whatever ran before it in random order."""
    from worker.queue.context import WorkerState
    from worker.queue.workers import STOPPING

    WorkerState.context = None
    STOPPING.clear()
    yield
    WorkerState.context = None
    STOPPING.clear()


@pytest.fixture(autouse=True)
def _signal_handlers_as_found() -> Iterator[None]:
    """An RQ worker run in this process (`worker.work()`) installs its SIGINT/SIGTERM handlers in pytest's main
    thread: they are put back after each test, so a later signal never raises a stopped worker's StopRequested
    or SystemExit inside another test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        if handler is not None and signal.getsignal(signum) is not handler:
            signal.signal(signum, handler)


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """A fake OpenAI-compatible server on a free localhost port."""
    server = FakeLLM().start()
    server.retry_after = "0.1"
    yield server
    server.release()  # calls a failed test left held must not outlive it
    server.stop()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A scratch copy of the demo site and the default taxonomy."""
    shutil.copytree(REPO / "examples" / "site", tmp_path / "site")
    shutil.copytree(REPO / "categories", tmp_path / "taxonomy")
    return tmp_path


@pytest.fixture
def make_settings(site: Path, fake_llm: FakeLLM) -> Callable[..., Settings]:
    """Settings for the fake server and the scratch site; keyword overrides use env names."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "TAGGER_PROVIDER": "openai",
            "OPENAI_BASE_URL": fake_llm.base_url,
            "OPENAI_API_KEY": "sk-test-secret-key-1234567890",
            "TAGGER_MODEL": "fake-model",
            "TAGGER_TAXONOMY_DIR": str(site / "taxonomy"),
            "TAGGER_CONTENT_DIR": str(site / "site"),
            "TAGGER_REQUEST_TIMEOUT": 2.0,
            "TAGGER_RETRY_ATTEMPTS": 4,
            "TAGGER_RETRY_DEADLINE": 20.0,
            "TAGGER_RETRY_MAX_WAIT": 2.0,
            "TAGGER_CONCURRENCY": 1,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def classifier(make_settings: Callable[..., Settings]) -> Classifier:
    """A classifier wired to the fake server."""
    return make_classifier(make_settings())


@pytest.fixture
def corpus() -> Path:
    """The real site's corpus from ../shared, or skip."""
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus/nkdagility is absent (only present in the project's workspace and CI)")
    return CORPUS


def _answers(url: str) -> bool:
    try:
        return bool(redis_lib.Redis.from_url(url, socket_timeout=1).ping())
    except redis_lib.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL if set, else a server on 127.0.0.1:6379, else redis-server started on a free port, else skip."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if _answers("redis://127.0.0.1:6379/0"):
        url = "redis://127.0.0.1:6379/0"
        process = None
    else:
        if not shutil.which("redis-server"):
            pytest.skip("no Redis: REDIS_URL unset, nothing on 127.0.0.1:6379 and no redis-server on PATH")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
        )
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(50):
            if _answers(url):
                break
            time.sleep(0.1)
    yield url
    # Delete only the keys this session created (its own prefixes), never the whole database.
    client = redis_lib.Redis.from_url(url)
    left = delete_keys(client, *SESSION_PATTERNS)
    if process:
        process.terminate()
    if left:
        _leftovers.append(f"end of session: {left}")
        pytest.fail(f"Redis keys left behind at the end of the session (deleted now): {left[:20]}", pytrace=False)


def delete_keys(client: redis_lib.Redis, *patterns: str) -> list[str]:
    """Delete every key matching the patterns; the names deleted."""
    keys = sorted({k for pattern in patterns for k in client.scan_iter(pattern, count=1000)})
    for key in keys:
        client.delete(key)
    return [k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in keys]


@pytest.fixture(autouse=True)
def _redis_hygiene(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a Redis test's own clean-up: report and delete any key of this session it left behind."""
    yield
    if "redis_url" not in request.fixturenames:
        return
    try:
        url = request.getfixturevalue("redis_url")
    except pytest.skip.Exception:
        return  # no Redis in this run: nothing to check
    left = delete_keys(redis_lib.Redis.from_url(url), *SESSION_PATTERNS)
    if left:
        named = f"{left[:20]}{' ...' if len(left) > 20 else ''}"
        _leftovers.append(f"{request.node.nodeid}: {named}")
        # The test errors here, not only the session at its end: an xdist worker's exit status never reaches the run.
        pytest.fail(f"Redis keys left behind by the test (deleted now): {named}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when any test left a Redis key behind."""
    if _leftovers:
        print("\nRedis keys left behind by tests (deleted now):", *_leftovers, sep="\n  ")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    """A client on the test Redis; each test gets fresh key prefixes via `queue_env` or `redis_prefix`."""
    yield redis_lib.Redis.from_url(redis_url)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A tagger key prefix (TAGGER_REDIS_PREFIX) of this test's own; its keys are deleted after the test."""
    prefix = f"tagger{SESSION}t{next(_numbers)}"
    yield prefix
    # Its keys and queues: `<prefix>:...` and `<prefix>-default` (not `<prefix>0...`, another test's prefix).
    delete_keys(redis_lib.Redis.from_url(redis_url), prefix, f"{prefix}:*", f"{prefix}-*", f"*:{prefix}-*")


@pytest.fixture
def queue_env(site: Path, fake_llm: FakeLLM, redis_url: str, redis_prefix: str) -> Iterator[dict[str, str]]:
    """Environment for tagger processes (producers and workers) in this test, with its own Redis prefix.

    RQ's job keys carry no queue name (a job id is the post's path, the same in every test), so the session's
    RQ keys are deleted before and after each queue test: no job of one test is seen by the next.
    """
    client = redis_lib.Redis.from_url(redis_url)
    delete_keys(client, f"rq{SESSION}*")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_", "REDIS_"))}
    env.update(
        RQ_KEY_PREFIX=os.environ["RQ_KEY_PREFIX"],
        REDIS_URL=redis_url,
        TAGGER_REDIS_PREFIX=redis_prefix,
        TAGGER_PROVIDER="openai",
        OPENAI_BASE_URL=fake_llm.base_url,
        OPENAI_API_KEY="sk-queue-secret-0123456789",
        TAGGER_MODEL="fake-model",
        TAGGER_TAXONOMY_DIR=str(site / "taxonomy"),
        TAGGER_CONTENT_DIR=str(site / "site"),
        TAGGER_REQUEST_TIMEOUT="2",
        TAGGER_RETRY_ATTEMPTS="1",
        TAGGER_JOB_RETRIES="1",
        TAGGER_JOB_RETRY_DELAYS="[0]",
        TAGGER_LOG_FORMAT="json",
        **liveness_env(1),
    )
    yield env
    delete_keys(client, f"rq{SESSION}*")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs, unmounted afterwards (needs root to mount; skips otherwise). Fill it with `fill_disk`."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root to mount a small tmpfs as a full disk")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path) -> None:
    """Fill a file system to the last byte (a file named `filler`; unlink it to make room again)."""
    with contextlib.suppress(OSError), (mount / "filler").open("wb") as filler:
        while True:
            filler.write(b"x" * 4096)
            filler.flush()
