"""Dead and slow workers, through real RQ worker processes: the fake model holds calls until the test lets go.

A job that runs longer than the liveness timeout is not taken for dead while its worker lives; a job whose
worker keeps dying is requeued a bounded number of times and then fails as `abandoned`. Both are written as
behaviour (processes, signals, `tagger status`, `tagger failed list`), whatever the liveness mechanism.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.commands import tagger
from tests.conftest import liveness_env, wait_for_group_exit
from tests.fakellm import FakeLLM
from worker.posts import read_post

pytestmark = pytest.mark.redis
LIVENESS = 1.0  # seconds without a sign of life after which a worker counts as dead
# An idle worker's beat and the margin after which `status` presumes a silent worker dead, shortened from 20 s
# and 10 s (the defaults): the margin still leaves a live worker seconds of slack on a loaded machine.
IDLE_BEAT = 2
SILENT_MARGIN = 4.0


class Workers:
    """Worker processes started by a test, each in its own process group; all stopped at the end."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = os.environ.get("TAGGER_TEST_WORKER_LOG")  # set it to a file to read the workers' logs
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "work", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "ab") if log else subprocess.DEVNULL,  # noqa: SIM115 (the child keeps it)
            start_new_session=True,
        )
        self.running.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)
        process.wait(timeout=60)
        wait_for_group_exit(process.pid)

    def stop_all(self) -> None:
        for process in self.running:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
            wait_for_group_exit(process.pid)


@pytest.fixture
def workers(queue_env: dict[str, str]) -> Iterator[Workers]:
    # Calls are held for seconds on purpose: the request timeout must not end them first.
    started = Workers(
        {
            **queue_env,
            **liveness_env(LIVENESS),
            "TAGGER_REQUEST_TIMEOUT": "60",
            "TAGGER_IDLE_BEAT": str(IDLE_BEAT),
            "TAGGER_SILENT_MARGIN": str(SILENT_MARGIN),
        }
    )
    yield started
    started.stop_all()


