"""Cost controls: the estimate calls nothing, the shortlist records skipped terms, chunks are even."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakellm import FakeLLM, asked_names
from worker.backfill import estimate, plan
from worker.classifier import Classifier, make_classifier
from worker.records import load_record
from worker.settings import Settings


def test_estimate_matches_what_a_run_then_spends(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    settings = make_settings(TAGGER_MODEL="gpt-4o-mini")
    todo = plan(settings).todo
    guess = estimate(settings, todo)
    assert fake_llm.counts["requests"] == 0
    assert guess.posts == 3 and guess.calls == 3  # the demo taxonomy's three types fit one call a post
    assert guess.cost is not None and guess.cost > 0
    for path in todo:
        make_classifier(settings).classify(path)
    assert fake_llm.counts["requests"] == guess.calls
    # the fake server counts tokens the same way (estimate_tokens, the schema with them), so the estimate is close
    assert abs(fake_llm.counts["prompt_tokens"] - guess.input_tokens) <= guess.calls * 2
    assert estimate(settings, plan(settings).todo).calls == 0


def test_the_estimates_output_is_what_the_schema_asks_and_bounds_what_a_strict_server_writes(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    from worker.prompts import load_templates
    from worker.reply import REASON_ASKED_CHARS, reply_schema

    settings = make_settings(TAGGER_MODEL="gpt-4o-mini")
    todo = plan(settings).todo
    guess = estimate(settings, todo)
    classifier = make_classifier(settings)
    post = classifier.read(todo[0])
    prompt = classifier.prompts_for(post, classifier.terms_for(post))[0][0]
    schema = reply_schema(prompt.groups, "all")
    assert schema["$defs"]["entry"]["properties"]["reason"]["maxLength"] == REASON_ASKED_CHARS
    assert "12 words at most" in load_templates().system.template  # the prompt asks what the schema bounds
    written = sum(classifier.classify(path, dry_run=True).usage.output_tokens for path in todo)
    reasons = [r for path in todo for r in (j.reason for j in load_record(path).judgements)]
    assert reasons and max(len(r) for r in reasons) <= REASON_ASKED_CHARS  # the fake cuts as a strict server does
    assert 0 < written <= guess.output_tokens  # the estimate is a bound, not a wish


def test_chunks_are_even(make_settings: Callable[..., Settings], site: Path) -> None:
    classifier = make_classifier(make_settings(TAGGER_CHUNK_SIZE=3))
    post = site / "site" / "posts" / "limiting-wip.md"
    from worker.posts import read_post

    prompts, _ = classifier.prompts_for(read_post(post), classifier.terms_of(["tags"]))
    assert [len(p.names) for p in prompts] == [2, 2]


def test_shortlist_skips_hopeless_terms_and_caches_them(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    classifier = make_classifier(make_settings(TAGGER_SHORTLIST_MIN=30))
    post = site / "site" / "posts" / "limiting-wip.md"
    classifier.classify(post)
    asked = {n for r in fake_llm.requests for n in asked_names(r)}
    record = load_record(post)
    skipped = {j.term for j in record.judgements if j.provider == "shortlist"}
    assert skipped and "Technical Debt" in skipped and not (skipped & asked)
    assert "Kanban" in asked
    assert {j.term for j in record.judgements} == {t.title for t in classifier.taxonomy}
    requests = fake_llm.counts["requests"]
    classifier.classify(post)
    assert fake_llm.counts["requests"] == requests


def test_the_shortlist_asks_a_term_at_its_floor_and_records_why_the_others_were_not_asked(
    make_settings: Callable[..., Settings], site: Path
) -> None:
    from worker.posts import read_post
    from worker.results import Judgement

    post = read_post(site / "site" / "posts" / "limiting-wip.md")

    def split(floor: float) -> tuple[dict[str, Judgement], set[str]]:
        classifier = make_classifier(make_settings(TAGGER_SHORTLIST_MIN=floor))
        skipped, ask = classifier.shortlist(post, classifier.terms_of(["tags"]))
        return {j.term: j for j in skipped}, {t.title for t in ask}

    everything, none = split(100)  # no local score reaches 100: every term is recorded with its score
    assert none == set() and all(j.reason.startswith("not asked: ") for j in everything.values())
    term, floor = max(((j.term, j.confidence) for j in everything.values()), key=lambda pair: pair[1])
    assert 0 < floor < 100
    skipped, asked = split(floor)
    assert term in asked and term not in skipped  # at the floor: asked
    skipped, asked = split(floor + 0.01)
    assert term in skipped and term not in asked  # just under it: recorded, not asked
    assert skipped[term].reason == everything[term].reason


def test_a_posts_calls_run_in_parallel_within_the_bound(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.hold()  # calls wait at the model until released: concurrency is shown, not hoped for
    # One call per type, so that a post has several calls to run side by side.
    settings = make_settings(TAGGER_CONCURRENCY=2, TAGGER_REQUEST_TIMEOUT=60, TAGGER_PACK_TYPES=False)
    classifier = make_classifier(settings)
    done = threading.Thread(target=classifier.classify, args=(site / "site" / "posts" / "limiting-wip.md",))
    done.start()
    assert fake_llm.wait_held(2)  # two calls of the post at the model at once
    assert not fake_llm.wait_held(3, timeout=0.5)  # and not the third while both are held
    fake_llm.release(1)
    assert fake_llm.wait_held(2)  # one finished: the third went out
    fake_llm.release()
    done.join(timeout=60)
    assert fake_llm.counts["requests"] == 3 and fake_llm.max_in_flight == 2


def test_cached_prefix_tokens_are_recorded(classifier: Classifier, fake_llm: FakeLLM, site: Path) -> None:
    first = classifier.classify(site / "site" / "posts" / "limiting-wip.md")
    second = classifier.classify(site / "site" / "posts" / "shipping-daily.md")
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens > 0  # same rubric and definitions: the provider's prefix cache served them
    assert load_record(site / "site" / "posts" / "shipping-daily.md").usage.cached_tokens == second.usage.cached_tokens


def test_a_workers_posts_reuse_the_same_call_threads_and_a_forked_child_gets_its_own(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads for a post's calls are started once, not per post (each start was time that is not the model's);
    a process forked from a classifier that has them starts its own instead of waiting on threads it lacks."""
    classifier = make_classifier(make_settings(TAGGER_CONCURRENCY=3))
    folder = site / "site" / "posts"
    for n in range(4):  # more posts than threads: a pool per post would show more thread ids than TAGGER_CONCURRENCY
        (folder / f"copy-{n}.md").write_bytes((folder / "limiting-wip.md").read_bytes())
    posts = sorted(p for p in folder.glob("*.md") if "Human" not in p.read_text(encoding="utf-8"))
    names: set[int] = set()
    real = Classifier._judge_prompt

    def judge_prompt(self: Classifier, *args: Any) -> Any:
        names.add(threading.get_native_id())  # the OS thread id: a new thread, a new id
        return real(self, *args)

    monkeypatch.setattr(Classifier, "_judge_prompt", judge_prompt)
    for post in posts:
        classifier.classify(post)
    assert len(posts) >= 4 and fake_llm.counts["requests"] >= len(posts)
    assert 1 <= len(names) <= 3, names  # at most TAGGER_CONCURRENCY threads for every post's calls
    pid = os.fork()
    if pid == 0:  # the child judges an edited post with the classifier it inherited (not its calls' threads)
        code = 1
        try:
            posts[0].write_text(posts[0].read_text(encoding="utf-8") + "\nMore about Kanban.\n", encoding="utf-8")
            code = 0 if classifier.classify(posts[0], dry_run=True).usage.calls > 0 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child waited on its parent's call threads")
    assert os.waitstatus_to_exitcode(done[1]) == 0
