"""Whole-model ONNX export (MMDeploy for MMDetection / MMSegmentation, TracingAdapter for
detectron2) of briefly trained toy models, checked with real ONNX Runtime sessions against
PyTorch, at image sizes that are not multiples of 32, through ``rest-dense export-model``;
in every attention mode."""
import math
import os

import onnx
import pytest
import torch

from rest_dense import safe_load
from rest_dense.cli import main
from rest_dense.deploy.model_onnx import load_deployment
from rest_dense.deploy.shapes import stage_branches

from conftest import without_logging_errors  # noqa: I100
from _toy import (D2_DET, D2_OPTIONS, D2_RETINA, DET_OPTIONS, MM_DET, MM_RETINA_TOY,  # noqa: F401
                  MM_SEG, mm_config,
                  random_retina_checkpoint, retina_options, trained, untrained_checkpoint,
                  window_options, d2_ckpt, det_ckpt, seg_ckpt, toy_root, val_images)

SIZES = ["120x152", "136x200"]
MODES = ["global", "win", "cwin", "hwin"]


def _export(capsys, config, ckpt, out, *extra, sizes=SIZES):
    code = main(["export-model", str(config), str(ckpt), "--out", str(out),
                 "--check-shapes", *sizes, *extra])
    text = capsys.readouterr()
    print("\n".join(_checked_lines(text.out)))  # shown with -s / on failure
    return code, text.out, text.err


def _checked_lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("onnxruntime vs pytorch:")]


def _assert_all_ok(code, out, err, n_images):
    lines = _checked_lines(out)
    assert code == 0, out + err
    assert len(lines) == n_images and all(ln.endswith("ok") for ln in lines), out
    assert f"ok: ONNX Runtime agrees with PyTorch on {n_images} images" in out


def _metric(line, name):
    return float(line.split(f"{name} ")[1].split(",")[0].split()[0])


def _mm_options(options):
    return ["--cfg-options", *[f"{k}={v!r}" for k, v in options.items()]] if options else []


def _assert_windows(config, mode, network_inputs):
    """In the window modes the check images really run windows (with padding) in the
    stages that have window blocks, so the comparison covers the window code."""
    if mode == "global":
        return
    from rest_dense.models import ResTv2

    options = window_options(mode)
    arch = dict(mm_config(config).model.backbone.arch)
    net = ResTv2(arch, attn_mode=mode, window_size=options["model.backbone.window_size"])
    stages = [b for size in network_inputs for i, b in enumerate(stage_branches(net, size))
              if net.num_window_blocks[i]]
    assert stages and all(b.window is not None for b in stages), (config, mode, stages)
    assert any(b.pad for b in stages), (config, mode, stages)


def _assert_cwin_trained(state):
    """The cross-window convs of a cwin checkpoint moved away from their zero init (else
    cwin would compute exactly win)."""
    convs = [v for k, v in state.items() if "cwin_convs." in k and k.endswith("weight")]
    assert len(convs) == 4 and all(c.abs().max() > 1e-3 for c in convs), state.keys()


def _mode_checkpoint(mode, default, cwin_name, factory, key="state_dict"):
    """The checkpoint to export in ``mode``: cwin models have their own (trained) convs;
    global, win and hwin share the global-trained weights ``default``."""
    if mode != "cwin":
        return default
    ckpt = trained(cwin_name, factory)
    _assert_cwin_trained(safe_load.load_checkpoint_file(ckpt, trusted=False)[key])
    return ckpt


