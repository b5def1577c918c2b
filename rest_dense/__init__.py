"""rest_dense: ResTv2 / ResTv1 backbones for dense prediction.

Importing the package imports PyTorch only. The framework adapters register themselves
when imported: ``import rest_dense.mm`` (MMDetection / MMSegmentation; configs say
``custom_imports=dict(imports=['rest_dense.mm'], allow_failed_imports=False)``) and
``import rest_dense.d2`` (detectron2).
"""
from . import _moved
from .models import ResTv1, ResTv2, create_model, list_models, load_checkpoint
from .version import __version__

_moved.install()
__getattr__ = _moved.module_getattr(__name__)  # old submodule names

__all__ = ["ResTv2", "ResTv1", "create_model", "list_models", "load_checkpoint", "__version__"]
