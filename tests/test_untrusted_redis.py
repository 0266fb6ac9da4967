"""Redis is not trusted: every key tagger reads back in remote mode is tampered with, one kind at a time.

An attacker with Redis access (a shared instance, a compromised CI job, a bug in another service) rewrites job
results, published taxonomy versions, job payloads, the judgements kept between a job's attempts, the Batch API
state, the structured-output mode remembered per endpoint, or the producer's apply state file. Whatever they write, through the real CLI, real RQ workers and real
Redis: no post changes outside the keys tagger owns, no post gains a term outside the local taxonomy or loses a
term people set, nothing outside the content root is touched, `apply` never shows a traceback (a result that
fails its checks is that job's `bad_result`), and with TAGGER_SIGNING_KEY set (unknown to the attacker) every
post ends exactly as without the attack, or as it was.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from tests.commands import tagger
from tests.conftest import SESSION_PATTERNS
from tests.fakellm import FakeLLM
from tests.owned_bytes import assert_only_owned_changed
from tests.redis_scan import scan_for_secrets
from worker.posts import file_hash, normal_form, post_from_bytes, read_post, render_changes
from worker.records import Record, dumps
from worker.taxonomy import load_taxonomy

pytestmark = [pytest.mark.redis, pytest.mark.slow]  # they start tagger and worker processes
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
SIGNING_KEY = "s21-test-signing-key-0123456789abcdef"
EVIL = "PWNED by tampered result"
# Terms of the attacker's own, of reserved types and of a real type, scored 100 by the (fake) model.
EVIL_TERMS = {"title": EVIL, "draft": "true", "ClassificationContentOrigin": "Human", "tags": "Not A Real Term"}
TYPES = ("tags", "categories", "concepts")


@dataclass
class Pipeline:
    """A producer's checkout (a git repository), a remote worker with no files, and the Redis they share."""

    env: dict[str, str]
    worker_env: dict[str, str]
    worker_folder: Path
    checkout: Path
    outside: Path  # a post-like file beside the content root: nothing may ever touch it
    redis: redis_lib.Redis
    taxonomy_dir: Path
    jobs: dict[str, str] = field(default_factory=dict)  # post -> job id
    runs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.env["TAGGER_REDIS_PREFIX"]

    def posts(self) -> dict[str, str]:
        return {p.relative_to(self.checkout).as_posix(): p.read_text("utf-8") for p in self.checkout.rglob("*.md")}

    def enqueue(self) -> None:
        run = tagger(self.env, "enqueue", "--remote", *sorted(self.posts()), cwd=self.checkout)
        self.runs.append(run)
        assert run.returncode == 0, run.stdout + run.stderr
        for line in run.stdout.splitlines():
            job_id, action, post = line.split()[:3]
            assert action == "enqueued", line
            self.jobs[post] = job_id

    def work(self) -> subprocess.CompletedProcess[str]:
        run = tagger(self.worker_env, "work", "--burst", cwd=self.worker_folder)
        self.runs.append(run)
        assert list(self.worker_folder.iterdir()) == [], "a remote worker wrote into its working folder"
        return run

    def apply(self, *args: str) -> subprocess.CompletedProcess[str]:
        run = tagger(self.env, "apply", "--commit", *args, cwd=self.checkout)
        self.runs.append(run)
        return run

    # What the attacker reads and writes: RQ's job hash and result stream, and tagger's own keys.
    def job_key(self, job_id: str) -> str:
        return f"{os.environ['RQ_KEY_PREFIX']}:job:{job_id}"

    def payload(self, job_id: str) -> dict[str, Any]:
        data = json.loads(zlib.decompress(self.redis.hget(self.job_key(job_id), "data") or b""))
        payload: dict[str, Any] = data[2][0]
        return payload

    def set_args(self, job_id: str, args: list[Any]) -> None:
        data = json.loads(zlib.decompress(self.redis.hget(self.job_key(job_id), "data") or b""))
        data[2] = args
        self.redis.hset(self.job_key(job_id), "data", zlib.compress(json.dumps(data).encode()))

    def set_payload(self, job_id: str, payload: dict[str, Any]) -> None:
        self.set_args(job_id, [payload])

    def result(self, job_id: str) -> Any:
        return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer).return_value(refresh=True)

    def set_result(self, job_id: str, value: Any) -> None:
        job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        Result.create(job, Result.Type.SUCCESSFUL, ttl=600, return_value=value)

    def taxonomy_keys(self) -> list[bytes]:
        return list(self.redis.scan_iter(f"{self.prefix}:taxonomy:*"))