def _network_inputs(text):
    out = []
    for line in _checked_lines(text):
        h, w = line.split("network input ")[1].split(")")[0].split("x")
        out.append((int(h), int(w)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_mask_rcnn_mmdeploy_boxes_and_masks(tmp_path, capsys, mode, det_ckpt, toy_root,
                                            tmp_path_factory, one_thread):
    det_ckpt = _mode_checkpoint(mode, det_ckpt, "mrcnn_cwin", tmp_path_factory)
    options = dict(DET_OPTIONS, **(window_options(mode) if mode != "global" else {}))
    out = tmp_path / "mrcnn.onnx"
    image = val_images(toy_root)[0]
    code, text, err = _export(capsys, MM_DET, det_ckpt, out, "--check-images", str(image),
                              *_mm_options(options))
    _assert_all_ok(code, text, err, 3)
    assert "mmdeploy 1.3.1" in text and "outputs ['dets', 'labels', 'masks']" in text
    graph = onnx.load(str(out))
    ops = {n.op_type for n in graph.graph.node}
    assert {"NonMaxSuppression", "RoiAlign"} <= ops  # NMS and RoIAlign run inside the graph
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["height", "width"]
    # the comparisons were about something: detections with masks, matched; the briefly
    # trained mask head has many probabilities near the 0.5 cut, where float rounding may
    # flip a pixel
    for line in _checked_lines(text):
        assert _metric(line, "matched") >= 5 and _metric(line, "min_mask_iou") >= 0.99, line
    _assert_windows(MM_DET, mode, _network_inputs(text))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_upernet_mmdeploy_attention_modes(tmp_path, capsys, mode, seg_ckpt, toy_root,
                                          tmp_path_factory, one_thread):
    ckpt = _mode_checkpoint(mode, seg_ckpt, "upernet_cwin", tmp_path_factory)
    options = window_options(mode) if mode != "global" else {}
    out = tmp_path / "upernet.onnx"
    image = val_images(toy_root, "ade")[0]
    bench = ["--benchmark", "--runs", "2"] if mode == "global" else []
    code, text, err = _export(capsys, MM_SEG, ckpt, out, "--check-images", str(image),
                              *bench, *_mm_options(options))
    _assert_all_ok(code, text, err, 3)
    lines = _checked_lines(text)
    assert all("pixel_agreement 1" in ln for ln in lines), text
    assert max(_metric(ln, "classes") for ln in lines) >= 2  # the maps are not constant
    graph = onnx.load(str(out))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims[2:])  # dynamic height and width
    _assert_windows(MM_SEG, mode, _network_inputs(text))
    # the window modes' smallest served input is said, and written into the graph
    meta = {p.key: p.value for p in graph.metadata_props}
    if mode == "global":
        assert "rest_dense.min_side" not in meta and "serves backbone inputs" not in text
    else:
        side = int(meta["rest_dense.min_side"])
        assert side > 1 and f"serves backbone inputs of at least {side} px" in text
    if bench:
        table = [ln for ln in text.splitlines() if ln.startswith("| upernet.onnx")]
        assert len(table) == 3 and all(float(c) > 0 for ln in table for c in ln.split("|")[4:6])


def _assert_retina_detections(text, n_images, per_image=15, spread=0.01):
    """Every check image gave at least ``per_image`` matched detections (of the 20 kept),
    with scores that are not all alike: a trained classifier, not one still at its prior."""
    lines = _checked_lines(text)
    assert len(lines) == n_images, text
    for line in lines:
        assert _metric(line, "matched") >= per_image, line
        assert _metric(line, "max_score") - _metric(line, "min_score") >= spread, line
        assert _metric(line, "max_score") >= 0.05, line


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_retinanet_trained_mmdeploy(tmp_path, capsys, mode, toy_root, tmp_path_factory,
                                    one_thread):
    # the toy RetinaNet trained on the toy data (cwin: fine-tuned in cwin mode), the model's
    # own test_cfg (score_thr 0.05, 20 detections an image)
    ckpt = _mode_checkpoint(mode, trained("retina", tmp_path_factory), "retina_cwin",
                            tmp_path_factory)
    options = window_options(mode) if mode != "global" else {}
    out = tmp_path / "retina.onnx"
    code, text, err = _export(capsys, MM_RETINA_TOY, ckpt, out, "--check-images",
                              str(val_images(toy_root)[0]), *_mm_options(options))
    _assert_all_ok(code, text, err, 3)
    assert "mmdeploy 1.3.1" in text and "outputs ['dets', 'labels']" in text
    graph = onnx.load(str(out))
    assert "NonMaxSuppression" in {n.op_type for n in graph.graph.node}
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["height", "width"]
    _assert_retina_detections(text, 3)
    _assert_windows(MM_RETINA_TOY, mode, _network_inputs(text))


@pytest.mark.slow
def test_retinanet_shipped_config_mmdeploy(tmp_path, capsys, one_thread):
    # the shipped COCO config as shipped, made small by retina_options(), with perturbed
    # random weights (see random_retina_checkpoint): it builds and exports
    ckpt = random_retina_checkpoint(tmp_path / "retina.pth")
    out = tmp_path / "retina.onnx"
    code, text, err = _export(capsys, "retinanet/retinanet_restv2-t_fpn_amp-ms-1x_coco.py", ckpt,
                              out, *_mm_options(retina_options()))
    _assert_all_ok(code, text, err, 2)
    assert "outputs ['dets', 'labels']" in text
    for line in _checked_lines(text):
        assert _metric(line, "matched") >= 10, line


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_detectron2_retinanet_tracing_adapter(tmp_path, capsys, mode, toy_root,
                                              tmp_path_factory, one_thread):
    # the detectron2 toy RetinaNet trained on the toy data, exported with the constant-top-k
    # decoding (rest_dense.deploy.d2_support) and checked against detectron2's own eager
    # decoding; 97x301 gives a third network input (and candidate count) in every mode
    ckpt = _mode_checkpoint(mode, trained("d2_retina", tmp_path_factory), "d2_retina_cwin",
                            tmp_path_factory, key="model")
    options = window_options(mode, "d2") if mode != "global" else {}
    out = tmp_path / f"d2_retina_{mode}.onnx"
    opts = ["--cfg-options", *[f"{k}={v}" for k, v in options.items()]] if options else []
    code, text, err = _export(capsys, D2_RETINA, ckpt, out, "--check-images",
                              str(val_images(toy_root)[0]), *opts, sizes=SIZES + ["97x301"])
    _assert_all_ok(code, text, err, 4)
    assert "TracingAdapter" in text and "outputs ['boxes', 'scores', 'labels']" in text
    graph = onnx.load(str(out))
    assert {"NonMaxSuppression", "TopK"} <= _op_types(graph.graph)  # NMS: in an If branch
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims[1:])  # dynamic height and width
    inputs = {ln.split("network input ")[1].split(")")[0] for ln in _checked_lines(text)}
    assert len(inputs) >= 3, text
    _assert_retina_detections(text, 4)
    if mode != "global":
        _assert_d2_windows(mode, _network_inputs(text))


