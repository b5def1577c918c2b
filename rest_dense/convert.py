"""Convert ResT checkpoints between the released layouts and the ones the frameworks load.

Any released wrapping is read -- ImageNet (``{"model": sd}`` with ``head.*`` and ResTv2's final
``norm.*``), MMDetection/MMSegmentation (``{"state_dict": {"backbone." + k}}``), detectron2
(``{"model": {"backbone.bottom_up." + k}}`` with ``norm_i.0.``), a plain or ``module.``-prefixed
state dict, ``.safetensors`` -- and the backbone's tensors are written in one layout:

* ``"core"``: backbone keys (``stem.*``, ``stage1.*``, ``norm_1.*``), for
  :func:`rest_dense.models.load_checkpoint` and ``create_model(name, pretrained=...)``;
* ``"mmdet"`` / ``"mmseg"``: ``backbone.`` + key, for ``init_cfg=dict(type='Pretrained',
  checkpoint=...)`` and ``load_from``;
* ``"d2"``: ``backbone.bottom_up.`` + key with the released ``norm_i.0.`` spelling, for
  detectron2's ``MODEL.WEIGHTS``.

The variant is inferred from the tensor shapes through the model registry. The written file is
verified before it gets its final name: it must load into the variant's core model (strictly,
apart from the dense-only layers a classification checkpoint cannot have) and every tensor must
equal the source bit for bit. If anything fails, no output file is left behind.

Example::

    from rest_dense.convert import convert_checkpoint
    res = convert_checkpoint("restv2_tiny_224.pth", "restv2_tiny_mm.pth", to="mmdet")
    print(res.model, res.num_tensors, res.sha256)
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .models import (CheckpointMismatchError, create_model, get_model_entry, list_models,
                     load_checkpoint, normalize_state_dict, read_state_dict, rename_d2_norm_keys)
from .models.pretrained import infer_arch
from . import safe_load
from .run_files import StagedFile
from .utils import check_output_path

__all__ = ["LAYOUTS", "LAYOUT_PREFIXES", "ConversionResult", "convert_checkpoint",
           "infer_model_name", "to_layout", "save_state_dict", "file_sha256"]

#: output layouts and the prefix each puts before the backbone keys
LAYOUT_PREFIXES: Dict[str, str] = {"core": "", "mmdet": "backbone.", "mmseg": "backbone.",
                                   "d2": "backbone.bottom_up."}
LAYOUTS: Tuple[str, ...] = tuple(LAYOUT_PREFIXES)

PathOrStateDict = Union[str, os.PathLike, Mapping[str, Tensor]]


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` wrote.

    Attributes:
        model: registry name of the variant the weights belong to (e.g. ``'restv2_tiny'``).
        attn_mode: attention mode of the verification model (``'cwin'`` when the checkpoint
            has cross-window convs, else ``'global'``).
        layout: the output layout (one of :data:`LAYOUTS`).
        path: the written file.
        sha256: hex SHA-256 of the written file.
        num_tensors: number of tensors written.
        dropped: source keys that are not backbone weights (classifier, necks, heads).
        missing_dense_only: dense-only layers absent from the source; they keep their
            initialisation when the file is loaded.
    """

    model: str
    attn_mode: str
    layout: str
    path: str
    sha256: str
    num_tensors: int
    dropped: List[str] = field(default_factory=list)
    missing_dense_only: List[str] = field(default_factory=list)


# ------------------------------------------------------------------ variant inference
def infer_model_name(state_dict: PathOrStateDict) -> str:
    """The registered variant whose architecture fits a checkpoint's tensors.

    The family, stage widths, depths and reduction ratios are read off the tensor shapes
    (:func:`rest_dense.models.pretrained.infer_arch`) and compared with
    ``get_model_entry(name).arch_spec`` of the names in :func:`rest_dense.models.list_models`.

    Args:
        state_dict: a state dict in any released wrapping, or a checkpoint file.

    Returns:
        The canonical registry name, e.g. ``'restv2_tiny'`` or ``'restv1_small'``.

    Raises:
        CheckpointMismatchError: the checkpoint holds no ResT backbone, or no registered
            variant has its shapes (the message gives the shapes found).
    """
    backbone, _ = normalize_state_dict(read_state_dict(state_dict))
    guess = infer_arch(backbone)
    if guess.family is None:
        raise CheckpointMismatchError(
            "not a ResT backbone state dict: no ResTv2/ResTv1 stem or patch-embedding weights "
            f"(first keys: {', '.join(list(backbone)[:5]) or 'none'})")
    if guess.name is None:
        raise CheckpointMismatchError(
            f"the checkpoint holds {guess}, which is no registered variant; known variants: "
            f"{', '.join(list_models(family=guess.family))}")
    return guess.name


