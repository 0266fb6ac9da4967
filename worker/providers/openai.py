"""The OpenAI-compatible provider: the official SDK, structured outputs, retries, validation."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import openai
import openai.resources.chat.chat
import openai.resources.chat.completions.completions
import structlog
from openai.types.chat import ChatCompletion
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_random_exponential

from worker import untrusted
from worker.errors import (
    AuthError,
    InvalidReply,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    ProviderUnsupported,
    QuotaExhausted,
    RateLimited,
    Refused,
    TaggerError,
    Truncated,
)
from worker.logs import redact, secrets_of
from worker.prompts import Groups, Prompt, Templates, estimate_tokens, reask_message
from worker.providers.base import ModeMemory, NoThrottle, Reply, Throttle
from worker.providers.modes import FileModeMemory, endpoint_of
from worker.reply import MAX_REPLY_TOKENS, TermScores, call_timeout, over_limits, parse_reply, reply_schema
from worker.results import Usage
from worker.settings import STRUCTURED_MODES, Settings, StructuredMode

log = structlog.get_logger("tagger.openai")
# The chat resource above is one the SDK loads on first use: imported with this module, it is loaded when a worker
# starts (or once in the supervisor, before it forks its workers), not during each worker's first job (~80-130 ms).
# max_tokens sent without a strict schema (json_object, prompt): an entry is about 60 tokens; a reason may be longer.
MAX_TOKENS_BASE, MAX_TOKENS_PER_TERM = 200, 250
# A `TAGGER_REPLY=relevant` reply naming no term for a post this long is suspicious enough to re-ask once.
LONG_POST_CHARS = 2000
# JSON-schema keywords a reply schema may use: OpenAI's strict subset (as the SDK's own `parse` sent them until now).
STRICT_KEYWORDS: Final = frozenset(
    {"type", "title", "description", "properties", "required", "additionalProperties", "items", "$defs", "$ref"}
    | {"enum", "const", "anyOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
    | {"pattern", "format", "minLength", "maxLength", "minItems", "maxItems"}
)


# A 500 whose message says this reads the request as invalid or unsupported: the same request fails again.
_INVALID = re.compile(
    r"invalid|unsupported|not supported|not implemented|unknown|unrecognized|not allowed|must be|validation|"
    r"unexpected|extra (fields|inputs)|not permitted",
    re.I,
)
# A rejection that names the response format: `auto` then tries the next structured-output mode.
_FORMAT = re.compile(r"response_format|json_schema|json_object|schema|grammar|structured|format", re.I)
_REJECTED = (400, 404, 422)
# What each mode falls back to when the server rejects it (TAGGER_STRUCTURED=auto).
_NEXT_MODE: dict[str, StructuredMode] = {"json_schema": "json_object", "json_object": "prompt"}


def one_line(text: str) -> str:
    """A server's message on one line (bodies carry newlines and tracebacks)."""
    return " ".join(text.split())


def _rejects_request(exc: BaseException) -> bool:
    """A request the server will never accept as sent: 400/404/422, or a 500 that says it is invalid."""
    if not isinstance(exc, openai.APIStatusError) or isinstance(
        exc, openai.AuthenticationError | openai.PermissionDeniedError | openai.RateLimitError
    ):
        return False
    if exc.status_code in _REJECTED:
        return True
    return exc.status_code >= 500 and bool(_INVALID.search(_message_of(exc)))


def _message_of(exc: openai.APIStatusError) -> str:
    """The error's message and, for servers that put the reason only there, its raw body."""
    try:
        body = exc.response.text
    except Exception:  # a streamed or closed response: the SDK's message is all there is
        body = ""
    return f"{exc.message} {body[:2000]}"


@dataclass(frozen=True)
class Answer:
    """One HTTP call's reply: its raw text, the parsed reply (None when invalid), usage, and what is invalid."""

    raw: str
    parsed: list[TermScores] | None
    usage: Usage
    error: str = ""