def _op_types(graph):
    """The operator types of an ONNX graph and of its subgraphs (If / Loop branches)."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                ops |= _op_types(sub)
    return ops


def _assert_d2_windows(mode, network_inputs):
    """The detectron2 toy RetinaNet runs windows (with padding) at the check sizes."""
    from rest_dense.models import ResTv2

    import yaml

    arch = yaml.safe_load(D2_RETINA.read_text())["MODEL"]["RESTV2"]["ARCH"]
    arch = {k.lower(): tuple(v) for k, v in arch.items()}
    net = ResTv2(arch, attn_mode=mode, window_size=window_options(mode)["model.backbone.window_size"])
    stages = [b for size in network_inputs for i, b in enumerate(stage_branches(net, size))
              if net.num_window_blocks[i]]
    assert stages and all(b.window is not None for b in stages), (mode, stages)
    assert any(b.pad for b in stages), (mode, stages)


@pytest.mark.slow
# global: the test below
@pytest.mark.parametrize("mode", ["win", "cwin", "hwin"])
def test_detectron2_tracing_adapter_window_attention_modes(tmp_path, capsys, mode, d2_ckpt,
                                                         toy_root, tmp_path_factory, one_thread):
    ckpt = _mode_checkpoint(mode, d2_ckpt, "d2_cwin", tmp_path_factory, key="model")
    options = dict(D2_OPTIONS, **window_options(mode, "d2"))
    out = tmp_path / f"d2_{mode}.onnx"
    opts = [f"{k}={v}" for k, v in options.items()]
    code, text, err = _export(capsys, D2_DET, ckpt, out, "--check-images",
                              str(val_images(toy_root)[0]), "--cfg-options", *opts,
                              sizes=SIZES + ["97x301"])
    _assert_all_ok(code, text, err, 4)
    assert "TracingAdapter" in text and "outputs ['boxes', 'scores', 'labels', 'masks']" in text
    inputs = {ln.split("network input ")[1].split(")")[0] for ln in _checked_lines(text)}
    assert len(inputs) >= 3  # dynamic height and width really exercised
    assert sum(_metric(ln, "matched") for ln in _checked_lines(text)) >= 5, text


@pytest.mark.slow
def test_detectron2_global_and_failures(tmp_path, capsys, d2_ckpt, toy_root, one_thread):
    out = tmp_path / "d2.onnx"
    opts = [f"{k}={v}" for k, v in D2_OPTIONS.items()]
    code, text, err = _export(capsys, D2_DET, d2_ckpt, out, "--check-images",
                              str(val_images(toy_root)[0]), "--cfg-options", *opts)
    _assert_all_ok(code, text, err, 3)
    assert sum(_metric(ln, "matched") for ln in _checked_lines(text)) >= 5, text

    # PyTorch changed after the export: ONNX Runtime disagrees
    dep = load_deployment(D2_DET, d2_ckpt, cfg_options=D2_OPTIONS)
    with torch.no_grad():
        dep.model.roi_heads.box_predictor.bbox_pred.bias.add_(3.0)
    results = dep.check(out, [(120, 152)])
    assert not results[0].ok and "boxes differ" in results[0].describe()

    # NaN weights in a head: refused by name before anything is exported (it used to get
    # through to a check with nothing to compare)
    sd = torch.load(d2_ckpt, weights_only=True)
    sd["model"]["roi_heads.box_predictor.bbox_pred.bias"][:] = math.nan
    torch.save(sd, tmp_path / "nan.pth")
    code, text, err = _export(capsys, D2_DET, tmp_path / "nan.pth", tmp_path / "nan.onnx",
                              "--cfg-options", *opts, sizes=["120x152"])
    assert code == 2 and "outside the backbone" in err and "bbox_pred.bias" in err, err
    assert not (tmp_path / "nan.onnx").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_no_check_says_what_it_left_unchecked(tmp_path, capsys, d2_ckpt, one_thread):
    options = {"MODEL.RESTV2.ATTN_MODE": "win", "MODEL.RESTV2.WINDOW_SIZE": [8]}
    opts = ["--cfg-options", *[f"{k}={v}" for k, v in options.items()]]
    out = tmp_path / "win.onnx"
    # traced at 64x64 the windows of stage 2 cover the whole map: larger inputs need them
    code = main(["export-model", str(D2_DET), str(d2_ckpt), "--out", str(out), "--shape",
                 "64x64", "--no-check", *opts])
    err = capsys.readouterr().err
    assert code == 0 and out.exists() and onnx.load(str(out)).graph.node
    assert "--no-check: ONNX Runtime was not compared with PyTorch" in err, err
    assert "differs from PyTorch at some network inputs, e.g." in err, err
    # global attention on inputs padded to 32 takes no shape branch: every size is served
    code = main(["export-model", str(D2_DET), str(d2_ckpt), "--out", str(out), "--no-check",
                 "--check-shapes", "120x152"])
    err = capsys.readouterr().err
    assert code == 0 and "not compared" in err and "differs from PyTorch" not in err, err


@pytest.mark.slow
def test_graph_not_valid_at_a_check_size_fails(tmp_path, capsys, d2_ckpt, one_thread):
    # traced at 64x64, the 8-token windows of stage 2 cover the whole map: the graph has no
    # windows there, the 120x152 image's network input (128x192) needs them
    options = {"MODEL.RESTV2.ATTN_MODE": "win", "MODEL.RESTV2.WINDOW_SIZE": [8]}
    code, text, err = _export(capsys, D2_DET, d2_ckpt, tmp_path / "win.onnx", "--shape", "64x64",
                              "--cfg-options", *[f"{k}={v}" for k, v in options.items()],
                              sizes=["120x152"])
    assert code == 1 and "graph not valid here" in text and "FAILED" in err


@pytest.mark.slow
def test_graph_that_runtime_cannot_run_at_a_check_size_fails_by_name(tmp_path, capsys, seg_ckpt,
                                                                     one_thread):
    """Traced at 32x32 (no crop of the reduced attention), the 97x131 image's input needs
    the crop: ONNX Runtime cannot even run the graph there. The check names why, without
    ONNX Runtime's traceback."""
    code, text, err = _export(capsys, MM_SEG, seg_ckpt, tmp_path / "u.onnx", "--shape", "32x32",
                              sizes=["97x131"])
    assert code == 1 and "graph not valid here" in text and "needs the crop" in text, err
    err = without_logging_errors(err)
    assert "Traceback" not in err and "onnxruntime" not in err.lower()
    assert not (tmp_path / "u.onnx").exists()


