"""Train a detector or segmentor: an MMDetection / MMSegmentation config (mmengine's Runner)
or a detectron2 config (yacs .yaml or LazyConfig .py).

CONFIG is a file or a shipped config name (`rest-dense configs` lists them). The framework
is read from the config itself (--framework to override): .yaml files with detectron2's
upper-case sections and Python files defining `dataloader` / `lr_multiplier` are
detectron2; files with `_base_`, `default_scope`, `train_dataloader`, ... are OpenMMLab.

Overrides go after the options (or with --cfg-options): `key=value` for OpenMMLab and
LazyConfigs, `KEY VALUE` (or `KEY=VALUE`) for yacs configs.

Examples:

  rest-dense train mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py
  rest-dense train upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py \\
      --work-dir work_dirs/upernet_t train_dataloader.batch_size=4
  rest-dense train CONFIG --work-dir work_dirs/run1 --resume      # latest checkpoint there
  rest-dense train CONFIG --resume work_dirs/run1/iter_8000.pth   # that checkpoint
  rest-dense train toy/mask_rcnn_restv2_toy.py train_cfg.max_iters=60   # short, same shape
  torchrun --nproc_per_node 8 -m rest_dense.cli train CONFIG --launcher pytorch   # 8 GPUs
                                   # (in a clone: bash tools/dist_train.sh CONFIG 8)
  rest-dense train detectron2/mask_rcnn_restv2_tiny_3x.yaml --num-gpus 8
  rest-dense train detectron2/toy/mask_rcnn_restv2_toy.yaml --threads 1 \\
      MODEL.DEVICE cpu SOLVER.MAX_ITER 100
  rest-dense train detectron2/lazy/mask_rcnn_restv2_tiny_3x.py --num-gpus 8 train.max_iter=1000

Checkpoints: files are read with torch.load(weights_only=True) and an allow-list that
covers mmengine's and detectron2's training checkpoints (rest_dense/safe_load.py), wherever
they lie. A file that needs more is unpickled in full only if you name it (or its folder)
with --trust-checkpoint; nothing is trusted implicitly, not the work dir and not the
--resume file. Never trust files you did not produce: unpickling runs code.

Resuming: checkpoints are written atomically (temporary file, fsync, rename) and an old one
is deleted only after the new one is complete, so a run killed at any moment -- also while
saving -- continues with --resume from its last complete checkpoint. --resume without a
value takes the most recent checkpoint of the work / output dir that loads (a damaged one is
skipped with a warning naming it; a moved or copied work dir resumes from its own files);
with nothing to resume from, a warning says so and training starts from scratch.

Short runs: the toy configs (scale_schedule_with_max_iters = True, detectron2:
SOLVER.SCALE_SCHEDULE_WITH_MAX_ITER: True) stretch warm-up, lr steps, checkpoint and
evaluation intervals (OpenMMLab: also logging) with an overridden train_cfg.max_iters /
SOLVER.MAX_ITER, unless you set those too. Without a GPU, configs that train with mixed precision fall back to fp32.

Mixed precision: --amp turns it on in the config's precision (fp16 unless the config says
bf16), --amp-dtype bf16 in bf16: autocast without a grad scaler, on the CPU as well as on GPUs
(docs/mixed_precision.md). fp16 needs a GPU (an accelerator for OpenMMLab, CUDA for
detectron2) and falls back to fp32 without one.

  rest-dense train toy/mask_rcnn_restv2_toy.py --amp-dtype bf16
  rest-dense train detectron2/toy/mask_rcnn_restv2_toy.yaml --amp-dtype bf16 MODEL.DEVICE cpu
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from typing import Any, Dict, List, Optional

from ..run_files import CHECKPOINT_ERRORS  # light: torch only
from ..utils import (ImageReadError, check_output_path, env_var, error_text,
                     make_parent_folder, positive_int, reading_images, same_file)
from ..configs import ConfigBuildError
from . import fail

HELP = "train a detector / segmentor (MMDetection, MMSegmentation or detectron2 config)"

#: options that only one family of frameworks understands: dest -> (flag, family)
_MM_ONLY = {"auto_scale_lr": "--auto-scale-lr", "launcher": "--launcher", "tta": "--tta",
            "show_dir": "--show-dir", "show": "--show", "wait_time": "--wait-time"}
_D2_ONLY = {"num_gpus": "--num-gpus", "num_machines": "--num-machines",
            "machine_rank": "--machine-rank", "dist_url": "--dist-url", "eval_only": "--eval-only",
            "lazy": "--lazy"}
_FAMILY_NAMES = {"openmmlab": "an MMDetection / MMSegmentation", "detectron2": "a detectron2"}
_D2_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")



class UsageError(Exception):
    """Bad command-line input; reported as ``rest-dense <command>: error: ...``."""


# ----------------------------------------------------------------------------- parsing
def allow_intermixed(parser: argparse.ArgumentParser) -> None:
    """Let trailing positional overrides follow options (``CONFIG --work-dir W KEY=V``):
    argparse's plain parsing stops filling positionals at the first option."""
    plain = parser.parse_known_args
    busy: List[bool] = []

    def parse_known_args(args=None, namespace=None):
        if busy:  # parse_known_intermixed_args calls back in
            return plain(args, namespace)
        busy.append(True)
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            busy.pop()

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint PATH ...``: the only way to let a file be unpickled in full."""
    parser.add_argument("--trust-checkpoint", nargs="+", default=[], metavar="PATH",
                        help="checkpoints (or folders) of your own that may be unpickled in "
                        "full if torch.load(weights_only=True) and rest_dense's allow-list "
                        "refuse them; unpickling runs code, so never for files you did not "
                        "produce (nothing is trusted without this flag)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``test``."""
    parser.add_argument("--framework", choices=("auto", "openmmlab", "detectron2"), default="auto",
                        help="which framework runs CONFIG (default: read from the config)")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="logs, checkpoints, metrics (OpenMMLab default: ./work_dirs/<config "
                        "name>; detectron2: the config's OUTPUT_DIR)")
    parser.add_argument("--threads", "--cpu-threads", type=positive_int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice); 1 is much faster than "
                        "several on a CPU shared with other jobs")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, like the trailing ones")
    parser.add_argument("--toy-root", default=None, metavar="DIR",
                        help="the toy configs' dataset (`python -m rest_dense.data.toy` writes "
                        "it): detectron2 registers it as toy_train / toy_val (default: "
                        "$REST_DENSE_TOY_ROOT or data/toy); OpenMMLab configs read it instead "
                        "of their data/toy/")
    mm = parser.add_argument_group("MMDetection / MMSegmentation")
    mm.add_argument("--launcher", choices=("none", "pytorch", "slurm", "mpi"), default=None,
                    help="job launcher for distributed runs (default: none)")
    mm.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    d2 = parser.add_argument_group("detectron2")
    d2.add_argument("--num-gpus", type=int, default=None,
                    help="GPUs (worker processes) per machine (default: 1)")
    d2.add_argument("--num-machines", type=int, default=None, help="machines (default: 1)")
    d2.add_argument("--machine-rank", type=int, default=None, help="rank of this machine")
    d2.add_argument("--dist-url", default=None,
                    help="torch.distributed init URL (default: a per-user localhost port)")
    d2.add_argument("--lazy", action="store_true", default=None,
                    help="CONFIG is a LazyConfig (default: by extension, .py)")


