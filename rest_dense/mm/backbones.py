"""OpenMMLab-facing ResT backbones: the core models plus ``init_cfg`` handling.

The classes here only translate between mmengine's conventions and the pure-PyTorch
core in :mod:`rest_dense.models`: every architectural argument goes straight to the
core, and ``init_cfg=dict(type='Pretrained', ...)`` is served by the core's
:func:`~rest_dense.models.load_checkpoint` (``weights_only=True`` by default), so any
released wrapping of the weights (ImageNet, mmseg, detectron2) loads unchanged.
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Union

from mmengine.logging import print_log
from mmengine.model import BaseModule, initialize

from ..models import CheckpointError, LoadReport, ResTv1, ResTv2, load_checkpoint
from ..models.base import check_flag
from ..models.pretrained import read_state_dict

__all__ = ["MMResTv2", "MMResTv1", "load_pretrained_cfg"]

InitCfg = Union[Dict[str, Any], List[Dict[str, Any]], None]

_PRETRAINED_KEYS = {"type", "checkpoint", "prefix", "map_location", "weights_only", "strict"}


def _is_pretrained(cfg: Mapping) -> bool:
    return cfg.get("type") in ("Pretrained", "PretrainedInit")


def _read_source(checkpoint: str, map_location: str, weights_only: bool):
    """Local path -> the path; http(s) URL -> the loaded object (downloaded once into
    torch.hub's cache, by rank 0 first when running distributed)."""
    if checkpoint.startswith(("http://", "https://")):
        from mmengine.dist import barrier, get_dist_info
        from torch.hub import load_state_dict_from_url

        def fetch():
            return load_state_dict_from_url(checkpoint, map_location=map_location,
                                            weights_only=weights_only)

        rank, world_size = get_dist_info()
        if world_size == 1:
            return fetch()
        obj = fetch() if rank == 0 else None
        barrier()
        return obj if rank == 0 else fetch()
    path = os.path.expanduser(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint not found: {checkpoint!r}")
    return path


def load_pretrained_cfg(model, cfg: Mapping) -> LoadReport:
    """Load weights into a ResT backbone as described by a ``Pretrained`` init config.

    Args:
        model: a ResT backbone (core or adapter).
        cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix=None,
            map_location='cpu', weights_only=True, strict=False)``. ``prefix`` selects
            and strips the keys of one sub-module of a whole-model checkpoint (e.g.
            ``'backbone.'``); without it the core recognises the released wrappings.

    Returns:
        The core's :class:`~rest_dense.models.LoadReport`.

    Raises:
        ValueError: unknown keys in ``cfg`` or a ``prefix`` that matches nothing.
        CheckpointError: the file is no readable checkpoint, belongs to another variant, or
            holds bad values (the same class as the core loader raised, with the path).
    """
    unknown = sorted(set(cfg) - _PRETRAINED_KEYS)
    if unknown:
        raise ValueError(f"unsupported keys {unknown} in Pretrained init_cfg; "
                         f"allowed: {sorted(_PRETRAINED_KEYS)}")
    if not cfg.get("checkpoint"):
        raise ValueError("Pretrained init_cfg needs a 'checkpoint'")
    checkpoint = str(cfg["checkpoint"])
    map_location = cfg.get("map_location") or "cpu"
    weights_only = check_flag(cfg.get("weights_only", True), "Pretrained init_cfg weights_only")
    source = _read_source(checkpoint, map_location, weights_only)

    prefix = cfg.get("prefix")
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        full = read_state_dict(source, weights_only=weights_only, map_location=map_location)
        source = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        if not source:
            raise ValueError(f"no key of {checkpoint!r} starts with prefix {prefix!r}")

    name = type(model).__name__
    try:
        report = load_checkpoint(model, source,
                                 strict=check_flag(cfg.get("strict", False), "Pretrained init_cfg strict"),
                                 weights_only=weights_only, map_location=map_location, log=None)
    except CheckpointError as err:
        raise type(err)(f"{name}: cannot load {checkpoint!r}: {err}") from err

    print_log(f"{name}: loaded {len(report.loaded_keys)} tensors from {checkpoint}",
              logger="current")
    if report.missing_keys:
        print_log(f"{name}: not in the checkpoint, keep their initialisation "
                  f"({len(report.missing_keys)}): {', '.join(report.missing_keys)}",
                  logger="current", level=logging.WARNING)
    if report.unexpected_keys:
        print_log(f"{name}: in the checkpoint but unused ({len(report.unexpected_keys)}): "
                  f"{', '.join(report.unexpected_keys)}", logger="current", level=logging.WARNING)
    if report.dropped_keys:
        print_log(f"{name}: ignored {len(report.dropped_keys)} classifier / non-backbone "
                  "entries of the checkpoint", logger="current")
    return report


def init_cfg_entries(init_cfg: InitCfg, owner: str = "") -> List[Mapping]:
    """The entries of an ``init_cfg`` (a dict, a list of dicts or None), each checked to be
    a dict with a ``'type'``; ``owner`` prefixes the message.

    Raises:
        TypeError: anything else (a checkpoint path given as the string itself too).
    """
    prefix = f"{owner} " if owner else ""
    if isinstance(init_cfg, (str, bytes)):
        raise TypeError(f"{prefix}init_cfg must be a dict or a list of dicts, got the string "
                        f"{init_cfg!r}; a checkpoint is dict(type='Pretrained', "
                        f"checkpoint={init_cfg!r})")
    if init_cfg is not None and not isinstance(init_cfg, (Mapping, list, tuple)):
        raise TypeError(f"{prefix}init_cfg must be a dict or a list of dicts, got {init_cfg!r}")
    cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg or [])
    for cfg in cfgs:
        if not isinstance(cfg, Mapping) or "type" not in cfg:
            raise TypeError(f"{prefix}init_cfg entries must be dicts with a 'type', got {cfg!r}")
    return cfgs


def _check_keys(cls: type, kwargs: Mapping[str, Any]) -> None:
    """Keys the core backbone does not take, named with the likely cause: another
    backbone's settings merged in from a ``_base_`` config (Swin's ``embed_dims``, ...)."""
    core = next(c for c in cls.__mro__ if c in (ResTv2, ResTv1))
    params = inspect.signature(core.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        taken = {k for k in params if k != "self"} | {"init_cfg", "pretrained"}
        raise TypeError(f"{core.__name__} does not take {unknown} (settings of another "
                        f"backbone kept from a _base_ config? replace it with "
                        f"backbone=dict(_delete_=True, type='{core.__name__}', ...)); it takes "
                        f"{sorted(taken)}")


class _InitCfgMixin:
    """Gives a core ResT backbone mmengine's ``init_cfg`` / ``init_weights`` contract.

    Listed first in the bases (``class X(_InitCfgMixin, CoreModel, BaseModule)``): the
    core constructor initialises the weights randomly (``reset_parameters``) and freezes
    ``frozen_stages``; ``BaseModule.__init__`` runs inside it through ``super()``.
    """

    def __init__(self, init_cfg: InitCfg = None, pretrained: Optional[str] = None, **kwargs):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("pass either 'pretrained' or 'init_cfg', not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        cfgs = init_cfg_entries(init_cfg)
        if sum(_is_pretrained(c) for c in cfgs) > 1:
            raise ValueError("init_cfg may hold at most one Pretrained entry")
        _check_keys(type(self), kwargs)
        super().__init__(**kwargs)
        self.init_cfg = copy.deepcopy(init_cfg)

    def init_weights(self) -> None:
        """Random initialisation, then any other ``init_cfg`` initialisers, then the
        ``Pretrained`` checkpoint (which therefore always wins). Runs once: later calls
        only warn, so a pretrained load is never overwritten by a parent module."""
        if self._is_init:
            print_log(f"init_weights of {type(self).__name__} has been called more than once; "
                      "ignored", logger="current", level=logging.WARNING)
            return
        cfgs = [self.init_cfg] if isinstance(self.init_cfg, Mapping) else list(self.init_cfg or [])
        pretrained = [c for c in cfgs if _is_pretrained(c)]
        others = [c for c in cfgs if not _is_pretrained(c)]
        self.reset_parameters()
        if others:
            initialize(self, others)
        if pretrained:
            load_pretrained_cfg(self, pretrained[0])
        self._is_init = True


class MMResTv2(_InitCfgMixin, ResTv2, BaseModule):
    """:class:`~rest_dense.models.ResTv2` for MMDetection / MMSegmentation configs
    (registered there as ``'ResTv2'``).

    Args:
        init_cfg (dict | list[dict], optional): mmengine initialisation config, e.g.
            ``dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny_224.pth')``
            with optional ``prefix``, ``map_location``, ``weights_only`` (default True)
            and ``strict`` (default False). Loaded in :meth:`init_weights`. Default: None.
        pretrained (str, optional): shorthand for a ``Pretrained`` ``init_cfg`` (what
            MMSegmentation's ``EncoderDecoder(pretrained=...)`` passes down). Default: None.
        **kwargs: every other argument of :class:`~rest_dense.models.ResTv2` (``arch``,
            ``out_indices``, ``drop_path_rate``, ``attn_mode``, ``window_size``,
            ``frozen_stages``, ``norm_eval``, ``with_cp``, ...), passed unchanged.
    """


class MMResTv1(_InitCfgMixin, ResTv1, BaseModule):
    """:class:`~rest_dense.models.ResTv1` for MMDetection / MMSegmentation configs
    (registered there as ``'ResTv1'``).

    Args:
        init_cfg (dict | list[dict], optional): as for :class:`MMResTv2`. Default: None.
        pretrained (str, optional): shorthand for a ``Pretrained`` ``init_cfg``. Default: None.
        **kwargs: every other argument of :class:`~rest_dense.models.ResTv1`, unchanged.
    """