def test_export_bad_inputs(tmp_path, capsys):
    # only names and shapes of the tensors matter here: untrained checkpoints
    det_ckpt = untrained_checkpoint(tmp_path / "det.pth", MM_DET)
    seg_ckpt = untrained_checkpoint(tmp_path / "seg.pth", MM_SEG)
    code, _, err = _export(capsys, MM_DET, tmp_path / "missing.pth", tmp_path / "new" / "x.onnx")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "new").exists()  # the folder made for --out is not left empty
    code, _, err = _export(capsys, MM_DET, seg_ckpt, tmp_path / "x.onnx")
    assert code == 2 and "is not a checkpoint of the model" in err
    assert not os.path.exists(tmp_path / "x.onnx")
    with pytest.raises(SystemExit):
        main(["export-model", str(MM_DET), str(det_ckpt), "--out", "y.onnx", "--shape", "12xx"])
    assert "HxW" in capsys.readouterr().err
    # opsets the whole models were not checked at (RoIAlign, MMDeploy's ReduceMean): refused
    # before anything is built, in both frameworks
    for config, ckpt in ((MM_DET, det_ckpt), (D2_DET, det_ckpt)):
        for opset in ("14", "18"):
            code, _, err = _export(capsys, config, ckpt, tmp_path / "o.onnx", "--opset", opset)
            assert code == 2 and f"--opset {opset} is not supported" in err, err
            assert "choose 16 or 17" in err and "Traceback" not in without_logging_errors(err)
    assert not os.path.exists(tmp_path / "o.onnx")
    # outputs that would overwrite an input, or are folders, are refused before exporting
    before = det_ckpt.read_bytes()
    code, _, err = _export(capsys, MM_DET, det_ckpt, det_ckpt)
    assert code == 2 and "same file" in err and det_ckpt.read_bytes() == before
    code, _, err = _export(capsys, MM_DET, det_ckpt, tmp_path)
    assert code == 2 and "is a folder" in err and "model.onnx" in err


