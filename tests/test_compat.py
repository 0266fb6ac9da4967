"""OpenAI-compatible servers as people run them: each real server's behaviour reproduced on the fake, and tagger's answer.

The behaviours were seen on llama-cpp-python's server (`make compat` runs the real one): json_schema answered
with a 500 (others answer 400), a grammar that ignores minimum/maximum, a small model that lists one entry where
nothing forces one per term.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib
import structlog
from click.testing import CliRunner

from tests.fakellm import FakeLLM
from worker.classifier import make_classifier
from worker.cli import main
from worker.errors import InvalidReply, ProviderUnsupported
from worker.posts import read_post
from worker.providers.modes import MODES_FILE, endpoint_of
from worker.queue.modes import RedisModeMemory
from worker.settings import Settings

MakeSettings = Callable[..., Settings]


def wip(site: Path) -> Path:
    return site / "site" / "posts" / "limiting-wip.md"


def other(site: Path) -> Path:
    return site / "site" / "posts" / "backlog-by-value.md"


def formats(fake: FakeLLM) -> list[str | None]:
    """The response format type of each request the fake received, in order."""
    return [(r.get("response_format") or {}).get("type") for r in fake.requests]


@pytest.mark.parametrize("status", [500, 400])
def test_auto_falls_back_once_from_a_rejected_json_schema_and_remembers_it(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path, status: int
) -> None:
    fake_llm.rejected_formats = {"json_schema": status}
    settings = make_settings()
    with structlog.testing.capture_logs() as logs:
        result = make_classifier(settings).classify(wip(site))
    # One rejected call, then every call in json_object: no retries of the rejected request.
    calls = len(fake_llm.requests) - 1
    assert calls >= 1 and formats(fake_llm) == ["json_schema"] + ["json_object"] * calls
    assert result.usage.calls == calls + 1 and "Kanban" in read_post(wip(site)).terms("tags")
    fallbacks = [e for e in logs if e["event"] == "structured_fallback"]
    assert len(fallbacks) == 1 and fallbacks[0]["rejected"] == "json_schema" and fallbacks[0]["now"] == "json_object"
    # The schema rides beside json_object for grammar-based servers, and in the system message for the rest.
    assert fake_llm.requests[1]["response_format"]["schema"]["properties"]["judgements"]
    assert "JSON schema:" in fake_llm.requests[1]["messages"][0]["content"]
    # Remembered per base URL and model: the next classifier (another process) does not probe again.
    remembered = json.loads((site / "site" / MODES_FILE).read_text())
    assert remembered == {endpoint_of(settings): "json_object"}
    fake_llm.requests.clear()
    make_classifier(settings).classify(other(site), dry_run=True, types=["tags"])
    assert formats(fake_llm) == ["json_object"]


def test_chunks_side_by_side_are_rejected_at_most_once_each_and_the_fallback_is_logged_once(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.rejected_formats = {"json_schema": 500}
    settings = make_settings(TAGGER_CONCURRENCY=3, TAGGER_PACK_TYPES=False)
    with structlog.testing.capture_logs() as logs:
        make_classifier(settings).classify(wip(site))
    assert 1 <= fake_llm.counts["rejected"] <= 3 and formats(fake_llm).count("json_object") == 3
    assert len([e for e in logs if e["event"] == "structured_fallback"]) == 1


def test_auto_goes_on_to_the_prompt_alone_when_json_object_is_rejected_too(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.rejected_formats = {"json_schema": 400, "json_object": 500}
    make_classifier(make_settings()).classify(wip(site), types=["tags"])
    assert formats(fake_llm) == ["json_schema", "json_object", None]
    assert "Kanban" in read_post(wip(site)).terms("tags")


def test_a_rejected_format_asked_for_explicitly_fails_at_once_naming_the_setting(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.rejected_formats = {"json_schema": 500}
    before = wip(site).read_bytes()
    with pytest.raises(ProviderUnsupported) as caught:
        make_classifier(make_settings(TAGGER_STRUCTURED="json_schema")).classify(wip(site), types=["tags"])
    error = caught.value
    assert fake_llm.counts["requests"] == 1  # never retried: the same request is rejected again
    assert error.kind == "provider_unsupported" and not error.transient
    assert "\n" not in error.message and "TAGGER_STRUCTURED" in error.message and "HTTP 500" in error.message
    assert wip(site).read_bytes() == before


def test_a_request_rejected_for_another_reason_is_not_a_format_fallback(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.inject("bad_request")
    with pytest.raises(ProviderUnsupported) as caught:
        make_classifier(make_settings()).classify(wip(site), types=["tags"])
    assert fake_llm.counts["requests"] == 1 and formats(fake_llm) == ["json_schema"]
    assert "TAGGER_MODEL" in caught.value.message
    assert not (site / "site" / MODES_FILE).exists()


def test_the_failed_line_is_one_line_and_names_the_setting(site: Path, fake_llm: FakeLLM) -> None:
    fake_llm.rejected_formats = {"json_schema": 500}
    env = {
        "TAGGER_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake_llm.base_url,
        "OPENAI_API_KEY": "sk-test-secret-key-1234567890",
        "TAGGER_TAXONOMY_DIR": str(site / "taxonomy"),
        "TAGGER_CONTENT_DIR": str(site / "site"),
        "TAGGER_STRUCTURED": "json_schema",
    }
    result = CliRunner().invoke(main, ["classify", str(wip(site))], env=env)
    assert result.exit_code == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "provider_unsupported" in failed[0] and "TAGGER_STRUCTURED" in failed[0]
    assert result.stderr.count("\n") == 1, result.stderr  # nothing of the server's body spills onto more lines
    assert fake_llm.counts["requests"] <= 3  # one per type at most (they run side by side), never 15


def test_the_old_json_mode_switch_is_an_alias_for_json_object(make_settings: MakeSettings) -> None:
    assert make_settings(TAGGER_JSON_MODE=True).structured_mode == "json_object"
    assert make_settings().structured_mode == "auto"
    assert make_settings(TAGGER_JSON_MODE=True, TAGGER_STRUCTURED="prompt").structured_mode == "prompt"


def test_a_fleet_shares_the_mode_through_redis_and_distrusts_what_it_reads(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path, redis: redis_lib.Redis, redis_prefix: str
) -> None:
    fake_llm.rejected_formats = {"json_schema": 500}
    settings = make_settings(TAGGER_REDIS_PREFIX=redis_prefix)
    make_classifier(settings, memory=RedisModeMemory(settings, redis)).classify(wip(site), types=["tags"])
    assert formats(fake_llm) == ["json_schema", "json_object"]
    assert not (site / "site" / MODES_FILE).exists()  # a fleet's memory is Redis, not one machine's disk
    fake_llm.requests.clear()
    # Another worker (another process: a new memory object on the same Redis) starts in json_object.
    make_classifier(settings, memory=RedisModeMemory(settings, redis)).classify(other(site), dry_run=True)
    assert set(formats(fake_llm)) == {"json_object"}
    # What Redis holds is untrusted: a value that is not a mode is ignored (tagger probes again).
    memory = RedisModeMemory(settings, redis)
    for key in redis.scan_iter(f"{redis_prefix}:structured:*"):
        redis.set(key, "pickle\x80")
    assert memory.recall(endpoint_of(settings)) is None


def test_a_grammar_that_ignores_ranges_is_bounded_by_integer_enums(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.ignores_ranges = True  # sub-scores of 12 wherever the schema bounds them only by minimum/maximum
    make_classifier(make_settings(TAGGER_STRUCTURED="json_object")).classify(wip(site))
    assert fake_llm.counts["requests"] == 1 and "Kanban" in read_post(wip(site)).terms("tags")
    score = fake_llm.requests[0]["response_format"]["schema"]["$defs"]["score"]
    assert score == {"type": "integer", "enum": list(range(11))}


def test_scores_out_of_range_without_a_schema_get_a_reask_then_a_clear_failure(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.ignores_ranges = True
    before = wip(site).read_bytes()
    with pytest.raises(InvalidReply) as caught:
        make_classifier(make_settings(TAGGER_STRUCTURED="prompt")).classify(wip(site), types=["tags"])
    assert fake_llm.counts["requests"] == 2 and "less than or equal to 10" in caught.value.message
    assert "response_format" not in fake_llm.requests[0] and fake_llm.requests[0]["max_tokens"] > 0
    assert wip(site).read_bytes() == before


def test_a_model_that_lists_one_entry_is_held_to_every_term_by_the_schema(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.one_entry = True  # one entry wherever nothing requires one per term
    result = make_classifier(make_settings(TAGGER_STRUCTURED="json_object")).classify(wip(site))
    assert fake_llm.counts["requests"] == 1 and len(result.judgements) == 9
    fake_llm.requests.clear()
    with pytest.raises(InvalidReply) as caught:
        make_classifier(make_settings(TAGGER_STRUCTURED="prompt")).classify(other(site), types=["tags"])
    assert len(fake_llm.requests) == 2 and "missing terms" in caught.value.message


def test_eval_counts_the_calls_of_posts_that_failed(make_settings: MakeSettings, fake_llm: FakeLLM, site: Path) -> None:
    from worker.evaluation import evaluate

    fake_llm.one_entry = True  # every post fails after its re-ask (no schema requires every term)
    settings = make_settings(TAGGER_STRUCTURED="prompt", TAGGER_CONCURRENCY=2, TAGGER_PACK_TYPES=False)
    posts = sorted((site / "site" / "posts").glob("*.md"))
    result = evaluate(settings, posts)
    assert len(result.failed) == len(posts) and result.posts == 0
    assert fake_llm.counts["requests"] >= 2 * len(posts)
    assert result.cost.usage.calls == fake_llm.counts["requests"]
    assert result.cost.usage.input_tokens == fake_llm.counts["prompt_tokens"]


def test_eval_counts_a_rejected_call(make_settings: MakeSettings, fake_llm: FakeLLM, site: Path) -> None:
    from worker.evaluation import evaluate

    fake_llm.rejected_formats = {"json_schema": 500}
    result = evaluate(make_settings(TAGGER_STRUCTURED="json_schema"), [wip(site)])
    assert result.failed and result.cost.usage.calls == fake_llm.counts["requests"] >= 1


def test_a_chunk_whose_schema_would_pass_openais_limits_is_split(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    from worker.reply import over_limits, reply_schema

    many = site / "many"
    (many / "tags").mkdir(parents=True)
    for i in range(1100):
        (many / "tags" / f"t{i}.md").write_text(
            f"---\ntitle: Topic number {i}\nClassificationType: tags\nInstructions: |-\n"
            f"  **Use this tag only for content about topic {i}.**\n---\n",
            encoding="utf-8",
        )
    settings = make_settings(TAGGER_TAXONOMY_DIR=str(many), TAGGER_CHUNK_SIZE=5000, TAGGER_REPLY="relevant")
    classifier = make_classifier(settings)
    post = classifier.read(wip(site))
    whole = reply_schema((("tags", tuple(t.title for t in classifier.taxonomy)),), "relevant")
    assert over_limits(whole) and "enum values" in str(over_limits(whole))  # 1,100 titles in one enum
    prompts, _ = classifier.prompts_for(post, classifier.terms_for(post))
    assert len(prompts) >= 2 and sum(len(p.terms) for p in prompts) == 1100
    assert all(not over_limits(reply_schema(p.groups, p.reply)) for p in prompts)


def _many_terms(site: Path, count: int) -> Path:
    many = site / f"many-{count}"
    (many / "tags").mkdir(parents=True)
    for i in range(count):
        (many / "tags" / f"t{i}.md").write_text(
            f"---\ntitle: Topic number {i}\nClassificationType: tags\nInstructions: |-\n  Posts about topic {i}.\n---\n",
            encoding="utf-8",
        )
    return many


def test_a_chunk_whose_reply_could_pass_the_models_output_limit_is_split(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    from worker.reply import MAX_REPLY_TOKENS, over_limits, reply_schema, reply_tokens

    settings = make_settings(TAGGER_TAXONOMY_DIR=str(_many_terms(site, 400)), TAGGER_CHUNK_SIZE=5000)
    classifier = make_classifier(settings)
    whole = reply_schema((("tags", tuple(t.title for t in classifier.taxonomy)),), "all")
    assert str(over_limits(whole)).startswith("a reply of up to")  # 400 entries: more than 16,384 tokens
    post = classifier.read(wip(site))
    prompts, _ = classifier.prompts_for(post, classifier.terms_for(post))
    assert [len(p.terms) for p in prompts] == [200, 200]
    assert all(reply_tokens(p.groups) <= MAX_REPLY_TOKENS for p in prompts)


def test_the_default_chunk_judges_the_corpus_118_terms_in_one_call_a_post(
    make_settings: MakeSettings, corpus: Path, site: Path
) -> None:
    from worker.reply import MAX_REPLY_TOKENS, over_limits, reply_schema, reply_tokens

    classifier = make_classifier(make_settings(TAGGER_TAXONOMY_DIR=str(corpus / "taxonomy")))
    assert classifier.settings.chunk_size == Settings(_env_file=None).chunk_size  # type: ignore[call-arg]
    post = classifier.read(wip(site))
    prompts, _ = classifier.prompts_for(post, classifier.terms_for(post))
    assert len(prompts) == 1 and len(prompts[0].terms) == 118 and len(prompts[0].groups) == 3
    for reply in ("all", "relevant"):
        assert over_limits(reply_schema(prompts[0].groups, reply)) is None
    assert reply_tokens(prompts[0].groups) <= MAX_REPLY_TOKENS


def test_a_call_asking_many_terms_waits_longer_and_never_asks_more_tokens_than_a_model_gives(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    from worker.reply import MAX_REPLY_TOKENS

    # 120 terms: twice the terms TAGGER_REQUEST_TIMEOUT (2 s here) is for, so the call waits 4 s for a 3-s reply.
    many = str(_many_terms(site, 120))
    settings = make_settings(TAGGER_TAXONOMY_DIR=many, TAGGER_RETRY_ATTEMPTS=1)
    fake_llm.latency = 3.0
    result = make_classifier(settings).classify(wip(site), dry_run=True)
    assert fake_llm.counts["requests"] == 1 and len(result.judgements) == 120
    fake_llm.latency = 0.0
    object_mode = make_classifier(make_settings(TAGGER_TAXONOMY_DIR=many, TAGGER_STRUCTURED="json_object"))
    post = object_mode.read(wip(site))
    prompts, _ = object_mode.prompts_for(post, object_mode.terms_for(post))
    body = object_mode.provider.request_body(prompts[0])  # type: ignore[attr-defined]
    assert body["max_tokens"] == MAX_REPLY_TOKENS  # 200 + 250 a term would be 30,200: OpenAI rejects that


def test_the_estimate_prints_all_and_relevant_sync_and_batch_against_one_call_per_term(
    make_settings: MakeSettings, site: Path
) -> None:
    from worker.backfill import estimate_ratios, plan

    settings = make_settings(TAGGER_MODEL="gpt-4o-mini")
    todo = plan(settings).todo
    ratios = {(r.reply, r.batch): r for r in estimate_ratios(settings, todo)}
    assert set(ratios) == {("all", False), ("all", True), ("relevant", False), ("relevant", True)}
    for reply in ("all", "relevant"):
        # The Batch API halves every price; relevant is cheaper than all (fewer output tokens).
        assert ratios[(reply, True)].ratio == pytest.approx(2 * ratios[(reply, False)].ratio)
    assert ratios[("relevant", False)].ratio > ratios[("all", False)].ratio > 1
    unpacked = {(r.reply, r.batch): r for r in estimate_ratios(settings.model_copy(update={"pack_types": False}), todo)}
    assert ratios[("relevant", False)].ratio > unpacked[("relevant", False)].ratio  # the post paid once is cheaper


def test_a_raw_newline_inside_a_reason_as_llama_cpps_grammar_lets_through_is_read(
    make_settings: MakeSettings, fake_llm: FakeLLM, site: Path
) -> None:
    from worker.reply import parse_reply

    # Seen on llama-cpp-python 0.3.36: its JSON grammar admits control characters inside strings.
    entry = '{"mentions": 1, "alignment": 2, "depth": 3, "intent": 4, "audience": 5, "signal": 6, "reason": "a\nb"}'
    parsed = parse_reply('{"judgements": {"tags": {"Kanban": ' + entry + "}}}", (("tags", ("Kanban",)),))
    assert parsed.error is None and parsed.judgements[0].reason == "a\nb"
    assert parse_reply('{"judgements": {"tags": {"Kanban": ', (("tags", ("Kanban",)),)).error
