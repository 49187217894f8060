#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): every placement indexed and queried on this machine's GPUs, against a
# bare forward+backward; figures in benchmarks/results/gpu_*.json. `--cpu-dry-run` checks the script on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
exec .venv/bin/python -m benchmarks.gpu_check "$@"
