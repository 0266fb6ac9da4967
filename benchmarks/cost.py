"""Cost benchmark: LLM calls, tokens and dollars per post, tagger's configurations against one call per term.

All are measured in the same run through the real openai SDK against the fake server (tokens estimated as
`backfill --estimate` does, near OpenAI's tokenizer, the same way for all; the fake's replies follow the requested
schema with reasons of about 20 words, so output tokens are realistic). Dollars at gpt-4o-mini's price in the
default TAGGER_PRICES.
Last, dollars per post for a synchronous backfill against a Batch API backfill (`backfill --batch`).
Usage: .venv/bin/python benchmarks/cost.py [--batch-only | --paid-once]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._support import fake_settings, need_corpus, scratch_posts
from tests.fakellm import FakeLLM
from worker import batch_backfill as batch
from worker.backfill import estimate, estimate_ratios, plan, run_inline
from worker.classifier import make_classifier
from worker.evaluation import dollars
from worker.logs import configure
from worker.posts import read_post
from worker.records import load_record
from worker.results import Usage
from worker.settings import DEFAULT_PRICES, Settings
from worker.taxonomy import taxonomy_for

PRICE = DEFAULT_PRICES["gpt-4o-mini"]
CHUNK = Settings(_env_file=None).chunk_size  # type: ignore[call-arg]
CONFIGURATIONS = (  # label, TAGGER_CHUNK_SIZE, TAGGER_DEFINITIONS, TAGGER_REPLY
    ("defaults: compact, all", CHUNK, "compact", "all"),
    ("compact, relevant", CHUNK, "compact", "relevant"),
    ("full, all", CHUNK, "full", "all"),
    ("full, relevant", CHUNK, "full", "relevant"),
    ("one call per term, compact", 1, "compact", "all"),
    ("one call per term, full", 1, "full", "all"),
)


def spent(posts: list[Path]) -> Usage:
    """The usage the posts' records hold (what their last classification spent)."""
    total = Usage()
    for path in posts:
        total = total.add(load_record(path).usage)
    return total


def sync_vs_batch(corpus: Path) -> None:
    """Dollars per post: a synchronous backfill and a Batch API backfill of the same posts, same fake answers."""
    taxonomy = corpus / "taxonomy"
    results = {}
    for mode in ("synchronous", "batch"):
        content = scratch_posts(corpus / "posts")
        fake = FakeLLM().start()
        try:
            settings = fake_settings(fake, taxonomy, TAGGER_MODEL="gpt-4o-mini", TAGGER_CONTENT_DIR=str(content))
            todo = plan(settings).todo
            if mode == "synchronous":
                failed = run_inline(settings, todo).failed
            else:
                store = batch.store_for(settings, None)
                submitted = batch.submit(settings, todo, store)
                collected = batch.collect(settings, store)
                failed = submitted.failed + collected.failed + collected.inline
            assert not failed, failed
            posts = sorted(content.rglob("index.md"))
            results[mode] = (len(posts), spent(posts), {p.relative_to(content): p.read_bytes() for p in posts})
        finally:
            fake.stop()
            shutil.rmtree(content, ignore_errors=True)
    n, sync_usage, sync_posts = results["synchronous"]
    _, batch_usage, batch_posts = results["batch"]
    assert sync_posts == batch_posts, "a batch backfill must write what a synchronous one writes"
    sync_cost, batch_cost = (dollars(sync_usage, PRICE) or 0) / n, (dollars(batch_usage, PRICE.batch()) or 0) / n
    print("dollars per post, synchronous against --batch (gpt-4o-mini, TAGGER_PRICES defaults; batch: half):")
    print(f"{'':28}{'synchronous':>14}{'--batch':>14}{'ratio':>8}")
    print(f"{'LLM requests / post':28}{sync_usage.calls / n:14.2f}{batch_usage.calls / n:14.2f}")
    print(f"{'input tokens / post':28}{sync_usage.input_tokens / n:14.1f}{batch_usage.input_tokens / n:14.1f}")
    print(f"{'output tokens / post':28}{sync_usage.output_tokens / n:14.1f}{batch_usage.output_tokens / n:14.1f}")
    print(f"{'$ / post':28}{sync_cost:14.6f}{batch_cost:14.6f}{sync_cost / batch_cost:8.2f}x")
    print(f"{'$ for a 1,800-post site':28}{sync_cost * 1800:14.2f}{batch_cost * 1800:14.2f}")
    print(f"posts written identically by both: {len(sync_posts)}/{n}")


RECORDS = Path(tempfile.gettempdir()) / f"tagger-cost-records-{os.getpid()}"


