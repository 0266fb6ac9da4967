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
