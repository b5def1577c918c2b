"""rest_dense: ResTv2 / ResTv1 backbones for dense prediction.

Importing the package registers the backbones with whichever of MMDetection,
MMSegmentation and detectron2 are installed; the model core in
:mod:`rest_dense.models` depends on PyTorch only.
"""
from .models import ResTv1, ResTv2, load_checkpoint

# Framework registrations; each is skipped when its framework is not importable.
try:
    from . import mm  # noqa: F401  (MMDetection / MMSegmentation)
except ImportError:
    pass
try:
    from . import d2  # noqa: F401  (detectron2)
except ImportError:
    pass

__version__ = "0.1.0"
__all__ = ["ResTv2", "ResTv1", "load_checkpoint", "__version__"]
