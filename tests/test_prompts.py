"""Prompt templates: one copy (prompts/ is the package worker.templates), TAGGER_PROMPTS_DIR overrides it."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest

from worker.errors import TemplateUnreadable
from worker.prompts import TEMPLATE_PACKAGE, TEMPLATES, load_templates, template_paths
from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def test_default_templates_are_the_repository_prompts_folder_itself() -> None:
    # Not a copy: the package resolves to prompts/, so an edit there is what tagger (and the wheel) uses.
    package = resources.files(TEMPLATE_PACKAGE)
    assert isinstance(package, Path)
    assert package.resolve() == (REPO / "prompts").resolve()
    assert not (REPO / "worker" / "templates").exists(), "a second copy of the templates would drift"
    assert template_paths() == [package / f"{name}.md" for name in TEMPLATES]
    templates = load_templates()
    assert templates.system.template == (REPO / "prompts" / "system.md").read_text(encoding="utf-8")


def test_prompts_dir_overrides_the_packaged_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", own, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (own / "system.md").write_text("Our own rubric for $term_type.\n$terms\n", encoding="utf-8")
    monkeypatch.setenv("TAGGER_PROMPTS_DIR", str(own))
    settings = Settings()
    assert settings.prompts_dir == own
    templates = load_templates(settings.prompts_dir)
    assert templates.system.template.startswith("Our own rubric")
    assert templates.version != load_templates().version
    assert template_paths(settings.prompts_dir)[0] == own / "system.md"


def test_empty_prompts_dir_setting_means_the_packaged_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    # `TAGGER_PROMPTS_DIR=` as written in .env.example must not turn into the current folder.
    monkeypatch.setenv("TAGGER_PROMPTS_DIR", "")
    monkeypatch.setenv("TAGGER_PROVIDER", "")
    settings = Settings()
    assert settings.prompts_dir is None
    assert settings.provider_choice is None
    assert load_templates(settings.prompts_dir).version == load_templates().version


def test_a_missing_template_is_a_clear_error(tmp_path: Path) -> None:
    own = tmp_path / "prompts"
    shutil.copytree(REPO / "prompts", own)
    (own / "reask.md").unlink()
    with pytest.raises(TemplateUnreadable) as caught:
        load_templates(own)
    error = caught.value
    assert error.kind == "templates" and not error.transient
    assert error.path == str(own / "reask.md")
    assert "TAGGER_PROMPTS_DIR" in str(error) and "reask.md" in str(error)


def test_the_token_estimate_is_near_what_openais_tokenizer_counts() -> None:
    import json

    from worker.prompts import estimate_tokens

    # Counts of OpenAI's o200k_base tokenizer, measured once (the file says how): prose, definitions, a schema,
    # replies, code, French and Japanese. 4 characters a token was off by 21-28% on prose and definitions and by
    # 70% on Japanese.
    fixture = json.loads((Path(__file__).parent / "fixtures" / "o200k_counts.json").read_text(encoding="utf-8"))
    samples = fixture["samples"]
    for sample in samples:
        assert 0.75 <= estimate_tokens(sample["text"]) / sample["o200k"] <= 1.3, sample["name"]
    total = sum(estimate_tokens(s["text"]) for s in samples) / sum(s["o200k"] for s in samples)
    assert 0.9 <= total <= 1.1
