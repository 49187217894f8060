#!/usr/bin/env bash
# One command from a fresh clone: install the dev tools and headless Chromium, lint and type-check, run
# the default test group, then the heavy group (the SmolLM2 demo at --small, the two-worker training run)
# within its own time budget (TRIBUTARY_HEAVY_BUDGET_S, default 1800 s). Any failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --dev

# Headless Chromium for the HTML report's screenshot test: Debian's `chromium`, installed as root.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "launch/test.sh: /usr/bin/chromium is missing and this is not root; install Debian's \`chromium\`" \
      "(apt-get install chromium) or run as root" >&2
    exit 1
  fi
  echo "installing chromium (apt-get)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || {
    echo "launch/test.sh: apt-get could not install chromium; the report's screenshot test needs it" >&2
    exit 1
  }
fi
/usr/bin/chromium --version >/dev/null 2>&1 || {  # its Debian launcher prints a harmless shell warning
  echo "launch/test.sh: /usr/bin/chromium does not run; the report's screenshot test needs it" >&2
  exit 1
}

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/pyright

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q --durations=15 "$@"

budget=${TRIBUTARY_HEAVY_BUDGET_S:-1800}
echo "heavy group (budget ${budget}s)"
status=0
timeout --kill-after=60 "$budget" .venv/bin/python -m pytest -q --durations=15 -m heavy "$@" || status=$?
case "$status" in
  0 | 5) ;; # 5: no heavy test collected (e.g. a -k that selects none), which is not a failure
  124 | 137)
    echo "launch/test.sh: the heavy group ran past its ${budget}s budget (TRIBUTARY_HEAVY_BUDGET_S)" >&2
    exit 1
    ;;
  *) exit "$status" ;;
esac
