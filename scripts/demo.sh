#!/usr/bin/env bash
# One command on a fresh machine: install everything, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/npsparse demo "$@"