def _attn_mode_for(name: str, backbone: Mapping[str, Tensor]) -> str:
    """``'cwin'`` when the checkpoint has cross-window convs (and the family has that mode)."""
    if infer_arch(backbone).cwin and "cwin" in get_model_entry(name).attn_modes:
        return "cwin"
    return "global"


# ------------------------------------------------------------------ layouts and files
def _d2_key(key: str) -> str:
    """The released detectron2 spelling of a core key: the one that
    :func:`rest_dense.models.rename_d2_norm_keys` maps back to ``key``."""
    head, sep, rest = key.partition(".")
    if sep and head.startswith("norm_"):
        candidate = f"{head}.0.{rest}"
        if next(iter(rename_d2_norm_keys({candidate: None}))) == key:
            return candidate
    return key


def to_layout(backbone_sd: Mapping[str, Tensor], layout: str) -> Dict[str, Tensor]:
    """Backbone state dict (core key names) -> the key names of ``layout``.

    Args:
        backbone_sd: tensors under the core's names (``stem.*``, ``norm_1.*``, ...).
        layout: one of :data:`LAYOUTS`.

    Returns:
        A new dict with the same tensors under the layout's names.

    Raises:
        ValueError: unknown layout.
    """
    if layout not in LAYOUT_PREFIXES:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    prefix = LAYOUT_PREFIXES[layout]
    return {prefix + (_d2_key(k) if layout == "d2" else k): v for k, v in backbone_sd.items()}


def save_state_dict(state_dict: Mapping[str, Tensor], path: Union[str, os.PathLike],
                    metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a plain state dict: safetensors for a ``.safetensors`` path, else ``torch.save``.

    Args:
        state_dict: tensors to write.
        path: destination file.
        metadata: string metadata (safetensors only).
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, path,
                  metadata={"format": "pt", **(metadata or {})})
        _sort_safetensors_header(path)
    else:
        # through a file object: the archive's folder is then 'archive', not the file's
        # name, so equal tensors give equal bytes whatever (temporary) name is written
        with open(path, "wb") as f:
            torch.save(dict(state_dict), f)


def _sort_safetensors_header(path: str) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys (same length, same
    offsets): the library writes the metadata in hash order, which changes run to run, and
    so would the file's bytes and SHA-256."""
    import json
    import struct

    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > size:  # cannot happen for a reordering; leave the file as written
            return
        f.seek(8)
        f.write(text.ljust(size))


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: str, model: nn.Module, expected: Mapping[str, Tensor]) -> List[str]:
    """Load the file at ``path`` into ``model`` and compare it with ``expected``; returns the
    dense-only keys the file lacks. Raises :class:`CheckpointMismatchError` on anything else:
    a key the model does not have, a missing weight that is not dense-only, a shape, dtype or
    value that differs from ``expected``."""
    written = read_state_dict(path)
    # raises on shape mismatches, missing non-dense-only weights and unusable values
    report = load_checkpoint(model, written, strict=False, log=None)
    if report.unexpected_keys:
        raise CheckpointMismatchError(
            f"{len(report.unexpected_keys)} written tensors do not belong to the model, e.g. "
            f"{', '.join(report.unexpected_keys[:5])}")
    optional = tuple(model.dense_only_prefixes)
    required = [k for k in report.missing_keys if not k.startswith(optional)]
    if required:
        raise CheckpointMismatchError(
            f"the checkpoint lacks {len(required)} weights of the model, e.g. "
            f"{', '.join(required[:5])}")
    back, _ = normalize_state_dict(written)
    if set(back) != set(expected):
        diff = sorted(set(back) ^ set(expected))
        raise CheckpointMismatchError(f"keys read back differ from the source: {diff[:5]}")
    for k, v in expected.items():
        w = back[k]
        if w.dtype != v.dtype or w.shape != v.shape or not torch.equal(w, v):
            raise CheckpointMismatchError(f"tensor {k} read back differs from the source")
    return sorted(report.missing_keys)


