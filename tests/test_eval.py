"""`tagger eval`: scores computed by hand, the sweep, gold files, --compare, reply shapes, the HTML report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from tests.fakellm import FakeLLM
from worker.classifier import make_classifier
from worker.cli import main
from worker.errors import InvalidReply
from worker.evaluation import Case, evaluate, sweep, sweep_point
from worker.logs import configure
from worker.posts import read_post
from worker.records import Record, load_record, record_path, save_record
from worker.reply import NOT_RELEVANT
from worker.settings import Settings

TERM = """---
title: {title}
ClassificationType: tags
Instructions: |-
  Posts about {title}, the practice of {lower} in teams: how teams start it, run it, measure it and improve it over
  many months, with its history, its critics and its variants. Only the full text says this: {marker}.

  **Key Topics:**
  - {title} basics
  - {title} in practice

  **Strictly exclude:**
  - Anything not about {lower}
---
"""
TAGS = ("Alpha", "Beta", "Gamma", "Delta")
# Per post title: the score (0-10, every sub-score alike, so confidence = score x 10) of each tag.
SCORES: dict[str, dict[str, float]] = {
    "P1": {"Alpha": 9, "Beta": 4, "Gamma": 6, "Delta": 1},
    "P2": {"Alpha": 7, "Beta": 2, "Gamma": 8, "Delta": 0},
    "P3": {"Alpha": 1, "Beta": 1, "Gamma": 1, "Delta": 3},
    "P4": {"Alpha": 9, "Beta": 9, "Gamma": 9, "Delta": 9},
    "P5": {"Alpha": 9, "Beta": 9, "Gamma": 2, "Delta": 2},
}
# Front matter per post; P4 has no tags (left out); P5's Beta was assigned by tagger (its record says so).
FRONT = {"P1": "[Alpha, Beta]", "P2": "[Gamma]", "P3": "[Delta]", "P4": None, "P5": "[Alpha, Beta]"}
RULE = '{"tags":{"top":2,"min_confidence":50}}'


def scripted(term: str, post: str) -> dict[str, Any]:
    """The reply a hand-written table asks for: every sub-score of `term` for the post with this title."""
    title = re.search(r"Title: (\S+)", post)
    value = SCORES[title.group(1)][term] if title else 0.0
    return {
        "term": term,
        **dict.fromkeys(("mentions", "alignment", "depth", "intent", "audience", "signal"), value),
        "reason": f"scripted {value}",
    }


@pytest.fixture
def scripted_llm() -> Any:
    server = FakeLLM(scorer=scripted).start()
    yield server
    server.stop()


@pytest.fixture
def eval_site(tmp_path: Path) -> Path:
    """Four tag terms and five posts with known gold labels."""
    for title in TAGS:
        path = tmp_path / "taxonomy" / "tags" / f"{title.lower()}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(TERM.format(title=title, lower=title.lower(), marker=f"FULL-PROSE-{title}"), encoding="utf-8")
    for name, tags in FRONT.items():
        path = tmp_path / "content" / "posts" / f"{name.lower()}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"title: {name}\n" + (f"tags: {tags}\n" if tags else "")
        path.write_text(f"---\n{header}---\nBody of {name}. " + "Some words. " * 20 + "\n", encoding="utf-8")
    p5 = tmp_path / "content" / "posts" / "p5.md"
    save_record(p5, Record(post=str(p5), assigned={"tags": ["Beta"]}))
    return tmp_path


def env_for(server: FakeLLM, site: Path, **extra: str) -> dict[str, str]:
    values = {
        "TAGGER_PROVIDER": "openai",
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "sk-eval-test-0123456789",
        "TAGGER_MODEL": "gpt-4o-mini",
        "TAGGER_TAXONOMY_DIR": str(site / "taxonomy"),
        "TAGGER_CONTENT_DIR": str(site / "content"),
        "TAGGER_SELECTION": RULE,
        "TAGGER_REQUEST_TIMEOUT": "5",
        "TAGGER_RETRY_ATTEMPTS": "2",
        "TAGGER_CONCURRENCY": "1",
    }
    values.update(extra)
    return values


@pytest.fixture
def eval_env(scripted_llm: FakeLLM, eval_site: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, str]]:
    """Put the eval site's settings in the environment (the CLI reads them there); returns them."""
    monkeypatch.chdir(eval_site)  # no stray .env, and --compare's cache folder lands in the scratch site
    for key in list(os.environ):
        if key.startswith(("TAGGER_", "OPENAI_")):
            monkeypatch.delenv(key)

    def apply(**extra: str) -> dict[str, str]:
        values = env_for(scripted_llm, eval_site, **extra)
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        return values

    return apply


