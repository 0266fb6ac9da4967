"""The docs site: its generated reference matches the code, it builds strictly, and a browser renders it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.envfile import default_value, example_text, field_names, parse_example

REPO = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.mark.slow
def test_the_generated_reference_pages_match_the_code() -> None:
    done = _run([sys.executable, "scripts/docs_reference.py", "--check"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_setting_is_documented_in_env_example_and_the_settings_page() -> None:
    example = parse_example(example_text())
    documented = [s.name for s in example.settings]
    assert sorted(documented) == sorted(field_names()), "Settings and .env.example name different settings"
    page = (REPO / "docs" / "reference" / "settings.md").read_text(encoding="utf-8")
    for name in field_names():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |")).replace("\\|", "|")
        default = default_value(name)
        assert (f"`{default}`" if default else "(unset)") in row, row
        assert example.get(name) is not None and " ".join(example.get(name).comment)[:40] in row  # type: ignore[union-attr]


@pytest.mark.slow
def test_the_docs_build_strictly_and_render_in_headless_chromium(tmp_path: Path) -> None:
    if not MKDOCS.exists():
        pytest.skip("mkdocs is not installed in this environment (pip install -e '.[dev]')")
    site = tmp_path / "site"
    # Offline: in a network namespace of its own (no network at all) where the machine allows it (root).
    offline = ["unshare", "-n"] if shutil.which("unshare") and _run(["unshare", "-n", "true"]).returncode == 0 else []
    done = _run([*offline, str(MKDOCS), "build", "--strict", "--site-dir", str(site)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("tagger init", "tagger classify", "tagger backfill", "tagger failed"):
        assert command in cli, f"{command} missing from the generated CLI reference"
    assert "Sentinel" not in cli  # click 8.3's UNSET default must not leak into the page as a default value
    for page in site.rglob("*.html"):  # no page fetches anything from the network (fonts, scripts, styles)
        html = page.read_text(encoding="utf-8")
        fetched = re.findall(r"<(?:script|link|img)[^>]*(?:src|href)=\"(?:https?:)?//[^\"]+", html)
        assert not fetched and "fonts.googleapis" not in html, (page, fetched)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): the pages were built, not rendered")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    for page, expected in (
        ("index.html", "Your own site in 10 minutes"),
        ("guides/your-own-site/index.html", "tagger taxonomy check"),
    ):
        dom = subprocess.run(
            [browser, *flags, "--dump-dom", (site / page).as_uri()], capture_output=True, text=True, timeout=120
        ).stdout
        assert expected in dom and "md-nav" in dom, f"{page} did not render with the theme's navigation"
    shot = tmp_path / "home.png"
    subprocess.run(
        [browser, *flags, "--window-size=1280,1000", f"--screenshot={shot}", (site / "index.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000  # rendered, not blank
    kept = REPO / "docs" / "screenshots" / "home.png"
    assert kept.stat().st_size > 20_000, "the kept screenshot of the home page is missing or blank"
