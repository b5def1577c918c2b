#!/usr/bin/env python
"""Write docs/flops.md: ``rest-dense flops`` on the released backbones and every shipped
config (``--markdown``), followed by notes on how the ResT papers' figures compare with ours
and by the VT-FPN whole-model table (ResTv2-T + UperNet / + semantic FPN / + VT-FPN at 512x512
and 512x2048, split into backbone / neck / head: tools/vt_fpn_tables.py, also in
docs/vt_fpn.md).

    python tools/flops_doc.py                  # docs/flops.md (fvcore, mmdet, mmseg, detectron2)
    python tools/flops_doc.py --out /tmp/f.md  # elsewhere

The paper figures themselves are data of the library (``rest_dense.analysis.PAPER_*``, shown by
``rest-dense flops``); this prose exists only for the document.
"""
import argparse
import os
import sys

from rest_dense.cli import main as cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vt_fpn_tables import whole_models_section as _whole_models_section  # noqa: E402

#: the backbones at the top of the document (then every shipped config, ``--all``)
BACKBONES = ["restv2_tiny", "restv2_small", "restv2_base", "restv2_large",
             "restv1_lite", "restv1_small", "restv1_base", "restv1_large"]

#: how the papers' figures compare with ours (appended to the document)
PAPER_NOTES = """\
How the papers' figures compare (checked against the table above):

* UperNet (ResTv2 paper, Tab. 5, 2048×512) counts everything, attention products included:
  T/S/B agree with our GFLOPs to within 1 G.
* Mask R-CNN main results (ResTv2 paper, Tab. 4: 253/290/328 G) agree with our
  "GFLOPs excl. matmul" column to within 0.5 G: the attention products were left out there,
  as hook-based counters that only see modules (e.g. mmcv 1.x's `get_model_complexity_info`,
  behind the Swin / ConvNeXt Mask R-CNN figures the table compares with) leave them out.
* The attention-mode ablation (Tab. 4a/4b: 205.2/212.5/218.9/229.7 G, conv/linear/matmul/others)
  comes from the authors' detectron2 `analyze_model.py`, which averages fvcore counts over COCO
  val images (short side 800, long side ≤ 1333, mostly smaller than 800×1280) with a trained
  model (mask head on the actual detections), so it is lower than a count at 800×1280. The
  modes compare alike: window attention cuts the matmul FLOPs to a few G (3.69 G in the
  paper, 3.77 G here) and adds linear FLOPs for the padding to whole windows; hwin lies
  between. One figure we cannot reproduce: cwin adds 7.2 G of conv over win in Tab. 4b, while
  its extra layers (0.014 M parameters: one 3×3 depth-wise conv per stage, 49.94 → 49.96 M
  as in Tab. 4a) cost 0.1 G at 800×1280.
* The dense ResTv2-T backbone at 800×1280 (`rest-dense flops restv2_tiny --shape 800x1280`):
  127.65 G here against 127.6 G (linear 69.2, matmul 46.1, conv 11.9, layer_norm 0.4) for the
  authors' code. The 0.06 G difference is the four output norms `norm_1..4` (reported in the
  notes): the authors' code builds these channels-first LayerNorms from element-wise ops,
  which fvcore does not count, so its layer_norm is 0.41 G instead of our 0.47 G; every other
  operator agrees exactly.
* Backbones at 224×224 are compared with the ImageNet classifiers, whose counts include the
  classifier head (and ResTv2's final norm) but not the dense output norms.
"""


#: heading of the whole-model section appended to the document
WHOLE_MODELS_HEADING = """\
## VT-FPN, semantic FPN and UperNet: whole models

The same ResTv2-T backbone under three decoders (see docs/vt_fpn.md), split into backbone,
neck and head:
"""


def whole_models_section() -> str:
    """The whole-model table (counts three models at two sizes, about a minute)."""
    return _whole_models_section(command="python tools/flops_doc.py")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/flops.md", help="document to write (docs/flops.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    rc = cli(["flops", *BACKBONES, "--all", "--markdown", args.out]
             + (["--no-progress"] if args.no_progress else []))
    if rc == 0:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + PAPER_NOTES + "\n" + WHOLE_MODELS_HEADING + "\n"
                    + whole_models_section() + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
