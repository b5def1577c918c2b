#!/usr/bin/env bash
# Set up (or reuse) the venv, then run the end-to-end demo:  bash tools/run_main.sh [demo args...]
# (the demo is `rest-dense demo`; see `rest-dense demo --help`). Honours REST_DENSE_VENV
# (see tools/setup_env.sh).
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
# idle OpenMP workers sleep instead of spinning (matters on CPUs shared with other work)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

exec rest-dense demo "$@"
