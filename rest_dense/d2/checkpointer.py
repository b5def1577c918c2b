"""A ``DetectionCheckpointer`` that loads every released ResT checkpoint layout and whose
checkpoints survive the training process being killed.

``MODEL.WEIGHTS`` may point at

* an ImageNet checkpoint (``{"model": sd}`` with ``stem.*``, ``stage1.*``, ..., ``head.*``),
  or any other backbone-only / foreign-framework checkpoint (``backbone.*`` from
  MMDetection/MMSegmentation, ``module.*``): the backbone part is loaded into the
  model's ResT backbone through :func:`rest_dense.models.load_checkpoint`, the rest of
  the model keeps its initialisation;
* a detectron2 checkpoint (the authors' released ones spell the output norms
  ``backbone.bottom_up.norm_i.0.*``; converted or our own ones ``norm_i.*``): the norm
  keys are renamed and the whole model is loaded the usual way.

Files are read under :mod:`rest_dense.safe_load`'s policy, the same as the MMDetection /
MMSegmentation adapter's: ``torch.load(weights_only=True)`` with an allow-list that covers
what detectron2 training writes (``.pkl`` model-zoo files through a restricted unpickler);
full unpickling only for paths marked with :func:`rest_dense.safe_load.trust`, which the
command line does for ``--trust-checkpoint`` paths and nothing else.

Saving (:meth:`RestDetectionCheckpointer.save`) writes each checkpoint and the
``last_checkpoint`` pointer atomically (:mod:`rest_dense.run_files`: temporary file in
the output folder, ``fsync``, ``os.replace``), so a file under a checkpoint's name is always
complete and ``PeriodicCheckpointer(max_to_keep=...)`` deletes an old checkpoint only after
the new one is in place. Resuming (:meth:`RestDetectionCheckpointer.resume_or_load` with
``resume=True``) takes the most recent checkpoint of the output folder that loads, skipping
damaged ones with a warning, and says so plainly when there is nothing to resume from.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

from .. import run_files
from .. import safe_load
from ..models import (CheckpointMismatchError, find_backbone, load_checkpoint, matching_keys,
                      normalize_state_dict, rename_d2_norm_keys)
from ..models.base import ResTBase
from ..checkpoint_reader import (ModelCheckpoint, check_checkpoint, normalize_model_checkpoint,
                                read_checkpoint_object)

__all__ = ["RestDetectionCheckpointer", "find_rest_backbone", "classify_checkpoint",
           "CHECKPOINT_PATTERN", "FINAL_NAMES"]

#: file names of ``PeriodicCheckpointer``'s checkpoints (``model_0000099.pth``); the group is
#: the iteration
CHECKPOINT_PATTERN = r"model_(\d+)\.pth"
#: the checkpoint written at the end of training, newer than every numbered one
FINAL_NAMES = ("model_final.pth",)

_BACKBONE_ONLY = "__rest_backbone_only__"


def find_rest_backbone(model: nn.Module) -> Optional[Tuple[str, ResTBase]]:
    """The first ResT backbone inside ``model`` (DDP unwrapped) as ``(prefix, module)``,
    prefix with a trailing dot (``"backbone.bottom_up."``), or ``None``."""
    return find_backbone(model)


def classify_checkpoint(model: nn.Module, state_dict: Mapping[str, Any]) -> str:
    """``"detectron2"`` if ``state_dict`` (norm keys renamed) covers at least half of the
    model's ResT backbone entries under their model names, ``"backbone"`` if it does so only
    after the core loader's normalisation (an ImageNet / MM checkpoint), else ``"other"``."""
    found = find_rest_backbone(model)
    if found is None:
        return "other"
    prefix, backbone = found
    own = backbone.state_dict()
    if not own:
        return "other"
    if len(matching_keys(own, rename_d2_norm_keys(state_dict), prefix)) >= 0.5 * len(own):
        return "detectron2"
    if len(matching_keys(own, normalize_state_dict(state_dict)[0])) >= 0.5 * len(own):
        return "backbone"
    return "other"


