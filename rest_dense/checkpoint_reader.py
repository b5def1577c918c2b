"""One reader for whole-model checkpoints: what is checked is what is loaded.

Every path that hands a detector's / segmenter's checkpoint to a framework goes through
:func:`read_model_checkpoint` (a file) or :func:`normalize_model_checkpoint` (an object
already read): ``rest-dense test``, ``infer``, ``export-model``, ``train --resume`` and
``load_from`` (mmengine reads local files through
:func:`rest_dense.mm.safe_load.load_from_local`, which returns
:meth:`ModelCheckpoint.to_mmengine` of this reader), a whole model's ``init_cfg``
``Pretrained`` (also through mmengine's loader), and detectron2's
:class:`~rest_dense.d2.checkpointer.RestDetectionCheckpointer`. The check
(:func:`rest_dense.models.check_model_checkpoint`) sees exactly the state dict the framework
then loads.

What the reader accepts (and undoes), in this order:

* files by their content (:func:`rest_dense.models.pretrained.checkpoint_file_kind`):
  ``torch.save`` zip / legacy files under :mod:`rest_dense.safe_load`'s policy, safetensors,
  plain pickles (detectron2 ``.pkl``) with the restricted unpickler; anything else is refused
  naming what the file is;
* the wrappers ``state_dict`` (mmengine, Lightning), ``model`` (detectron2, ImageNet
  releases), ``model_state`` (pycls), nested once more; a file holding only mmengine's
  ``ema_state_dict`` uses it (noted);
* an extracted mmengine EMA state dict (``ExponentialMovingAverage.state_dict()``: ``steps``
  and ``module.``-prefixed keys): ``steps`` dropped, prefix removed (noted);
* MMDetection 2.x EMA buffers (``ema_<name>`` keys without dots) dropped (noted);
* a ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix on every key removed;
* numpy arrays (``.pkl``) become tensors; fp16 / bf16 tensors are kept (the frameworks cast
  them to the parameters' dtype on loading).

The other top-level entries (``meta``, ``optimizer``, ``message_hub``, ``param_schedulers``,
``ema_state_dict``, detectron2's ``iteration`` / ``scheduler``) are kept in
:attr:`ModelCheckpoint.extra`, so ``--resume`` continues from the same file. The layout's
framework (:attr:`ModelCheckpoint.framework`) names the other toolbox's files in errors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from torch import nn

from .models.pretrained import (CheckpointFormatError, CheckpointMismatchError,
                                checkpoint_file_kind, describe_file, find_backbone)

__all__ = ["ModelCheckpoint", "read_model_checkpoint", "normalize_model_checkpoint",
           "read_checkpoint_object", "framework_of", "FRAMEWORK_NAMES", "check_checkpoint",
           "read_for_deployment", "model_state_dict", "check_checkpoint_fits"]

PathLike = Union[str, "os.PathLike[str]"]

#: how messages name the layouts' frameworks
FRAMEWORK_NAMES = {"mmengine": "MMDetection / MMSegmentation (mmengine)",
                   "detectron2": "detectron2"}

_MM_TOP = ("message_hub", "param_schedulers", "ema_state_dict")
_D2_TOP = ("iteration", "scheduler", "__author__", "trainer")
_D2_KEYS = ("backbone.bottom_up.", "proposal_generator.", "roi_heads.", "sem_seg_head.")
_MM_KEYS = ("rpn_head.", "roi_head.", "bbox_head.", "decode_head.", "auxiliary_head.",
            "data_preprocessor.")


@dataclass
class ModelCheckpoint:
    """A whole-model checkpoint as the frameworks will load it.

    Attributes:
        state_dict: the model's tensors, keys as the model names them (wrappers and
            prefixes removed).
        extra: the checkpoint's other top-level entries (``meta``, ``optimizer``, ...).
        source: how messages name it (``"checkpoint '/path/iter_8.pth'"``).
        layout: what was found, e.g. ``"mmengine ('state_dict')"``, ``"bare state dict"``.
        framework: ``'mmengine'``, ``'detectron2'`` or ``None`` (not recognisable).
        notes: what the reader changed (prefixes removed, EMA entries dropped).
    """

    state_dict: Dict[str, Tensor]
    extra: Dict[str, Any] = field(default_factory=dict)
    source: str = "checkpoint"
    layout: str = ""
    framework: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def to_mmengine(self) -> Dict[str, Any]:
        """``{'state_dict': ..., **extra}``: what mmengine's runner loads and resumes from."""
        out = {k: v for k, v in self.extra.items() if k != "model"}
        out["state_dict"] = self.state_dict
        return out

    def to_detectron2(self) -> Dict[str, Any]:
        """``{'model': ..., **extra}``: what detectron2's checkpointer loads."""
        out = {k: v for k, v in self.extra.items() if k != "state_dict"}
        out["model"] = self.state_dict
        return out

    def describe(self) -> str:
        """``"<layout>[, <framework> layout][; <notes>]"`` for messages."""
        text = self.layout
        if self.framework:
            text += f", {FRAMEWORK_NAMES[self.framework]} layout"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text


