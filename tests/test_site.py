"""The first hour on your own site: `tagger init`, `taxonomy check`, dry runs that pay once, records out of `public/`."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.fakellm import FakeLLM
from worker.backfill import plan, run_inline
from worker.classifier import make_classifier
from worker.cli import main
from worker.cli.app import LogPace, progress
from worker.envfile import field_names
from worker.evaluation import evaluate
from worker.logs import configure
from worker.posts import read_post
from worker.records import RecordStore, load_record, record_path
from worker.records_move import move_records, published_records_warning
from worker.settings import Settings
from worker.site_init import detect_generator, init_site

TAGGER = Path(sys.executable).parent / "tagger"
HUGO_DOCS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "hugo-docs"
HUGO_POST = """---
title: {title}
tags: [{tags}]
categories:
  - DevOps
---
{body}
"""


def cli(*argv: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(argv), catch_exceptions=False)
    configure(Settings(_env_file=None), stream=sys.__stderr__, quiet=True)  # type: ignore[call-arg]
    return result.exit_code, result.stdout, result.stderr


def hugo_site(root: Path) -> Path:
    """A small Hugo site: hugo.toml, three posts using two term keys (one term spelled two ways)."""
    (root / "content" / "posts").mkdir(parents=True)
    (root / "hugo.toml").write_text('baseURL = "https://example.org/"\ntitle = "blog"\n', encoding="utf-8")
    posts = {
        "kanban.md": ("Kanban boards", '"Kanban", "Go: templates"', "Boards, WIP limits and flow."),
        "wip.md": ("Limiting WIP", '"kanban"', "Work in progress limits."),
        "ci.md": ("Continuous delivery", "", "Pipelines."),
    }
    for name, (title, tags, body) in posts.items():
        (root / "content" / "posts" / name).write_text(
            HUGO_POST.format(title=title, tags=tags, body=body), encoding="utf-8"
        )
    return root


def test_init_detects_hugo_and_writes_env_records_folder_and_one_term_file_per_term_in_use(tmp_path: Path) -> None:
    site = hugo_site(tmp_path / "blog")
    result = init_site(site)
    assert result.generator.name == "hugo" and result.generator.content_dir == "content" and result.posts == 3
    assert {(t.type, t.title, t.posts) for t in result.terms} == {
        ("tags", "Kanban", 2),  # one term, two spellings: the first seen is kept
        ("tags", "Go: templates", 1),
        ("categories", "DevOps", 3),
    }
    assert sorted(p.relative_to(site).as_posix() for p in site.joinpath("categories").rglob("*.md")) == [
        "categories/categories/devops.md",
        "categories/tags/go-templates.md",
        "categories/tags/kanban.md",
    ]
    env = (site / ".env").read_text(encoding="utf-8")
    assert "\nTAGGER_RECORDS_DIR=.tagger\n" in env and "\nTAGGER_CONTENT_DIR=content\n" in env
    assert (site / ".tagger").is_dir()
    # Every setting is in the .env: the ones that matter set, every other one commented out at its default.
    for name in field_names():
        assert re.search(rf"^(# )?{name}=", env, re.M), f"{name} missing from the .env init writes"
    assert env.index("TAGGER_RECORDS_DIR=") < env.index("# TAGGER_CHUNK_SIZE=200")
    loaded = Settings(_env_file=site / ".env")  # type: ignore[call-arg]
    assert loaded.content_root() == (site / "content").resolve() and loaded.records_dir == site / ".tagger"
    assert loaded.chunk_size == Settings(_env_file=None).chunk_size  # type: ignore[call-arg]
    term = (site / "categories" / "tags" / "go-templates.md").read_text(encoding="utf-8")
    assert 'title: "Go: templates"' in term and "ClassificationType: tags" in term
    assert (
        result.next_commands[0].endswith("tagger taxonomy check")
        and "--dry-run content/posts/" in (result.next_commands[1])
    )


def test_init_never_overwrites_a_file(tmp_path: Path) -> None:
    site = hugo_site(tmp_path / "blog")
    (site / ".env").write_text("TAGGER_MODEL=mine\n", encoding="utf-8")
    (site / "categories" / "tags").mkdir(parents=True)
    (site / "categories" / "tags" / "kanban.md").write_text("my own term\n", encoding="utf-8")
    first = init_site(site)
    assert (site / ".env").read_text(encoding="utf-8") == "TAGGER_MODEL=mine\n"
    assert (site / "categories" / "tags" / "kanban.md").read_text(encoding="utf-8") == "my own term\n"
    assert {p.name for p in first.kept} == {".env", "kanban.md"}
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    again = init_site(site)
    assert not again.written and {p: p.read_bytes() for p in site.rglob("*") if p.is_file()} == before


def test_init_writes_one_commented_example_when_the_posts_use_no_terms_and_detects_jekyll(tmp_path: Path) -> None:
    site = tmp_path / "jekyll"
    (site / "_posts").mkdir(parents=True)
    (site / "_config.yml").write_text("title: blog\n", encoding="utf-8")
    (site / "_posts" / "2024-01-01-hello.md").write_text("---\ntitle: Hello\n---\nHi.\n", encoding="utf-8")
    result = init_site(site)
    assert result.generator.name == "jekyll" and result.generator.publish_dir == "_site" and not result.terms
    example = site / "categories" / "tags" / "kanban.md"
    assert example.read_text(encoding="utf-8").startswith("---\n# An example term file")
    env = (site / ".env").read_text(encoding="utf-8")
    assert "\nTAGGER_EXCLUDE=categories,_site\n" in env  # the term files sit inside Jekyll's content root
    assert any("exclude" in note for note in result.notes)
    assert detect_generator(tmp_path).name == "unknown"


def test_taxonomy_check_names_each_placeholder_left_and_how_to_fill_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = hugo_site(tmp_path / "blog")
    init_site(site)
    monkeypatch.chdir(site)
    code, out, _ = cli("taxonomy", "check")
    assert code == 1
    for name in ("devops.md", "go-templates.md", "kanban.md"):
        lines = [line for line in out.splitlines() if line.split(":")[0].endswith(name)]
        assert [re.search(r"\((scope|topics|exclude)\)", line)[1] for line in lines] == [  # type: ignore[index]
            "scope",
            "topics",
            "exclude",
        ], out
    assert "as bullets under a **Key Topics:** line" in out
    # The placeholders never reach a prompt: a term still holding them has no key topics yet.
    taxonomy = make_classifier(Settings(_env_file=site / ".env", TAGGER_PROVIDER="offline")).taxonomy  # type: ignore[call-arg]
    assert all(not t.key_topics and "TODO" not in t.scope for t in taxonomy)
    kanban = site / "categories" / "tags" / "kanban.md"
    kanban.write_text(
        kanban.read_text(encoding="utf-8")
        .replace("TODO: one or two sentences on the content this term is for", "The Kanban strategy")
        .replace("TODO: a topic a post about Kanban covers", "WIP limits")
        .replace("TODO: another one", "Flow")
        .replace("TODO: content that mentions Kanban without being about it", "To-do lists"),
        encoding="utf-8",
    )
    code, out, _ = cli("taxonomy", "check")
    assert "kanban.md" not in out and "go-templates.md" in out


def test_a_dry_run_keeps_its_judgements_so_the_real_run_makes_no_call(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    fake_llm.score({"Kanban": 95}, default=0)
    post = site / "site" / "posts" / "limiting-wip.md"
    before = post.read_bytes()
    classifier = make_classifier(make_settings())
    dry = classifier.classify(post, dry_run=True)
    asked = fake_llm.counts["requests"]
    assert asked > 0 and "Kanban" in dry.decisions[[d.type for d in dry.decisions].index("tags")].selected
    assert post.read_bytes() == before  # no post written
    record = load_record(post)
    assert record.assigned == {} and record.pending is None  # nothing marked assigned
    assert {j.term for j in record.judgements} >= {"Kanban"}
    real = make_classifier(make_settings()).classify(post)
    assert fake_llm.counts["requests"] == asked  # the real run reused every judgement
    assert real.written and "Kanban" in post.read_text(encoding="utf-8")
    assert load_record(post).assigned.get("tags") == ["Kanban"]


def test_records_move_both_ways_keeps_the_cache(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path, tmp_path: Path
) -> None:
    posts = sorted((site / "site" / "posts").glob("*.md"))[:2]
    classifier = make_classifier(make_settings())
    for post in posts:
        classifier.classify(post)
    beside = {p: record_path(p).read_bytes() for p in posts}
    folder = tmp_path / "records"
    report = move_records(make_settings(), to_dir=folder)
    assert len(report.moved) == 2 and not any(record_path(p).exists() for p in posts)
    store = RecordStore(content_root=site / "site", records_dir=folder)
    assert {p: store.path_for(p).read_bytes() for p in posts} == beside  # the bytes moved as they were
    asked = fake_llm.counts["requests"]
    moved = make_classifier(make_settings(TAGGER_RECORDS_DIR=str(folder)))
    assert all(not moved.classify(p).usage.calls for p in posts) and fake_llm.counts["requests"] == asked
    back = move_records(make_settings(TAGGER_RECORDS_DIR=str(folder)), beside=True)
    assert len(back.moved) == 2 and {p: record_path(p).read_bytes() for p in posts} == beside
    assert not list(folder.rglob("*.json"))


def test_backfill_warns_once_when_records_would_be_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = hugo_site(tmp_path / "blog")
    for key in ("TAGGER_RECORDS_DIR", "TAGGER_CONTENT_DIR", "TAGGER_ENV_FILE"):
        monkeypatch.delenv(key, raising=False)
    beside = Settings(_env_file=None, TAGGER_CONTENT_DIR=site / "content")  # type: ignore[call-arg]
    assert "hugo publishes" in (published_records_warning(beside) or "")
    outside = beside.model_copy(update={"records_dir": site / ".tagger"})
    assert published_records_warning(outside) is None
    init_site(site)
    monkeypatch.chdir(site)
    monkeypatch.setenv("TAGGER_PROVIDER", "offline")
    (site / ".env").write_text(
        (site / ".env").read_text(encoding="utf-8").replace("TAGGER_RECORDS_DIR=.tagger", "TAGGER_RECORDS_DIR="),
        encoding="utf-8",
    )
    _, _, err = cli("backfill", "content", "--inline")
    assert err.count("which hugo publishes") == 1, err


def _stub_shortcodes(site: Path) -> None:
    """Hugo's docs use their own shortcodes: empty ones (closing where the docs close them) let Hugo build."""
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in (site / "content").rglob("*.md"))
    used = set(re.findall(r"\{\{[<%]\s*([A-Za-z0-9_-]+)", text))
    closed = set(re.findall(r"\{\{[<%]\s*/\s*([A-Za-z0-9_-]+)", text))
    folder = site / "layouts" / "shortcodes"
    folder.mkdir(parents=True)
    for name in used:
        (folder / f"{name}.html").write_text("{{ if false }}{{ .Inner }}{{ end }}" if name in closed else "")
    for kind in ("single", "list"):
        (site / "layouts" / "_default").mkdir(parents=True, exist_ok=True)
        (site / "layouts" / "_default" / f"{kind}.html").write_text("{{ .Content }}", encoding="utf-8")


