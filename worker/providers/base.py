"""The provider contract: what a provider is given, what it returns, and the throttle around its calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from worker.prompts import Prompt
from worker.reply import TermScores
from worker.results import Usage


@dataclass(frozen=True)
class Reply:
    """Validated judgements for every term a prompt asked about."""

    judgements: list[TermScores]
    usage: Usage
    raw: str


class Provider(Protocol):
    """Anything that judges a prompt's terms for its post."""

    name: str
    model: str

    def judge(self, prompt: Prompt) -> Reply:
        """Return one validated judgement per term in `prompt.names`."""
        ...


class Throttle(Protocol):
    """Called around every LLM request."""

    def wait(self, tokens: int, deadline: float) -> None:
        """Block until a request of `tokens` may go out, or raise RateLimited past `deadline` (monotonic)."""
        ...

    def observe(self, status: int, headers: Mapping[str, str], quota: bool = False) -> None:
        """Learn from a response: remaining limits, Retry-After, exhausted quota."""
        ...

    def failed(self, kind: str, message: str) -> None:
        """A request failed (each one, retried or not): `kind` as a failure kind, `message` already redacted."""
        ...


class ModeMemory(Protocol):
    """Where the structured-output mode an endpoint accepts is remembered (Redis for a fleet, else a file)."""

    def recall(self, endpoint: str) -> str | None:
        """The mode remembered for `endpoint` (base URL and model), or None."""
        ...

    def remember(self, endpoint: str, mode: str) -> None:
        """Remember that `endpoint` accepts `mode`."""
        ...


class NoThrottle:
    """No shared limits (inline runs, tests of the provider alone)."""

    def wait(self, tokens: int, deadline: float) -> None:
        """Never waits."""

    def observe(self, status: int, headers: Mapping[str, str], quota: bool = False) -> None:
        """Ignores responses."""

    def failed(self, kind: str, message: str) -> None:
        """Ignores failures (the caller sees them raised)."""