def add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="config overrides after the options: key=value (OpenMMLab, "
                        "LazyConfig) or KEY VALUE / KEY=VALUE (detectron2 yaml)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    allow_intermixed(parser)
    parser.add_argument("config", help="config file or shipped config name (rest-dense configs)")
    add_overrides_argument(parser)
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue training: from CHECKPOINT, or without a value from the "
                        "most recent checkpoint in the work / output dir that loads (none "
                        "there: a warning, and training starts from scratch)")
    add_trust_argument(parser)
    parser.add_argument("--amp", action="store_true",
                        help="mixed-precision training in the config's precision (fp16 unless "
                        "the config says bf16; fp16 falls back to fp32 without a GPU)")
    parser.add_argument("--amp-dtype", type=parse_amp_dtype, default=None,
                        metavar="{fp16,bf16}",
                        help="mixed precision in this dtype (implies --amp): fp16 (float16; "
                        "autocast + grad scaler, GPU only) or bf16 (bfloat16; autocast without "
                        "grad scaler, CPU and GPU). OpenMMLab: AmpOptimWrapper / "
                        "BF16OptimWrapper; detectron2: SOLVER.AMP.PRECISION / "
                        "train.amp.precision")
    add_common_arguments(parser)
    parser.add_argument("--auto-scale-lr", action="store_true", default=None,
                        help="OpenMMLab: scale the lr by total batch size / "
                        "auto_scale_lr.base_batch_size")
    parser.add_argument("--eval-only", action="store_true", default=None,
                        help="detectron2: evaluate MODEL.WEIGHTS instead of training (see also "
                        "`rest-dense test`)")


