#!/usr/bin/env bash
# For a publishing pipeline: enqueue the posts a push changed, at high priority.
# Usage: scripts/enqueue-changed.sh GIT_REV   (e.g. the commit before the push; TAGGER_CONTENT_DIR names the content root)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "$here/.venv/bin/tagger" enqueue --changed-since "${1:?git revision}" --priority high