def wait_for_requests(fake: FakeLLM, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while fake.counts["requests"] < count:
        assert time.monotonic() < deadline, f"the worker never reached the model ({fake.counts['requests']} calls)"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_job_running_longer_than_the_liveness_timeout_is_not_requeued(
    workers: Workers, fake_llm: FakeLLM, site: Path
) -> None:
    queue_env = workers.env
    wip = site / "site" / "posts" / "limiting-wip.md"
    fake_llm.hold()
    assert tagger(queue_env, "enqueue", str(wip)).returncode == 0
    first = workers.start("--burst")
    assert fake_llm.wait_held(1)  # the job is running: its call (the three types fit one) is with the model
    second = workers.start()  # a second, idle worker whose recovery would take the job if it looked dead
    for _ in range(4):  # hold the job for 4x the liveness timeout, asking `status` (which also recovers) meanwhile
        time.sleep(LIVENESS)
        status = tagger(queue_env, "status")
        assert status.returncode == 0, status.stderr
        assert "running 1" in status.stdout
    assert fake_llm.counts["requests"] == 1 and fake_llm.held == 1  # nobody else started the job again
    fake_llm.release()
    assert first.wait(timeout=60) == 0
    workers.kill(second, signal.SIGTERM)
    assert fake_llm.counts["requests"] == 1
    assert "Kanban" in read_post(wip).terms("tags")
    assert tagger(queue_env, "failed", "list").stderr.strip() == "0 failed"
    assert "running 0" in tagger(queue_env, "status").stdout


@pytest.mark.slow
def test_a_job_whose_worker_keeps_dying_fails_as_abandoned(
    queue_env: dict[str, str], workers: Workers, fake_llm: FakeLLM, site: Path
) -> None:
    requeues = 1
    env = {**workers.env, "TAGGER_ABANDONED_REQUEUES": str(requeues)}
    workers.env = env
    wip = site / "site" / "posts" / "limiting-wip.md"
    before = wip.read_bytes()
    fake_llm.hold()  # every call waits: each worker dies mid-job, with its calls at the model
    assert tagger(env, "enqueue", str(wip)).returncode == 0
    for kill in range(1, requeues + 2):
        calls = fake_llm.counts["requests"]
        worker = workers.start()
        wait_for_requests(fake_llm, calls + 1)
        workers.kill(worker)  # kill -9 mid-job
        assert wip.read_bytes() == before
        # `status` (which recovers too) asked until the dead worker's lease has lapsed (`running` leaves out expired
        # entries), however slow the machine: a fixed pause was too short once `status` ran in this process.
        deadline = time.monotonic() + 60
        while "running 0" not in (status := tagger(env, "status")).stdout and time.monotonic() < deadline:
            assert status.returncode == 0, status.stderr
            time.sleep(LIVENESS / 4)
        listing = tagger(env, "failed", "list").stdout
        if kill <= requeues:
            assert "abandoned" not in listing, f"failed after {kill} deaths; {requeues} requeue(s) allowed"
    assert "running 0" in status.stdout
    # The lapsed lease and the failure land in separate Redis calls: the listing is asked until the post shows.
    deadline = time.monotonic() + 30
    while "limiting-wip" not in listing and time.monotonic() < deadline:
        time.sleep(LIVENESS / 4)
        tagger(env, "status")  # status recovers too
        listing = tagger(env, "failed", "list").stdout
    line = next((row for row in listing.splitlines() if "limiting-wip" in row), "")
    assert " abandoned " in line, listing
    calls = fake_llm.counts["requests"]
    fake_llm.release()
    assert tagger(env, "work", "--burst").returncode == 0  # a healthy worker does not run it again
    assert fake_llm.counts["requests"] == calls
    assert wip.read_bytes() == before


def status_json(env: dict[str, str]) -> dict[str, Any]:
    run = tagger(env, "status", "--json")
    assert run.returncode == 0, run.stderr
    info: dict[str, Any] = json.loads(run.stdout)
    return info


def start_and_name(workers: Workers, known: set[str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start one worker process and return it with the RQ name it registered under."""
    process = workers.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = {w["name"] for w in status_json(workers.env)["workers"]} - known
        if names:
            assert len(names) == 1, names
            return process, names.pop()
        time.sleep(0.2)
    raise AssertionError("the worker never registered with RQ")


def beat_age(info: dict[str, Any], name: str) -> float:
    entry = next(w for w in info["workers"] + info["silent_workers"] if w["name"] == name)
    return float(entry["heartbeat_age"])


@pytest.mark.slow
def test_status_calls_killed_workers_silent_and_a_live_worker_alive(
    workers: Workers, fake_llm: FakeLLM, site: Path
) -> None:
    """A worker killed with -9, busy or idle, is shown silent (presumed dead) once its heartbeat is overdue by the
    margin, not counted as a worker; the live worker beside it stays listed as alive."""
    env = workers.env
    fake_llm.hold()
    busy, busy_name = start_and_name(workers, set())
    assert tagger(env, "enqueue", str(site / "site" / "posts" / "limiting-wip.md")).returncode == 0
    assert fake_llm.wait_held(1, timeout=60)  # the first worker is running the job
    idle, idle_name = start_and_name(workers, {busy_name})
    live, live_name = start_and_name(workers, {busy_name, idle_name})
    workers.kill(idle)  # first: alive, it could take the busy worker's job once that one is recovered
    workers.kill(busy)
    info = status_json(env)
    # When each last beat, on this clock: at the latest, the status's end minus the age it saw.
    seen_at = time.monotonic()
    busy_beat = seen_at - beat_age(info, busy_name)
    idle_beat = seen_at - beat_age(info, idle_name)

    # A busy worker beats every third of a lease: overdue by the margin, it is silent.
    time.sleep(max(0.0, busy_beat + LIVENESS / 3 + SILENT_MARGIN + 1 - time.monotonic()))
    info = status_json(env)
    silent = {w["name"]: w for w in info["silent_workers"]}
    assert busy_name in silent, info
    assert silent[busy_name]["state"] == "silent" and silent[busy_name]["last_state"] == "busy"
    assert silent[busy_name]["heartbeat_age"] > LIVENESS / 3 + SILENT_MARGIN
    assert live_name in {w["name"] for w in info["workers"]}
    assert busy_name not in {w["name"] for w in info["workers"]}

    # An idle worker beats after each wait on the queues (RQ's dequeue timeout): overdue by the margin, silent.
    time.sleep(max(0.0, idle_beat + IDLE_BEAT + SILENT_MARGIN + 1 - time.monotonic()))
    info = status_json(env)
    assert [w["name"] for w in info["workers"]] == [live_name], info
    assert info["workers"][0]["heartbeat_age"] <= IDLE_BEAT + SILENT_MARGIN
    silent = {w["name"]: w for w in info["silent_workers"]}
    assert idle_name in silent and silent[idle_name]["last_state"] == "idle", info
    text = tagger(env, "status").stdout
    assert "workers: 1 (and 2 silent, presumed dead)" in text, text
    line = next(row for row in text.splitlines() if idle_name in row)
    assert re.search(r"silent \(no heartbeat for \d+ s; presumed dead; was idle\)", line), line
    assert f"{live_name} " in text and "presumed dead" not in next(r for r in text.splitlines() if live_name in r)
    fake_llm.release()
    workers.kill(live, signal.SIGTERM)