def parse_amp_dtype(value: str) -> str:
    """``--amp-dtype``: ``'float16'`` or ``'bfloat16'`` (also ``fp16``, ``bf16``, ...)."""
    from ..amp import parse_precision

    try:
        return parse_precision(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def amp_setting(args: argparse.Namespace):
    """What ``--amp`` / ``--amp-dtype`` ask for: ``False`` (the config's setting), ``True``
    (mixed precision in the config's precision), ``'float16'`` or ``'bfloat16'``."""
    dtype = getattr(args, "amp_dtype", None)
    return dtype if dtype else bool(getattr(args, "amp", False))


def d2_amp_overrides(args: argparse.Namespace, lazy: bool) -> List[str]:
    """detectron2 overrides for ``--amp`` / ``--amp-dtype`` (before the user's own)."""
    amp = amp_setting(args)
    if amp is False:
        return []
    if lazy:
        return ["train.amp.enabled=True"] + ([] if amp is True else [f"train.amp.precision={amp}"])
    return ["SOLVER.AMP.ENABLED", "True"] + ([] if amp is True else ["SOLVER.AMP.PRECISION", amp])


# ----------------------------------------------------------------------------- preparation
def resolve_config(args: argparse.Namespace) -> None:
    """Set ``args.config_path`` (file, shipped name or ``pkg::path``), ``args.family``
    (``'openmmlab'`` / ``'detectron2'``) and, when read from the config,
    ``args.config_framework`` (:func:`rest_dense.configs.config_framework`)."""
    from ..configs import (ConfigBuildError, ConfigSyntaxError, config_framework, framework_family,
                           get_config_path)

    try:
        args.config_path = get_config_path(args.config)
    except FileNotFoundError as err:
        raise UsageError(str(err).strip('"')) from None
    args.config_framework = None
    if args.framework != "auto":
        args.family = args.framework
        return
    try:
        args.config_framework = config_framework(args.config_path)
    except (ConfigSyntaxError, ConfigBuildError, FileNotFoundError) as err:  # none would read it
        raise UsageError(error_text(err)) from None
    except ValueError as err:
        raise UsageError(f"{err}; pass --framework openmmlab or --framework detectron2") from None
    args.family = framework_family(args.config_framework)


def check_family_options(args: argparse.Namespace) -> None:
    """Refuse options of the other family of frameworks, naming them."""
    other = _D2_ONLY if args.family == "openmmlab" else _MM_ONLY
    given = [flag for dest, flag in other.items() if getattr(args, dest, None) not in (None, False)]
    if given:
        raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not an option for "
                         f"{_FAMILY_NAMES[args.family]} config ({args.config_path})")


def check_output_options(args: argparse.Namespace) -> None:
    """Refuse, before anything runs, output paths that cannot be written or would overwrite
    an input: ``--work-dir`` / an absolute ``--show-dir`` that are files or lie below one,
    ``--save-metrics`` naming the config, the checkpoint, the work dir or a folder."""
    inputs = [getattr(args, "config_path", None), getattr(args, "checkpoint", None),
              getattr(args, "resume", None) if isinstance(getattr(args, "resume", None), str)
              else None]
    try:
        if getattr(args, "work_dir", None) is not None:
            check_output_path(args.work_dir, "--work-dir", folder=True)
        # MMEngine puts a relative --show-dir under <work dir>/<timestamp>/: a new folder
        show_dir = getattr(args, "show_dir", None)
        if show_dir is not None and (not show_dir or os.path.isabs(show_dir)):
            check_output_path(show_dir, "--show-dir", folder=True)
        if getattr(args, "save_metrics", None) is not None:
            if getattr(args, "work_dir", None) and same_file(args.save_metrics, args.work_dir):
                raise ValueError(f"--save-metrics {args.save_metrics!r} is the --work-dir; "
                                 "give a file name (e.g. inside it)")
            config = getattr(args, "config_path", None)
            if config:
                from ..configs import config_files

                inputs += config_files(config)
            check_output_path(args.save_metrics, "--save-metrics", inputs)
            check_replaces_metrics(args.save_metrics)
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_replaces_metrics(path: str) -> None:
    """``--save-metrics`` replaces an existing file only if it holds metrics (a small JSON
    object of names and values, some of them numbers, as it writes): not a dataset's
    annotations, a class list or another file the config names.

    Raises:
        ValueError: ``path`` holds something else.
    """
    if not os.path.isfile(path):
        return
    import json

    ok = os.path.getsize(path) == 0
    if 0 < os.path.getsize(path) <= (1 << 20):  # metrics files are small: larger ones are not
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            values = list(data.values()) if isinstance(data, dict) else [[]]
            ok = all(not isinstance(v, (dict, list)) for v in values) and any(
                v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values)
        except (OSError, ValueError):
            ok = False
    if not ok:
        raise ValueError(f"--save-metrics {path!r} exists and holds no metrics (an annotation "
                         "or other data file?); it would be overwritten: give another path")


