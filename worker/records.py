"""The result record of each post: what was judged, what was assigned, and the cache.

Made for version control: the post's path relative to the content root, stable order, one judgement per line,
the fields every judgement shares written once. Beside the post (`data.<stem>.tagger.json`) by default, or in
a mirror tree under `TAGGER_RECORDS_DIR` (outside what a site generator publishes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from worker import untrusted
from worker.posts import Post, Staged, normal_form, replace_file, stage_file
from worker.results import SUB_SCORES, Judgement, Usage, level

RECORD_VERSION = 2
EARLIER_KEPT = 32
# Fields most judgements of a record share: written once in the header, per line only where they differ.
SHARED = ("content_hash", "prompt_version", "model", "provider", "judged_at")
HEADER = (
    "version",
    "post",
    "mode",
    "content_hash",
    "file_hash",
    "before_file_hash",
    "earlier_file_hashes",
    "assigned",
    "removed_by_people",
    "added_keys",
    "pending",
    "usage",
    "truncated_chars",
    "updated_at",
)


class Pending(BaseModel):
    """A write tagger announced in the record before replacing the post, with what held before it."""

    before_file_hash: str
    assigned: dict[str, list[str]] = Field(default_factory=dict)
    removed_by_people: dict[str, list[str]] = Field(default_factory=dict)  # terms people took out: never re-added
    added_keys: list[str] = Field(default_factory=list)


class Record(BaseModel):
    """Everything tagger knows about one post from earlier runs."""

    version: int = RECORD_VERSION
    post: str = ""
    mode: str = ""
    content_hash: str = ""
    file_hash: str = ""
    # The post's hash before tagger's last write: a post back at exactly these bytes does not hold that write.
    before_file_hash: str = ""
    # Every other version of the post tagger wrote or wrote over, up to EARLIER_KEPT, oldest first: a post back at
    # one of them (git checkout of the site from before tagger's last writes) does not hold the later writes' terms.
    earlier_file_hashes: list[str] = Field(default_factory=list)
    assigned: dict[str, list[str]] = Field(default_factory=dict)
    removed_by_people: dict[str, list[str]] = Field(default_factory=dict)  # terms people took out: never re-added
    added_keys: list[str] = Field(default_factory=list)
    pending: Pending | None = None
    judgements: list[Judgement] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    truncated_chars: int = 0
    updated_at: str = ""

    def cached(self) -> dict[tuple[str, str], Judgement]:
        """Earlier judgements by (type, term)."""
        return {(j.type, j.term): j for j in self.judgements}


def reconcile(record: Record, post: Post) -> Record:
    """The record as it stands for the post on disk, settling a write that was announced but not confirmed.

    The post holds what tagger wrote: the write landed. The post holds what was there before: it did not, and
    the earlier assignments stand. Anything else (a person edited it meanwhile): both sets stay tagger's, so a
    crash or a failed record write never turns an AI term into a human one.

    The same after a confirmed write: a post back at exactly its bytes from before tagger's last write (restored by
    git, a record copied from another checkout) does not hold the terms that write added: they are neither tagger's
    any more nor removed by people, and the post is due again.
    """
    pending = record.pending
    if pending is None:
        return _written_over(record, post)
    if post.file_hash == record.file_hash:
        return record.model_copy(update={"pending": None})
    if post.file_hash == pending.before_file_hash:
        return record.model_copy(
            update={
                "pending": None,
                "file_hash": pending.before_file_hash,
                "assigned": pending.assigned,
                "removed_by_people": pending.removed_by_people,
                "added_keys": pending.added_keys,
            }
        )

    def union(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: list(dict.fromkeys([*a.get(k, []), *b.get(k, [])])) for k in dict.fromkeys([*a, *b])}

    return record.model_copy(
        update={
            "pending": None,
            "assigned": union(pending.assigned, record.assigned),
            "removed_by_people": union(pending.removed_by_people, record.removed_by_people),
            "added_keys": sorted({*pending.added_keys, *record.added_keys}),
        }
    )


def restored(record: Record, file_hash: str) -> bool:
    """True when `file_hash` is a version of the post from before tagger's last write (or one tagger wrote before)."""
    return bool(file_hash) and (file_hash == record.before_file_hash or file_hash in record.earlier_file_hashes)


def _written_over(record: Record, post: Post) -> Record:
    """A confirmed record against a post back at its bytes from before tagger's last write (or an earlier version
    tagger knew): the later writes are absent, and the terms they added are not a person's removal."""
    if post.file_hash == record.file_hash or not restored(record, post.file_hash):
        return record
    assigned: dict[str, list[str]] = {}
    for term_type, titles in record.assigned.items():
        present = {normal_form(t) for t in post.terms(term_type)}
        assigned[term_type] = [t for t in titles if normal_form(t) in present]
    return record.model_copy(
        update={
            "assigned": assigned,
            "added_keys": [k for k in record.added_keys if k in post.meta],
            "file_hash": post.file_hash,
        }
    )


def dumps(record: Record) -> bytes:
    """The record as JSON with one header field, and one judgement, per line (stable order)."""
    data = record.model_dump(mode="json")
    judgements = sorted(record.judgements, key=lambda j: (j.type, j.term))
    shared = {f: _most_common([getattr(j, f) for j in judgements]) for f in SHARED}
    for key in ("assigned", "removed_by_people"):
        data[key] = {k: data[key][k] for k in sorted(data[key])}
    # Written only once there is one, so records from before it change by no line when written again.
    optional = ("before_file_hash", "earlier_file_hashes")
    lines = [f"{json.dumps(k)}: {_compact(data[k])}" for k in HEADER if k not in optional or data[k]]
    lines.append(f'"shared": {_compact(shared)}')
    columns = ["type", "term", "confidence", list(SUB_SCORES), "definition_hash", "reason"]
    lines.append(f'"columns": {_compact(columns)}')
    rows = []
    for j in judgements:
        row: list[Any] = [j.type, j.term, j.confidence, [j.scores.get(s, 0) for s in SUB_SCORES], j.definition_hash]
        row.append(j.reason)
        own = {f: getattr(j, f) for f in SHARED if getattr(j, f) != shared[f]}
        if own:
            row.append(own)
        rows.append(_compact(row))
    body = ",\n".join(rows)
    text = "{\n" + ",\n".join(lines) + ',\n"judgements": [\n' + body + ("\n" if rows else "") + "]\n}\n"
    return text.encode("utf-8")


