"""The Batch API of an OpenAI-compatible provider: request lines, files and batches, and replies read back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import openai
from openai.types import Batch

from worker import untrusted
from worker.errors import BatchUnsupported, InvalidReply, NotInBatch
from worker.prompts import Prompt
from worker.providers.base import Provider, Reply
from worker.providers.openai import OpenAIProvider

ENDPOINT: Final = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
T = TypeVar("T")


def body_digest(body: dict[str, Any]) -> str:
    """A short, stable fingerprint of one request body: a reply is used only for the very request it answers."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


def request_line(custom_id: str, body: dict[str, Any]) -> bytes:
    """One line of a batch input file (JSON Lines)."""
    line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


@dataclass(frozen=True)
class LineResult:
    """What a batch did with one request: the completion body, or why there is none."""

    custom_id: str
    body: str | None
    error: str = ""


def read_results(output: bytes, errors: bytes) -> dict[str, LineResult]:
    """Results by custom_id from a batch's output file and error file.

    The provider's files are untrusted input: a line that is not a result (not JSON, no custom_id, a response or
    error that is not an object) is skipped, and an answer (HTTP 200) is never replaced by an error line.
    """
    results: dict[str, LineResult] = {}
    for line in (output + b"\n" + errors).splitlines():
        try:
            row = untrusted.loads(line)
            custom_id = str(row["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
        response, error = row.get("response") or {}, row.get("error") or {}
        if not isinstance(response, dict) or not isinstance(error, dict):
            continue
        status, body = response.get("status_code"), response.get("body")
        if status == 200 and isinstance(body, dict):
            results[custom_id] = LineResult(custom_id, json.dumps(body))
            continue
        if custom_id in results and results[custom_id].body is not None:
            continue  # answered: an error line for the same request says nothing more
        error = error or (body.get("error") if isinstance(body, dict) else None) or {}
        error = error if isinstance(error, dict) else {"message": str(error)}
        detail = f"{error.get('code') or 'error'}: {str(error.get('message') or '')[:200]}"
        results[custom_id] = LineResult(custom_id, None, f"HTTP {status}: {detail}" if status else detail)
    return results


class BatchAPI:
    """Files and batches through the official SDK; errors become tagger's, a missing Batch API one line."""

    def __init__(self, provider: OpenAIProvider) -> None:
        self.provider = provider
        # Control calls are few and idempotent enough: the SDK's own retries serve them.
        self.client = provider.client.with_options(max_retries=3)
        self.base_url = str(provider.client.base_url).rstrip("/")

    def upload(self, data: bytes, name: str) -> str:
        """Upload one input file (`purpose="batch"`); its id."""
        return self._call("POST /files", lambda: self.client.files.create(file=(name, data), purpose="batch")).id

    def create(self, file_id: str, metadata: dict[str, str]) -> Batch:
        """Start a batch over an uploaded file."""
        return self._call(
            "POST /batches",
            lambda: self.client.batches.create(
                input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h", metadata=metadata
            ),
        )

    def retrieve(self, batch_id: str) -> Batch:
        """The batch as the provider sees it now."""
        return self._call("GET /batches", lambda: self.client.batches.retrieve(batch_id))

    def known(self, batch_id: str) -> bool:
        """Whether the provider knows this batch (False for an id another account or a reset provider gave)."""
        try:
            self.client.batches.retrieve(batch_id)
        except openai.NotFoundError:
            return False
        except openai.APIError as exc:
            raise self.provider._translate(exc) from exc
        return True

    def list(self) -> list[Batch]:
        """The account's batches (every page)."""
        return self._call("GET /batches", lambda: list(self.client.batches.list(limit=100)))

    def cancel(self, batch_id: str) -> Batch:
        """Ask the provider to cancel a batch."""
        return self._call("POST /batches/cancel", lambda: self.client.batches.cancel(batch_id))

    def content(self, file_id: str | None) -> bytes:
        """A file's bytes (output or error file); nothing for no file."""
        if not file_id:
            return b""
        return self._call("GET /files/content", lambda: self.client.files.content(file_id).content)

    def _call(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except openai.NotFoundError as exc:
            if "/batches/" in what or "content" in what:
                raise self.provider._translate(exc) from exc
            method, path = what.split(" ", 1)
            raise BatchUnsupported(
                f"the provider at {self.base_url} has no Batch API ({method} {self.base_url}{path} answered 404);"
                " run the backfill without --batch"
            ) from exc
        except openai.APIError as exc:
            raise self.provider._translate(exc) from exc


def batch_api(provider: Provider) -> BatchAPI:
    """The Batch API of the configured provider, or BatchUnsupported."""
    if not isinstance(provider, OpenAIProvider):
        raise BatchUnsupported(
            f"the {provider.name} provider has no Batch API; set OPENAI_API_KEY (and OPENAI_BASE_URL) for one"
        )
    return BatchAPI(provider)


class BatchReplies:
    """A provider that answers from a batch's replies, validated exactly as the synchronous path validates.

    A prompt the batch did not carry (the post or a term changed since) raises NotInBatch: it never calls out.
    """

    def __init__(self, provider: OpenAIProvider, bodies: dict[str, str]) -> None:
        self.provider = provider
        self.name = provider.name
        self.model = provider.model
        self.bodies = bodies

    @property
    def mode(self) -> str:
        """The structured-output mode the batch's requests were written in (part of the judgements' cache key)."""
        return self.provider.mode

    def judge(self, prompt: Prompt) -> Reply:
        """The batch's validated reply to `prompt`."""
        body = self.bodies.get(body_digest(self.provider.request_body(prompt)))
        if body is None:
            raise NotInBatch("the batch holds no reply to this request (the post, a term or the prompt changed)")
        # Not the last try: a reply the synchronous path would re-ask goes back to it (the queue), which re-asks.
        answer = self.provider.validate(prompt, body)
        if answer.parsed is None:
            raise InvalidReply(f"batch reply failed validation: {answer.error[:500]}", raw_reply=answer.raw)
        return Reply(judgements=list(answer.parsed), usage=answer.usage, raw=answer.raw)
