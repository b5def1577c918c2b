"""A ``DetectionCheckpointer`` that loads every released ResT checkpoint layout.

``MODEL.WEIGHTS`` may point at

* an ImageNet checkpoint (``{"model": sd}`` with ``stem.*``, ``stage1.*``, ..., ``head.*``),
  or any other backbone-only / foreign-framework checkpoint (``backbone.*`` from
  MMDetection/MMSegmentation, ``module.*``): the backbone part is loaded into the
  model's ResT backbone through :func:`rest_dense.models.load_checkpoint`, the rest of
  the model keeps its initialisation;
* a detectron2 checkpoint (the authors' released ones spell the output norms
  ``backbone.bottom_up.norm_i.0.*``; converted or our own ones ``norm_i.*``): the norm
  keys are renamed and the whole model is loaded the usual way.

Files are read with ``torch.load(weights_only=True)``. Only checkpoints inside the
checkpointer's own ``save_dir`` (what training wrote, e.g. for ``--resume``) are
unpickled fully if the safe loader refuses them.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

from ..models import load_checkpoint, matching_keys, normalize_state_dict, rename_d2_norm_keys
from ..models.base import ResTBase

__all__ = ["RestDetectionCheckpointer", "find_rest_backbone", "classify_checkpoint"]

_BACKBONE_ONLY = "__rest_backbone_only__"


def find_rest_backbone(model: nn.Module) -> Optional[Tuple[str, ResTBase]]:
    """The first ResT backbone inside ``model`` (DDP unwrapped) as ``(prefix, module)``,
    prefix with a trailing dot (``"backbone.bottom_up."``), or ``None``."""
    model = getattr(model, "module", model)
    for name, module in model.named_modules():
        if isinstance(module, ResTBase):
            return (name + "." if name else ""), module
    return None


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
    """

    # ------------------------------------------------------------------ reading
    def _trusted(self, filename: str) -> bool:
        if not self.save_dir:
            return False
        root = os.path.realpath(self.save_dir)
        return os.path.realpath(filename).startswith(root + os.sep)

    def _torch_load(self, filename: str) -> Any:
        try:
            return torch.load(filename, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if not self._trusted(filename):
                raise RuntimeError(
                    f"{filename} holds objects other than tensors and plain containers, which "
                    f"torch.load(weights_only=True) refuses to unpickle. Downloaded weights should "
                    f"not need that; if this is your own checkpoint and you trust it, re-save its "
                    f"'model' state dict alone, or put it in the output directory.") from e
            self.logger.warning("%s needs full unpickling; allowed because it is inside the "
                                "output directory %s", filename, self.save_dir)
            return torch.load(filename, map_location="cpu", weights_only=False)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith((".pkl", ".pyth")):
            loaded = super()._load_file(filename)
        else:
            loaded = self._torch_load(filename)
            if not isinstance(loaded, Mapping):
                raise ValueError(f"{filename}: expected a dict checkpoint, got {type(loaded).__name__}")
            loaded = dict(loaded)
            if "model" not in loaded:
                if isinstance(loaded.get("state_dict"), Mapping):  # mmengine / lightning layout
                    loaded = {"model": loaded["state_dict"]}
                else:
                    loaded = {"model": loaded}
        sd = loaded["model"]
        if not isinstance(sd, Mapping):
            raise ValueError(f"{filename}: 'model' is a {type(sd).__name__}, not a state dict")
        sd = {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v
              for k, v in sd.items()}
        kind = classify_checkpoint(self.model, {k: v for k, v in sd.items()
                                                if isinstance(v, torch.Tensor)})
        if kind == "backbone":
            self.logger.info("%s is a backbone-only checkpoint; loading it into the ResT backbone",
                             filename)
            # nothing else of such a file (e.g. an ImageNet optimizer) belongs to this model
            return {"model": sd, _BACKBONE_ONLY: True}
        loaded["model"] = rename_d2_norm_keys(sd)
        if kind == "detectron2":
            loaded.pop("matching_heuristics", None)  # names already match exactly
        return loaded

    # ------------------------------------------------------------------ loading
    def _load_model(self, checkpoint: Any) -> Optional[_IncompatibleKeys]:
        if not checkpoint.pop(_BACKBONE_ONLY, False):
            return super()._load_model(checkpoint)
        prefix, backbone = find_rest_backbone(self.model)
        report = load_checkpoint(backbone, checkpoint.pop("model"), strict=False,
                                 log=self.logger)
        self.logger.info("Modules outside %s keep their initialisation.", prefix[:-1] or "the model")
        return _IncompatibleKeys(missing_keys=[prefix + k for k in report.missing_keys],
                                 unexpected_keys=list(report.unexpected_keys),
                                 incorrect_shapes=[])