def check_config_not_overwritten(config: str, out_dir: str, written_name: str,
                                 bases_only: bool = False) -> None:
    """Training and testing write the config as run to ``out_dir/written_name``: refuse when
    that is the user's config file or a file it builds on (``--work-dir`` = its folder).
    ``bases_only`` (test): only the files it builds on; evaluating the config a training
    run saved into its own folder rewrites it with the same config, as the toolboxes do.

    Raises:
        ValueError: naming the file and what to do.
    """
    from ..configs import config_files

    written = os.path.join(os.fspath(out_dir), written_name)
    if not os.path.exists(written):
        return
    files = [config] + config_files(config)  # the config and every file it builds on
    for read in files:
        if bases_only and same_file(read, config):
            continue  # test: rewriting a run's saved config in its own folder, as mmdet does
        if same_file(written, read):
            raise ValueError(f"the output folder {out_dir} holds the config file {read}, which "
                             f"the run would overwrite with the config as run "
                             f"({written_name}); choose another --work-dir / output folder")


def fix_resume(args: argparse.Namespace) -> None:
    """``--resume`` takes an optional value, so ``--resume KEY=V`` / ``--resume KEY V``
    would swallow an override: a value that is no file but looks like an override goes
    back to the overrides."""
    value = getattr(args, "resume", None)
    if value not in (None, "auto") and _looks_like_override(value):
        args.overrides.insert(0, value)
        args.resume = "auto"


def _looks_like_override(value: str) -> bool:
    return not os.path.exists(value) and ("=" in value or bool(_D2_KEY.match(value)))


def fix_trust(args: argparse.Namespace) -> None:
    """``--trust-checkpoint PATH [PATH ...]`` takes every word after it, so overrides written
    after it (``--trust-checkpoint x.pth train_cfg.max_iters=2``) were read as paths and
    silently dropped: from the first word that is no path but looks like an override, the
    words go back to the overrides."""
    values = list(getattr(args, "trust_checkpoint", None) or [])
    for i, value in enumerate(values):
        if _looks_like_override(value):
            args.trust_checkpoint = values[:i]
            args.overrides = values[i:] + list(args.overrides or [])
            return


def overrides(args: argparse.Namespace) -> List[str]:
    return list(args.cfg_options or []) + list(args.overrides or [])


def _given(value: Optional[int], default: int) -> int:
    return default if value is None else value


def d2_namespace(args: argparse.Namespace, **extra: Any) -> argparse.Namespace:
    """The namespace :func:`rest_dense.d2.launch.main` expects."""
    from ..d2.launch import default_dist_url

    machines = _given(args.num_machines, 1)
    # several machines: no default URL (a per-user port on 127.0.0.1 reaches no other
    # machine); check_args then asks for --dist-url
    url = args.dist_url or (default_dist_url() if machines == 1 else None)
    return argparse.Namespace(
        config_file=args.config_path, opts=overrides(args),
        resume=extra.pop("resume", False), eval_only=bool(extra.pop("eval_only", False)),
        # None: not given; 0 is a value (refused by check_args), never "the default"
        num_gpus=_given(args.num_gpus, 1), num_machines=machines,
        machine_rank=_given(args.machine_rank, 0), dist_url=url,
        lazy=bool(args.lazy), toy_root=toy_data_root(args),
        cpu_threads=args.threads or 0, output_dir=args.work_dir,
        trust_checkpoint=list(getattr(args, "trust_checkpoint", None) or []), **extra)


