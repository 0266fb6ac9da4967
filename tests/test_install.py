"""tagger as users install it: the built sdist and wheel, and a fresh install that works from any folder.

Builds with the project's own backend (`python -m build`: the sdist, then the wheel from the unpacked
sdist, so the sdist is shown to be complete), installs the wheel with its real dependencies into a new
virtual environment outside the repository (pip's cache makes that quick), and runs the installed commands
from a scratch site folder with nothing of the repository on the path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker.prompts import load_templates

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
FORBIDDEN = ("tests/", "benchmarks/", ".venv/", "scripts/", "__pycache__/", ".git/", "build/")


@dataclass(frozen=True)
class Dist:
    """The built archives."""

    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    """A fresh virtual environment with the wheel installed, and a scratch site to run it in."""

    bin: Path
    site: Path
    env: dict[str, str]


def _run(
    args: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _clean(result: subprocess.CompletedProcess[str]) -> str:
    """Assert exit 0 and no traceback; return stdout."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{output}"
    assert "Traceback" not in output, output
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return Dist(sdist=out / f"tagger-{VERSION}.tar.gz", wheel=out / f"tagger-{VERSION}-py3-none-any.whl")


def _source_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / "worker").rglob("*.py") if "__pycache__" not in p.parts}


def _prompt_files() -> list[Path]:
    return sorted(p for p in (REPO / "prompts").iterdir() if p.is_file() and p.suffix in {".md", ".py"})


def _starter_files() -> list[str]:
    """What `tagger init` starts a site from, as the wheel names it: .env.example and the example taxonomy."""
    taxonomy = sorted(p.relative_to(REPO / "categories").as_posix() for p in (REPO / "categories").rglob("*.md"))
    return ["worker/starter/.env.example", *(f"worker/starter/taxonomy/{n}" for n in taxonomy)]


def _source_of(name: str) -> Path:
    if name.startswith("worker/templates/"):
        return REPO / "prompts" / Path(name).name
    if name == "worker/starter/.env.example":
        return REPO / ".env.example"
    return REPO / "categories" / name.removeprefix("worker/starter/taxonomy/")


def test_wheel_holds_every_module_and_the_templates_and_nothing_else(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
        packaged = {f"worker/templates/{p.name}": wheel.read(f"worker/templates/{p.name}") for p in _prompt_files()}
        packaged |= {name: wheel.read(name) for name in _starter_files()}
        entry_points = wheel.read(f"tagger-{VERSION}.dist-info/entry_points.txt").decode()
    metadata = {n for n in names if n.startswith(f"tagger-{VERSION}.dist-info/")}
    # A subpackage added to worker/ but not to pyproject.toml's package list would be missing here.
    assert names - metadata == _source_modules() | set(packaged)
    assert {"worker/templates/system.md", "worker/templates/term.md", "worker/templates/post.md"} <= names
    for name, data in packaged.items():
        assert data == _source_of(name).read_bytes(), f"{name} differs from {_source_of(name)}"
    assert "tagger = worker.cli:main" in entry_points
    # The fake OpenAI server is a test tool: users never run it, so the wheel does not carry it.
    assert not [n for n in names if "fakellm" in n], "the fake server ships in the wheel"
    assert not [n for n in names if n.startswith(FORBIDDEN) or "/__pycache__/" in n or n.endswith(".pyc")]


def test_sdist_holds_the_sources_and_no_tests_benchmarks_or_venv(dist: Dist) -> None:
    top = f"tagger-{VERSION}/"
    with tarfile.open(dist.sdist) as sdist:
        names = {m.name.removeprefix(top) for m in sdist.getmembers() if m.isfile()}
    assert {"pyproject.toml", "README.md", "MANIFEST.in"} <= names
    assert _source_modules() <= names
    assert {p.relative_to(REPO).as_posix() for p in _prompt_files()} <= names
    leaked = [n for n in names if n.startswith(FORBIDDEN) or "/__pycache__/" in n or n.endswith(".pyc")]
    assert not leaked, leaked


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    assert not root.is_relative_to(REPO)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    bin_ = root / "venv" / "bin"
    # Nothing of this session leaks in: no settings, no PYTHONPATH, no other virtual environment.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "TAGGER_", "REDIS_", "RQ_", "PYTHON", "VIRTUAL_ENV", "PYTEST"))
    }
    env["PATH"] = f"{bin_}{os.pathsep}{env.get('PATH', '')}"
    # The real dependencies, resolved by pip (its cache makes this quick after the first run).
    pip = _run([bin_ / "python", "-m", "pip", "install", "--quiet", dist.wheel], cwd=root, env=env, timeout=300)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    site = root / "site"
    shutil.copytree(REPO / "examples" / "site", site)
    shutil.copytree(REPO / "categories", site / "categories")
    return Installed(bin=bin_, site=site, env=env)


def test_installed_package_is_imported_from_the_venv_not_the_repository(installed: Installed) -> None:
    code = (
        "import worker, worker.prompts as p; from importlib import resources; "
        "print(worker.__file__); print(resources.files(p.TEMPLATE_PACKAGE)); print(p.load_templates().version)"
    )
    out = _clean(_run([installed.bin / "python", "-c", code], cwd=installed.site, env=installed.env)).split()
    venv = installed.bin.parent
    assert Path(out[0]).is_relative_to(venv) and Path(out[1]).is_relative_to(venv), out
    assert out[2] == load_templates().version  # the same templates as prompts/, so the same cache keys


