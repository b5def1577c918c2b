"""Train / evaluate detectron2 models with ResT backbones: what ``rest-dense train`` /
``rest-dense test`` run for detectron2 configs (yacs ``.yaml`` or LazyConfig ``.py``), and
what ``tools/train_net.py`` runs with detectron2's usual command line.

Example::

    from rest_dense.d2.launch import build_parser, launch_main

    args = build_parser().parse_args(
        ["--config-file", "configs/detectron2/toy/mask_rcnn_restv2_toy.yaml",
         "--cpu-threads", "1", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "20"])
    results = launch_main(args)

Overrides follow the config: ``KEY VALUE`` pairs for yaml configs and ``key=value`` for
LazyConfigs; either spelling is accepted for both (:func:`normalize_overrides`).
Datasets named ``toy_train`` / ``toy_val`` (instances) and ``toy_sem_seg_train`` /
``toy_sem_seg_val`` (label maps) are registered from ``--toy-root``.

Checkpoints are read under :mod:`rest_dense.safe_load`'s policy; beyond what the allow-list
admits (which covers detectron2's and mmengine's training checkpoints), full unpickling is
allowed only for ``--trust-checkpoint`` paths -- not for the run's ``OUTPUT_DIR``, a
``--resume FILE`` or the checkpoint under test. Trust is registered in each worker process.
``--resume`` without a file continues from the most recent checkpoint of the output folder
that loads, and says so when there is none
(:meth:`rest_dense.d2.checkpointer.RestDetectionCheckpointer.resume_or_load`).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from ..configs import ConfigBuildError, building_from_config
from ..distributed import launch as launch_processes
from ..distributed import local_process_group
from ..safe_load import checkpoint_file, trust
from ..utils import check_count, env_var, error_text
from .checkpointer import RestDetectionCheckpointer
from .data import register_toy_datasets, register_toy_sem_seg_datasets
from .engine import (RestTrainer, check_weights_file, default_setup, is_lazy_config,
                     lazy_build_model, lazy_test, lazy_train, setup_lazy_config,
                     setup_yaml_config)

__all__ = ["add_launch_arguments", "add_job_arguments", "build_parser", "normalize_overrides",
           "job_overrides", "check_args", "check_machines", "main", "launch_main", "cli_main", "default_dist_url"]

logger = logging.getLogger("rest_dense.d2.launch")

def default_dist_url() -> str:
    """detectron2's deterministic per-user port on localhost (orphaned workers show up as a
    port in use rather than as silent clashes)."""
    port = 2 ** 15 + 2 ** 14 + hash(os.getuid() if hasattr(os, "getuid") else 1) % 2 ** 14
    return f"tcp://127.0.0.1:{port}"


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``."""
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs (processes) per machine")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0,
                        help="the rank of this machine (unique per machine)")
    parser.add_argument("--dist-url", default=default_dist_url(),
                        help="initialization URL of torch.distributed ('auto': a free port)")


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``rest_dense`` adds to detectron2's: ``--lazy``, ``--toy-root``,
    ``--cpu-threads``, ``--trust-checkpoint``."""
    parser.add_argument("--lazy", action="store_true",
                        help="treat the config as a LazyConfig (default: by extension, .py)")
    parser.add_argument("--toy-root", default=env_var("TOY_ROOT", "data/toy"),
                        help="root of the toy dataset, registered as toy_train / toy_val (COCO "
                        "instances) and toy_sem_seg_train / toy_sem_seg_val (label maps) "
                        "(default: $REST_DENSE_TOY_ROOT or data/toy)")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice); 1 is much faster than "
                        "several on a CPU shared with other jobs")
    parser.add_argument("--trust-checkpoint", nargs="+", default=[], metavar="PATH",
                        help="checkpoints (or folders) of your own that may be unpickled in full "
                        "if torch.load(weights_only=True) refuses them")


def build_parser() -> argparse.ArgumentParser:
    """``tools/train_net.py``'s command line: detectron2's ``default_argument_parser``
    (``--config-file``, ``--resume``, ``--eval-only``, launch options, trailing overrides)
    plus :func:`add_job_arguments`."""
    parser = default_argument_parser()
    add_job_arguments(parser)
    return parser


def normalize_overrides(opts: Sequence[str], lazy: bool) -> List[str]:
    """Overrides in the form the config type expects.

    Accepts ``KEY VALUE`` pairs and ``key=value`` items, mixed, for both config types.

    Args:
        opts: the trailing command-line overrides.
        lazy: LazyConfig (``key=value`` items) rather than yacs (flat ``KEY VALUE`` list).

    Returns:
        ``['key=value', ...]`` for LazyConfigs, ``['KEY', 'VALUE', ...]`` for yacs.

    Raises:
        ValueError: a key without a value.
    """
    pairs: List[tuple] = []
    items = list(opts)
    i = 0
    while i < len(items):
        item = items[i]
        if "=" in item:  # keys never hold '='
            key, value = item.split("=", 1)
            if not key:
                raise ValueError(f"override {item!r} has no key")
            pairs.append((key, value))
            i += 1
            continue
        if i + 1 >= len(items):
            raise ValueError(f"override {item!r} has no value (use KEY VALUE or key=value)")
        pairs.append((item, items[i + 1]))
        i += 2
    if lazy:
        return [f"{k}={v}" for k, v in pairs]
    return [x for kv in pairs for x in kv]


def job_overrides(args: argparse.Namespace, lazy: bool) -> List[str]:
    """The overrides of a job: ``args.opts`` plus those implied by ``args.output_dir`` (the
    output folder) and ``args.weights`` (the checkpoint to evaluate), both optional."""
    opts = normalize_overrides(getattr(args, "opts", None) or [], lazy)
    extra = []
    output_dir = getattr(args, "output_dir", None)
    if output_dir:
        extra.append(("train.output_dir" if lazy else "OUTPUT_DIR", os.fspath(output_dir)))
    weights = getattr(args, "weights", None)
    if weights:
        extra.append(("train.init_checkpoint" if lazy else "MODEL.WEIGHTS", os.fspath(weights)))
    for key, value in extra:
        opts += [f"{key}={value}"] if lazy else [key, value]
    return opts


def _resume_file(args: argparse.Namespace) -> Optional[str]:
    resume = getattr(args, "resume", False)
    if isinstance(resume, str) and resume not in ("", "auto"):
        return resume
    return None


def _trust_from_args(args: argparse.Namespace) -> None:
    """Only the paths the user named with ``--trust-checkpoint``."""
    trust(*(getattr(args, "trust_checkpoint", None) or []))


def _check_eval_weights(checkpointer: RestDetectionCheckpointer, weights: str,
                        resume_file: Optional[str], args: argparse.Namespace) -> None:
    """``--eval-only`` scores the weights it loads; with none, it would score a randomly
    initialised model."""
    if resume_file or weights or (args.resume and checkpointer.has_checkpoint()):
        return
    raise ValueError("--eval-only needs weights to evaluate: set MODEL.WEIGHTS (yacs) or "
                     "train.init_checkpoint (LazyConfig), or pass --resume with checkpoints in "
                     "the output folder")


def _check_test_datasets(names: Sequence[str], key: str) -> None:
    import difflib

    from detectron2.data import DatasetCatalog

    known = DatasetCatalog.list()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ValueError(f"{key}: {name!r} is not a registered dataset "
                             f"(detectron2's DatasetCatalog){hint}")


def _check_test_data(names: Sequence[str], key: str) -> None:
    """Before an evaluation: each test dataset holds images (detectron2 stops on an empty
    one by assertion, with a traceback).

    Raises:
        ConfigBuildError: naming the dataset and the key that chose it.
    """
    from detectron2.data import DatasetCatalog

    for name in names:
        if not len(DatasetCatalog.get(name)):
            raise ConfigBuildError(f"{key}: dataset {name!r} holds no images; there is "
                                   "nothing to evaluate")


def _check_pixel_stats(mean: Sequence[float], std: Sequence[float], keys: Sequence[str]) -> None:
    mean, std = list(mean), list(std)
    if len(mean) != len(std):
        raise ValueError(f"{keys[0]} and {keys[1]} need one value per input channel each, "
                         f"got {len(mean)} and {len(std)} values")
    if not all(s > 0 for s in std):  # NaN too
        raise ValueError(f"{keys[1]} values must be > 0 (the images are divided by them), "
                         f"got {std}")


def _check_periods(checkpoint_period: int, eval_period: int, keys: Sequence[str]) -> None:
    if checkpoint_period <= 0:
        raise ValueError(f"{keys[0]} must be >= 1, got {checkpoint_period}")
    if eval_period < 0:
        raise ValueError(f"{keys[1]} must be >= 0 (0: at the end only), got {eval_period}")


def _check_run_settings(cfg) -> None:
    """What detectron2 reads only after training started, or reads without a clear error,
    in a yacs config: the test datasets (used at the first evaluation and at the end, when
    a bad name would throw away a finished run), the pixel mean / std (mismatched lengths
    gave a tensor shape error; a std of 0 made every input inf) and the periods (0 divides
    by zero at the first step)."""
    _check_test_datasets(cfg.DATASETS.TEST, "DATASETS.TEST")
    for key in ("ROI_HEADS", "RETINANET", "SEM_SEG_HEAD"):
        n = cfg.MODEL.get(key, {}).get("NUM_CLASSES", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"MODEL.{key}.NUM_CLASSES must be a positive integer, got {n!r}")
    _check_pixel_stats(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                       ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD"))
    _check_periods(cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD,
                   ("SOLVER.CHECKPOINT_PERIOD", "TEST.EVAL_PERIOD"))
    check_count(cfg.SOLVER.MAX_ITER, "SOLVER.MAX_ITER")


def _check_lazy_run_settings(cfg) -> None:
    """:func:`_check_run_settings` for a LazyConfig (the same values under their lazy
    names, where the config has them)."""
    test_set = cfg.get("dataloader", {}).get("test", {}).get("dataset", {})
    names = test_set.get("names") if hasattr(test_set, "get") else None
    if names is not None:
        _check_test_datasets([names] if isinstance(names, str) else list(names),
                             "dataloader.test.dataset.names")
    model = cfg.get("model", {})
    if hasattr(model, "get") and model.get("pixel_mean") is not None \
            and model.get("pixel_std") is not None:
        _check_pixel_stats(model.pixel_mean, model.pixel_std,
                           ("model.pixel_mean", "model.pixel_std"))
    train = cfg.get("train", {})
    check_count(train.get("max_iter", 1), "train.max_iter")
    period = train.get("checkpointer", {}).get("period", 1)
    _check_periods(period, train.get("eval_period", 0),
                   ("train.checkpointer.period", "train.eval_period"))


def _main_yaml(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    with building_from_config(assertions=True):  # a bad value or key: ConfigBuildError
        cfg = setup_yaml_config(args.config_file, job_overrides(args, lazy=False))
        _check_run_settings(cfg)
    default_setup(cfg, args)
    resume_file = _resume_file(args)
    if args.eval_only:
        with building_from_config():
            model = RestTrainer.build_model(cfg)
        checkpointer = RestDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.require_complete = True
        _check_eval_weights(checkpointer, cfg.MODEL.WEIGHTS, resume_file, args)
        if resume_file:
            checkpointer.load(resume_file, checkpointables=[])
        else:
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=bool(args.resume))
        _check_test_data(cfg.DATASETS.TEST, "DATASETS.TEST")
        res = RestTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    with building_from_config(assertions=True):  # detectron2 checks its config by assertion
        trainer = RestTrainer(cfg)
    if resume_file:
        trainer.checkpointer.load_to_resume(resume_file)  # model, optimizer, iteration
        trainer.start_iter = trainer.iter + 1
    else:
        if not args.resume:
            trainer.checkpointer.warn_if_earlier_run()
        if not (args.resume and trainer.checkpointer.has_checkpoint()):
            check_weights_file(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
        trainer.resume_or_load(resume=bool(args.resume))
    if trainer.start_iter >= trainer.max_iter:
        logging.getLogger("rest_dense.d2").warning(
            "rest_dense: resumed at iteration %d and SOLVER.MAX_ITER is %d: nothing is left "
            "to train (raise SOLVER.MAX_ITER to train on)", trainer.start_iter, trainer.max_iter)
    return trainer.train()


def _main_lazy(args: argparse.Namespace) -> Dict[str, Any]:
    with building_from_config():
        cfg = setup_lazy_config(args.config_file, job_overrides(args, lazy=True))
        _check_lazy_run_settings(cfg)
    default_setup(cfg, args)
    resume_file = _resume_file(args)
    if args.eval_only:
        with building_from_config():
            model = lazy_build_model(cfg)
        checkpointer = RestDetectionCheckpointer(model, save_dir=cfg.train.output_dir)
        checkpointer.require_complete = True
        _check_eval_weights(checkpointer, cfg.train.init_checkpoint, resume_file, args)
        if resume_file:
            checkpointer.load(resume_file, checkpointables=[])
        else:
            checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=bool(args.resume))
        return lazy_test(cfg, model)
    return lazy_train(cfg, resume=bool(args.resume) and not resume_file, resume_from=resume_file)


def main(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Run one process of a job (what :func:`detectron2.engine.launch` calls in each worker).

    Args:
        args: the namespace of :func:`build_parser` (or of ``rest-dense train`` /
            ``rest-dense test``): ``config_file``, ``opts``, ``resume`` (bool, or a
            checkpoint file to continue from), ``eval_only``, ``lazy``, ``toy_root``,
            ``cpu_threads``, ``trust_checkpoint``, and optionally ``output_dir`` and
            ``weights`` (checkpoint to evaluate).

    Returns:
        The evaluation results (``None`` if no evaluation ran).
    """
    if getattr(args, "cpu_threads", 0) and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    register_toy_datasets(getattr(args, "toy_root", None) or "data/toy")
    register_toy_sem_seg_datasets(getattr(args, "toy_root", None) or "data/toy")
    _trust_from_args(args)
    lazy = bool(getattr(args, "lazy", False)) or is_lazy_config(args.config_file)
    return (_main_lazy if lazy else _main_yaml)(args)


