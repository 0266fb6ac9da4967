"""The settings files a deployment starts from load as they are: `.env.example` and `deploy/tagger.env`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "TAGGER_", "REDIS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("example", [".env.example", "deploy/tagger.env"])
def test_settings_file_copied_as_is_loads_with_empty_values_unset(clean_env: Path, example: str) -> None:
    shutil.copy(REPO / example, clean_env / ".env")
    settings = Settings()
    # Empty values (`OPENAI_API_KEY=`, `TAGGER_PROVIDER=`, `TAGGER_PROMPTS_DIR=`) are unset, not "" or ".".
    assert settings.openai_api_key is None and settings.openai_base_url is None
    assert settings.provider_choice is None and settings.provider == "offline"
    assert settings.prompts_dir is None


def test_deploy_env_names_only_real_settings() -> None:
    known = {field.alias for field in Settings.model_fields.values()}
    names = [
        line.split("=", 1)[0]
        for line in (REPO / "deploy" / "tagger.env").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert names and set(names) <= known, set(names) - known


def test_the_systemd_unit_does_not_restart_the_exit_code_of_a_misconfigured_worker(
    queue_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tagger work` with no taxonomy exits with the code the unit names in RestartPreventExitStatus (not restarted
    every 5 s), and only that code: Redis not answering is exit 1, which systemd restarts."""
    from click.testing import CliRunner

    from worker.cli import main
    from worker.queue.startup import EXIT_CONFIG

    unit = (REPO / "deploy" / "tagger-worker.service").read_text(encoding="utf-8")
    prevented = [
        line.split("=", 1)[1].split() for line in unit.splitlines() if line.startswith("RestartPreventExitStatus=")
    ]
    assert prevented == [[str(EXIT_CONFIG)]] and "Restart=on-failure" in unit.splitlines()
    env: dict[str, str | None] = {**queue_env, "TAGGER_TAXONOMY_DIR": None, "TAGGER_CONTENT_DIR": None}
    monkeypatch.chdir(tmp_path)  # no taxonomy folder here; the check fails before any worker process starts
    run = CliRunner().invoke(main, ["work", "--burst"], env=env)
    assert run.exit_code == EXIT_CONFIG, run.output
    assert run.stderr.startswith("tagger: taxonomy: ") and len(run.stderr.strip().splitlines()) == 1
    unreachable = CliRunner().invoke(main, ["work", "--burst"], env={**queue_env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert unreachable.exit_code == 1 and unreachable.stderr.startswith("tagger: redis: "), unreachable.output
