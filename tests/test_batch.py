"""Backfill through the Batch API: real SDK, the fake's /v1/files and /v1/batches, real Redis and RQ workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.commands import tagger
from tests.fakellm import FakeLLM, asked_names
from worker import batch_backfill as batch
from worker.backfill import estimate, plan, run_inline
from worker.paths import site_id
from worker.posts import read_post
from worker.queue.enqueue import job_id_for
from worker.records import load_record
from worker.settings import Settings

NO_REDIS = "redis://127.0.0.1:1/0"  # nothing listens there: an --inline run that touched Redis would fail


@pytest.fixture
def make_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Batch tests follow lines, one per chunk: one chunk per type (packing would make a post one line)."""
    return lambda **overrides: make_settings(**{"TAGGER_PACK_TYPES": False, **overrides})


@pytest.fixture
def queue_env(queue_env: dict[str, str]) -> dict[str, str]:
    """The queue environment, one chunk per type as above."""
    return {**queue_env, "TAGGER_PACK_TYPES": "false"}


def posts_of(site: Path) -> list[Path]:
    return sorted((site / "site").rglob("*.md"))


def snapshot(site: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in posts_of(site)}


def inodes(site: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in posts_of(site)}


def uploaded_bodies(fake: FakeLLM) -> list[dict[str, object]]:
    rows = []
    for file_id, meta in fake.batch_api.files.items():
        if meta["purpose"] == "batch":
            rows += [json.loads(line)["body"] for line in fake.batch_api.contents[file_id].splitlines()]
    return rows


def inline_store(settings: Settings) -> batch.BatchStore:
    return batch.store_for(settings, None)


