"""Loading released ResT checkpoints in any of their wrappings (pure PyTorch).

Handles ``{"model": ...}`` / ``{"state_dict": ...}`` wrapping, ``module.``,
``backbone.`` and ``backbone.bottom_up.`` prefixes, detectron2's ``norm_i.0.``
spelling of the output norms, and drops the ImageNet classifier head.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["load_checkpoint", "read_state_dict", "normalize_state_dict", "rename_d2_norm_keys",
           "matching_keys", "LoadReport", "CheckpointMismatchError"]

logger = logging.getLogger("rest_dense")

# prefixes tried in this order; the first one that some keys carry selects the backbone
_BACKBONE_PREFIXES = ("backbone.bottom_up.", "backbone.")
_HEAD_PREFIXES = ("head.",)
# detectron2's released spelling of the output norms, at the start or after a prefix
_D2_NORM = re.compile(r"(^|\.)norm_(\d)\.0\.")
# below this fraction of the model's entries found in the checkpoint we refuse to load
MIN_MATCHED_FRACTION = 0.5


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model (shapes differ or almost nothing matches)."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    dropped_keys: List[str] = field(default_factory=list)
    loaded_keys: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded_keys)} tensors"]
        if self.missing_keys:
            parts.append(f"missing in checkpoint ({len(self.missing_keys)}): {_short(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"unused from checkpoint ({len(self.unexpected_keys)}): "
                         f"{_short(self.unexpected_keys)}")
        if self.dropped_keys:
            parts.append(f"dropped (classifier / non-backbone): {len(self.dropped_keys)}")
        return "; ".join(parts)


def _short(keys: List[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def read_state_dict(source: Union[str, os.PathLike, Mapping], weights_only: bool = True,
                    map_location="cpu") -> Dict[str, Tensor]:
    """Read a checkpoint file (or take a mapping) and unwrap ``model`` / ``state_dict``."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            ckpt = load_file(path, device=str(map_location))
        else:
            ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    else:
        ckpt = source
    if not isinstance(ckpt, Mapping):
        raise CheckpointMismatchError(f"checkpoint is a {type(ckpt).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    return {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}


def rename_d2_norm_keys(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``...norm_i.0.weight`` (the released detectron2 spelling) -> ``...norm_i.weight``."""
    return {_D2_NORM.sub(r"\1norm_\2.", k): v for k, v in state_dict.items()}


def matching_keys(own: Mapping[str, Tensor], state_dict: Mapping[str, Tensor],
                  prefix: str = "") -> List[str]:
    """Keys of ``own`` found in ``state_dict`` (under ``prefix``) with the same shape."""
    return [k for k, v in own.items()
            if prefix + k in state_dict and tuple(state_dict[prefix + k].shape) == tuple(v.shape)]


def normalize_state_dict(state_dict: Mapping[str, Tensor]):
    """Strip wrappers' prefixes, rename ``norm_i.0.`` and drop the classifier.

    Returns ``(backbone_state_dict, dropped_keys)``.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    dropped: List[str] = []
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            dropped = [k for k in sd if not k.startswith(prefix)]
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    out = {}
    for k, v in sd.items():
        if k.startswith(_HEAD_PREFIXES):
            dropped.append(k)
        else:
            out[k] = v
    return rename_d2_norm_keys(out), dropped


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping],
                    strict: bool = False, weights_only: bool = True, map_location="cpu",
                    allow_partial: bool = False,
                    log: Optional[logging.Logger] = logger) -> LoadReport:
    """Load a released or converted ResT checkpoint into ``model``.

    Args:
        model: a :class:`ResTv2` / :class:`ResTv1` (or any module with the same names).
        checkpoint: a file path (``.pth``/``.pt``/``.pkl``/``.safetensors``) or a state dict,
            in any of the released wrappings.
        strict: raise if any key is missing or unused.
        weights_only: passed to ``torch.load``; keep True for downloaded files.
        map_location: device for loading.
        allow_partial: accept checkpoints that lack some backbone weights (they keep
            their initialisation); by default only the dense-only layers may be missing.
        log: logger for the report (default: ``logging.getLogger("rest_dense")``);
            ``None`` loads silently (the caller reports from the returned value).

    Returns:
        :class:`LoadReport` with missing, unexpected, dropped and loaded keys.

    Raises:
        CheckpointMismatchError: on any shape mismatch, when fewer than half of the
            model's entries are found, when backbone weights other than the dense-only
            layers are missing (unless ``allow_partial``), or (``strict``) on any
            missing/unused key.
    """
    sd, dropped = normalize_state_dict(read_state_dict(checkpoint, weights_only, map_location))
    own = model.state_dict()

    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise CheckpointMismatchError(
            f"checkpoint does not match {type(model).__name__} (wrong variant?): "
            f"{len(mismatched)} shape mismatches, e.g. {'; '.join(mismatched[:5])}")

    matched = [k for k in own if k in sd]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if len(matched) < MIN_MATCHED_FRACTION * len(own):
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(model).__name__}: only {len(matched)} of its {len(own)} "
            f"entries found (e.g. missing {_short(missing, 5)}; checkpoint has {_short(unexpected, 5)})")
    report = LoadReport(missing, unexpected, dropped, matched)
    if strict and (missing or unexpected):
        raise CheckpointMismatchError(f"strict loading failed: {report.summary()}")
    # only the dense-prediction additions (output norms, cross-window convs) may be absent:
    # released classification checkpoints lack them, everything else must be there
    optional = tuple(getattr(model, "dense_only_prefixes", ()))
    required_missing = [k for k in missing if not k.startswith(optional)]
    if required_missing and not allow_partial:
        raise CheckpointMismatchError(
            f"checkpoint lacks {len(required_missing)} weights of {type(model).__name__}: "
            f"{_short(required_missing, 8)} (unused from checkpoint: {_short(unexpected, 5)}); "
            f"pass allow_partial=True to load it anyway")

    model.load_state_dict({k: sd[k] for k in matched}, strict=False)
    if log is None:
        return report
    log.info("rest_dense: %s", report.summary())
    if missing:
        log.warning("rest_dense: keys not in the checkpoint keep their initialisation: %s",
                    _short(missing))
    return report
