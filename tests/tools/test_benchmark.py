"""The benchmark tool: its released-layout baseline computes the same function, and it
prints a table for a tiny input."""
import sys
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import benchmark  # noqa: E402
from _released_layout import ReleasedLayoutResTv2  # noqa: E402

from rest_dense.models import ResTv2  # noqa: E402

TINY = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 2, 1),
            sr_ratios=(8, 4, 2, 1))


def test_released_layout_baseline_matches_core():
    torch.manual_seed(0)
    model = ResTv2(arch=TINY).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        for ours, released in zip(model(x), ReleasedLayoutResTv2(model)(x)):
            torch.testing.assert_close(ours, released, atol=1e-5, rtol=1e-5)


def test_benchmark_table(tmp_path):
    out = tmp_path / "table.md"
    text = benchmark.main(["restv2_tiny", "--shapes", "1x3x64x96", "--attn-impls", "sdpa", "math",
                           "released", "--modes", "global", "--iters", "1", "--warmup", "0",
                           "--no-progress", "--markdown", str(out)])
    rows = [line for line in text.splitlines() if line.startswith("| restv2_tiny")]
    assert [r.split("|")[3].strip() for r in rows] == ["sdpa", "math", "released"]
    assert all(float(r.split("|")[6]) > 0 for r in rows)  # ms/iter
    assert out.read_text().strip() == text.strip()