# ------------------------------------------------------------------ conversion
def convert_checkpoint(src: PathOrStateDict, dst: Union[str, os.PathLike], to: str = "core",
                       model: Optional[str] = None, weights_only: bool = True
                       ) -> ConversionResult:
    """Convert a ResT checkpoint to another layout, verify it, and write it.

    The file is first written to a temporary name in ``dst``'s folder, verified, and only then
    renamed to ``dst`` (an existing ``dst`` is replaced only by a verified file).

    Args:
        src: checkpoint file (``.pth``/``.pt``/``.pkl``/``.safetensors``) or state dict, in any
            released wrapping.
        dst: output file; a ``.safetensors`` suffix selects safetensors, anything else
            ``torch.save``.
        to: output layout, one of :data:`LAYOUTS` (``'core'``, ``'mmdet'``, ``'mmseg'``,
            ``'d2'``).
        model: registry name of the variant (``'restv2_tiny'``, ``'rest_small'``, ...).
            Default: inferred with :func:`infer_model_name`.
        weights_only: ``torch.load(weights_only=...)`` for ``src``. Keep True unless the file
            is your own (mmengine training checkpoints pickle more than tensors).

    Returns:
        :class:`ConversionResult` with the variant, the SHA-256 and the tensor count.

    Every check that needs no conversion runs first (layout, model name, source file,
    destination), then the source must load into the variant (shapes, values), and only
    then is anything written (missing folders of ``dst`` are created then).

    Raises:
        ValueError: unknown layout or model name; ``dst`` is ``src`` (also through another
            path or a link), a folder, below a file, or not writable
            (:func:`rest_dense.utils.check_output_path`).
        FileNotFoundError: ``src`` does not exist.
        IsADirectoryError: ``src`` is a folder.
        CheckpointFormatError: ``src`` is not a checkpoint (empty, text, JSON, truncated,
            safetensors under another name, ...); the message says what it is.
        CheckpointMismatchError: the checkpoint does not fit the variant, or the written file
            does not reproduce the source; ``dst`` is then not written.
        CheckpointValueError: the source holds NaN/inf or other unusable values (named);
            ``dst`` is then not written either.
        pickle.UnpicklingError: ``weights_only`` and the file pickles other objects than
            tensors (torch's message says how to proceed).
    """
    if to not in LAYOUT_PREFIXES:
        raise ValueError(f"unknown layout {to!r}; choose one of {', '.join(LAYOUTS)}")
    if not isinstance(dst, (str, os.PathLike)) or not os.fspath(dst):
        raise ValueError(f"the destination must be a file path, got {dst!r}")
    dst = os.fspath(dst)
    label = "the checkpoint"
    if isinstance(src, (str, os.PathLike)):
        src = os.fspath(src)
        label = repr(src)
        safe_load.checkpoint_file(src)
    check_output_path(dst, "the destination", [src] if isinstance(src, str) else (),
                      example="converted.pth", replaced=True)
    if model is not None:
        model = get_model_entry(model).name  # unknown names fail before the file is read
    backbone, dropped = normalize_state_dict(read_state_dict(src, weights_only=weights_only))
    name = model or infer_model_name(backbone)
    attn_mode = _attn_mode_for(name, backbone)
    net = create_model(name, attn_mode=attn_mode)
    own = net.state_dict()
    kept = {k: v for k, v in backbone.items() if k in own}
    dropped = sorted(dropped + [k for k in backbone if k not in own])
    if not kept:
        raise CheckpointMismatchError(f"no tensor of the checkpoint belongs to a {name} backbone")
    try:  # the source itself must load (shapes, values, no backbone weight left over)
        load_checkpoint(net, backbone, strict=False, log=None)
    except ValueError as e:  # the core's checkpoint errors (mismatch, bad values)
        raise type(e)(f"{label} cannot be converted for {name}, {dst!r} not written: {e}") from e

    with StagedFile(dst, ".safetensors" if dst.endswith(".safetensors") else "") as staged:
        save_state_dict(to_layout(kept, to), staged.path, {"model": name, "layout": to})
        try:
            missing = _verify(staged.path, net, kept)
        except ValueError as e:  # the core's checkpoint errors (mismatch, bad values)
            raise type(e)(f"verification of the {to} checkpoint for {name} failed, {dst!r} "
                          f"not written: {e}") from e
        digest = file_sha256(staged.path)
        staged.commit()
    return ConversionResult(name, attn_mode, to, dst, digest, len(kept), dropped, missing)
