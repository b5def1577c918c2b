#!/usr/bin/env python
"""Parameters and FLOPs (fvcore) of ResT backbones and of whole MMDetection / MMSegmentation /
detectron2 models, with a per-operator breakdown (conv / linear / matmul / layer_norm / other).

Targets are backbone names (``restv2_tiny``, ``restv1_small``, ...), config files
(``.py`` = MMDetection / MMSegmentation, ``.yaml`` = detectron2) or folders of configs;
``TARGET@HxW`` sets the input size of one target. Examples::

    python tools/get_flops.py restv2_tiny --shape 800 1280
    python tools/get_flops.py restv2_tiny --attn-mode win --shape 800 1280
    python tools/get_flops.py configs/mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py
    python tools/get_flops.py --all --markdown docs/flops.md     # every shipped config

Conventions (those of fvcore, detectron2 and the ResT papers):

* one multiply-accumulate counts as one FLOP; element-wise ops, softmax, activations and
  pooling are not counted;
* attention products are counted whether they run as explicit ``matmul`` or through
  ``F.scaled_dot_product_attention`` (fvcore does not know the latter; this tool registers a
  handle: ``B*heads*N*M*(d_qk + d_v)``, the same as the two matmuls of the math path);
* default input sizes: backbones 224x224, detection 800x1280 (H x W, "1280x800" in the
  detectron2 / paper notation), segmentation 512x2048 (mmseg's "2048x512");
* detection models are counted in inference mode on one image: Mask R-CNN's box head on the
  RPN's post-NMS proposals (up to 1000), its mask head on 100 RoIs (mmdet's ``_forward``:
  the first 100 proposals; detectron2: 100 detections, score threshold set to 0 so that
  random weights yield them); segmentation models without the auxiliary head (mmseg's
  ``_forward``, as mmseg's get_flops). Weights are random: only shapes matter, except for
  the number of RPN proposals surviving NMS, which is reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _backbones import build_backbone, canonical_name  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: folders holding the shipped configs (``--all``); detectron2 only when importable
SHIPPED_MM = ("configs/mask_rcnn", "configs/retinanet", "configs/upernet")
SHIPPED_D2 = ("configs/detectron2",)
DEFAULT_SHAPES = {"backbone": (224, 224), "mmdet": (800, 1280), "d2": (800, 1280),
                  "mmseg": (512, 2048)}
GROUPS = ("conv", "linear", "matmul", "layer_norm", "other")

# ------------------------------------------------------------------ fvcore op handles
_SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)


def sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for scaled dot-product attention: ``q @ k^T`` plus ``attn @ v``,
    counted like fvcore counts the two matmuls (one multiply-accumulate = one FLOP).

    ``q``: ``(..., N, d)``, ``k``: ``(..., M, d)``, ``v``: ``(..., M, d_v)``; the leading
    dimensions are those of ``q`` (``k``/``v`` may broadcast over them).
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    n, d = q[-2], q[-1]
    m, dv = k[-2], v[-1]
    return math.prod(q[:-2]) * n * m * (d + dv)


def op_group(op: str) -> str:
    """fvcore operator name -> one of :data:`GROUPS` (the ResTv2 paper's Table 4b columns)."""
    if op in ("conv", "conv_transpose", "_convolution"):
        return "conv"
    if op in ("linear", "addmm"):
        return "linear"
    if op in ("matmul", "bmm", "mm", "einsum") or "scaled_dot_product" in op:
        return "matmul"
    if op == "layer_norm":
        return "layer_norm"
    return "other"


def count_parameters(model: nn.Module) -> int:
    """Parameters, shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class FlopCount:
    """FLOPs of one forward pass."""

    total: int
    by_operator: Dict[str, int]
    by_module: Dict[str, int] = field(default_factory=dict)
    unsupported: Dict[str, int] = field(default_factory=dict)

    @property
    def groups(self) -> Dict[str, int]:
        out = dict.fromkeys(GROUPS, 0)
        for op, n in self.by_operator.items():
            out[op_group(op)] += n
        return out


def count_flops(model: nn.Module, inputs: Tuple, module_depth: int = 1) -> FlopCount:
    """fvcore ``FlopCountAnalysis`` with the attention handles registered.

    Args:
        model: module to trace (put it in eval mode first).
        inputs: positional inputs of ``model``.
        module_depth: keep ``by_module`` entries down to this many dots in the name.
    """
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(model, inputs)
    fca.set_op_handle(**{op: sdpa_flop_jit for op in _SDPA_OPS})
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    fca.tracer_warnings("none")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        total = fca.total()
        by_op = dict(fca.by_operator())
        by_mod = {k: v for k, v in fca.by_module().items()
                  if k and k.count(".") < module_depth}
        unsupported = dict(fca.unsupported_ops())
    return FlopCount(int(total), {k: int(v) for k, v in by_op.items() if v},
                     {k: int(v) for k, v in by_mod.items()}, unsupported)


# ------------------------------------------------------------------ paper figures
# (params M, GFLOPs, where); sources in shared/SPEC.md, shared/ENV.md and the papers
PAPER_BACKBONE = {
    # ImageNet-1k classifiers at 224x224 (with the classification head)
    ("restv2_tiny", 224, 224): (30, 4.1, "ImageNet classifier, Tab. 1"),
    ("restv2_small", 224, 224): (41, 6.0, "ImageNet classifier, Tab. 1"),
    ("restv2_base", 224, 224): (56, 7.9, "ImageNet classifier, Tab. 1"),
    ("restv2_large", 224, 224): (87, 13.8, "ImageNet classifier, Tab. 1"),
    ("restv1_lite", 224, 224): (10.49, 1.4, "ImageNet classifier, ResTv1"),
    ("restv1_small", 224, 224): (13.66, 1.9, "ImageNet classifier, ResTv1"),
    ("restv1_base", 224, 224): (30.28, 4.3, "ImageNet classifier, ResTv1"),
    ("restv1_large", 224, 224): (51.63, 7.9, "ImageNet classifier, ResTv1"),
    # the authors' dense backbone measured with fvcore (shared/ENV.md)
    ("restv2_tiny", 800, 1280): (29.667, 127.6, "authors' code, fvcore (ENV.md)"),
}
# Mask R-CNN (detectron2, paper Tab. 4 main results / Tab. 4a ablation, 1280x800)
PAPER_MASK_RCNN = {
    ("restv2", "tiny", "global"): (49.94, "253 (Tab. 4) / 229.7 (Tab. 4a)"),
    ("restv2", "small", "global"): (60.71, "290"),
    ("restv2", "base", "global"): (75.47, "328"),
    ("restv2", "tiny", "win"): (49.94, "205.2 (Tab. 4a)"),
    ("restv2", "tiny", "cwin"): (49.96, "212.5 (Tab. 4a)"),
    ("restv2", "tiny", "hwin"): (49.94, "218.9 (Tab. 4a)"),
}
# UperNet ADE20K (mmseg, paper Tab. 5, 2048x512)
PAPER_UPERNET = {
    ("restv2", "tiny"): (62.1, "977"),
    ("restv2", "small"): (72.9, "1035"),
    ("restv2", "base"): (87.6, "1095"),
}


# ------------------------------------------------------------------ targets
@dataclass
class Result:
    target: str
    framework: str  # backbone / mmdet / mmseg / d2
    shape: Tuple[int, int]
    params: int
    flops: FlopCount
    paper_params: Optional[float] = None
    paper_flops: Optional[str] = None
    notes: List[str] = field(default_factory=list)


def analyze_backbone(name: str, shape: Tuple[int, int], attn_mode: str = "global",
                     fused_attn: bool = True, batch: int = 1) -> Result:
    model = build_backbone(name, attn_mode, fused_attn=fused_attn).eval()
    x = torch.randn(batch, 3, *shape)
    fc = count_flops(model, (x,))
    key = canonical_name(name)
    label = key if attn_mode == "global" else f"{key} ({attn_mode})"
    res = Result(label, "backbone", tuple(shape), count_parameters(model), fc)
    ref = PAPER_BACKBONE.get((key, *shape)) if attn_mode == "global" else None
    if ref:
        res.paper_params, res.paper_flops = ref[0], f"{ref[1]} ({ref[2]})"
    if not fused_attn:
        res.notes.append("math attention path")
    out_norms = sum(v for k, v in fc.by_module.items() if re.fullmatch(r"norm_\d", k))
    if out_norms:
        # the authors' code builds these channels-first LayerNorms from element-wise ops,
        # which fvcore does not count
        res.notes.append(f"output norms norm_1..4: {_g(out_norms)}")
    return res


class _RoICounter:
    """Counts the RoIs that reach the box / mask heads (forward pre-hooks)."""

    def __init__(self, model: nn.Module, names: Dict[str, str]):
        self.counts: Dict[str, int] = {}
        self._hooks = []
        mods = dict(model.named_modules())
        for attr, label in names.items():
            if attr in mods:
                self._hooks.append(mods[attr].register_forward_pre_hook(self._hook(label)))

    def _hook(self, label):
        def fn(module, args):
            x = args[0]
            if isinstance(x, (list, tuple)):
                x = x[0]
            if isinstance(x, torch.Tensor):
                self.counts[label] = int(x.shape[0])
        return fn

    def remove(self):
        for h in self._hooks:
            h.remove()


# models already counted in this process: (framework, shape, model config) -> (label, count,
# RoIs); configs that differ only in schedule or test-time augmentation build the same model
_COUNTED: Dict[Tuple, Tuple[str, "FlopCount", Dict[str, int]]] = {}


def _label(path: str) -> str:
    return os.path.relpath(path, REPO) if os.path.isabs(path) else path


def _count_once(framework: str, shape, model_cfg: str, label: str, counter):
    """Run ``counter() -> (FlopCount, RoI counts)`` unless a model with the same config text
    ``model_cfg`` was counted already; returns the count and notes for the table."""
    key = (framework, tuple(shape), model_cfg)
    first = None
    if key in _COUNTED:
        first, fc, rois = _COUNTED[key]
    else:
        fc, rois = counter()
        _COUNTED[key] = (label, fc, rois)
    notes = ["RoIs: " + ", ".join(f"{k} {v}" for k, v in rois.items())] if rois else []
    if first:
        notes.append(f"same model as {first}")
    return fc, notes


class _MMWrapper(nn.Module):
    """``model._forward`` (mode='tensor') on an image batch, as mmdet/mmseg get_flops does."""

    def __init__(self, model: nn.Module, framework: str, shape: Tuple[int, int]):
        super().__init__()
        self.model = model
        h, w = shape
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                    batch_input_shape=(h, w), scale_factor=(1.0, 1.0), img_id=0)
        if framework == "mmdet":
            from mmdet.structures import DetDataSample

            self.samples = [DetDataSample(metainfo=meta)]
        else:
            from mmseg.structures import SegDataSample

            self.samples = [SegDataSample(metainfo=meta)]

    def forward(self, x):
        out = self.model._forward(x, self.samples)
        return out


def _mm_identity(model_cfg) -> Tuple[Optional[str], Optional[str], str]:
    bb = model_cfg.get("backbone", {})
    family = {"ResTv2": "restv2", "ResTv1": "restv1"}.get(str(bb.get("type", "")).split(".")[-1])
    arch = bb.get("arch")
    return family, arch if isinstance(arch, str) else None, bb.get("attn_mode", "global")


def analyze_mm_config(path: str, shape: Optional[Tuple[int, int]] = None,
                      cfg_options: Optional[dict] = None) -> Result:
    from rest_dense.mm.utils import build_model, is_tta_model, load_config

    cfg = load_config(path, cfg_options)
    framework = cfg.default_scope
    notes = []
    if is_tta_model(cfg.model):
        cfg.model = cfg.model.module
        notes.append("TTA config: one single-scale pass")
    cfg.model.backbone.pop("init_cfg", None)
    shape = tuple(shape or DEFAULT_SHAPES[framework])
    model = build_model(cfg).eval()
    params = count_parameters(model)
    label = _label(path)

    def counter():
        roi = _RoICounter(model, {"roi_head.bbox_head": "box", "roi_head.mask_head": "mask"})
        torch.manual_seed(0)
        fc = count_flops(_MMWrapper(model, framework, shape).eval(),
                         (torch.randn(1, 3, *shape),), module_depth=2)
        roi.remove()
        return fc, roi.counts

    model_cfg = json.dumps(cfg.model.to_dict(), sort_keys=True, default=str)
    fc, notes_ = _count_once(framework, shape, model_cfg, label, counter)
    notes += notes_
    res = Result(label, framework, shape, params, fc, notes=notes)
    _attach_paper_figures(res, cfg.model.get("type"), *_mm_identity(cfg.model))
    return res


def _attach_paper_figures(res: Result, model_type: str, family, arch, attn_mode) -> None:
    model_type = str(model_type).split(".")[-1]
    ref = None
    if model_type in ("MaskRCNN", "GeneralizedRCNN") and tuple(res.shape) == (800, 1280):
        ref = PAPER_MASK_RCNN.get((family, arch, attn_mode))
    elif model_type == "EncoderDecoder" and tuple(res.shape) == (512, 2048):
        ref = PAPER_UPERNET.get((family, arch)) if attn_mode == "global" else None
    if ref:
        res.paper_params, res.paper_flops = ref


class _D2Wrapper(nn.Module):
    """detectron2 inference on one image, flattened to tensors for the tracer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        h, w = x.shape[-2:]
        inputs = [{"image": x[0], "height": h, "width": w}]
        if hasattr(self.model, "roi_heads"):
            results = self.model.inference(inputs, do_postprocess=False)
        else:
            results = [r["instances"] for r in self.model(inputs)]
        out = []
        for inst in results:
            for v in inst.get_fields().values():
                out.append(v.tensor if hasattr(v, "tensor") else v)
        return tuple(out)


def analyze_d2_config(path: str, shape: Optional[Tuple[int, int]] = None,
                      opts: Sequence[str] = ()) -> Result:
    from detectron2.modeling import build_model as d2_build_model

    from rest_dense.d2.engine import setup_yaml_config

    cfg = setup_yaml_config(path, list(opts))
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    # random weights: let every detection through so the mask head sees
    # TEST.DETECTIONS_PER_IMAGE RoIs, as a trained model on a COCO image does
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.freeze()
    shape = tuple(shape or DEFAULT_SHAPES["d2"])
    model = d2_build_model(cfg).eval()
    params = count_parameters(model)
    label = _label(path)

    def counter():
        roi = _RoICounter(model, {"roi_heads.box_head": "box", "roi_heads.mask_head": "mask"})
        torch.manual_seed(0)
        fc = count_flops(_D2Wrapper(model).eval(), (torch.rand(1, 3, *shape) * 255,),
                         module_depth=3)
        roi.remove()
        return fc, roi.counts

    fc, notes = _count_once("d2", shape, cfg.MODEL.dump(), label, counter)
    res = Result(label, "d2", shape, params, fc, notes=notes)
    family, arch, mode = None, None, "global"
    if cfg.MODEL.BACKBONE.NAME.startswith("build_restv2"):
        family, arch, mode = "restv2", cfg.MODEL.RESTV2.NAME.split("_")[-1], cfg.MODEL.RESTV2.ATTN_MODE
    _attach_paper_figures(res, cfg.MODEL.META_ARCHITECTURE, family, arch, mode)
    return res


# ------------------------------------------------------------------ output
def _g(n: int) -> str:
    return f"{n / 1e9:.2f}"


def format_markdown(results: Sequence[Result]) -> str:
    head = ("| target | framework | input (H×W) | params (M) | paper params (M) | GFLOPs | "
            "GFLOPs excl. matmul | paper GFLOPs | conv | linear | matmul | layer_norm | other | "
            "notes |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        g = r.flops.groups
        pp = "" if r.paper_params is None else f"{r.paper_params:g}"
        lines.append(
            f"| {r.target} | {r.framework} | {r.shape[0]}×{r.shape[1]} | {r.params / 1e6:.3f} | "
            f"{pp} | {_g(r.flops.total)} | {_g(r.flops.total - g['matmul'])} | "
            f"{r.paper_flops or ''} | " + " | ".join(_g(g[k]) for k in GROUPS)
            + f" | {'; '.join(r.notes)} |")
    return "\n".join(lines)


#: how the papers' figures were obtained, as far as the numbers tell (for the markdown document)
PAPER_NOTES = """\
How the papers' figures compare (checked against the table above):

* UperNet (ResTv2 paper, Tab. 5, 2048×512) counts everything, attention products included:
  T/S/B agree with our GFLOPs to within 1 G.
* Mask R-CNN main results (ResTv2 paper, Tab. 4: 253/290/328 G) agree with our
  "GFLOPs excl. matmul" column to within 0.5 G: the attention products were left out there,
  as hook-based counters that only see modules (e.g. mmcv 1.x's `get_model_complexity_info`,
  behind the Swin / ConvNeXt Mask R-CNN figures the table compares with) leave them out.
* The attention-mode ablation (Tab. 4a/4b: 205.2/212.5/218.9/229.7 G, conv/linear/matmul/others)
  comes from the authors' detectron2 `analyze_model.py`, which averages fvcore counts over COCO
  val images (short side 800, long side ≤ 1333, mostly smaller than 800×1280) with a trained
  model (mask head on the actual detections), so it is lower than a count at 800×1280. The
  modes compare alike: window attention cuts the matmul FLOPs to a few G (3.69 G in the
  paper, 3.77 G here) and adds linear FLOPs for the padding to whole windows; hwin lies
  between. One figure we cannot reproduce: cwin adds 7.2 G of conv over win in Tab. 4b, while
  its extra layers (0.014 M parameters: one 3×3 depth-wise conv per stage, 49.94 → 49.96 M
  as in Tab. 4a) cost 0.1 G at 800×1280.
* The dense ResTv2-T backbone at 800×1280: 127.65 G here against 127.6 G (linear 69.2,
  matmul 46.1, conv 11.9, layer_norm 0.4) for the authors' code. The 0.06 G difference is the
  four output norms `norm_1..4` (see the notes column): the authors' code builds these
  channels-first LayerNorms from element-wise ops, which fvcore does not count, so its
  layer_norm is 0.41 G instead of our 0.47 G; every other operator agrees exactly.
* Backbones at 224×224 are compared with the ImageNet classifiers, whose counts include the
  classifier head (and ResTv2's final norm) but not the dense output norms.
"""


def markdown_document(results: Sequence[Result], command: str) -> str:
    doc = __doc__.split("Conventions", 1)[1].split("\n", 1)[1].rstrip()
    return (
        "# Parameters and FLOPs\n\n"
        f"Generated by `{command}` (fvcore {_fvcore_version()}, torch {torch.__version__}).\n"
        "GFLOPs are 10^9 multiply-accumulates; the columns conv … other split them by operator "
        "(matmul = attention products, explicit or fused). \"paper\" columns: the ResTv2 / ResTv1 "
        "papers (detection: detectron2 Mask R-CNN, \"1280×800\"; segmentation: UperNet, "
        "\"2048×512\"; backbones at 224: the ImageNet classifiers) and, for the dense "
        "ResTv2-T backbone at 800×1280, the authors' code measured with fvcore (shared/ENV.md).\n\n"
        "Conventions:\n" + doc + "\n\n" + format_markdown(results) + "\n\n" + PAPER_NOTES)


def _fvcore_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fvcore")
    except metadata.PackageNotFoundError:
        return "?"


def print_breakdown(r: Result) -> None:
    print(f"== {r.target} [{r.framework}] input {r.shape[0]}x{r.shape[1]}: "
          f"{r.params / 1e6:.3f}M params, {r.flops.total / 1e9:.2f} GFLOPs"
          + (f"  (paper: {r.paper_params}M params, {r.paper_flops} GFLOPs)" if r.paper_flops else ""))
    for k, v in r.flops.groups.items():
        ops = ", ".join(f"{op} {_g(n)}" for op, n in sorted(r.flops.by_operator.items())
                        if op_group(op) == k)
        print(f"   {k:<10} {_g(v):>9}   {ops}")
    if r.notes:
        print("   notes: " + "; ".join(r.notes))


# ------------------------------------------------------------------ CLI
def expand(paths: Iterable[str], with_d2: bool) -> List[str]:
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in ("_base_", "toy", "lazy")
                                 and not d.startswith("__"))
                for f in sorted(files):
                    if f.endswith(".py") or (with_d2 and f.endswith(".yaml")
                                             and not f.startswith("Base-")):
                        found.append(os.path.join(root, f))
        else:
            found.append(path)
    return found


def _d2_available() -> bool:
    try:
        import detectron2  # noqa: F401

        import rest_dense.d2  # noqa: F401
    except Exception:  # noqa: BLE001 (any import failure means: skip detectron2)
        return False
    return True


def parse_target(text: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    m = re.match(r"^(.*)@(\d+)x(\d+)$", text)
    if m:
        return m.group(1), (int(m.group(2)), int(m.group(3)))
    return text, None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", help="backbone names, config files or folders; "
                   "append @HxW to set one target's input size")
    p.add_argument("--all", action="store_true", help="every shipped config (" +
                   ", ".join(SHIPPED_MM + SHIPPED_D2) + "; detectron2 ones if importable)")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                   help="input size for every target (default: backbone 224 224, "
                        "detection 800 1280, segmentation 512 2048)")
    p.add_argument("--attn-mode", default="global", choices=("global", "win", "cwin", "hwin"),
                   help="attention mode of backbones given by name (configs set their own)")
    p.add_argument("--math-attn", action="store_true",
                   help="backbones by name: explicit matmul attention instead of fused SDPA")
    p.add_argument("--check-math", action="store_true",
                   help="backbones by name: also count the math path and require equal totals")
    p.add_argument("--no-d2", action="store_true", help="skip detectron2 configs")
    p.add_argument("--markdown", metavar="FILE", help="write the table (with conventions) here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> List[Result]:
    with_d2 = not args.no_d2 and _d2_available()
    targets = [parse_target(t) for t in args.targets]
    if args.all:
        targets += [(p, None) for p in SHIPPED_MM + (SHIPPED_D2 if with_d2 else ())]
    if not targets:
        raise SystemExit("nothing to count: give targets or --all")
    results = []
    for name, shape in targets:
        shape = shape or (tuple(args.shape) if args.shape else None)
        if os.path.exists(name):
            files = expand([name], with_d2)
        else:
            files = []
            r = analyze_backbone(name, shape or DEFAULT_SHAPES["backbone"], args.attn_mode,
                                 fused_attn=not args.math_attn)
            if args.check_math:
                other = analyze_backbone(name, r.shape, args.attn_mode,
                                         fused_attn=args.math_attn)
                if other.flops.total != r.flops.total:
                    raise SystemExit(f"{name}: fused {r.flops.total} != math {other.flops.total}")
                r.notes.append("fused == math path")
            print_breakdown(r)
            results.append(r)
        for path in files:
            if path.endswith(".yaml"):
                if not with_d2:
                    print(f"skipping {path}: detectron2 not importable", file=sys.stderr)
                    continue
                r = analyze_d2_config(path, shape)
            else:
                r = analyze_mm_config(path, shape)
            print_breakdown(r)
            results.append(r)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    table = format_markdown(results)
    print()
    print(table)
    if args.markdown:
        command = "python tools/get_flops.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a)
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown_document(results, command))
        print(f"\nwrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
