"""``torch.distributed`` helpers shared by the MMDetection / MMSegmentation and detectron2
adapters: the backend for the device, process launch on one or several machines, DDP
wrapping that works on CPU (gloo) as well as on GPUs (NCCL), and a replica check.

Pure PyTorch: nothing here imports mmengine or detectron2.

The same scripts train on GPU machines (NCCL) and on CPU-only machines (gloo)::

    bash tools/dist_train.sh configs/toy/mask_rcnn_restv2_toy.py 2     # torchrun, 2 processes
    rest-dense train detectron2/toy/mask_rcnn_restv2_toy.yaml --num-gpus 2 MODEL.DEVICE cpu

A multi-process job of your own::

    from rest_dense import distributed

    def worker(out_dir):
        model = distributed.wrap_ddp(build_model())   # device_ids as the device needs
        ...
        distributed.assert_replicas_in_sync(model)    # parameters equal on every rank

    distributed.launch(worker, num_processes=2, args=("out",))   # gloo without CUDA
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
from typing import Any, Callable, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["LOCALHOST", "DEFAULT_TIMEOUT", "LaunchError", "cuda_usable", "default_backend", "find_free_port",
           "close_process_group",
           "local_dist_url", "get_rank", "get_world_size", "init_from_env", "launch",
           "local_process_group", "ddp_device_ids", "BatchNormXd", "revert_sync_batchnorm",
           "revert_sync_batchnorm_on_cpu", "wrap_ddp", "params_without_grad",
           "assert_replicas_in_sync", "prepare_mm_config", "setup_mm_distributed"]

#: the only address single-machine jobs listen on
LOCALHOST = "127.0.0.1"
#: how long collectives wait for the slowest process
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

#: the process group of the processes on this machine, set by :func:`launch`'s workers
_LOCAL_GROUP: Optional[Any] = None

#: normalisation layers that need a process group and GPUs, and what replaces them on CPU
_SYNC_BN_TYPES = ("SyncBN", "MMSyncBN", "TorchSyncBN")


class LaunchError(RuntimeError):
    """A distributed job started without what its launcher provides (``torchrun``'s
    environment): the user's command, not the code, is wrong."""


def cuda_usable(device: Optional[str] = None) -> bool:
    """Whether CUDA can run the job.

    Args:
        device: the job's device (``'cuda'``, ``'cuda:1'``, ``'cpu'``) or None for "whatever
            this machine offers".

    Returns:
        True if a CUDA device is present and ``device`` (if given) is a CUDA device.
    """
    if device is not None and not str(device).startswith("cuda"):
        return False
    return torch.cuda.is_available()


def default_backend(device: Optional[str] = None) -> str:
    """``'nccl'`` where CUDA runs the job, ``'gloo'`` otherwise (CPU-only machines).

    Args:
        device: the job's device, see :func:`cuda_usable`.
    """
    return "nccl" if cuda_usable(device) else "gloo"