def own_records(posts: list[Path]) -> dict[str, str]:
    """A records folder of its own for one run (and the posts' folder as the content root, so records go there):
    a dry run keeps its judgements, and the next configuration must not reuse them."""
    RECORDS.mkdir(exist_ok=True)
    return {"TAGGER_CONTENT_DIR": os.path.commonpath(posts), "TAGGER_RECORDS_DIR": tempfile.mkdtemp(dir=RECORDS)}


def run(
    fake: FakeLLM, posts: list[Path], taxonomy: Path, chunk_size: int, shortlist: float = 0
) -> tuple[dict[str, int], list[set[tuple[str, str]]]]:
    """Classify (dry run) every post; return the server's counters and the terms the LLM judged per post."""
    before = dict(fake.counts)
    settings = fake_settings(
        fake, taxonomy, TAGGER_CHUNK_SIZE=chunk_size, TAGGER_SHORTLIST_MIN=shortlist, **own_records(posts)
    )
    classifier = make_classifier(settings)
    judged = []
    for path in posts:
        result = classifier.classify(path, dry_run=True)
        judged.append({(j.type, j.term) for j in result.judgements if j.provider != "shortlist"})
    return {k: fake.counts[k] - before.get(k, 0) for k in ("requests", "prompt_tokens", "cached_tokens")}, judged


def spend(fake: FakeLLM, posts: list[Path], taxonomy: Path, chunk_size: int, definitions: str, reply: str) -> Usage:
    """Usage of classifying (dry run) every post under one configuration, starting with a cold prefix cache."""
    fake._seen_prefixes.clear()
    settings = fake_settings(
        fake,
        taxonomy,
        TAGGER_CHUNK_SIZE=chunk_size,
        TAGGER_DEFINITIONS=definitions,
        TAGGER_REPLY=reply,
        **own_records(posts),
    )
    classifier = make_classifier(settings)
    usage = Usage()
    for path in posts:
        usage = usage.add(classifier.classify(path, dry_run=True).usage)
    return usage


def dollars_table(posts: list[Path], taxonomy: Path) -> None:
    """Calls, tokens and dollars per post for each configuration, against one call per term."""
    fake = FakeLLM().start()
    try:
        rows = [(label, spend(fake, posts, taxonomy, size, d, r)) for label, size, d, r in CONFIGURATIONS]
    finally:
        fake.stop()
    n = len(posts)
    baseline = dollars(rows[-2][1], PRICE) or 0.0
    print(
        f"dollars per post at gpt-4o-mini (${PRICE.input}/M input, ${PRICE.cached_input}/M cached, "
        f"${PRICE.output}/M output):"
    )
    print(
        f"  {'configuration':<28}{'calls':>7}{'input':>10}{'cached':>9}{'output':>9}{'$ / post':>11}{'vs 1/term':>11}"
    )
    for label, usage in rows:
        cost = (dollars(usage, PRICE) or 0.0) / n
        print(
            f"  {label:<28}{usage.calls / n:>7.1f}{usage.input_tokens / n:>10.0f}{usage.cached_tokens / n:>9.0f}"
            f"{usage.output_tokens / n:>9.0f}{cost:>11.5f}{baseline / n / cost if cost else float('inf'):>10.1f}x"
        )


def paid_once(corpus: Path) -> None:
    """`backfill --estimate`'s ratios on the corpus: all and relevant, sync and batch, against one call per term.

    Each configuration (types packed into one call or one call per type; chunks of 60 or the default) is priced in the
    same run against the same baseline (one call per post and term, synchronous), at gpt-4o-mini's list prices.
    """
    content = scratch_posts(corpus / "posts")
    try:
        todo = sorted(content.rglob("index.md"))
        print("the post paid once: dollars per post against one call per term synchronously (backfill --estimate)")
        print(f"  {'configuration':<40}{'all sync':>10}{'all batch':>11}{'rel. sync':>11}{'rel. batch':>11}")
        for label, pack, chunk in (
            ("one call per type (before)", False, 60),
            ("types packed, chunks of 60", True, 60),
            (f"types packed, chunks of {CHUNK} (default)", True, CHUNK),
        ):
            settings = Settings(  # type: ignore[call-arg]
                _env_file=None,
                TAGGER_PROVIDER="openai",
                OPENAI_API_KEY="sk-estimate",
                TAGGER_MODEL="gpt-4o-mini",
                TAGGER_TAXONOMY_DIR=str(corpus / "taxonomy"),
                TAGGER_CONTENT_DIR=str(content),
                TAGGER_PACK_TYPES=pack,
                TAGGER_CHUNK_SIZE=chunk,
            )
            ratios = {(r.reply, r.batch): r.ratio for r in estimate_ratios(settings, todo)}
            cells = "".join(
                f"{ratios[(reply, batch)]:>{w}.1f}x"
                for (reply, batch), w in (
                    (("all", False), 9),
                    (("all", True), 10),
                    (("relevant", False), 10),
                    (("relevant", True), 10),
                )
            )
            print(f"  {label:<40}{cells}")
        relevant = settings.model_copy(update={"reply": "relevant"})  # the default chunk, types packed
        est = estimate(relevant, todo)
        base = estimate(relevant.model_copy(update={"chunk_size": 1, "reply": "all"}), todo)
        n = est.posts
        uncached = est.input_tokens - est.cached_tokens
        print(
            f"where a post's dollars go (relevant, sync, default chunk): {est.calls / n:.1f} calls, "
            f"${(est.cost or 0) / n:.5f} = cached prefix (rubric, definitions, schema) "
            f"{est.cached_tokens / n:.0f} tokens "
            f"${est.cached_tokens * PRICE.cached_input / 1e6 / n:.5f} + uncached (the post) {uncached / n:.0f} tokens "
            f"${uncached * PRICE.input / 1e6 / n:.5f} + output {est.output_tokens / n:.0f} tokens "
            f"${est.output_tokens * PRICE.output / 1e6 / n:.5f}; one call per term ${(base.cost or 0) / n:.5f}"
        )
    finally:
        shutil.rmtree(content, ignore_errors=True)


