"""The table of named ResT variants: :func:`create_model` and :func:`list_models`.

Canonical names are ``restv2_{tiny,small,base,large}`` and ``restv1_{lite,small,base,large}``;
the released detectron2 spelling of ResTv1 (``rest_small`` ...) is accepted as an alias.
Each model module registers its own variants from its arch table, so the names, the
architectures and the classes have a single source.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

__all__ = ["ModelEntry", "register_model", "create_model", "list_models", "canonical_name",
           "get_model_entry"]


@dataclass(frozen=True)
class ModelEntry:
    """One registered variant.

    Args:
        name (str): canonical name, e.g. ``'restv2_tiny'``.
        family (str): ``'restv2'`` or ``'restv1'``.
        arch (str): the variant's key in its family's arch table, e.g. ``'tiny'``.
        cls (type): the model class; ``cls(arch=arch, **kwargs)`` builds it.
        attn_modes (tuple[str]): attention modes the family supports.
        aliases (tuple[str]): other accepted spellings.
    """

    name: str
    family: str
    arch: str
    cls: Callable[..., nn.Module]
    attn_modes: Tuple[str, ...] = ("global",)
    aliases: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def arch_spec(self) -> Dict[str, Any]:
        """The architecture dict (``embed_dims``, ``num_heads``, ``depths``, ...)."""
        return dict(self.cls.ARCHS[self.arch])


_ENTRIES: Dict[str, ModelEntry] = {}
_ALIASES: Dict[str, str] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add a variant to the table.

    Names and aliases are looked up case-insensitively (:func:`canonical_name`), so they
    must be lower case, stripped, non-empty and new; ``entry.arch`` must be a key of
    ``entry.cls.ARCHS``.

    Raises:
        ValueError: a name or alias breaks these rules, or the arch is unknown.
    """
    for key in (entry.name, *entry.aliases):
        if not isinstance(key, str) or not key or key != key.strip().lower():
            raise ValueError(f"model name {key!r}: names and aliases are looked up in lower "
                             f"case; register {str(key).strip().lower()!r}")
        if key in _ENTRIES or key in _ALIASES:
            raise ValueError(f"model name {key!r} is already registered")
    if len({entry.name, *entry.aliases}) != 1 + len(entry.aliases):
        raise ValueError(f"model {entry.name!r}: an alias repeats a name")
    archs = getattr(entry.cls, "ARCHS", None)
    if archs is not None and entry.arch not in archs:
        raise ValueError(f"model {entry.name!r}: unknown arch {entry.arch!r} of "
                         f"{getattr(entry.cls, '__name__', entry.cls)}; choose one of "
                         f"{', '.join(archs)}")
    _ENTRIES[entry.name] = entry
    for alias in entry.aliases:
        _ALIASES[alias] = entry.name
    return entry


def canonical_name(name: str) -> str:
    """The canonical spelling of a variant name or alias (case-insensitive).

    Raises:
        ValueError: the name is unknown; the message lists the known names.
    """
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _ENTRIES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


def get_model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of a name or alias."""
    return _ENTRIES[canonical_name(name)]


def list_models(pattern: str = "*", family: Optional[str] = None) -> List[str]:
    """Canonical names of the registered variants, sorted by family then size.

    Args:
        pattern: shell-style filter, e.g. ``'restv2_*'``. Default: every model.
        family: only this family (``'restv2'`` / ``'restv1'``). Default: all.
    """
    names = [n for n, e in _ENTRIES.items()
             if fnmatch.fnmatch(n, pattern.lower()) and (family is None or e.family == family)]
    return names  # insertion order: families and sizes as registered


def create_model(name: str, pretrained: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Build a registered variant.

    Args:
        name: canonical name or alias (``'restv2_tiny'``, ``'rest_small'``, ...).
        pretrained: optional checkpoint to load (see :func:`rest_dense.models.load_checkpoint`).
        **kwargs: constructor arguments of the family's class (``out_indices``,
            ``drop_path_rate``, ``attn_mode``, ``window_size``, ``frozen_stages``, ...).

    Returns:
        The backbone module.

    Raises:
        ValueError: unknown name, or an attention mode the family does not have.
    """
    entry = get_model_entry(name)
    if "arch" in kwargs:
        raise TypeError(f"create_model({name!r}) fixes the arch; build {entry.cls.__name__} "
                        "directly for a custom one")
    attn_mode = kwargs.get("attn_mode", "global")
    if attn_mode not in entry.attn_modes:
        raise ValueError(f"{entry.name} supports attn_mode {', '.join(entry.attn_modes)}; "
                         f"got {attn_mode!r}")
    if entry.attn_modes == ("global",):
        kwargs.pop("attn_mode", None)
    return entry.cls(arch=entry.arch, pretrained=pretrained, **kwargs)


def registered_archs(family: str) -> Mapping[str, str]:
    """``{arch key: canonical name}`` of one family (for config keys naming variants)."""
    return {e.arch: n for n, e in _ENTRIES.items() if e.family == family}
