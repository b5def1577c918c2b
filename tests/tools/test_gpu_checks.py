"""tools/gpu_checks.sh, the prepared GPU run, in its CPU dry-run form: it must keep working
for the session that gets a GPU (one call, results under $OUT)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_checks_script_dry_run(tmp_path, subprocess_env):
    out = tmp_path / "out"
    env = dict(subprocess_env, OUT="out", DEVICE="cpu", SHAPES="32x32:1", ITERS="1",  # cwd-relative
               DTYPES="fp32 bf16", MODES="infer", BENCH_EXTRA="--no-memory",
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_checks.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["bench_32x32.md", "bench_32x32.txt", "env.txt",
                                       "parity.txt", "tests.txt"]
    parity = (out / "parity.txt").read_text()
    assert "fp32 cpu vs cpu: max relative error" in parity and "finite True" in parity
    table = (out / "bench_32x32.md").read_text()
    for dtype in ("fp32", "bf16"):
        assert f"| infer | {dtype} |" in table, dtype
    assert "passed" in (out / "tests.txt").read_text()
