#!/usr/bin/env python
"""Convert ResT checkpoints between the released layouts and the ones our frameworks load.

Reads any released wrapping -- ImageNet (``{"model": sd}`` with ``head``/``norm``), mmseg
(``{"state_dict": {"backbone." + k}}``), detectron2 (``{"model": {"backbone.bottom_up." + k}}``
with ``norm_i.0.``), a plain or ``module.``-prefixed state dict, ``.safetensors`` -- and writes
the backbone's weights as a plain state dict in one of these layouts:

* ``--to core``:  backbone keys (``stem.*``, ``stage1.*``, ``norm_1.*``), for
  :func:`rest_dense.models.load_checkpoint` / ``ResTv2(pretrained=...)``;
* ``--to mmdet`` / ``--to mmseg``: ``backbone.`` + key, for ``init_cfg=dict(type='Pretrained',
  checkpoint=...)`` and for ``load_from`` (the rest of the detector/segmentor keeps its
  initialisation);
* ``--to d2``: ``backbone.bottom_up.`` + key with the released ``norm_i.0.`` spelling, for
  detectron2's ``MODEL.WEIGHTS``.

A ``.safetensors`` destination is written with safetensors (readable by our loaders; mmengine's
``load_from`` and detectron2's own checkpointer read only torch files), anything else with
``torch.save``. Only backbone tensors are kept (the classifier, the classifier's final ``norm``
of ResTv2, necks and heads are dropped and listed). The result is verified: it is loaded into
the matching core model (variant inferred from the tensor shapes or given by ``--arch``),
strictly except for the dense-only layers a classification checkpoint cannot have (output
norms / cross-window convs; they are listed), and every written tensor is compared with the
source bit for bit. The SHA-256 of the written file is printed.

Examples::

    python tools/convert_checkpoint.py restv2_tiny_224.pth restv2_tiny_mm.pth --to mmdet
    python tools/convert_checkpoint.py restv2_tiny_224.pth restv2_tiny_d2.pth --to d2
    python tools/convert_checkpoint.py mask_rcnn_restv2_tiny_3x.pth backbone.safetensors --to core
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from _backbones import build_backbone  # noqa: E402
from rest_dense.models import (RESTV1_ARCHS, RESTV2_ARCHS, CheckpointMismatchError,  # noqa: E402
                               load_checkpoint, normalize_state_dict, read_state_dict)

FORMATS = ("core", "mmdet", "mmseg", "d2")
PREFIXES = {"core": "", "mmdet": "backbone.", "mmseg": "backbone.", "d2": "backbone.bottom_up."}
_NORM_I = re.compile(r"^norm_(\d)\.")
_STAGE = re.compile(r"^stage(\d)\.(\d+)\.")
# the core loader reports through ``logging``; the tool prints its own summary
_QUIET = logging.getLogger("rest_dense.convert_checkpoint.quiet")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def to_layout(backbone_sd: Mapping[str, Tensor], fmt: str) -> Dict[str, Tensor]:
    """Backbone state dict -> keys of layout ``fmt`` (see :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    out = {}
    for k, v in backbone_sd.items():
        if fmt == "d2":
            k = _NORM_I.sub(r"norm_\1.0.", k)
        out[PREFIXES[fmt] + k] = v
    return out


def infer_arch(sd: Mapping[str, Tensor]) -> str:
    """Variant name (``restv2_tiny``, ``restv1_small``, ...) from a backbone state dict."""
    if "stem.proj.0.weight" in sd:
        family, zoo, dim_key = "restv2", RESTV2_ARCHS, "stem.proj.6.weight"
    elif "stem.conv1.weight" in sd:
        family, zoo, dim_key = "restv1", RESTV1_ARCHS, "stem.conv3.weight"
    else:
        raise CheckpointMismatchError("not a ResT backbone state dict: neither stem.proj.* "
                                      "(ResTv2) nor stem.conv1.* (ResTv1) found")
    c = sd[dim_key].shape[0]
    depths = [0] * 4
    for k in sd:
        m = _STAGE.match(k)
        if m:
            i = int(m.group(1)) - 1
            depths[i] = max(depths[i], int(m.group(2)) + 1)
    for name, spec in zoo.items():
        if spec["embed_dims"][0] == c and tuple(spec["depths"]) == tuple(depths):
            return f"{family}_{name}"
    raise CheckpointMismatchError(f"no {family} variant with embed_dims[0]={c} and depths="
                                  f"{tuple(depths)}; pass --arch")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_dict(sd: Mapping[str, Tensor], path: str, metadata: Optional[Dict[str, str]] = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path,
                  metadata={"format": "pt", **(metadata or {})})
    else:
        torch.save(dict(sd), path)


@dataclass
class Conversion:
    arch: str
    attn_mode: str
    fmt: str
    path: str
    sha256: str
    tensors: int
    dropped: List[str] = field(default_factory=list)
    missing_dense_only: List[str] = field(default_factory=list)


def convert(src, dst: str, fmt: str, arch: Optional[str] = None, attn_mode: Optional[str] = None,
            weights_only: bool = True) -> Conversion:
    """Convert ``src`` (path or mapping) to ``dst`` in layout ``fmt`` and verify the result.

    Raises:
        CheckpointMismatchError: the checkpoint does not fit the (inferred) variant, or the
            written file does not reproduce the source tensors bit for bit.
    """
    backbone, dropped = normalize_state_dict(read_state_dict(src, weights_only=weights_only))
    arch = arch or infer_arch(backbone)
    if attn_mode is None:
        attn_mode = "cwin" if any(k.startswith("cwin_convs.") for k in backbone) else "global"
    model = build_backbone(arch, attn_mode)
    own = model.state_dict()
    kept = {k: v for k, v in backbone.items() if k in own}
    dropped += [k for k in backbone if k not in own]  # e.g. ResTv2's classifier norm
    if not kept:
        raise CheckpointMismatchError(f"no tensor of {src!r} belongs to a {arch} backbone")

    save_state_dict(to_layout(kept, fmt), dst, {"arch": arch, "layout": fmt})

    # verify 1: the written file loads into the core model; only dense-only layers may be missing
    report = load_checkpoint(model, dst, strict=False, log=_QUIET)
    if report.unexpected_keys:
        raise CheckpointMismatchError(f"{dst}: unexpected keys {report.unexpected_keys[:5]}")
    dense_only = tuple(model.dense_only_prefixes)
    not_optional = [k for k in report.missing_keys if not k.startswith(dense_only)]
    if not_optional:
        raise CheckpointMismatchError(f"{dst}: missing {not_optional[:5]}")
    if not report.missing_keys:
        load_checkpoint(model, dst, strict=True, log=_QUIET)
    # verify 2: bit-identical tensors after the round trip through the file
    back, _ = normalize_state_dict(read_state_dict(dst))
    if set(back) != set(kept):
        raise CheckpointMismatchError(f"{dst}: keys differ from the source after reading back")
    for k, v in kept.items():
        w = back[k]
        if w.dtype != v.dtype or w.shape != v.shape or not torch.equal(w, v):
            raise CheckpointMismatchError(f"{dst}: tensor {k} differs from the source")
    return Conversion(arch, attn_mode, fmt, dst, sha256(dst), len(kept), sorted(dropped),
                      sorted(report.missing_keys))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source checkpoint (.pth/.pt/.pkl/.safetensors)")
    p.add_argument("dst", help="output file; .safetensors selects safetensors")
    p.add_argument("--to", required=True, choices=FORMATS, help="output layout")
    p.add_argument("--arch", help="variant (restv2_tiny, restv1_small, ...); default: inferred "
                   "from the tensor shapes")
    p.add_argument("--attn-mode", choices=("global", "win", "cwin", "hwin"),
                   help="ResTv2 attention mode for verification (default: cwin when the "
                   "checkpoint has cross-window convs, else global)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle the source fully (torch.load weights_only=False); only for "
                   "files you trust, e.g. your own training checkpoints")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise SystemExit("src and dst must differ")
    try:
        c = convert(args.src, args.dst, args.to, args.arch, args.attn_mode,
                    weights_only=not args.unsafe_load)
    except CheckpointMismatchError as e:
        raise SystemExit(f"error: {e}")
    print(f"arch: {c.arch} (attn_mode {c.attn_mode}); layout: {c.fmt}; {c.tensors} tensors written")
    if c.dropped:
        more = f", ... (+{len(c.dropped) - 8})" if len(c.dropped) > 8 else ""
        print(f"dropped {len(c.dropped)} non-backbone tensors: {', '.join(c.dropped[:8])}{more}")
    if c.missing_dense_only:
        print(f"not in the source (dense-only layers; they keep their initialisation when "
              f"loaded): {', '.join(c.missing_dense_only)}")
    print("verified: loads into the core model"
          + (" strictly" if not c.missing_dense_only else " (strict apart from the layers above)")
          + "; tensors bit-identical to the source")
    print(f"sha256: {c.sha256}  {c.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
