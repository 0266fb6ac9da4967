"""Moving result records between beside the posts and `TAGGER_RECORDS_DIR`, and finding records a site publishes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import UsageError
from worker.posts import atomic_write
from worker.settings import Settings
from worker.site_init import HUGO_CONFIGS, JEKYLL_CONFIGS, detect_generator

RECORD_GLOB = "data.*.tagger.json"


@dataclass
class MoveReport:
    """What `records move` did: records moved, records already where they go, and the folders involved."""

    source: Path
    target: Path
    moved: list[Path] = field(default_factory=list)  # the records' new paths
    replaced_stale: list[Path] = field(default_factory=list)  # old copies removed: the one tagger reads was kept


def _records_beside(content: Path, skip: Path | None) -> Iterator[Path]:
    """Record files beside posts under the content root (hidden folders and the records folder left out)."""
    for folder, dirs, names in os.walk(content):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (skip is None or here / d != skip))
        for name in sorted(names):
            if name.startswith("data.") and name.endswith(".tagger.json"):
                yield here / name


def _records_in(records_dir: Path) -> Iterator[Path]:
    if records_dir.is_dir():
        yield from sorted(p for p in records_dir.rglob(RECORD_GLOB) if p.is_file())


def _move(source: Path, target: Path) -> None:
    """Copy atomically (same bytes, same mode), then remove the source: a kill in between leaves two equal copies."""
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, data, mode=source.stat().st_mode & 0o777)
    source.unlink()


def move_records(settings: Settings, to_dir: Path | None = None, beside: bool = False) -> MoveReport:
    """Move every record into the records folder (`to_dir`, else TAGGER_RECORDS_DIR), or with `beside` out of it.

    The bytes move as they are (the judgements cached in them stay valid: nothing is asked again). Where both a
    record beside the post and one in the folder exist, the one tagger reads (the folder's) is the one kept.
    """
    content = settings.content_root()
    if not content.is_dir():
        raise UsageError(f"the content root {settings.content_root_label()} is not a folder")
    folder = to_dir or settings.records_dir
    if folder is None:
        hint = "--beside moves them out of it" if beside else "give --to DIR or set TAGGER_RECORDS_DIR (e.g. .tagger)"
        raise UsageError(f"no records folder: TAGGER_RECORDS_DIR is unset ({hint})")
    records_dir = folder.expanduser().resolve()
    if records_dir == content:
        raise UsageError(f"the records folder {records_dir} is the content root itself: records would stay beside")
    if beside:
        report = MoveReport(source=records_dir, target=content)
        for record in _records_in(records_dir):
            target = content / record.relative_to(records_dir)
            if target.parent.is_dir():
                if target.exists():
                    report.replaced_stale.append(target)
                _move(record, target)
                report.moved.append(target)
        return report
    report = MoveReport(source=content, target=records_dir)
    for record in _records_beside(content, records_dir):
        target = records_dir / record.relative_to(content)
        if target.exists():
            record.unlink()  # the folder's copy is the one tagger reads: the one beside is an older leftover
            report.replaced_stale.append(record)
            continue
        _move(record, target)
        report.moved.append(target)
    return report


def site_root_of(content: Path) -> Path | None:
    """The generator site whose content `content` is (the folder itself for Jekyll, its parent for Hugo)."""
    for folder in (content, content.parent):
        if any((folder / name).is_file() for name in (*HUGO_CONFIGS, *JEKYLL_CONFIGS)):
            return folder
    return None


def published_records_warning(settings: Settings) -> str | None:
    """A warning when records are written inside what a site generator publishes, with the fix; else None."""
    content = settings.content_root()
    site = site_root_of(content)
    if site is None:
        return None
    generator = detect_generator(site)
    if (site / generator.content_dir).resolve() != content:
        return None
    records_dir = settings.records_dir.expanduser().resolve() if settings.records_dir else None
    if records_dir is not None and not (records_dir == content or content in records_dir.parents):
        return None  # a mirror tree outside the content folder: nothing of tagger's is published
    if records_dir is not None and any(p.startswith(".") for p in records_dir.relative_to(content).parts):
        return None  # a hidden folder: Hugo and Jekyll leave it alone
    where = "beside the posts" if records_dir is None else f"in {records_dir}"
    return (
        f"warning: records are written {where}, inside {content}, which {generator.name} publishes"
        " (a page bundle's files are copied into the built site): set TAGGER_RECORDS_DIR=.tagger in the site's .env"
        " and run `tagger records move` to move the ones already written"
    )
