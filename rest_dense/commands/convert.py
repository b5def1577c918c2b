"""Convert a ResT checkpoint to the layout MMDetection/MMSegmentation, detectron2 or the core
model loads, and verify it.

SRC may be any released wrapping (ImageNet, mmseg, detectron2, plain or ``module.``-prefixed
state dict, ``.safetensors``). Only backbone tensors are written (classifier, ResTv2's final
``norm``, necks and heads are dropped and listed). The variant is inferred from the tensor
shapes unless --model names it. The output is verified before it gets its name -- it must load
into the variant's core model (strictly, apart from the dense-only layers a classification
checkpoint lacks) and reproduce every source tensor bit for bit -- so a failed conversion
leaves no file. A ``.safetensors`` DST is written with safetensors (our loaders read it;
mmengine's ``load_from`` and detectron2's checkpointer need a torch file).

Layouts (--to):
  core         backbone keys, for rest_dense.models.create_model(name, pretrained=...)
  mmdet/mmseg  "backbone." + key, for init_cfg=dict(type='Pretrained', checkpoint=...)
  d2           "backbone.bottom_up." + key with the released norm_i.0. spelling, for
               detectron2's MODEL.WEIGHTS

Examples::

    rest-dense convert restv2_tiny_224.pth restv2_tiny_mm.pth --to mmdet
    rest-dense convert restv2_tiny_224.pth restv2_tiny_d2.pth --to d2
    rest-dense convert mask_rcnn_restv2_tiny_3x.pth backbone.safetensors --to core
    rest-dense convert rest_small_d2.pth rest_small_seg.pth --to mmseg --model rest_small
"""
from __future__ import annotations

import argparse
import pickle

from ..convert import LAYOUTS  # light: torch and the core models, which the package imports
from . import fail

HELP = "convert a checkpoint between the released, mmdet/mmseg, detectron2 and core layouts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="source checkpoint (.pth/.pt/.pkl/.safetensors)")
    parser.add_argument("dst", metavar="DST", help="output file; .safetensors selects safetensors")
    parser.add_argument("--to", required=True, choices=LAYOUTS, help="output layout")
    parser.add_argument("--model", metavar="NAME",
                        help="variant (restv2_tiny, restv1_small, rest_small, ...); default: "
                             "inferred from the tensor shapes")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle SRC fully (torch.load weights_only=False); only for files "
                             "you trust, e.g. your own mmengine training checkpoints")


def _short(keys, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def _message(e: Exception) -> str:
    """The text of an error; an ``OSError(errno, text, path)`` shows as its text only."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert_checkpoint

    try:
        res = convert_checkpoint(args.src, args.dst, to=args.to, model=args.model,
                                 weights_only=not args.unsafe_load)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        # the core's checkpoint errors are ValueErrors; OSError: missing file, a folder, an
        # unwritable destination; an UnpicklingError: SRC holds more than weights_only=True
        # admits (the message names --unsafe-load)
        return fail("convert", _message(e), 1)
    print(f"model: {res.model} (verified in attn_mode {res.attn_mode}); layout: {res.layout}; "
          f"{res.num_tensors} tensors written")
    if res.dropped:
        print(f"dropped {len(res.dropped)} non-backbone tensors: {_short(res.dropped)}")
    if res.missing_dense_only:
        print("not in the source (dense-only layers; they keep their initialisation when "
              f"loaded): {_short(res.missing_dense_only)}")
    print("verified: loads into the core model"
          + (" strictly" if not res.missing_dense_only else " (strict apart from those layers)")
          + "; tensors bit-identical to the source")
    print(f"sha256: {res.sha256}  {res.path}")
    return 0