def main() -> None:
    try:
        measure()
    finally:
        shutil.rmtree(RECORDS, ignore_errors=True)


def measure() -> None:
    """Every table, or the one named on the command line."""
    configure(Settings(_env_file=None, TAGGER_LOG_LEVEL="WARNING"))  # type: ignore[call-arg]
    corpus = need_corpus()
    if "--batch-only" in sys.argv:
        sync_vs_batch(corpus)
        return
    if "--paid-once" in sys.argv:
        paid_once(corpus)
        return
    content = scratch_posts(corpus / "posts")
    posts = sorted(content.rglob("index.md"))
    taxonomy = corpus / "taxonomy"
    fake = FakeLLM().start()
    try:
        tagger, judged = run(fake, posts, taxonomy, chunk_size=Settings(_env_file=None).chunk_size)  # type: ignore[call-arg]
        fake._seen_prefixes.clear()
        baseline, _ = run(fake, posts, taxonomy, chunk_size=1)
    finally:
        fake.stop()
    sweep = []
    fake = FakeLLM().start()
    try:
        for floor in (5.0, 10.0, 20.0, 30.0):
            counts, asked = run(fake, posts, taxonomy, chunk_size=Settings(_env_file=None).chunk_size, shortlist=floor)  # type: ignore[call-arg]
            sweep.append((floor, counts, asked))
    finally:
        fake.stop()
    terms = {(t.type, t.title) for t in taxonomy_for(Settings(_env_file=None, TAGGER_TAXONOMY_DIR=str(taxonomy)))}  # type: ignore[call-arg]
    picked = [
        {(ty, ti) for ty in ("categories", "tags", "concepts") for ti in read_post(p).terms(ty) if (ty, ti) in terms}
        for p in posts
    ]
    picks = sum(len(p) for p in picked)

    def recall(asked: list[set[tuple[str, str]]]) -> int:
        return sum(len(p & a) for p, a in zip(picked, asked, strict=True))

    hits = recall(judged)
    n = len(posts)
    print(f"posts: {n}, terms: {len(terms)}")
    print(f"{'':28}{'tagger defaults':>18}{'one call per term':>20}{'ratio':>8}")
    for label, key in (
        ("LLM calls / post", "requests"),
        ("input tokens / post", "prompt_tokens"),
        ("cacheable input tokens / post", "cached_tokens"),
    ):
        a, b = tagger[key] / n, baseline[key] / n
        print(f"{label:28}{a:18.1f}{b:20.1f}{(b / a if a else float('inf')):8.1f}x")
    uncached_a = (tagger["prompt_tokens"] - tagger["cached_tokens"]) / n
    uncached_b = (baseline["prompt_tokens"] - baseline["cached_tokens"]) / n
    print(f"{'uncached input tokens / post':28}{uncached_a:18.1f}{uncached_b:20.1f}{uncached_b / uncached_a:8.1f}x")
    print(
        "recall of the peer's front-matter picks among the terms tagger judged: "
        f"{hits}/{picks} = {hits / max(picks, 1):.3f}"
    )
    print("optional shortlist (TAGGER_SHORTLIST_MIN, local word-overlap confidence floor):")
    for floor, counts, asked in sweep:
        share = sum(len(a) for a in asked) / (n * len(terms))
        print(
            f"  floor {floor:>4}: terms asked {share:6.1%}, input tokens / post {counts['prompt_tokens'] / n:8.1f}, "
            f"recall {recall(asked) / max(picks, 1):.3f}"
        )
    dollars_table(posts, taxonomy)
    sync_vs_batch(corpus)
    paid_once(corpus)


if __name__ == "__main__":
    main()
