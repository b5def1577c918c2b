#!/usr/bin/env bash
# Create (first time) or reuse the project's virtual environment.
#
#   bash tools/setup_env.sh                       # venv at $REPO/.venv
#   REST_DENSE_VENV=/path/to/venv bash tools/setup_env.sh
#
# Installs: torch 2.13.0 / torchvision 0.28.0 (regular PyPI builds), mmcv 2.1.0 with compiled ops
# (prebuilt wheel from ../shared/wheels when present, otherwise built from source, ~10 min on 2 cores),
# this package with extras [mm,d2,dev,deploy], MMDeploy 1.3.1 (without its protobuf pin), and a
# patched detectron2 0.5 (tools/install_detectron2.py).
#
# A stamp file inside the venv records a hash of the files that define the environment; when it
# matches, the only thing done is (re)registering the editable install of this checkout if needed.
# Environment variables:
#   REST_DENSE_VENV    venv location (default: $REPO/.venv); an existing venv is adopted, never recreated
#   REST_DENSE_PYTHON  interpreter used to create the venv (default: python3.11, else python3)
#   REST_DENSE_FORCE=1 ignore the stamp and run every step (each step is a no-op when already done)
#   REST_DENSE_MMCV_WHEELS  folder with a prebuilt mmcv 2.1.0 wheel (default: $REPO/../shared/wheels;
#                      set it to "" to force the source build)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REST_DENSE_VENV:-$REPO/.venv}"
STAMP="$VENV/.rest_dense_env_stamp"
SHARED_WHEELS="${REST_DENSE_MMCV_WHEELS-$REPO/../shared/wheels}"
CONSTRAINTS="$REPO/tools/constraints.txt"

log() { echo "[setup] $*"; }

# Files whose content defines the environment; any change invalidates the stamp.
ENV_FILES=(
    "$REPO/tools/setup_env.sh"
    "$REPO/setup.py"
    "$REPO/pyproject.toml"
    "$REPO/tools/install_detectron2.py"
    "$REPO/tools/constraints.txt"
)

