"""Old module paths and moved functions of the package, kept working with a
:class:`DeprecationWarning`.

Modules were renamed by what they do (for example ``rest_dense.trust`` became
:mod:`rest_dense.safe_load`). Importing an old path that maps to one module gives that very
module (so patching through the old path patches the real code); an old module that was
split gives a stand-in whose attributes are looked up in each new home. Old submodules are
also reachable as attributes of their package (``rest_dense.models.checkpoint``).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any, Callable, Dict, Tuple

#: old module path -> the module(s) that now hold its names, searched in this order
MOVED_MODULES: Dict[str, Tuple[str, ...]] = {
    "rest_dense.trust": ("rest_dense.safe_load",),
    "rest_dense.checkpointing": ("rest_dense.run_files", "rest_dense.utils"),
    "rest_dense.model_checkpoint": ("rest_dense.checkpoint_reader",),
    "rest_dense.models.checkpoint": ("rest_dense.models.pretrained",),
    "rest_dense.export": ("rest_dense.deploy.backbone_onnx",),
    "rest_dense.deploy.benchmark": ("rest_dense.deploy.latency",),
    "rest_dense.deploy.onnx_export": ("rest_dense.deploy.model_onnx",),
    "rest_dense.deploy.checkpoints": ("rest_dense.checkpoint_reader",),
    "rest_dense.d2.checkpoint": ("rest_dense.d2.checkpointer",),
    "rest_dense.mm.trusted_checkpoints": ("rest_dense.mm.safe_load",),
    "rest_dense.mm.checkpointing": ("rest_dense.mm.run_files", "rest_dense.mm.schedule",
                                    "rest_dense.mm.utils"),
}

#: names that changed along with their module: old module -> {old name: new name}
RENAMED: Dict[str, Dict[str, str]] = {
    "rest_dense.deploy.checkpoints": {"read_model_checkpoint": "read_for_deployment"},
}

#: functions that moved out of a module that still exists: (module, name) -> new module
MOVED_FUNCTIONS: Dict[Tuple[str, str], str] = {
    ("rest_dense.benchmark", "format_markdown"): "rest_dense.commands.bench",
    ("rest_dense.benchmark", "markdown_document"): "rest_dense.commands.bench",
    ("rest_dense.benchmark", "plot_rows"): "rest_dense.commands.bench",
    ("rest_dense.neck_bench", "format_neck_table"): "rest_dense.commands.bench",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated: import {new}", DeprecationWarning, stacklevel=3)


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, targets: Tuple[str, ...]):
        self.targets = targets

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module) -> None:
        old = module.__name__
        warnings.warn(f"{old} is deprecated: import {' / '.join(self.targets)}",
                      DeprecationWarning, stacklevel=2)
        targets = [importlib.import_module(t) for t in self.targets]
        renamed = RENAMED.get(old, {})
        if len(targets) == 1 and not renamed:
            # the import system takes what sys.modules holds after this: the module itself
            sys.modules[old] = targets[0]
            return

        def __getattr__(name: str):
            for target in targets:
                if hasattr(target, renamed.get(name, name)):
                    return getattr(target, renamed.get(name, name))
            raise AttributeError(f"module {old!r} (now {self.targets[0]}) has no attribute "
                                 f"{name!r}")

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]
        module.__all__ = [n for t in targets for n in getattr(t, "__all__", ())] + list(renamed)


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(MOVED_MODULES[fullname]))


def install() -> None:
    """Put the finder of old module paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def old_attribute(module: str, name: str) -> Any:
    """An old submodule of package ``module`` or a function moved out of ``module``, for
    the module's ``__getattr__``; ``AttributeError`` for anything else."""
    if f"{module}.{name}" in MOVED_MODULES:
        return importlib.import_module(f"{module}.{name}")
    new = MOVED_FUNCTIONS.get((module, name))
    if new is not None:
        _warn(f"{module}.{name}", f"{new}.{name}")
        return getattr(importlib.import_module(new), name)
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


def module_getattr(module: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that serves :func:`old_attribute`."""
    return lambda name: old_attribute(module, name)
