"""The OpenAI-compatible provider: the official SDK, structured outputs, retries, validation."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

import openai
import structlog
from openai.types.chat import ChatCompletion
from pydantic import ValidationError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_random_exponential

from worker.errors import (
    AuthError,
    InvalidReply,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
    Refused,
    Truncated,
)
from worker.logs import redact, secrets_of
from worker.prompts import Prompt, Templates, estimate_tokens, reask_message
from worker.providers.base import NoThrottle, Reply, Throttle
from worker.reply import ReplyBase, reply_model, reply_problem
from worker.results import Usage
from worker.settings import Settings

log = structlog.get_logger("tagger.openai")
# A `TAGGER_REPLY=relevant` reply naming no term for a post this long is suspicious enough to re-ask once.
LONG_POST_CHARS = 2000
# JSON-schema keywords a reply schema may use: OpenAI's strict subset (as the SDK's own `parse` sent them until now).
STRICT_KEYWORDS: Final = frozenset(
    {"type", "title", "description", "properties", "required", "additionalProperties", "items", "$defs", "$ref"}
    | {"enum", "const", "anyOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
    | {"pattern", "format", "minLength", "maxLength", "minItems", "maxItems"}
)


@dataclass(frozen=True)
class Answer:
    """One HTTP call's reply: its raw text, the parsed reply (None when invalid), usage, and what is invalid."""

    raw: str
    parsed: ReplyBase | None
    usage: Usage
    error: str = ""


def _is_quota(exc: BaseException) -> bool:
    return isinstance(exc, openai.RateLimitError) and (
        exc.code == "insufficient_quota" or "insufficient_quota" in str(exc)
    )


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, openai.RateLimitError):
        return not _is_quota(exc)
    return isinstance(exc, openai.APIConnectionError | openai.InternalServerError) or (
        isinstance(exc, openai.APIStatusError) and exc.status_code >= 500
    )


def _retry_after(exc: BaseException | None) -> float | None:
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


def strict_schema(model_cls: type[ReplyBase]) -> dict[str, Any]:
    """The reply model's JSON schema in OpenAI's strict subset: every object closed, every property required."""
    return _strict(model_cls.model_json_schema(), "#")


def _strict(node: Any, where: str) -> dict[str, Any]:
    # Reply models are ours: a construct outside the strict subset is a bug to fail on, not to rewrite silently.
    if not isinstance(node, dict):
        raise TypeError(f"{where}: a schema must be an object, not {node!r}")
    unsupported = sorted(set(node) - STRICT_KEYWORDS)
    if unsupported or ("$ref" in node and len(node) > 1):
        raise ValueError(f"{where}: outside OpenAI's strict JSON-schema subset: {unsupported or sorted(node)}")
    for name, sub in (node.get("$defs") or {}).items():
        _strict(sub, f"{where}/$defs/{name}")
    if node.get("type") == "object":
        if node.get("additionalProperties", False) is not False:
            raise ValueError(f"{where}: strict mode needs additionalProperties false")
        node["additionalProperties"] = False
        node["required"] = list(node.get("properties") or {})
    for name, sub in (node.get("properties") or {}).items():
        _strict(sub, f"{where}/properties/{name}")
    if "items" in node:
        _strict(node["items"], f"{where}/items")
    for i, sub in enumerate(node.get("anyOf") or []):
        _strict(sub, f"{where}/anyOf/{i}")
    return node


def response_format(model_cls: type[ReplyBase]) -> dict[str, Any]:
    """The structured-outputs `response_format` for a reply model (strict: the model can only reply in it)."""
    return {
        "type": "json_schema",
        "json_schema": {"schema": strict_schema(model_cls), "name": model_cls.__name__, "strict": True},
    }


def _content_of(raw_body: str) -> str:
    """The assistant message's text inside a raw chat-completion body (or the body itself)."""
    try:
        message = json.loads(raw_body)["choices"][0]["message"]
        return str(message.get("content") or message.get("refusal") or "")
    except (ValueError, KeyError, IndexError, TypeError):
        return raw_body


