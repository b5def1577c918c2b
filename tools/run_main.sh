#!/usr/bin/env bash
# Set up (or reuse) the venv, then run the demo:  bash tools/run_main.sh [demo args...]
# Honours REST_DENSE_VENV (see tools/setup_env.sh).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash "$REPO/tools/setup_env.sh"

VENV="${REST_DENSE_VENV:-$REPO/.venv}"
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
NPROC="$(nproc)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$NPROC}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$NPROC}"

exec python tools/demo.py "$@"
