"""Parameters and FLOPs of ResT backbones and of whole detection / segmentation models.

FLOPs are counted with fvcore's ``FlopCountAnalysis`` plus a handle for
``F.scaled_dot_product_attention`` (which fvcore does not know), and split by operator
into the groups conv / linear / matmul / layer_norm / other. Targets are registry names
(``restv2_tiny``, see :func:`rest_dense.models.list_models`), MMDetection / MMSegmentation
configs (``.py``) or detectron2 configs (``.yaml`` and LazyConfig ``.py``), given as files
or as shipped config names (:func:`rest_dense.configs.list_configs`). Each result carries
the ResT papers' reference figures where the papers report the same model at the same
input size.

The command-line front end is ``rest-dense flops`` (:mod:`rest_dense.commands.flops`).
Library use::

    from rest_dense.analysis import analyze_backbone, analyze_config, format_breakdown
    r = analyze_backbone("restv2_tiny", (800, 1280))
    print(format_breakdown(r))            # 127.65 GFLOPs, 29.667M parameters
    r = analyze_config("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py", params_only=True)

fvcore, and the framework of a config (mmdet / mmseg / detectron2), are imported only when
a count needs them. The counting conventions are :data:`CONVENTIONS`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .models import ConfigWarning, canonical_name, create_model, list_models

__all__ = [
    "GROUPS", "DEFAULT_SHAPES", "SDPA_OPS", "CONVENTIONS",
    "PAPER_BACKBONE", "PAPER_MASK_RCNN", "PAPER_UPERNET",
    "FlopCount", "AnalysisResult", "Target", "CountCache", "NoModelInConfig",
    "sdpa_flop_jit", "op_group", "count_parameters", "count_flops",
    "resolve_targets", "config_kind", "parse_cfg_options", "analyze_backbone", "analyze_mm_config",
    "analyze_d2_config", "analyze_config", "analyze_target", "analyze",
    "format_breakdown", "format_table", "format_params",
]

#: operator groups of the breakdown (the columns of the ResTv2 paper's Table 4b)
GROUPS: Tuple[str, ...] = ("conv", "linear", "matmul", "layer_norm", "other")
#: default input size (H, W) per kind of target
DEFAULT_SHAPES: Dict[str, Tuple[int, int]] = {
    "backbone": (224, 224), "mmdet": (800, 1280), "d2": (800, 1280), "mmseg": (512, 2048)}

CONVENTIONS = """\
* one multiply-accumulate counts as one FLOP; element-wise ops, softmax, activations and
  pooling are not counted (fvcore's, detectron2's and the ResT papers' convention);
* attention products are counted whether they run as explicit ``matmul`` or through
  ``F.scaled_dot_product_attention`` (fvcore does not know the latter; rest_dense registers
  a handle: ``B*heads*N*M*(d_qk + d_v)``, the same as the two matmuls of the math path);
* default input sizes: backbones 224x224, detection 800x1280 (H x W, "1280x800" in the
  detectron2 / paper notation), segmentation 512x2048 (mmseg's "2048x512");
* detection models are counted in inference mode on one image: Mask R-CNN's box head on the
  RPN's post-NMS proposals (up to 1000), its mask head on 100 RoIs (mmdet's ``_forward``:
  the first 100 proposals; detectron2: 100 detections, score threshold set to 0 so that
  random weights yield them); segmentation models without the auxiliary head (mmseg's
  ``_forward``, as mmseg's get_flops). Weights are random: only shapes matter, except for
  the number of RPN proposals surviving NMS, which is reported."""

# ------------------------------------------------------------------ fvcore op handles
#: the ATen spellings of scaled dot-product attention that a trace may contain
SDPA_OPS: Tuple[str, ...] = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for scaled dot-product attention.

    Counts ``q @ k^T`` plus ``attn @ v`` the way fvcore counts the two matmuls of the math
    path (one multiply-accumulate = one FLOP).

    Args:
        inputs: the traced op's inputs; ``q``: ``(..., N, d)``, ``k``: ``(..., M, d)``,
            ``v``: ``(..., M, d_v)``. The leading dimensions are those of ``q`` (``k`` and
            ``v`` may broadcast over them).
        outputs: the traced op's outputs (unused).

    Returns:
        ``prod(leading dims) * N * M * (d + d_v)``.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    n, d = q[-2], q[-1]
    m, dv = k[-2], v[-1]
    return math.prod(q[:-2]) * n * m * (d + dv)


def op_group(op: str) -> str:
    """Map an fvcore operator name to one of :data:`GROUPS`.

    Args:
        op: fvcore's operator key (``'conv'``, ``'linear'``, ``'matmul'``, ...).

    Returns:
        ``'conv'``, ``'linear'``, ``'matmul'`` (attention products, explicit or fused),
        ``'layer_norm'`` or ``'other'``.
    """
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
    """Number of parameters of a module, shared tensors counted once.

    Args:
        model: any module.

    Returns:
        The parameter count.
    """
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class FlopCount:
    """FLOPs of one forward pass.

    Args:
        total (int): all counted FLOPs.
        by_operator (dict[str, int]): FLOPs per fvcore operator name (zero entries dropped).
        by_module (dict[str, int]): FLOPs per submodule, down to the requested depth.
        unsupported (dict[str, int]): operators fvcore skipped, with their call counts.
    """

    total: int
    by_operator: Dict[str, int]
    by_module: Dict[str, int] = field(default_factory=dict)
    unsupported: Dict[str, int] = field(default_factory=dict)

    @property
    def groups(self) -> Dict[str, int]:
        """FLOPs per group of :data:`GROUPS` (every group present, possibly 0)."""
        out = dict.fromkeys(GROUPS, 0)
        for op, n in self.by_operator.items():
            out[op_group(op)] += n
        return out


def count_flops(model: nn.Module, inputs: Tuple[Any, ...], module_depth: int = 1) -> FlopCount:
    """Count the FLOPs of ``model(*inputs)`` with fvcore, attention handles registered.

    Args:
        model: module to trace; put it in eval mode first for inference counts.
        inputs: positional inputs of ``model``.
        module_depth: keep ``by_module`` entries down to this many dots in the name
            (1: top-level children only).

    Returns:
        The :class:`FlopCount`.
    """
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(model, inputs)
    fca.set_op_handle(**{op: sdpa_flop_jit for op in SDPA_OPS})
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
#: ``(name, H, W) -> (params M, GFLOPs, source)``; sources: the ResT papers and, for the
#: dense backbone, the authors' code measured with fvcore
PAPER_BACKBONE: Dict[Tuple[str, int, int], Tuple[float, float, str]] = {
    # ImageNet-1k classifiers at 224x224 (with the classification head)
    ("restv2_tiny", 224, 224): (30, 4.1, "ImageNet classifier, Tab. 1"),
    ("restv2_small", 224, 224): (41, 6.0, "ImageNet classifier, Tab. 1"),
    ("restv2_base", 224, 224): (56, 7.9, "ImageNet classifier, Tab. 1"),
    ("restv2_large", 224, 224): (87, 13.8, "ImageNet classifier, Tab. 1"),
    ("restv1_lite", 224, 224): (10.49, 1.4, "ImageNet classifier, ResTv1"),
    ("restv1_small", 224, 224): (13.66, 1.9, "ImageNet classifier, ResTv1"),
    ("restv1_base", 224, 224): (30.28, 4.3, "ImageNet classifier, ResTv1"),
    ("restv1_large", 224, 224): (51.63, 7.9, "ImageNet classifier, ResTv1"),
    # the authors' released dense backbone code measured with fvcore
    ("restv2_tiny", 800, 1280): (29.667, 127.6, "authors' code, fvcore"),
}
#: Mask R-CNN at 800x1280 (detectron2; ResTv2 paper Tab. 4 main results, Tab. 4a ablation):
#: ``(family, arch, attn_mode) -> (params M, GFLOPs text)``
PAPER_MASK_RCNN: Dict[Tuple[str, str, str], Tuple[float, str]] = {
    ("restv2", "tiny", "global"): (49.94, "253 (Tab. 4) / 229.7 (Tab. 4a)"),
    ("restv2", "small", "global"): (60.71, "290"),
    ("restv2", "base", "global"): (75.47, "328"),
    ("restv2", "tiny", "win"): (49.94, "205.2 (Tab. 4a)"),
    ("restv2", "tiny", "cwin"): (49.96, "212.5 (Tab. 4a)"),
    ("restv2", "tiny", "hwin"): (49.94, "218.9 (Tab. 4a)"),
}
#: UperNet ADE20K at 512x2048 (mmseg; ResTv2 paper Tab. 5): ``(family, arch) -> (params M,
#: GFLOPs text)``
PAPER_UPERNET: Dict[Tuple[str, str], Tuple[float, str]] = {
    ("restv2", "tiny"): (62.1, "977"),
    ("restv2", "small"): (72.9, "1035"),
    ("restv2", "base"): (87.6, "1095"),
}

# ------------------------------------------------------------------ results and targets
@dataclass
class AnalysisResult:
    """Parameters and (unless counted with ``params_only``) FLOPs of one target.

    Args:
        target (str): label (model name, shipped config name or path).
        framework (str): ``'backbone'``, ``'mmdet'``, ``'mmseg'`` or ``'d2'``.
        shape (tuple[int, int]): input (H, W) of the count.
        params (int): parameters of the whole model.
        flops (FlopCount | None): the count; None for a parameters-only analysis.
        backbone_params (int | None): parameters of the backbone inside a whole model.
        paper_params (float | None): the papers' parameter count (M), where reported.
        paper_flops (str | None): the papers' GFLOPs (with source), where reported.
        notes (list[str]): remarks for the table (RoIs per head, duplicates, ...).
    """

    target: str
    framework: str
    shape: Tuple[int, int]
    params: int
    flops: Optional[FlopCount] = None
    backbone_params: Optional[int] = None
    paper_params: Optional[float] = None
    paper_flops: Optional[str] = None
    notes: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """One thing to analyse.

    Args:
        kind (str): ``'backbone'`` (a registry name) or the config's framework,
            :func:`rest_dense.configs.config_framework`: ``'mmdet'``, ``'mmseg'``, ``'d2'``
            (detectron2 yaml) or ``'d2-lazy'`` (LazyConfig); ``'openmmlab'`` for an
            mmengine config of neither toolbox (one without a model).
        name (str): canonical model name, or the config's absolute path.
        label (str): how tables name it (shipped configs: their name under ``configs/``).
    """

    kind: str
    name: str
    label: str


class NoModelInConfig(ValueError):
    """A config that builds no model (a deployment or dataset config, for instance)."""


class CountCache:
    """Models already counted in one run, keyed by framework, input size and model config.

    Configs that differ only in schedule or test-time augmentation build the same model;
    the second one reuses the first count and is noted as ``same model as <first>``.
    """

    def __init__(self) -> None:
        self._seen: Dict[Tuple, Tuple[str, FlopCount, Dict[str, int]]] = {}

    def count(self, framework: str, shape: Tuple[int, int], model_cfg: str, label: str,
              counter: Callable[[], Tuple[FlopCount, Dict[str, int]]]
              ) -> Tuple[FlopCount, List[str]]:
        """Run ``counter() -> (FlopCount, RoI counts)`` unless ``model_cfg`` was counted.

        Args:
            framework: ``'mmdet'``, ``'mmseg'`` or ``'d2'``.
            shape: input (H, W).
            model_cfg: text identifying the model (its serialised config).
            label: the target's label, quoted by later duplicates.
            counter: does the count.

        Returns:
            The count and the notes for the table.
        """
        key = (framework, tuple(shape), model_cfg)
        first = None
        if key in self._seen:
            first, fc, rois = self._seen[key]
        else:
            fc, rois = counter()
            self._seen[key] = (label, fc, rois)
        notes = ["RoIs: " + ", ".join(f"{k} {v}" for k, v in rois.items())] if rois else []
        if first:
            notes.append(f"same model as {first}")
        return fc, notes


def _config_label(path: str) -> str:
    """A shipped config's name; another file's path relative to the working directory."""
    from .configs import configs_root

    p = Path(path).resolve()
    try:
        return p.relative_to(configs_root().resolve()).as_posix()
    except (ValueError, FileNotFoundError):
        pass
    try:
        return os.path.relpath(p)
    except ValueError:  # another drive
        return str(p)


def config_kind(path: str) -> str:
    """Deprecated: use :func:`rest_dense.configs.config_framework` (``'mmdet'``, ``'mmseg'``,
    ``'d2'``, ``'d2-lazy'``). Returns ``'d2'`` for both detectron2 formats, else ``'mm'``."""
    from .configs import DETECTRON2, config_framework

    warnings.warn("rest_dense.analysis.config_kind is deprecated; use "
                  "rest_dense.configs.config_framework", DeprecationWarning, stacklevel=2)
    return "d2" if config_framework(path) in DETECTRON2 else "mm"


def _configs_under(folder: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "_base_" and not d.startswith("__"))
        for f in sorted(files):
            if f.endswith((".py", ".yaml")) and not f.startswith("Base-") and f != "__init__.py":
                found.append(os.path.join(root, f))
    return found


def _is_model_name(text: str) -> bool:
    try:
        canonical_name(text)
    except (ValueError, TypeError):
        return False
    return True


def resolve_targets(items: Iterable[str], all_configs: bool = False) -> List[Target]:
    """Turn command-line targets into :class:`Target` objects.

    Args:
        items: registry names (``'restv2_tiny'``), config files, shipped config names
            (``'mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'``) or folders (every
            config below them, ``_base_`` folders and ``Base-*.yaml`` left out).
        all_configs: append every shipped config (:func:`rest_dense.configs.list_configs`).

    Returns:
        The targets, in order, duplicates removed.

    Raises:
        ValueError: an item is neither a model name, nor a config, nor a folder.
    """
    from .configs import (ConfigSyntaxError, config_framework, get_config_folder,
                          get_config_path, list_configs)

    found: List[Tuple[str, str]] = []  # (kind, model name or config path), in order
    for item in items:
        item = str(item)
        if _is_model_name(item) and not os.path.exists(item):
            found.append(("backbone", canonical_name(item)))
        elif get_config_folder(item):
            paths = _configs_under(get_config_folder(item))
            if not paths:
                raise ValueError(f"folder {item!r} holds no config (.py / .yaml) files")
            found += [("config", p) for p in paths]
        else:
            try:
                path = get_config_path(item)
            except FileNotFoundError as e:
                raise ValueError(f"{item!r} is neither a model ({', '.join(list_models())}) "
                                 f"nor a config file, shipped config name or folder: {e}") from None
            if not path.endswith((".py", ".yaml", ".yml")):
                raise ValueError(f"{item!r} is not a config (.py / .yaml); a target is a model "
                                 f"name ({', '.join(list_models())}), a config or a folder of "
                                 "configs (checkpoints are not counted: name their model)")
            found.append(("config", path))
    if all_configs:
        found += [("config", get_config_path(n)) for n in list_configs()]
    targets: List[Target] = []
    seen = set()
    for kind, name in found:
        if kind == "config":
            name = os.path.abspath(name)
        if (kind, name) in seen:
            continue
        seen.add((kind, name))
        if kind == "backbone":
            targets.append(Target("backbone", name, name))
        else:
            try:
                kind = config_framework(name)
            except ConfigSyntaxError:
                raise
            except ValueError:  # an mmengine config without a model, say: analyze_mm_config names it
                kind = "openmmlab"
            targets.append(Target(kind, name, _config_label(name)))
    return targets


# ------------------------------------------------------------------ backbones
def _g(n: float) -> str:
    return f"{n / 1e9:.2f}"


def analyze_backbone(name: str, shape: Tuple[int, int] = DEFAULT_SHAPES["backbone"],
                     attn_mode: str = "global", fused_attn: bool = True, batch: int = 1,
                     params_only: bool = False) -> AnalysisResult:
    """Parameters and FLOPs of a registered backbone (randomly initialised).

    Args:
        name: registry name or alias, e.g. ``'restv2_tiny'``.
        shape: input (H, W). Default: 224x224.
        attn_mode: ``'global'``, ``'win'``, ``'cwin'`` or ``'hwin'`` (ResTv2 only).
        fused_attn: count the fused attention path (True) or the explicit matmul path;
            both give the same FLOPs.
        batch: images per forward pass.
        params_only: skip the FLOP count.

    Returns:
        The :class:`AnalysisResult` (``framework='backbone'``) with the papers' figures
        where they report this model at this size.
    """
    model = create_model(name, attn_mode=attn_mode, fast_paths=fused_attn).eval()
    key = canonical_name(name)
    label = key if attn_mode == "global" else f"{key} ({attn_mode})"
    params = count_parameters(model)
    res = AnalysisResult(label, "backbone", tuple(shape), params, backbone_params=params)
    ref = PAPER_BACKBONE.get((key, *shape)) if attn_mode == "global" else None
    if ref:
        res.paper_params, res.paper_flops = ref[0], f"{ref[1]} ({ref[2]})"
    if params_only:
        return res
    res.flops = count_flops(model, (torch.randn(batch, 3, *shape),))
    if batch != 1:
        res.notes.append(f"batch {batch}")
    if not fused_attn:
        res.notes.append("math attention path")
    out_norms = sum(v for k, v in res.flops.by_module.items() if re.fullmatch(r"norm_\d", k))
    if out_norms:
        # the authors' code builds these channels-first LayerNorms from element-wise ops,
        # which fvcore does not count
        res.notes.append(f"output norms norm_1..4: {_g(out_norms)}")
    return res


# ------------------------------------------------------------------ whole models
class _RoICounter:
    """Counts the RoIs that reach the box / mask heads (forward pre-hooks)."""

    def __init__(self, model: nn.Module, names: Dict[str, str]):
        self.counts: Dict[str, int] = {}
        self._hooks = []
        mods = dict(model.named_modules())
        for attr, label in names.items():
            if attr in mods:
                self._hooks.append(mods[attr].register_forward_pre_hook(self._hook(label)))

    def _hook(self, label: str):
        def fn(module, args):
            x = args[0]
            if isinstance(x, (list, tuple)):
                x = x[0]
            if isinstance(x, torch.Tensor):
                self.counts[label] = int(x.shape[0])
        return fn

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


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
        return self.model._forward(x, self.samples)


def _arch_key(arch: str) -> str:
    """A config's arch string as the key of the arch tables (``'Tiny'``, ``'restv2_tiny'``
    -> ``'tiny'``), as the backbones read it."""
    from .models.registry import get_model_entry

    key = arch.strip().lower()
    try:
        return get_model_entry(key).arch
    except ValueError:
        return key


def _attach_paper_figures(res: AnalysisResult, model_type: Any, family: Optional[str],
                          arch: Optional[str], attn_mode: str) -> None:
    model_type = str(model_type).split(".")[-1]
    ref = None
    if model_type in ("MaskRCNN", "GeneralizedRCNN") and tuple(res.shape) == (800, 1280):
        ref = PAPER_MASK_RCNN.get((family, arch, attn_mode))
    elif model_type == "EncoderDecoder" and tuple(res.shape) == (512, 2048):
        ref = PAPER_UPERNET.get((family, arch)) if attn_mode == "global" else None
    if ref:
        res.paper_params, res.paper_flops = ref


def parse_cfg_options(options: Optional[Sequence[str]]) -> Dict[str, Any]:
    """Deprecated alias of :func:`rest_dense.configs.parse_cfg_options` (mmengine
    ``DictAction`` semantics: ``a=1,2`` is a list, ``a=false`` is ``False``)."""
    from .configs import parse_cfg_options as parse

    warnings.warn("rest_dense.analysis.parse_cfg_options is deprecated; use "
                  "rest_dense.configs.parse_cfg_options", DeprecationWarning, stacklevel=2)
    return parse(options)


def analyze_mm_config(path: str, shape: Optional[Tuple[int, int]] = None,
                      cfg_options: Optional[Sequence[str]] = None, params_only: bool = False,
                      cache: Optional[CountCache] = None) -> AnalysisResult:
    """Parameters and FLOPs of the model of an MMDetection / MMSegmentation config.

    The model is counted in inference mode through ``model._forward`` on one image;
    test-time-augmentation configs are counted as one single-scale pass.

    Args:
        path: config file or shipped config name.
        shape: input (H, W). Default: 800x1280 (mmdet), 512x2048 (mmseg).
        cfg_options: ``KEY=VALUE`` overrides (values read as Python literals).
        params_only: skip the FLOP count.
        cache: reuse counts of identical models counted before (see :class:`CountCache`).

    Returns:
        The :class:`AnalysisResult`.
    """
    from .configs import building_from_config, get_config_path, parse_cfg_options, read_mm_config
    from .mm.utils import build_model, is_tta_model, load_config

    path = get_config_path(path)
    if "model" not in read_mm_config(path):
        raise NoModelInConfig(f"{_config_label(path)} defines no model (a deployment config?)")
    cfg = load_config(path, parse_cfg_options(cfg_options))
    framework = cfg.default_scope
    notes = []
    if is_tta_model(cfg.model):
        cfg.model = cfg.model.module
        notes.append("TTA config: one single-scale pass")
    cfg.model.backbone.pop("init_cfg", None)
    shape = tuple(shape or DEFAULT_SHAPES[framework])
    with warnings.catch_warnings(), building_from_config(assertions=True):
        warnings.simplefilter("ignore")  # the frameworks' deprecation notices
        warnings.simplefilter("default", ConfigWarning)  # but not ours about the config
        model = build_model(cfg).eval()
    label = _config_label(path)
    res = AnalysisResult(label, framework, shape, count_parameters(model),
                         backbone_params=count_parameters(model.backbone), notes=notes)
    bb = cfg.model.get("backbone", {})
    family = {"ResTv2": "restv2", "ResTv1": "restv1"}.get(str(bb.get("type", "")).split(".")[-1])
    arch = _arch_key(bb.get("arch")) if isinstance(bb.get("arch"), str) else None
    model_type = cfg.model.get("type")
    head = (cfg.model.get("decode_head") or {}).get("type") if model_type == "EncoderDecoder" else None
    if head is not None and str(head).split(".")[-1] != "UPerHead":
        model_type = f"EncoderDecoder+{head}"  # the paper's segmentation figures are UperNet's
    _attach_paper_figures(res, model_type, family, arch, bb.get("attn_mode", "global"))
    if params_only:
        return res

    def counter():
        roi = _RoICounter(model, {"roi_head.bbox_head": "box", "roi_head.mask_head": "mask"})
        torch.manual_seed(0)
        try:
            fc = count_flops(_MMWrapper(model, framework, shape).eval(),
                             (torch.randn(1, 3, *shape),), module_depth=2)
        finally:
            roi.remove()
        return fc, roi.counts

    model_cfg = json.dumps(cfg.model.to_dict(), sort_keys=True, default=str)
    res.flops, more = (cache or CountCache()).count(framework, shape, model_cfg, label, counter)
    res.notes += more
    return res


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
        else:  # RetinaNet: {"instances": ...}; SemanticSegmentor: {"sem_seg": (K, H, W)}
            results = [r.get("instances", r.get("sem_seg")) for r in self.model(inputs)]
        out = []
        for result in results:
            if isinstance(result, torch.Tensor):
                out.append(result)
                continue
            for v in result.get_fields().values():
                out.append(v.tensor if hasattr(v, "tensor") else v)
        return tuple(out)


def _set_if_present(node: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        if key not in node:
            return
        node = node[key]
    if last in node:
        node[last] = value


def _build_d2_model(path: str, opts: Sequence[str]) -> Tuple[nn.Module, str, Any, Tuple]:
    """(model, serialised model config, meta-architecture, (family, arch, attn_mode))."""
    from .d2.engine import instantiate_model, is_lazy_config, setup_lazy_config, setup_yaml_config

    if is_lazy_config(path):
        cfg = setup_lazy_config(path, list(opts))
        # random weights: let every detection through (see CONVENTIONS)
        _set_if_present(cfg.model, "roi_heads.box_predictor.test_score_thresh", 0.0)
        _set_if_present(cfg.model, "test_score_thresh", 0.0)
        model = instantiate_model(cfg).eval()
        bottom = getattr(getattr(model, "backbone", None), "bottom_up", None)
        ident = (None, None, "global")
        bu_cfg = cfg.model.get("backbone", {}).get("bottom_up", {})
        if type(bottom).__name__ == "D2ResTv2" and isinstance(bu_cfg.get("arch"), str):
            ident = ("restv2", bu_cfg.get("arch"), bu_cfg.get("attn_mode", "global"))
        return model, repr(cfg.model), type(model).__name__, ident

    from detectron2.modeling import build_model as d2_build_model

    cfg = setup_yaml_config(path, list(opts))
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    # random weights: let every detection through so the mask head sees
    # TEST.DETECTIONS_PER_IMAGE RoIs, as a trained model on a COCO image does
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.freeze()
    model = d2_build_model(cfg).eval()
    from .d2.config import restv2_arch_from_cfg
    from .models import get_model_entry

    ident = (None, None, "global")
    if cfg.MODEL.BACKBONE.NAME.startswith("build_restv2"):
        entry = get_model_entry(cfg.MODEL.RESTV2.NAME)
        if restv2_arch_from_cfg(cfg) == entry.arch_spec:  # a named variant, no ARCH override
            ident = ("restv2", entry.arch, cfg.MODEL.RESTV2.ATTN_MODE)
    return model, cfg.MODEL.dump(), cfg.MODEL.META_ARCHITECTURE, ident


def analyze_d2_config(path: str, shape: Optional[Tuple[int, int]] = None,
                      opts: Sequence[str] = (), params_only: bool = False,
                      cache: Optional[CountCache] = None) -> AnalysisResult:
    """Parameters and FLOPs of the model of a detectron2 config (yaml or LazyConfig).

    The model is counted in inference mode on one image, score thresholds set to 0 (random
    weights), on the CPU.

    Args:
        path: config file or shipped config name.
        shape: input (H, W). Default: 800x1280.
        opts: overrides: ``KEY VALUE`` pairs (yaml) or ``key=value`` items (LazyConfig).
        params_only: skip the FLOP count.
        cache: reuse counts of identical models counted before (see :class:`CountCache`).

    Returns:
        The :class:`AnalysisResult` (``framework='d2'``).
    """
    from .configs import building_from_config, get_config_path

    path = get_config_path(path)
    shape = tuple(shape or DEFAULT_SHAPES["d2"])
    d2_logger = logging.getLogger("rest_dense.d2")
    level = d2_logger.level
    d2_logger.setLevel(logging.ERROR)  # "AMP requested but not running on CUDA": irrelevant here
    try:
        with building_from_config(assertions=True):  # a bad value: one line, as in train
            model, model_cfg, meta_arch, ident = _build_d2_model(path, opts)
    finally:
        d2_logger.setLevel(level)
    label = _config_label(path)
    backbone = getattr(model, "backbone", None)
    backbone = getattr(backbone, "bottom_up", backbone)
    res = AnalysisResult(label, "d2", shape, count_parameters(model),
                         backbone_params=count_parameters(backbone) if backbone is not None else None)
    _attach_paper_figures(res, meta_arch, *ident)
    if params_only:
        return res

    def counter():
        roi = _RoICounter(model, {"roi_heads.box_head": "box", "roi_heads.mask_head": "mask"})
        torch.manual_seed(0)
        try:
            fc = count_flops(_D2Wrapper(model).eval(), (torch.rand(1, 3, *shape) * 255,),
                             module_depth=3)
        finally:
            roi.remove()
        return fc, roi.counts

    res.flops, res.notes = (cache or CountCache()).count("d2", shape, model_cfg, label, counter)
    return res


def analyze_config(path: str, shape: Optional[Tuple[int, int]] = None,
                   params_only: bool = False, cfg_options: Optional[Sequence[str]] = None,
                   cache: Optional[CountCache] = None) -> AnalysisResult:
    """Parameters and FLOPs of a config's model, whichever framework it is for.

    Args:
        path: config file or shipped config name (``.py``: MMDetection / MMSegmentation or
            detectron2 LazyConfig; ``.yaml``: detectron2).
        shape: input (H, W); default per framework (see :data:`DEFAULT_SHAPES`).
        params_only: skip the FLOP count.
        cfg_options: ``KEY=VALUE`` overrides.
        cache: reuse counts of identical models counted before.

    Returns:
        The :class:`AnalysisResult`.
    """
    from .configs import DETECTRON2, config_framework, d2_opts, get_config_path

    path = get_config_path(path)
    try:
        framework = config_framework(path)
    except ValueError:  # e.g. no model: analyze_mm_config says so (NoModelInConfig)
        framework = "openmmlab"
    if framework in DETECTRON2:
        return analyze_d2_config(path, shape, d2_opts(cfg_options, framework),
                                 params_only=params_only, cache=cache)
    return analyze_mm_config(path, shape, cfg_options, params_only=params_only, cache=cache)


def analyze_target(target: Target, shape: Optional[Tuple[int, int]] = None,
                   attn_mode: str = "global", fused_attn: bool = True,
                   params_only: bool = False, cfg_options: Optional[Sequence[str]] = None,
                   cache: Optional[CountCache] = None) -> AnalysisResult:
    """Analyse one :class:`Target` (see :func:`resolve_targets`).

    Args:
        target: what to analyse.
        shape: input (H, W); default per kind of target (:data:`DEFAULT_SHAPES`).
        attn_mode: attention mode of backbones given by name (configs set their own).
        fused_attn: backbones by name: count the fused attention path.
        params_only: skip the FLOP count.
        cfg_options: ``KEY=VALUE`` overrides for configs.
        cache: reuse counts of identical models counted before.

    Returns:
        The :class:`AnalysisResult`.
    """
    if target.kind == "backbone":
        return analyze_backbone(target.name, tuple(shape or DEFAULT_SHAPES["backbone"]),
                                attn_mode, fused_attn=fused_attn, params_only=params_only)
    return analyze_config(target.name, shape, params_only=params_only,
                          cfg_options=cfg_options, cache=cache)


def _framework_available(kind: str) -> bool:
    import importlib

    mods = {"mmdet": ("mmdet",), "mmseg": ("mmseg",), "openmmlab": ("mmengine",),
            "d2": ("detectron2",), "d2-lazy": ("detectron2",)}.get(kind, ())
    for mod in mods:
        try:
            importlib.import_module(mod)
        except ImportError:
            return False
    return True


def analyze(targets: Sequence[Target], shape: Optional[Tuple[int, int]] = None,
            attn_mode: str = "global", fused_attn: bool = True, params_only: bool = False,
            cfg_options: Optional[Sequence[str]] = None, progress: bool = False,
            skip_unsupported: bool = False,
            on_result: Optional[Callable[[AnalysisResult], None]] = None
            ) -> List[AnalysisResult]:
    """Analyse several targets, counting identical models once.

    Args:
        targets: from :func:`resolve_targets`.
        shape: input (H, W) for every target; default per kind (:data:`DEFAULT_SHAPES`).
        attn_mode: attention mode of backbones given by name.
        fused_attn: backbones by name: count the fused attention path.
        params_only: skip the FLOP counts.
        cfg_options: ``KEY=VALUE`` overrides for every config.
        progress: show a progress bar over the targets (stderr).
        skip_unsupported: skip (with a message on stderr) configs whose framework is not
            installed and configs that define no model, instead of failing.
        on_result: called with each result as soon as it is ready.

    Returns:
        One :class:`AnalysisResult` per analysed target, in order.
    """
    from tqdm import tqdm

    cache = CountCache()
    results = []
    bar = tqdm(targets, desc="flops", unit="model", file=sys.stderr,
               disable=not progress or len(targets) < 2)
    for target in bar:
        bar.set_postfix_str(target.label[-40:])
        if skip_unsupported and target.kind != "backbone" and not _framework_available(target.kind):
            bar.write(f"skipping {target.label}: its framework ({target.kind}) is not installed",
                      file=sys.stderr)
            continue
        try:
            res = analyze_target(target, shape, attn_mode, fused_attn, params_only, cfg_options,
                                 cache)
        except NoModelInConfig as e:
            if not skip_unsupported:
                raise
            bar.write(f"skipping {e}", file=sys.stderr)
            continue
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results


# ------------------------------------------------------------------ output
def format_breakdown(r: AnalysisResult) -> str:
    """A few readable lines for one result: totals, then FLOPs per group and operator.

    Args:
        r: the result.

    Returns:
        Text without a trailing newline.
    """
    head = f"== {r.target} [{r.framework}] input {r.shape[0]}x{r.shape[1]}: {r.params / 1e6:.3f}M params"
    if r.backbone_params is not None and r.framework != "backbone":
        head += f" (backbone {r.backbone_params / 1e6:.3f}M)"
    if r.flops is not None:
        head += f", {_g(r.flops.total)} GFLOPs"
    if r.paper_params is not None or r.paper_flops:
        paper = [f"{r.paper_params:g}M params"] if r.paper_params is not None else []
        paper += [f"GFLOPs {r.paper_flops}"] if r.paper_flops else []
        head += f"  [paper: {', '.join(paper)}]"
    lines = [head]
    if r.flops is not None:
        for k, v in r.flops.groups.items():
            ops = ", ".join(f"{op} {_g(n)}" for op, n in sorted(r.flops.by_operator.items())
                            if op_group(op) == k)
            lines.append(f"   {k:<10} {_g(v):>9}   {ops}")
    if r.notes:
        lines.append("   notes: " + "; ".join(r.notes))
    return "\n".join(lines)


def format_table(results: Sequence[AnalysisResult]) -> str:
    """An aligned plain-text table of results (one line each) for the terminal.

    Args:
        results: the results.

    Returns:
        Text without a trailing newline.
    """
    head = ["target", "framework", "input", "params(M)", "GFLOPs", *GROUPS, "paper GFLOPs"]
    rows = []
    for r in results:
        g = r.flops.groups if r.flops else {}
        rows.append([r.target, r.framework, f"{r.shape[0]}x{r.shape[1]}", f"{r.params / 1e6:.3f}",
                     _g(r.flops.total) if r.flops else "-",
                     *(_g(g[k]) if r.flops else "-" for k in GROUPS), r.paper_flops or ""])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    out = []
    for i, row in enumerate([head, *rows]):
        cells = [c.ljust(w) if j < 3 or j == len(row) - 1 else c.rjust(w)
                 for j, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_params(r: AnalysisResult) -> str:
    """One line with a result's parameter count: ``'  49.941M  (backbone 29.667M)  name'``.

    Args:
        r: the result.

    Returns:
        The line.
    """
    line = f"{r.params / 1e6:9.3f}M"
    if r.backbone_params is not None and r.framework != "backbone":
        line += f"  (backbone {r.backbone_params / 1e6:.3f}M)"
    if r.paper_params is not None:
        line += f"  [paper {r.paper_params:g}M]"
    return f"{line}  {r.target}"
