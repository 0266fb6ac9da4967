"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

Real HTTP on localhost; rule-based structured replies; latency and faults on demand.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = (
    "rate_limit",
    "quota",
    "server_error",
    "auth",
    "timeout",
    "broken_json",
    "schema_invalid",
    "refusal",
    "unknown_term",
    "missing_term",
    "truncated",
)
Scorer = Callable[[str, str], dict[str, Any]]


# The system-message phrase of TAGGER_REPLY=relevant (worker/prompts.py REPLY_RULES): reply only for terms that apply.
RELEVANT_MARKER = "leave out every term that does not apply"


def default_scorer(term: str, post: str) -> dict[str, Any]:
    """High scores when the post names the term, low otherwise; a reason of about 20 words, as models write."""
    named = term.lower() in post.lower()
    value = 9.0 if named else 1.0
    reason = (
        f"The post names {term} and discusses its key topics in depth, so it fits this term's scope and audience well."
        if named
        else f"The post does not name {term} or discuss its key topics, so it falls outside this term's scope here."
    )
    return {
        "term": term,
        "mentions": value,
        "alignment": value,
        "depth": value,
        "intent": value,
        "audience": value,
        "signal": value,
        "reason": reason,
    }


def applies(entry: dict[str, Any]) -> bool:
    """Whether a model asked for relevant terms only would name this entry (any sub-score above 1)."""
    return any(isinstance(v, int | float) and v > 1 for k, v in entry.items() if k not in ("term", "reason"))


def asked_names(body: dict[str, Any]) -> list[str]:
    """The term titles a chat-completions request asks about (from its schema, else its system message)."""
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
    if schema:
        for definition in (schema.get("$defs") or {}).values():
            term = definition.get("properties", {}).get("term", {})
            if term.get("enum") or "const" in term:
                return [str(n) for n in term.get("enum") or [term["const"]]]
    system = next((m.get("content", "") for m in body.get("messages", []) if m.get("role") == "system"), "")
    return re.findall(r"^## (.+)$", system, re.M)


def _post_text(body: dict[str, Any]) -> str:
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return next((u for u in users if "<<<POST" in u), users[0] if users else "")


class FakeLLM:
    """Start with `FakeLLM().start()`; point OPENAI_BASE_URL at `.base_url`."""

    def __init__(self, latency: float = 0.0, scorer: Scorer = default_scorer, seed: int = 0) -> None:
        self.latency = latency
        self.scorer = scorer
        self.script: deque[str] = deque()
        self.fault_rate = 0.0
        self.fault_mix: tuple[str, ...] = ("rate_limit", "server_error", "broken_json")
        self.retry_after = "1"
        self.timeout_sleep = 3.0
        self.success_headers: dict[str, str] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self._seen_prefixes: set[str] = set()
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        """The `/v1` URL to give the OpenAI client."""
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeLLM:
        """Serve on a free localhost port in a background thread."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def inject(self, *faults: str) -> None:
        """Queue faults for the next requests, one per request, in order ("ok": a normal reply)."""
        unknown = set(faults) - set(FAULTS) - {"ok"}
        if unknown:
            raise ValueError(f"unknown faults: {unknown}")
        with self._lock:
            self.script.extend(faults)

    def _next_fault(self) -> str | None:
        with self._lock:
            if self.script:
                fault = self.script.popleft()
                return None if fault == "ok" else fault
            if self.fault_rate and self._random.random() < self.fault_rate:
                return self._random.choice(self.fault_mix)
            return None

    def respond(self, body: dict[str, Any], authorization: str = "") -> tuple[int, dict[str, str], dict[str, Any]]:
        """Status, headers and JSON body for one chat-completions request."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._respond(body, authorization)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _respond(self, body: dict[str, Any], authorization: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        fault = self._next_fault()
        with self._lock:
            self.requests.append(body)
            self.counts["requests"] += 1
            if fault:
                self.counts[fault] += 1
        if self.latency:
            time.sleep(self.latency)
        errors = {
            "rate_limit": (429, "Rate limit reached for requests", "rate_limit_exceeded"),
            "quota": (429, "You exceeded your current quota", "insufficient_quota"),
            "server_error": (500, "The server had an error while processing your request", "server_error"),
            # Echoes the key it was sent, as careless servers do: tagger must redact it wherever it goes.
            "auth": (401, f"Incorrect API key provided: {authorization.removeprefix('Bearer ')}", "invalid_api_key"),
        }
        if fault in errors:
            status, message, code = errors[fault]
            headers = {"retry-after": self.retry_after} if fault == "rate_limit" else {}
            return status, headers, {"error": {"message": message, "type": code, "code": code, "param": None}}
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
        names = asked_names(body)
        post = _post_text(body)
        entries = [self.scorer(n, post) for n in names]
        system = next((m.get("content", "") for m in body.get("messages", []) if m.get("role") == "system"), "")
        if RELEVANT_MARKER in system:
            entries = [e for e in entries if applies(e)]
        finish, refusal = "stop", None
        content: str | None = json.dumps({"judgements": entries})
        if fault == "broken_json":
            content = '{"judgements": [{"term": '
        elif fault == "schema_invalid":
            content = json.dumps({"judgements": [{"term": n, "score": 5} for n in names]})
        elif fault == "unknown_term":
            content = json.dumps({"judgements": [*entries, {**default_scorer("Injected Term", ""), "mentions": 10}]})
        elif fault == "missing_term":
            content = json.dumps({"judgements": entries[1:]})
        elif fault == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that."
        elif fault == "truncated":
            content, finish = (content or "")[:40], "length"
        return 200, dict(self.success_headers), self._completion(body, content, refusal, finish)

    def _completion(
        self, body: dict[str, Any], content: str | None, refusal: str | None, finish: str
    ) -> dict[str, Any]:
        messages = body.get("messages", [])
        system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
        prefix = hashlib.sha256(system.encode()).hexdigest()
        with self._lock:
            cached = len(system) // 4 // 128 * 128 if prefix in self._seen_prefixes else 0
            self._seen_prefixes.add(prefix)
            self.counts["prompt_tokens"] += prompt_tokens
            self.counts["cached_tokens"] += cached
        return {
            "id": f"chatcmpl-fake-{self.counts['requests']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish,
                    "logprobs": None,
                    "message": {"role": "assistant", "content": content, "refusal": refusal},
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(content or "") // 4 + 1,
                "total_tokens": prompt_tokens + len(content or "") // 4 + 1,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }


class _Handler(BaseHTTPRequestHandler):
    fake: FakeLLM
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle and delayed ACKs add ~40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = {}
        headers: dict[str, str] = {}
        if not self.path.rstrip("/").endswith("/chat/completions"):
            status, payload = 404, {"error": {"message": "not found", "type": "not_found", "code": None}}
        else:
            status, headers, payload = self.fake.respond(body, self.headers.get("authorization", ""))
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout it asked for)
