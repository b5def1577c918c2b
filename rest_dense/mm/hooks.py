"""mmengine hooks of the package."""
from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

__all__ = ["BroadcastBuffersHook"]


class BroadcastBuffersHook(Hook):
    """Give every process rank 0's buffers (BatchNorm statistics) after each training
    iteration, before checkpoints are saved and validation runs.

    :func:`rest_dense.distributed.prepare_mm_config` adds it to multi-process CPU jobs
    whose SyncBN layers became BatchNorm: SyncBN keeps the statistics equal in every
    process, BatchNorm would let each process gather its own, and mmengine's validation
    does not pass through DDP's forward, so the processes would evaluate different models
    and the checkpoint would hold rank 0's alone.
    """

    priority = "ABOVE_NORMAL"  # before the CheckpointHook (VERY_LOW) saves

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Optional[Any] = None,
                         outputs: Optional[Any] = None) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
