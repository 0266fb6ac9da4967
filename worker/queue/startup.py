"""A worker's start-up check: what it needs before its first job, checked once, and the line saying what it serves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis

from worker.errors import SettingsError, TaggerError
from worker.logs import redact_url
from worker.queue.connection import PRIORITIES
from worker.queue.keys import queue_name
from worker.settings import Settings

# Exit code of a worker process whose start-up check failed: its supervisor stops instead of restarting it
# (it would fail again), and `tagger work` exits 1 after the one line saying why.
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG
REMOTE_HINT = "; a worker for remote jobs (no site files) needs TAGGER_JOB_MODE=remote"


@dataclass(frozen=True)
class Serving:
    """What a worker serves, as its start-up line says it (the Redis URL without its password)."""

    redis_url: str
    prefix: str
    mode: str  # shared | remote
    queues: list[str]
    content: str  # the content root, or "remote" (posts travel in the jobs)
    model: str
    provider: str

    def line(self, processes: int = 1, burst: bool = False) -> str:
        """The one line `tagger work` prints when it starts."""
        content = "remote (posts carried in jobs, no files)" if self.content == "remote" else self.content
        return (
            f"tagger work: serving {self.redis_url} prefix {self.prefix}, {self.mode} mode, queues "
            f"{' '.join(self.queues)}, content {content}, model {self.model} ({self.provider}), "
            f"{processes} process{'es' if processes != 1 else ''}" + (", burst" if burst else "")
        )


def check_start(settings: Settings, redis: Redis, priorities: Sequence[str] | None = None) -> Serving:
    """Check once what a worker needs before its first job; what it serves, or a TaggerError (or RedisError).

    Redis must answer; in shared-folder mode the content root, the taxonomy and the prompt templates must be
    readable; the provider's settings must make sense (an explicit `openai` with neither key nor base URL
    would fail every job). Nothing is asked of the provider itself: a provider that is down is an outage the
    workers ride out, not a configuration error.
    """
    from worker.classifier import make_classifier
    from worker.prompts import load_templates
    from worker.providers import make_provider

    redis.ping()
    if settings.provider == "openai" and not (settings.openai_api_key or settings.openai_base_url):
        raise SettingsError("TAGGER_PROVIDER=openai, but neither OPENAI_API_KEY nor OPENAI_BASE_URL is set")
    if settings.job_mode == "shared":
        root = settings.content_root()
        if not root.is_dir():
            raise SettingsError(f"the content root {settings.content_root_label()} is not a folder{REMOTE_HINT}")
        try:
            make_classifier(settings)  # the taxonomy, the templates and the provider, as the first job builds them
        except TaggerError as exc:
            raise type(exc)(start_failure(exc).split(": ", 1)[1]) from exc
        content = str(root)
    else:
        make_provider(settings, load_templates(None))  # templates and taxonomy come with each job's version
        content = "remote"
    return Serving(
        redis_url=redact_url(settings.redis_url),
        prefix=settings.redis_prefix,
        mode=settings.job_mode,
        queues=[queue_name(settings, p) for p in (priorities or PRIORITIES)],
        content=content,
        model=settings.model,
        provider=settings.provider,
    )


def start_failure(exc: TaggerError) -> str:
    """What keeps a worker from starting, as one line: `kind: message` (its path named once)."""
    text = exc.message if exc.path and exc.path in exc.message else str(exc)
    return f"{exc.kind}: {text}" + (REMOTE_HINT if exc.kind == "taxonomy" and REMOTE_HINT not in text else "")
