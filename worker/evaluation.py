"""Judgement quality against a site's own labels: precision, recall and F1 per type, a threshold sweep, cost.

Posts are judged through the classifier's cache (the record beside each post, or a cache folder of its own for
`--compare`) and never written; gold labels are the terms in each post's front matter that tagger did not
assign itself (per the post's record), or a JSON Lines file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dotenv import dotenv_values
from pydantic import BaseModel, ValidationError

from worker.classifier import Classifier, make_classifier
from worker.errors import BadGold, BadSettingsFile, TaggerError
from worker.posts import Post, normal_form
from worker.records import Record, dumps, loads, reconcile
from worker.results import Judgement, Usage
from worker.settings import FOLDER_SETTINGS, Price, SelectionRule, Settings
from worker.writeback import cache_record

SWEEP_CONFIDENCES = range(0, 101)
SWEEP_TOPS = range(1, 31)
WORST_POSTS = 10
TOP_TERMS = 10


class Scores(BaseModel):
    """Precision, recall and F1, with the counts they come from (micro) or the terms averaged over (macro)."""

    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0


class SweepPoint(BaseModel):
    """Micro precision, recall and F1 of one selection rule."""

    top: int
    min_confidence: float
    precision: float
    recall: float
    f1: float


class TermCount(BaseModel):
    """A term and how many posts it was missed in (or added to)."""

    term: str
    posts: int


class TypeReport(BaseModel):
    """One type's agreement with the gold labels."""

    type: str
    posts: int
    left_out: int
    gold_terms: int
    outside_taxonomy: int
    rule: SelectionRule
    micro: Scores
    macro: Scores
    macro_terms: int
    missed: list[TermCount]
    added: list[TermCount]
    best: SweepPoint | None
    curve: list[SweepPoint]


class PostReport(BaseModel):
    """One post's gold and predicted terms per type, and its micro F1 over the types it has gold for."""

    post: str
    gold: dict[str, list[str]]
    predicted: dict[str, list[str]]
    f1: float


class Cost(BaseModel):
    """What this run spent, and what judging the posts costs under these settings (from this run or the cache).

    Dollars at TAGGER_PRICES; None when the model has no price.
    """

    usage: Usage
    dollars: float | None
    judging: Usage
    judging_dollars: float | None
    posts: int
    cached_terms: int
    judged_terms: int

    @property
    def dollars_per_post(self) -> float | None:
        """What judging one post costs under these settings, or None when the model has no price."""
        return None if self.judging_dollars is None else self.judging_dollars / max(1, self.posts)


class Evaluation(BaseModel):
    """The result of one `tagger eval` run under one settings object."""

    label: str
    provider: str
    model: str
    chunk_size: int
    definitions: str
    reply: str
    posts: int
    failed: list[str]
    types: list[TypeReport]
    cost: Cost
    worst: list[PostReport]
    selection: dict[str, SelectionRule]
    records_unsaved: int = 0

    def suggested_selection(self) -> dict[str, SelectionRule]:
        """TAGGER_SELECTION with each evaluated type's rule replaced by the one that maximised F1."""
        rules = dict(self.selection)
        for report in self.types:
            if report.best:
                best = {"top": report.best.top, "min_confidence": report.best.min_confidence}
                rules[report.type] = report.rule.model_copy(update=best)
        return rules

    def suggested_selection_env(self) -> str:
        """The suggestion as a line for a settings file."""
        value = {k: v.model_dump(exclude_none=True) for k, v in self.suggested_selection().items()}
        return "TAGGER_SELECTION=" + json.dumps(value, separators=(",", ":"))


