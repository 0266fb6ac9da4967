"""Values tagger did not just write (Redis, replies, files), read without trusting them: JSON whose nesting is too
deep is a ValueError like any malformed JSON; counters and times are numbers or 0."""

from __future__ import annotations

import json
import math
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


def finite(value: Any) -> float:
    """A finite number, or 0 for anything else (None, text, NaN, infinity)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def whole(value: Any) -> int:
    """A count: a whole number of at least 0, or 0 for anything else."""
    return max(0, int(finite(value)))