def loads(data: bytes) -> Record:
    """A record from its JSON: this format, or version 1 (every field of every judgement) migrated.

    Records written before `removed_by_people` was named so call it `rejected` (in the header and the pending
    write): read under the new name, written with it next time.
    """
    raw = _renamed(untrusted.loads(data))
    if raw.get("version", 1) < 2:
        return Record.model_validate({k: v for k, v in raw.items() if k != "version"})
    shared = raw.get("shared", {})
    judgements = []
    for row in raw.get("judgements", []):
        term_type, term, value, scores, definition_hash, reason, *rest = row
        own = rest[0] if rest else {}
        judgements.append(
            Judgement(
                type=term_type,
                term=term,
                scores=dict(zip(SUB_SCORES, scores, strict=True)),
                confidence=value,
                level=level(value),
                reason=reason,
                definition_hash=definition_hash,
                **{f: own.get(f, shared.get(f, "")) for f in SHARED},
            )
        )
    fields = {k: raw[k] for k in HEADER if k in raw}
    return Record.model_validate({**fields, "judgements": judgements})


def _renamed(raw: Any) -> dict[str, Any]:
    """The record's JSON with the old name of `removed_by_people` (`rejected`) migrated."""
    if not isinstance(raw, dict):
        raise ValueError("a record is a JSON object")
    for holder in (raw, raw.get("pending")):
        if isinstance(holder, dict) and "rejected" in holder:
            holder.setdefault("removed_by_people", holder.pop("rejected"))
    return raw


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _most_common(values: list[str]) -> str:
    if not values:
        return ""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], v))


@dataclass(frozen=True)
class RecordStore:
    """Where records live: beside each post, or mirrored under `records_dir` (paths relative to `content_root`)."""

    content_root: Path | None = None
    records_dir: Path | None = None

    def relative(self, post_path: Path) -> str:
        """The post's path relative to the content root (as given when it lies outside)."""
        if self.content_root is not None:
            try:
                return post_path.resolve().relative_to(self.content_root.resolve()).as_posix()
            except ValueError:
                pass
        return post_path.as_posix()

    def path_for(self, post_path: Path) -> Path:
        """The record file of a post."""
        beside = record_path(post_path)
        if self.records_dir is None or self.content_root is None:
            return beside
        relative = Path(self.relative(post_path))
        if relative.is_absolute():
            return beside
        return self.records_dir / relative.parent / beside.name

    def load(self, post_path: Path) -> Record:
        """The post's record (a record left beside the post before `records_dir` was set is migrated)."""
        path = self.path_for(post_path)
        record = _read(path)
        if record is None and path != record_path(post_path):
            record = _read(record_path(post_path))
        if record is not None and self._another_posts(record, post_path):
            # Its judgements stay (a cache keyed by content hash); what it says was assigned is the other post's.
            return Record(judgements=record.judgements)
        return record or Record()

    def _another_posts(self, record: Record, post_path: Path) -> bool:
        """True when the record names another post that still exists: it was copied with a page bundle (a post
        renamed or moved keeps its record)."""
        if self.content_root is None or not record.post or record.post == self.relative(post_path):
            return False
        other = self.content_root / record.post
        return not Path(record.post).is_absolute() and other.is_file() and not other.samefile(post_path)

    def save(self, post_path: Path, record: Record, mode: int | None = None) -> None:
        """Write the record atomically with the post's file mode (minus execute bits)."""
        self.commit(post_path, self.stage(post_path, record), mode)

    def stage(self, post_path: Path, record: Record) -> Staged:
        """The record's bytes in a temp file beside where it lives, fsynced; `commit` renames it into place."""
        path = self.path_for(post_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return stage_file(path, dumps(record.model_copy(update={"post": self.relative(post_path)})))

    def commit(self, post_path: Path, staged: Staged, mode: int | None = None, durable: bool = True) -> None:
        """Rename a staged record into place (with the post's file mode, minus execute bits) and, `durable`, fsync
        its folder."""
        if mode is None:
            try:
                mode = post_path.stat().st_mode & 0o666
            except OSError:
                mode = 0o644
        replace_file(staged, mode=mode, durable=durable)
        legacy = record_path(post_path)
        if staged.path != legacy:
            legacy.unlink(missing_ok=True)  # migrated into the mirror tree: out of the published site


def _read(path: Path) -> Record | None:
    try:
        return loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError, TypeError, KeyError, OSError):
        # A damaged record only costs a re-judgement; the post itself stays the source of truth.
        return None


def record_path(post_path: Path) -> Path:
    """`data.<stem>.tagger.json` beside the post (like the peer's `data.index.classifications.json`)."""
    return post_path.with_name(f"data.{post_path.stem}.tagger.json")


def load_record(post_path: Path) -> Record:
    """The record beside the post, or an empty one when there is none or it is unreadable."""
    return RecordStore().load(post_path)


def save_record(post_path: Path, record: Record) -> None:
    """Write the record beside the post atomically."""
    RecordStore().save(post_path, record)
