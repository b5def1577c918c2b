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
# One pytest worker per core (pytest-xdist), each test file on one worker (module fixtures
# built once), one torch thread per worker: the tests are mostly small single-threaded
# computations, so two workers on two cores take about half the time of one with two
# threads. REST_DENSE_TEST_WORKERS=0 runs them in this process (or pass -n 0).
WORKERS="${REST_DENSE_TEST_WORKERS:-$NPROC}"
if [[ "$WORKERS" -gt 1 ]]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    export MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
    PARALLEL=(-n "$WORKERS" --dist loadfile)
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$NPROC}"
    export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$NPROC}"
    PARALLEL=()
fi

python tools/check_env.py
exec python -m pytest -q "${PARALLEL[@]}" tests "$@"