def check_args(args: argparse.Namespace) -> None:
    """Fail early, before any process starts, on a missing config / checkpoint file or
    malformed overrides.

    Raises:
        FileNotFoundError: the config file, ``resume`` file or ``weights`` is missing.
        ValueError: no config file, malformed overrides, fewer than one process, a machine
            rank or ``dist_url`` that cannot work (:func:`check_machines`).
    """
    if not args.config_file:
        raise ValueError("a config file is required (--config-file)")
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"config file {args.config_file} does not exist")
    for what, path in (("resume checkpoint", _resume_file(args)),
                       ("checkpoint", getattr(args, "weights", None))):
        if path:
            checkpoint_file(path, what, urls=True)
    if args.num_gpus < 1 or args.num_machines < 1:
        raise ValueError(f"--num-gpus ({args.num_gpus}) and --num-machines ({args.num_machines}) "
                         "must be at least 1")
    check_machines(args.num_machines, getattr(args, "machine_rank", 0),
                   getattr(args, "dist_url", None))
    lazy = bool(getattr(args, "lazy", False)) or is_lazy_config(args.config_file)
    normalize_overrides(getattr(args, "opts", None) or [], lazy)


def output_dir_of(args: argparse.Namespace) -> str:
    """The folder a job writes to: the config's ``OUTPUT_DIR`` / ``train.output_dir`` after
    the job's overrides (``--work-dir`` included), as the processes will resolve it.

    Raises:
        ConfigBuildError: the config or an override does not load.
    """
    import logging
    import warnings

    lazy = bool(getattr(args, "lazy", False)) or is_lazy_config(args.config_file)
    # the job reads the config again and says what it has to say (device, AMP) then
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), building_from_config(assertions=True):
            warnings.simplefilter("ignore")
            return _output_dir(args, lazy)
    finally:
        logging.disable(previous)


