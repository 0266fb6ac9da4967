"""Queue subcommands (enqueue, backfill, work, failed, status); filled in by the queue work."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    """Register the queue subcommands on the main parser."""
    del sub


__all__ = ["add_commands", "argparse"]
