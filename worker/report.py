"""The `tagger eval --report` page: one self-contained HTML file (inline CSS and SVG, no scripts, no assets)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from worker.evaluation import Evaluation, SweepPoint, TypeReport

WIDTH, HEIGHT, PAD = 360, 280, 44

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px}
body{color:#1d2430;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0}
th,td{border:1px solid #ccd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#eef1f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.curves{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figcaption{font-size:.9rem;color:#445}
code{background:#f2f3f7;padding:.1rem .3rem;border-radius:3px;word-break:break-all}
.gold{color:#1a6b34}.pred{color:#8a3b00}.muted{color:#667}
"""


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _money(value: float | None) -> str:
    return "n/a (no price)" if value is None else f"${value:.5f}"


def curve_svg(report: TypeReport) -> str:
    """A precision-recall curve (min_confidence 0-100 at the best `top`) as inline SVG, best and current marked."""
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def xy(recall: float, precision: float) -> tuple[float, float]:
        return PAD + recall * inner_w, PAD + (1 - precision) * inner_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" class="pr-curve" data-type="{escape(report.type)}">',
        f"<title>precision-recall curve for {escape(report.type)}</title>",
        f'<rect x="{PAD}" y="{PAD}" width="{inner_w}" height="{inner_h}" fill="#fafbfd" stroke="#99a"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, _ = xy(tick, 0)
        _, y = xy(0, tick)
        parts.append(f'<line x1="{x:.1f}" y1="{PAD}" x2="{x:.1f}" y2="{PAD + inner_h}" stroke="#e3e6ee"/>')
        parts.append(f'<line x1="{PAD}" y1="{y:.1f}" x2="{PAD + inner_w}" y2="{y:.1f}" stroke="#e3e6ee"/>')
        parts.append(f'<text x="{x:.1f}" y="{PAD + inner_h + 14}" font-size="10" text-anchor="middle">{tick:g}</text>')
        parts.append(f'<text x="{PAD - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{tick:g}</text>')
    parts.append(
        f'<text x="{PAD + inner_w / 2}" y="{HEIGHT - 6}" font-size="11" text-anchor="middle">recall</text>'
        f'<text x="12" y="{PAD + inner_h / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {PAD + inner_h / 2})">precision</text>'
    )
    points: Sequence[SweepPoint] = sorted(report.curve, key=lambda p: p.min_confidence)
    if points:
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(p.recall, p.precision) for p in points))
        parts.append(f'<polyline class="curve" fill="none" stroke="#2a62c9" stroke-width="2" points="{coords}"/>')
    if report.best:
        x, y = xy(report.best.recall, report.best.precision)
        parts.append(
            f'<circle class="best" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#1a8f45"><title>best: top '
            f"{report.best.top}, min_confidence {report.best.min_confidence:g}, F1 {report.best.f1:.3f}"
            "</title></circle>"
        )
    x, y = xy(report.micro.recall, report.micro.precision)
    parts.append(
        f'<rect class="current" x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="#c2410c"><title>current: '
        f"top {report.rule.top}, min_confidence {report.rule.min_confidence:g}, F1 {report.micro.f1:.3f}</title></rect>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _type_table(evaluation: Evaluation) -> str:
    rows = [
        "<table class='types'><thead><tr><th>type</th><th>posts</th><th>left out (no gold)</th>"
        "<th>gold outside the taxonomy</th><th>rule</th>"
        "<th>micro P</th><th>micro R</th><th>micro F1</th><th>macro P</th><th>macro R</th><th>macro F1</th>"
        "<th>best rule (F1)</th><th>most missed</th><th>most added</th></tr></thead><tbody>"
    ]
    for t in evaluation.types:
        best = f"top {t.best.top} ≥ {t.best.min_confidence:g} ({t.best.f1:.3f})" if t.best else "—"
        missed = ", ".join(f"{escape(m.term)} ({m.posts})" for m in t.missed[:5]) or "—"
        added = ", ".join(f"{escape(a.term)} ({a.posts})" for a in t.added[:5]) or "—"
        rows.append(
            f"<tr><td>{escape(t.type)}</td><td class='n'>{t.posts}</td><td class='n'>{t.left_out}</td>"
            f"<td class='n'>{t.outside_taxonomy}</td>"
            f"<td>top {t.rule.top} ≥ {t.rule.min_confidence:g}</td>"
            f"<td class='n'>{_pct(t.micro.precision)}</td><td class='n'>{_pct(t.micro.recall)}</td>"
            f"<td class='n'>{t.micro.f1:.3f}</td><td class='n'>{_pct(t.macro.precision)}</td>"
            f"<td class='n'>{_pct(t.macro.recall)}</td><td class='n'>{t.macro.f1:.3f}</td>"
            f"<td>{best}</td><td>{missed}</td><td>{added}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "".join(rows)


def _cost(evaluation: Evaluation) -> str:
    c = evaluation.cost
    u, j, n = c.usage, c.judging, max(1, c.posts)
    return (
        "<table class='cost'><thead><tr><th></th><th>this run</th><th>judging one post</th></tr></thead><tbody>"
        f"<tr><th>LLM calls</th><td class='n'>{u.calls}</td><td class='n'>{j.calls / n:.1f}</td></tr>"
        f"<tr><th>input tokens</th><td class='n'>{u.input_tokens}</td><td class='n'>{j.input_tokens / n:.0f}</td></tr>"
        f"<tr><th>cached input tokens</th><td class='n'>{u.cached_tokens}</td>"
        f"<td class='n'>{j.cached_tokens / n:.0f}</td></tr>"
        f"<tr><th>output tokens</th><td class='n'>{u.output_tokens}</td>"
        f"<td class='n'>{j.output_tokens / n:.0f}</td></tr>"
        f"<tr><th>dollars</th><td class='n'>{_money(c.dollars)}</td>"
        f"<td class='n'>{_money(c.dollars_per_post)}</td></tr>"
        "</tbody></table>"
        f"<p class='muted'>{c.posts} posts; {c.cached_terms} of {c.judged_terms} judgements from the cache.</p>"
    )


def _worst(evaluation: Evaluation) -> str:
    rows = [
        "<table class='worst'><thead><tr><th>post</th><th>F1</th><th>gold</th><th>predicted</th></tr></thead><tbody>"
    ]
    for p in evaluation.worst:
        gold = "<br>".join(f"<b>{escape(t)}</b>: {escape(', '.join(v)) or '(none)'}" for t, v in p.gold.items())
        pred = "<br>".join(f"<b>{escape(t)}</b>: {escape(', '.join(v)) or '(none)'}" for t, v in p.predicted.items())
        rows.append(
            f"<tr><td><code>{escape(p.post)}</code></td><td class='n'>{p.f1:.3f}</td>"
            f"<td class='gold'>{gold}</td><td class='pred'>{pred}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "".join(rows)


def _section(evaluation: Evaluation) -> str:
    e = evaluation
    figures = "".join(
        f"<figure>{curve_svg(t)}<figcaption>{escape(t.type)}: line = min_confidence 0→100 at top "
        f"{t.best.top if t.best else '—'}; ● best, ■ current rule</figcaption></figure>"
        for t in e.types
        if t.posts
    )
    failed = (
        "<p>Failed posts (left out):</p><ul>" + "".join(f"<li>{escape(f)}</li>" for f in e.failed) + "</ul>"
        if e.failed
        else ""
    )
    return (
        f"<section><h2>{escape(e.label)}</h2>"
        f"<p class='muted'>provider {escape(e.provider)}, model {escape(e.model)}, chunk size {e.chunk_size}, "
        f"definitions {escape(e.definitions)}, reply {escape(e.reply)}</p>"
        f"{_type_table(e)}"
        f"<h3>Suggested selection</h3><p><code>{escape(e.suggested_selection_env())}</code></p>"
        f"<h3>Precision–recall curves</h3><div class='curves'>{figures or '<p>No type has gold labels.</p>'}</div>"
        f"<h3>Cost of this run</h3>{_cost(e)}"
        f"<h3>Worst posts</h3>{_worst(e)}{failed}</section>"
    )


def _comparison(evaluations: Sequence[Evaluation]) -> str:
    types = list(dict.fromkeys(t.type for e in evaluations for t in e.types))
    head = "".join(f"<th>F1 {escape(t)}</th>" for t in types)
    rows = [
        "<table class='compare'><thead><tr><th>settings</th>"
        f"{head}<th>calls / post</th><th>tokens in / out per post</th><th>$ / post</th></tr></thead><tbody>"
    ]
    for e in evaluations:
        f1 = {t.type: t.micro.f1 for t in e.types}
        n = max(1, e.cost.posts)
        u = e.cost.judging
        cells = "".join(f"<td class='n'>{f1[t]:.3f}</td>" if t in f1 else "<td>—</td>" for t in types)
        rows.append(
            f"<tr><td>{escape(e.label)}</td>{cells}<td class='n'>{u.calls / n:.1f}</td>"
            f"<td class='n'>{u.input_tokens / n:.0f} / {u.output_tokens / n:.0f}</td>"
            f"<td class='n'>{_money(e.cost.dollars_per_post)}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "".join(rows)


def render(evaluations: Sequence[Evaluation], title: str = "tagger eval") -> str:
    """The whole report: a comparison table when there are several settings, then one section per settings."""
    compare = f"<h2>Comparison</h2>{_comparison(evaluations)}" if len(evaluations) > 1 else ""
    body = "".join(_section(e) for e in evaluations)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
        f"<body><h1>{escape(title)}</h1>"
        "<p class='muted'>Precision: share of tagger's picks that are in the gold labels. Recall: share of the gold "
        "labels tagger picked. Micro: over every (post, term) pair; macro: the mean over terms seen in the gold or "
        "the picks. Posts without gold labels for a type are left out of that type.</p>"
        f"{compare}{body}</body></html>\n"
    )
