"""Site files: which paths lie inside the content root, and which files there are posts."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from worker.errors import NotAPost, OutsideContentRoot, PostMissing, SettingsError, UsageError
from worker.settings import Settings

# Tagger's own files beside the posts: result records and the temp files of atomic writes.
OWN_FILES = ("data.*.tagger.json", ".*.tagger-tmp")


def content_root(settings: Settings) -> Path:
    """The resolved content root, or SettingsError when it is not a folder (a typo in TAGGER_CONTENT_DIR)."""
    root = settings.content_root()
    if not root.is_dir():
        raise SettingsError(f"the content root {settings.content_root_label()} is not a folder")
    return root


def site_id(settings: Settings) -> str:
    """A short id of the content root (this site's checkout): state kept per checkout is keyed by it."""
    return hashlib.sha256(str(settings.content_root()).encode("utf-8")).hexdigest()[:12]


def _inside(path: Path | str, settings: Settings, from_cwd: bool) -> tuple[Path, Path]:
    """(content root, resolved path), or OutsideContentRoot."""
    root = content_root(settings)
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        # Producers name paths from where they run; jobs name them from the root. Never both.
        candidate = (Path.cwd() if from_cwd else root) / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        how = "is a symlink that points" if _crosses_symlink(candidate, root) else "resolves"
        raise OutsideContentRoot(f"{how} outside the content root {settings.content_root_label()}", path=path)
    return root, resolved


def _crosses_symlink(candidate: Path, root: Path) -> bool:
    """True when the path names something inside the root lexically (so only a symlink can take it out)."""
    return Path(os.path.normpath(candidate)).is_relative_to(root)


def not_a_post(relative: str, settings: Settings) -> str | None:
    """Why a path relative to the content root is not a post, or None when it is one."""
    parts = PurePosixPath(relative).parts
    name = parts[-1] if parts else ""
    if not parts:
        return "is the content root itself, not a post"
    if any(fnmatchcase(name, pattern) for pattern in OWN_FILES):
        return "is one of tagger's own files"
    hidden = next((p for p in parts if p.startswith(".")), None)
    if hidden is not None:
        return f"is hidden ({hidden})"
    if not any(fnmatchcase(name, pattern) for pattern in settings.post_globs):
        return f"is not a post: the name matches none of {', '.join(settings.post_globs)} (TAGGER_POST_GLOBS)"
    for pattern in settings.exclude:
        # A pattern excludes a path or any folder above it: `drafts` and `drafts/*` both exclude drafts/a.md.
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatchcase(prefix, pattern.strip("/")) for prefix in prefixes):
            return f"is excluded by {pattern!r} (TAGGER_EXCLUDE)"
    return None


def confine(path: Path | str, settings: Settings, from_cwd: bool = True) -> str:
    """The post's path relative to the content root (a symlink inside gives its target's), or an error.

    A relative path is taken from the current folder (`from_cwd`, producers) or from the root (jobs), never
    both. Raises OutsideContentRoot (`..`, absolute paths outside, symlinks out) or NotAPost.
    """
    root, resolved = _inside(path, settings, from_cwd)
    relative = resolved.relative_to(root).as_posix()
    reason = not_a_post("" if relative == "." else relative, settings)
    if reason:
        raise NotAPost(reason, path=path)
    return relative


def existing_post(path: Path | str, settings: Settings) -> str:
    """`confine` for producers: the post must also exist now (a typo is an error at once)."""
    relative = confine(path, settings)
    target = settings.content_root() / relative
    if not target.is_file():
        raise PostMissing("does not exist" if not target.exists() else "is not a file", path=path)
    return relative


def confine_folder(path: Path | str, settings: Settings) -> Path:
    """A folder inside the content root (the root itself included), resolved; or a clear error."""
    candidate = Path(path).expanduser()
    if not candidate.exists():
        raise UsageError("no such folder", path=path)
    if not candidate.is_dir():
        raise UsageError("is not a folder", path=path)
    return _inside(path, settings, from_cwd=True)[1]


@dataclass(frozen=True)
class Found:
    """A file found under a folder: its post path relative to the root, or why it was skipped."""

    path: Path
    relative: str | None
    skipped: str | None = None


def walk_posts(folder: Path, settings: Settings) -> Iterator[Found]:
    """Every post under `folder` (hidden folders and excluded paths not entered); symlinks out are skipped."""
    root = settings.content_root()
    seen: set[str] = set()
    for current, dirs, files in os.walk(folder, onerror=None, followlinks=False):
        base = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = base / name
            lexical = path.relative_to(root).as_posix() if path.is_relative_to(root) else name
            if not_a_post(lexical, settings):
                continue  # not a post by its own name or place: not even worth a line
            try:
                relative = confine(path, settings)
            except (OutsideContentRoot, NotAPost) as exc:
                yield Found(path, None, exc.message)
                continue
            target = root / relative
            if target.exists() and not target.is_file():  # a FIFO or a device: reading it could block forever
                yield Found(path, None, "is not a regular file")
                continue
            if relative not in seen:  # a symlink inside and its target are one post
                seen.add(relative)
                yield Found(path, relative)
