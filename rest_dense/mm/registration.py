"""Registering our modules in mmengine registries without replacing another package's."""
from __future__ import annotations

__all__ = ["register_once"]


def register_once(registry, name: str, cls: type) -> None:
    """Register ``cls`` as ``name`` in an mmengine registry unless it is there already
    (re-imports, reloads); refuse to replace another package's module of the same name.

    Raises:
        KeyError: ``name`` is registered there by another module.
    """
    present = registry.module_dict.get(name)
    if present is not None:
        if present.__module__ == cls.__module__ and present.__qualname__ == cls.__qualname__:
            if present is not cls:  # the module was reloaded: keep the registry current
                registry.register_module(name=name, module=cls, force=True)
            return
        raise KeyError(f"{registry.name} registry of {registry.scope!r} already holds {name!r} "
                       f"from {present.__module__}; rest_dense will not replace it")
    registry.register_module(name=name, module=cls)