class OpenAIProvider:
    """Any OpenAI-compatible endpoint through the official SDK, with structured outputs."""

    name = "openai"

    def __init__(self, settings: Settings, templates: Templates, throttle: Throttle | None = None) -> None:
        self.settings = settings
        self.templates = templates
        self.throttle: Throttle = throttle or NoThrottle()
        self.model = settings.model
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "not-needed"
        # The SDK's own retries are off so that tenacity alone decides, within one deadline.
        self.client = openai.OpenAI(
            api_key=key, base_url=settings.openai_base_url, max_retries=0, timeout=settings.request_timeout
        )

    def messages_for(self, prompt: Prompt) -> list[dict[str, str]]:
        """The prompt's messages as sent (in JSON mode the schema rides in the system message)."""
        messages: list[dict[str, str]] = list(prompt.messages)
        if self.settings.json_mode:
            schema = json.dumps(reply_model(prompt.names).model_json_schema())
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\nJSON schema:\n{schema}"}
        return messages

    def request(self, messages: list[dict[str, str]], model_cls: type[ReplyBase]) -> dict[str, Any]:
        """The chat-completions request body: the SDK sends it as is, a batch line carries it as is."""
        if self.settings.json_mode:
            fmt: dict[str, Any] = {"type": "json_object"}
            return {"model": self.model, "messages": messages, "temperature": 0, "response_format": fmt}
        # `stream: false` as the SDK's `parse` wrote it, so that bodies (and batch digests) did not change.
        fmt = response_format(model_cls)
        return {"model": self.model, "messages": messages, "temperature": 0, "response_format": fmt, "stream": False}

    def request_body(self, prompt: Prompt) -> dict[str, Any]:
        """The JSON body the synchronous path sends for `prompt` (tests/test_batch.py compares the two)."""
        return self.request(self.messages_for(prompt), reply_model(prompt.names))

    def validate(self, prompt: Prompt, body: str, last_try: bool = False) -> Answer:
        """Check one raw chat-completion body against `prompt`; `error` says why it is not usable.

        Raises Refused or Truncated. The synchronous path and batch collection both validate through here. A
        reply naming no term for a long post is worth one re-ask (`TAGGER_REPLY=relevant`), so it is an error
        unless `last_try`.
        """
        answer = self._read(body, reply_model(prompt.names))
        parsed = answer.parsed
        if parsed is None:
            return answer
        complete = prompt.reply == "all"
        error = reply_problem(prompt.names, [j.term for j in parsed.judgements], complete) or ""
        silent = not complete and not parsed.judgements and len(prompt.post.body) >= LONG_POST_CHARS
        if not error and silent and not last_try:
            error = "the reply names no term at all; check again which listed terms apply to this post"
        return Answer(answer.raw, None if error else parsed, answer.usage, error)

    def judge(self, prompt: Prompt) -> Reply:
        """Ask once; if the reply is invalid, re-ask once with the error, then give up."""
        model_cls = reply_model(prompt.names)
        messages = self.messages_for(prompt)
        usage = Usage()
        error = ""
        raw = ""
        for attempt in (1, 2):
            answer = self.validate(prompt, self._call_with_retries(messages, model_cls), last_try=attempt == 2)
            raw, parsed, error = answer.raw, answer.parsed, answer.error
            usage = usage.add(answer.usage)
            if parsed is not None:
                return Reply(judgements=list(parsed.judgements), usage=usage, raw=raw)
            log.warning("llm_invalid_reply", attempt=attempt, model=self.model, error=error[:300])
            if attempt == 1:
                messages += [{"role": "assistant", "content": raw}, reask_message(self.templates, error, prompt.reply)]
        raise InvalidReply(f"reply failed validation after one re-ask: {error[:500]}", raw_reply=raw)

    def _call_with_retries(self, messages: list[dict[str, str]], model_cls: type[ReplyBase]) -> str:
        s = self.settings
        backoff = wait_random_exponential(multiplier=0.5, max=s.retry_max_wait)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hinted = _retry_after(exc)
            return min(s.retry_max_wait, hinted if hinted is not None else backoff(state))

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.info("llm_retry", attempt=state.attempt_number, model=self.model, error=type(exc).__name__)

        retrying = Retrying(
            retry=retry_if_exception(_is_transient),
            wait=wait,
            stop=stop_after_attempt(s.retry_attempts) | stop_after_delay(s.retry_deadline),
            before_sleep=before_sleep,
            reraise=True,
        )
        deadline = time.monotonic() + s.retry_deadline
        tokens = estimate_tokens("".join(m["content"] for m in messages))
        try:
            for attempt in retrying:
                with attempt:
                    self.throttle.wait(tokens, deadline)
                    try:
                        return self._call(messages, model_cls)
                    except openai.APIError as exc:
                        if isinstance(exc, openai.APIStatusError):
                            self.throttle.observe(exc.status_code, exc.response.headers, quota=_is_quota(exc))
                        self.throttle.failed(self._translate(exc).kind, self._detail(exc))
                        raise
        except openai.APIError as exc:
            raise self._translate(exc) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _call(self, messages: list[dict[str, str]], model_cls: type[ReplyBase]) -> str:
        """One HTTP request; returns the raw response body."""
        response = self.client.chat.completions.with_raw_response.create(**self.request(messages, model_cls))
        self.throttle.observe(200, response.headers)
        return str(response.text)

    def _read(self, body: str, model_cls: type[ReplyBase]) -> Answer:
        """A raw completion body read with the SDK's public types: raw content, parsed or None, usage, error."""
        raw = _content_of(body)
        try:
            # Built, not validated, as the SDK builds the responses it returns: a compatible server's envelope
            # quirks (no `id`, a finish_reason such as "eos_token") must not fail a reply whose content is fine.
            data = json.loads(body)
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            completion = ChatCompletion.model_construct(**data)
            choices = list(completion.choices)
            finishes = [getattr(c, "finish_reason", None) for c in choices]
            message = choices[0].message if choices else None
        except (ValueError, TypeError, AttributeError) as exc:
            return Answer(raw, None, _usage_of_body(body), f"not a chat completion: {exc}"[:300])
        if "length" in finishes:
            raise Truncated("reply was cut off by the token limit", raw_reply=raw)
        if "content_filter" in finishes:
            raise Refused("reply was blocked by the provider's content filter", raw_reply=raw)
        usage = _usage(completion)
        if message is None:
            return Answer(raw, None, usage, "no choices in the reply")
        refusal, content = getattr(message, "refusal", None), getattr(message, "content", None)
        if refusal:
            raise Refused(f"model refused: {str(refusal)[:300]}", raw_reply=raw)
        if not content and not self.settings.json_mode:
            return Answer(raw, None, usage, "empty reply")
        try:
            return Answer(raw, model_cls.model_validate_json(content or ""), usage)
        except ValidationError as exc:
            return Answer(raw, None, usage, _short_validation(exc))

    def _detail(self, exc: openai.APIError) -> str:
        """The error as one line: its type, HTTP status and message, without secrets."""
        status = getattr(exc, "status_code", None)
        # Some servers echo the key they were sent in their error message.
        message = redact(exc.message, secrets_of(self.settings))
        return f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "") + f": {message[:300]}"

    def _translate(self, exc: openai.APIError) -> ProviderError:
        detail = self._detail(exc)
        if _is_quota(exc):
            return QuotaExhausted(f"provider quota exhausted: {detail}")
        if isinstance(exc, openai.RateLimitError):
            return RateLimited(f"still rate limited after {self.settings.retry_attempts} attempts: {detail}")
        where = f"{self.client.base_url} (OPENAI_BASE_URL)"
        if isinstance(exc, openai.APITimeoutError):
            return ProviderTimeout(
                f"requests to {where} kept timing out after {self.settings.request_timeout}s: {detail}"
            )
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return AuthError(f"provider rejected the credentials: {detail}")
        if isinstance(exc, openai.APIConnectionError):
            return ProviderUnavailable(f"cannot reach the provider at {where}: {detail}")
        if _is_transient(exc):
            return ProviderUnavailable(f"provider unavailable at {where}: {detail}")
        return ProviderError(f"provider error: {detail}")


def _short_validation(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:8])


def _usage(completion: ChatCompletion) -> Usage:
    u = getattr(completion, "usage", None)
    if u is None:
        return Usage(calls=1)
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(
        calls=1,
        input_tokens=getattr(u, "prompt_tokens", None) or 0,
        cached_tokens=cached,
        output_tokens=getattr(u, "completion_tokens", None) or 0,
    )


def _usage_of_body(body: str) -> Usage:
    """Usage from a raw completion body, for bodies that are not a valid chat completion."""
    try:
        usage = json.loads(body).get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return Usage(
            calls=1,
            input_tokens=usage.get("prompt_tokens") or 0,
            cached_tokens=cached,
            output_tokens=usage.get("completion_tokens") or 0,
        )
    except (ValueError, AttributeError, TypeError):
        return Usage(calls=1)
