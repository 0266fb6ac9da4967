#!/usr/bin/env bash
# Nightly backfill for cron: enqueue every post whose result record is stale, at low priority.
# Usage: scripts/backfill-cron.sh CONTENT_DIR   (settings from .env / the environment)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "$here/.venv/bin/tagger" backfill "${1:?content folder}" --priority low
