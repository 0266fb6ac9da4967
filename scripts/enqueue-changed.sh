#!/usr/bin/env bash
# For a publishing pipeline: enqueue the posts a push changed, at high priority (deleted ones are reported).
# Usage: scripts/enqueue-changed.sh GIT_REV          posts for workers that share the site's folder
#        scripts/enqueue-changed.sh --remote GIT_REV workers on other machines: enqueue the posts with their
#                                                   content, wait for the results, apply them, commit them
# (from any folder, e.g. the site's repository; settings from the environment and TAGGER_ENV_FILE or ./.env;
# TAGGER_CONTENT_DIR names the content root, else the current folder). In remote mode the exit code is
# `tagger apply`'s: 0 all applied, 1 a job failed (listed with its kind), 2 posts edited meanwhile were
# enqueued again (the next run applies them). Push the commit afterwards (`git push`) if the pipeline may.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
tagger="$here/.venv/bin/tagger"
if [ "${1:-}" = "--remote" ]; then
    shift
    "$tagger" enqueue --remote --changed-since "${1:?git revision}" --priority high
    exec "$tagger" apply --wait --timeout "${TAGGER_APPLY_TIMEOUT:-1800}" --commit
fi
exec "$tagger" enqueue --changed-since "${1:?git revision}" --priority high
