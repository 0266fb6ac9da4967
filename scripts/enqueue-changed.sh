#!/usr/bin/env bash
# For a publishing pipeline: enqueue the posts a push changed, at high priority (deleted ones are reported).
# Usage: scripts/enqueue-changed.sh GIT_REV   (from any folder, e.g. the site's repository; settings from the
# environment and TAGGER_ENV_FILE or ./.env; TAGGER_CONTENT_DIR names the content root, else the current folder)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "$here/.venv/bin/tagger" enqueue --changed-since "${1:?git revision}" --priority high