def print_metrics(metrics: Optional[Dict[str, Any]], save: Optional[str] = None) -> None:
    """Print the final metrics (flattened) and optionally save them as JSON (standard JSON:
    a metric without a value, NaN or infinite, is written as null and named in a warning)."""
    import json
    import math

    flat: Dict[str, Any] = {}

    def _walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                _walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            try:
                flat[prefix] = float(value)
            except (TypeError, ValueError):
                flat[prefix] = str(value)

    _walk("", dict(metrics or {}))
    if flat:
        width = max(len(k) for k in flat)
        print("metrics:")
        for k, v in flat.items():
            shown = f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else v
            print(f"  {k:<{width}}  {shown}")
    undefined = [k for k, v in flat.items() if isinstance(v, float) and not math.isfinite(v)]
    if undefined:
        shown = ", ".join(undefined[:6]) + (f" and {len(undefined) - 6} more"
                                             if len(undefined) > 6 else "")
        print(f"warning: {len(undefined)} metric(s) without a value (NaN or infinite): {shown}; the "
              f"evaluation found nothing to score for them (no annotated objects or labelled "
              f"pixels in the set, or no predictions)", file=sys.stderr)
    if save:
        with open(make_parent_folder(save), "w") as f:
            json.dump({k: None if k in undefined else v for k, v in flat.items()}, f, indent=2,
                      allow_nan=False)
        print(f"metrics saved to {save}")


# ----------------------------------------------------------------------------- running
#: torch's BatchNorm in training on a map with one value per channel (batch 1, 1x1 map), and
#: the VT-FPN token norm's own check of the same (batch 1, 1 token)
_ONE_VALUE_PER_CHANNEL = ("Expected more than 1 value per channel when training",
                          "needs more than one token per batch in training")


def _one_value_per_channel(err: BaseException) -> bool:
    return any(text in str(err) for text in _ONE_VALUE_PER_CHANNEL)


def one_value_per_channel(err: BaseException, batch_key: str) -> str:
    """torch's message for a BatchNorm that got one value per channel in training, with the
    cause a config can change."""
    return (f"{error_text(err)}: a BatchNorm of the model (in a head, e.g. UPerHead's 1x1 "
            f"pooling branch, or VT-FPN's token norm) saw one value per channel in training; "
            f"train with at least 2 images per process ({batch_key}), or with SyncBN over "
            "several processes")


def toy_data_root(args: argparse.Namespace) -> str:
    """The toy dataset the run reads: ``--toy-root``, else ``$REST_DENSE_TOY_ROOT`` (for
    detectron2), else ``data/toy``."""
    from ..data.toy import DEFAULT_TOY_ROOT

    if args.toy_root:
        return args.toy_root
    return (env_var("TOY_ROOT", DEFAULT_TOY_ROOT) if args.family == "detectron2"
            else DEFAULT_TOY_ROOT)


def toy_data_hint(args: argparse.Namespace, message: str) -> str:
    """A missing-file message, with how to write the toy dataset when the file is one of it."""
    from ..data.toy import missing_toy_data_hint

    option = ("--toy-root (or REST_DENSE_TOY_ROOT)" if args.family == "detectron2"
              else "--toy-root")
    return missing_toy_data_hint(message, toy_data_root(args), option=option)