def test_batch_lines_carry_the_synchronous_request_body(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings()
    todo = plan(settings).todo
    submitted = batch.submit(settings, todo, inline_store(settings))
    assert submitted.requests == 9 and len(submitted.batches) == 1
    lines = uploaded_bodies(fake_llm)
    run_inline(settings, todo)  # the synchronous path, through the real SDK, to the same fake
    sent = [r for r in fake_llm.requests if "messages" in r][-9:]
    canon = sorted(json.dumps(b, sort_keys=True) for b in lines)
    assert canon == sorted(json.dumps(b, sort_keys=True) for b in sent)
    assert all(b["response_format"]["json_schema"]["strict"] for b in lines)  # type: ignore[index]


@pytest.mark.parametrize(("definitions", "reply"), [("compact", "all"), ("full", "relevant")])
def test_batch_backfill_writes_what_a_synchronous_backfill_writes(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path, tmp_path: Path, definitions: str, reply: str
) -> None:
    shapes = {"TAGGER_DEFINITIONS": definitions, "TAGGER_REPLY": reply}
    twin = tmp_path / "twin"
    shutil.copytree(site / "site", twin)
    sync = make_settings(TAGGER_CONTENT_DIR=str(twin), **shapes)
    reference = run_inline(sync, plan(sync).todo)
    assert not reference.failed and reference.written == 2  # one demo post already lists what it gets
    settings = make_settings(**shapes)
    store = inline_store(settings)
    submitted = batch.submit(settings, plan(settings).todo, store)
    before = fake_llm.counts["requests"]
    result = batch.collect(settings, store)
    # collecting asks the model nothing: the only chat answers are the batch's own lines
    assert fake_llm.counts["requests"] - before == fake_llm.batch_api.counts["lines"] == 9
    assert len(result.written) == 2 and len(result.unchanged) == 1
    assert not result.enqueued and not result.inline and not result.failed
    assigned = 0
    for path in posts_of(site):
        assert path.read_bytes() == (twin / path.relative_to(site / "site")).read_bytes(), path.name
        mine = load_record(path)
        theirs = load_record(twin / path.relative_to(site / "site"))
        assert mine.assigned == theirs.assigned
        assigned += sum(len(v) for v in mine.assigned.values())
        assert [(j.term, j.confidence) for j in mine.judgements] == [(j.term, j.confidence) for j in theirs.judgements]
    assert assigned >= 2
    assert plan(settings).todo == []  # the records are the cache: nothing left to ask
    assert len(submitted.batches[0].posts) == 3


def test_a_second_submission_does_not_send_posts_already_in_a_batch(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings()
    store = inline_store(settings)
    fake_llm.batch_api.script("never_finish")
    assert len(batch.submit(settings, plan(settings).todo, store).batches) == 1
    edited = posts_of(site)[0]
    edited.write_bytes(edited.read_bytes() + b"\nEdited after submission.\n")
    second = batch.submit(settings, plan(settings).todo, store)
    assert len(second.in_flight) == 2 and second.requests == 3  # only the edited post goes again
    assert [len(b.posts) for b in second.batches] == [1]


def test_collect_twice_writes_each_post_once(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings()
    store = inline_store(settings)
    batch.submit(settings, plan(settings).todo, store)
    assert len(batch.collect(settings, store).written) == 2
    written = inodes(site)
    again = batch.collect(settings, store)
    assert not again.written and again.already == 3 and inodes(site) == written


def test_bad_lines_and_replies_are_never_written_and_go_to_the_synchronous_path(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings()
    store = inline_store(settings)
    # line 0: an erroring line (HTTP 500); line 4: a refusal; line 8: a schema-invalid reply
    fake_llm.batch_api.line_faults = {0: "server_error", 4: "refusal", 8: "schema_invalid"}
    submitted = batch.submit(settings, plan(settings).todo, store)
    order = list(submitted.batches[0].posts.values())
    original = snapshot(site)
    result = batch.collect(settings, store)
    reasons = dict(line.split(": ", 1) for line in result.inline)
    assert set(reasons) == {e.path for e in order}  # each of the three posts had one bad line
    assert "HTTP 500" in reasons[order[0].path]
    assert reasons[order[1].path].startswith("refused")
    assert reasons[order[2].path].startswith("invalid_reply")
    # without Redis they were classified in this process, through the synchronous path
    assert not result.failed and sum(snapshot(site)[n] != b for n, b in original.items()) == 2


def finished_output(fake: FakeLLM, batch_id: str) -> str:
    """The output file id of a batch the fake has finished (asked for as `batch status` would)."""
    _, _, body = fake.batch_api.route("GET", f"/v1/batches/{batch_id}", b"", "")
    return str(json.loads(body)["output_file_id"])


def test_odd_lines_in_the_providers_output_are_passed_over_and_an_answer_is_never_replaced_by_an_error(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    """The provider's files are untrusted input (found by a red-team review: one such line crashed every collect,
    and no post of the batch was ever collected)."""
    settings = make_settings()
    store = inline_store(settings)
    submitted = batch.submit(settings, plan(settings).todo, store)
    output = finished_output(fake_llm, submitted.batches[0].id)
    answered = json.loads(fake_llm.batch_api.contents[output].splitlines()[0])["custom_id"]
    fake_llm.batch_api.contents[output] += b"".join(
        json.dumps(line).encode() + b"\n"
        for line in (
            {"custom_id": "x", "response": "oops"},
            {"custom_id": "y", "response": {"status_code": 500, "body": "oops"}},
            {"custom_id": "z", "error": "boom"},
            {"custom_id": answered, "response": {"status_code": 500, "body": {"error": {"message": "late"}}}},
        )
    )
    original = snapshot(site)
    result = batch.collect(settings, store)
    assert not result.failed and not result.inline  # every post answered by its own lines, as without the odd ones
    assert len(result.written) == 2 and sum(snapshot(site)[n] != b for n, b in original.items()) == 2


def test_a_batch_id_the_provider_gives_again_is_not_settled_from_the_old_batch_s_log(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    """With the state in files (no Redis), a forgotten batch's lines of the collection log went with it only in
    Redis: a provider numbering its batches anew settled the new batch's post from the old log, its reply paid for
    and never used (found by a red-team review)."""
    settings = make_settings()
    store = inline_store(settings)
    fake_llm.batch_api.line_faults = {3: "server_error"}  # one line of the second post fails: it is run inline
    first = batch.submit(settings, plan(settings).todo, store)
    post = settings.content_root() / list(first.batches[0].posts.values())[1].path
    assert batch.collect(settings, store).inline
    post.write_bytes(post.read_bytes() + b"\nA new paragraph about flow and value.\n")  # due again
    fake_llm.batch_api.line_faults = {}
    fake_llm.batch_api.batches.clear()  # the provider numbers its batches from 1 again
    second = batch.submit(settings, [post], store)
    assert second.batches[0].id == first.batches[0].id
    again = batch.collect(settings, store)
    assert again.already == 0 and post not in plan(settings).todo  # collected from its own batch: settled


def queue_settings(make_settings: Callable[..., Settings], queue_env: dict[str, str]) -> Settings:
    """Settings for the fake server and the scratch site, on the queue test's Redis and key prefix."""
    return make_settings(REDIS_URL=queue_env["REDIS_URL"], TAGGER_REDIS_PREFIX=queue_env["TAGGER_REDIS_PREFIX"])


@pytest.mark.slow
def test_expired_half_done_batch_ends_with_every_post_written_after_collect_and_workers(
    make_settings: Callable[..., Settings],
    fake_llm: FakeLLM,
    site: Path,
    queue_env: dict[str, str],
    redis: redis_lib.Redis,
) -> None:
    settings = queue_settings(make_settings, queue_env)
    store = batch.store_for(settings, redis)
    fake_llm.batch_api.script("expire_half")
    batch.submit(settings, plan(settings).todo, store)
    result = batch.collect(settings, store, redis=redis)
    # 9 requests, 4 answered: the first post is settled, the second half answered, the third not at all
    assert len(result.written) + len(result.unchanged) == 1 and len(result.enqueued) == 2
    assert all("batch_expired" in line for line in result.enqueued)
    for line in result.enqueued:
        job = Job.fetch(job_id_for(line.split(":")[0], settings), connection=redis, serializer=JSONSerializer)
        assert job.get_status() == "queued"
    work = subprocess.run(
        [sys.executable, "-m", "worker", "work", "--burst"], env=queue_env, capture_output=True, text=True, timeout=120
    )
    assert work.returncode == 0, work.stderr
    assert plan(settings).todo == []
    assert sum(read_post(p).meta.get("ClassificationContentOrigin") == "AI" for p in posts_of(site)) >= 2


@pytest.mark.slow
def test_post_edited_between_submission_and_collection_is_enqueued_not_overwritten(
    make_settings: Callable[..., Settings],
    fake_llm: FakeLLM,
    site: Path,
    queue_env: dict[str, str],
    redis: redis_lib.Redis,
) -> None:
    settings = queue_settings(make_settings, queue_env)
    store = batch.store_for(settings, redis)
    batch.submit(settings, plan(settings).todo, store)
    edited = posts_of(site)[0]
    edited.write_bytes(edited.read_bytes() + b"\nA paragraph added after the batch was submitted.\n")
    text = edited.read_bytes()
    result = batch.collect(settings, store, redis=redis)
    assert edited.read_bytes() == text
    relative = edited.relative_to(site / "site").as_posix()
    assert result.enqueued == [f"{relative}: the post changed after it was submitted"]
    assert len(result.written) + len(result.unchanged) == 2
    job = Job.fetch(job_id_for(relative, settings), connection=redis, serializer=JSONSerializer)
    assert job.get_status() == "queued"
    work = subprocess.run(
        [sys.executable, "-m", "worker", "work", "--burst"], env=queue_env, capture_output=True, text=True, timeout=120
    )
    assert work.returncode == 0, work.stderr
    assert job.get_status() == "finished"  # the normal queue classified it, the edit kept
    assert b"A paragraph added after the batch was submitted." in edited.read_bytes()
    assert plan(settings).todo == []
    # the batch state lives in Redis under tagger's prefix, keyed to the site (this checkout)
    assert redis.exists(f"{settings.redis_prefix}:batches:{site_id(settings)}")
    assert batch.collect(settings, store, redis=redis).already == 3


CRASHING_COLLECT = textwrap.dedent(
    """
    import os, signal, sys
    import worker.writeback as writeback
    from worker import batch_backfill as batch
    from worker.settings import Settings

    kill_at, when = int(sys.argv[1]), sys.argv[2]
    real = writeback.replace_post
    count = 0

    def replace_post(post, staged):
        global count
        count += 1
        if count == kill_at and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)  # the record is announced, the post not yet replaced
        real(post, staged)
        if count == kill_at and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)  # the post is replaced, nothing logged as collected yet

    writeback.replace_post = replace_post
    settings = Settings()
    batch.collect(settings, batch.store_for(settings, None))
    """
)


@pytest.mark.redis
def test_a_post_moved_before_collect_is_reported_not_enqueued(
    make_settings: Callable[..., Settings],
    fake_llm: FakeLLM,
    site: Path,
    queue_env: dict[str, str],
    redis: redis_lib.Redis,
) -> None:
    """A post renamed between submission and collection cannot be enqueued: it is said so, never "enqueued"
    (found by a red-team review); the renamed file is a new post that the next backfill finds."""
    from rq import Queue

    from worker.queue import keys

    settings = queue_settings(make_settings, queue_env)
    store = batch.store_for(settings, redis)
    batch.submit(settings, plan(settings).todo, store)
    gone = site / "site" / "posts" / "limiting-wip.md"
    gone.rename(gone.with_name("limiting-wip-renamed.md"))
    result = batch.collect(settings, store, redis=redis)
    assert result.enqueued == [] and len(result.failed) == 1
    assert result.failed[0].startswith("posts/limiting-wip.md: ") and "not enqueued" in result.failed[0]
    assert Queue(keys.queue_name(settings, "low"), connection=redis, serializer=JSONSerializer).count == 0
    assert gone.with_name("limiting-wip-renamed.md") in plan(settings).todo


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "when"), [(1, "before"), (1, "after"), (2, "before"), (2, "after")])
def test_a_collect_killed_half_way_then_run_again_writes_each_post_once(
    make_settings: Callable[..., Settings],
    fake_llm: FakeLLM,
    site: Path,
    queue_env: dict[str, str],
    kill_at: int,
    when: str,
) -> None:
    settings = make_settings()
    store = inline_store(settings)
    batch.submit(settings, plan(settings).todo, store)
    original = inodes(site)
    env = {**queue_env, "REDIS_URL": NO_REDIS}
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_COLLECT, str(kill_at), when], env=env, capture_output=True, timeout=120
    )
    assert crashed.returncode == -9, crashed.stderr
    after_crash = inodes(site)
    written_before = {n for n in original if after_crash[n] != original[n]}
    assert len(written_before) == kill_at - (when == "before")
    before = fake_llm.counts["requests"]
    result = batch.collect(settings, store)
    assert fake_llm.counts["requests"] == before and not result.inline and not result.enqueued  # no call at all
    final = inodes(site)
    changed = {n for n in original if final[n] != original[n]}
    assert len(changed) == 2  # the two posts a synchronous backfill writes (see the test above)
    for name in written_before:
        assert final[name] == after_crash[name], f"{name} was written twice"
    assert sorted(result.written) == sorted(
        p.relative_to(site / "site").as_posix() for p in posts_of(site) if p.name in changed - written_before
    )
    assert plan(settings).todo == []


def test_inline_batch_backfill_with_no_redis_from_the_command_line(
    make_settings: Callable[..., Settings], site: Path, fake_llm: FakeLLM, queue_env: dict[str, str]
) -> None:
    env = {**queue_env, "REDIS_URL": NO_REDIS, "TAGGER_BATCH_POLL": "0.05"}
    fake_llm.batch_api.delay = 0.3
    run = tagger(env, "backfill", str(site / "site"), "--batch", "--inline", "--wait")
    assert run.returncode == 0, run.stderr
    assert "1 batches, 9 requests" in run.stdout and "at batch prices" in run.stdout
    assert "collect: 2 written, 1 unchanged" in run.stdout
    assert (site / "site" / batch.STATE_FILE).exists()
    status = tagger(env, "batch", "status", "--inline")
    assert status.returncode == 0, status.stderr
    assert "completed" in status.stdout and "batch_fake00001" in status.stdout
    assert plan(make_settings()).todo == []


def test_a_provider_without_a_batch_api_gets_one_line(site: Path, fake_llm: FakeLLM, queue_env: dict[str, str]) -> None:
    fake_llm.batch_api.supported = False
    env = {**queue_env, "REDIS_URL": NO_REDIS}
    run = tagger(env, "backfill", str(site / "site"), "--batch", "--inline")
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "batch_unsupported" in lines[0] and f"{fake_llm.base_url}/files" in lines[0]
    assert "sk-queue-secret" not in run.stderr


def test_the_offline_provider_has_no_batch_api(make_settings: Callable[..., Settings], site: Path) -> None:
    settings = make_settings(TAGGER_PROVIDER="offline")
    with pytest.raises(Exception, match="offline provider has no Batch API"):
        batch.submit(settings, plan(settings).todo, inline_store(settings))


def test_a_batch_whose_input_fails_validation_loses_nothing(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings()
    store = inline_store(settings)
    fake_llm.batch_api.script("fail_validation")
    batch.submit(settings, plan(settings).todo, store)
    result = batch.collect(settings, store)
    assert len(result.inline) == 3 and all("invalid_request" in line for line in result.inline)
    assert plan(settings).todo == []


def test_unfinished_batches_wait_cancelled_ones_are_rebatched(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings()
    store = inline_store(settings)
    fake_llm.batch_api.script("never_finish")
    first = batch.submit(settings, plan(settings).todo, store).batches[0]
    original = snapshot(site)
    pending = batch.collect(settings, store)
    assert pending.unfinished == [first.id] and snapshot(site) == original
    assert batch.cancel(settings, store) == [(first.id, "cancelled")]
    moved = batch.collect(settings, store, rebatch=True)
    assert len(moved.rebatched) == 3 and len(moved.new_batches) == 1
    assert snapshot(site) == original  # nothing written from a cancelled batch
    done = batch.collect(settings, store)
    assert len(done.written) == 2 and len(done.unchanged) == 1 and done.already == 3
    rows = batch.batch_rows(settings, store)
    assert [r.status for r in rows] == ["cancelled", "completed"] and [r.settled for r in rows] == [3, 3]


def test_a_collect_killed_after_its_rebatch_then_run_again_does_not_pay_twice(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between making the new batch and noting it, the next collect finds the posts in that batch and
    waits for it instead of sending them a third time."""
    settings = make_settings()
    store = inline_store(settings)
    fake_llm.batch_api.script("never_finish")
    batch.submit(settings, plan(settings).todo, store)
    batch.collect(settings, store)
    batch.cancel(settings, store)

    def killed(batch_id: str, outcomes: dict[str, str]) -> None:
        raise SystemExit("killed after the rebatch was made, before it was noted")

    monkeypatch.setattr(store, "mark", killed)
    with pytest.raises(SystemExit):
        batch.collect(settings, store, rebatch=True)
    monkeypatch.undo()
    assert len(store.all()) == 2  # the cancelled batch and its replacement
    again = batch.collect(settings, store, rebatch=True)
    assert len(again.rebatched) == 3 and again.new_batches == [] and len(store.all()) == 2  # not paid again
    assert len(again.written) == 2 and len(again.unchanged) == 1  # collected from the replacement, in this run


def test_requests_are_split_within_the_limits_keeping_each_post_whole(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings(TAGGER_BATCH_MAX_REQUESTS=4)
    submitted = batch.submit(settings, plan(settings).todo, inline_store(settings))
    assert [b.requests for b in submitted.batches] == [3, 3, 3]
    total = sum(b.bytes for b in submitted.batches)
    settings = make_settings(TAGGER_BATCH_MAX_BYTES=total - 1)
    submitted = batch.submit(settings, plan(settings).todo, inline_store(settings), again=True)
    assert sorted(len(b.posts) for b in submitted.batches) == [1, 2]
    assert all(b.bytes <= settings.batch_max_bytes for b in submitted.batches)
    tiny = make_settings(TAGGER_BATCH_MAX_REQUESTS=2)
    refused = batch.submit(tiny, plan(tiny).todo, inline_store(tiny), again=True)
    assert not refused.batches and len(refused.failed) == 3 and "batch_limit" in refused.failed[0]


def test_batch_prices_default_to_half_and_can_be_set(make_settings: Callable[..., Settings], site: Path) -> None:
    settings = make_settings(TAGGER_MODEL="gpt-4o-mini")
    todo = plan(settings).todo
    sync, half = estimate(settings, todo).cost, estimate(settings, todo, batch=True).cost
    assert sync and half and abs(half - sync / 2) < 1e-12
    prices = {"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6, "batch_input": 0.15,
                              "batch_cached_input": 0.075, "batch_output": 0.6}}  # fmt: skip
    same = make_settings(TAGGER_MODEL="gpt-4o-mini", TAGGER_PRICES=prices)
    assert estimate(same, todo, batch=True).cost == pytest.approx(sync)


def test_state_file_survives_a_line_cut_short(tmp_path: Path) -> None:
    store = batch.FileBatchStore(tmp_path)
    store.mark("b1", {"k1": "written"})
    with open(store.log, "ab") as handle:
        handle.write(b'{"batch": "b1", "post": "k2", "outc')  # a kill in the middle of an append
    store.mark("b1", {"k3": "unchanged"})
    assert store.collected("b1") == {"k1": "written", "k3": "unchanged"}
    assert os.path.exists(store.log)


CRASHING_SUBMIT = textwrap.dedent(
    """
    import os, signal, sys
    from worker import batch_backfill as batch
    from worker.backfill import plan
    from worker.providers.batch_api import BatchAPI
    from worker.settings import Settings

    if sys.argv[1] == "after_create":  # the provider made the batch; tagger has not saved its id
        real = batch.FileBatchStore.add
        def add(self, state):
            if not state.id.startswith(batch.PENDING):
                os.kill(os.getpid(), signal.SIGKILL)
            real(self, state)
        batch.FileBatchStore.add = add
    else:  # uploaded, killed before the batch was made
        def create(self, file_id, metadata):
            os.kill(os.getpid(), signal.SIGKILL)
        BatchAPI.create = create
    settings = Settings()
    batch.submit(settings, plan(settings).todo, batch.store_for(settings, None))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after_create", "before_create"])
def test_a_submission_killed_around_batch_creation_loses_no_batch_and_no_post(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path, queue_env: dict[str, str], when: str
) -> None:
    settings = make_settings()
    store = inline_store(settings)
    env = {**queue_env, "REDIS_URL": NO_REDIS}
    crashed = subprocess.run([sys.executable, "-c", CRASHING_SUBMIT, when], env=env, capture_output=True, timeout=120)
    assert crashed.returncode == -9, crashed.stderr
    rows = batch.batch_rows(settings, store)
    if when == "after_create":
        # the provider's batch is found by its input file and adopted: collected like any other
        assert [r.id for r in rows] == ["batch_fake00001"] and rows[0].posts == 3
    else:
        assert rows == [] and len(fake_llm.batch_api.batches) == 0  # nothing was started, nothing charged
        assert len(plan(settings).todo) == 3  # the posts are still to do: a new backfill --batch takes them
        batch.submit(settings, plan(settings).todo, store)
    result = batch.collect(settings, store)
    assert len(result.written) == 2 and len(result.unchanged) == 1
    assert plan(settings).todo == []


def test_batch_commands_with_redis_from_the_command_line(
    site: Path, fake_llm: FakeLLM, queue_env: dict[str, str], redis: redis_lib.Redis
) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = tagger(queue_env, *args)
        assert done.returncode == 0, done.stderr
        return done

    estimate_out = run("backfill", str(site / "site"), "--estimate", "--batch").stdout
    assert "9 calls" in estimate_out and "at batch prices" in estimate_out
    assert fake_llm.batch_api.files == {}  # an estimate submits nothing
    fake_llm.batch_api.delay = 60
    submitted = run("backfill", str(site / "site"), "--batch").stdout
    assert "batch batch_fake00001: 9 requests, 3 posts" in submitted
    assert "in_progress" in run("batch", "status").stdout
    assert "1 batches unfinished" in run("batch", "collect").stdout
    fake_llm.batch_api.delay = 0
    collected = run("batch", "collect").stdout
    assert "collect: 2 written, 1 unchanged, 0 enqueued" in collected
    assert "settled before" in run("batch", "collect").stdout
    status = run("batch", "status").stdout
    assert "completed" in status and "      3 " in status
    assert not (site / "site" / batch.STATE_FILE).exists()  # with Redis, the state is in Redis
    (index,) = redis.scan_iter(f"{queue_env['TAGGER_REDIS_PREFIX']}:batches:*")  # one site
    assert redis.zcard(index) == 1


def chat_requests(fake: FakeLLM, since: int) -> list[list[str]]:
    """The terms of each chat request the fake answered after the first `since` (batch lines included)."""
    return [asked_names(body) for body in fake.requests[since:] if "messages" in body]


@pytest.mark.parametrize("fault", ["server_error", "refusal", "schema_invalid"])
def test_a_post_with_one_bad_line_keeps_its_good_chunks_and_asks_only_the_bad_one_again(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path, fault: str
) -> None:
    settings = make_settings()
    store = inline_store(settings)
    fake_llm.batch_api.line_faults = {1: fault}  # the first post's second chunk (of three, one per type)
    submitted = batch.submit(settings, plan(settings).todo, store)
    first = next(iter(submitted.batches[0].posts.values()))
    lines = [
        json.loads(line)["body"]
        for line in fake_llm.batch_api.contents[submitted.batches[0].input_file_id].splitlines()
    ]
    bad_chunk = asked_names(lines[1])
    before = len(fake_llm.requests)
    result = batch.collect(settings, store)
    assert [line.split(": ", 1)[0] for line in result.inline] == [first.path]
    synchronous = chat_requests(fake_llm, before)[9:]  # after the batch's own nine lines
    assert synchronous == [bad_chunk]  # only the failed chunk is asked again
    assert not result.failed and plan(settings).todo == []
    record = load_record(site / "site" / first.path)
    assert {j.term for j in record.judgements} >= {n for body in lines[:3] for n in asked_names(body)}


@pytest.mark.slow
@pytest.mark.redis
def test_a_half_expired_batch_keeps_the_answered_chunks_and_the_queue_asks_only_the_rest(
    make_settings: Callable[..., Settings],
    fake_llm: FakeLLM,
    site: Path,
    queue_env: dict[str, str],
    redis: redis_lib.Redis,
) -> None:
    settings = queue_settings(make_settings, queue_env)
    store = batch.store_for(settings, redis)
    fake_llm.batch_api.script("expire_half")  # 9 lines, the first 4 answered: the second post has 1 of its 3
    submitted = batch.submit(settings, plan(settings).todo, store)
    second = list(submitted.batches[0].posts.values())[1]
    result = batch.collect(settings, store, redis=redis)
    assert len(result.enqueued) == 2
    kept = load_record(site / "site" / second.path)
    assert kept.judgements and not kept.assigned and kept.pending is None  # judged, nothing claimed as written
    before = len(fake_llm.requests)
    work = subprocess.run(
        [sys.executable, "-m", "worker", "work", "--burst"], env=queue_env, capture_output=True, text=True, timeout=120
    )
    assert work.returncode == 0, work.stderr
    # the second post asks 2 chunks (1 kept), the third all 3: 5 requests, not 6
    assert len(chat_requests(fake_llm, before)) == 5
    assert plan(settings).todo == []
