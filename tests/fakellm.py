"""A fake OpenAI-compatible chat-completions server for tests and benchmarks.

Real HTTP on localhost; rule-based structured replies; latency and faults on demand; per-term scripted
scores (`score`); calls held until the test releases them (`hold`, `release`).
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

from worker.prompts import estimate_tokens

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
    "bad_request",
)
Scorer = Callable[[str, str], dict[str, Any]]
SUB_SCORE_NAMES = ("mentions", "alignment", "depth", "intent", "audience", "signal")
# A scripted answer for one term: a confidence (0-100; all six sub-scores set to a tenth of it, which any
# weights turn back into exactly that confidence) or the sub-scores themselves (missing ones are 0).
Scripted = float | dict[str, float]
HOLD_LIMIT = 60.0  # seconds a held call waits for release() at most, so a broken test cannot hang forever


# The system-message phrase of TAGGER_REPLY=relevant (worker/prompts.py REPLY_RULES): reply only for terms that apply.
RELEVANT_MARKER = "leave out every term that does not apply"


def default_scorer(term: str, post: str) -> dict[str, Any]:
    """High scores when the post names the term, low otherwise; a reason of about 20 words, as models write."""
    named = term.lower() in post.lower()
    value = 9 if named else 1  # integers, as the schema's enums 0-10 ask
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


def scripted_entry(term: str, value: Scripted) -> dict[str, Any]:
    """The reply entry for a term whose answer a test scripted."""
    if isinstance(value, dict):
        unknown = set(value) - set(SUB_SCORE_NAMES)
        if unknown:
            raise ValueError(f"unknown sub-scores: {sorted(unknown)}")
        scores = {name: float(value.get(name, 0.0)) for name in SUB_SCORE_NAMES}
    else:
        scores = dict.fromkeys(SUB_SCORE_NAMES, float(value) / 10)
    return {"term": term, **scores, "reason": f"scripted for {term}"}


def _schema_of(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format") or {}
    if not isinstance(fmt, dict):
        return None
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


def _per_type(schema: dict[str, Any] | None) -> dict[str, Any]:
    per_type = ((schema or {}).get("properties", {}).get("judgements") or {}).get("properties") or {}
    return per_type if isinstance(per_type, dict) else {}


def asked_groups(body: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The term titles a request asks about, by type (from its schema, else its system message)."""
    schema = _schema_of(body)
    per_type = _per_type(schema)
    if per_type:
        return [
            (t, list(node.get("properties") or {}) or list(node["items"]["properties"]["term"]["enum"]))
            for t, node in per_type.items()
        ]
    system = next((m.get("content", "") for m in body.get("messages", []) if m.get("role") == "system"), "")
    groups: list[tuple[str, list[str]]] = []
    for line in system.splitlines():
        heading = re.match(r'^Terms of type "(.+)":$', line)
        if heading:
            groups.append((heading.group(1), []))
        elif line.startswith("## "):
            if not groups:
                groups.append(("", []))
            groups[-1][1].append(line[3:])
    return groups


def asked_names(body: dict[str, Any]) -> list[str]:
    """The term titles a chat-completions request asks about (every type's)."""
    return [n for _, names in asked_groups(body) for n in names]


def _post_text(body: dict[str, Any]) -> str:
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return next((u for u in users if "<<<POST" in u), users[0] if users else "")


