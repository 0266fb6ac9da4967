#!/usr/bin/env bash
# Nightly backfill for cron: enqueue every post under DIR whose result record is stale, at low priority.
# Usage: scripts/backfill-cron.sh DIR   (from any folder; settings from the environment and TAGGER_ENV_FILE or ./.env)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "$here/.venv/bin/tagger" backfill "${1:?content folder}" --priority low
