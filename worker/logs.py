"""structlog set up once: JSON when not on a terminal, secrets redacted everywhere."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlparse

import structlog

from worker.settings import Settings

REDACTED = "***"
# Up to the netloc's last "@", as urlparse reads it: an unencoded "@" in a password is still hidden.
_URL_PASSWORD = re.compile(r"(//[^:/@]*:)[^/]*@")


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret that appears in `text`."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, REDACTED)
    return text


def secrets_of(settings: Settings) -> list[str]:
    """The values that must never be printed: the API key, the signing key and the Redis password."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    signing = settings.signing_key.get_secret_value() if settings.signing_key else ""
    return [s for s in (key, signing, urlparse(settings.redis_url).password or "") if s]


def redact_url(url: str) -> str:
    """A URL as it may be printed: any password (`scheme://user:PASSWORD@host`) replaced by `***`."""
    return _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", url)


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
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per event, so lines from several worker processes on one stream never interleave.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # Standard-library records (RQ's own worker and scheduler lines among them) are rendered by the same
    # processors, so a worker's output is one format; RQ adds no handler of its own when one is in place.
    handler = logging.StreamHandler(stream)
    handler.setLevel(level)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.add_log_level,
                stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                scrub,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level, logging.WARNING))  # other libraries' INFO (an HTTP line per call) stays out
    _redact_stdlib_records(secrets)


def _redact_stdlib_records(secrets: list[str]) -> None:
    """Redact secrets from every stdlib log record (RQ's own logs and tracebacks included) when it is made."""
    current = logging.getLogRecordFactory()
    # Configured again (another key, another test): replace tagger's earlier factory rather than stack on it.
    make_record: Any = getattr(current, "tagger_wraps", current)
    if not secrets:
        logging.setLogRecordFactory(make_record)
        return
    formatter = logging.Formatter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = make_record(*args, **kwargs)
        record.msg, record.args = redact(record.getMessage(), secrets), None
        if record.exc_info:
            # Plain formatters print this cached text; tagger's own renders exc_info and scrubs it.
            record.exc_text = redact(formatter.formatException(record.exc_info), secrets)
        return record

    factory.tagger_wraps = make_record  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
