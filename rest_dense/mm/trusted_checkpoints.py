"""Reading the user's own mmengine training checkpoints under ``torch>=2.6``.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``. mmengine 0.10.7 does not
pass ``weights_only``, and its training checkpoints hold more than tensors (the message
hub's ``HistoryBuffer`` objects, whose bound methods pickle through ``getattr``, and
numpy scalars), so ``--resume`` and testing a trained checkpoint fail with
``UnpicklingError: Weights only load failed`` (mmengine issue #1655).

Allow-listing ``getattr`` for the restricted unpickler would defeat its purpose, so this
module takes the narrower route: the tools name the files and directories that are the
user's own (the run's ``work_dir``, the ``--resume`` file, the checkpoint given to
``tools/test.py``), and only those are unpickled in full. Every other local file mmengine
loads keeps ``weights_only=True``; URLs are not affected (mmengine's download loader keeps
torch's default), and the backbones' ``Pretrained`` weights are read by
:func:`rest_dense.models.load_checkpoint` with an explicit ``weights_only=True``.
"""
from __future__ import annotations

import os
import os.path as osp
import pickle
from typing import List, Union

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ["trust_checkpoints", "trusted_paths", "is_trusted"]

PathLike = Union[str, "os.PathLike[str]"]

_TRUSTED: List[str] = []
_INSTALLED = False


def trusted_paths() -> List[str]:
    """The files and directories registered with :func:`trust_checkpoints`."""
    return list(_TRUSTED)


def is_trusted(path: PathLike) -> bool:
    """Whether ``path`` is, or lies under, a registered trusted location."""
    real = osp.realpath(osp.expanduser(os.fspath(path)))
    return any(real == t or real.startswith(t.rstrip(os.sep) + os.sep) for t in _TRUSTED)


def trust_checkpoints(*paths: PathLike) -> None:
    """Mark files or directories as the user's own checkpoints and route mmengine's
    local-file checkpoint loading through a loader that unpickles exactly those in full.

    Only call this for files you produced (your training runs): unpickling runs code
    stored in the file.

    Args:
        *paths: checkpoint files or directories (e.g. a ``work_dir``); ``None`` and
            URLs are ignored.
    """
    global _INSTALLED
    for p in paths:
        if p is None:
            continue
        p = os.fspath(p)
        if "://" in p:
            continue
        real = osp.realpath(osp.expanduser(p))
        if real not in _TRUSTED:
            _TRUSTED.append(real)
    if not _INSTALLED:
        # the scheme '' is mmengine's fallback for local paths; replace its loader
        CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)
        _INSTALLED = True


def load_from_local(filename: str, map_location=None) -> dict:
    """mmengine local-file loader: full unpickling for trusted paths, ``weights_only=True``
    for everything else (with a hint when that fails)."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    if is_trusted(filename):
        print_log(f"rest_dense: {filename} is one of your own checkpoints (trusted): "
                  "loading it with weights_only=False", logger="current")
        return torch.load(filename, map_location=map_location, weights_only=False)
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(
            f"{filename} holds more than weights and was read with weights_only=True. If it "
            "is a checkpoint you trained yourself, pass it with --trust-checkpoint (tools/"
            "train.py) or as the checkpoint of tools/test.py.\n" + str(err)) from err