def _settings(eval_env: Callable[..., dict[str, str]]) -> Settings:
    eval_env()
    return Settings(_env_file=None)  # type: ignore[call-arg]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(argv), catch_exceptions=False)
    # The CLI points structlog at the runner's captured stderr, which closes with it: point it back.
    configure(Settings(_env_file=None), stream=sys.__stderr__, quiet=True)  # type: ignore[call-arg]
    return result.exit_code, result.stdout, result.stderr


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*.md"))}


def test_eval_gives_the_hand_computed_scores_writes_no_post_and_a_second_run_makes_no_call(
    eval_env: Callable[..., dict[str, str]], eval_site: Path, scripted_llm: FakeLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_env()
    before = snapshot(eval_site / "content")
    code, out, _ = run_cli(capsys, "eval", str(eval_site / "content"), "--json")
    assert code == 0
    result = json.loads(out)
    tags = next(t for t in result["types"] if t["type"] == "tags")
    # Picks (top 2 >= 50): P1 Alpha,Gamma vs gold Alpha,Beta; P2 Gamma,Alpha vs Gamma; P3 none vs Delta;
    # P5 Alpha,Beta vs Alpha (Beta was tagger's own, so not gold); P4 has no gold: left out.
    assert (tags["posts"], tags["left_out"]) == (4, 1)
    micro = tags["micro"]
    assert (micro["true_positives"], micro["false_positives"], micro["false_negatives"]) == (3, 3, 2)
    assert (micro["precision"], micro["recall"], micro["f1"]) == (0.5, 0.6, round(6 / 11, 4))
    # Macro over Alpha (P 2/3, R 1, F1 .8), Beta (0, 0, 0), Gamma (.5, 1, 2/3), Delta (0, 0, 0).
    macro = tags["macro"]
    assert tags["macro_terms"] == 4
    assert macro["precision"] == round((2 / 3 + 0.5) / 4, 4)
    assert macro["recall"] == 0.5
    assert macro["f1"] == round((0.8 + 2 / 3) / 4, 4)
    assert {m["term"]: m["posts"] for m in tags["missed"]} == {"Beta": 1, "Delta": 1}
    assert {a["term"]: a["posts"] for a in tags["added"]} == {"Alpha": 1, "Beta": 1, "Gamma": 1}
    assert result["cost"]["usage"]["calls"] == 5 == scripted_llm.counts["requests"]
    assert result["cost"]["usage"]["output_tokens"] > 0 and result["cost"]["dollars"] > 0
    assert result["suggested_selection"]["tags"] == {
        "top": tags["best"]["top"],
        "min_confidence": tags["best"]["min_confidence"],
    }

    assert snapshot(eval_site / "content") == before  # no post written
    p5 = load_record(eval_site / "content" / "posts" / "p5.md")
    assert p5.assigned == {"tags": ["Beta"]}  # eval never records a term as assigned
    assert load_record(eval_site / "content" / "posts" / "p1.md").assigned == {}
    assert len(p5.judgements) == 4  # but the judgements are cached in the record

    code, out, _ = run_cli(capsys, "eval", str(eval_site / "content"), "--json")
    again = json.loads(out)
    assert scripted_llm.counts["requests"] == 5  # the second eval made no call
    assert again["cost"]["usage"]["calls"] == 0 and again["cost"]["cached_terms"] == 20
    # What judging costs under these settings still shows, from the usage kept with the cached judgements.
    assert again["cost"]["judging"] == result["cost"]["judging"] == result["cost"]["usage"]
    assert next(t for t in again["types"] if t["type"] == "tags")["micro"] == micro

    code, out, _ = run_cli(capsys, "eval", str(eval_site / "content"))
    assert code == 0 and "tags" in out and "suggested: TAGGER_SELECTION=" in out and "0 calls" in out


def test_the_sweep_finds_the_rule_a_hand_built_case_says_it_must() -> None:
    cases = [
        Case(confidences=[90, 70, 40], is_gold=[True, False, True], gold=2),
        Case(confidences=[85, 60, 30], is_gold=[True, True, False], gold=2),
    ]
    # top >= 3 and a floor in 31..40 take 90,70,40 and 85,60: 4 right, 1 wrong, none missed: F1 8/9.
    # A floor of 41..60 loses the 40 (F1 .75); one of 30 or less adds the wrong 30 (F1 .8); top 2 caps at .75.
    points = sweep(cases)
    assert len(points) == 30 * 101
    best = max(points, key=lambda p: (p.f1, p.precision, p.min_confidence, -p.top))
    assert (best.top, best.min_confidence, best.f1) == (3, 40.0, round(8 / 9, 4))
    assert sweep_point(cases, 3, 50).f1 == 0.75 and sweep_point(cases, 3, 30).f1 == 0.8
    assert sweep_point(cases, 2, 0).f1 == 0.75


def test_sweep_best_is_reported_and_agrees_with_the_current_rule_at_that_point(
    eval_env: Callable[..., dict[str, str]], eval_site: Path
) -> None:
    settings = _settings(eval_env)
    paths = sorted((eval_site / "content").rglob("*.md"))
    result = evaluate(settings, paths)
    tags = result.types[0]
    assert tags.best is not None and tags.best.f1 >= tags.micro.f1
    # Re-evaluating with the suggested rule gives exactly the sweep's best F1, and no call.
    better = settings.model_copy(update={"selection": result.suggested_selection()})
    again = evaluate(better, paths)
    assert again.types[0].micro.f1 == tags.best.f1
    assert again.cost.usage.calls == 0


def test_gold_file_replaces_front_matter_and_bad_lines_are_refused(
    eval_env: Callable[..., dict[str, str]], eval_site: Path, scripted_llm: FakeLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_env()
    gold = eval_site / "gold.jsonl"
    # P1: picks Alpha, Gamma; P2: picks Gamma, Alpha; P3 explicitly no tags: picks nothing.
    gold.write_text(
        '{"post": "posts/p1.md", "tags": ["alpha", "Gamma", "Unknown Tag"]}\n'
        '{"post": "posts/p2.md", "tags": ["Beta"]}\n\n'
        '{"post": "posts/p3.md", "tags": []}\n',
        encoding="utf-8",
    )
    code, out, _ = run_cli(capsys, "eval", str(eval_site / "content"), "--gold", str(gold), "--json")
    assert code == 0
    tags = json.loads(out)["types"][0]
    assert (tags["posts"], tags["left_out"], tags["outside_taxonomy"]) == (3, 0, 1)
    micro = tags["micro"]  # P1 2 right; P2 Gamma, Alpha wrong and Beta missed; P3 nothing picked
    assert (micro["true_positives"], micro["false_positives"], micro["false_negatives"]) == (2, 2, 1)
    assert scripted_llm.counts["requests"] == 3  # only the posts the gold file names

    for line, message in (
        ('{"post": "posts/p1.md", "tags": "Alpha"}', ":1: 'tags' must be a list"),
        ('{"tags": ["Alpha"]}', ':1: each line must be an object with "post"'),
        ('{"post": "../outside.md", "tags": []}', "outside the content root"),
        ('{"post": "posts/nope.md", "tags": []}', "not found"),
        ('{"post": "posts/p1.md"}\n{"post": "posts/p1.md"}', ":2: post 'posts/p1.md' is listed twice"),
        ("not json", ":1: not JSON"),
    ):
        gold.write_text(line + "\n", encoding="utf-8")
        code, _, err = run_cli(capsys, "eval", str(eval_site / "content"), "--gold", str(gold))
        assert code == 1 and err.startswith("tagger: bad_gold: ") and message in err, err


def test_compare_runs_each_settings_file_side_by_side_and_caches_each_apart(
    eval_env: Callable[..., dict[str, str]], eval_site: Path, scripted_llm: FakeLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_env()
    a = eval_site / "a.env"
    b = eval_site / "b.env"
    a.write_text("TAGGER_REPLY=all\n", encoding="utf-8")
    b.write_text("# lean reply\nTAGGER_REPLY=relevant\nTAGGER_CHUNK_SIZE=2\n", encoding="utf-8")
    report = eval_site / "compare.html"
    code, out, _ = run_cli(
        capsys, "eval", str(eval_site / "content"), "--compare", str(a), str(b), "--report", str(report)
    )
    assert code == 0
    table = out[out.index("settings ") :].splitlines()
    assert table[1].startswith(str(a)) and table[2].startswith(str(b))
    assert "reply all" in out and "reply relevant" in out
    assert scripted_llm.counts["requests"] == 5 + 10  # chunks of 2: two calls a post for b
    html = report.read_text(encoding="utf-8")
    assert html.count("<section>") == 2 and "Comparison" in html

    code, out, _ = run_cli(capsys, "eval", str(eval_site / "content"), "--compare", str(a), str(b), "--json")
    runs = json.loads(out)
    assert [r["label"] for r in runs] == [str(a), str(b)]
    assert scripted_llm.counts["requests"] == 15  # both configurations came from their own caches
    assert runs[1]["cost"]["usage"]["calls"] == 0 and runs[1]["cost"]["judging"]["calls"] == 10
    assert runs[1]["cost"]["judging"]["output_tokens"] < runs[0]["cost"]["judging"]["output_tokens"]
    assert not any(p.name.endswith(".tagger.json") and "p1" in p.name for p in (eval_site / "content").rglob("*"))

    code, _, err = run_cli(capsys, "eval", str(eval_site / "missing"))
    assert code == 2 and "not a folder" in err and "--compare" in err
    code, _, err = run_cli(capsys, "eval", "--compare")
    assert code == 2 and "--compare needs settings files" in err
    b.write_text("TAGGER_REPLLY=relevant\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "eval", str(eval_site / "content"), "--compare", str(a), str(b))
    assert code == 1 and "not tagger settings: TAGGER_REPLLY" in err
    b.write_text("TAGGER_REPLY=some\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "eval", str(eval_site / "content"), "--compare", str(b))
    assert code == 1 and "bad_settings" in err and "'all' or 'relevant'" in err


@pytest.mark.parametrize(
    ("name", "value"), [("TAGGER_REPLY", "ALL"), ("TAGGER_REPLY", ""), ("TAGGER_DEFINITIONS", "short")]
)
def test_reply_and_definitions_settings_are_strict(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    if value == "":
        assert Settings(_env_file=None).reply == "all"  # type: ignore[call-arg]  # empty means unset
        return
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_relevant_reply_records_omitted_terms_as_zero_and_cuts_output_tokens(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    post = site / "site" / "posts" / "limiting-wip.md"
    full = make_classifier(make_settings()).classify(post, dry_run=True)
    fake_llm.requests.clear()
    lean = make_classifier(make_settings(TAGGER_REPLY="relevant")).classify(post, dry_run=True)
    assert "leave out every term that does not apply" in fake_llm.requests[0]["messages"][0]["content"]
    assert {(j.type, j.term) for j in lean.judgements} == {(j.type, j.term) for j in full.judgements}
    left_out = [j for j in lean.judgements if j.reason == NOT_RELEVANT]
    assert left_out and all(j.confidence == 0 and set(j.scores.values()) == {0} for j in left_out)
    named = {j.term for j in lean.judgements if j.reason != NOT_RELEVANT}
    assert "Kanban" in named
    assert [d.selected for d in lean.decisions] == [d.selected for d in full.decisions]
    # The fake's replies are the size a model's are: about 60 output tokens an entry (reasons of ~20 words).
    assert 45 <= full.usage.output_tokens / len(full.judgements) <= 75
    assert lean.usage.output_tokens * 2 < full.usage.output_tokens
    assert all(j.prompt_version != full.judgements[0].prompt_version for j in lean.judgements)


@pytest.mark.parametrize("fault", ["unknown_term", "repeated_term"])
def test_relevant_reply_still_rejects_unknown_and_repeated_terms(
    make_settings: Callable[..., Settings], site: Path, fault: str
) -> None:
    def scorer(term: str, post: str) -> dict[str, Any]:
        entry = {"term": term, **dict.fromkeys(("mentions", "alignment", "depth", "intent", "audience", "signal"), 8)}
        return {**entry, "reason": "applies"}

    server = FakeLLM(scorer=scorer).start()
    try:
        settings = make_settings(TAGGER_REPLY="relevant", OPENAI_BASE_URL=server.base_url, TAGGER_JSON_MODE="true")
        if fault == "unknown_term":
            server.inject("unknown_term", "unknown_term")
        else:
            server._completion = _repeating(server._completion)  # type: ignore[method-assign]
        with pytest.raises(InvalidReply):
            make_classifier(settings).classify(site / "site" / "posts" / "limiting-wip.md", dry_run=True)
        assert server.counts["requests"] == 2  # asked, re-asked once with the error, then failed
    finally:
        server.stop()


def _repeating(completion: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A reply whose first entry appears twice (a model that repeats itself)."""

    def wrapped(body: dict[str, Any], content: str | None, refusal: str | None, finish: str) -> dict[str, Any]:
        data = json.loads(content or "{}")
        # Relevant replies list entries per type: the first type's first entry twice.
        first = next(iter(data["judgements"]))
        entries = data["judgements"][first]
        data["judgements"][first] = entries[:1] * 2 + entries[1:]
        return completion(body, json.dumps(data), refusal, finish)

    return wrapped


def test_relevant_reply_naming_nothing_for_a_long_post_is_reasked_once(
    make_settings: Callable[..., Settings], site: Path
) -> None:
    def nothing_applies(term: str, post: str) -> dict[str, Any]:
        entry = {"term": term, **dict.fromkeys(("mentions", "alignment", "depth", "intent", "audience", "signal"), 0)}
        return {**entry, "reason": "no"}

    server = FakeLLM(scorer=nothing_applies).start()
    try:
        settings = make_settings(TAGGER_REPLY="relevant", OPENAI_BASE_URL=server.base_url, TAGGER_CONCURRENCY=1)
        post = site / "site" / "posts" / "long.md"
        post.write_text("---\ntitle: Long\n---\n" + "A long post about nothing in particular. " * 80, encoding="utf-8")
        classifier = make_classifier(settings)
        result = classifier.classify(post, dry_run=True)
        calls = len(classifier.prompts_for(read_post(post), classifier.terms_of(None))[0])
        assert server.counts["requests"] == 2 * calls  # each empty reply was re-asked once, then accepted
        assert "names no term at all" in server.requests[1]["messages"][-1]["content"]
        assert all(j.reason == NOT_RELEVANT for j in result.judgements)
    finally:
        server.stop()


def test_full_definitions_send_the_whole_instructions_and_are_cached_apart(
    eval_env: Callable[..., dict[str, str]], eval_site: Path, scripted_llm: FakeLLM
) -> None:
    compact = _settings(eval_env)
    full = compact.model_copy(update={"definitions": "full"})
    post = eval_site / "content" / "posts" / "p1.md"
    evaluate(compact, [post])
    assert "FULL-PROSE-Alpha" not in scripted_llm.requests[-1]["messages"][0]["content"]
    evaluate(full, [post])
    assert scripted_llm.counts["requests"] == 2  # compact judgements are not reused for full definitions
    assert "FULL-PROSE-Alpha" in scripted_llm.requests[-1]["messages"][0]["content"]
    evaluate(full, [post])
    assert scripted_llm.counts["requests"] == 2


def test_eval_reports_even_when_records_cannot_be_saved(
    eval_env: Callable[..., dict[str, str]], eval_site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_env()
    # A folder where the record should go: saving it fails the way a read-only site does (even for root).
    blocked = record_path(eval_site / "content" / "posts" / "p1.md")
    blocked.mkdir()
    code, out, _ = run_cli(capsys, "eval", str(eval_site / "content"))
    assert code == 0 and "1 records could not be saved" in out and "tags" in out
    assert blocked.is_dir()


def _chromium() -> str:
    """The chromium binary, installed from Debian's packages when missing and we may; else skip with the reason."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, capture_output=True, timeout=900)
    if done.returncode != 0:
        update = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, capture_output=True, timeout=900)
        if update.returncode != 0 or done.returncode != 0:
            pytest.skip(f"apt-get install chromium failed: {done.stderr.decode(errors='replace')[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


@pytest.mark.slow
def test_the_html_report_renders_in_headless_chromium(
    eval_env: Callable[..., dict[str, str]], eval_site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_env()
    report = tmp_path / "report.html"
    code, _, _ = run_cli(capsys, "eval", str(eval_site / "content"), "--report", str(report))
    assert code == 0
    html = report.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    browser = _chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    # The browser parsed the page: the table's rows and the curve's SVG are in its DOM.
    assert re.search(r"<table class=\"types\">.*<td>tags</td>", dom, re.S)
    assert re.search(r'<svg[^>]*class="pr-curve"[^>]*data-type="tags"', dom)
    polyline = re.search(r'<polyline class="curve"[^>]*points="([^"]+)"', dom)
    assert polyline and len(polyline.group(1).split()) == 101
    assert 'class="best"' in dom and 'class="current"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_of_the_corpus_with_the_offline_baseline(corpus: Path, tmp_path: Path) -> None:
    content = tmp_path / "content"
    shutil.copytree(corpus / "posts", content)
    before = snapshot(content)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        TAGGER_PROVIDER="offline",
        TAGGER_TAXONOMY_DIR=str(corpus / "taxonomy"),
        TAGGER_CONTENT_DIR=str(content),
    )
    paths = sorted(content.rglob("index.md"))[:12]
    result = evaluate(settings, paths)
    assert snapshot(content) == before
    assert {t.type for t in result.types} == {"categories", "concepts", "tags"}
    tags = next(t for t in result.types if t.type == "tags")
    assert tags.posts > 5 and 0 < tags.micro.precision <= 1
    assert all(record_path(p).exists() for p in paths)
    assert evaluate(settings, paths).cost.cached_terms == result.cost.judged_terms


def test_estimate_prices_the_lean_reply_lower(make_settings: Callable[..., Settings], fake_llm: FakeLLM) -> None:
    from worker.backfill import estimate, plan

    full = make_settings(TAGGER_MODEL="gpt-4o-mini")
    lean = make_settings(TAGGER_MODEL="gpt-4o-mini", TAGGER_REPLY="relevant")
    a, b = estimate(full, plan(full).todo), estimate(lean, plan(lean).todo)
    assert a.calls == b.calls and a.output_tokens > 0
    assert b.output_tokens < a.output_tokens * 0.2
    assert a.cost is not None and b.cost is not None and b.cost < a.cost
    assert fake_llm.counts["requests"] == 0


def test_the_diff_is_computed_only_for_dry_runs(make_settings: Callable[..., Settings], site: Path) -> None:
    classifier = make_classifier(make_settings())
    post = site / "site" / "posts" / "limiting-wip.md"
    shown = classifier.classify(post, dry_run=True)
    assert shown.diff.startswith("---") and "+  - Kanban" in shown.diff
    written = classifier.classify(post)
    assert written.written and written.diff == ""


def test_backfill_estimate_prices_a_post_against_one_call_per_term(
    eval_env: Callable[..., dict[str, str]], eval_site: Path, scripted_llm: FakeLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_env()
    code, out, _ = run_cli(capsys, "backfill", "--estimate", str(eval_site / "content"))
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("per post: $"))
    assert "reply all" in line and "one call per term: $" in line
    assert float(line.rsplit("(", 1)[1].rstrip("x)")) > 1  # four tags in one call beat four calls
    eval_env(TAGGER_REPLY="relevant")
    code, lean, _ = run_cli(capsys, "backfill", "--estimate", str(eval_site / "content"))
    cheaper = next(line for line in lean.splitlines() if line.startswith("per post: $"))
    assert "reply relevant" in cheaper and float(cheaper.split("$")[1].split()[0]) < float(
        line.split("$")[1].split()[0]
    )
    assert scripted_llm.counts["requests"] == 0


def test_a_post_that_cannot_be_evaluated_fails_alone(
    eval_env: Callable[..., dict[str, str]], eval_site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eval_env()
    bad = eval_site / "content" / "posts" / "p6.md"
    bad.write_text("---\ntitle: P6\ntags: {a: 1}\n---\nBody.\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", str(eval_site / "content"), "--json")
    assert code == 1
    assert "FAILED [settings]" in err and "p6.md: bad_post:" in err
    result = json.loads(out)
    assert result["posts"] == 5 and result["types"][0]["posts"] == 4