def _is_quota(exc: BaseException) -> bool:
    return isinstance(exc, openai.RateLimitError) and (
        exc.code == "insufficient_quota" or "insufficient_quota" in str(exc)
    )


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, openai.RateLimitError):
        return not _is_quota(exc)
    if _rejects_request(exc):
        return False
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


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A reply schema checked against OpenAI's strict subset and limits: objects closed, every property required."""
    checked = _strict(schema, "#")
    problem = over_limits(checked)
    if problem:
        raise ValueError(f"the reply schema is over OpenAI's strict-mode limits: {problem}")
    return checked


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


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """The structured-outputs `response_format` for a reply schema (strict: the model can only reply in it)."""
    return {
        "type": "json_schema",
        "json_schema": {"schema": strict_schema(schema), "name": "Judgements", "strict": True},
    }


def _content_of(raw_body: str) -> str:
    """The assistant message's text inside a raw chat-completion body (or the body itself)."""
    try:
        message = untrusted.loads(raw_body)["choices"][0]["message"]
        return str(message.get("content") or message.get("refusal") or "")
    except (ValueError, KeyError, IndexError, TypeError):
        return raw_body


class OpenAIProvider:
    """Any OpenAI-compatible endpoint through the official SDK, with structured outputs."""

    name = "openai"

    def __init__(
        self,
        settings: Settings,
        templates: Templates,
        throttle: Throttle | None = None,
        memory: ModeMemory | None = None,
    ) -> None:
        self.settings = settings
        self.templates = templates
        self.throttle: Throttle = throttle or NoThrottle()
        self.memory: ModeMemory = memory or FileModeMemory(settings)
        self.model = settings.model
        self.endpoint = endpoint_of(settings)
        self._mode: StructuredMode | None = None
        self._mode_lock = threading.Lock()
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "not-needed"
        # The SDK's own retries are off so that tenacity alone decides, within one deadline.
        self.client = openai.OpenAI(
            api_key=key, base_url=settings.openai_base_url, max_retries=0, timeout=settings.request_timeout
        )

    @property
    def mode(self) -> StructuredMode:
        """The structured-output mode in use: the setting, else (auto) the one remembered for this endpoint."""
        if self._mode is not None:
            return self._mode
        asked = self.settings.structured_mode
        remembered = self.memory.recall(self.endpoint) if asked == "auto" else asked
        mode: StructuredMode = next((m for m in STRUCTURED_MODES if m == remembered), "json_schema")
        self._mode = mode
        return mode

    def fall_back(self, failed: StructuredMode, exc: ProviderUnsupported) -> bool:
        """After `failed` was rejected, move `auto` to the next mode (once per mode); False when there is none."""
        if self.settings.structured_mode != "auto" or not exc.format_rejected:
            return False
        with self._mode_lock:
            if self._mode != failed:
                return True  # another chunk of this post already moved on
            following = _NEXT_MODE.get(failed)
            if following is None:
                return False
            self._mode = following
            self.memory.remember(self.endpoint, following)
        log.warning(
            "structured_fallback",
            endpoint=self.endpoint,
            rejected=failed,
            now=following,
            note=f"the server rejected {failed}; using {following} from now on (TAGGER_STRUCTURED sets it)",
        )
        return True

    def messages_for(self, prompt: Prompt, mode: StructuredMode | None = None) -> list[dict[str, str]]:
        """The prompt's messages as sent (without a strict schema, the schema rides in the system message)."""
        messages: list[dict[str, str]] = list(prompt.messages)
        if (mode or self.mode) != "json_schema":
            schema = json.dumps(reply_schema(prompt.groups, prompt.reply))
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\nJSON schema:\n{schema}"}
        return messages

    def request(
        self, messages: list[dict[str, str]], schema: dict[str, Any], mode: StructuredMode | None = None
    ) -> dict[str, Any]:
        """The chat-completions request body: the SDK sends it as is, a batch line carries it as is."""
        mode = mode or self.mode
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if mode == "json_object":
            # The schema beside the format: grammar-based servers (llama.cpp, llama-cpp-python) enforce it.
            body["response_format"] = {"type": "json_object", "schema": strict_schema(schema)}
        elif mode == "json_schema":
            # `stream: false` as the SDK's `parse` wrote it, so that bodies (and batch digests) did not change.
            body.update(response_format=response_format(schema), stream=False)
        if mode != "json_schema":
            # Without a strict server, a small model can write until the context is full: a bound per term asked.
            # Never more than a model's maximum (OpenAI rejects a larger max_tokens outright).
            body["max_tokens"] = min(MAX_TOKENS_BASE + MAX_TOKENS_PER_TERM * _terms_in(schema), MAX_REPLY_TOKENS)
        return body

    def request_body(self, prompt: Prompt) -> dict[str, Any]:
        """The JSON body the synchronous path sends for `prompt` (tests/test_batch.py compares the two)."""
        return self.request(self.messages_for(prompt), reply_schema(prompt.groups, prompt.reply))

    def validate(self, prompt: Prompt, body: str, last_try: bool = False) -> Answer:
        """Check one raw chat-completion body against `prompt`; `error` says why it is not usable.

        Raises Refused or Truncated. The synchronous path and batch collection both validate through here. A
        reply naming no term for a long post is worth one re-ask (`TAGGER_REPLY=relevant`), so it is an error
        unless `last_try`.
        """
        answer = self._read(body, prompt.groups, prompt.reply)
        parsed = answer.parsed
        if parsed is None:
            return answer
        complete = prompt.reply == "all"
        error = ""
        silent = not complete and not parsed and len(prompt.post.body) >= LONG_POST_CHARS
        if not error and silent and not last_try:
            error = "the reply names no term at all; check again which listed terms apply to this post"
        return Answer(answer.raw, None if error else parsed, answer.usage, error)

    def judge(self, prompt: Prompt) -> Reply:
        """Ask once; if the reply is invalid, re-ask once with the error, then give up.

        A request the server rejects fails at once (`provider_unsupported`); with TAGGER_STRUCTURED=auto a
        rejected response format is first replaced by the next mode, once per mode.
        """
        # Chunks in flight side by side may each be rejected once before the first moves the mode on (held calls
        # stay parallel); the fallback is logged and remembered once.
        spent = Usage()  # calls the server rejected before a mode it accepts
        while True:
            mode = self.mode
            try:
                reply = self._judge(prompt, mode)
                return Reply(judgements=reply.judgements, usage=spent.add(reply.usage), raw=reply.raw)
            except ProviderUnsupported as exc:
                spent = spent.add(exc.usage or Usage())
                if not self.fall_back(mode, exc):
                    exc.usage = spent
                    raise
            except TaggerError as exc:
                exc.usage = spent.add(exc.usage or Usage())
                raise

    def _judge(self, prompt: Prompt, mode: StructuredMode) -> Reply:
        schema = reply_schema(prompt.groups, prompt.reply)
        messages = self.messages_for(prompt, mode)
        usage = Usage()
        error = ""
        raw = ""
        for attempt in (1, 2):
            body = ""
            try:
                body = self._call_with_retries(messages, schema, mode)
                answer = self.validate(prompt, body, last_try=attempt == 2)
            except TaggerError as exc:
                # Calls a failed post made still count (eval's cost line, the backfill summary).
                exc.usage = usage.add(exc.usage or (_usage_of_body(body) if body else Usage()))
                raise
            raw, parsed, error = answer.raw, answer.parsed, answer.error
            usage = usage.add(answer.usage)
            if parsed is not None:
                return Reply(judgements=list(parsed), usage=usage, raw=raw)
            log.warning("llm_invalid_reply", attempt=attempt, model=self.model, error=error[:300])
            if attempt == 1:
                messages += [{"role": "assistant", "content": raw}, reask_message(self.templates, error, prompt.reply)]
        invalid = InvalidReply(f"reply failed validation after one re-ask: {error[:500]}", raw_reply=raw)
        invalid.usage = usage
        raise invalid

    def _call_with_retries(self, messages: list[dict[str, str]], schema: dict[str, Any], mode: StructuredMode) -> str:
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
        sent = 0
        try:
            for attempt in retrying:
                with attempt:
                    self.throttle.wait(tokens, deadline)
                    sent += 1
                    try:
                        return self._call(messages, schema, mode)
                    except openai.APIError as exc:
                        if isinstance(exc, openai.APIStatusError):
                            self.throttle.observe(exc.status_code, exc.response.headers, quota=_is_quota(exc))
                        self.throttle.failed(self._translate(exc, mode).kind, self._detail(exc))
                        raise
        except openai.APIError as exc:
            error = self._translate(exc, mode)
            error.usage = Usage(calls=sent)
            raise error from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _call(self, messages: list[dict[str, str]], schema: dict[str, Any], mode: StructuredMode) -> str:
        """One HTTP request; returns the raw response body.

        The timeout grows with the terms asked past TIMEOUT_TERMS: a model writes a reply naming 200 terms for
        minutes, not seconds.
        """
        timeout = call_timeout(self.settings.request_timeout, _terms_in(schema))
        body = self.request(messages, schema, mode)
        response = self.client.chat.completions.with_raw_response.create(**body, timeout=timeout)
        self.throttle.observe(200, response.headers)
        return str(response.text)

    def _read(self, body: str, groups: Groups, reply: str = "all") -> Answer:
        """A raw completion body read with the SDK's public types: raw content, parsed or None, usage, error."""
        raw = _content_of(body)
        try:
            # Built, not validated, as the SDK builds the responses it returns: a compatible server's envelope
            # quirks (no `id`, a finish_reason such as "eos_token") must not fail a reply whose content is fine.
            data = untrusted.loads(body)
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
        if not content:
            return Answer(raw, None, usage, "empty reply")
        parsed = parse_reply(content, groups, reply)
        if parsed.error:
            return Answer(raw, None, usage, parsed.error)
        return Answer(raw, parsed.judgements, usage)

    def _detail(self, exc: openai.APIError) -> str:
        """The error as one line: its type, HTTP status and message, without secrets."""
        status = getattr(exc, "status_code", None)
        # Some servers echo the key they were sent in their error message.
        message = one_line(redact(exc.message, secrets_of(self.settings)))  # bodies carry newlines, tracebacks
        return f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "") + f": {message[:300]}"

    def _translate(self, exc: openai.APIError, mode: StructuredMode = "json_schema") -> ProviderError:
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
        if isinstance(exc, openai.APIStatusError) and _rejects_request(exc):
            return self._unsupported(exc, mode, where, detail)
        if _is_transient(exc):
            return ProviderUnavailable(f"provider unavailable at {where}: {detail}")
        return ProviderError(f"provider error: {detail}")

    def _unsupported(
        self, exc: openai.APIStatusError, mode: StructuredMode, where: str, detail: str
    ) -> ProviderUnsupported:
        """A rejected request, with one line naming the setting to change."""
        about_format = mode != "prompt" and bool(_FORMAT.search(_message_of(exc)))
        asked = self.settings.structured_mode
        if about_format and asked == "auto":
            hint = f"tagger tried {mode} and has no other mode to try"
        elif about_format:
            others = ", ".join(m for m in ("auto", *STRUCTURED_MODES) if m != asked)
            hint = f"it does not accept TAGGER_STRUCTURED={asked}: set TAGGER_STRUCTURED to one of {others}"
        else:
            hint = (
                f"check TAGGER_MODEL ({self.model}), OPENAI_BASE_URL and TAGGER_STRUCTURED (now {asked}, sent {mode})"
            )
        error = ProviderUnsupported(f"the provider at {where} rejected the request: {detail}; {hint}")
        error.format_rejected = about_format
        return error


def _terms_in(schema: dict[str, Any]) -> int:
    """How many terms a reply schema asks about."""
    count = 0
    for node in (schema.get("properties", {}).get("judgements", {}).get("properties") or {}).values():
        count += len(node.get("properties") or {}) or int(node.get("maxItems") or 0)
    return count


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
        usage = untrusted.loads(body).get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return Usage(
            calls=1,
            input_tokens=usage.get("prompt_tokens") or 0,
            cached_tokens=cached,
            output_tokens=usage.get("completion_tokens") or 0,
        )
    except (ValueError, AttributeError, TypeError):
        return Usage(calls=1)
