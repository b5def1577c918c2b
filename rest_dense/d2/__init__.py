"""detectron2 integration of the ResT backbones.

Importing this package registers in detectron2's ``BACKBONE_REGISTRY``:
``build_restv2_backbone``, ``build_restv2_fpn_backbone``,
``build_retinanet_restv2_fpn_backbone``, ``build_restv2_vt_fpn_backbone`` (ResTv2) and
``build_rest_backbone``, ``build_rest_fpn_backbone``, ``build_retinanet_rest_fpn_backbone``,
``build_restv1_vt_fpn_backbone`` (= ``build_rest_vt_fpn_backbone``) (ResTv1). The VT-FPN
builders (:mod:`rest_dense.d2.vt_fpn`) read ``MODEL.VT_FPN`` and emit ``p2..p5`` for
``SemanticSegmentor`` + ``SemSegFPNHead``.

Typical use::

    from detectron2.config import get_cfg
    from rest_dense.d2 import add_restv2_config, add_rest_config

    cfg = get_cfg()
    add_restv2_config(cfg)
    add_rest_config(cfg)
    cfg.merge_from_file("configs/detectron2/mask_rcnn_restv2_tiny_3x.yaml")

Training and evaluation: :class:`RestTrainer` (:mod:`rest_dense.d2.engine`) and
:func:`launch_main` (:mod:`rest_dense.d2.launch`, what ``rest-dense train`` / ``test`` run),
imported on first use.
"""
from .backbone import (D2ResTv1, D2ResTv2, build_rest_backbone, build_rest_fpn_backbone,
                       build_restv2_backbone, build_restv2_fpn_backbone,
                       build_retinanet_rest_fpn_backbone, build_retinanet_restv2_fpn_backbone,
                       freeze_at_to_frozen_stages)
from .checkpointer import RestDetectionCheckpointer, classify_checkpoint, find_rest_backbone
from .config import (add_rest_config, add_rest_solver_config, add_restv2_config, add_vt_fpn_config,
                     rest_arch_from_cfg, restv2_arch_from_cfg)
from .data import register_toy_datasets, register_toy_sem_seg_datasets
from .vt_fpn import (D2VTFPN, build_rest_vt_fpn_backbone, build_restv1_vt_fpn_backbone,
                     build_restv2_vt_fpn_backbone)
from .solver import build_adamw, build_optimizer, with_full_model_gradient_clipping

__all__ = [
    "add_restv2_config", "add_rest_config", "add_rest_solver_config", "restv2_arch_from_cfg",
    "rest_arch_from_cfg", "D2ResTv2", "D2ResTv1", "build_restv2_backbone",
    "build_restv2_fpn_backbone", "build_retinanet_restv2_fpn_backbone", "build_rest_backbone",
    "build_rest_fpn_backbone", "build_retinanet_rest_fpn_backbone", "freeze_at_to_frozen_stages",
    "RestDetectionCheckpointer", "classify_checkpoint", "find_rest_backbone",
    "register_toy_datasets", "register_toy_sem_seg_datasets", "add_vt_fpn_config", "D2VTFPN",
    "build_restv2_vt_fpn_backbone", "build_restv1_vt_fpn_backbone", "build_rest_vt_fpn_backbone",
    "build_optimizer", "build_adamw", "with_full_model_gradient_clipping",
    "RestTrainer", "setup_yaml_config", "setup_lazy_config", "launch_main",
]

# engine / launch import detectron2's trainers and evaluators: loaded on first access
_LAZY = {"RestTrainer": "engine", "setup_yaml_config": "engine", "setup_lazy_config": "engine",
         "launch_main": "launch"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    from .._moved import old_attribute

    return old_attribute(__name__, name)
