#!/usr/bin/env bash
# The project's test command: set up (or reuse) the venv, check the environment, run the tests.
#   bash tools/run_tests.sh [extra pytest args...]
# Honours REST_DENSE_VENV (see tools/setup_env.sh). Exits with pytest's exit code.
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

python tools/check_env.py
exec python -m pytest -q tests "$@"
