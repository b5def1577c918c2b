"""Loading released ResT checkpoints in any of their wrappings (pure PyTorch).

Handles ``{"model": ...}`` / ``{"state_dict": ...}`` wrapping, ``module.``,
``backbone.`` and ``backbone.bottom_up.`` prefixes, detectron2's ``norm_i.0.``
spelling of the output norms, and drops the ImageNet classifier head.

The loader never loads the wrong weights silently:

* a file is identified by its first bytes before it is read, so an empty, text, JSON,
  HTML, Git LFS pointer, truncated or misnamed file gives a :class:`CheckpointFormatError`
  that says what the file is;
* a checkpoint of another variant (other widths, other depths, other family) raises
  :class:`CheckpointMismatchError` naming the model's variant and the checkpoint's,
  which is inferred from the checkpoint's shapes and matched against the registry;
* NaN/inf values, negative BatchNorm variances and integer tensors for floating-point
  parameters raise :class:`CheckpointValueError` naming the tensors.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import safe_load
from ..safe_load import (CheckpointError, CheckpointFormatError, _describe_file,
                         checkpoint_file_kind, describe_file)
from .base import ResTBase, set_checkpoint_loader

__all__ = ["load_checkpoint", "read_state_dict", "normalize_state_dict", "rename_d2_norm_keys",
           "matching_keys", "checkpoint_file_kind", "infer_arch", "describe_model", "LoadReport",
           "ArchGuess", "CheckpointError", "CheckpointFormatError", "CheckpointMismatchError",
           "CheckpointValueError", "check_model_checkpoint", "ModelCheckReport", "find_backbone", "describe_file"]

logger = logging.getLogger("rest_dense")

# prefixes tried in this order; the first one that some keys carry selects the backbone
# (``bottom_up.``: a detectron2 FPN's own state dict, or a model file under prefix 'backbone.')
_BACKBONE_PREFIXES = ("backbone.bottom_up.", "backbone.", "bottom_up.")
_HEAD_PREFIXES = ("head.",)
# detectron2's released spelling of the output norms, at the start or after a prefix
_D2_NORM = re.compile(r"(^|\.)norm_(\d)\.0\.")
_BLOCK_KEY = re.compile(r"^stage([1-4])\.(\d+)\.")
# below this fraction of the model's entries found in the checkpoint we refuse to load
MIN_MATCHED_FRACTION = 0.5

PathOrStateDict = Union[str, os.PathLike, Mapping]


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the model: another variant, shapes differ, weights
    missing or unused. The message names the model's variant and the checkpoint's."""


class CheckpointValueError(CheckpointError):
    """Tensors that would be loaded hold NaN/inf, negative BatchNorm variances, or an
    integer dtype where the model has a floating-point tensor; the message names them."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did.

    Args:
        missing_keys: model entries absent from the checkpoint (they keep their
            initialisation).
        unexpected_keys: backbone entries of the checkpoint the model does not use
            (e.g. the classifier's final ``norm`` of a ResTv2 ImageNet checkpoint).
        dropped_keys: entries outside the backbone (classifier head, necks, heads).
        loaded_keys: model entries loaded from the checkpoint.
        checkpoint_arch: the checkpoint's variant as inferred from its shapes, e.g.
            ``'restv2_tiny'`` or a description of an unregistered architecture.
    """

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    dropped_keys: List[str] = field(default_factory=list)
    loaded_keys: List[str] = field(default_factory=list)
    checkpoint_arch: str = ""

    def summary(self) -> str:
        """One line: counts and (shortened) names of missing / unused entries."""
        parts = [f"loaded {len(self.loaded_keys)} tensors"]
        if self.missing_keys:
            parts.append(f"missing in checkpoint ({len(self.missing_keys)}): "
                         f"{_short(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"unused from checkpoint ({len(self.unexpected_keys)}): "
                         f"{_short(self.unexpected_keys)}")
        if self.dropped_keys:
            parts.append(f"dropped (classifier / non-backbone): {len(self.dropped_keys)}")
        return "; ".join(parts)