class RestDetectionCheckpointer(DetectionCheckpointer):
    """:class:`detectron2.checkpoint.DetectionCheckpointer` that understands ResT checkpoints.

    Drop-in replacement: same constructor, ``load`` / ``resume_or_load`` / ``save``.
    Backbone-only checkpoints go through :func:`rest_dense.models.load_checkpoint` into the
    model's ResT backbone; detectron2 checkpoints get ``norm_i.0.`` renamed to ``norm_i.``.
    Saves are atomic and resuming falls back past damaged checkpoints (module docstring).
    """

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` (model, checkpointables, ``kwargs``) and point
        ``last_checkpoint`` at it, both atomically: a process killed at any moment leaves the
        previous checkpoint and pointer intact, or the new ones complete."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name")
        self.logger.info("Saving checkpoint to %s", save_file)
        run_files.atomic_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        run_files.atomic_write_text(os.path.join(self.save_dir, run_files.POINTER_NAME),
                                last_filename_basename)

    # ------------------------------------------------------------------ loading
    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """detectron2's ``load``, with ``~`` expanded in local paths as every reader of the
        package does (detectron2 takes ``~/w.pth`` for a missing file)."""
        if path and "://" not in path:
            path = os.path.expanduser(path)
        return super().load(path, checkpointables=checkpointables)

    # ------------------------------------------------------------------ resuming
    def resume_candidates(self) -> List[str]:
        """The output folder's checkpoints, the one to resume from first
        (:func:`rest_dense.run_files.resume_candidates`)."""
        if not self.save_dir:
            return []
        return run_files.resume_candidates(self.save_dir, CHECKPOINT_PATTERN,
                                       final_names=FINAL_NAMES)

    def has_checkpoint(self) -> bool:
        """Whether the output folder holds a checkpoint to resume from (the pointer, or a
        checkpoint file written just before the process died, before the pointer moved)."""
        return bool(self.resume_candidates())

    def find_resume_checkpoint(self) -> Optional[str]:
        """The most recent checkpoint of the output folder that loads (damaged ones are
        skipped with a warning naming them); ``None`` when there is none.

        Raises:
            ResumeError: there are checkpoints, but none can be read.
            UntrustedCheckpointError: the newest needs full unpickling and is not trusted.
        """
        if self.save_dir and self.save_to_disk:
            run_files.remove_stale_temporaries(self.save_dir, log=self.logger)
        return run_files.select_resume_checkpoint(
            self.resume_candidates(),
            read=lambda p: safe_load.load_checkpoint_file(p, map_location="cpu"), log=self.logger)

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """With ``resume``: load model and checkpointables from
        :meth:`find_resume_checkpoint`; without, or when the output folder holds no
        checkpoint (a warning says so), load the model weights of ``path`` only."""
        if resume:
            found = self.find_resume_checkpoint()
            if found is not None:
                return self._load_whole(found)
            self.logger.warning(
                "rest_dense: --resume: no checkpoint in %s to resume from; starting from %s",
                self.save_dir, f"the weights {path}" if path else "scratch")
        return self.load(path, checkpointables=[])

    def warn_if_earlier_run(self) -> None:
        """For a run started without ``--resume``: warn (main process) when the output
        folder holds an earlier run's checkpoints, which this run's may overwrite or delete
        (:func:`rest_dense.run_files.earlier_run_warning`)."""
        if self.save_dir and comm.is_main_process():
            warning = run_files.earlier_run_warning(self.save_dir, CHECKPOINT_PATTERN,
                                                    final_names=FINAL_NAMES)
            if warning:
                logging.getLogger("rest_dense.d2").warning("rest_dense: %s", warning)

    def load_to_resume(self, path: str) -> Dict[str, Any]:
        """Continue a run from ``path`` (``--resume FILE``): model, optimizer, scheduler and
        iteration. Only a detectron2 training checkpoint can do that; another file (a whole
        model of another framework, backbone weights, an exported model) is refused before
        anything is loaded, since it would silently restart at iteration 0.

        Raises:
            ResumeError: ``path`` holds no detectron2 training state.
        """
        loaded = self._load_file(path)
        if loaded.get(_BACKBONE_ONLY) or "iteration" not in loaded:
            what = ("weights of another framework or of the backbone only"
                    if loaded.get(_BACKBONE_ONLY) else "no iteration count")
            raise run_files.ResumeError(
                f"--resume {path}: not a detectron2 training checkpoint ({what}); resuming "
                "needs one written by detectron2 training (model_*.pth). To start from its "
                "weights, set MODEL.WEIGHTS (LazyConfig: train.init_checkpoint) instead")
        return self._load_whole(path)

    def _load_whole(self, path: str) -> Dict[str, Any]:
        """:meth:`load` for resuming: the file must hold every entry of this model (another
        model's file is refused by name, before its optimizer state fails to fit)."""
        previous, self.require_complete, self._purpose = self.require_complete, True, "--resume"
        try:
            return self.load(path)
        finally:
            self.require_complete, self._purpose = previous, ""

    # ------------------------------------------------------------------ reading
    def _read_native(self, filename: str) -> Dict[str, Any]:
        """A file in one of detectron2's formats, read under the trust policy, as
        ``{"model": state dict, ...}``."""
        if filename.endswith(".pkl"):
            data = safe_load.load_pickle_file(filename, log=self.logger)
            if not isinstance(data, Mapping):
                raise safe_load.CheckpointFormatError(
                    f"checkpoint {filename!r} holds a {type(data).__name__}, not a checkpoint "
                    "(a dict of arrays)")
            if "model" in data and "__author__" in data:  # detectron2 model-zoo layout
                self.logger.info("Reading a file from '%s'", data["__author__"])
                return dict(data)
            # Caffe2 / Detectron1 layout: weights (under "blobs" for detection models),
            # optimizer momenta left out; names are matched heuristically
            blobs = data.get("blobs", data)
            arrays = {k: v for k, v in blobs.items() if isinstance(v, (np.ndarray, torch.Tensor))
                      and not k.endswith("_momentum")} if isinstance(blobs, Mapping) else {}
            if not arrays:
                names = ", ".join(map(str, list(blobs)[:8])) if isinstance(blobs, Mapping) else ""
                raise safe_load.CheckpointFormatError(
                    f"checkpoint {filename!r} holds no arrays (entries: {names or 'none'}); it "
                    "is not a model checkpoint")
            return {"model": arrays, "__author__": "Caffe2", "matching_heuristics": True}
        loaded = read_checkpoint_object(filename, map_location="cpu", log=self.logger)
        if filename.endswith(".pyth"):  # pycls
            if not isinstance(loaded, Mapping) or "model_state" not in loaded:
                raise ValueError(f"{filename}: a .pyth (pycls) checkpoint must hold 'model_state'")
            return {"model": {k: v for k, v in loaded["model_state"].items()
                              if not k.endswith("num_batches_tracked")},
                    "__author__": "pycls", "matching_heuristics": True}
        # the one whole-model reader (rest_dense.checkpoint_reader): wrappers, DDP 'module.'
        # and EMA entries undone, the layout's framework kept for the messages
        self._read = normalize_model_checkpoint(loaded, source=f"checkpoint {filename!r}")
        if self._read.framework == "mmengine":  # only the weights of another framework's file
            return {"model": self._read.state_dict}
        return self._read.to_detectron2()

    #: raise when a whole-model checkpoint leaves entries of the model uninitialised
    #: (set for evaluation: ``rest-dense test``); heads of another shape are otherwise
    #: skipped with detectron2's warning, as fine-tuning on another dataset needs
    require_complete: bool = False
    _loading: str = "checkpoint"
    _purpose: str = ""  # what the messages name the load by ("--resume")

    _read: Optional[ModelCheckpoint] = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        self._read = None
        loaded = self._read_native(filename)
        sd = loaded["model"]
        if not isinstance(sd, Mapping):
            raise ValueError(f"{filename}: 'model' is a {type(sd).__name__}, not a state dict")
        sd = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v
              for k, v in sd.items()}
        kind = classify_checkpoint(self.model, {k: v for k, v in sd.items()
                                                if isinstance(v, torch.Tensor)})
        if kind == "backbone":
            # an MM detector / segmentor (not a classifier's head, as mmpretrain writes)
            rest = sorted({k.split(".", 1)[0] for k in sd if not k.startswith("backbone.")}
                          - {"head", "data_preprocessor"}
                          ) if any(k.startswith("backbone.") for k in sd) else []
            if self.require_complete:
                pass  # refused below (_load_model), with the reason: no note before it
            elif rest:  # a whole MMDetection / MMSegmentation model
                self.logger.warning(
                    "%s is a whole model of another framework (%s besides backbone.*): only "
                    "its ResT backbone is loaded; the rest of this model keeps its "
                    "initialisation (other frameworks' necks and heads are not converted)",
                    filename, ", ".join(f"{p}.*" for p in rest))
            else:
                self.logger.info("%s is a backbone-only checkpoint; loading it into the ResT "
                                 "backbone", filename)
            # nothing else of such a file (e.g. an ImageNet optimizer) belongs to this model
            return {"model": sd, _BACKBONE_ONLY: True}
        loaded["model"] = rename_d2_norm_keys(sd)
        if kind == "detectron2":
            loaded.pop("matching_heuristics", None)  # names already match exactly
        return loaded

    # ------------------------------------------------------------------ loading
    def _load_model(self, checkpoint: Any) -> Optional[_IncompatibleKeys]:
        if not checkpoint.pop(_BACKBONE_ONLY, False):
            if not checkpoint.get("matching_heuristics", False):
                # fvcore skips entries of another shape with a warning: a checkpoint of
                # another backbone variant would load nothing into the backbone, quietly
                read = self._read or ModelCheckpoint(state_dict=checkpoint["model"],
                                                     source=f"checkpoint {self._loading!r}")
                read.state_dict = checkpoint["model"]
                check_checkpoint(self.model, read, complete=self.require_complete,
                                 expect="detectron2", purpose=self._purpose)
            return super()._load_model(checkpoint)
        prefix, backbone = find_rest_backbone(self.model)
        if self.require_complete:
            if self._read is not None and self._read.framework == "mmengine":
                raise CheckpointMismatchError(
                    f"checkpoint {self._loading!r} is an MMDetection / MMSegmentation (mmengine) "
                    f"checkpoint ({self._read.layout}), the other framework's layout: only its "
                    "ResT backbone fits a detectron2 model, so evaluating it would score "
                    "randomly initialised heads (use it with its OpenMMLab config, or as "
                    "MODEL.WEIGHTS for training)")
            raise CheckpointMismatchError(
                f"checkpoint {self._loading!r} holds the ResT backbone only; evaluating it would "
                "score randomly initialised heads (pass a checkpoint of the whole model)")
        report = load_checkpoint(backbone, checkpoint.pop("model"), strict=False,
                                 log=self.logger)
        self.logger.info("Modules outside %s keep their initialisation.", prefix[:-1] or "the model")
        return _IncompatibleKeys(missing_keys=[prefix + k for k in report.missing_keys],
                                 unexpected_keys=list(report.unexpected_keys),
                                 incorrect_shapes=[])
