"""The result record kept next to each post: what was judged, what was assigned, and the cache."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from worker.judgements import Judgement, Usage
from worker.posts import atomic_write

RECORD_VERSION = 1


class Record(BaseModel):
    """Everything tagger knows about one post from earlier runs."""

    version: int = RECORD_VERSION
    post: str = ""
    content_hash: str = ""
    assigned: dict[str, list[str]] = Field(default_factory=dict)
    rejected: dict[str, list[str]] = Field(default_factory=dict)
    judgements: list[Judgement] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    truncated_chars: int = 0
    updated_at: str = ""

    def cached(self) -> dict[tuple[str, str], Judgement]:
        """Earlier judgements by (type, term)."""
        return {(j.type, j.term): j for j in self.judgements}


def record_path(post_path: Path) -> Path:
    """`data.<stem>.tagger.json` beside the post (like the peer's `data.index.classifications.json`)."""
    return post_path.with_name(f"data.{post_path.stem}.tagger.json")


def load_record(post_path: Path) -> Record:
    """The post's record, or an empty one when there is none or it is unreadable."""
    path = record_path(post_path)
    try:
        return Record.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return Record()
    except (ValidationError, ValueError, OSError):
        # A damaged record only costs a re-judgement; the post itself stays the source of truth.
        return Record()


def save_record(post_path: Path, record: Record) -> None:
    """Write the record atomically."""
    data = json.dumps(record.model_dump(mode="json"), indent=1, ensure_ascii=False).encode("utf-8")
    atomic_write(record_path(post_path), data)
