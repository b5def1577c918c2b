"""Reading a whole-model checkpoint for deployment and checking that it fits the model.

The frameworks' own loaders load whatever keys match and only log the rest, so a checkpoint
of another model (another variant, another head, a backbone-only file) silently gives a
partly random detector. :func:`check_checkpoint_fits` turns that into an error that names
the problem (and the backbone variants on both sides).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torch import Tensor, nn

from ..models import CheckpointMismatchError

__all__ = ["read_model_checkpoint", "model_state_dict", "check_checkpoint_fits",
           "CheckpointMismatchError"]

_IGNORED_SUFFIXES = ("num_batches_tracked",)


def read_model_checkpoint(path: Union[str, os.PathLike], trusted: bool = False) -> Dict[str, Any]:
    """Read a whole-model checkpoint with the one reader of every command
    (:func:`rest_dense.model_checkpoint.read_model_checkpoint`: :mod:`rest_dense.trust`'s
    policy, wrappers / DDP / EMA undone, safetensors) in mmengine's layout.

    Args:
        path: ``.pth`` / ``.pt`` / ``.pkl`` / ``.safetensors`` checkpoint.
        trusted: also unpickle in full when the restricted loader refuses the file (only for
            the user's own files; :func:`rest_dense.trust.trust` marks it).

    Returns:
        ``{'state_dict': <model keys>, 'meta': ..., ...}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read as a checkpoint.
    """
    from .. import trust as _trust
    from ..model_checkpoint import read_model_checkpoint as _read

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if trusted:
        _trust.trust(path)
    try:
        return _read(path, map_location="cpu").to_mmengine()
    except (FileNotFoundError, ValueError, _trust.UntrustedCheckpointError):
        raise
    except Exception as e:  # corrupt / foreign files: name the file
        raise ValueError(f"checkpoint {path!r} cannot be read: {type(e).__name__}: {e}") from e


def model_state_dict(checkpoint: Any) -> Dict[str, Tensor]:
    """The model weights inside a checkpoint, as the one reader normalises them
    (:func:`rest_dense.model_checkpoint.normalize_model_checkpoint`)."""
    from ..model_checkpoint import normalize_model_checkpoint

    try:
        return normalize_model_checkpoint(checkpoint).state_dict
    except ValueError as e:
        raise ValueError(f"the checkpoint holds no model weights: {e}") from e


def _backbone_prefix(model: nn.Module) -> Optional[str]:
    from ..models.base import ResTBase

    for name, module in model.named_modules():
        if isinstance(module, ResTBase):
            return name + "." if name else ""
    return None


def _variant_note(model: nn.Module, state_dict: Mapping[str, Tensor]) -> str:
    """``'; the checkpoint's backbone is X, the model's Y'`` when both are ResT and differ."""
    from ..models.checkpoint import describe_model, infer_arch, rename_d2_norm_keys

    prefix = _backbone_prefix(model)
    if prefix is None:
        return ""
    backbone = dict(model.named_modules())[prefix[:-1]] if prefix else model
    part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    part = rename_d2_norm_keys(part)
    guess = infer_arch(part)
    theirs = str(guess) if guess.family else "absent"
    ours = describe_model(backbone)
    if theirs == ours:
        return ""
    return f"; its backbone is {theirs}, the config's {ours}"


def _short(keys: List[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_checkpoint_fits(model: nn.Module, state_dict: Mapping[str, Tensor], what: str,
                          for_config: str = "the config") -> Tuple[List[str], List[str]]:
    """Check that a whole-model checkpoint covers ``model`` with the right shapes.

    Args:
        model: the model built from the config.
        state_dict: the checkpoint's weights in the model's key names
            (:func:`model_state_dict`; detectron2's ``norm_i.0`` renamed).
        what: how to name the checkpoint in messages (its path).
        for_config: how to name the config in messages.

    Returns:
        ``(missing, unexpected)`` key lists (``missing`` is always empty on return).

    Raises:
        CheckpointMismatchError: tensors of the model are missing from the checkpoint, or
            have other shapes there; the message names a few and the backbone variants.
    """
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(_IGNORED_SUFFIXES)}
    theirs = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(k for k in own if k not in theirs)
    unexpected = sorted(k for k in theirs if k not in own)
    shapes = sorted(k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape))
    if not missing and not shapes:
        # the rules of `rest-dense test` too: the backbone's own checks (weights of another
        # attention mode such as cwin's convs unused, NaN / integer values) refuse
        from ..models import check_model_checkpoint

        check_model_checkpoint(model, state_dict, source=f"checkpoint {what}", complete=True)
        return [], unexpected
    n = len(own)
    parts = []
    if missing and len(missing) == n:
        parts.append(f"none of the model's {n} tensors is in it (e.g. {_short(missing, 3)})")
    elif missing:
        parts.append(f"{len(missing)} of the model's {n} tensors are missing ({_short(missing)})")
    if shapes:
        shown = [f"{k} {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:3]]
        parts.append(f"{len(shapes)} tensors have other shapes (checkpoint vs model: "
                     f"{'; '.join(shown)}{', ...' if len(shapes) > 3 else ''})")
    prefix = _backbone_prefix(model)
    if prefix is not None and missing and all(not k.startswith(prefix) for k in missing) and \
            len(theirs) and all(k.startswith(prefix) for k in theirs):
        parts.append("it holds backbone weights only; inference needs a trained detector / "
                     "segmenter checkpoint")
    raise CheckpointMismatchError(
        f"checkpoint {what} is not a checkpoint of the model in {for_config}: "
        + "; ".join(parts) + _variant_note(model, theirs))
