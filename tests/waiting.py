"""Polling for a condition with a deadline (the machine is shared and slow: deadlines are generous)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], timeout: float = 90.0, step: float = 0.2) -> bool:
    """Poll until `condition()` is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())