def framework_of(top: Mapping[str, Any], keys: Any = ()) -> Optional[str]:
    """``'mmengine'`` / ``'detectron2'`` from a checkpoint's top-level entries and model keys,
    ``None`` when neither shows."""
    meta = top.get("meta")
    if any(k in top for k in _MM_TOP) or (isinstance(meta, Mapping) and any(
            k in meta for k in ("mmengine_version", "mmdet_version", "mmseg_version",
                                "dataset_meta", "experiment_name"))):
        return "mmengine"
    if any(k in top for k in _D2_TOP):
        return "detectron2"
    keys = list(keys)
    if any(k.startswith(_D2_KEYS) for k in keys):
        return "detectron2"
    if any(k.startswith(_MM_KEYS) for k in keys):
        return "mmengine"
    return None


def read_checkpoint_object(path: PathLike, map_location: Any = "cpu", *,
                           trusted: Optional[bool] = None, log: Any = None) -> Any:
    """The object a checkpoint file holds, read by its content under
    :mod:`rest_dense.safe_load`'s policy (torch files, safetensors, plain pickles).

    Raises:
        FileNotFoundError / IsADirectoryError: no such file.
        CheckpointFormatError: not a checkpoint (says what the file is).
        UntrustedCheckpointError: needs full unpickling and is not trusted.
    """
    from . import safe_load

    path = safe_load.checkpoint_file(path)
    kind = checkpoint_file_kind(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location or "cpu"))
        except SafetensorError as e:
            raise CheckpointFormatError(f"{describe_file(path)} that cannot be read "
                                        f"(damaged or truncated?): {e}") from e
    if kind == "pickle":
        return safe_load.load_pickle_file(path, trusted=trusted, log=log)
    if kind in ("torch-zip", "torch-legacy"):
        return safe_load.load_checkpoint_file(path, map_location=map_location, trusted=trusted,
                                           log=log)
    raise CheckpointFormatError(f"{describe_file(path)}: not a checkpoint, rest_dense cannot "
                                "read it as one")


def _tensors(mapping: Mapping[str, Any]) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    for k, v in mapping.items():
        if not isinstance(k, str):
            continue
        if isinstance(v, Tensor):
            out[k] = v
        elif isinstance(v, np.ndarray):
            from .models.pretrained import array_to_tensor

            tensor = array_to_tensor(v)  # 0-d stays 0-d (num_batches_tracked)
            if tensor is not None:
                out[k] = tensor
    return out


