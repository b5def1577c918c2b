"""Old module paths of the package, kept importable with a :class:`DeprecationWarning`.

Modules were renamed by what they do (for example ``rest_dense.trust`` became
:mod:`rest_dense.safe_load`). Importing an old path gives a stand-in module whose attributes
are looked up in the new module(s); the warning names the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Dict, Tuple

#: old module path -> the module(s) that now hold its names, searched in this order
MOVED_MODULES: Dict[str, Tuple[str, ...]] = {
    "rest_dense.trust": ("rest_dense.safe_load",),
    "rest_dense.checkpointing": ("rest_dense.run_files", "rest_dense.utils"),
    "rest_dense.model_checkpoint": ("rest_dense.checkpoint_reader",),
    "rest_dense.models.checkpoint": ("rest_dense.models.pretrained",),
    "rest_dense.export": ("rest_dense.deploy.backbone_onnx",),
    "rest_dense.deploy.benchmark": ("rest_dense.deploy.latency",),
    "rest_dense.deploy.onnx_export": ("rest_dense.deploy.model_onnx",),
    "rest_dense.d2.checkpoint": ("rest_dense.d2.checkpointer",),
    "rest_dense.mm.trusted_checkpoints": ("rest_dense.mm.safe_load",),
    "rest_dense.mm.checkpointing": ("rest_dense.mm.run_files", "rest_dense.mm.schedule",
                                    "rest_dense.mm.utils"),
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, targets: Tuple[str, ...]):
        self.targets = targets

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module) -> None:
        warnings.warn(f"{module.__name__} is deprecated: import {' / '.join(self.targets)}",
                      DeprecationWarning, stacklevel=2)
        targets = [importlib.import_module(t) for t in self.targets]

        def __getattr__(name: str):
            for target in targets:
                if hasattr(target, name):
                    return getattr(target, name)
            raise AttributeError(f"module {module.__name__!r} (now {self.targets[0]}) has no "
                                 f"attribute {name!r}")

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(MOVED_MODULES[fullname]))


def install() -> None:
    """Put the finder of old module paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
