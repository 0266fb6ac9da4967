"""structlog set up once: JSON when not on a terminal, secrets redacted everywhere."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlparse

import structlog

from worker.settings import Settings

REDACTED = "***"


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret that appears in `text`."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, REDACTED)
    return text


def secrets_of(settings: Settings) -> list[str]:
    """The values that must never be printed: the API key and the Redis password."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    return [s for s in (key, urlparse(settings.redis_url).password or "") if s]


def configure(settings: Settings, stream: Any = None, quiet: bool = False) -> None:
    """Configure structlog (and stdlib logging) for the process; call once at start-up."""
    stream = stream or sys.stderr
    secrets = secrets_of(settings)

    def scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        return {k: redact(v, secrets) if isinstance(v, str) else v for k, v in event.items()}

    as_json = settings.log_format == "json" or (settings.log_format == "auto" and not stream.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    if quiet:
        level = max(level, logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per event, so lines from several worker processes on one stream never interleave.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream, format="%(name)s %(levelname)s %(message)s")
    if secrets:
        _redact_stdlib_records(secrets)


def _redact_stdlib_records(secrets: list[str]) -> None:
    """Redact secrets from every stdlib log record (RQ's own logs and tracebacks included) when it is made."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "tagger_redacts", False):
        return
    formatter = logging.Formatter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.msg, record.args = redact(record.getMessage(), secrets), None
        if record.exc_info:
            record.exc_text = redact(formatter.formatException(record.exc_info), secrets)
            record.exc_info = None
        return record

    factory.tagger_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
