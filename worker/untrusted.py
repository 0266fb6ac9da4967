"""JSON that tagger did not just write (Redis values, replies, files): too deep a nesting is a ValueError."""

from __future__ import annotations

import json
from typing import Any


def loads(raw: str | bytes, strict: bool = True) -> Any:
    """`json.loads`, with nesting past the interpreter's limit reported as malformed JSON, not a RecursionError.

    Anyone who can write to Redis, and any model, can send `[[[[...]]]]`: a RecursionError would pass every
    `except ValueError` that refuses a bad value and crash the job instead.
    """
    try:
        return json.loads(raw, strict=strict)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
