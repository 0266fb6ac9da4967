"""tagger: LLM-backed taxonomy tagging for markdown posts."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The installed distribution's version (pyproject.toml): one source of truth for `tagger --version`.
    __version__ = version("tagger")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
