"""detectron2 (yacs) config keys for the ResT backbones and the AdamW recipe.

``add_restv2_config(cfg)`` adds ``MODEL.RESTV2``; ``add_rest_config(cfg)`` adds
``MODEL.REST`` (ResTv1). Both also add ``MODEL.VT_FPN`` (the visual-token FPN neck of the
``build_*_vt_fpn_backbone`` builders, :func:`add_vt_fpn_config`) and the solver keys the papers' recipe needs and
detectron2 0.5 lacks (``SOLVER.OPTIMIZER``, ``SOLVER.BETAS``; ``SOLVER.CLIP_GRADIENTS``
additionally accepts ``CLIP_TYPE: "full_model"``) and ``SOLVER.AMP.PRECISION``
(``"float16"`` | ``"bfloat16"``, as later detectron2 / d2go releases spell it). Calling
them twice is harmless.

Pretrained weights always come through detectron2's ``MODEL.WEIGHTS`` (see
:class:`rest_dense.d2.RestDetectionCheckpointer`); there is no backbone-specific key.
"""
from __future__ import annotations

from typing import Dict

from detectron2.config import CfgNode as CN

from ..models import DEFAULT_WINDOW_SIZE, STAGE_STRIDES, get_model_entry
from ..models.base import check_int

__all__ = ["add_restv2_config", "add_rest_config", "add_rest_solver_config", "add_vt_fpn_config",
           "restv2_arch_from_cfg", "rest_arch_from_cfg"]

_STAGES = [f"stage{i + 1}" for i in range(len(STAGE_STRIDES))]


def _arch_node() -> CN:
    # empty list / 0 = "take the value of the variant named by NAME"
    node = CN()
    node.EMBED_DIMS = []
    node.NUM_HEADS = []
    node.DEPTHS = []
    node.SR_RATIOS = []
    node.MLP_RATIO = 0.0
    return node


def add_rest_solver_config(cfg: CN) -> None:
    """Add ``SOLVER.OPTIMIZER`` (``"SGD"`` | ``"ADAMW"``, default SGD as in detectron2),
    ``SOLVER.BETAS`` (AdamW betas), ``SOLVER.SCALE_SCHEDULE_WITH_MAX_ITER`` (default
    False; see :func:`rest_dense.d2.engine.scale_yaml_schedule`) and
    ``SOLVER.AMP.PRECISION`` if absent, and ``SOLVER.POLY_LR_POWER`` (default 1.0: linear
    decay to 0) for ``SOLVER.LR_SCHEDULER_NAME: "WarmupPolyLR"`` (mmseg's poly schedule,
    which :class:`rest_dense.d2.RestTrainer` adds to detectron2's two).

    ``SOLVER.AMP.PRECISION`` is the dtype of ``SOLVER.AMP.ENABLED`` training:
    ``"float16"`` (default; detectron2's ``AMPTrainer``: autocast + grad scaler, CUDA
    only) or ``"bfloat16"`` (:class:`rest_dense.d2.engine.BF16Trainer`: autocast without
    grad scaler, on the CPU and on GPUs with bf16)."""
    if "PRECISION" not in cfg.SOLVER.AMP:
        cfg.SOLVER.AMP.PRECISION = "float16"
    if "OPTIMIZER" not in cfg.SOLVER:
        cfg.SOLVER.OPTIMIZER = "SGD"
    if "BETAS" not in cfg.SOLVER:
        cfg.SOLVER.BETAS = (0.9, 0.999)
    if "SCALE_SCHEDULE_WITH_MAX_ITER" not in cfg.SOLVER:
        cfg.SOLVER.SCALE_SCHEDULE_WITH_MAX_ITER = False
    if "POLY_LR_POWER" not in cfg.SOLVER:
        cfg.SOLVER.POLY_LR_POWER = 1.0


