"""Run a trained model on images: pictures with the predictions drawn, plus machine-readable
results.

CONFIG is a config file or a shipped config name (`rest-dense configs`); MMDetection and
MMSegmentation configs run through DetInferencer / MMSegInferencer, detectron2 yaml configs
through DefaultPredictor (LazyConfig .py files run the same steps). CHECKPOINT holds the whole
model (ours, or a released one the loaders understand); one of another model is an error.
INPUTS are image files, folders (searched recursively) and glob patterns.

Written under --out:

    vis/<name>.jpg      the image with the predictions (detections with score >= --score-thr)
    preds/<name>.json   detection: bbox [x1, y1, x2, y2], score, label, category and an RLE
                        mask (pycocotools) per instance with score >= --score-thr
    preds/<name>.png    segmentation: class index per pixel (8-bit; 16-bit above 256 classes)
    summary.json        status (complete / errors / interrupted), config, checkpoint,
                        classes, files per image, skipped inputs, images the model failed
                        on, inputs not processed

--out must not hold another run's results (summary.json, preds/, vis/) unless --overwrite is
given, which removes them first (the files that run's summary.json lists, or all of
preds/ and vis/ of a run that did not finish; files a finished run does not list are never
removed: the run is refused); a folder another live infer is writing into is refused
(naming that process). SIGINT / SIGTERM stop between images and leave summary.json with
"status": "interrupted" and the inputs not processed (exit code 130).

Images that cannot be decoded are skipped and listed; images the model fails on (a 1x300
strip) are listed as failed while the others are processed. Exit code 1 when no image could
be processed or the model failed on some; 2 for a bad config, checkpoint or argument, also
when the model fails on every image with one error.

Examples::

    rest-dense infer configs/toy/mask_rcnn_restv2_toy.py work_dirs/toy/iter_600.pth \\
        data/toy/val --out out/toy_det
    rest-dense infer toy/upernet_restv2_toy.py iter_600.pth 'photos/*.jpg' --out out/seg
    rest-dense infer configs/detectron2/toy/mask_rcnn_restv2_toy.yaml model_final.pth \\
        img1.png img2.png --out out/d2 --score-thr 0.5 --device cuda
    rest-dense infer mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py mrcnn_t.pth demo.jpg \\
        --out out/coco --cfg-options model.test_cfg.rcnn.score_thr=0.1
"""
from __future__ import annotations

import argparse
import sys

from ..utils import error_text
from . import fail

HELP = "run a trained model on images (pictures + JSON / label PNGs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="config file or shipped config name")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="whole-model checkpoint")
    parser.add_argument("inputs", metavar="INPUTS", nargs="+",
                        help="image files, folders and glob patterns")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--score-thr", type=float, default=0.3,
                        help="detections below this score are not drawn or written (default: 0.3)")
    parser.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE",
                        help="config overrides (OpenMMLab: model.test_cfg.rcnn.score_thr=0.1, "
                             "values as mmengine's --cfg-options reads them; detectron2: "
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.1)")
    parser.add_argument("--no-vis", action="store_true", help="write no pictures")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out may hold another run's results: remove them (the files "
                             "its summary.json lists, and the summary) first; without it such "
                             "a folder is refused")
    from .train import add_trust_argument

    add_trust_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import pickle

    from ..deploy.infer import InferenceInterrupted, run_inference
    from ..runlock import FolderBusyError
    from ..safe_load import trust

    trust(*args.trust_checkpoint)
    try:
        summary = run_inference(args.config, args.checkpoint, args.inputs, args.out,
                                device=args.device, score_thr=args.score_thr,
                                cfg_options=args.cfg_options,
                                draw=not args.no_vis, progress=not args.quiet,
                                overwrite=args.overwrite)
    except InferenceInterrupted as e:
        return fail("infer", error_text(e), 130)
    except (FileNotFoundError, ValueError, ImportError, OSError, pickle.UnpicklingError,
            FolderBusyError) as e:
        return fail("infer", error_text(e))
    for item in summary.skipped:
        print(f"skipped {item['input']}: {item['error']}", file=sys.stderr)
    for item in summary.failed:
        print(f"failed {item['input']}: {item['error']}", file=sys.stderr)
    if summary.not_images:
        k = len(summary.not_images)
        print(f"note: {k} file{'s' if k != 1 else ''} of the input folders left out for "
              f"{'their suffixes' if k != 1 else 'its suffix'} (e.g. {summary.not_images[0]}; "
              "summary.json lists them; name a file to take it as an image)", file=sys.stderr)
    n = len(summary.processed)
    what = ("detections" if summary.task == "det" else "label maps")
    print(f"{n} image{'s' if n != 1 else ''} processed ({summary.framework}, {what}), "
          f"{len(summary.skipped)} skipped, {len(summary.failed)} failed, "
          f"{summary.seconds:.1f} s; results in {summary.out_dir}")
    errors = {item["error"] for item in summary.failed}
    model_failed = [item for item in summary.failed if item.get("cause") != "image"]
    if model_failed and n == 0 and len(errors) == 1:
        return fail("infer", "the model failed on every image with the same error, a problem "
                    f"of the config or checkpoint rather than of the images: {errors.pop()}")
    if summary.failed:
        others = ("the others' results are written (summary.json lists both)" if n else
                  "no image could be processed (summary.json lists why)")
        return fail("infer", f"the model failed on {len(summary.failed)} image(s); {others}", 1)
    if n == 0:
        return fail("infer", "no image could be processed", 1)
    return 0
