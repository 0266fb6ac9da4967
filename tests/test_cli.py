"""The `tagger` command as a user runs it: exit codes, dry runs, JSON output."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.commands import tagger as run_tagger
from tests.fakellm import FakeLLM
from worker.cli import main
from worker.cli.app import cut, progress
from worker.posts import read_post
from worker.records import load_record, record_path


def tagger(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_tagger(env, *args, cwd=cwd)


def env_for(site: Path, fake: FakeLLM | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_"))}
    env["TAGGER_TAXONOMY_DIR"] = str(site / "taxonomy")
    if fake:
        env.update(OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY="sk-cli-secret-0123456789", TAGGER_MODEL="fake")
    return env


def test_dry_run_writes_nothing_and_prints_the_diff(site: Path, fake_llm: FakeLLM) -> None:
    posts = sorted((site / "site" / "posts").glob("*.md"))
    before = {p: p.read_bytes() for p in posts}
    run = tagger(["classify", "--dry-run", *map(str, posts)], env_for(site, fake_llm), site)
    assert run.returncode == 0, run.stderr
    assert "+  - Kanban" in run.stdout
    assert {p: p.read_bytes() for p in posts} == before
    # No post is written; the judgements are kept in each post's record (the cache), which marks nothing assigned.
    others = sorted(p.name for p in (site / "site" / "posts").iterdir() if p not in before)
    assert others == sorted(record_path(p).name for p in posts)
    assert all(not load_record(p).assigned and load_record(p).judgements for p in posts)


def test_failures_exit_non_zero_with_one_line_each(site: Path, fake_llm: FakeLLM) -> None:
    bad = site / "site" / "posts" / "bad.md"
    bad.write_text("---\ntitle: [broken\n---\n", encoding="utf-8")
    good = site / "site" / "posts" / "limiting-wip.md"
    run = tagger(["classify", str(bad), str(good), str(site / "missing.md")], env_for(site, fake_llm), site)
    assert run.returncode == 1
    failed = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2
    assert "bad.md: bad_post: malformed YAML" in failed[0]
    assert "missing.md: post_missing" in failed[1]
    assert "Kanban" in good.read_text()
    assert "sk-cli-secret" not in run.stdout + run.stderr


def test_json_output_and_offline_default(site: Path) -> None:
    post = site / "site" / "posts" / "limiting-wip.md"
    run = tagger(["classify", "--json", str(post)], env_for(site), site)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)[0]
    assert result["written"] is True
    assert {j["provider"] for j in result["judgements"]} == {"offline"}
    human = tagger(["classify", str(site / "site" / "posts" / "backlog-by-value.md")], env_for(site), site)
    assert "offline provider" in human.stderr and "not an LLM" in human.stderr
    assert "ClassificationContentOrigin is Human" in human.stdout


def test_auth_failure_names_the_kind_without_the_key(site: Path, fake_llm: FakeLLM) -> None:
    fake_llm.inject("auth")
    run = tagger(["classify", str(site / "site" / "posts" / "limiting-wip.md")], env_for(site, fake_llm), site)
    assert run.returncode == 1
    assert "auth: provider rejected the credentials" in run.stderr
    assert "sk-cli-secret" not in run.stderr


# --- one-line errors: each runs as a user runs it, and prints one line, never a traceback ------------------

ONE_LINE_REDIS = re.compile(
    r"^tagger: redis: cannot use Redis at redis://:\*\*\*@127\.0\.0\.1:1/0 \(REDIS_URL\): "
    r"Error 111 connecting to 127\.0\.0\.1:1\. Connection refused; start Redis or fix REDIS_URL\n$"
)
MALFORMED = re.compile(r"^tagger: settings: REDIS_URL redis://:\*\*\*@127\.0\.0\.1:port/0 is not a Redis URL: .+\n$")
QUEUE_COMMANDS = [
    ["status"],
    ["enqueue", "site/posts/limiting-wip.md"],
    ["failed", "list"],
    ["backfill", "--all", "site"],
    ["work", "--burst"],
    ["work", "--burst", "--processes", "2"],
    ["resume"],
]


def offline(site: Path, **more: str) -> dict[str, str]:
    return {**env_for(site), "TAGGER_PROVIDER": "offline", "TAGGER_CONTENT_DIR": str(site / "site"), **more}


def assert_one_line(run: subprocess.CompletedProcess[str], pattern: re.Pattern[str] | str, code: int = 1) -> None:
    assert run.returncode == code, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stdout + run.stderr
    if isinstance(pattern, str):
        assert run.stderr == pattern + "\n", run.stderr
    else:
        assert pattern.match(run.stderr), run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", QUEUE_COMMANDS, ids=lambda a: "-".join(a))
def test_redis_unreachable_is_one_line_naming_the_redacted_url(site: Path, args: list[str]) -> None:
    run = tagger(args, offline(site, REDIS_URL="redis://:hunter22secret@127.0.0.1:1/0"), site)
    assert_one_line(run, ONE_LINE_REDIS)
    assert "hunter22secret" not in run.stdout + run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", QUEUE_COMMANDS, ids=lambda a: "-".join(a))
def test_malformed_redis_url_is_one_line(site: Path, args: list[str]) -> None:
    from worker.queue.startup import EXIT_CONFIG

    run = tagger(args, offline(site, REDIS_URL="redis://:hunter22secret@127.0.0.1:port/0"), site)
    # A setting to fix: `work` exits EX_CONFIG (its service is not restarted), the other commands 1.
    assert_one_line(run, MALFORMED, EXIT_CONFIG if args[0] == "work" else 1)
    assert "hunter22secret" not in run.stdout + run.stderr


def test_a_date_yaml_cannot_build_is_read_as_text_and_classified(site: Path) -> None:
    post = site / "site" / "posts" / "limiting-wip.md"
    post.write_text(post.read_text(encoding="utf-8").replace("date: 2025-03-03T09:00:00Z", "date: 2024-13-45T99:99:99"))
    run = tagger(["classify", str(post)], offline(site), site)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "date: 2024-13-45T99:99:99\n" in post.read_text(encoding="utf-8")
    assert "Kanban" in read_post(post).terms("tags")


def test_typos_are_errors_not_no_ops(site: Path) -> None:
    env = offline(site)
    assert_one_line(tagger(["backfill", "--inline", "sitee"], env, site), "tagger: usage: sitee: no such folder")
    assert_one_line(
        tagger(["backfill", "--inline", "--type", "tagz", "site"], env, site),
        f"tagger: taxonomy: no type 'tagz' in the taxonomy {site / 'taxonomy'}; its types: categories, concepts, tags",
    )
    assert_one_line(
        tagger(["classify", "--type", "tagz", "site/posts/limiting-wip.md"], env, site),
        re.compile(
            r"(?s).*^tagger: taxonomy: no type 'tagz' in the taxonomy .*; its types: categories, concepts, tags\n$",
            re.M,
        ),
    )
    nothing = tagger(["enqueue"], env, site)
    assert nothing.returncode == 2 and "name the posts to enqueue, or use --stdin or --changed-since" in nothing.stderr
    assert "Traceback" not in nothing.stderr


def test_the_provider_unreachable_names_its_base_url(site: Path) -> None:
    env = {**env_for(site), "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-x-0123456789"}
    run = tagger(["classify", "site/posts/limiting-wip.md"], {**env, "TAGGER_RETRY_ATTEMPTS": "1"}, site)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith(
        "FAILED site/posts/limiting-wip.md: unavailable: cannot reach the provider at http://127.0.0.1:9/v1/ "
        "(OPENAI_BASE_URL): APIConnectionError"
    ), run.stderr


def test_a_missing_taxonomy_folder_is_named_once(site: Path) -> None:
    env = {**offline(site), "TAGGER_TAXONOMY_DIR": "terms"}
    run = tagger(["classify", "site/posts/limiting-wip.md"], env, site)
    errors = [line for line in run.stderr.splitlines() if not line.startswith("tagger: using the offline")]
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len(errors) == 1 and errors[0].startswith("tagger: taxonomy: "), errors
    assert errors[0].count("terms") == 1 and str(site / "terms") in errors[0], errors  # the folder, named once
    assert "TAGGER_TAXONOMY_DIR" in errors[0]


@pytest.mark.slow
@pytest.mark.redis
def test_on_call_typos_purge_without_a_terminal_and_a_closed_pipe(queue_env: dict[str, str], site: Path) -> None:
    bad = site / "site" / "posts" / "bad.md"
    bad.write_text("---\ntitle: [broken\n---\n", encoding="utf-8")
    assert tagger(["enqueue", str(bad)], queue_env, site).returncode == 0
    assert tagger(["work", "--burst"], queue_env, site).returncode == 0
    listing = tagger(["failed", "list"], queue_env, site)
    job_id = listing.stdout.splitlines()[1].split()[0]
    shown = tagger(["failed", "show", job_id], queue_env, site)
    assert "status: failed\n" in shown.stdout and "JobStatus" not in shown.stdout
    kinds = tagger(["failed", "list", "--error", "bad_pots"], queue_env, site)
    assert_one_line(
        kinds, re.compile(r"^tagger: usage: no failure kind 'bad_pots'; kinds: .*\bbad_post\b.*\bquota\b.*\n$")
    )
    assert_one_line(
        tagger(["failed", "show", "post-nope"], queue_env, site),
        "tagger: usage: no such job: post-nope (ids are in `tagger failed list`)",
    )
    retry = tagger(["failed", "retry", "post-nope"], queue_env, site)
    assert_one_line(retry, "tagger: usage: not a failed job: post-nope (ids are in `tagger failed list`)")
    purge = subprocess.run(
        [sys.executable, "-m", "worker", "failed", "purge"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=queue_env,
        timeout=60,
    )
    assert_one_line(purge, "tagger: usage: purge would delete 1 failed jobs: not on a terminal to ask, add --yes")
    assert "1 failed" in tagger(["failed", "list"], queue_env, site).stderr  # nothing was deleted
    # `tagger status | head -1`: the reader is gone before tagger writes
    for args in (["status"], ["status", "--json"], ["failed", "list"]):
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=queue_env
        )
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        stderr = process.stderr.read().decode()
        process.wait(timeout=60)
        assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, (args, stderr)
    assert "deleted 1 failed jobs" in tagger(["failed", "purge", "--yes"], queue_env, site).stdout


# --- the click app, in process -----------------------------------------------------------------------------


def test_bare_tagger_prints_help_and_version() -> None:
    runner = CliRunner()
    bare = runner.invoke(main, [])
    assert bare.exit_code == 0 and bare.output.startswith("Usage: ") and "classify" in bare.output
    version = runner.invoke(main, ["--version"])
    assert version.output == f"tagger {importlib.metadata.version('tagger')}\n"
    wrong = runner.invoke(main, ["failed", "list", "--yes"])
    assert wrong.exit_code == 2 and "No such option '--yes'" in wrong.output and "tagger failed list" in wrong.output


def test_help_lists_commands_in_the_order_a_user_meets_them() -> None:
    out = CliRunner().invoke(main, ["--help"]).output
    listed = re.findall(r"^  (\w+)  ", out.split("Commands:")[1].split("Examples:")[0], flags=re.M)
    assert listed == [
        "init",
        "taxonomy",
        "classify",
        "records",
        "enqueue",
        "backfill",
        "work",
        "cancel",
        "status",
        "failed",
        "resume",
        "verify",
        "apply",
        "eval",
        "batch",
    ]


def test_a_command_that_needs_no_redis_never_connects(site: Path) -> None:
    """The CLI context makes the Redis connection only when a command asks for it."""
    run = tagger(
        ["taxonomy", "check", str(site / "taxonomy")], {**offline(site), "REDIS_URL": "redis://127.0.0.1:1/0"}, site
    )
    assert run.returncode == 0, run.stderr
    assert "redis" not in run.stderr.lower()


def all_commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append((f"{prefix}{name}", command))
        if isinstance(command, click.Group):
            found += all_commands(command, f"{prefix}{name} ")
    return found


def test_every_option_and_argument_is_explained() -> None:
    for name, command in all_commands(main):
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"
            elif isinstance(param, click.Argument):
                assert (param.metavar or param.name.upper()).rstrip(".").strip("[]") in command.help, f"{name} {param}"


def test_classify_output_has_headers_says_no_change_and_never_added_for_a_human_post(site: Path) -> None:
    runner = CliRunner()
    env = offline(site)
    wip = str(site / "site" / "posts" / "limiting-wip.md")
    first = runner.invoke(main, ["classify", wip], env=env)
    assert first.exit_code == 0, first.output
    assert "     term                               confidence  level      reason" in first.output
    assert "[written;" in first.output
    again = runner.invoke(main, ["classify", wip], env=env)
    assert "[no change;" in again.output
    dry = runner.invoke(main, ["classify", "--dry-run", wip], env=env)
    assert "[dry run: no change;" in dry.output
    human = runner.invoke(main, ["classify", str(site / "site" / "posts" / "backlog-by-value.md")], env=env)
    assert "would add: Product Management" in human.output and "added:" not in human.output


def test_long_messages_are_cut_at_a_word_with_an_ellipsis() -> None:
    text = "provider rejected the credentials: AuthenticationError (HTTP 401): Incorrect API key provided"
    assert cut(text, 40) == "provider rejected the credentials…"
    assert cut("short", 40) == "short"
    assert len(cut(text, 40)) <= 40


def test_the_progress_bar_shows_no_eta_until_it_has_a_rate(capsys: pytest.CaptureFixture[str]) -> None:
    progress(0, 0, 10, time.monotonic(), 0)
    assert "ETA" not in capsys.readouterr().out
    progress(5, 0, 10, time.monotonic() - 5, 0)
    assert "1.0/s, ETA 5s" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.redis
def test_a_worker_logs_one_format_and_llm_calls_name_the_job_and_post(queue_env: dict[str, str], site: Path) -> None:
    wip = site / "site" / "posts" / "limiting-wip.md"
    assert tagger(["enqueue", str(wip)], queue_env, site).returncode == 0
    work = tagger(["work", "--burst"], queue_env, site)
    assert work.returncode == 0, work.stderr
    assert work.stdout.startswith("tagger work: serving ") and len(work.stdout.splitlines()) == 1  # what it serves
    events = [json.loads(line) for line in work.stderr.splitlines()]  # every line is JSON, RQ's own too
    assert any(e.get("logger") == "rq.worker" for e in events)
    calls = [e for e in events if e["event"] == "llm_call"]
    assert calls and all(e["post"] == "posts/limiting-wip.md" and e["job_id"].startswith("post-") for e in calls)


def test_a_bad_setting_is_one_line_naming_it(site: Path) -> None:
    run = tagger(["classify", "site/posts/limiting-wip.md"], offline(site, TAGGER_CHUNK_SIZE="0"), site)
    assert_one_line(
        run, "tagger: settings: TAGGER_CHUNK_SIZE: Input should be greater than or equal to 1 (see .env.example)"
    )