def prf(tp: int, fp: int, fn: int) -> Scores:
    """Precision, recall and F1 from counts (0 where undefined, as scikit-learn's zero_division=0)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return Scores(
        precision=round(precision, 4),
        recall=round(recall, 4),
        f1=round(f1, 4),
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
    )


def ranked(judgements: Iterable[Judgement]) -> list[Judgement]:
    """Judgements in the order selection takes them: highest confidence first, then by term."""
    return sorted(judgements, key=lambda j: (-j.confidence, j.term))


def pick(judgements: Sequence[Judgement], rule: SelectionRule) -> list[str]:
    """The terms a selection rule takes from judgements (no human-edit rules: those are not judgement)."""
    return [j.term for j in ranked(judgements) if j.confidence >= rule.min_confidence][: rule.top]


@dataclass(frozen=True)
class Labelled:
    """One evaluated post: its path relative to the root, gold per type (None: left out), judgements per type."""

    post: str
    gold: dict[str, list[str] | None]
    judged: dict[str, list[Judgement]]


class Case(BaseModel):
    """One post of one type: confidences (ranked) with whether each term is gold, and the gold count."""

    confidences: list[float]
    is_gold: list[bool]
    gold: int


def sweep_point(cases: Sequence[Case], top: int, min_confidence: float) -> SweepPoint:
    """Micro scores of `top` terms at or above `min_confidence`, over all cases."""
    tp = fp = fn = 0
    for case in cases:
        taken = sum(1 for c in case.confidences[:top] if c >= min_confidence)
        hits = sum(case.is_gold[:taken])
        tp += hits
        fp += taken - hits
        fn += case.gold - hits
    s = prf(tp, fp, fn)
    return SweepPoint(top=top, min_confidence=min_confidence, precision=s.precision, recall=s.recall, f1=s.f1)


def sweep(cases: Sequence[Case]) -> list[SweepPoint]:
    """Every rule from top 1-30 and min_confidence 0-100, computed from the confidences already judged."""
    return [sweep_point(cases, top, float(m)) for top in SWEEP_TOPS for m in SWEEP_CONFIDENCES]


def best_of(points: Sequence[SweepPoint]) -> SweepPoint | None:
    """The rule with the highest F1; ties go to higher precision, then the stricter floor, then fewer terms."""
    if not points:
        return None
    return max(points, key=lambda p: (p.f1, p.precision, p.min_confidence, -p.top))


def dollars(usage: Usage, price: Price | None) -> float | None:
    """US dollars for `usage` at `price` (cached input at its own price), or None without a price."""
    if price is None:
        return None
    uncached = usage.input_tokens - usage.cached_tokens
    return (
        uncached * price.input + usage.cached_tokens * price.cached_input + usage.output_tokens * price.output
    ) / 1_000_000


def load_gold(path: Path, root: Path) -> dict[Path, dict[str, list[str]]]:
    """Gold labels from JSON Lines: `{"post": "<path relative to the content root>", "<type>": ["term", ...]}`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadGold(f"gold file unreadable: {exc}", path=path) from exc
    gold: dict[Path, dict[str, list[str]]] = {}
    resolved_root = root.expanduser().resolve()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise BadGold(f"{where}: not JSON: {exc}") from exc
        if not isinstance(item, dict) or not isinstance(item.get("post"), str):
            raise BadGold(f'{where}: each line must be an object with "post": "<path relative to the content root>"')
        post = (resolved_root / item["post"]).resolve()
        if not post.is_relative_to(resolved_root):
            raise BadGold(f"{where}: post {item['post']!r} is outside the content root {resolved_root}")
        if not post.is_file():
            raise BadGold(f"{where}: post {item['post']!r} not found under {resolved_root}")
        if post in gold:
            raise BadGold(f"{where}: post {item['post']!r} is listed twice")
        labels: dict[str, list[str]] = {}
        for key, value in item.items():
            if key == "post":
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadGold(f"{where}: {key!r} must be a list of term titles")
            labels[key] = [v.strip() for v in value if v.strip()]
        gold[post] = labels
    return gold


