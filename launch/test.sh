#!/usr/bin/env bash
# One command from a fresh clone: install the dev tools, run the default test group, then the heavy
# group while the time budget (TRIBUTARY_TEST_BUDGET_S, default 4200 s) allows.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash launch/setup.sh --dev
# Headless Chromium for the HTML report's screenshot test (Debian's `chromium`; CI runs as root). Non-fatal.
command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
  || echo "chromium not installed: the report screenshot test will skip"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"
budget=${TRIBUTARY_TEST_BUDGET_S:-4200}
elapsed=$(( $(date +%s) - started ))
if [ "$elapsed" -lt "$((budget / 2))" ]; then
  echo "heavy group (elapsed ${elapsed}s of ${budget}s budget)"
  status=0
  .venv/bin/python -m pytest -q -m heavy "$@" || status=$?
  # exit 5 = no heavy test collected, which is not a failure
  [ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
else
  echo "heavy group skipped: ${elapsed}s already used of the ${budget}s budget"
fi
