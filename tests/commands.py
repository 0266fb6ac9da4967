"""How tests run `tagger COMMAND`: in this process through click, unless the test is about a process.

A subprocess costs a Python start-up and tagger's imports (about half a CPU second; seconds on a loaded machine)
for each call. `tagger(env, ...)` runs the same click app in this process with exactly `env` as the environment
and `cwd` as the current folder, and returns what `subprocess.run` would: exit code, stdout, stderr. `tagger work`
is always a real process (a worker's signals, forks and RQ's process state are what those tests are about); use
`tagger_process` for any other command whose process itself is under test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import structlog
from click.testing import CliRunner

from worker.cli import main

PROCESS_COMMANDS = ("work",)  # always run as a real process


def tagger_process(
    env: dict[str, str], *args: str, stdin: str | None = None, cwd: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`python -m worker ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
    )


@contextlib.contextmanager
def _process_state(env: dict[str, str], cwd: Path | None) -> Iterator[None]:
    """Exactly `env` as os.environ and `cwd` as the current folder; both, and logging, restored after."""
    saved_env = dict(os.environ)
    saved_cwd = Path.cwd()
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved_factory = logging.getLogRecordFactory()
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        structlog.configure(**saved_structlog)
        root.handlers, root.level = saved_root[0], saved_root[1]
        logging.setLogRecordFactory(saved_factory)


def tagger(
    env: dict[str, str], *args: str, stdin: str | None = None, cwd: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`tagger ARGS` with environment `env`: in this process (a worker command: a real process)."""
    if args and args[0] in PROCESS_COMMANDS:
        return tagger_process(env, *args, stdin=stdin, cwd=cwd, timeout=timeout)
    if env.get("RQ_KEY_PREFIX") != os.environ.get("RQ_KEY_PREFIX"):
        # RQ reads its key prefix once, at import: another prefix needs a process of its own.
        return tagger_process(env, *args, stdin=stdin, cwd=cwd, timeout=timeout)
    with _process_state(env, cwd):
        result = CliRunner().invoke(main, list(args), input=stdin, prog_name="tagger")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What the interpreter prints for an exception nobody caught, as a process would show it.
        assert result.exc_info is not None
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["tagger", *args], result.exit_code, result.stdout, stderr)
