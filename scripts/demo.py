"""`make demo`: classify the demo site on a scratch copy with embedded defaults and show the diff."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    """Copy examples/site to a scratch folder, run the main job on it, print what changed."""
    scratch = Path(tempfile.mkdtemp(prefix="tagger-demo-"))
    site = scratch / "site"
    shutil.copytree(REPO / "examples" / "site", site)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TAGGER_", "REDIS_"))}
    env.update(TAGGER_TAXONOMY_DIR=str(REPO / "categories"), TAGGER_CONTENT_DIR=str(site))
    print(f"demo: backfilling a scratch copy of examples/site in {site} (in-process, no Redis)\n", flush=True)
    code = subprocess.call([sys.executable, "-m", "worker", "backfill", "--inline", str(site)], env=env, cwd=scratch)
    print("\ndemo: what it decided (read back from the result records: no new calls)\n", flush=True)
    posts = sorted(str(p) for p in site.rglob("*.md"))
    subprocess.call([sys.executable, "-m", "worker", "classify", *posts], env=env, cwd=scratch)
    print("\ndemo: the diff tagger wrote (only owned front-matter keys change):\n")
    for post in sorted(site.rglob("*.md")):
        original = REPO / "examples" / "site" / post.relative_to(site)
        diff = difflib.unified_diff(
            original.read_text(encoding="utf-8").splitlines(keepends=True),
            post.read_text(encoding="utf-8").splitlines(keepends=True),
            fromfile=f"a/{post.relative_to(site)}",
            tofile=f"b/{post.relative_to(site)}",
        )
        sys.stdout.writelines(diff)
    records = sorted(p.name for p in site.rglob("data.*.tagger.json"))
    print(f"\ndemo: result records written beside the posts: {', '.join(records)}")
    print(f"demo: scratch folder kept for a look: {scratch}")
    return code


if __name__ == "__main__":
    sys.exit(main())