@pytest.mark.slow
def test_a_copy_of_hugos_docs_from_init_to_a_built_site_with_no_tagger_file_published(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    if not HUGO_DOCS.is_dir():
        pytest.skip(f"the hugo-docs corpus is not at {HUGO_DOCS}")
    hugo = shutil.which("hugo")
    if hugo is None:
        pytest.skip("hugo is not installed (apt-get install -y hugo): the site cannot be built")
    site = tmp_path / "hugo-docs"
    shutil.copytree(HUGO_DOCS / "en", site / "content")
    for path in [site / "content", *(site / "content").rglob("*")]:  # the shared copy is read-only; a site is not
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    (site / "hugo.toml").write_text('baseURL = "https://example.org/"\ntitle = "Hugo docs"\n', encoding="utf-8")
    _stub_shortcodes(site)
    section = site / "content" / "getting-started"
    # The docs' categories lists are empty: give three posts the terms a site would already use.
    for name, term in (("usage.md", "installation"), ("directory-structure.md", "fundamentals"), ("glossary", "")):
        path = section / name
        if path.is_file() and term:
            text = path.read_text(encoding="utf-8")
            path.write_text(re.sub(r"^categories: \[\]$", f"categories: [{term}]", text, count=1, flags=re.M))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TAGGER_", "OPENAI_"))},
        "TAGGER_PROVIDER": "openai",
        "OPENAI_BASE_URL": fake_llm.base_url,
        "OPENAI_API_KEY": "sk-test-secret-key-1234567890",
        "TAGGER_MODEL": "fake-model",
        "TAGGER_LOG_FORMAT": "json",
    }

    def tagger(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(TAGGER), *argv], cwd=site, env=env, capture_output=True, text=True, timeout=300, check=False
        )

    init = tagger("init")
    assert init.returncode == 0 and "hugo site (hugo.toml)" in init.stdout, init.stdout + init.stderr
    assert "categories (2 terms)" in init.stdout and "next:" in init.stdout
    check = tagger("taxonomy", "check")
    assert check.returncode == 1 and "TODO left in Instructions (topics)" in check.stdout
    for term in (site / "categories" / "categories").glob("*.md"):
        title = term.stem
        term.write_text(
            re.sub(
                r"TODO: [^\n]*",
                lambda m, t=title: {0: f"Pages about Hugo {t}."}.get(0) if "sentences" in m[0] else f"Hugo {t}",
                term.read_text(encoding="utf-8"),
            ),
            encoding="utf-8",
        )
    check = tagger("taxonomy", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    fake_llm.score({"fundamentals": 90}, default=0)  # usage.md has `installation`; tagger adds this
    post = "content/getting-started/usage.md"
    before = (site / post).read_bytes()
    dry = tagger("classify", "--dry-run", post)
    assert dry.returncode == 0 and "dry run" in dry.stdout, dry.stdout + dry.stderr
    assert (site / post).read_bytes() == before
    asked = fake_llm.counts["requests"]
    assert asked == 1
    run = tagger("backfill", "content/getting-started", "--inline")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "which hugo publishes" not in run.stderr  # .env put the records in .tagger/
    assert not any("Basic usage" in r["messages"][-1]["content"] for r in fake_llm.requests[asked:])  # not asked again
    posts = [p for p in section.rglob("*.md")]
    assert fake_llm.counts["requests"] - asked == len(posts) - 1  # every post but the dry run's, once
    assert "categories: [installation, fundamentals]" in (site / post).read_text(encoding="utf-8")  # from the dry run
    assert (site / ".tagger" / "getting-started" / "data.usage.tagger.json").is_file()
    built = subprocess.run([hugo, "--quiet"], cwd=site, capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    published = [p for p in (site / "public").rglob("*") if "tagger" in p.name or p.name == ".env"]
    assert (site / "public" / "getting-started" / "usage" / "index.html").is_file() and not published, published
    assert (site / "public" / "categories" / "fundamentals").is_dir()  # Hugo read the term tagger wrote


def test_progress_in_a_log_is_a_line_per_tenth_or_per_30_seconds() -> None:
    pace = LogPace()
    lines: list[tuple[float, int]] = []
    now, finished = 0.0, 0
    while finished < 100:  # a poll every half second, a post done every two seconds, a 2-minute stall at 50
        now += 0.5
        if not 101 <= now < 221 and int(now * 2) % 4 == 0:
            finished += 1
        if pace.due("run", finished, 100, now):
            lines.append((now, finished))
    for _ in range(5):  # the last state polled again: printed once
        now += 0.5
        if pace.due("run", 100, 100, now):
            lines.append((now, 100))
    tenths = [f * 10 // 100 for _, f in lines]
    assert sorted(set(tenths)) == list(range(11)) and tenths.count(10) == 1
    stall = [t for t, f in lines if f == 50]
    assert len(stall) == 5 and all(b - a >= 30 for a, b in itertools.pairwise(stall))  # the tenth, then 30 s
    assert len(lines) == 11 + 4  # not two a second: 15 lines for 400 polls
    assert pace.due("another run", 0, 100, now)  # a new run starts its own count


def test_backfill_in_a_log_prints_at_most_a_line_per_tenth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "posts").mkdir(parents=True)
    for n in range(40):
        (site / "posts" / f"p{n}.md").write_text(f"---\ntitle: Kanban {n}\n---\nWIP limits and flow.\n")
    shutil.copytree(Path(__file__).resolve().parent.parent / "categories", tmp_path / "taxonomy")
    monkeypatch.chdir(site)
    for key, value in {"TAGGER_PROVIDER": "offline", "TAGGER_TAXONOMY_DIR": str(tmp_path / "taxonomy")}.items():
        monkeypatch.setenv(key, value)
    code, out, _ = cli("backfill", ".", "--inline")
    bars = [line for line in out.splitlines() if line.startswith("[")]
    assert code == 0 and 1 <= len(bars) <= 11 and bars[-1].startswith("[" + "#" * 30 + "] 40/40 done"), out


def test_the_backfill_bar_polled_in_a_log_prints_once_per_state(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    for _ in range(50):  # `backfill --wait` polls twice a second while nothing more finishes
        progress(10, 0, 100, started, 0)
    progress(11, 0, 100, started, 0)
    progress(20, 0, 100, started, 0)
    assert capsys.readouterr().out.count(" done, ") == 2  # 10/100 once, 20/100 once


def test_help_shows_one_example_per_command_and_each_example_parses() -> None:
    code, out, _ = cli("--help")
    listed = re.findall(r"^  (\w+)\s{2,}\S", out.split("Commands:")[1].split("Examples:")[0], re.M)
    examples = dict(re.findall(r"^  (\w+)\s+(tagger .+)$", out.split("Examples:")[1], re.M))
    assert code == 0 and listed and list(examples) == listed  # one example per command, in the help's order
    for name, example in examples.items():
        argv = example.split()[1:]
        assert argv[0] == name
        # The example's options exist (an unknown option is a usage error before --help is honoured).
        code, _, err = cli(*argv, "--help")
        assert code == 0, f"{example}: {err}"
        assert f"Example: {example}" in cli(name, "--help")[1]  # in the command's own help too


def test_after_eval_rejudges_a_written_post_backfill_writes_it_again_with_no_call(
    make_settings: Callable[..., Settings], fake_llm: FakeLLM, site: Path
) -> None:
    post = site / "site" / "posts" / "limiting-wip.md"
    fake_llm.score({"Kanban": 95}, default=0)
    make_classifier(make_settings()).classify(post)
    assert post not in plan(make_settings(), folder=post.parent).todo  # written: fresh
    term = site / "taxonomy" / "tags" / "kanban.md"
    term.write_text(term.read_text(encoding="utf-8").replace("WIP limits", "work-in-progress limits"), "utf-8")
    fake_llm.score({"Kanban": 0}, default=0)
    evaluate(make_settings(), [post])  # re-judges Kanban (its definition changed): now it does not apply
    asked = fake_llm.counts["requests"]
    assert post in plan(make_settings(), folder=post.parent).todo  # the new judgement is not applied yet
    run_inline(make_settings(), [post])
    assert fake_llm.counts["requests"] == asked and "Kanban" not in read_post(post).meta.get("tags", [])