env_hash() {
    {
        for f in "${ENV_FILES[@]}"; do
            echo "== ${f#"$REPO"/}"
            cat "$f"
        done
        # the interpreter the venv was built on
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

# Is this checkout the one installed (editable) as rest_dense in the venv?
editable_ok() {
    "$VENV/bin/python" - "$REPO" <<'PY' >/dev/null 2>&1
import json, os, sys
from importlib import metadata
from urllib.parse import unquote, urlparse
repo = os.path.realpath(sys.argv[1])
dist = metadata.distribution("rest_dense")
info = json.loads(dist.read_text("direct_url.json") or "{}")
assert info.get("dir_info", {}).get("editable"), "not editable"
assert os.path.realpath(unquote(urlparse(info["url"]).path)) == repo, "other checkout"
PY
}

# ---------------------------------------------------------------- venv (create once, then reuse)
if [[ -x "$VENV/bin/python" ]]; then
    log "reusing venv $VENV"
else
    PYTHON="${REST_DENSE_PYTHON:-}"
    if [[ -z "$PYTHON" ]]; then
        if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
    fi
    log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi

# Serialize concurrent runs on the same venv (e.g. run_tests.sh and run_main.sh started together).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV/.rest_dense_setup.lock"
    flock 9
fi

PY="$VENV/bin/python"
# pip warns about every package missing from the machine's extra local indexes; drop that noise.
pip() {
    "$PY" -m pip "$@" 2> >(grep -v "^WARNING: Location 'file://.*' is ignored" >&2)
}
PIPQ=(--quiet --progress-bar off)

# Cheap sanity check (metadata only, no imports) that nobody removed/replaced the key packages.
stack_ok() {
    "$PY" - <<'PY' >/dev/null 2>&1
from importlib import metadata as m
want = {"torch": "2.13.0", "torchvision": "0.28.0", "mmengine": "0.10.7", "mmcv": "2.1.0",
        "mmdet": "3.3.0", "mmsegmentation": "1.2.2", "mmdeploy": "1.3.1"}
for name, version in want.items():
    assert m.version(name) == version, name
assert m.version("detectron2").startswith("0.5")
PY
}

WANT="$(env_hash)"
if [[ "${REST_DENSE_FORCE:-0}" != "1" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && ! stack_ok; then
    log "stamp matches but key packages are missing or changed; re-running the set-up"
    rm -f "$STAMP"
fi
if [[ "${REST_DENSE_FORCE:-0}" != "1" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    if editable_ok; then
        log "environment up to date ($VENV)"
    else
        log "environment up to date; registering this checkout (pip install -e . --no-deps)"
        pip install "${PIPQ[@]}" --no-deps --no-build-isolation -e "$REPO"
    fi
    exit 0
fi

T0=$SECONDS
rm -f "$STAMP"

log "upgrading pip"
pip install "${PIPQ[@]}" --upgrade pip

# ---------------------------------------------------------------- torch / torchvision
# `===` makes pip take the regular PyPI builds, not the local CPU-only torch (see tools/constraints.txt).
log "installing torch 2.13.0 / torchvision 0.28.0"
pip install "${PIPQ[@]}" "torch===2.13.0" "torchvision===0.28.0"

# ---------------------------------------------------------------- mmcv 2.1.0 with compiled ops
mmcv_ok() {
    "$PY" -c 'import mmcv, mmcv._ext; assert mmcv.__version__ == "2.1.0", mmcv.__version__' >/dev/null 2>&1
}
if mmcv_ok; then
    log "mmcv 2.1.0 with ops already installed"
else
    installed=0
    if [[ -n "$SHARED_WHEELS" && -d "$SHARED_WHEELS" ]]; then
        log "installing mmcv 2.1.0 from prebuilt wheel in $SHARED_WHEELS"
        if pip install "${PIPQ[@]}" -c "$CONSTRAINTS" --find-links "$SHARED_WHEELS" \
                --only-binary mmcv "mmcv==2.1.0" && mmcv_ok; then
            installed=1
        else
            log "prebuilt mmcv wheel unusable here; falling back to a source build"
        fi
    fi
    if [[ "$installed" != 1 ]]; then
        # mmcv 2.1.0's setup.py imports pkg_resources (gone from setuptools >= 70) and must build
        # against the installed torch, hence --no-build-isolation.
        log "building mmcv 2.1.0 with ops from source (MAX_JOBS=$(nproc); ~10 min on 2 cores)"
        log "(pip will complain that torch wants setuptools>=77.0.3: expected, restored below)"
        pip install "${PIPQ[@]}" "setuptools<70" ninja wheel
        MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" pip install "${PIPQ[@]}" -c "$CONSTRAINTS" \
            --no-build-isolation --no-binary mmcv "mmcv==2.1.0"
        log "restoring a setuptools that torch accepts"
        pip install "${PIPQ[@]}" "setuptools>=77.0.3,<81"
        mmcv_ok || { echo "[setup] ERROR: mmcv 2.1.0 ops not importable after build" >&2; exit 1; }
    fi
fi

# ---------------------------------------------------------------- this package + extras
log "installing rest_dense (editable) with extras [mm,d2,dev,deploy]"
pip install "${PIPQ[@]}" -c "$CONSTRAINTS" --no-build-isolation -e "$REPO[mm,d2,dev,deploy]"

# ---------------------------------------------------------------- MMDeploy (whole-model export)
# --no-deps: mmdeploy 1.3.1 pins protobuf<=3.20.2, which would downgrade the onnx stack; its
# runtime needs come with the [deploy] extra. `pip check` reports that pin (expected).
log "installing mmdeploy 1.3.1 (without its dependency pins)"
pip install "${PIPQ[@]}" --no-deps "mmdeploy==1.3.1"

# ---------------------------------------------------------------- detectron2 (not on PyPI)
log "installing detectron2"
"$PY" "$REPO/tools/install_detectron2.py"

log "checking dependency consistency (pip check)"
pip check || log "WARNING: pip check reported problems (see above; mmdeploy's protobuf pin is expected)"

# recompute: pip may have been upgraded, but the stamp inputs are the same files
env_hash >"$STAMP"
log "done in $((SECONDS - T0)) s; venv: $VENV"
