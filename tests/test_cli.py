"""The `tagger` command as a user runs it: exit codes, dry runs, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from worker.fakellm import FakeLLM


def tagger(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


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
    assert sorted(p.name for p in (site / "site" / "posts").iterdir()) == sorted(p.name for p in posts)


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
