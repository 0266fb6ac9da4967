"""The CLI context (`App`: settings, logging and Redis, each made once) and what subcommands share: errors, output."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from redis import Redis

from worker.errors import SettingsError
from worker.logs import configure, redact_url
from worker.queue.connection import connect
from worker.settings import ENV_FILE_VARIABLE, Settings

ELLIPSIS = "…"


class Fail(click.ClickException):
    """A one-line error: `tagger: message`, exit 1 (never a traceback)."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        """Print the one line on stderr."""
        click.echo(f"tagger: {self.message}", err=True)


class Misconfigured(Exception):
    """What keeps `tagger work` from starting until someone fixes the settings or the files (not Redis trouble):
    the group prints it as one line, like any expected error, and exits EXIT_CONFIG, not 1, so a service manager
    can be told not to restart it (`RestartPreventExitStatus=` in deploy/tagger-worker.service)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class App:
    """The CLI context, one per run and passed to every command: the env file, the settings, logging and Redis.

    Each is made once, when a command first asks for it (a command that needs no Redis never connects).
    """

    env_file: Path | None = None
    loaded: Settings | None = field(default=None, repr=False)
    _redis: Redis | None = field(default=None, repr=False)

    def settings(self, **updates: Any) -> Settings:
        """The settings from the environment and the env file, with command-line overrides."""
        if self.loaded is None:
            self.loaded = Settings()
        return self.loaded.model_copy(update=updates) if updates else self.loaded

    def configured(self, quiet: bool = True, updates: Mapping[str, Any] | None = None) -> Settings:
        """The settings (with overrides), with logging set up from them; `quiet` logs warnings and errors only."""
        settings = self.settings(**(updates or {}))
        configure(settings, quiet=quiet)
        return settings

    def redis(self) -> Redis:
        """The Redis connection, made (and checked) once."""
        if self._redis is None:
            self._redis = redis_for(self.settings())
        return self._redis


pass_app = click.make_pass_decorator(App)


def use_env_file(path: str | None) -> Path | None:
    """Check the env file named by `--env-file` or TAGGER_ENV_FILE and make it the one every process reads."""
    name = path or os.environ.get(ENV_FILE_VARIABLE)
    if not name:
        return None
    env_file = Path(name).expanduser().absolute()
    if not env_file.is_file():
        origin = "--env-file" if path else ENV_FILE_VARIABLE
        raise SettingsError(f"env file {env_file} ({origin}) does not exist")
    # Worker processes and RQ jobs read their settings themselves: they find the same file through the environment.
    os.environ[ENV_FILE_VARIABLE] = str(env_file)
    return env_file


def redis_for(settings: Settings) -> Redis:
    """A Redis connection that answered, or a one-line error naming the URL (password redacted)."""
    try:
        redis = connect(settings)
    except ValueError as exc:
        raise SettingsError(f"REDIS_URL {redact_url(settings.redis_url)} is not a Redis URL: {exc}") from exc
    redis.ping()  # unreachable Redis is one clear line now, not a failure halfway through the work
    return redis


def cut(text: str, width: int) -> str:
    """`text` on one line, cut at a word with an ellipsis when longer than `width`."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    head = flat[: width - 1]
    if " " in head[width // 2 :]:
        head = head[: head.rindex(" ")]
    return head.rstrip(" ,;:") + ELLIPSIS


def err(line: str) -> None:
    """One line on stderr: a `FAILED`, `SKIPPED` or `REFUSED` line stays one line whatever its message holds."""
    if line.startswith(("FAILED ", "SKIPPED ", "REFUSED ")):
        line = " ".join(line.split())  # a server's body or a traceback in a message must not spill over lines
    click.echo(line, err=True)


LOG_LINE_SECONDS = 30.0


@dataclass
class LogPace:
    """When progress goes to a log (a CI job, systemd): a line per tenth of the way, or after 30 s without one."""

    run: object = None  # what identifies one run (its start time): a new run starts the count again
    tenth: int = -1
    printed_at: float = 0.0
    finished_shown: bool = False

    def due(self, run: object, finished: int, total: int, now: float) -> bool:
        """True when this progress report should be a line of its own."""
        if run != self.run:
            self.run, self.tenth, self.printed_at, self.finished_shown = run, -1, 0.0, False
        tenth = finished * 10 // max(total, 1)
        if finished >= total:
            if self.finished_shown:
                return False
            self.finished_shown = True
        elif tenth <= self.tenth and now - self.printed_at < LOG_LINE_SECONDS:
            return False
        self.tenth, self.printed_at = tenth, now
        return True


def stdout_is_terminal() -> bool:
    """True when stdout is a terminal (progress redraws in place there)."""
    return sys.stdout.isatty()


LOG_PACE = LogPace()


def progress(done: int, failed: int, total: int, started: float, tokens: int) -> None:
    """Draw the progress bar: in place on a terminal; in a log, a line per tenth of the way or per 30 s."""
    finished = done + failed
    terminal = stdout_is_terminal()
    if not terminal and not LOG_PACE.due(started, finished, total, time.monotonic()):
        return
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = finished / elapsed
    # No ETA until something finished: a rate of 0 would promise "ETA 0s".
    eta = f", ETA {(total - finished) / rate:.0f}s" if rate and finished < total else ""
    width = 30
    filled = int(width * finished / max(total, 1))
    sys.stdout.write(
        ("\r" if terminal else "\n")
        + f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} done, {failed} failed, "
        f"{rate:.1f}/s{eta}, {tokens} tokens "
    )
    sys.stdout.flush()