def find_free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on ``host`` right now (another process may still take it
    before it is used; launchers pick it as late as possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def local_dist_url() -> str:
    """``tcp://127.0.0.1:<free port>``: an init URL for a job on this machine."""
    return f"tcp://{LOCALHOST}:{find_free_port()}"


def get_rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the job (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _timeout(value: Any) -> datetime.timedelta:
    if value is None:
        return DEFAULT_TIMEOUT
    if isinstance(value, datetime.timedelta):
        return value
    return datetime.timedelta(seconds=float(value))


def init_from_env(backend: Optional[str] = None, timeout: Any = None) -> bool:
    """Join the process group that ``torchrun`` (``torch.distributed.run``) describes in the
    environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    With NCCL the process's GPU is set to ``LOCAL_RANK`` first; with gloo nothing touches
    CUDA, so CPU-only machines work.

    Args:
        backend: ``'nccl'``, ``'gloo'``, ... (default: :func:`default_backend`).
        timeout: seconds (or a ``timedelta``) collectives wait (default 30 minutes).

    Returns:
        True if this call initialised the group, False if one existed already.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable.
        LaunchError: the environment lacks ``RANK`` / ``WORLD_SIZE`` (not started by
            torchrun).
    """
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise LaunchError(f"distributed launch needs {', '.join(missing)} in the environment; "
                           "start the job with torchrun, e.g. `torchrun --nproc_per_node 2 -m "
                           "rest_dense.cli train CONFIG --launcher pytorch` (a clone also has "
                           "tools/dist_train.sh)")
    backend = backend or default_backend()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                            world_size=world_size, timeout=_timeout(timeout))
    return True


def close_process_group() -> None:
    """End a finished job's process group (one that an OpenMMLab runner or torchrun set up):
    wait for every rank, then destroy it. Leaving it to interpreter exit lets the gloo
    threads die unjoined, which can abort a rank (SIGABRT) after the job has succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_process_group() -> Optional[Any]:
    """The process group of this machine's processes inside a :func:`launch` worker (None
    elsewhere)."""
    return _LOCAL_GROUP


def _worker(local_rank: int, main_func: Callable, world_size: int, num_processes: int,
            machine_rank: int, dist_url: str, backend: str, timeout: datetime.timedelta,
            args: Tuple) -> None:
    global _LOCAL_GROUP
    rank = machine_rank * num_processes + local_rank
    if backend == "nccl":
        if torch.cuda.device_count() < num_processes:
            raise RuntimeError(f"{num_processes} processes per machine need as many GPUs, "
                               f"found {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size,
                                rank=rank, timeout=timeout)
    except Exception as err:
        raise RuntimeError(f"rank {rank} could not join the process group at {dist_url} "
                           f"({backend}): {err}") from err
    for i in range(world_size // num_processes):
        group = dist.new_group(list(range(i * num_processes, (i + 1) * num_processes)))
        if i == machine_rank:
            _LOCAL_GROUP = group
    dist.barrier()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
        _LOCAL_GROUP = None


def launch(main_func: Callable, num_processes: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = "auto", args: Sequence = (), backend: Optional[str] = None,
           timeout: Any = None) -> None:
    """Run ``main_func(*args)`` in ``num_processes`` processes on this machine, all joined
    in one process group spanning ``num_machines`` machines.

    One process runs the function in place (no process group). Otherwise the workers are
    spawned (``torch.multiprocessing.spawn``): ``main_func`` and ``args`` must be picklable
    (a module-level function). Each worker joins the group with ``backend``, sets its GPU
    for NCCL, creates the per-machine group (:func:`local_process_group`) and calls
    ``main_func``. A failing worker fails the launch with its traceback.

    Args:
        main_func: the job.
        num_processes: processes on this machine (GPUs with NCCL, CPU processes with gloo).
        num_machines: machines in the job.
        machine_rank: this machine's rank (0 .. ``num_machines - 1``).
        dist_url: init URL (``tcp://HOST:PORT``); ``'auto'`` or None picks a free port on
            127.0.0.1 (single machine only).
        args: arguments of ``main_func``.
        backend: ``'nccl'`` / ``'gloo'`` (default: :func:`default_backend`).
        timeout: seconds (or a ``timedelta``) collectives wait (default 30 minutes).

    Raises:
        ValueError: fewer than one process or machine, a bad ``machine_rank``, or ``'auto'``
            with several machines.
    """
    if num_processes < 1 or num_machines < 1:
        raise ValueError(f"need at least one process and machine, got num_processes="
                         f"{num_processes}, num_machines={num_machines}")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"machine_rank {machine_rank} is not in 0..{num_machines - 1}")
    world_size = num_processes * num_machines
    if world_size == 1:
        main_func(*args)
        return
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("dist_url='auto' only works on one machine; give tcp://HOST:PORT "
                             "of machine 0")
        dist_url = local_dist_url()
    import torch.multiprocessing as mp

    try:
        mp.spawn(_worker, nprocs=num_processes, daemon=False,
                 args=(main_func, world_size, num_processes, machine_rank, dist_url,
                       backend or default_backend(), _timeout(timeout), tuple(args)))
    except mp.ProcessRaisedException as err:
        problem = worker_problem(str(err))
        if problem is None:
            raise
        raise WorkerError(problem) from None


#: errors a single-process run reports in one line (the input is wrong, not the code): a
#: worker that raised one of these is reported the same way, without its traceback
ONE_LINE_ERRORS = ("ConfigBuildError", "FileNotFoundError", "IsADirectoryError",
                   "CheckpointIsADirectoryError", "CheckpointError", "CheckpointFormatError",
                   "CheckpointMismatchError", "UntrustedCheckpointError", "ResumeError",
                   "UnpicklingError", "FolderBusyError")


class WorkerError(LaunchError):
    """A worker process stopped on an error of the input (:data:`ONE_LINE_ERRORS`); the
    message is the worker's."""


def worker_problem(report: str) -> Optional[str]:
    """The worker's message when ``report`` (``torch.multiprocessing``'s text of a worker's
    traceback) ends in one of :data:`ONE_LINE_ERRORS`; ``None`` otherwise (a bug keeps its
    traceback)."""
    import re

    rank = re.search(r"-- Process (\d+) terminated", report)
    lines = [line for line in report.strip().splitlines() if line.strip()]
    match = re.match(r"^([\w.]+?)(?:\.(\w+))?: (.*)$", lines[-1]) if lines else None
    if match is None:
        return None
    name = (match.group(2) or match.group(1)).rsplit(".", 1)[-1]
    if name not in ONE_LINE_ERRORS:
        return None
    where = f"process {rank.group(1)}: " if rank else ""
    return f"{where}{match.group(3)}"


# ------------------------------------------------------------------------------- DDP
def ddp_device_ids(module: nn.Module) -> Optional[List[int]]:
    """``device_ids`` for ``DistributedDataParallel(module)``: the GPU of a single-GPU
    module, None for a CPU module (DDP refuses device ids there)."""
    devices = {p.device for p in module.parameters()}
    if len(devices) == 1:
        device = next(iter(devices))
        if device.type == "cuda":
            return [device.index if device.index is not None else torch.cuda.current_device()]
    return None


class BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the channels (dim 1) of inputs of any rank from 2 on, as
    ``nn.SyncBatchNorm`` takes them; what :func:`revert_sync_batchnorm` puts in its place."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions, got {input.dim()}")


