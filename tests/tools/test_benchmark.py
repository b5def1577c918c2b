"""Benchmarking: rest_dense.benchmark, ``rest-dense bench`` and the released-layout
reference (rest_dense.reference) it times as the baseline."""
import math
import os

import pytest
import torch

from rest_dense import benchmark as bm
from rest_dense.commands.bench import format_markdown, markdown_document
from rest_dense.cli import main
from rest_dense.models import ResTv2
from rest_dense.reference import ReleasedLayoutResTv2

from conftest import make_tiny_arch, without_logging_errors

TINY = make_tiny_arch(depths=(1, 1, 2, 1))


# --------------------------------------------------------------------------- reference
def test_released_layout_matches_core_forward(one_thread):
    torch.manual_seed(0)
    model = ResTv2(arch=TINY).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours, released = model(x), ReleasedLayoutResTv2(model)(x)
    assert len(ours) == len(released) == 4
    for a, b in zip(ours, released):
        assert a.shape == b.shape and torch.isfinite(b).all()
        assert (a - b).abs().max().item() < 1e-4


def test_released_layout_matches_core_gradients(one_thread):
    torch.manual_seed(0)
    model = ResTv2(arch=TINY, out_indices=(1, 3)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(2, 3, 64, 96)
    grads = []
    for net in (model, ReleasedLayoutResTv2(model)):
        loss = sum(o.mean() for o in net(x))
        grads.append(torch.autograd.grad(loss, params))
    assert len(grads[0]) == len(params) > 0
    for g_ours, g_released in zip(*grads):
        assert torch.isfinite(g_released).all()
        assert (g_ours - g_released).abs().max().item() < 1e-4
    assert any(g.abs().sum() > 0 for g in grads[1])


def test_released_layout_rejects_what_the_released_code_cannot_run():
    with pytest.raises(ValueError, match="global"):
        ReleasedLayoutResTv2(ResTv2(arch=TINY, attn_mode="win", window_size=(8, 4, 2, 1)))
    with pytest.raises(ValueError, match="dropout"):
        ReleasedLayoutResTv2(ResTv2(arch=TINY, drop_path_rate=0.1))
    with pytest.raises(ValueError, match="divisible by 32"):
        ReleasedLayoutResTv2(ResTv2(arch=TINY))(torch.randn(1, 3, 64, 80))


# --------------------------------------------------------------------------- planning
def test_plan_leaves_out_combinations_that_do_not_apply():
    cases, skipped = bm.plan_cases(["restv2_tiny", "restv1_lite", "swin_tiny"],
                                   sizes=[(512, 512), (800, 1216)], batches=[2, 1],
                                   attn_modes=["global", "win"], attn_impls=["sdpa", "released"],
                                   modes=["infer", "train"])
    by_model = {m: [c for c in cases if c.model == m] for m in ("restv2_tiny", "restv1_lite", "swin_tiny")}
    # restv2: 2 sizes x 2 modes x (global sdpa, global released, win sdpa)
    assert len(by_model["restv2_tiny"]) == 12
    assert all(c.attn_mode == "global" for c in by_model["restv2_tiny"] if c.attn_impl == "released")
    # restv1: global only, no released layout; swin: one row per size and mode
    assert {(c.attn_mode, c.attn_impl) for c in by_model["restv1_lite"]} == {("global", "sdpa")}
    assert len(by_model["swin_tiny"]) == 4 and {c.attn_impl for c in by_model["swin_tiny"]} == {"-"}
    assert [c.batch for c in by_model["swin_tiny"]] == [2, 2, 1, 1]
    assert skipped and all(s.startswith("skipped ") for s in skipped)


def test_plan_memory_levels_only_for_training_rows_that_have_them():
    cases, skipped = bm.plan_cases(["restv2_tiny", "swin_tiny"], sizes=[(512, 512)],
                                   attn_impls=["sdpa", "released"], modes=["infer", "train"],
                                   cp_levels=["none", "mlp", "block"])
    rows = {(c.model, c.mode, c.attn_impl, c.with_cp) for c in cases}
    assert rows == {("restv2_tiny", "infer", "sdpa", "none"),
                    ("restv2_tiny", "infer", "released", "none"),
                    ("restv2_tiny", "train", "sdpa", "none"), ("restv2_tiny", "train", "sdpa", "mlp"),
                    ("restv2_tiny", "train", "sdpa", "block"),
                    ("restv2_tiny", "train", "released", "none"),
                    ("swin_tiny", "infer", "-", "none"), ("swin_tiny", "train", "-", "none"),
                    ("swin_tiny", "train", "-", "block")}
    assert any("Swin-T has with_cp=block only" in s for s in skipped)
    assert any("released" in s and "with_cp=mlp" in s for s in skipped)
    with pytest.raises(ValueError, match="with_cp level"):
        bm.plan_cases(cp_levels=["all"])


def test_memory_levels_run_and_the_table_names_them(one_thread):
    rows = bm.run_benchmark(["restv2_tiny"], sizes=[(64, 96)], modes=["train"], arch=TINY,
                            cp_levels=["none", "mlp", "block"], warmup=0, iters=1,
                            memory=False, progress=False, log=lambda text: None)
    assert [r.case.with_cp for r in rows] == ["none", "mlp", "block"]
    _check_rows(rows, memory=False)
    lines = format_markdown(rows).splitlines()
    assert "| with_cp |" in lines[0] and "| train | fp32 | mlp |" in lines[3]


def test_autocast_difference_is_small_but_not_zero(one_thread):
    d = bm.autocast_difference("restv2_tiny", (64, 96), "bf16", arch=TINY)
    assert all(math.isfinite(v) for v in d.values())
    # bf16 keeps 8 bits of mantissa: the outputs move, by about a percent
    assert 0 < d["max_rel_l2"] < 0.05 and 0 < d["max_abs"] < d["max_abs_ref"]
    with pytest.raises(ValueError, match="dtype"):
        bm.autocast_difference("restv2_tiny", (64, 96), "fp32", arch=TINY)
    rows = bm.run_benchmark(["restv2_tiny"], sizes=[(64, 96)], dtypes=["fp32", "bf16"],
                            arch=TINY, warmup=0, iters=1, memory=False, progress=False,
                            log=lambda text: None)
    notes = bm.autocast_notes(rows)
    assert len(notes) == 1 and "bf16 autocast vs fp32" in notes[0]
    assert notes[0] in markdown_document(rows, notes=notes)


def test_autocast_difference_of_swin(one_thread):
    """Swin-T (mmdet) as well: its train() returns None, which once broke the notes after a
    whole benchmark run."""
    d = bm.autocast_difference("swin_tiny", (64, 64), "bf16")
    assert all(math.isfinite(v) for v in d.values())
    assert 0 < d["max_rel_l2"] < 0.05 and 0 < d["max_abs"] < d["max_abs_ref"]


def test_plan_rejects_bad_options():
    with pytest.raises(ValueError, match="one batch for all sizes or one per size"):
        bm.plan_cases(sizes=[(64, 64), (96, 96), (128, 128)], batches=[1, 2])
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        bm.plan_cases(["resnet50"])
    with pytest.raises(ValueError, match="dtype"):
        bm.plan_cases(dtypes=["fp64"])


# --------------------------------------------------------------------------- measuring
def _check_rows(rows, memory):
    assert rows
    for r in rows:
        assert math.isfinite(r.ms) and r.ms > 0
        assert math.isfinite(r.imgs_per_s) and r.imgs_per_s > 0
        assert r.iters == len(r.times_ms) >= 1
        if memory:
            assert r.peak_mb is not None and math.isfinite(r.peak_mb) and r.peak_mb > 0
        else:
            assert r.peak_mb is None


def test_benchmark_tiny_arch_every_impl_both_modes(one_thread):
    rows = bm.run_benchmark(["restv2_tiny"], sizes=[(64, 96)], batches=[2],
                            attn_impls=["sdpa", "math", "released"], modes=["infer", "train"],
                            dtypes=["fp32", "bf16"], arch=TINY, warmup=0, iters=1,
                            memory=False, progress=False, log=lambda text: None)
    assert [(r.case.dtype, r.case.mode, r.case.attn_impl) for r in rows] == [
        (d, m, i) for d in ("fp32", "bf16") for m in ("infer", "train")
        for i in ("sdpa", "math", "released")]
    _check_rows(rows, memory=False)
    table = format_markdown(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[2].startswith("| restv2_tiny (custom arch) | global | sdpa | 64x96 | 2 | infer | fp32 |")
    assert lines[2].endswith("| 1.00x |")


@pytest.mark.slow
def test_benchmark_peak_memory_in_fresh_processes(one_thread):
    """CPU peak memory comes from a child interpreter per row, in both modes."""
    rows = [bm.benchmark_backbone("restv2_tiny", (128, 160), batch=2, mode=mode, arch=TINY,
                                  warmup=0, iters=2, threads=1)
            for mode in ("infer", "train")]
    _check_rows(rows, memory=True)
    infer, train = rows
    assert train.peak_mb > infer.peak_mb  # training keeps activations and gradients


def test_swin_tiny_from_mmdet_config(one_thread):
    model = bm.build_bench_model(bm.BenchCase("swin_tiny", (64, 64), attn_impl="-"))
    assert model.stages[0].blocks[0].attn.w_msa.window_size == (7, 7)
    model.eval()  # mmdet's SwinTransformer.train() returns None: no chaining
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [96, 192, 384, 768]


def test_swin_with_cp_block_recomputes_quietly(one_thread):
    """MMDetection's Swin calls checkpoint without use_reentrant: the bench row keeps that
    (reentrant) recomputation and gets gradients, without a warning per block."""
    import warnings

    case = bm.BenchCase("swin_tiny", (32, 32), attn_impl="-", mode="train", with_cp="block")
    model = bm.build_bench_model(case)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sum(o.float().sum() for o in model(torch.randn(1, 3, 32, 32))).backward()
    assert not [w for w in caught if "use_reentrant" in str(w.message)]
    grads = [p.grad for p in model.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # the warning is silenced only inside the bench's forward, not for the process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.utils.checkpoint.checkpoint(lambda t: t * 2, torch.ones(2, requires_grad=True))
    assert any("use_reentrant" in str(w.message) for w in caught)


def test_cli_bench_writes_markdown_and_plot(tmp_path, capsys, one_thread):
    md, png = tmp_path / "bench.md", tmp_path / "plot" / "bench.png"
    code = main(["bench", "restv2_tiny", "--shape", "64x64", "96x64", "--batch", "1",
                 "--attn-modes", "global", "hwin", "--iters", "1", "--warmup", "0",
                 "--no-memory", "--no-progress", "--threads", "1",
                 "--markdown", str(md), "--plot", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    rows = [line for line in md.read_text().splitlines() if line.startswith("| restv2_tiny")]
    assert [r.split("|")[2].strip() for r in rows] == ["global", "hwin", "global", "hwin"]
    assert all(float(r.split("|")[8]) > 0 for r in rows)  # ms/iter
    assert "rest-dense bench restv2_tiny --shape 64x64 96x64" in md.read_text()
    assert rows[0] in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_bad_input_is_named(capsys):
    assert main(["bench", "restv2_tiny", "--shape", "64x64", "96x96", "128x128",
                 "--batch", "1", "2"]) == 2
    assert "one batch for all sizes or one per size" in capsys.readouterr().err
    assert main(["bench", "restv2_tiny", "--shape", "64xx64"]) == 2
    assert "64xx64" in capsys.readouterr().err
    for device, named in (("meta", "time 'cpu' and 'cuda"), ("mps", "time 'cpu' and 'cuda"),
                          ("cdua", "cdua"), ("neck:fpn", "neck:fpn")):
        assert main(["bench", "restv2_tiny", "--shape", "32x32", "--device", device]) == 2
        err = without_logging_errors(capsys.readouterr().err)
        assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        assert main(["bench", "neck:fpn", "--shape", "32x32", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_cli_bench_refuses_unwritable_outputs_and_neck_options_before_timing(
        tmp_path, capsys, monkeypatch):
    """An output path it cannot write, or neck rows with several batches / dtypes, are
    refused up front with one line, before any row is timed."""
    timed = []
    monkeypatch.setattr(bm, "run_benchmark", lambda *a, **k: timed.append(1) or [])
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [(["--markdown", str(tmp_path)], "--markdown", "is a folder", "bench.md"),
             (["--plot", str(tmp_path)], "--plot", "is a folder", "bench.png"),
             (["--markdown", str(a_file / "t.md")], "--markdown", "which is a file", ""),
             (["--dtypes", "fp32", "bf16"], "one --batch and one --dtypes", "", "")]
    for extra, message, problem, hint in cases:
        models = ["restv2_tiny", "neck:fpn"] if "--dtypes" in extra else ["restv2_tiny"]
        assert main(["bench", *models, "--shape", "32x32", "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and problem in err and hint in err and "Traceback" not in err
    assert not timed
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["bench", "restv2_tiny", "--markdown", str(locked / "t.md")]) == 2
        assert "--markdown" in (err := capsys.readouterr().err) and "cannot write" in err \
            and not timed


def test_cli_bench_auto_rows_say_which_attention_ran(tmp_path, one_thread):
    md = tmp_path / "bench.md"
    assert main(["bench", "restv2_tiny", "--shape", "64x64", "--attn-impls", "auto", "explicit",
                 "--dtypes", "fp32", "bf16", "--iters", "1", "--warmup", "0", "--no-memory",
                 "--no-progress", "--threads", "1", "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "64x64 infer fp32: auto ran sdpa x11" in text
    from rest_dense import hardware
    from rest_dense.models.functional import BF16_ATTENTION_RULE
    small = BF16_ATTENTION_RULE[(hardware.cpu_class(), "infer")][0]  # the rule of this CPU
    assert f"64x64 infer bf16: auto ran {dict(math='explicit').get(small, small)} x11" in text
    from rest_dense.models.functional import _onednn_linear_available
    fp32_note = next(line for line in text.splitlines() if "64x64 infer fp32: auto ran" in line)
    if _onednn_linear_available(torch.float32):  # the projections' kernel is stated too
        assert "projections: fused oneDNN x" in fp32_note
    assert "strided conv backward" not in fp32_note  # inference: no backward
    assert "avx2" in text or "no AVX2" in text  # the CPU's flags are stated


def test_attention_choices_count_the_strided_conv_backward(one_thread):
    """A training row's note says which backward each strided 3x3 conv ran (the stem's
    second conv and three patch embeddings: four calls, as the rule decides)."""
    from rest_dense.models import functional as fast

    case = bm.BenchCase("restv2_tiny", (64, 64), 1, mode="train", dtype="bf16")
    counts = bm.attention_choices(case)
    assert counts.get("conv_gemm", 0) + counts.get("conv_library", 0) == 4
    with fast.forced_conv_backward("gemm"):
        assert bm.attention_choices(case).get("conv_gemm") == 4
    note = bm.attention_notes([bm.BenchRow(case, 1.0, 1.0, None, 1, [1.0])])[0]
    assert "strided conv backward: " in note


def test_attention_choices_count_each_projection_once(one_thread):
    """Autocast's aten::linear calls an inner one: a projection is one call in every dtype.
    fp16 runs the plain modules (each nn.Linear once); fp32 and bf16 the same fast paths."""
    from torch import nn

    totals = {}
    for dtype in ("fp32", "bf16", "fp16"):
        counts = bm.attention_choices(bm.BenchCase("restv2_tiny", (64, 64), 1, dtype=dtype))
        totals[dtype] = counts.get("fused_linear", 0) + counts.get("linear", 0)
    linears = sum(isinstance(m, nn.Linear) for m in bm.build_bench_model(
        bm.BenchCase("restv2_tiny", (64, 64), 1)).modules())
    assert totals["fp16"] == linears and totals["fp32"] == totals["bf16"] > 0, (totals, linears)


def test_cli_bench_necks_alone(tmp_path, capsys, one_thread):
    md = tmp_path / "necks.md"
    assert main(["bench", "neck:fpn", "neck:vt_fpn", "--shape", "64x96", "--mode", "infer",
                 "train", "--iters", "1", "--warmup", "0", "--no-memory", "--no-progress",
                 "--threads", "1", "--markdown", str(md)]) == 0
    rows = [line for line in md.read_text().splitlines() if line.startswith("| 64x96")]
    assert [r.split("|")[2].strip() for r in rows] == ["infer", "train"]
    for r in rows:
        cells = r.split("|")
        assert float(cells[4]) > 0 and float(cells[7]) > 0  # fpn ms, vt_fpn ms
    assert md.read_text().endswith("\n")
    assert main(["bench", "neck:vt_fpn", "--shape", "64x64", "--batch", "1", "2"]) == 2
    assert "one --batch" in capsys.readouterr().err
    png = tmp_path / "necks.png"
    assert main(["bench", "neck:fpn", "--shape", "64x64", "--batch", "1", "--no-memory",
                 "--plot", str(png)]) == 2
    assert "--plot" in capsys.readouterr().err and not png.exists()


def test_cli_bench_whole_segmenters_and_necks_in_one_run(tmp_path, one_thread):
    """Whole models (semantic FPN vs VT-FPN, inference and training) and the necks alone,
    one command, one document."""
    md = tmp_path / "one_run.md"
    assert main(["bench", "neck:fpn", "neck:vt_fpn", "--configs", "toy/sem_fpn_restv2_toy.py",
                 "toy/vt_fpn_restv2_toy.py", "--shape", "64x96", "--batch", "2", "--mode", "infer",
                 "train",
                 "--iters", "1", "--warmup", "0", "--no-memory", "--no-progress", "--threads",
                 "1", "--markdown", str(md)]) == 0
    text = md.read_text()
    whole = [line for line in text.splitlines() if line.startswith("| sem_fpn") or
             line.startswith("| vt_fpn")]
    assert {(r.split("|")[1].strip(), r.split("|")[6].strip()) for r in whole} == {
        (m, mode) for m in ("sem_fpn_restv2_toy", "vt_fpn_restv2_toy") for mode in ("infer", "train")}
    assert all(float(r.split("|")[8]) > 0 for r in whole)
    assert {r.split("|")[2].strip() for r in whole} == {"configured"}  # the config's own mode
    assert "## Necks alone" in text
    necks = [line for line in text.split("## Necks alone")[1].splitlines() if line.startswith("| 64x96")]
    assert len(necks) == 2
    # a whole segmenter's BatchNorms cannot train on one image: said before anything runs
    assert main(["bench", "--configs", "toy/sem_fpn_restv2_toy.py", "--shape", "64x96",
                 "--mode", "train", "--no-memory", "--no-progress"]) == 2


def test_kernel_benchmark_measures_every_candidate(one_thread):
    rows = bm.kernel_benchmark("restv2_tiny", (64, 96), batch=1, iters=1)
    ops = {(r.op, r.stage, r.dtype, r.mode) for r in rows}
    assert ("attention", 1, "bf16", "train") in ops and ("attention", 4, "fp32", "infer") in ops
    assert ("dw_conv_backward", 3, "bf16", "train") in ops
    assert not any(r.op == "dw_conv_backward" and r.stage == 4 for r in rows)  # sr 1: no conv
    # the strided 3x3 conv making every stage (stem, then the patch embeddings)
    assert {(r.stage, r.dtype) for r in rows if r.op == "conv3x3_s2_backward"} == {
        (i, d) for i in (1, 2, 3, 4) for d in ("fp32", "bf16")}
    for r in rows:
        assert r.times and all(math.isfinite(t) and t > 0 for t in r.times.values())
        assert r.winner in r.times
        expected = {"attention": {"sdpa", "explicit", "chunked"}, "mlp_fc1": {"F.linear", "fused"},
                    "dw_conv_backward": {"native"} if r.dtype == "fp32" else {"native", "fp32"},
                    "conv3x3_s2_backward": {"gemm", "library"}}
        assert set(r.times) == expected[r.op]
    from rest_dense.models.functional import _onednn_linear_available
    if _onednn_linear_available(torch.float32):  # every stage's MLP projection is timed
        assert {(r.stage, r.mode) for r in rows if r.op == "mlp_fc1" and r.dtype == "fp32"} == {
            (i, "infer") for i in (1, 2, 3, 4)}


def test_cli_bench_interleaved_rows(tmp_path, one_thread):
    md = tmp_path / "inter.md"
    assert main(["bench", "restv2_tiny", "--shape", "64x64", "--attn-impls", "released", "auto",
                 "--mode", "infer", "train", "--iters", "2", "--warmup", "0", "--interleave",
                 "--no-memory", "--no-progress", "--threads", "1", "--markdown", str(md)]) == 0
    rows = [line.split("|") for line in md.read_text().splitlines()
            if line.startswith("| restv2_tiny")]
    assert [(r[3].strip(), r[6].strip()) for r in rows] == [
        ("released", "infer"), ("auto", "infer"), ("released", "train"), ("auto", "train")]
    assert all(float(r[8]) > 0 for r in rows)
    assert "--interleave" in md.read_text()
    # per-round speed-ups of the auto rows against the released rows, one note each
    notes = [line for line in md.read_text().splitlines() if "per-round speed-up" in line]
    assert len(notes) == 2 and all("against restv2_tiny global released 1x64x64" in n
                                   and "over 2 rounds" in n for n in notes)


def test_notes_name_rows_fully():
    """Rows that differ only in their memory level or attention are told apart in notes."""
    base = dict(model="restv2_tiny", size=(17, 9), batch=3, attn_mode="cwin", mode="train",
                dtype="bf16")
    names = {bm.BenchCase(**base, attn_impl=impl, with_cp=cp).note_name
             for impl in ("auto", "chunked") for cp in ("none", "block")}
    assert len(names) == 4
    assert bm.BenchCase(**base, attn_impl="auto", with_cp="block").note_name == \
        "restv2_tiny cwin auto with_cp=block 3x17x9 train bf16"
    assert bm.BenchCase("swin_tiny", (32, 32), attn_impl="-", attn_mode="-").note_name == \
        "swin_tiny 1x32x32 infer fp32"


def test_round_ratios_pair_passes_of_one_round():
    from rest_dense import benchmark as bm

    def row(impl, mode, times):
        case = bm.BenchCase("restv2_tiny", (64, 64), 1, attn_impl=impl, mode=mode)
        return bm.BenchRow(case, min(times), 1.0, None, len(times), list(times))

    rows = [row("released", "infer", [10, 40, 12]), row("auto", "infer", [5, 20, 12]),
            row("released", "train", [30]), row("auto", "train", [15, 99])]
    out = bm.round_ratios(rows)
    assert [(r.case.mode, b.case.attn_impl, ratios) for r, b, ratios in out] == [
        ("infer", "released", [2.0, 2.0, 1.0]), ("train", "released", [2.0])]