def _short(keys: List[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def normalize_model_checkpoint(obj: Any, source: str = "checkpoint") -> ModelCheckpoint:
    """Unwrap and clean a loaded checkpoint object (see the module docstring).

    Args:
        obj: what the file held (a mapping).
        source: how messages name it.

    Raises:
        CheckpointFormatError: not a mapping, or no tensors in it (names the entries found).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{source} holds a {type(obj).__name__}, not a checkpoint "
                                    "(a dict of tensors)")
    top: Dict[str, Any] = dict(obj)
    notes: List[str] = []
    extra: Dict[str, Any] = {}
    layout = "bare state dict"
    inner: Mapping[str, Any] = top
    for _ in range(3):  # a wrapper inside a wrapper ({'model': {'state_dict': ...}})
        if _tensors(inner):
            break
        for key, name in (("state_dict", "mmengine ('state_dict')"),
                          ("model", "detectron2 / ImageNet ('model')"),
                          ("model_state", "pycls ('model_state')")):
            if isinstance(inner.get(key), Mapping):
                if inner is top:
                    extra = {k: v for k, v in top.items() if k != key}
                layout = name if inner is top else f"{layout} > {key!r}"
                inner = inner[key]
                break
        else:
            if inner is top and isinstance(top.get("ema_state_dict"), Mapping):
                extra = {k: v for k, v in top.items() if k != "ema_state_dict"}
                inner = top["ema_state_dict"]
                layout = "mmengine EMA ('ema_state_dict' only)"
                notes.append("the file holds only 'ema_state_dict': its averaged weights are used")
                continue
            break
    sd = _tensors(inner)
    if not sd:
        entries = _short([str(k) for k in inner], 8) or "none"
        raise CheckpointFormatError(f"{source} holds no tensors (entries: {entries}); it is "
                                    "not a model checkpoint")
    if "steps" in sd and len(sd) > 1 and all(k.startswith("module.") for k in sd if k != "steps"):
        steps = sd.pop("steps")
        layout = "mmengine EMA state dict" if layout == "bare state dict" else layout
        notes.append(f"an extracted EMA state dict ('steps'={int(steps.reshape(-1)[0]) if steps.numel() else '?'} "
                     "dropped)")
    ema = [k for k in sd if k.startswith("ema_") and "." not in k]
    if ema and len(ema) < len(sd):
        for k in ema:
            del sd[k]
        notes.append(f"{len(ema)} MMDetection 2.x EMA buffers (ema_*) dropped")
    for prefix, what in (("module.", "DDP"), ("_orig_mod.", "torch.compile")):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            notes.append(f"{what} prefix {prefix!r} removed")
    return ModelCheckpoint(state_dict=sd, extra=extra, source=source, layout=layout,
                           framework=framework_of(extra, sd), notes=notes)


def read_model_checkpoint(path: PathLike, map_location: Any = "cpu", *,
                          trusted: Optional[bool] = None, log: Any = None) -> ModelCheckpoint:
    """Read and normalise a whole-model checkpoint file (:func:`read_checkpoint_object`,
    then :func:`normalize_model_checkpoint`)."""
    path = os.path.expanduser(os.fspath(path))
    obj = read_checkpoint_object(path, map_location, trusted=trusted, log=log)
    return normalize_model_checkpoint(obj, source=f"checkpoint {path!r}")


def _prefix_hint(model_keys: List[str], sd: Mapping[str, Tensor]) -> str:
    """``"; its keys carry the prefix 'x.' ..."`` when the checkpoint's keys match the model's
    once a common first component is removed (or added)."""
    own = set(model_keys)
    heads = {k.split(".", 1)[0] for k in sd if "." in k}
    for head in sorted(heads):
        stripped = {k[len(head) + 1:] for k in sd if k.startswith(head + ".")}
        hits = len(own & stripped)
        if hits >= 0.5 * len(own):
            return (f"; {hits} of the model's entries are in it under the prefix {head + '.'!r} "
                    "(a wrapper's prefix: remove it from the keys)")
    return ""


def check_checkpoint(model: Any, ckpt: ModelCheckpoint, *, complete: bool,
                     expect: Optional[str] = None, purpose: str = "") -> Any:
    """:func:`rest_dense.models.check_model_checkpoint` on the reader's state dict, with the
    real cause in the message when the layout is the other framework's (``expect``) or the
    keys carry an unknown prefix.

    Args:
        model: the whole model (wrappers unwrapped by the check).
        ckpt: from :func:`read_model_checkpoint` / :func:`normalize_model_checkpoint`.
        complete: every entry of the model must be there with its shape (evaluation,
            inference, export, resuming).
        expect: ``'mmengine'`` or ``'detectron2'``: the framework of the config.
        purpose: prepended to messages, e.g. ``"--resume"``.

    Returns:
        The :class:`rest_dense.models.ModelCheckReport`.

    Raises:
        CheckpointMismatchError: naming the real cause.
    """
    from .models.pretrained import check_model_checkpoint

    own_sd = getattr(model, "module", model).state_dict()
    sd = ckpt.state_dict
    missing = [k for k in own_sd if k not in sd]
    if complete and missing and sd and all(
            k in own_sd and tuple(own_sd[k].shape) == tuple(v.shape) for k, v in sd.items()):
        # a part of this very model (every key of it fits): say so, not "another variant"
        lead = f"{purpose}: " if purpose else ""
        raise CheckpointMismatchError(
            f"{lead}{ckpt.source} holds only {len(sd)} of the model's {len(own_sd)} entries "
            f"(all of them fit; missing e.g. {_short(missing)}): a partial or cut-off "
            "checkpoint of this model, which would leave the rest randomly initialised")
    try:
        return check_model_checkpoint(model, ckpt.state_dict, source=ckpt.source,
                                      complete=complete)
    except CheckpointMismatchError as err:
        msg = str(err)
        lead = f"{purpose}: " if purpose else ""
        if expect and ckpt.framework and ckpt.framework != expect:
            # the other framework's key names: what the model check would say of them
            # (another backbone, backbone weights only, ...) is a consequence, not the cause
            to = "d2" if expect == "detectron2" else "mmdet/mmseg"
            raise CheckpointMismatchError(
                f"{lead}{ckpt.source} is a {FRAMEWORK_NAMES[ckpt.framework]} checkpoint, "
                f"but the config is a {FRAMEWORK_NAMES[expect]} config, whose models name "
                "their weights differently: use the file with a config of its own framework, "
                f"or take its backbone over with `rest-dense convert SRC DST --to {to}` "
                "(as pretrained weights: the rest of the model does not carry over)") from err
        own = list(getattr(model, "module", model).state_dict())
        hint = _prefix_hint(own, ckpt.state_dict)
        if purpose == "--resume":
            msg = (f"{msg}. --resume continues the run that wrote the file, with the same "
                   "model: this file is a checkpoint of another model")
        raise CheckpointMismatchError(f"{lead}{msg}{hint}") from err


# ----------------------------------------------------------------- deployment (infer / export-model)
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def read_for_deployment(path: Union[str, os.PathLike], trusted: bool = False) -> Dict[str, Any]:
    """:func:`read_model_checkpoint` for ``infer`` / ``export-model``, in mmengine's layout; with
    ``trusted`` the file is marked trusted first (:func:`rest_dense.safe_load.trust`), so that
    the framework's own loader reads it later too.

    Args:
        path: ``.pth`` / ``.pt`` / ``.pkl`` / ``.safetensors`` checkpoint.
        trusted: also unpickle in full when the restricted loader refuses the file (only for
            the user's own files; :func:`rest_dense.safe_load.trust` marks it).

    Returns:
        ``{'state_dict': <model keys>, 'meta': ..., ...}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read as a checkpoint.
    """
    from . import safe_load

    path = safe_load.checkpoint_file(path)
    if trusted:
        safe_load.trust(path)
    try:
        ckpt = read_model_checkpoint(path, map_location="cpu").to_mmengine()
    except (FileNotFoundError, ValueError, safe_load.UntrustedCheckpointError):
        raise
    except Exception as e:  # corrupt / foreign files: name the file
        raise ValueError(f"checkpoint {path!r} cannot be read: {type(e).__name__}: {e}") from e
    if "meta" in ckpt and not isinstance(ckpt["meta"], Mapping):
        # the frameworks' loaders look names up in it (`'dataset_meta' in meta`)
        raise CheckpointFormatError(f"checkpoint {path!r}: its 'meta' entry is "
                                    f"{type(ckpt['meta']).__name__}, not a dict")
    return ckpt


def model_state_dict(checkpoint: Any) -> Dict[str, Tensor]:
    """The model weights inside a checkpoint, as the one reader normalises them
    (:func:`rest_dense.checkpoint_reader.normalize_model_checkpoint`)."""
    try:
        return normalize_model_checkpoint(checkpoint).state_dict
    except ValueError as e:
        raise ValueError(f"the checkpoint holds no model weights: {e}") from e


def _backbone_prefix(model: nn.Module) -> Optional[str]:
    found = find_backbone(model)
    return None if found is None else found[0]


def _variant_note(model: nn.Module, state_dict: Mapping[str, Tensor]) -> str:
    """``'; the checkpoint's backbone is X, the model's Y'`` when both are ResT and differ."""
    from .models.pretrained import describe_model, infer_arch, rename_d2_norm_keys

    prefix = _backbone_prefix(model)
    if prefix is None:
        return ""
    backbone = dict(model.named_modules())[prefix[:-1]] if prefix else model
    part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    ours = describe_model(backbone)
    if not part:
        # not where this model keeps it: a bare backbone, or another framework's layout
        from .models.pretrained import normalize_state_dict

        guess = infer_arch(rename_d2_norm_keys(normalize_state_dict(state_dict)[0]))
        if not guess.family:
            return "; it holds no ResT backbone"
        which = ("the config's backbone" if str(guess) == ours
                 else f"{guess} (the config's is {ours})")
        return (f"; it holds {which}, but not under {prefix!r} as this model has it: backbone "
                "weights only, or a checkpoint of the other framework (`rest-dense convert` "
                "moves a backbone between the layouts)")
    guess = infer_arch(rename_d2_norm_keys(part))
    theirs = str(guess) if guess.family else "absent"
    if theirs == ours:
        return ""
    return f"; its backbone is {theirs}, the config's {ours}"


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
        from .models.pretrained import check_model_checkpoint

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
