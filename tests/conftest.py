"""Shared fixtures: the fake OpenAI server, settings pointing at it, a scratch site, the corpus."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.classifier import Classifier, make_classifier
from worker.fakellm import FakeLLM
from worker.settings import Settings

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus" / "nkdagility"


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    """A fake OpenAI-compatible server on a free localhost port."""
    server = FakeLLM().start()
    server.retry_after = "0.1"
    yield server
    server.stop()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A scratch copy of the demo site and the default taxonomy."""
    shutil.copytree(REPO / "examples" / "site", tmp_path / "site")
    shutil.copytree(REPO / "categories", tmp_path / "taxonomy")
    return tmp_path


@pytest.fixture
def make_settings(site: Path, fake_llm: FakeLLM) -> Callable[..., Settings]:
    """Settings for the fake server and the scratch site; keyword overrides use env names."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "TAGGER_PROVIDER": "openai",
            "OPENAI_BASE_URL": fake_llm.base_url,
            "OPENAI_API_KEY": "sk-test-secret-key-1234567890",
            "TAGGER_MODEL": "fake-model",
            "TAGGER_TAXONOMY_DIR": str(site / "taxonomy"),
            "TAGGER_CONTENT_DIR": str(site / "site"),
            "TAGGER_REQUEST_TIMEOUT": 2.0,
            "TAGGER_RETRY_ATTEMPTS": 4,
            "TAGGER_RETRY_DEADLINE": 20.0,
            "TAGGER_RETRY_MAX_WAIT": 2.0,
            "TAGGER_CONCURRENCY": 1,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def classifier(make_settings: Callable[..., Settings]) -> Classifier:
    """A classifier wired to the fake server."""
    return make_classifier(make_settings())


@pytest.fixture
def corpus() -> Path:
    """The real site's corpus from ../shared, or skip."""
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus/nkdagility is absent (only present in the project's workspace and CI)")
    return CORPUS
