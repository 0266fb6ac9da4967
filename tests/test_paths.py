"""Every way into tagger keeps posts inside the content root, and classifies only posts.

Each command is given paths outside the root (absolute, `..`, a symlink out), files that are not posts (a `.txt`,
a JSON file, tagger's own records) and hidden or excluded files: they are refused or skipped, stay byte-identical,
and no record appears outside the root.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from click.testing import CliRunner, Result

from tests.commands import tagger
from worker.cli import main
from worker.paths import confine
from worker.posts import read_post
from worker.queue.connection import connect
from worker.queue.enqueue import enqueue_posts, job_id_for
from worker.records import record_path
from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent
KANBAN = "---\ntitle: Kanban outside\n---\nKanban board, WIP limits, pull work.\n"


def job_id(env: dict[str, str], relative: str) -> str:
    """The job id tagger gives a post under this test's prefix."""
    return job_id_for(relative, Settings(_env_file=None, TAGGER_REDIS_PREFIX=env["TAGGER_REDIS_PREFIX"]))  # type: ignore[call-arg]


@pytest.fixture
def hostile(site: Path) -> Iterator[dict[str, Path]]:
    """A content root (site/site) with every kind of path that must not be classified, and files outside it."""
    root = site / "site"
    outside = site / "outside"
    outside.mkdir()
    (outside / "hostname").write_text("myhost\n", encoding="utf-8")
    (outside / "outside.md").write_text(KANBAN, encoding="utf-8")
    (root / "link-out.md").symlink_to(outside / "outside.md")
    (root / "alias.md").symlink_to(root / "posts" / "limiting-wip.md")
    (root / "notes.txt").write_text("Kanban notes, not a post\n", encoding="utf-8")
    (root / "config.json").write_text('{"title": "Kanban"}\n', encoding="utf-8")
    (root / ".drafts").mkdir()
    (root / ".drafts" / "hidden.md").write_text(KANBAN, encoding="utf-8")
    (root / "drafts").mkdir()
    (root / "drafts" / "excluded.md").write_text(KANBAN, encoding="utf-8")
    yield {"root": root, "outside": outside}


@pytest.fixture
def drained(queue_env: dict[str, str], redis: redis_lib.Redis) -> Iterator[dict[str, str]]:
    """queue_env, with the test's queues emptied afterwards: job ids are per post, and later tests reuse posts."""
    yield queue_env
    from rq import Queue

    for priority in ("high", "default", "low"):
        Queue(f"{queue_env['TAGGER_REDIS_PREFIX']}-{priority}", connection=redis).empty()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's bytes (symlinks as their target), to show nothing changed."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = "-> " + os.readlink(path)
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def untouched(hostile: dict[str, Path], before: dict[str, str], site: Path) -> None:
    """Files outside the root and non-posts inside it are as they were; no record outside the root."""
    after = snapshot(hostile["outside"])
    assert after == {k: v for k, v in before.items() if k.startswith(str(hostile["outside"]))}
    root = hostile["root"]
    for name in ("notes.txt", "config.json", ".drafts/hidden.md", "drafts/excluded.md", "link-out.md", "alias.md"):
        assert before[str(root / name)] == snapshot(root)[str(root / name)], name
    assert (root / "link-out.md").is_symlink() and (root / "alias.md").is_symlink()
    records = {p for p in site.rglob("data.*.tagger.json")}
    assert all(p.is_relative_to(root) for p in records), records
    assert not {p.name for p in records} & {
        "data.notes.tagger.json",
        "data.config.tagger.json",
        "data.alias.tagger.json",
    }


