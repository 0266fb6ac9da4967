"""Providers: the small contract in `base`, the offline baseline, the OpenAI-compatible one, and the choice."""

from __future__ import annotations

from worker.prompts import Templates
from worker.providers.base import ModeMemory, NoThrottle, Provider, Reply, Throttle
from worker.providers.offline import OFFLINE_NOTE, OfflineProvider
from worker.settings import Settings

__all__ = [
    "OFFLINE_NOTE",
    "ModeMemory",
    "NoThrottle",
    "OfflineProvider",
    "Provider",
    "Reply",
    "Throttle",
    "make_provider",
    "preload",
]


def make_provider(
    settings: Settings, templates: Templates, throttle: Throttle | None = None, memory: ModeMemory | None = None
) -> Provider:
    """The provider the settings ask for (`memory`: where the structured-output mode found is remembered)."""
    if settings.provider == "openai":
        from worker.providers.openai import OpenAIProvider  # the SDK is only imported when it is used

        return OpenAIProvider(settings, templates, throttle, memory)
    return OfflineProvider()


def preload(settings: Settings) -> None:
    """Import the provider's SDK now: a supervisor does, so the worker processes it forks share the import.

    The `openai` SDK's import is most of a worker's start-up (0.45 CPU s here); each child importing it again
    delayed every worker's first job, the more so on a busy machine.
    """
    if settings.provider == "openai":
        import worker.providers.openai  # noqa: F401