def _short(keys: Sequence[str], n: int = 12) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def array_to_tensor(array) -> Optional[Tensor]:
    """A numeric numpy array as a tensor of the same shape (0-d stays 0-d), any byte order;
    None for strings and objects."""
    if array.dtype.kind not in "biufc":
        return None
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(array if array.flags.c_contiguous and array.flags.writeable
                            else array.copy())


def _arrays_to_tensors(obj: object) -> object:
    """numpy arrays (and those in dicts) of a plain pickle as tensors (other arrays left)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        tensor = array_to_tensor(obj)
        return obj if tensor is None else tensor
    if isinstance(obj, dict):
        return {k: _arrays_to_tensors(v) for k, v in obj.items()}
    return obj


def _load_file(path: str, weights_only: bool, map_location) -> object:
    path = safe_load.checkpoint_file(path)
    kind = checkpoint_file_kind(path)
    named_st = path.lower().endswith(".safetensors")
    if kind == "safetensors":
        if not named_st:
            raise CheckpointFormatError(
                f"{_describe_file(path, kind)} but its name does not end in '.safetensors'; "
                "rename it so that it is read as safetensors")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except SafetensorError as e:
            raise CheckpointFormatError(
                f"{_describe_file(path, kind)} that cannot be read (damaged or truncated?): {e}") from e
    if named_st:
        raise CheckpointFormatError(f"{_describe_file(path, kind)}, although it is named .safetensors")
    if kind == "pickle":  # detectron2's model-zoo .pkl: numpy arrays in dicts
        try:
            obj = safe_load.load_pickle_file(path, trusted=True if not weights_only else None)
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            if isinstance(e, pickle.UnpicklingError) and "allow-list" in str(e):
                raise
            raise CheckpointFormatError(
                f"{_describe_file(path, kind)} that cannot be read (damaged or truncated?): "
                f"{type(e).__name__}: {e}") from e
        return _arrays_to_tensors(obj)
    if kind not in ("torch-zip", "torch-legacy"):
        raise CheckpointFormatError(f"{_describe_file(path, kind)}, not a checkpoint")
    try:
        if not weights_only:
            return torch.load(path, map_location=map_location, weights_only=False)
        # the allow-list of rest_dense.safe_load (numpy scalars, mmengine's HistoryBuffer): a
        # training checkpoint given as `init_cfg=dict(type='Pretrained', ...)`, to `convert`
        # or to `export` loads
        return safe_load.load_allow_listed(path, map_location)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError" and "eights only" in str(e):
            # torch's refusal under weights_only=True (nothing of the file ran): name the
            # file, what was refused and how to load a file of one's own anyway
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            refused = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
            raise type(e)(
                f"Weights only load failed for {path!r}: {(refused or lines[-1:] or [''])[0]} "
                "Nothing of the file was run. If you produced it yourself, load it with "
                "weights_only=False (mmdet/mmseg init_cfg: weights_only=False; rest-dense "
                "convert: --unsafe-load); never for files of unknown origin.") from e
        raise CheckpointFormatError(
            f"{_describe_file(path, kind)} that torch.load cannot read (damaged or truncated?): "
            f"{type(e).__name__}: {e}") from e


def read_state_dict(source: PathOrStateDict, weights_only: bool = True,
                    map_location="cpu") -> Dict[str, Tensor]:
    """Read a checkpoint file (or take a mapping) and unwrap ``model`` / ``state_dict``.

    Args:
        source: a file (``torch.save`` output of any extension, or ``.safetensors``) or
            an already loaded mapping.
        weights_only: passed to ``torch.load``; keep True for downloaded files.
        map_location: device for the loaded tensors.

    Returns:
        The tensors of the (unwrapped) state dict, keys unchanged.

    Raises:
        FileNotFoundError: ``source`` names no file.
        CheckpointFormatError: the file is not a checkpoint (empty, text, JSON, HTML,
            truncated, safetensors under another extension, ...), or it holds no tensors.
        pickle.UnpicklingError: ``weights_only=True`` and the file holds other objects.
    """
    label = "checkpoint"
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        label = f"checkpoint {path!r}"
        ckpt = _load_file(path, weights_only, map_location)
    elif isinstance(source, Mapping):
        ckpt = source
    else:
        raise TypeError(f"a checkpoint must be a file path or a state dict (mapping), got "
                        f"{type(source).__name__}")
    if not isinstance(ckpt, Mapping):
        raise CheckpointFormatError(f"{label} holds a {type(ckpt).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            ckpt = ckpt[key]
            break
    tensors = {k: v for k, v in ckpt.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        entries = _short([str(k) for k in ckpt], 8) or "none"
        raise CheckpointFormatError(f"{label} holds no tensors (top-level entries: {entries})")
    return tensors


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


# ------------------------------------------------------------------ naming architectures
@dataclass(frozen=True)
class ArchGuess:
    """A ResT architecture read off tensor shapes (:func:`infer_arch`).

    Args:
        family: ``'restv2'``, ``'restv1'`` or ``None`` (no ResT stem/patch keys).
        embed_dims: channels per stage (``None`` where unknown).
        depths: blocks per stage (0 where the checkpoint has none).
        sr_ratios: key/value reduction per stage (``None`` where unknown).
        name: the registered variant with these shapes, or ``None``.
        cwin: whether the checkpoint holds ``cwin_convs`` (trained in ``'cwin'`` mode).
    """

    family: Optional[str]
    embed_dims: Tuple[Optional[int], ...]
    depths: Tuple[int, ...]
    sr_ratios: Tuple[Optional[int], ...]
    name: Optional[str] = None
    cwin: bool = False

    def __str__(self) -> str:
        if self.family is None:
            return "no ResT backbone"
        shapes = f"embed_dims {_fmt(self.embed_dims)}, depths {_fmt(self.depths)}"
        extra = ", with cwin_convs" if self.cwin else ""
        if self.name:
            return f"{self.name} ({shapes}{extra})"
        family = "ResTv2" if self.family == "restv2" else "ResTv1"
        return f"an unregistered {family} ({shapes}, sr_ratios {_fmt(self.sr_ratios)}{extra})"


def _fmt(values: Sequence) -> str:
    return "(" + ", ".join("?" if v is None else str(v) for v in values) + ")"


def _first_dim(sd: Mapping[str, Tensor], *keys: str) -> Optional[int]:
    for k in keys:
        t = sd.get(k)
        if isinstance(t, Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


def infer_arch(state_dict: Mapping[str, Tensor]) -> ArchGuess:
    """Read a backbone state dict's architecture off its keys and shapes and name it.

    Args:
        state_dict: backbone entries in the core's names (see :func:`normalize_state_dict`).

    Returns:
        :class:`ArchGuess`; ``name`` is the registered variant (``list_models()``) whose
        family, ``embed_dims``, ``depths`` and ``sr_ratios`` equal the checkpoint's, if any.
    """
    if any(k.startswith(("stem.proj.", "patch_2.", "patch_3.", "patch_4.")) for k in state_dict):
        family = "restv2"
    elif any(k.startswith(("stem.conv1.", "patch_embed_")) for k in state_dict):
        family = "restv1"
    else:
        return ArchGuess(None, (None,) * 4, (0,) * 4, (None,) * 4)
    depths = [0] * 4
    for k in state_dict:
        m = _BLOCK_KEY.match(k)
        if m:
            i = int(m.group(1)) - 1
            depths[i] = max(depths[i], int(m.group(2)) + 1)
    dims: List[Optional[int]] = []
    srs: List[Optional[int]] = []
    for s in range(1, 5):
        if family == "restv2":
            patch = ("stem.proj.6.weight",) if s == 1 else (f"patch_{s}.proj.weight",)
        else:
            patch = ("stem.conv3.weight",) if s == 1 else (f"patch_embed_{s}.conv.weight",)
        dims.append(_first_dim(state_dict, f"stage{s}.0.norm1.weight", f"stage{s}.0.attn.q.weight",
                               *patch))
        sr = state_dict.get(f"stage{s}.0.attn.sr.weight")
        if isinstance(sr, Tensor) and sr.dim() == 4:
            srs.append(int(sr.shape[-1]) - 1)
        else:
            srs.append(1 if depths[s - 1] else None)
    cwin = any(k.startswith("cwin_convs.") for k in state_dict)
    guess = ArchGuess(family, tuple(dims), tuple(depths), tuple(srs), None, cwin)
    from .registry import get_model_entry, list_models

    for name in list_models(family=family):
        spec = get_model_entry(name).arch_spec
        if (tuple(spec["embed_dims"]) == guess.embed_dims and tuple(spec["depths"]) == guess.depths
                and tuple(spec["sr_ratios"]) == guess.sr_ratios):
            return ArchGuess(family, guess.embed_dims, guess.depths, guess.sr_ratios, name, cwin)
    return guess


def _model_arch(model: nn.Module) -> ArchGuess:
    guess = infer_arch(model.state_dict())
    spec = getattr(model, "arch", None)
    if not isinstance(spec, Mapping) or guess.family is None:
        return guess
    from .registry import get_model_entry, list_models

    dims, depths, srs = (tuple(spec[k]) for k in ("embed_dims", "depths", "sr_ratios"))
    name = None
    for n in list_models(family=guess.family):
        entry = get_model_entry(n)
        if isinstance(model, entry.cls) and all(
                _same_value(spec.get(k), v) for k, v in entry.arch_spec.items()):
            name = n
            break
    return ArchGuess(guess.family, dims, depths, srs, name, guess.cwin)


def _same_value(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return tuple(a) == tuple(b)
    return a == b


def _same_arch(a: ArchGuess, b: ArchGuess) -> bool:
    return (a.family, a.embed_dims, a.depths, a.sr_ratios) == (b.family, b.embed_dims, b.depths,
                                                               b.sr_ratios)


def describe_model(model: nn.Module) -> str:
    """The model's registered variant name (with its shapes), or a description of its arch.

    Uses the model's ``arch`` dict where it has one (:class:`ResTv2` / :class:`ResTv1` and
    the framework adapters), else infers it from the model's own tensor shapes.

    Args:
        model: a ResT backbone (or any module with the same parameter names).

    Returns:
        e.g. ``"restv2_tiny (embed_dims (96, 192, 384, 768), depths (1, 2, 6, 2))"``, with
        ``" in attn_mode 'win'"`` appended for a windowed model.
    """
    text = str(_model_arch(model))
    mode = getattr(model, "attn_mode", None)
    if isinstance(mode, str) and mode != "global":
        text += f" in attn_mode {mode!r}"
    return text


# ------------------------------------------------------------------ loading
def _value_problems(sd: Mapping[str, Tensor], own: Mapping[str, Tensor],
                    keys: Sequence[str]) -> List[str]:
    bad_dtype, no_data, nonfinite, negative_var = [], [], [], []
    for k in keys:
        t, o = sd[k], own[k]
        if t.is_meta:
            no_data.append(k)
            continue
        if o.is_floating_point() and not t.is_floating_point():
            bad_dtype.append(f"{k} ({str(t.dtype)[6:]}, model {str(o.dtype)[6:]})")
            continue
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            what = ", ".join(w for n, w in ((n_nan, f"{n_nan} NaN"), (n_inf, f"{n_inf} inf")) if n)
            nonfinite.append(f"{k} ({what})")
        elif k.endswith("running_var") and t.numel() and bool((t < 0).any()):
            negative_var.append(k)
    out = []
    if no_data:
        out.append(f"{len(no_data)} tensor(s) have no data (meta device): {_short(no_data, 8)}")
    if bad_dtype:
        out.append(f"{len(bad_dtype)} tensor(s) have a dtype that is not floating point "
                   f"(integer, bool, complex) where the model has floating point: "
                   f"{_short(bad_dtype, 8)}")
    if nonfinite:
        out.append(f"{len(nonfinite)} tensor(s) hold non-finite values (NaN/inf): "
                   f"{_short(nonfinite, 8)}")
    if negative_var:
        out.append(f"{len(negative_var)} BatchNorm running_var tensor(s) hold negative values: "
                   f"{_short(negative_var, 8)}")
    return out


def load_checkpoint(model: nn.Module, checkpoint: PathOrStateDict,
                    strict: bool = False, weights_only: bool = True, map_location="cpu",
                    allow_partial: bool = False,
                    log: Optional[logging.Logger] = logger, dry_run: bool = False,
                    source: Optional[str] = None) -> LoadReport:
    """Load a released or converted ResT checkpoint into ``model``.

    Only what a released checkpoint legitimately lacks or carries in addition is
    tolerated: the model's dense-only layers (``model.dense_only_prefixes``: output
    norms, ``cwin_convs``) may be missing, and classifier-only entries (``head.*``, the
    ResTv2 final ``norm.*``, output norms of stages the model does not emit:
    ``model.unused_checkpoint_prefixes``) may be unused. Anything else that does not
    fit — another variant's checkpoint, even one holding every key of the model — raises.

    Args:
        model: a :class:`ResTv2` / :class:`ResTv1` (or any module with the same names).
        checkpoint: a file path (``.pth``/``.pt``/``.pkl``/``.safetensors``) or a state dict,
            in any of the released wrappings.
        strict: raise if any key is missing or unused.
        weights_only: passed to ``torch.load``; keep True for downloaded files.
        map_location: device for loading.
        allow_partial: load the matching part of a checkpoint that lacks backbone weights
            (they keep their initialisation) or holds backbone weights the model does not
            use (e.g. a deeper variant's). Shape mismatches are never allowed.
        log: logger for the report (default: ``logging.getLogger("rest_dense")``);
            ``None`` loads silently (the caller reports from the returned value).
        dry_run: run every check and return the report, but leave the model unchanged.
        source: how messages name the checkpoint (default: its path, or "checkpoint").

    Returns:
        :class:`LoadReport` with missing, unexpected, dropped and loaded keys.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointFormatError: the file is not a checkpoint; the message says what it is.
        CheckpointMismatchError: any shape mismatch, fewer than half of the model's entries
            found, backbone weights missing or unused (unless ``allow_partial``), or
            (``strict``) any missing/unused key. The message names the model's variant
            and the checkpoint's (inferred from its shapes).
        CheckpointValueError: NaN/inf, negative BatchNorm variances or integer tensors for
            floating-point entries, among the tensors to load.
    """
    if source is not None:
        src = source
    elif isinstance(checkpoint, (str, os.PathLike)):
        src = f"checkpoint {os.fspath(checkpoint)!r}"
    else:
        src = "checkpoint"
    sd, dropped = normalize_state_dict(read_state_dict(checkpoint, weights_only, map_location))
    own = model.state_dict()

    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and own[k].shape != v.shape]
    matched = [k for k in own if k in sd and own[k].shape == sd[k].shape]
    missing = [k for k in own if k not in sd and not _is_step_counter(k)]
    unexpected = [k for k in sd if k not in own]
    # only the dense-prediction additions (output norms, cross-window convs) may be absent:
    # released classification checkpoints lack them, everything else must be there
    optional = tuple(getattr(model, "dense_only_prefixes", ()))
    required_missing = [k for k in missing if not k.startswith(optional)] if optional else missing
    ignorable = tuple(getattr(model, "unused_checkpoint_prefixes", ()))
    unused = [k for k in unexpected if not k.startswith(ignorable)] if ignorable else unexpected
    ckpt_arch = infer_arch(sd)

    problems: List[str] = []  # never allowed
    partial: List[str] = []  # allowed with allow_partial=True
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, e.g. {'; '.join(mismatched[:5])}")
    if len(matched) < MIN_MATCHED_FRACTION * len(own):
        examples = [f"missing {_short(missing, 5)}" if missing else "",
                    f"checkpoint has {_short(unexpected, 5)}" if unexpected else ""]
        examples = "; ".join(e for e in examples if e)
        listed = not (strict or allow_partial)  # the missing / unused lists follow anyway
        problems.append(f"only {len(matched)} of the model's {len(own)} entries found"
                        + (f" (e.g. {examples})" if examples and not listed else ""))
    if strict and (missing or unexpected):
        problems.append(f"strict loading failed: {len(missing)} missing "
                        f"({_short(missing, 8)}), {len(unexpected)} unused ({_short(unexpected, 8)})")
    elif not allow_partial:
        if required_missing:
            partial.append(f"checkpoint lacks {len(required_missing)} weights of "
                           f"{type(model).__name__}: {_short(required_missing, 8)}")
        if unused:
            hint = (" (it was trained with attn_mode='cwin')" if ckpt_arch.cwin
                    and getattr(model, "attn_mode", None) != "cwin" else "")
            partial.append(f"{len(unused)} backbone weights of the checkpoint are not used by "
                           f"the model{hint}: {_short(unused, 8)}")
    if problems or partial:
        model_arch = _model_arch(model)
        model_desc = describe_model(model)
        if _same_arch(ckpt_arch, model_arch):
            head = f"{src} does not fit the model, although both look like {model_desc}"
        else:
            head = f"{src} holds {ckpt_arch}, but the model is {model_desc} (wrong variant?)"
        tail = "" if problems else ("; from Python, load_checkpoint(..., allow_partial=True) "
                                    "loads the matching part anyway")
        raise CheckpointMismatchError(f"{head}: {'; '.join(problems + partial)}{tail}")

    bad_values = _value_problems(sd, own, matched)
    if bad_values:
        raise CheckpointValueError(f"{src} cannot be loaded into {describe_model(model)}: "
                                   f"{'; '.join(bad_values)}")

    report = LoadReport(missing, unexpected, dropped, matched, str(ckpt_arch))
    if dry_run:
        return report
    model.load_state_dict({k: sd[k] for k in matched}, strict=False)
    if log is None:
        return report
    log.info("rest_dense: %s", report.summary())
    if missing:
        log.warning("rest_dense: keys not in the checkpoint keep their initialisation: %s",
                    _short(missing))
    return report


def _is_step_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: a step counter, not a weight (files filtered to
    parameters and statistics lack it; ``load_state_dict`` keeps the model's own)."""
    return key.rsplit(".", 1)[-1] == "num_batches_tracked"


def find_backbone(model: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """The first ResT backbone inside ``model`` (wrappers' ``.module`` unwrapped) as
    ``(prefix, module)`` with a trailing dot in the prefix (``"backbone."``), or ``None``."""
    model = getattr(model, "module", model)
    for name, module in model.named_modules():
        if isinstance(module, ResTBase):
            return (name + "." if name else ""), module
    return None


@dataclass
class ModelCheckReport:
    """What :func:`check_model_checkpoint` found (keys of the whole model)."""

    matched: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    #: ``"key: checkpoint (shape) vs model (shape)"`` outside the backbone
    mismatched: List[str] = field(default_factory=list)


def check_model_checkpoint(model: nn.Module, state_dict: Mapping[str, Tensor], *,
                           source: str = "checkpoint", complete: bool = False,
                           allow_partial_backbone: bool = False) -> ModelCheckReport:
    """Check a whole-model checkpoint (detector or segmenter with a ResT backbone) before
    a framework loads it, without changing the model.

    Frameworks' own loaders skip keys of the wrong shape with a log line, so a checkpoint
    of another backbone variant would leave the backbone at its initialisation. Here the
    backbone's part of ``state_dict`` goes through every check of :func:`load_checkpoint`
    (the wrong variant raises, naming both), and a checkpoint that matches no entry of the
    model raises.

    Args:
        model: the whole model (a DDP wrapper is unwrapped).
        state_dict: the checkpoint's model state dict, keys as the model names them
            (detectron2's released ``norm_i.0.`` spelling is accepted), or a checkpoint
            holding it under ``state_dict`` / ``model``.
        source: how messages name the checkpoint.
        complete: also raise when any entry of the model is missing from the checkpoint
            or has another shape there (for evaluation: a model with randomly initialised
            parts must not be scored). Default False.
        allow_partial_backbone: load the matching part of the backbone only
            (see ``allow_partial`` of :func:`load_checkpoint`). Default False.

    Returns:
        :class:`ModelCheckReport`.

    Raises:
        CheckpointMismatchError: the checkpoint matches no entry of the model, holds no
            weights of its ResT backbone, holds another backbone (variant, attention mode),
            or (``complete``) lacks entries of the model.
        CheckpointValueError: non-finite or integer values among the model's weights (the
            backbone's, and the neck's and heads' too), negative BatchNorm variances.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointFormatError(f"{source}: expected a state dict, got "
                                    f"{type(state_dict).__name__}")
    for wrapper in ("state_dict", "model"):  # mmengine's and detectron2's layouts
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
            break
    sd = rename_d2_norm_keys({k: v for k, v in state_dict.items() if isinstance(v, Tensor)})
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    own = getattr(model, "module", model).state_dict()
    report = ModelCheckReport(
        matched=[k for k, v in own.items() if k in sd and tuple(sd[k].shape) == tuple(v.shape)],
        missing=[k for k in own if k not in sd and not _is_step_counter(k)],
        unexpected=[k for k in sd if k not in own],
        mismatched=[f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)])
    found = find_backbone(model)
    if own and not report.matched:
        if found is not None:
            bb_own = found[1].state_dict()
            hits = matching_keys(bb_own, normalize_state_dict(sd)[0])
            if len(hits) >= MIN_MATCHED_FRACTION * len(bb_own):
                raise CheckpointMismatchError(
                    f"{source} holds weights of the ResT backbone only (as ImageNet weights "
                    f"do), not of the whole model: use it as the backbone's pretrained weights, "
                    f"not as a checkpoint of the model")
        raise CheckpointMismatchError(
            f"{source} matches none of the model's {len(own)} entries (model keys such as "
            f"{_short(list(own), 3)}; checkpoint keys such as {_short(list(sd), 3)}): it is "
            "not a checkpoint of this model")
    if found is not None:
        prefix, backbone = found
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not part:
            raise CheckpointMismatchError(
                f"{source} holds no weights of the model's ResT backbone (no key starts with "
                f"{prefix!r}); it is a checkpoint of another model")
        load_checkpoint(backbone, part, allow_partial=allow_partial_backbone, log=None,
                        dry_run=True, source=f"{source} (its {prefix[:-1] or 'model'} part)")
        report.mismatched = [m for m in report.mismatched if not m.startswith(prefix)]
    # the rest of the model (neck, heads) gets the value checks the backbone's part got
    rest = [k for k in report.matched if found is None or not k.startswith(found[0])]
    problems = _value_problems(sd, own, rest)
    if problems:
        raise CheckpointValueError(f"{source}, outside the backbone: {'; '.join(problems)}")
    if complete and (report.missing or report.mismatched):
        problems = []
        if report.missing:
            problems.append(f"{len(report.missing)} entries missing: {_short(report.missing, 8)}")
        if report.mismatched:
            problems.append(f"{len(report.mismatched)} of another shape: "
                            f"{'; '.join(report.mismatched[:5])}")
        raise CheckpointMismatchError(
            f"{source} does not cover the whole model ({'; '.join(problems)}); evaluating it "
            "would score randomly initialised layers")
    return report


set_checkpoint_loader(load_checkpoint)