def run(args: list[str], env: dict[str, str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    """The CLI in this process, from `cwd`, with exactly `env` for tagger's settings."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "TAGGER_", "REDIS_URL")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def offline_env(site: Path, **more: str) -> dict[str, str]:
    return {
        "TAGGER_PROVIDER": "offline",
        "TAGGER_TAXONOMY_DIR": str(site / "taxonomy"),
        "TAGGER_CONTENT_DIR": str(site / "site"),
        "TAGGER_EXCLUDE": "drafts",
        **more,
    }


def refused_paths(hostile: dict[str, Path]) -> dict[str, str]:
    """Path given (from the root's folder) -> the reason it must be refused with."""
    root, outside = hostile["root"], hostile["outside"]
    return {
        str(outside / "hostname"): "outside the content root",
        str(outside / "outside.md"): "outside the content root",
        "../outside/outside.md": "outside the content root",
        str(root / "posts" / ".." / ".." / "outside" / "outside.md"): "outside the content root",
        "link-out.md": "symlink that points outside the content root",
        "notes.txt": "matches none of *.md, *.markdown",
        "config.json": "matches none of *.md, *.markdown",
        ".drafts/hidden.md": "is hidden",
        "drafts/excluded.md": "excluded by 'drafts' (TAGGER_EXCLUDE)",
    }


def test_classify_refuses_everything_that_is_not_a_post_inside_the_root(
    site: Path, hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (hostile["root"] / "posts" / "data.limiting-wip.tagger.json").write_text("{}", encoding="utf-8")
    before = snapshot(site)
    cases = refused_paths(hostile) | {"posts/data.limiting-wip.tagger.json": "one of tagger's own files"}
    for path, reason in cases.items():
        result = run(["classify", path], offline_env(site), hostile["root"], monkeypatch)
        assert result.exit_code == 1, (path, result.output)
        refusals = [line for line in result.stderr.splitlines() if line.startswith("REFUSED")]
        assert refusals == [line for line in refusals if f"REFUSED {path}: " in line and reason in line], (path, result)
        assert len(refusals) == 1, (path, result.stderr)
    untouched(hostile, before, site)


def test_the_message_names_the_root_used_when_it_is_unset(
    site: Path, hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = offline_env(site)
    del env["TAGGER_CONTENT_DIR"]
    result = run(["classify", str(hostile["outside"] / "hostname")], env, hostile["root"], monkeypatch)
    assert result.exit_code == 1
    assert f"content root {hostile['root']} (TAGGER_CONTENT_DIR is unset: the current folder)" in result.stderr
    assert (hostile["outside"] / "hostname").read_text() == "myhost\n"
    # The same root makes a relative post work with nothing set (the demo and `classify some/post.md`).
    ok = run(["classify", "posts/limiting-wip.md"], env, hostile["root"], monkeypatch)
    assert ok.exit_code == 0, ok.output
    assert record_path(hostile["root"] / "posts" / "limiting-wip.md").exists()


def test_a_symlink_inside_is_classified_through_its_target(
    site: Path, hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = hostile["root"]
    result = run(["classify", "alias.md"], offline_env(site), root, monkeypatch)
    assert result.exit_code == 0, result.output
    assert (root / "alias.md").is_symlink()
    assert record_path(root / "posts" / "limiting-wip.md").exists() and not record_path(root / "alias.md").exists()
    assert "Kanban" in read_post(root / "posts" / "limiting-wip.md").terms("tags")
    assert confine(root / "alias.md", Settings(_env_file=None, TAGGER_CONTENT_DIR=str(root))) == (  # type: ignore[call-arg]
        "posts/limiting-wip.md"
    )


def test_backfill_inline_takes_only_posts_and_skips_symlinks_out(
    site: Path, hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = hostile["root"]
    before = snapshot(site)
    estimate = run(["backfill", "--estimate", "."], offline_env(site), root, monkeypatch)
    # the three posts; the alias is the same post as its target; the rest is not content
    assert "3 to classify" in estimate.output and "estimate for gpt-4o-mini: 3 posts" in estimate.output
    result = run(["backfill", "--inline", "."], offline_env(site), root, monkeypatch)
    assert result.exit_code == 1, result.output  # something was skipped
    assert "3 to classify" in result.output and "1 skipped" in result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("SKIPPED")] == [
        f"SKIPPED {root / 'link-out.md'}: is a symlink that points outside the content root {root} (TAGGER_CONTENT_DIR)"
    ]
    assert "3 done, 2 written, 0 failed, 1 skipped" in result.output
    untouched(hostile, before, site)


def test_one_bad_file_never_stops_the_others(
    site: Path, hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = hostile["root"]
    deep = root / "posts" / "deep.md"
    deep.write_text("---\ntitle: deep\nx: " + "[" * 500 + "]" * 500 + "\n---\nKanban\n", encoding="utf-8")
    # A record that cannot be written (its name is taken by a folder) fails the write even for root.
    blocked = root / "posts" / "shipping-daily.md"
    record_path(blocked).mkdir()
    result = run(["backfill", "--inline", "posts"], offline_env(site), root, monkeypatch)
    assert result.exit_code == 1
    assert f"SKIPPED {deep}: " in result.stderr  # (a RecursionError in the YAML parser, or a clear bad_post)
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and str(blocked) in failed[0], result.stderr
    assert "Kanban" in read_post(root / "posts" / "limiting-wip.md").terms("tags")  # the others went on
    assert "2 done" in result.output and "1 failed, 1 skipped" in result.output, result.output


def test_backfill_dir_must_be_a_folder_inside_the_root(
    site: Path, hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = run(["backfill", "--inline", str(hostile["outside"])], offline_env(site), site, monkeypatch)
    assert outside.exit_code == 1 and "outside the content root" in outside.stderr
    missing = run(["backfill", "--inline", "nope"], offline_env(site), hostile["root"], monkeypatch)
    assert missing.exit_code == 1 and missing.stderr.strip() == "tagger: usage: nope: no such folder"
    assert snapshot(hostile["outside"]) == {
        k: v for k, v in snapshot(site).items() if k.startswith(str(hostile["outside"]))
    }


@pytest.mark.redis
def test_enqueue_and_the_python_api_refuse_each_bad_path_and_take_the_rest(
    drained: dict[str, str], site: Path, hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_env = drained
    root = hostile["root"]
    before = snapshot(site)
    good = str(root / "posts" / "limiting-wip.md")
    cases = refused_paths(hostile) | {"posts/nope.md": "does not exist"}
    queue_env = {**queue_env, "TAGGER_EXCLUDE": "drafts"}
    result = run(["enqueue", *cases, good], queue_env, root, monkeypatch)
    assert result.exit_code == 1
    refused = [line for line in result.stderr.splitlines() if line.startswith("REFUSED")]
    for path, reason in cases.items():
        assert any(line.startswith(f"REFUSED {path}: ") and reason in line for line in refused), (path, refused)
    assert len(refused) == len(cases)
    assert result.stdout.split() == [job_id(queue_env, "posts/limiting-wip.md"), "enqueued", "posts/limiting-wip.md"]
    # The Python API the same way: one Enqueued per path, the bad ones refused with their reason.
    for name, value in queue_env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.chdir(root)
    items = enqueue_posts(["notes.txt", "link-out.md", "alias.md"], settings, connect(settings))
    assert [(i.path, i.action) for i in items] == [
        ("notes.txt", "refused"),
        ("link-out.md", "refused"),
        ("posts/limiting-wip.md", "already-queued"),
    ]
    assert "outside the content root" in items[1].reason
    untouched(hostile, before, site)


@pytest.mark.redis
def test_a_relative_path_is_relative_to_the_current_folder_only(
    drained: dict[str, str], site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_env = drained
    posts = site / "site" / "posts"
    result = run(["enqueue", "posts/limiting-wip.md"], queue_env, posts, monkeypatch)
    assert result.exit_code == 1
    assert result.stderr.strip() == "REFUSED posts/limiting-wip.md: does not exist"
    assert "enqueued" not in result.stdout


@pytest.mark.redis
def test_changed_since_reports_deleted_posts(
    drained: dict[str, str], site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_env = drained
    content = site / "site"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    (content / "notes.txt").write_text("old\n", encoding="utf-8")
    subprocess.run([*git, "init", "-q"], cwd=content, check=True)
    subprocess.run([*git, "add", "."], cwd=content, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=content, check=True)
    (content / "posts" / "backlog-by-value.md").unlink()
    (content / "notes.txt").write_text("new\n", encoding="utf-8")
    edited = content / "posts" / "shipping-daily.md"
    edited.write_text(edited.read_text(encoding="utf-8") + "\nMore.\n", encoding="utf-8")
    result = run(["enqueue", "--changed-since", "HEAD"], queue_env, content, monkeypatch)
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines == [
        [job_id(queue_env, "posts/shipping-daily.md"), "enqueued", "posts/shipping-daily.md"],
        ["-", "skipped", "(deleted)", "posts/backlog-by-value.md"],
    ]


@pytest.mark.slow
@pytest.mark.redis
def test_subfolder_backfill_through_real_workers(
    queue_env: dict[str, str], site: Path, hostile: dict[str, Path], redis: redis_lib.Redis
) -> None:
    root = hostile["root"]
    for name in ("kanban-bundle", "delivery-bundle"):
        bundle = root / "posts" / name
        bundle.mkdir()
        (bundle / "index.md").write_text(
            f"---\ntitle: {name}\n---\nKanban boards and continuous delivery pipelines.\n", encoding="utf-8"
        )
    (root / "posts" / "link-out.md").symlink_to(hostile["outside"] / "outside.md")
    before = snapshot(site)
    env = {**queue_env, "TAGGER_EXCLUDE": "drafts"}
    result = tagger(env, "backfill", str(root / "posts"))
    assert result.returncode == 1, result.stdout + result.stderr  # the symlink out was skipped
    assert "enqueued 5" in result.stdout, result.stdout + result.stderr
    assert f"SKIPPED {root / 'posts' / 'link-out.md'}: is a symlink that points outside" in result.stderr
    work = tagger(env, "work", "--burst")
    assert work.returncode == 0, work.stderr[-2000:]
    listing = tagger(env, "failed", "list")
    assert listing.stderr.strip() == "0 failed", listing.stdout
    for name in ("kanban-bundle", "delivery-bundle"):
        post = root / "posts" / name / "index.md"
        assert read_post(post).terms("tags"), name  # each bundle's index.md is its own job, relative to the root
        assert record_path(post).exists()
    ids = {job_id(env, f"posts/{n}/index.md") for n in ("kanban-bundle", "delivery-bundle")}
    assert len(ids) == 2
    untouched(hostile, before, site)


@pytest.mark.slow
@pytest.mark.redis
def test_a_job_naming_a_file_that_is_not_a_post_is_refused_by_the_worker(
    queue_env: dict[str, str], site: Path, redis: redis_lib.Redis
) -> None:
    from rq import Callback, Queue
    from rq.serializers import JSONSerializer

    notes = site / "site" / "notes.txt"
    notes.write_text("Kanban notes\n", encoding="utf-8")
    queue = Queue(f"{queue_env['TAGGER_REDIS_PREFIX']}-default", connection=redis, serializer=JSONSerializer)
    queue.enqueue(
        "worker.queue.jobs.classify_job",
        "notes.txt",
        None,
        job_id="planted-txt",
        on_failure=Callback("worker.queue.jobs.on_failure"),
    )
    assert tagger(queue_env, "work", "--burst").returncode == 0
    assert notes.read_text(encoding="utf-8") == "Kanban notes\n"
    assert not record_path(notes).exists()
    assert "not_a_post" in tagger(queue_env, "failed", "list").stdout


def test_env_file_from_any_folder_with_folders_relative_to_it(site: Path, tmp_path: Path) -> None:
    env_file = site / "tagger.env"
    env_file.write_text(
        "TAGGER_CONTENT_DIR=site\nTAGGER_TAXONOMY_DIR=taxonomy\nTAGGER_PROVIDER=offline\n", encoding="utf-8"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_"))}
    flag = tagger(env, "--env-file", str(env_file), "backfill", "--estimate", str(site / "site"), cwd=elsewhere)
    assert flag.returncode == 0, flag.stderr
    assert f"content root {site / 'site'} (TAGGER_CONTENT_DIR)" in flag.stdout and "3 to classify" in flag.stdout
    variable = tagger({**env, "TAGGER_ENV_FILE": str(env_file)}, "backfill", "--estimate", "../site", cwd=elsewhere)
    assert variable.returncode == 0 and "3 to classify" in variable.stdout, variable.stderr
    missing = tagger(env, "--env-file", "nope.env", "status", cwd=elsewhere)
    assert missing.returncode == 1
    assert missing.stderr == f"tagger: settings: env file {elsewhere / 'nope.env'} (--env-file) does not exist\n"


@pytest.mark.slow
@pytest.mark.redis
def test_enqueue_changed_script_works_from_a_site_repository(drained: dict[str, str], site: Path) -> None:
    queue_env = drained
    if not (REPO / ".venv" / "bin" / "tagger").exists():
        pytest.skip("scripts/enqueue-changed.sh runs .venv/bin/tagger, which `make test` installs")
    content = site / "site"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=content, check=True)
    subprocess.run([*git, "add", "."], cwd=content, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=content, check=True)
    edited = content / "posts" / "limiting-wip.md"
    edited.write_text(edited.read_text(encoding="utf-8") + "\nMore.\n", encoding="utf-8")
    env_file = site / "tagger.env"
    settings = {k: v for k, v in queue_env.items() if k.startswith(("TAGGER_", "OPENAI_", "REDIS_URL"))}
    settings["TAGGER_CONTENT_DIR"] = "site"  # relative to the env file's folder
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()), encoding="utf-8")
    env = {k: v for k, v in queue_env.items() if k not in settings} | {"TAGGER_ENV_FILE": str(env_file)}
    run = subprocess.run(
        [str(REPO / "scripts" / "enqueue-changed.sh"), "HEAD"], cwd=content, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [job_id(queue_env, "posts/limiting-wip.md"), "enqueued", "posts/limiting-wip.md"]


def test_term_pages_inside_the_root_are_content_unless_excluded(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = site / "site"
    (site / "taxonomy").rename(root / "categories")
    (root / "MANIFEST.md").write_text("# What is in this site\n", encoding="utf-8")
    env = {**offline_env(site), "TAGGER_TAXONOMY_DIR": str(root / "categories"), "TAGGER_EXCLUDE": ""}
    terms = len(list((root / "categories").rglob("*.md")))
    everything = run(["backfill", "--estimate", "."], env, root, monkeypatch)
    assert f"{3 + terms} to classify" in everything.output, everything.output
    # A markdown file with no front matter is a post too, skipped by default (TAGGER_NO_FRONT_MATTER=skip).
    assert "1 skipped (1 without front matter)" in everything.output
    env["TAGGER_EXCLUDE"] = "categories,MANIFEST.md"
    posts_only = run(["backfill", "--estimate", "."], env, root, monkeypatch)
    assert "3 to classify" in posts_only.output and "estimate for gpt-4o-mini: 3 posts" in posts_only.output
    refused = run(["classify", "categories/tags/kanban.md"], env, root, monkeypatch)
    assert refused.exit_code == 1 and "excluded by 'categories' (TAGGER_EXCLUDE)" in refused.stderr