@pytest.mark.slow
def test_export_to_a_name_without_onnx_ending(tmp_path, capsys, one_thread):
    """MMDeploy writes <stem>.onnx whatever it is asked: the graph goes to a temporary .onnx
    name and then to --out exactly, and a file that happens to be called <stem>.onnx stays."""
    ckpt = untrained_checkpoint(tmp_path / "seg.pth", MM_SEG)
    (tmp_path / "graph.onnx").write_text("mine")
    code, text, err = _export(capsys, MM_SEG, ckpt, tmp_path / "graph.bin", sizes=["120x152"])
    assert code == 0, err
    assert (tmp_path / "graph.onnx").read_text() == "mine"
    onnx.checker.check_model(str(tmp_path / "graph.bin"))
    assert sorted(os.listdir(tmp_path)) == ["graph.bin", "graph.onnx", "seg.pth"]


@pytest.mark.slow
def test_export_under_a_callers_autocast_is_the_fp32_graph(tmp_path, one_thread):
    """A caller's bf16 autocast is off while the graph is traced: the UperNet graph is the
    fp32 one (ONNX Runtime runs it, parity holds)."""
    ckpt = untrained_checkpoint(tmp_path / "seg.pth", MM_SEG)
    deployment = load_deployment(MM_SEG, ckpt)
    out = tmp_path / "amp" / "upernet.onnx"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        deployment.export(out, check_sizes=[(120, 152)])
    results = deployment.check(out, check_sizes=[(120, 152)])
    assert results and all(r.ok for r in results), [r.describe() for r in results]
    graph = onnx.load(str(out)).graph
    assert not any(i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
                   for i in list(graph.input) + list(graph.output))
