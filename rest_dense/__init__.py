"""rest_dense: ResTv2 / ResTv1 backbones for dense prediction.

Importing the package registers the backbones with whichever of MMDetection,
MMSegmentation and detectron2 are installed; the model core in
:mod:`rest_dense.models` depends on PyTorch only.
"""
from importlib.util import find_spec

from .models import ResTv1, ResTv2, load_checkpoint

# Framework registrations, only for the frameworks that are installed; an error inside
# an installed framework's adapter is raised, not hidden.
if find_spec("mmengine") is not None and (find_spec("mmdet") or find_spec("mmseg")):
    from . import mm  # noqa: F401  (MMDetection / MMSegmentation)
if find_spec("detectron2") is not None:
    from . import d2  # noqa: F401  (detectron2)

__version__ = "0.1.0"
__all__ = ["ResTv2", "ResTv1", "load_checkpoint", "__version__"]