def _output_dir(args: argparse.Namespace, lazy: bool) -> str:
    if lazy:
        return os.fspath(setup_lazy_config(args.config_file,
                                           job_overrides(args, lazy=True)).train.output_dir)
    return os.fspath(setup_yaml_config(args.config_file,
                                       job_overrides(args, lazy=False)).OUTPUT_DIR)


def check_machines(num_machines: int, machine_rank: int, dist_url: Optional[str]) -> None:
    """A job of several machines needs this machine's rank in ``0..num_machines-1`` and the
    address of machine 0 (``tcp://HOST:PORT``, the same on every machine): with a wrong
    value each machine would wait for the others until the process group's timeout.

    Raises:
        ValueError: naming the option and what it must be.
    """
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"--machine-rank {machine_rank} is not in 0..{num_machines - 1} "
                         f"(--num-machines {num_machines}): give each machine its own rank, 0 "
                         "on the machine whose address --dist-url names")
    if num_machines == 1:
        return
    url = str(dist_url or "")
    if url in ("", "auto"):
        raise ValueError(f"--num-machines {num_machines} needs --dist-url tcp://HOST:PORT with "
                         "machine 0's address and a free port, the same on every machine "
                         "('auto' picks a port on one machine only)")
    if url.startswith("tcp://"):
        host, _, port = url[len("tcp://"):].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--dist-url {url!r} is not tcp://HOST:PORT (machine 0's address "
                             "and a port number, the same on every machine)")