def prepare_run(args: argparse.Namespace) -> None:
    """What ``train`` and ``test`` do before running: the config resolved, the options
    checked against its framework and against each other, the thread count set.

    Raises:
        UsageError: options that contradict each other, the config or the file system.
    """
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    resolve_config(args)
    check_family_options(args)
    fix_resume(args)
    fix_trust(args)
    check_output_options(args)
    if getattr(args, "weights_only", False) and getattr(args, "trust_checkpoint", False):
        raise UsageError("--weights-only (trust nothing) contradicts --trust-checkpoint")
    if args.toy_root is not None and not args.toy_root.strip():
        raise UsageError("--toy-root needs a folder (it was empty)")
    if getattr(args, "checkpoint", None) is not None and not str(args.checkpoint).strip():
        raise UsageError("the checkpoint to evaluate is an empty string")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def run(args: argparse.Namespace) -> int:
    try:
        prepare_run(args)
    except UsageError as err:
        return fail("train", error_text(err))

    if args.family == "detectron2":
        from ..d2.launch import check_args, launch_main, output_dir_of

        lazy = bool(args.lazy) or (args.config_framework == "d2-lazy" if args.config_framework
                                   else args.config_path.endswith(".py"))
        amp = d2_amp_overrides(args, lazy=lazy)
        ns = d2_namespace(args, resume=args.resume if args.resume not in (None, "auto")
                          else args.resume == "auto", eval_only=args.eval_only)
        ns.opts = amp + ns.opts
        try:
            check_args(ns)
            out_dir = args.work_dir or output_dir_of(ns)  # the config's, when not given
            if not args.eval_only:
                check_config_not_overwritten(args.config_path, out_dir, "config.yaml")
        except (FileNotFoundError, ValueError) as err:
            return fail("train", error_text(err))
        from ..distributed import LaunchError
        from ..runlock import FolderBusyError, hold_folder

        try:  # one live run per output folder (rest_dense.runlock), held by machine 0
            with (hold_folder(out_dir, "training", primary=ns.machine_rank == 0)
                  if not args.eval_only else contextlib.nullcontext()), reading_images():
                results = launch_main(ns)
        except (FolderBusyError, ConfigBuildError, FileNotFoundError, LaunchError,
                ImageReadError) as err:
            return fail("train", toy_data_hint(args, error_text(err)))  # the dataset's files
        except CHECKPOINT_ERRORS as err:
            return fail("train", error_text(err))
        except ValueError as err:  # after the checkpoint errors, some of which are ValueErrors
            if not _one_value_per_channel(err):
                raise
            return fail("train", one_value_per_channel(err, "SOLVER.IMS_PER_BATCH"))
        if results:
            print_metrics(results)
        return 0

    from ..mm.runner import (build_loops, build_runner, check_resume_optimizer,
                             check_same_start, check_start_checkpoint, train_config)

    try:
        cfg = train_config(args.config_path, work_dir=args.work_dir, amp=amp_setting(args),
                           resume=args.resume, cfg_options=overrides(args),
                           launcher=args.launcher or "none",
                           auto_scale_lr=bool(args.auto_scale_lr), trust=args.trust_checkpoint,
                           toy_root=args.toy_root)
    except (FileNotFoundError, ValueError, KeyError) + CHECKPOINT_ERRORS as err:
        return fail("train", error_text(err))
    try:  # mmengine writes the config as run to <work dir>/<its file name>
        check_config_not_overwritten(args.config_path, cfg.work_dir,
                                     os.path.basename(args.config_path))
    except ValueError as err:
        return fail("train", error_text(err))
    from ..distributed import LaunchError, close_process_group
    from ..runlock import FolderBusyError, hold_folder

    try:  # one live run per work dir (rest_dense.runlock): checked before anything is written
        with hold_folder(cfg.work_dir, "training"):
            if not args.resume:
                from ..mm.run_files import CHECKPOINT_PATTERN
                from ..run_files import earlier_run_warning

                warning = earlier_run_warning(cfg.work_dir, CHECKPOINT_PATTERN)
                if warning:
                    print(f"rest-dense train: warning: {warning}", file=sys.stderr)
            runner = build_runner(cfg)
            check_same_start(cfg)  # every machine resumes from the same file
            check_start_checkpoint(runner.model, cfg)
            build_loops(runner, "train")  # a bad loader / optimizer value: one line
            check_resume_optimizer(runner, cfg)
            with reading_images():
                runner.train()
            close_process_group()
    except (FolderBusyError, ImageReadError) as err:
        return fail("train", error_text(err))
    except CHECKPOINT_ERRORS as err:
        return fail("train", error_text(err))
    except (ConfigBuildError, FileNotFoundError, LaunchError) as err:  # also the dataset,
        return fail("train", toy_data_hint(args, error_text(err)))  # when loaders are built
    except ValueError as err:  # after the checkpoint errors, some of which are ValueErrors
        if not _one_value_per_channel(err):
            raise
        return fail("train", one_value_per_channel(err, "train_dataloader.batch_size"))
    if os.environ.get("RANK", "0") == "0":  # once per job, not once per process
        print(f"rest-dense train: done; logs and checkpoints in {os.path.abspath(cfg.work_dir)}")
    return 0
