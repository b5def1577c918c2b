#!/usr/bin/env bash
# The GPU checks of the mixed-precision work, in one call on a machine with a CUDA GPU and
# PyTorch (the core needs only torch, numpy and tqdm; nothing is installed):
#   1. the CUDA tests (no host synchronisation in a training step, fp32 / fp16 / bf16);
#   2. CPU-vs-GPU parity of the backbone in fp32, and the autocast error in fp16 / bf16;
#   3. the backbone table: released layout vs ours, fp32 / fp16 / bf16, inference and
#      training, images per second and torch.cuda.max_memory_allocated.
# Whole Mask R-CNN / UperNet rows need MMDetection / MMSegmentation with mmcv built for
# CUDA there; add them with `rest-dense bench --configs ... --device cuda` where installed.
#
#   OUT=out bash tools/gpu_checks.sh            # results in $OUT (default: gpu_checks/)
#   DEVICE=cpu SHAPES=64x64:1 ITERS=1 DTYPES=fp32 MODES=infer bash tools/gpu_checks.sh
#                                               # a dry run of the script on the CPU
set -uo pipefail
OUT=$(realpath -m "${OUT:-gpu_checks}")  # relative to where the script was started
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE=${DEVICE-cuda}
PY=${PYTHON:-python3}
SHAPES=${SHAPES-"512x512:2 800x1216:1"}   # HxW:batch pairs
ITERS=${ITERS-10}
DTYPES=${DTYPES-"fp32 fp16 bf16"}
MODES=${MODES-"infer train"}
BENCH_EXTRA=${BENCH_EXTRA:-}                # more `rest-dense bench` options
mkdir -p "$OUT" && [ -w "$OUT" ] || { echo "gpu_checks: cannot write to OUT=$OUT" >&2; exit 2; }
for name in SHAPES DTYPES MODES DEVICE ITERS; do
    [ -n "${!name// /}" ] || { echo "gpu_checks: $name is empty" >&2; exit 2; }
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{ nvidia-smi 2>&1 || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; } > "$OUT/env.txt" 2>&1

echo "== CUDA tests" | tee "$OUT/tests.txt"
$PY -m pytest -q -p no:cacheprovider -o addopts="" tests/models/test_fast_paths.py \
    -k "cuda or host_sync or async" 2>&1 | tee -a "$OUT/tests.txt" || status=1

echo "== parity" | tee "$OUT/parity.txt"
$PY - "$DEVICE" <<'PY' 2>&1 | tee -a "$OUT/parity.txt" || status=1
import sys
import torch
from rest_dense.models import create_model

device = sys.argv[1]
torch.manual_seed(0)
model = create_model("restv2_tiny").eval()
x = torch.randn(2, 3, 97, 131)
with torch.no_grad():
    ref = model(x)
    gpu = model.to(device)
    got = gpu(x.to(device))
    worst = max(float((a - b.cpu()).abs().max() / a.abs().max()) for a, b in zip(ref, got))
    print(f"fp32 {device} vs cpu: max relative error {worst:.2e}")
    ok = worst < 1e-3
    for dtype, limit in ((torch.float16, 2e-2), (torch.bfloat16, 6e-2)):
        if device == "cpu" and dtype == torch.float16:
            continue
        with torch.autocast(device, dtype=dtype):
            half = gpu(x.to(device))
        err = max(float((a - b.float().cpu()).abs().max() / a.abs().max())
                  for a, b in zip(ref, half))
        finite = all(bool(torch.isfinite(b).all()) for b in half)
        print(f"{dtype} autocast vs fp32: max relative error {err:.2e}, finite {finite}")
        ok = ok and finite and err < limit
sys.exit(0 if ok else 1)
PY

for pair in $SHAPES; do
    shape=${pair%%:*}; batch=${pair##*:}
    $PY -m rest_dense.cli bench restv2_tiny --device "$DEVICE" --shape "$shape" --batch "$batch" \
        --attn-impls released auto --mode $MODES --dtypes $DTYPES \
        --iters "$ITERS" --warmup 2 --no-progress --markdown "$OUT/bench_${shape}.md" $BENCH_EXTRA \
        2>&1 | tee "$OUT/bench_${shape}.txt" || status=1
done
echo "gpu_checks: exit $status; results in $OUT"
exit $status