def test_installed_tagger_classifies_a_site_dry_run_with_the_offline_provider(installed: Installed) -> None:
    posts = sorted((installed.site / "posts").glob("*.md"))
    before = {p: p.read_bytes() for p in installed.site.rglob("*") if p.is_file()}
    env = {**installed.env, "TAGGER_PROVIDER": "offline"}
    args: list[str | Path] = ["tagger", "classify", "--dry-run", *(p.relative_to(installed.site) for p in posts)]
    out = _clean(_run(args, cwd=installed.site, env=env))
    for post in posts:
        assert f"posts/{post.name}  [" in out
    assert "+categories" in out or "+tags" in out, out  # it decided something and shows the diff
    after = {p: p.read_bytes() for p in installed.site.rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before  # no post written
    assert all(p.name.endswith(".tagger.json") for p in set(after) - set(before))  # only the cache: the records


def test_installed_tagger_init_starts_a_site_from_the_packaged_env_example(
    installed: Installed, tmp_path: Path
) -> None:
    site = tmp_path / "blog"
    (site / "content").mkdir(parents=True)
    (site / "hugo.toml").write_text('title = "blog"\n', encoding="utf-8")
    (site / "content" / "a.md").write_text("---\ntitle: A\n---\nText.\n", encoding="utf-8")
    out = _clean(_run(["tagger", "init"], cwd=site, env=installed.env))
    assert "hugo site (hugo.toml)" in out and "next:" in out
    env_file = (site / ".env").read_text(encoding="utf-8")
    assert "TAGGER_RECORDS_DIR=.tagger" in env_file and "# TAGGER_CHUNK_SIZE=200" in env_file
    example = (site / "categories" / "tags" / "kanban.md").read_text(encoding="utf-8")
    assert "title: Kanban" in example  # the example taxonomy shipped in the wheel


def test_installed_tagger_checks_the_taxonomy_and_prints_its_version(installed: Installed) -> None:
    check = _run(["tagger", "taxonomy", "check"], cwd=installed.site, env=installed.env)
    _clean(check)
    assert "0 problems" in check.stderr
    assert _clean(_run(["tagger", "--version"], cwd=installed.site, env=installed.env)).strip() == f"tagger {VERSION}"
    help_ = _clean(_run([installed.bin / "python", "-m", "worker", "--help"], cwd=installed.site, env=installed.env))
    assert "classify" in help_


def test_installed_tagger_without_a_taxonomy_says_what_to_set(installed: Installed, tmp_path: Path) -> None:
    (tmp_path / "post.md").write_text("---\ntitle: A post\n---\nText.\n", encoding="utf-8")
    env = {**installed.env, "TAGGER_PROVIDER": "offline"}
    result = _run(["tagger", "classify", "--dry-run", "post.md"], cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "TAGGER_TAXONOMY_DIR" in result.stderr and str(tmp_path / "categories") in result.stderr


def test_installed_tagger_honours_prompts_dir(installed: Installed, tmp_path: Path) -> None:
    env = {**installed.env, "TAGGER_PROVIDER": "offline", "TAGGER_PROMPTS_DIR": str(tmp_path)}
    result = _run(["tagger", "classify", "--dry-run", "posts/limiting-wip.md"], cwd=installed.site, env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'system.md'}: prompt template unreadable" in result.stderr


def test_systemd_unit_verifies_against_the_installed_command(installed: Installed, tmp_path: Path) -> None:
    unit = (REPO / "deploy" / "tagger-worker.service").read_text(encoding="utf-8")
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    command = exec_start.removeprefix("ExecStart=").split()
    assert command[0] == "/opt/tagger/bin/tagger"
    # The unit's command line parses with the installed tagger (options exist), before systemd looks at it.
    _clean(_run([installed.bin / "tagger", *command[1:], "--help"], cwd=installed.site, env=installed.env))
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd): the unit file itself is not verified")
    # The same unit, with its ExecStart pointing at this test's installation instead of /opt/tagger.
    local = tmp_path / "tagger-worker.service"
    local.write_text(unit.replace("/opt/tagger/bin/tagger", str(installed.bin / "tagger")), encoding="utf-8")
    verify = _run(["systemd-analyze", "verify", local], cwd=tmp_path, env=installed.env)
    # verify exits 0 on unknown keys and bad values and only warns: any output is a finding.
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr


def test_pipx_install_of_the_wheel_gives_a_working_tagger(dist: Dist, installed: Installed, tmp_path: Path) -> None:
    pipx = shutil.which("pipx")
    if pipx is None:
        pytest.skip("pipx not installed (Debian package pipx): `pipx install` is not tried, only pip into a venv")
    env = {**installed.env, "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin")}
    env["PATH"] = env["PATH"].split(os.pathsep, 1)[1]  # not the test's venv: pipx makes its own
    result = _run([pipx, "install", dist.wheel], cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tagger = tmp_path / "bin" / "tagger"
    assert _clean(_run([tagger, "--version"], cwd=installed.site, env=env)).strip() == f"tagger {VERSION}"
    out = _clean(_run([tagger, "classify", "--dry-run", "posts/limiting-wip.md"], cwd=installed.site, env=env))
    assert "posts/limiting-wip.md  [dry run;" in out
