"""The structured-output mode each endpoint accepts, remembered on disk when there is no Redis."""

from __future__ import annotations

import json
import os
import tempfile

import structlog

from worker import untrusted
from worker.settings import STRUCTURED_MODES, Settings

log = structlog.get_logger("tagger.modes")
MODES_FILE = ".tagger-structured.json"


def endpoint_of(settings: Settings) -> str:
    """What a remembered mode belongs to: the base URL and the model."""
    return f"{settings.openai_base_url or 'https://api.openai.com/v1'}|{settings.model}"


def valid_mode(value: object) -> str | None:
    """A mode read back from a file or Redis, or None when it is not one (read-back data is untrusted)."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return text if isinstance(text, str) and text in STRUCTURED_MODES else None


class FileModeMemory:
    """A small JSON file (`.tagger-structured.json` under TAGGER_RECORDS_DIR, else the content root)."""

    def __init__(self, settings: Settings) -> None:
        self.path = (settings.records_dir or settings.content_root()).expanduser() / MODES_FILE

    def _load(self) -> dict[str, object]:
        try:
            data = untrusted.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def recall(self, endpoint: str) -> str | None:
        """The mode remembered for `endpoint`, or None."""
        return valid_mode(self._load().get(endpoint))

    def remember(self, endpoint: str, mode: str) -> None:
        """Write the mode down (atomically); a folder that cannot be written only costs a probe next time."""
        data = {k: v for k, v in self._load().items() if valid_mode(v)}
        data[endpoint] = mode
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tagger-structured.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("structured_mode_not_saved", file=str(self.path), error=exc.strerror or str(exc))


class MemoryModes:
    """Modes kept in this process only (tests, estimates)."""

    def __init__(self) -> None:
        self.modes: dict[str, str] = {}

    def recall(self, endpoint: str) -> str | None:
        """The mode remembered for `endpoint`, or None."""
        return self.modes.get(endpoint)

    def remember(self, endpoint: str, mode: str) -> None:
        """Remember the mode."""
        self.modes[endpoint] = mode
