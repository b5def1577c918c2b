"""Probes of the multi-node tests (``test_multinode.py``): every process of a training job
saves its own copy of the model's parameters when training starts (after ``--resume`` has
loaded its checkpoint) and when it ends, as ``<dir>/{start,end}_rank<R>.pt``, so that the
test can compare the replicas of both "machines" with each other and with the checkpoints.

* MMDetection / MMSegmentation: :class:`ReplicaProbeHook`, an mmengine hook that a wrapper
  config adds (``custom_imports`` with this module on ``PYTHONPATH``, ``custom_hooks``).
* detectron2: run this file as the script (``python _multinode_probe.py train ...`` is
  ``rest-dense train ...``) with ``REST_DENSE_TEST_PROBE_DIR`` set; the worker processes
  that :func:`rest_dense.distributed.launch` spawns import it as ``__mp_main__``, which adds
  the same probe to :class:`rest_dense.d2.engine.RestTrainer`'s hooks.
"""
from __future__ import annotations

import os
import sys
from typing import Dict

import torch

ENV = "REST_DENSE_TEST_PROBE_DIR"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def dump(model: torch.nn.Module, out_dir: str, phase: str) -> None:
    """Save ``model``'s parameters (DDP wrapper removed) as ``<out_dir>/<phase>_rank<R>.pt``."""
    module = getattr(model, "module", model)
    params: Dict[str, torch.Tensor] = {n: p.detach().cpu().clone()
                                       for n, p in module.named_parameters()}
    os.makedirs(out_dir, exist_ok=True)
    torch.save(params, os.path.join(out_dir, f"{phase}_rank{_rank()}.pt"))


try:  # mmengine: a hook for the wrapper configs of the tests
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    @HOOKS.register_module(force=True)
    class ReplicaProbeHook(Hook):
        priority = "VERY_LOW"

        def __init__(self, out_dir: str):
            self.out_dir = out_dir

        def before_train(self, runner) -> None:  # after load_or_resume
            dump(runner.model, self.out_dir, "start")

        def after_train(self, runner) -> None:
            dump(runner.model, self.out_dir, "end")
except ImportError:  # pragma: no cover - mmengine is a dependency of the test suite
    pass


def install_d2_probe(out_dir: str) -> None:
    """Append the probe to :class:`rest_dense.d2.engine.RestTrainer`'s hooks."""
    from detectron2.engine import HookBase

    from rest_dense.d2 import engine

    class _Probe(HookBase):
        def before_train(self):  # after resume_or_load
            dump(self.trainer.model, out_dir, "start")

        def after_train(self):
            dump(self.trainer.model, out_dir, "end")

    build = engine.RestTrainer.build_hooks
    if getattr(build, "_probe", False):
        return

    def build_hooks(self):
        return build(self) + [_Probe()]

    build_hooks._probe = True  # type: ignore[attr-defined]
    engine.RestTrainer.build_hooks = build_hooks


if __name__ in ("__main__", "__mp_main__") and os.environ.get(ENV):
    install_d2_probe(os.environ[ENV])

if __name__ == "__main__":
    from rest_dense.cli import main

    sys.exit(main(sys.argv[1:]))