def add_vt_fpn_config(cfg: CN) -> None:
    """Add the ``MODEL.VT_FPN`` keys (the VT-FPN neck of ``build_restv2_vt_fpn_backbone`` /
    ``build_rest_vt_fpn_backbone``) and ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` if absent.

    Keys (defaults: the VT-FPN paper's settings; see :class:`rest_dense.models.VTFPN`):
        IN_FEATURES: backbone maps the neck reads (``stage1..stage4``), finest first.
        OUT_CHANNELS: channels of every output map (256).
        NUM_OUTS: number of outputs; 0 (default) = one per input (``p2..p5`` for semantic
            segmentation); one more adds a stride-2 max-pooled ``p6`` (Mask R-CNN).
        NUM_TOKENS: visual tokens per level (8).
        TOKEN_CHANNELS: channels of the tokens (1024).
        TOKENIZER: ``"filter"`` (default) or ``"recurrent"``.
        DEPTH: transformer layers over the tokens of all levels (1).
        NUM_HEADS: attention heads of the token transformer (16).
        POS_ENCODING: the tokenizer's position encoding (False, as in the paper's final model).
        NORM: norm of the token path: ``"BN"``, ``"SyncBN"`` (the paper's; one process is
            plain BN; multi-process CPU jobs train it as BN with rank 0's statistics, see
            :func:`rest_dense.distributed.revert_sync_batchnorm_on_cpu`), ``"LN"``,
            ``"none"``; ``""`` (default) = the core module's default, BN.

    ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` (default 1.0 = off): semantic-segmentation
    training crops (:class:`RestTrainer` with ``SemanticSegmentor``) are re-drawn up to 10
    times while one class covers more than this fraction (mmseg's ``cat_max_ratio``).
    """
    if "SINGLE_CATEGORY_MAX_AREA" not in cfg.INPUT.CROP:
        cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    if "VT_FPN" in cfg.MODEL:
        return
    cfg.MODEL.VT_FPN = CN()
    c = cfg.MODEL.VT_FPN
    c.IN_FEATURES = list(_STAGES)
    c.OUT_CHANNELS = 256
    c.NUM_OUTS = 0
    c.NUM_TOKENS = 8
    c.TOKEN_CHANNELS = 1024
    c.TOKENIZER = "filter"
    c.DEPTH = 1
    c.NUM_HEADS = 16
    c.POS_ENCODING = False
    c.NORM = ""


def add_restv2_config(cfg: CN) -> None:
    """Add the ``MODEL.RESTV2`` keys (and the solver keys) to a detectron2 config.

    Keys:
        NAME: a ResTv2 name of :func:`rest_dense.models.list_models` (``restv2_tiny`` ...).
        ARCH: optional per-field overrides of the named variant (``EMBED_DIMS``,
            ``NUM_HEADS``, ``DEPTHS``, ``SR_RATIOS``: 4 values each; ``MLP_RATIO``);
            empty / 0 keeps the variant's value.
        OUT_FEATURES: emitted maps, a subset of ``stage1..stage4`` (strides 4..32).
        DROP_PATH_RATE: stochastic depth.
        ATTN_MODE: ``global | win | cwin | hwin``.
        WINDOW_SIZE: window side per stage (4 values, or 1 for all stages).
        WITH_CP: gradient checkpointing per block.
        CP_LEVEL: memory level, ``none | mlp | block`` (see ``with_cp`` of
            :class:`rest_dense.models.ResTv2`); empty (default) follows ``WITH_CP``.
        NORM_EVAL: keep the stem's BatchNorms in eval mode while training.
        FAST_PATHS: the fast dispatch (attention kernel per device and dtype, memory-lean
            fast paths); False: the plain reference computation (``fast_paths`` of
            :class:`rest_dense.models.ResTv2`).
        FUSED_ATTN: deprecated former name of ``FAST_PATHS`` (False still switches it off).

    ``MODEL.BACKBONE.FREEZE_AT`` (0..5) freezes nothing / the stem / stem and stages
    ``1..FREEZE_AT-1``.
    """
    add_rest_solver_config(cfg)
    add_vt_fpn_config(cfg)
    if "RESTV2" in cfg.MODEL:
        return
    cfg.MODEL.RESTV2 = CN()
    c = cfg.MODEL.RESTV2
    c.NAME = "restv2_tiny"
    c.ARCH = _arch_node()
    c.OUT_FEATURES = list(_STAGES)
    c.DROP_PATH_RATE = 0.0
    c.ATTN_MODE = "global"
    c.WINDOW_SIZE = list(DEFAULT_WINDOW_SIZE)
    c.WITH_CP = False
    c.CP_LEVEL = ""
    c.NORM_EVAL = False
    c.FAST_PATHS = True
    c.FUSED_ATTN = True  # deprecated: FAST_PATHS