def _shaped(entries: list[dict[str, Any]], relevant: bool) -> Any:
    """One type's entries as the reply schema has them: a list (relevant) or an object keyed by title (all)."""
    if relevant:
        return entries
    return {e["term"]: {k: v for k, v in e.items() if k != "term"} for e in entries}


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
        self.arrived_at: list[float] = []  # time.monotonic() of each request, parallel to `requests`
        self.scripted: dict[str, Scripted] = {}
        self.scripted_default: Scripted | None = None
        self._seen_prefixes: set[str] = set()
        self._lock = threading.Lock()
        self._gate = threading.Condition()
        self._holding = False
        self._permits = 0
        self.held = 0
        self._random = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None
        self.batch_api = FakeBatchAPI(self)
        # Real servers' behaviours (tests/test_compat.py): a response format rejected with this status (500 as
        # llama-cpp-python answers json_schema, 400 as others do), a grammar that ignores minimum/maximum
        # (sub-scores of 12 arrive), and a small model that lists one entry where nothing forces one per term.
        self.rejected_formats: dict[str, int] = {}
        self.ignores_ranges = False
        self.one_entry = False

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
        # A short poll interval: stop() (each test's teardown) returns in 50 ms instead of 500.
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
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

    def score(self, scores: dict[str, Scripted] | None = None, *, default: Scripted | None = None) -> None:
        """Answer these terms (by title) with these confidences or sub-scores; others with `default` or the scorer.

        `score({"Kanban": 80, "Lean": 79.99}, default=0)`; `score({"Scrum": {"mentions": 10}})`.
        """
        with self._lock:
            self.scripted.update(scores or {})
            if default is not None:
                self.scripted_default = default

    def hold(self) -> None:
        """Hold every call from now on until `release()` lets it through."""
        with self._gate:
            self._holding = True

    def release(self, calls: int | None = None) -> None:
        """Let `calls` held (or future) calls through; with no number, stop holding and let every call through."""
        with self._gate:
            if calls is None:
                self._holding = False
            else:
                self._permits += calls
            self._gate.notify_all()

    def wait_held(self, calls: int = 1, timeout: float = 30.0) -> bool:
        """Wait until at least `calls` calls are being held; False on timeout."""
        with self._gate:
            return self._gate.wait_for(lambda: self.held >= calls, timeout=timeout)

    def _pass_gate(self) -> None:
        with self._gate:
            if not self._holding:
                return
            self.held += 1
            self._gate.notify_all()
            self._gate.wait_for(lambda: not self._holding or self._permits > 0, timeout=HOLD_LIMIT)
            if self._holding and self._permits > 0:
                self._permits -= 1
            self.held -= 1
            self._gate.notify_all()

    def _entry(self, term: str, post: str) -> dict[str, Any]:
        value = self.scripted.get(term, self.scripted_default)
        return self.scorer(term, post) if value is None else scripted_entry(term, value)

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
        fmt = body.get("response_format")
        fmt_type = fmt.get("type") if isinstance(fmt, dict) else None
        if fmt_type in self.rejected_formats:
            with self._lock:
                self.requests.append(body)
                self.arrived_at.append(time.monotonic())
                self.counts["requests"] += 1
                self.counts["rejected"] += 1
            return self._rejection(self.rejected_formats[str(fmt_type)], str(fmt_type))
        fault = self._next_fault()
        with self._lock:
            self.requests.append(body)
            self.arrived_at.append(time.monotonic())
            self.counts["requests"] += 1
            if fault:
                self.counts[fault] += 1
        self._pass_gate()  # counted (and in flight) while held
        if self.latency:
            time.sleep(self.latency)
        errors = {
            "rate_limit": (429, "Rate limit reached for requests", "rate_limit_exceeded"),
            "quota": (429, "You exceeded your current quota", "insufficient_quota"),
            "server_error": (500, "The server had an error while processing your request", "server_error"),
            "bad_request": (400, "The model `fake-model` does not exist or you cannot use it.", "model_not_found"),
            # Echoes the key it was sent, as careless servers do: tagger must redact it wherever it goes.
            "auth": (401, f"Incorrect API key provided: {authorization.removeprefix('Bearer ')}", "invalid_api_key"),
        }
        if fault in errors:
            status, message, code = errors[fault]
            headers = {"retry-after": self.retry_after} if fault == "rate_limit" else {}
            return status, headers, {"error": {"message": message, "type": code, "code": code, "param": None}}
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
        groups = asked_groups(body)
        post = _post_text(body)
        system = next((m.get("content", "") for m in body.get("messages", []) if m.get("role") == "system"), "")
        relevant = RELEVANT_MARKER in system
        by_type = {t: [self._entry(n, post) for n in group] for t, group in groups}
        if relevant:
            by_type = {t: [e for e in entries if applies(e)] for t, entries in by_type.items()}
        by_type = {t: self._as_a_grammar_would(body, entries) for t, entries in by_type.items()}
        first = next(iter(by_type), "")
        if fault == "unknown_term":
            by_type[first] = [*by_type.get(first, []), {**default_scorer("Injected Term", ""), "mentions": 10}]
        elif fault == "missing_term":
            by_type[first] = by_type.get(first, [])[1:]
        finish, refusal = "stop", None
        content: str | None = json.dumps({"judgements": {t: _shaped(e, relevant) for t, e in by_type.items()}})
        if fault == "broken_json":
            content = '{"judgements": {"'
        elif fault == "schema_invalid":
            content = json.dumps({"judgements": {t: {n: {"score": 5} for n in group} for t, group in groups}})
        elif fault == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that."
        elif fault == "truncated":
            content, finish = (content or "")[:40], "length"
        return 200, dict(self.success_headers), self._completion(body, content, refusal, finish)

    @staticmethod
    def _rejection(status: int, fmt_type: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        """A server that does not take this response format: llama-cpp-python's 500, or a plain 400."""
        if status >= 500:
            # llama-cpp-python 0.3's answer to json_schema (as seen on the real server): the validation error and a
            # piece of traceback, over several lines.
            message = (
                "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                f"'msg': \"Input should be 'text' or 'json_object'\", 'input': '{fmt_type}', "
                "'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  File \"llama_cpp/server/app.py\", "
                "line 376, in create_chat_completion\n    POST /v1/chat/completions"
            )
            return status, {}, {"error": {"message": message, "type": "internal_server_error", "code": None}}
        message = f"Invalid parameter: 'response_format' of type '{fmt_type}' is not supported with this model."
        error = {"message": message, "type": "invalid_request_error", "code": None, "param": "response_format"}
        return status, {}, {"error": error}

    def _as_a_grammar_would(self, body: dict[str, Any], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What a grammar built from the request's schema lets a small model write (`ignores_ranges`, `one_entry`)."""
        fmt = body.get("response_format")
        schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        text = json.dumps(schema or {})
        if self.ignores_ranges and '"enum": [0, 1, 2' not in text:
            entries = [{**e, **dict.fromkeys(SUB_SCORE_NAMES, 12)} for e in entries]  # nothing bounds the scores
        longest = re.search(r'"reason": \{"type": "string", "maxLength": (\d+)\}', text)
        if longest:  # a strict server (and a grammar) ends the reason at the schema's maxLength
            entries = [{**e, "reason": str(e.get("reason", ""))[: int(longest.group(1))]} for e in entries]
        keyed = any("properties" in n for n in _per_type(schema).values())
        if self.one_entry and not keyed:
            entries = entries[:1]  # no required property per term: nothing forces one entry per term
        return entries

    def _completion(
        self, body: dict[str, Any], content: str | None, refusal: str | None, finish: str
    ) -> dict[str, Any]:
        messages = body.get("messages", [])
        system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
        # Counted as tagger's estimate counts (worker.prompts.estimate_tokens); a strict schema is billed as input
        # and cached with the system message, as OpenAI's prompt caching guide says.
        fmt = body.get("response_format")
        strict = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
        head = system + (json.dumps(strict) if strict else "")
        rest = [str(m.get("content", "")) for m in messages if m.get("role") != "system"]
        head_tokens = estimate_tokens(head)
        prompt_tokens = head_tokens + sum(estimate_tokens(t) for t in rest)
        prefix = hashlib.sha256(head.encode()).hexdigest()
        with self._lock:
            # OpenAI caches a repeated prefix from 1,024 tokens, in steps of 128.
            cached = head_tokens // 128 * 128 if prefix in self._seen_prefixes and head_tokens >= 1024 else 0
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
                "completion_tokens": estimate_tokens(content or ""),
                "total_tokens": prompt_tokens + estimate_tokens(content or ""),
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

    def do_GET(self) -> None:
        self._send(*self.fake.batch_api.route("GET", self.path, b"", ""))

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if "/files" in self.path or "/batches" in self.path:
            raw = self.rfile.read(length)
            self._send(*self.fake.batch_api.route("POST", self.path, raw, self.headers.get("content-type", "")))
            return
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

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


# The Batch API: /v1/files and /v1/batches, as OpenAI documents them.
BATCH_OUTCOMES = ("complete", "expire_half", "fail_validation", "never_finish")
_TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _error(status: int, message: str, code: str = "invalid_request_error") -> tuple[int, str, bytes]:
    body = {"error": {"message": message, "type": code, "code": code, "param": None}}
    return status, "application/json", json.dumps(body).encode()


def _json(payload: Any) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(payload).encode()


class FakeBatchAPI:
    """Files and batches held in memory; a batch is processed, through the chat fake, once its delay has passed.

    Knobs: `delay` (seconds before a batch finishes), `outcomes` (one per batch created, in order: complete,
    expire_half, fail_validation, never_finish) and `line_faults` (line index -> a chat fault from FAULTS for
    that line of the next batches, e.g. `server_error` for an erroring line, `refusal` or `schema_invalid` for a
    bad reply). `supported = False` answers 404 like servers without a Batch API.
    """

    def __init__(self, fake: FakeLLM) -> None:
        self.fake = fake
        self.delay = 0.0
        self.outcomes: deque[str] = deque()
        self.line_faults: dict[int, str] = {}
        self.supported = True
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()
        self._lock = threading.RLock()

    def script(self, *outcomes: str) -> None:
        """Outcomes for the next batches created, one each, in order."""
        unknown = set(outcomes) - set(BATCH_OUTCOMES)
        if unknown:
            raise ValueError(f"unknown batch outcomes: {unknown}")
        self.outcomes.extend(outcomes)

    def route(self, method: str, path: str, raw: bytes, content_type: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request under /v1/files or /v1/batches."""
        if not self.supported:
            return _error(404, f"Invalid URL ({method} {path.split('?')[0]})", "not_found")
        parts = [p for p in path.split("?")[0].split("/") if p and p != "v1"]
        with self._lock:
            self.counts[f"{method} {parts[0] if parts else ''}"] += 1
            if parts == ["files"] and method == "POST":
                return self._upload(raw, content_type)
            if len(parts) == 2 and parts[0] == "files" and method == "GET":
                known = self.files.get(parts[1])
                return _json(known) if known else _error(404, f"No such File object: {parts[1]}")
            if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and method == "GET":
                data = self.contents.get(parts[1])
                return (200, "application/octet-stream", data) if data is not None else _error(404, "no such file")
            if parts == ["batches"] and method == "POST":
                return self._create(json.loads(raw or b"{}"))
            if parts == ["batches"] and method == "GET":
                rows = [self._advance(b) for b in sorted(self.batches.values(), key=lambda b: -b["created_at"])]
                first, last = (rows[0]["id"], rows[-1]["id"]) if rows else (None, None)
                return _json({"object": "list", "data": rows, "first_id": first, "last_id": last, "has_more": False})
            if len(parts) >= 2 and parts[0] == "batches" and parts[1] in self.batches:
                batch = self.batches[parts[1]]
                if len(parts) == 3 and parts[2] == "cancel" and method == "POST":
                    self._advance(batch)
                    if batch["status"] not in _TERMINAL:
                        batch.update(status="cancelled", cancelling_at=int(time.time()), cancelled_at=int(time.time()))
                        self._finish(batch, done=0, reason="batch_cancelled")
                    return _json(batch)
                if len(parts) == 2 and method == "GET":
                    return _json(self._advance(batch))
            return _error(404, f"Invalid URL ({method} {path})", "not_found")

    def _store(self, data: bytes, filename: str, purpose: str) -> str:
        file_id = f"file-fake{len(self.files) + 1:05d}"
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.contents[file_id] = data
        return file_id

    def _upload(self, raw: bytes, content_type: str) -> tuple[int, str, bytes]:
        from email.parser import BytesParser
        from email.policy import HTTP

        message = BytesParser(policy=HTTP).parsebytes(f"content-type: {content_type}\r\n\r\n".encode() + raw)
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            fields[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
        if "file" not in fields:
            return _error(400, "'file' is a required property")
        purpose = fields.get("purpose", (None, b""))[1].decode()
        return _json(self.files[self._store(fields["file"][1], fields["file"][0] or "upload", purpose)])

    def _create(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        file_id = str(body.get("input_file_id"))
        if file_id not in self.files:
            return _error(400, f"No such File object: {file_id}")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        now = int(time.time())
        batch_id = f"batch_fake{len(self.batches) + 1:05d}"
        self.batches[batch_id] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
            "_outcome": self.outcomes.popleft() if self.outcomes else "complete",
            "_line_faults": dict(self.line_faults),
            "_started": time.monotonic(),
        }
        return _json(self._public(self.batches[batch_id]))

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _lines(self, batch: dict[str, Any]) -> list[dict[str, Any]] | str:
        """The input file's requests, or why the file fails validation."""
        lines = []
        seen: set[str] = set()
        for number, line in enumerate(self.contents[batch["input_file_id"]].decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError:
                return f"line {number}: not valid JSON"
            custom_id = request.get("custom_id")
            if not custom_id or custom_id in seen:
                return f"line {number}: custom_id missing or repeated"
            if request.get("method") != "POST" or request.get("url") != batch["endpoint"]:
                return f"line {number}: method must be POST and url {batch['endpoint']}"
            seen.add(custom_id)
            lines.append(request)
        return lines or "the input file holds no requests"

    def _advance(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch on as time passes: validating -> in_progress -> (after `delay`) its outcome."""
        if batch["status"] in _TERMINAL:
            return self._public(batch)
        lines = self._lines(batch)
        if isinstance(lines, str) or batch["_outcome"] == "fail_validation":
            why = lines if isinstance(lines, str) else "line 1: the model of the request is not available for Batch"
            line = int(why.split(":")[0].split()[-1]) if why.startswith("line ") else None
            batch.update(
                status="failed",
                failed_at=int(time.time()),
                errors={"object": "list", "data": [{"code": "invalid_request", "message": why, "line": line}]},
            )
            return self._public(batch)
        batch["request_counts"]["total"] = len(lines)
        if batch["status"] == "validating":
            batch.update(status="in_progress", in_progress_at=int(time.time()))
        if batch["_outcome"] == "never_finish" or time.monotonic() - batch["_started"] < self.delay:
            return self._public(batch)
        if batch["_outcome"] == "expire_half":
            batch.update(status="expired", expired_at=int(time.time()))
            self._finish(batch, done=len(lines) // 2, reason="batch_expired", lines=lines)
        else:
            batch.update(status="completed", finalizing_at=int(time.time()), completed_at=int(time.time()))
            self._finish(batch, done=len(lines), reason="", lines=lines)
        return self._public(batch)

    def _finish(self, batch: dict[str, Any], done: int, reason: str, lines: list[dict[str, Any]] | None = None) -> None:
        """Answer the first `done` lines through the chat fake; the rest end with `reason` in the error file."""
        if lines is None:
            parsed = self._lines(batch)
            lines = parsed if isinstance(parsed, list) else []
        out: list[str] = []
        errors: list[str] = []
        completed = failed = 0
        for index, request in enumerate(lines):
            line_id = f"batch_req_{batch['id']}_{index}"
            if index >= done:
                message = {"batch_expired": "This request could not be executed before the completion window expired."}
                error = {"code": reason, "message": message.get(reason, "The batch was cancelled.")}
                errors.append(
                    json.dumps({"id": line_id, "custom_id": request["custom_id"], "response": None, "error": error})
                )
                failed += 1
                continue
            fault = batch["_line_faults"].get(index)
            if fault:
                with self.fake._lock:
                    self.fake.script.appendleft(fault)  # the very next chat answer is this line's
            self.counts["lines"] += 1
            status, _, body = self.fake.respond(request.get("body") or {})
            response = {"status_code": status, "request_id": f"req_{line_id}", "body": body}
            row = json.dumps({"id": line_id, "custom_id": request["custom_id"], "response": response, "error": None})
            if status == 200:
                out.append(row)
                completed += 1
            else:
                errors.append(row)
                failed += 1
        if out:
            batch["output_file_id"] = self._store(
                ("\n".join(out) + "\n").encode(), "batch_output.jsonl", "batch_output"
            )
        if errors:
            batch["error_file_id"] = self._store(
                ("\n".join(errors) + "\n").encode(), "batch_errors.jsonl", "batch_output"
            )
        batch["request_counts"].update(total=len(lines), completed=completed, failed=failed)