def revert_sync_batchnorm(module: nn.Module) -> Tuple[nn.Module, List[str]]:
    """Replace every ``nn.SyncBatchNorm`` in ``module`` by a :class:`BatchNormXd` that holds
    the same parameter and buffer tensors (an optimizer built before keeps working; state
    dicts keep their keys).

    Args:
        module: the model; changed in place (a SyncBatchNorm given alone is returned new).

    Returns:
        The module (new only if ``module`` itself was a SyncBatchNorm) and the names of the
        replaced layers.
    """
    found: List[str] = []

    def convert(node: nn.Module, name: str) -> nn.Module:
        if isinstance(node, nn.SyncBatchNorm):
            bn = BatchNormXd(node.num_features, node.eps, node.momentum, node.affine,
                             node.track_running_stats)
            if node.affine:
                bn.weight, bn.bias = node.weight, node.bias
            if node.track_running_stats:
                bn.running_mean, bn.running_var = node.running_mean, node.running_var
                bn.num_batches_tracked = node.num_batches_tracked
            bn.train(node.training)
            found.append(name or "(the module)")
            return bn
        for child_name, child in node.named_children():
            new = convert(child, f"{name}.{child_name}" if name else child_name)
            if new is not child:
                setattr(node, child_name, new)
        return node

    return convert(module, ""), found


def revert_sync_batchnorm_on_cpu(model: nn.Module,
                                 ddp_kwargs: Optional[MutableMapping[str, Any]] = None) -> nn.Module:
    """A multi-process job of a CPU model: SyncBatchNorm layers become BatchNorm (DDP
    refuses SyncBatchNorm in CPU modules), with a warning naming them.

    SyncBatchNorm keeps the same running statistics in every process; as BatchNorm each
    process would gather its own, and the processes would evaluate (and rank 0 save)
    different models. So where layers were replaced, ``ddp_kwargs['broadcast_buffers']``
    becomes True: every forward starts from rank 0's statistics.

    Args:
        model: the model about to be wrapped in DDP.
        ddp_kwargs: the wrapper's keyword arguments, updated in place.

    Returns:
        The model (the same object unless it was itself a SyncBatchNorm).
    """
    if get_world_size() == 1 or any(p.device.type != "cpu" for p in model.parameters()):
        return model
    model, found = revert_sync_batchnorm(model)
    if found:
        if ddp_kwargs is not None:
            ddp_kwargs["broadcast_buffers"] = True
        if get_rank() == 0:
            import logging

            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4
                                             else "")
            logging.getLogger(__name__).warning(
                "rest_dense: SyncBatchNorm -> BatchNorm in %d layer(s) of this CPU job (%s): "
                "SyncBatchNorm needs GPUs; each process normalises over its own batch, with "
                "rank 0's running statistics (DDP broadcast_buffers=True)", len(found), shown)
    return model