def add_rest_config(cfg: CN) -> None:
    """Add the ``MODEL.REST`` keys (ResTv1; and the solver keys) to a detectron2 config.

    Keys: ``NAME`` (a ResTv1 name of :func:`rest_dense.models.list_models`, or its released
    spelling ``rest_small`` ...), ``ARCH``,
    ``OUT_FEATURES``, ``DROP_PATH_RATE``, ``WITH_CP``, ``CP_LEVEL``, ``NORM_EVAL``, ``FAST_PATHS``, as
    for :func:`add_restv2_config` (ResTv1 has no attention modes).
    """
    add_rest_solver_config(cfg)
    add_vt_fpn_config(cfg)
    if "REST" in cfg.MODEL:
        return
    cfg.MODEL.REST = CN()
    c = cfg.MODEL.REST
    c.NAME = "rest_small"
    c.ARCH = _arch_node()
    c.OUT_FEATURES = list(_STAGES)
    c.DROP_PATH_RATE = 0.0
    c.WITH_CP = False
    c.CP_LEVEL = ""
    c.NORM_EVAL = False
    c.FAST_PATHS = True
    c.FUSED_ATTN = True  # deprecated: FAST_PATHS


def _arch(node: CN, family: str, key: str) -> Dict:
    try:
        entry = get_model_entry(str(node.NAME))
    except ValueError as err:
        raise ValueError(f"{key}.NAME: {err}") from None
    if entry.family != family:
        raise ValueError(f"{key}.NAME={node.NAME!r} is a {entry.family} model; {key} builds {family}")
    spec = entry.arch_spec
    over = node.ARCH
    for field in ("EMBED_DIMS", "NUM_HEADS", "DEPTHS", "SR_RATIOS"):
        if len(over[field]):
            # checked here, under the config's key: yacs does not type list elements
            spec[field.lower()] = tuple(check_int(v, f"{key}.ARCH.{field}[{i}]", low=1)
                                        for i, v in enumerate(over[field]))
    if over.MLP_RATIO:
        if isinstance(over.MLP_RATIO, bool) or not isinstance(over.MLP_RATIO, (int, float)):
            raise TypeError(f"{key}.ARCH.MLP_RATIO must be a number, got {over.MLP_RATIO!r}")
        if not over.MLP_RATIO > 0:
            raise ValueError(f"{key}.ARCH.MLP_RATIO must be positive, got {over.MLP_RATIO!r}")
        spec["mlp_ratio"] = float(over.MLP_RATIO)
    return spec


def restv2_arch_from_cfg(cfg: CN) -> Dict:
    """The core ``ResTv2`` arch dict selected by ``MODEL.RESTV2.NAME`` and ``.ARCH``."""
    return _arch(cfg.MODEL.RESTV2, "restv2", "MODEL.RESTV2")


def rest_arch_from_cfg(cfg: CN) -> Dict:
    """The core ``ResTv1`` arch dict selected by ``MODEL.REST.NAME`` and ``.ARCH``."""
    return _arch(cfg.MODEL.REST, "restv1", "MODEL.REST")
