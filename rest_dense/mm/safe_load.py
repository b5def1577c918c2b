"""mmengine's local checkpoint loading under :mod:`rest_dense.safe_load`'s policy.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means
``weights_only=True``, which refuses mmengine's own training checkpoints (the message hub's
``HistoryBuffer`` objects and numpy scalars; mmengine issue #1655), so ``--resume`` and
testing a trained checkpoint fail with ``UnpicklingError: Weights only load failed``.

This module

* puts ``HistoryBuffer`` and its four statistics functions (``min``, ``max``, ``mean``,
  ``current``, pickled as ``getattr(HistoryBuffer, name)``) on :mod:`rest_dense.safe_load`'s
  allow-list, so mmengine training checkpoints load with ``weights_only=True``;
* with :func:`install_checkpoint_loader` (called by :func:`trust_checkpoints` and by
  :mod:`rest_dense.mm.runner`), replaces mmengine's loader for local files by
  :func:`load_from_local`, which reads every file with the allow-list and unpickles in full
  only files the user marked as their own (:func:`rest_dense.safe_load.trust`, which the
  command line calls for ``--trust-checkpoint`` paths only: never implicitly for a work dir,
  a ``--resume`` file or the checkpoint under test).

Importing :mod:`rest_dense.mm` (a config's ``custom_imports``) does both, so that
MMDetection's and MMSegmentation's own scripts (``tools/train.py``, ``--resume`` included,
``tools/test.py``, ``init_cfg=dict(type='Pretrained', checkpoint=<a training checkpoint>)``)
read the checkpoints our training writes, with nothing of any file run:

* mmengine's loader for local files becomes :func:`load_from_local`: the allow-list, full
  unpickling only for :func:`trust`-ed paths, and the whole-model checkpoint normalised by
  :func:`rest_dense.checkpoint_reader.read_model_checkpoint` (``{'model': sd}``, DDP
  ``module.`` prefixes, EMA state dicts, safetensors), so the state dict that our checks see
  is the one mmengine loads;
* :func:`rest_dense.safe_load.install_global_allow_list` admits the same allow-list in every
  ``torch.load(weights_only=True)`` of the process (``torch.serialization.add_safe_globals``)
  for code that calls ``torch.load`` itself.

URLs keep mmengine's own loader (torch's default ``weights_only=True``), and the backbones'
``Pretrained`` weights are read by :func:`rest_dense.models.load_checkpoint` with an
explicit ``weights_only=True``.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, List, Optional, Union

from mmengine.logging import MMLogger
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from .. import safe_load
from ..safe_load import UntrustedCheckpointError, is_trusted, trusted_paths

__all__ = ["trust_checkpoints", "trusted_paths", "is_trusted", "install_checkpoint_loader",
           "load_from_local", "UntrustedCheckpointError", "HISTORY_BUFFER_STATISTICS"]

PathLike = Union[str, os.PathLike]

#: the statistics functions every HistoryBuffer pickles (mmengine registers these four)
HISTORY_BUFFER_STATISTICS = ("min", "max", "mean", "current")

safe_load.register_safe_attributes(HistoryBuffer, HISTORY_BUFFER_STATISTICS)

_INSTALLED = False


def install_checkpoint_loader() -> None:
    """Route mmengine's loading of local checkpoint files through :func:`load_from_local`
    (idempotent)."""
    global _INSTALLED
    if not _INSTALLED:
        # the prefix '' is mmengine's fallback for local paths; replace its loader
        CheckpointLoader.register_scheme(prefixes="", loader=load_from_local, force=True)
        _INSTALLED = True


def trust_checkpoints(*paths: Optional[PathLike]) -> List[str]:
    """Mark files or directories as the user's own checkpoints
    (:func:`rest_dense.safe_load.trust`) and install :func:`load_from_local` for mmengine.

    Only call this for files you produced: unpickling runs code stored in the file.

    Args:
        *paths: checkpoint files or directories the user named explicitly
            (``--trust-checkpoint``); ``None`` and URLs are ignored.

    Returns:
        All trusted paths.
    """
    install_checkpoint_loader()
    return safe_load.trust(*paths)


def load_from_local(filename: str, map_location: Any = None) -> Any:
    """mmengine's local-file loader under :mod:`rest_dense.safe_load`'s policy:
    ``weights_only=True`` with the allow-list, full unpickling only for trusted paths; the
    checkpoint normalised by :func:`rest_dense.checkpoint_reader.read_model_checkpoint` and
    returned in mmengine's layout (``{'state_dict': ..., 'meta': ..., ...}``).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the file needs full unpickling and was not marked trusted.
        CheckpointFormatError: not a checkpoint, or no tensors in it (says what it is).
    """
    from ..checkpoint_reader import read_model_checkpoint

    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    ckpt = read_model_checkpoint(filename, map_location=map_location,
                                 trusted=is_trusted(filename),
                                 log=MMLogger.get_current_instance())
    if ckpt.notes:
        MMLogger.get_current_instance().info("rest_dense: %s: %s", filename, "; ".join(ckpt.notes))
    return ckpt.to_mmengine()


# importing rest_dense.mm (custom_imports) makes the toolboxes' own tools read our checkpoints
install_checkpoint_loader()
safe_load.install_global_allow_list()
