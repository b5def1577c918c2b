"""Pure-PyTorch ResT backbones (no detection/segmentation framework imports here)."""
from .checkpoint import CheckpointMismatchError, LoadReport, load_checkpoint, normalize_state_dict, read_state_dict
from .layers import window_partition, window_unpartition
from .restv1 import RESTV1_ARCHS, ResTv1
from .restv2 import ATTN_MODES, RESTV2_ARCHS, ResTv2

__all__ = [
    "ResTv2", "ResTv1", "RESTV2_ARCHS", "RESTV1_ARCHS", "ATTN_MODES", "load_checkpoint",
    "read_state_dict", "normalize_state_dict", "LoadReport", "CheckpointMismatchError",
    "window_partition", "window_unpartition",
]