def _git(checkout: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=checkout, capture_output=True, text=True, check=True).stdout


def _make_site(site: Path, checkout: Path) -> None:
    """The demo posts, plus copies of the YAML and TOML posts (each its own job) carrying the people's tags."""
    shutil.copytree(site / "site", checkout)
    wip = (checkout / "posts" / "limiting-wip.md").read_text("utf-8")
    toml = (checkout / "posts" / "shipping-daily.md").read_text("utf-8")
    for n in range(1, 5):
        (checkout / "posts" / f"wip-{n}.md").write_text(wip + f"\nCopy {n} of the post.\n", "utf-8")
    (checkout / "posts" / "toml-1.md").write_text(toml + "\nA copy of the post.\n", "utf-8")
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "-qm", "base")


@pytest.fixture(params=["unsigned", "signed"])
def pipeline(
    request: pytest.FixtureRequest,
    queue_env: dict[str, str],
    site: Path,
    tmp_path: Path,
    redis: redis_lib.Redis,
    fake_llm: FakeLLM,
) -> Pipeline:
    checkout = tmp_path / "checkout"
    _make_site(site, checkout)
    outside = tmp_path / "outside.md"
    outside.write_text((checkout / "posts" / "limiting-wip.md").read_text("utf-8"), "utf-8")
    env = {
        **queue_env,
        "TAGGER_CONTENT_DIR": str(checkout),
        "TAGGER_STATE_FILE": str(tmp_path / "state" / "last.json"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
    }
    if request.param == "signed":
        env["TAGGER_SIGNING_KEY"] = SIGNING_KEY
    folder = tmp_path / "worker-machine"
    folder.mkdir()
    worker_env = {k: v for k, v in env.items() if k not in ("TAGGER_CONTENT_DIR", "TAGGER_TAXONOMY_DIR")}
    worker_env.pop("TAGGER_STATE_FILE")
    worker_env["TAGGER_JOB_MODE"] = "remote"
    # The model would pick the attacker's terms if it were ever asked about them.
    fake_llm.score({title: 100 for title in EVIL_TERMS.values()})
    return Pipeline(env, worker_env, folder, checkout, outside, redis, Path(queue_env["TAGGER_TAXONOMY_DIR"]))


def honest(pipeline: Pipeline, tmp_path: Path) -> dict[str, str]:
    """Each post as an untampered run leaves it (shared-folder `classify` on a copy: the same front matter)."""
    copy = tmp_path / "honest"
    shutil.copytree(pipeline.checkout, copy, ignore=shutil.ignore_patterns(".git"))
    env = {**pipeline.env, "TAGGER_CONTENT_DIR": str(copy)}
    run = tagger(env, "classify", *sorted(pipeline.posts()), cwd=copy)
    assert run.returncode == 0, run.stdout + run.stderr
    return {p.relative_to(copy).as_posix(): p.read_text("utf-8") for p in copy.rglob("*.md")}


def check(pipeline: Pipeline, before: dict[str, str], honest_posts: dict[str, str]) -> None:
    """The promises that hold whatever was tampered with."""
    for run in pipeline.runs:  # a worker's log keeps a failed job's traceback for on-call; a command shows none
        if "work" not in run.args[:4]:  # `python -m worker work` (a process); other commands ran as `tagger ...`
            assert "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr
    assert pipeline.outside.read_text("utf-8") == before["posts/limiting-wip.md"], "a file outside the root changed"
    known = {t: {normal_form(term.title) for term in load_taxonomy(pipeline.taxonomy_dir).of_type(t)} for t in TYPES}
    after = pipeline.posts()
    assert set(after) == set(before), "posts appeared or vanished"
    for name, text in after.items():
        assert_only_owned_changed(before[name], text)
        old, new = post_from_bytes(Path(name), before[name].encode()), read_post(pipeline.checkout / name)
        for term_type in TYPES:
            people = {normal_form(t) for t in old.terms(term_type)}
            now = {normal_form(t) for t in new.terms(term_type)}
            assert people <= now, f"{name}: the people's {term_type} were removed: {people - now}"
            assert now <= people | known[term_type], (
                f"{name}: {term_type} outside the taxonomy: {now - known[term_type]}"
            )
        assert str(new.meta.get("ClassificationContentOrigin", "")) in ("", "AI", "Human")
        assert old.human_only == new.human_only, f"{name}: its origin changed"
        if "TAGGER_SIGNING_KEY" in pipeline.env:
            assert text in (before[name], honest_posts[name]), f"{name} changed under a signing key"
    if "TAGGER_SIGNING_KEY" in pipeline.env:  # the key signs what Redis holds; Redis never holds the key
        assert scan_for_secrets(pipeline.redis, SESSION_PATTERNS, [SIGNING_KEY]) == []
    # Only posts and their records were committed, all inside the checkout.
    committed = _git(pipeline.checkout, "log", "--format=", "--name-only").split()
    for path in committed:
        assert path.endswith(".md") or path.endswith(".tagger.json"), path
        assert (pipeline.checkout / path).resolve().is_relative_to(pipeline.checkout.resolve())


def applied_lines(run: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """post -> the line `apply` printed for its job (stdout and stderr)."""
    lines = {}
    for line in (run.stdout + run.stderr).splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].startswith("post-"):
            lines[parts[2]] = line
    return lines


# --- results -----------------------------------------------------------------------------------------------


def _rendered_hash(checkout: Path, post: str, changes: dict[str, Any]) -> str:
    """What an attacker who can render front matter puts as `new_file_hash`, so the result looks consistent."""
    return file_hash(render_changes(read_post(checkout / post), changes).encode("utf-8"))


def test_tampered_results_never_write_foreign_keys_or_unknown_terms(pipeline: Pipeline, tmp_path: Path) -> None:
    before, honest_posts = pipeline.posts(), honest(pipeline, tmp_path)
    pipeline.enqueue()
    pipeline.work()
    jobs = pipeline.jobs
    real = {post: pipeline.result(job) for post, job in jobs.items()}
    assert all(isinstance(v, dict) for v in real.values())

    def tampered(name: str, /, **update: Any) -> dict[str, Any]:
        return {**real[name], **update}

    # Foreign keys, an unknown term, the people's tag replaced: consistent hashes, as a careful attacker makes it.
    foreign = {"title": EVIL, "draft": "true", "tags": ["Not A Real Term"]}
    p = "posts/wip-1.md"
    pipeline.set_result(
        jobs[p], tampered(p, changes=foreign, new_file_hash=_rendered_hash(pipeline.checkout, p, foreign))
    )
    # The new record claims an unknown term and a reserved type, with judgements to match.
    p = "posts/wip-2.md"
    record = Record.model_validate_json(json.dumps(json.loads(real[p]["record"]) | {"judgements": []}))
    forged = record.model_copy(update={"assigned": {"tags": ["Not A Real Term"], "title": [EVIL]}})
    pipeline.set_result(jobs[p], tampered(p, record=dumps(forged).decode(), added={"tags": ["Not A Real Term"]}))
    # Structural damage: an extra field, a wrong type, a broken record, not an object at all.
    pipeline.set_result(jobs["posts/wip-3.md"], tampered("posts/wip-3.md", evil=1))
    pipeline.set_result(jobs["posts/wip-4.md"], tampered("posts/wip-4.md", changes="tags: [x]", calls="many"))
    pipeline.set_result(jobs["posts/toml-1.md"], tampered("posts/toml-1.md", record="{not json"))
    pipeline.set_result(jobs["posts/backlog-by-value.md"], ["not", "an", "outcome"])
    # One job's result names another post (with that post's true hashes), one a path outside the root.
    other = "posts/shipping-daily.md"
    bait = tampered("posts/limiting-wip.md", post=other, file_hash=real[other]["file_hash"])
    bait["content_hash"] = real[other]["content_hash"]
    pipeline.set_result(jobs["posts/limiting-wip.md"], bait)
    pipeline.set_result(jobs[other], tampered(other, post="../outside.md"))

    run = pipeline.apply()
    lines = applied_lines(run)
    check(pipeline, before, honest_posts)
    # Every structurally damaged result is its job's failure, with a reason; the others were still applied.
    for post in ("posts/wip-3.md", "posts/wip-4.md", "posts/toml-1.md", "posts/backlog-by-value.md"):
        assert "bad_result" in lines[post], lines.get(post, run.stdout + run.stderr)
    for post in ("posts/limiting-wip.md", "posts/shipping-daily.md"):
        assert "failed" in lines[post] and ("bad_result" in lines[post] or "outside_root" in lines[post]), lines[post]
    assert run.returncode == 1, run.stdout + run.stderr
    # Forged claims (a foreign key, an unknown term) are bad results too, and nothing of them is written.
    for post in ("posts/wip-1.md", "posts/wip-2.md"):
        assert "bad_result" in lines[post], lines[post]
        assert pipeline.posts()[post] == before[post]
    if "TAGGER_SIGNING_KEY" in pipeline.env:  # refused before anything else is looked at
        objects = [p for p in pipeline.jobs if p != "posts/backlog-by-value.md"]  # that one is not even an object
        assert all("badly signed" in lines[p] for p in objects), run.stdout + run.stderr
    # Each bad result is a failed job on-call sees and can run again (`failed retry`), which then applies.
    failed = tagger(pipeline.env, "failed", "list", cwd=pipeline.checkout)
    assert failed.stdout.count("bad_result") == len(pipeline.jobs), failed.stdout + failed.stderr
    retried = tagger(pipeline.env, "failed", "retry", "--all", "--error", "bad_result", cwd=pipeline.checkout)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    pipeline.work()
    again = pipeline.apply()
    assert again.returncode == 0, again.stdout + again.stderr
    check(pipeline, before, honest_posts)
    assert pipeline.posts() == honest_posts


# --- published taxonomy versions ----------------------------------------------------------------------------


def _evil_document(document: dict[str, Any]) -> dict[str, Any]:
    """The published document with the attacker's terms added: reserved types and an unknown tag."""
    template = document["terms"][0]
    extra = [
        {**template, "title": title, "type": term_type, "slug": f"evil-{n}", "path": f"evil/{n}.md"}
        for n, (term_type, title) in enumerate(EVIL_TERMS.items())
    ]
    return {**document, "terms": [*document["terms"], *extra]}


def test_a_tampered_taxonomy_version_is_refused_and_a_forged_one_adds_no_term(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    from worker.queue.payload import version_of

    before, honest_posts = pipeline.posts(), honest(pipeline, tmp_path)
    pipeline.enqueue()
    (key,) = pipeline.taxonomy_keys()
    document = json.loads(pipeline.redis.get(key) or b"")
    signature = document.pop("signature", None)
    evil = _evil_document(document)
    # 1. The published version overwritten in place (its name no longer matches its content).
    pipeline.redis.set(key, json.dumps(evil if signature is None else {**evil, "signature": signature}))
    # 2. A self-consistent version of the attacker's, and one job pointed at it.
    version = version_of(evil)
    pipeline.redis.set(f"{pipeline.prefix}:taxonomy:{version}", json.dumps(evil), ex=600)
    target = pipeline.jobs["posts/wip-1.md"]
    pipeline.set_payload(target, {**pipeline.payload(target), "taxonomy": version})
    worked = pipeline.work()
    assert "taxonomy_tampered" in worked.stderr, worked.stderr[-3000:]
    run = pipeline.apply()
    lines = applied_lines(run)
    check(pipeline, before, honest_posts)
    others = [p for p in pipeline.jobs if p != "posts/wip-1.md"]
    assert all("taxonomy_tampered" in lines[p] for p in others), run.stdout + run.stderr
    # `publish` puts the true content back under its name and says so.
    published = tagger(pipeline.env, "taxonomy", "publish", cwd=pipeline.checkout)
    assert published.returncode == 0, published.stderr
    assert "overwr" in published.stderr, published.stderr
    restored = json.loads(pipeline.redis.get(key) or b"")
    restored.pop("signature", None)
    assert restored == document


# --- job payloads -------------------------------------------------------------------------------------------


def test_tampered_job_payloads_never_write_foreign_keys_or_unknown_terms(pipeline: Pipeline, tmp_path: Path) -> None:
    before, honest_posts = pipeline.posts(), honest(pipeline, tmp_path)
    pipeline.enqueue()
    jobs = pipeline.jobs
    # Other bytes (a title rewritten), with hashes to match.
    p = "posts/wip-1.md"
    payload = pipeline.payload(jobs[p])
    raw = before[p].replace("Why limiting work", EVIL).encode()
    post = post_from_bytes(Path(p), raw)
    payload |= {"bytes": base64.b64encode(raw).decode(), "file_hash": post.file_hash, "content_hash": post.content_hash}
    pipeline.set_payload(jobs[p], payload)
    # A record whose cached judgements pick an unknown tag and reserved types at 100.
    p = "posts/wip-2.md"
    payload = pipeline.payload(jobs[p])
    record = json.loads(payload["record"])
    record["assigned"] = {"tags": ["Not A Real Term"]}
    record["added_keys"] = ["title"]
    payload["record"] = json.dumps(record)
    payload["types"] = ["title", "draft", "tags"]
    pipeline.set_payload(jobs[p], payload)
    # A path out of the root; a payload with fields missing; arguments that are no payload at all.
    p = "posts/wip-3.md"
    pipeline.set_payload(jobs[p], {**pipeline.payload(jobs[p]), "post": "../outside.md"})
    p = "posts/wip-4.md"
    pipeline.set_payload(jobs[p], {"post": p, "taxonomy": pipeline.payload(jobs[p])["taxonomy"]})
    pipeline.set_args(jobs["posts/toml-1.md"], ["not a payload", 3])
    pipeline.work()
    run = pipeline.apply()
    check(pipeline, before, honest_posts)
    lines = applied_lines(run)
    for post in ("posts/wip-3.md", "posts/wip-4.md", "posts/toml-1.md"):
        assert "failed" in lines[post] or "re-enqueued" in lines[post], lines.get(post, run.stdout + run.stderr)
    assert "re-enqueued" in lines["posts/wip-1.md"] or "failed" in lines["posts/wip-1.md"]
    assert pipeline.posts()["posts/limiting-wip.md"] == honest_posts["posts/limiting-wip.md"]  # untouched jobs
    if "TAGGER_SIGNING_KEY" in pipeline.env:  # the worker refused every altered payload before running it
        for post in ("posts/wip-1.md", "posts/wip-2.md", "posts/wip-3.md", "posts/wip-4.md"):
            assert "failed" in lines[post] and "bad_signature" in lines[post], lines[post]


# --- judgements kept between a job's attempts ---------------------------------------------------------------


def test_tampered_kept_judgements_never_pick_foreign_or_unknown_terms(pipeline: Pipeline, tmp_path: Path) -> None:
    from worker.prompts import load_templates, prompt_version

    before, honest_posts = pipeline.posts(), honest(pipeline, tmp_path)
    pipeline.enqueue()
    # A careful attacker plants judgements a worker would reuse as its own (the right cache key): the attacker's
    # terms, and a real tag no honest run gives these posts, all at 100.
    version = prompt_version(load_templates(None))
    debt = next(t for t in load_taxonomy(pipeline.taxonomy_dir).of_type("tags") if t.title == "Technical Debt")
    planted_terms = [*EVIL_TERMS.items(), ("tags", debt.title)]
    for job_id in pipeline.jobs.values():
        template = {
            "scores": {k: 10 for k in ("mentions", "alignment", "depth", "intent", "audience", "signal")},
            "confidence": 100.0,
            "level": "Primary",
            "reason": "planted",
            "definition_hash": debt.definition_hash,
            "content_hash": pipeline.payload(job_id)["content_hash"],
            "prompt_version": version,
            "model": "fake-model",
            "provider": "openai",
            "judged_at": "2026-01-01T00:00:00+00:00",
        }
        planted = {f"{t}\0{term}": json.dumps({**template, "type": t, "term": term}) for t, term in planted_terms}
        planted["tags\0broken"] = "{not json"
        pipeline.redis.hset(f"{pipeline.prefix}:judged:{job_id}", mapping=planted)
        pipeline.redis.expire(f"{pipeline.prefix}:judged:{job_id}", 600)
    pipeline.work()
    run = pipeline.apply()
    check(pipeline, before, honest_posts)  # signed: every post as honest (the planted judgements were not used)
    assert run.returncode == 0, run.stdout + run.stderr
    tagged = [
        p for p, text in pipeline.posts().items() if "Technical Debt" in read_post(pipeline.checkout / p).terms("tags")
    ]
    if "TAGGER_SIGNING_KEY" not in pipeline.env:  # the attack does work without the key, within the taxonomy
        assert tagged, "the planted judgements were never used: this test would not see signing fail"
    else:
        assert not tagged


# --- the structured-output mode remembered per endpoint -----------------------------------------------------


def test_a_planted_structured_mode_never_writes_foreign_keys_and_is_ignored_under_the_key(
    pipeline: Pipeline, tmp_path: Path, fake_llm: FakeLLM
) -> None:
    from worker.providers.modes import endpoint_of
    from worker.queue.modes import RedisModeMemory
    from worker.settings import Settings

    before, honest_posts = pipeline.posts(), honest(pipeline, tmp_path)
    pipeline.enqueue()
    # The attacker writes just what tagger writes, lacking only the key: the weakest mode, whose replies no
    # server holds to the schema, for the fleet's endpoint.
    env = pipeline.worker_env
    seen_as = Settings(
        _env_file=None,  # type: ignore[call-arg]
        OPENAI_BASE_URL=env["OPENAI_BASE_URL"],
        TAGGER_MODEL=env["TAGGER_MODEL"],
        TAGGER_REDIS_PREFIX=pipeline.prefix,
    )
    RedisModeMemory(seen_as, pipeline.redis).remember(endpoint_of(seen_as), "prompt")
    fake_llm.requests.clear()
    worked = pipeline.work()
    run = pipeline.apply()
    check(pipeline, before, honest_posts)
    assert run.returncode == 0, run.stdout + run.stderr
    formats = {(r.get("response_format") or {}).get("type") for r in fake_llm.requests}
    if "TAGGER_SIGNING_KEY" not in pipeline.env:  # the attack does work without the key: the mode it names
        assert formats == {None}, formats
    else:  # ignored, said once, and the server asked in the strict mode again (this one accepts it)
        assert formats == {"json_schema"}, formats
        assert worked.stderr.count("structured_mode_ignored") == 1, worked.stderr[-3000:]
        assert pipeline.posts() == honest_posts


# --- the apply state file -----------------------------------------------------------------------------------


def test_a_tampered_apply_state_file_writes_and_commits_nothing_foreign(pipeline: Pipeline, tmp_path: Path) -> None:
    before, honest_posts = pipeline.posts(), honest(pipeline, tmp_path)
    pipeline.enqueue()
    pipeline.work()
    state = Path(pipeline.env["TAGGER_STATE_FILE"])
    data = json.loads(state.read_text("utf-8"))
    data["jobs"] |= {"post-0000": "../outside.md", "../../etc/passwd": "x", "": "", "post-x\nrm": 3}
    for name in ("written", "uncommitted", "to_commit"):
        data[name] = ["../outside.md", "/etc/hostname", str(pipeline.outside), ".git/config", "posts/wip-1.md"]
    state.write_text(json.dumps(data), "utf-8")
    run = pipeline.apply()
    check(pipeline, before, honest_posts)
    assert run.returncode == 1, run.stdout + run.stderr  # the made-up jobs are missing
    assert pipeline.posts()["posts/wip-1.md"] == honest_posts["posts/wip-1.md"]
    assert _git(pipeline.checkout, "status", "--porcelain").strip() == ""
    # A state file that is not JSON at all: one line, no traceback.
    state.write_text("{broken", "utf-8")
    broken = pipeline.apply()
    assert "Traceback" not in broken.stderr and broken.returncode == 1, broken.stderr


# --- Batch API state ----------------------------------------------------------------------------------------


def test_tampered_batch_state_touches_nothing_outside_the_root_and_loses_no_post(
    pipeline: Pipeline, tmp_path: Path, fake_llm: FakeLLM
) -> None:
    before, honest_posts = pipeline.posts(), honest(pipeline, tmp_path)
    env = {**pipeline.env, "TAGGER_BATCH_POLL": "0.2"}
    submitted = tagger(env, "backfill", str(pipeline.checkout), "--batch", cwd=pipeline.checkout)
    pipeline.runs.append(submitted)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    (index,) = [k.decode() for k in pipeline.redis.scan_iter(f"{pipeline.prefix}:batches:*")]
    site = index.rsplit(":", 1)[1]
    (batch_id,) = [b.decode() for b in pipeline.redis.zrange(index, 0, -1)]
    key = f"{pipeline.prefix}:batch:{site}:{batch_id}:state"
    state = json.loads(pipeline.redis.get(key) or b"")
    entries = list(state["posts"].values())
    entries[0]["path"] = "../outside.md"  # a post out of the root
    # Another post marked settled although nothing was written.
    settled = next(k for k, e in state["posts"].items() if e["path"] == "posts/wip-2.md")
    pipeline.redis.hset(f"{pipeline.prefix}:batch:{site}:{batch_id}:collected", settled, "written")
    pipeline.redis.set(key, json.dumps(state), keepttl=True)
    collected = tagger(env, "batch", "collect", cwd=pipeline.checkout)
    pipeline.runs.append(collected)
    check(pipeline, before, honest_posts)
    if "TAGGER_SIGNING_KEY" in pipeline.env:  # the altered state is refused as a whole: nothing collected from it
        assert "batch_state_refused" in collected.stderr and pipeline.posts() == before, collected.stderr
    else:  # "settled" is checked against the file: the post marked written without being written is collected
        assert pipeline.posts()["posts/wip-2.md"] == honest_posts["posts/wip-2.md"], collected.stdout
        assert "outside_root" in collected.stderr, collected.stderr
    # Nothing is lost: a second backfill (through the queue) tags whatever the tampered state held back.
    again = tagger(env, "backfill", str(pipeline.checkout), cwd=pipeline.checkout)
    pipeline.runs.append(again)
    worker = tagger(env, "work", "--burst", cwd=pipeline.checkout)
    pipeline.runs.append(worker)
    check(pipeline, before, honest_posts)
    after = pipeline.posts()
    assert after["posts/wip-2.md"] == honest_posts["posts/wip-2.md"], collected.stdout + collected.stderr


def test_a_result_claiming_a_persons_edit_as_its_own_write_does_not_hide_the_edit(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """A person edits a post after its job; the forged result says the edited bytes are what tagger wrote."""
    before, honest_posts = pipeline.posts(), honest(pipeline, tmp_path)
    pipeline.enqueue()
    pipeline.work()
    post = "posts/wip-1.md"
    edited = before[post] + "\nA paragraph a person wrote after the enqueue.\n"
    (pipeline.checkout / post).write_text(edited, "utf-8")
    before[post] = edited  # the person's edit is the baseline: it must stay
    job_id = pipeline.jobs[post]
    pipeline.set_result(job_id, {**pipeline.result(job_id), "new_file_hash": file_hash(edited.encode())})
    run = pipeline.apply()
    line = applied_lines(run)[post]
    assert "already-applied" not in line, line
    assert ("re-enqueued" in line) if "TAGGER_SIGNING_KEY" not in pipeline.env else ("bad_result" in line), line
    assert pipeline.posts()[post] == edited
    check(pipeline, before, {**honest_posts, post: edited})
