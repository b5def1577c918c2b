"""rest_dense.neck_bench: the neck-alone timing rows (FPN vs VT-FPN, infer / train, peak
memory, FLOPs) that `rest-dense bench` builds on; tiny sizes."""
import pytest

from rest_dense.commands.bench import format_neck_table
from rest_dense.neck_bench import (NeckCase, benchmark_neck, neck_inputs,
                                   run_neck_benchmark)


def test_rows_and_table(one_thread):
    rows = run_neck_benchmark(("fpn", "neck:vt_fpn"), "16,32,64,128", sizes=[(97, 131)],
                              modes=("infer", "train"), warmup=0, iters=1, memory=False)
    assert [(r.case.neck, r.case.mode) for r in rows] == [
        ("fpn", "infer"), ("vt_fpn", "infer"), ("fpn", "train"), ("vt_fpn", "train")]
    assert all(r.ms > 0 and r.runs == 1 and r.peak_mb is None for r in rows)
    # FLOPs counted once per neck and size, the same in both modes
    assert rows[0].gflops == rows[2].gflops > rows[1].gflops == rows[3].gflops > 0
    table = format_neck_table(rows)
    assert "| 97x131 | infer |" in table and "| 97x131 | train |" in table
    assert "vt_fpn / fpn time" in table.splitlines()[0]


def test_train_inputs_get_gradients_and_memory_child(one_thread):
    case = NeckCase("vt_fpn", (16, 32, 64, 128), (64, 96), mode="train", channels_label="tiny")
    feats = neck_inputs(case)
    assert all(f.requires_grad for f in feats) and [f.shape[-2:] for f in feats] == [
        (16, 24), (8, 12), (4, 6), (2, 3)]
    assert not any(f.requires_grad for f in neck_inputs(NeckCase("fpn", (16,), (8, 8))))
    row = benchmark_neck(case, warmup=0, iters=1, memory=True, threads=1, flops=False)
    assert row.gflops is None and (row.peak_mb is None or row.peak_mb >= 0)
    assert NeckCase.from_json(case.to_json()) == case


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown neck"):
        run_neck_benchmark(("upernet",), "16,32")
    with pytest.raises(ValueError, match="mode"):
        run_neck_benchmark(("fpn",), "16,32", modes=("eval",))
    with pytest.raises(ValueError, match="dtype"):
        benchmark_neck(NeckCase("fpn", (16,), (8, 8), dtype="int8"))