def read_settings_file(path: Path, base: Settings | None = None) -> Settings:
    """Settings from `base` (the environment and `.env`) with every value in the file `path` taking precedence."""
    if not path.is_file():
        raise BadSettingsFile(f"settings file not found: {path}", path=path)
    values = {k: v for k, v in dotenv_values(path).items() if v not in (None, "")}
    known = {field.alias or name for name, field in Settings.model_fields.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadSettingsFile(f"{path}: not tagger settings: {', '.join(unknown)}", path=path)
    fields = {field.alias or name: name for name, field in Settings.model_fields.items()}
    current = (base or Settings()).model_dump(by_alias=True)
    for key in FOLDER_SETTINGS:  # relative to the file's folder, as in any env file
        value = values.get(key)
        if value and not Path(value).expanduser().is_absolute():
            values[key] = str(path.parent / value)
    for key, value in values.items():
        if isinstance(current.get(key), dict | list):
            # Structured settings (TAGGER_SELECTION, TAGGER_PRICES...) are JSON, as in the environment.
            try:
                current[key] = json.loads(value or "")
            except ValueError as exc:
                raise BadSettingsFile(f"{path}: {key} is not JSON: {exc}", path=path) from exc
        else:
            current[key] = value
    try:
        return Settings(_env_file=None, **current)
    except ValidationError as exc:
        problems = "; ".join(f"{fields.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()[:5])
        raise BadSettingsFile(f"{path}: {problems}", path=path) from exc


def _cache_path(cache_dir: Path, root: Path, path: Path) -> Path:
    try:
        relative = path.resolve().relative_to(root)
    except ValueError:
        relative = Path(path.resolve().as_posix().lstrip("/"))
    return cache_dir / relative.with_name(f"{relative.name}.json")


def _load_cache(cache_dir: Path, root: Path, path: Path) -> Record:
    try:
        return loads(_cache_path(cache_dir, root, path).read_bytes())
    except (OSError, ValueError, TypeError, KeyError):
        return Record()  # a missing or damaged cache entry only costs a re-judgement


def _save_cache(cache_dir: Path, root: Path, path: Path, record: Record) -> None:
    # Not a RecordStore mirror: that would move the site's own record out from beside the post.
    target = _cache_path(cache_dir, root, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(dumps(record))


def evaluate(
    settings: Settings,
    paths: Sequence[Path],
    *,
    gold: Mapping[Path, Mapping[str, Sequence[str]]] | None = None,
    types: Sequence[str] | None = None,
    cache_dir: Path | None = None,
    label: str = "settings",
    classifier: Classifier | None = None,
) -> Evaluation:
    """Judge `paths` (cached; posts never written) and compare tagger's selections with the gold labels."""
    classifier = classifier or make_classifier(settings)
    root = settings.content_root()
    wanted = [t for t in classifier.taxonomy.types() if not types or t in types]
    titles = {t: {normal_form(term.title): term.title for term in classifier.taxonomy.of_type(t)} for t in wanted}
    usage = judging = Usage()
    failed: list[str] = []
    cached_terms = judged_terms = unsaved = evaluated = 0
    rows: list[Labelled] = []
    known_terms = {(t.type, t.title) for t in classifier.taxonomy}
    outside: Counter[str] = Counter()
    for path in paths:
        try:
            post = classifier.read(path)
            if classifier.skip_reason(post) is not None:
                continue  # nothing to judge, or no front matter (classify skips it too)
            stored = classifier.records.load(path)
            site_record = reconcile(stored, post)
            record = site_record if cache_dir is None else _load_cache(cache_dir, root, path)
            labels = _gold_of(post, site_record, gold, wanted, titles, outside)
            judged = classifier.judge(post, classifier.terms_for(post, wanted), record)
            judgements, used, hits = judged.judgements, judged.usage, judged.cached
        except TaggerError as exc:
            failed.append(f"{path}: {exc.kind}: {exc.message}")
            usage = usage.add(exc.usage or Usage())  # a failed post's calls were paid for too
            continue
        evaluated += 1
        usage = usage.add(used)
        # What judging this post cost: this run's calls, else those recorded when its judgements were made.
        spent = (used if not hits else record.usage.add(used)) if used.calls else record.usage
        judging = judging.add(spent)
        cached_terms += hits
        judged_terms += len(judgements)
        if used.calls or hits < len(judgements):
            # Earlier judgements of other types stay (the cache), those of terms gone from the taxonomy do not.
            kept = {(j.type, j.term): j for j in record.judgements if (j.type, j.term) in known_terms}
            kept.update({(j.type, j.term): j for j in judgements})
            updated = record.model_copy(
                update={
                    "post": record.post or str(path),
                    "content_hash": record.content_hash or post.content_hash,
                    "judgements": list(kept.values()),
                    # New judgements the post's terms were not decided on: not fresh, so a backfill writes it.
                    "file_hash": "" if used.calls else record.file_hash,
                    "usage": spent,
                    "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )
            try:
                if cache_dir is None:  # as `classify` keeps judgements: another writer's newer record stands
                    cache_record(classifier.records, path, stored, updated)
                else:
                    _save_cache(cache_dir, root, path, updated)
            except (OSError, TaggerError):
                unsaved += 1  # a read-only site can still be evaluated; only the cache is lost
        try:
            relative = path.resolve().relative_to(root).as_posix()
        except ValueError:
            relative = str(path)
        rows.append(Labelled(relative, labels, {t: [j for j in judgements if j.type == t] for t in wanted}))

    reports = [_type_report(t, settings.rule_for(t), rows, outside[t]) for t in wanted]
    worst = _worst_posts(rows, settings)
    price = settings.prices.get(settings.model)
    return Evaluation(
        label=label,
        provider=classifier.provider.name,
        model=classifier.provider.model,
        chunk_size=settings.chunk_size,
        definitions=settings.definitions,
        reply=settings.reply,
        posts=evaluated,
        failed=failed,
        types=reports,
        cost=Cost(
            usage=usage,
            dollars=dollars(usage, price) if classifier.provider.name != "offline" else 0.0,
            judging=judging,
            judging_dollars=dollars(judging, price) if classifier.provider.name != "offline" else 0.0,
            posts=evaluated,
            cached_terms=cached_terms,
            judged_terms=judged_terms,
        ),
        worst=worst,
        selection=dict(settings.selection),
        records_unsaved=unsaved,
    )


def _gold_of(
    post: Post,
    record: Record,
    gold: Mapping[Path, Mapping[str, Sequence[str]]] | None,
    wanted: Sequence[str],
    titles: Mapping[str, Mapping[str, str]],
    outside: Counter[str],
) -> dict[str, list[str] | None]:
    """A post's gold terms per type (taxonomy titles), or None for a type it has no usable label for."""
    labels: dict[str, list[str] | None] = {}
    for term_type in wanted:
        raw: list[str] | None
        if gold is not None:
            # In a gold file an explicit empty list is a label ("no term of this type applies").
            given = gold.get(post.path.resolve(), {}).get(term_type)
            raw = list(given) if given is not None else None
        else:
            # In front matter an empty list usually means "not classified yet": left out.
            ai = {normal_form(t) for t in record.assigned.get(term_type, [])}
            raw = [t for t in post.terms(term_type) if normal_form(t) not in ai] or None
        names = titles[term_type]
        known = [names[normal_form(t)] for t in raw or [] if normal_form(t) in names]
        outside[term_type] += len(raw or []) - len(known)
        # Gold made only of terms outside the taxonomy (e.g. "Uncategorized") cannot be judged: left out.
        labels[term_type] = None if raw is None or (raw and not known) else list(dict.fromkeys(known))
    return labels


def _type_report(
    term_type: str,
    rule: SelectionRule,
    rows: Sequence[Labelled],
    outside: int,
) -> TypeReport:
    cases: list[Case] = []
    per_term: dict[str, list[int]] = {}
    missed: Counter[str] = Counter()
    added: Counter[str] = Counter()
    left_out = 0
    gold_terms = 0
    for row in rows:
        gold = row.gold[term_type]
        if gold is None:
            left_out += 1
            continue
        gold_set = set(gold)
        gold_terms += len(gold_set)
        order = ranked(row.judged[term_type])
        cases.append(
            Case(
                confidences=[j.confidence for j in order],
                is_gold=[j.term in gold_set for j in order],
                gold=len(gold_set),
            )
        )
        predicted = set(pick(order, rule))
        for term in gold_set | predicted:
            counts = per_term.setdefault(term, [0, 0, 0])
            if term in gold_set and term in predicted:
                counts[0] += 1
            elif term in predicted:
                counts[1] += 1
                added[term] += 1
            else:
                counts[2] += 1
                missed[term] += 1
    micro = prf(*(sum(c[i] for c in per_term.values()) for i in range(3)))
    each = [prf(*c) for c in per_term.values()]
    n = len(each)
    macro = Scores(
        precision=round(sum(s.precision for s in each) / n, 4) if n else 0.0,
        recall=round(sum(s.recall for s in each) / n, 4) if n else 0.0,
        f1=round(sum(s.f1 for s in each) / n, 4) if n else 0.0,
    )
    points = sweep(cases) if cases else []
    best = best_of(points)
    curve = [p for p in points if best and p.top == best.top]
    return TypeReport(
        type=term_type,
        posts=len(cases),
        left_out=left_out,
        gold_terms=gold_terms,
        outside_taxonomy=outside,
        rule=rule,
        micro=micro,
        macro=macro,
        macro_terms=n,
        missed=[TermCount(term=t, posts=c) for t, c in sorted(missed.items(), key=lambda x: (-x[1], x[0]))[:TOP_TERMS]],
        added=[TermCount(term=t, posts=c) for t, c in sorted(added.items(), key=lambda x: (-x[1], x[0]))[:TOP_TERMS]],
        best=best,
        curve=curve,
    )


def _worst_posts(rows: Sequence[Labelled], settings: Settings) -> list[PostReport]:
    posts = []
    for row in rows:
        gold = {t: g for t, g in row.gold.items() if g is not None}
        if not gold:
            continue
        predicted = {t: pick(row.judged[t], settings.rule_for(t)) for t in gold}
        tp = sum(len(set(gold[t]) & set(predicted[t])) for t in gold)
        fp = sum(len(set(predicted[t]) - set(gold[t])) for t in gold)
        fn = sum(len(set(gold[t]) - set(predicted[t])) for t in gold)
        posts.append(PostReport(post=row.post, gold=gold, predicted=predicted, f1=prf(tp, fp, fn).f1))
    return sorted(posts, key=lambda p: (p.f1, p.post))[:WORST_POSTS]
