#!/usr/bin/env bash
# One command from a fresh clone: install what is needed, then run `tributary demo` (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/tributary demo "$@"
