"""Pure-PyTorch ResT backbones: importing this imports no detection/segmentation framework."""
from .base import STAGE_STRIDES, ConfigWarning, FeatureInfo
from .pretrained import (CheckpointError, CheckpointFormatError, CheckpointMismatchError,
                         CheckpointValueError, LoadReport, ModelCheckReport,
                         check_model_checkpoint, find_backbone, load_checkpoint, matching_keys,
                         normalize_state_dict, read_state_dict, rename_d2_norm_keys)
from .layers import window_partition, window_unpartition
from .registry import ModelEntry, canonical_name, create_model, get_model_entry, list_models
from .restv2 import ATTN_MODES, DEFAULT_WINDOW_SIZE, RESTV2_ARCHS, ResTv2
from .restv1 import RESTV1_ARCHS, ResTv1
from .fpn import FPN
from .vt_fpn import FilterTokenizer, Projector, RecurrentTokenizer, TokenTransformer, VTFPN
from .._moved import module_getattr as _module_getattr

__getattr__ = _module_getattr(__name__)  # old submodule names (rest_dense._moved)

__all__ = [
    "ResTv2", "ResTv1", "RESTV2_ARCHS", "RESTV1_ARCHS", "ATTN_MODES", "DEFAULT_WINDOW_SIZE",
    "STAGE_STRIDES", "FeatureInfo", "ConfigWarning", "create_model", "list_models", "canonical_name",
    "get_model_entry", "ModelEntry", "load_checkpoint", "read_state_dict", "normalize_state_dict",
    "rename_d2_norm_keys", "matching_keys", "LoadReport", "CheckpointError",
    "CheckpointFormatError", "CheckpointMismatchError", "CheckpointValueError",
    "check_model_checkpoint", "ModelCheckReport", "find_backbone",
    "window_partition", "window_unpartition",
    "FPN", "VTFPN", "FilterTokenizer", "RecurrentTokenizer", "TokenTransformer", "Projector",
]