def wrap_ddp(model: nn.Module, ddp_class: Optional[Callable[..., nn.Module]] = None,
             **kwargs: Any) -> nn.Module:
    """Wrap ``model`` for data-parallel training when the job has several processes.

    Args:
        model: the model, already on its device.
        ddp_class: ``torch.nn.parallel.DistributedDataParallel`` (default) or a subclass
            such as mmengine's ``MMDistributedDataParallel``.
        **kwargs: further DDP arguments; ``device_ids`` defaults to :func:`ddp_device_ids`.
            ``find_unused_parameters`` stays False unless given: every trainable parameter
            of the ResT models receives a gradient in every step.

    Returns:
        ``model`` itself outside a process group (or with one process), else the wrapper.
        A CPU model's ``nn.SyncBatchNorm`` layers become BatchNorm first (see
        :func:`revert_sync_batchnorm`), with a warning.
    """
    if get_world_size() == 1:
        return model
    model = revert_sync_batchnorm_on_cpu(model, kwargs)
    if ddp_class is None:
        from torch.nn.parallel import DistributedDataParallel as ddp_class
    kwargs.setdefault("device_ids", ddp_device_ids(model))
    return ddp_class(model, **kwargs)


def params_without_grad(model: nn.Module) -> List[str]:
    """Names of trainable parameters that hold no gradient (call after ``backward``).

    Under DDP without ``find_unused_parameters`` any such parameter stops the next step with
    "Expected to have finished reduction in the prior iteration"; this names them.
    """
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def assert_replicas_in_sync(model: nn.Module, group: Optional[Any] = None,
                            buffers: bool = False) -> int:
    """Check that every process holds exactly the same parameters (bit for bit).

    A collective: every process of ``group`` must call it. Gathers one flat float64 copy of
    the parameters per process (on the parameters' device), so it needs ``world_size`` times
    the model's size in float64 of memory.

    Args:
        model: the model or its DDP wrapper.
        group: process group (default: the whole job).
        buffers: compare the buffers too (BatchNorm statistics differ between processes
            unless they are synchronised, e.g. by SyncBN or ``broadcast_buffers``).

    Returns:
        The number of values compared (0 outside a process group: nothing to compare).

    Raises:
        RuntimeError: a value differs; the message names the first parameter and rank.
    """
    if get_world_size() == 1:
        return 0
    module = getattr(model, "module", model)
    named = list(module.named_parameters())
    if buffers:
        named += [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    if not named:
        return 0
    flat = torch.cat([t.detach().reshape(-1).double() for _, t in named])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=group)
    sizes = [t.numel() for _, t in named]
    for rank, other in enumerate(gathered[1:], start=1):
        if torch.equal(other, gathered[0]):
            continue
        for (name, _), a, b in zip(named, gathered[0].split(sizes), other.split(sizes)):
            if not torch.equal(a, b):
                diff = (a - b).abs().nan_to_num(float("inf")).max().item()
                raise RuntimeError(f"parameters differ between ranks 0 and {rank}: {name} "
                                   f"(max abs difference {diff:.3g})")
    return flat.numel()