def launch_main(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Run :func:`main` in this process (one GPU or CPU) or in ``args.num_gpus`` worker
    processes per machine: through :func:`detectron2.engine.launch` (NCCL) where CUDA is
    available, else through :func:`rest_dense.distributed.launch` with gloo (CPU processes;
    use ``MODEL.DEVICE cpu``).

    Returns:
        The results of :func:`main` when it ran in this process, else ``None``.

    Raises:
        FileNotFoundError, ValueError: see :func:`check_args`.
    """
    check_args(args)
    if args.num_gpus * args.num_machines <= 1:
        return main(args)
    if torch.cuda.is_available():  # detectron2's launcher: NCCL, one GPU per process
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    else:  # CPU-only machines (detectron2's launcher needs CUDA): gloo, CPU processes
        launch_processes(_cpu_worker_main, args.num_gpus, num_machines=args.num_machines,
                         machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
                         backend="gloo")
    return None


def _cpu_worker_main(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """:func:`main` in a worker of :func:`rest_dense.distributed.launch`, with detectron2's
    per-machine process group set as its own launcher sets it."""
    comm._LOCAL_PROCESS_GROUP = local_process_group()
    return main(args)


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/train_net.py``: parse detectron2-style arguments and run the job."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config-file is required")
    print("Command Line Args:", args)
    try:
        check_args(args)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    from ..run_files import CHECKPOINT_ERRORS

    try:
        launch_main(args)
    except (ConfigBuildError, FileNotFoundError) + CHECKPOINT_ERRORS as err:
        parser.exit(2, f"{parser.prog}: error: {error_text(err)}\n")  # as `rest-dense train`
    return 0