# -------------------------------------------------------------- OpenMMLab (mmengine) jobs
def _replace_sync_bn(node: Any, found: List[str], path: str = "") -> Any:
    if isinstance(node, MutableMapping):
        if node.get("type") in _SYNC_BN_TYPES:
            found.append(f"{path or 'cfg'}: {node['type']}")
            node["type"] = "BN"
        if isinstance(node.get("norm_layer"), str) and node["norm_layer"].lower() == "syncbn":
            # the core's spelling (VTFPN's norm_layer)
            found.append(f"{path + '.' if path else ''}norm_layer: {node['norm_layer']}")
            node["norm_layer"] = "bn"
        for key in list(node.keys()):
            node[key] = _replace_sync_bn(node[key], found, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            node[i] = _replace_sync_bn(item, found, f"{path}[{i}]")
    return node


def prepare_mm_config(cfg: MutableMapping, cuda: Optional[bool] = None) -> List[str]:
    """Make a distributed mmengine config (``cfg.launcher`` other than ``'none'``) runnable
    on the machine's device; on GPUs it stays as it is (NCCL, SyncBN).

    Without CUDA:

    * ``env_cfg.dist_cfg.backend`` becomes ``'gloo'`` (NCCL needs GPUs);
    * the DDP wrapper gets ``device_ids=None`` (mmengine passes ``[LOCAL_RANK]``, which DDP
      refuses for CPU modules), ``broadcast_buffers=False`` and
      ``find_unused_parameters=False`` unless the config says otherwise;
    * SyncBN layers (``norm_cfg=dict(type='SyncBN')``, ``norm_layer='syncbn'``,
      ``sync_bn='torch'``) become BN: PyTorch's and mmcv's SyncBN only run on GPUs; a hook
      then gives every process rank 0's BatchNorm statistics after each iteration
      (``custom_hooks``: ``RestBroadcastBuffersHook``), so that the processes validate and
      save one model, as with SyncBN.

    Args:
        cfg: an mmengine ``Config`` (or a dict of the same layout); modified in place.
        cuda: whether CUDA runs the job (default: :func:`cuda_usable`).

    Returns:
        What was changed, one line each (empty on GPUs or for single-process runs).
    """
    if (cfg.get("launcher") or "none") == "none":
        return []
    if cuda is None:
        cuda = cuda_usable()
    if cuda:
        return []
    changes = []
    env_cfg = cfg.get("env_cfg")
    if env_cfg is None:
        cfg["env_cfg"] = env_cfg = {}
    dist_cfg = env_cfg.get("dist_cfg")
    if dist_cfg is None:
        env_cfg["dist_cfg"] = dist_cfg = {}
    if dist_cfg.get("backend", "nccl") != "gloo":
        changes.append(f"dist backend {dist_cfg.get('backend', 'nccl')!r} -> 'gloo' (no CUDA)")
        dist_cfg["backend"] = "gloo"

    wrapper = cfg.get("model_wrapper_cfg")
    if wrapper is None:
        wrapper = {"type": "MMDistributedDataParallel", "broadcast_buffers": False,
                   "find_unused_parameters": bool(cfg.get("find_unused_parameters", False))}
    else:
        wrapper = copy.deepcopy(wrapper)
    if wrapper.get("type", "MMDistributedDataParallel") in ("MMDistributedDataParallel",
                                                            "DistributedDataParallel"):
        if "device_ids" not in wrapper:
            wrapper["device_ids"] = None
            changes.append("DDP device_ids=None (CPU module)")
        cfg["model_wrapper_cfg"] = wrapper

    found: List[str] = []
    for key in ("model", "tta_model"):
        if cfg.get(key) is not None:
            _replace_sync_bn(cfg[key], found, key)
    if found:
        changes.append("SyncBN -> BN (SyncBN needs GPUs): " + ", ".join(found))
    if cfg.get("sync_bn"):
        changes.append(f"sync_bn={cfg['sync_bn']!r} dropped (SyncBN needs GPUs)")
        cfg["sync_bn"] = None
        found.append("sync_bn")
    if found:
        # the same running statistics in every process, as SyncBN keeps them: rank 0's,
        # after every iteration (rest_dense.mm.hooks.BroadcastBuffersHook)
        hooks = list(cfg.get("custom_hooks") or [])
        if not any(isinstance(h, Mapping) and h.get("type") == "RestBroadcastBuffersHook"
                   for h in hooks):
            cfg["custom_hooks"] = hooks + [{"type": "RestBroadcastBuffersHook"}]
            changes.append("rank 0's BatchNorm statistics to every process after each "
                           "iteration (custom_hooks: RestBroadcastBuffersHook)")
    return changes


def setup_mm_distributed(cfg: MutableMapping) -> List[str]:
    """Prepare a distributed mmengine run before its ``Runner`` is built.

    Applies :func:`prepare_mm_config` and, for ``launcher='pytorch'`` without CUDA, joins
    the torchrun process group with gloo here (mmengine's own initialisation selects a
    CUDA device first, which fails on CPU-only machines; the runner then finds the group
    ready). Nothing happens for ``launcher='none'`` or on GPUs.

    Args:
        cfg: an mmengine ``Config``; modified in place.

    Returns:
        What was changed (see :func:`prepare_mm_config`).
    """
    changes = prepare_mm_config(cfg)
    if changes and cfg.get("launcher") == "pytorch":
        dist_cfg: Mapping = (cfg.get("env_cfg") or {}).get("dist_cfg") or {}
        init_from_env(backend=dist_cfg.get("backend", "gloo"), timeout=dist_cfg.get("timeout"))
    return changes
