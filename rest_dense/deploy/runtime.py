"""The ONNX Runtime session and the parity result shared by every exporter.

* :func:`make_session` -- the one way this package opens an ONNX file in ONNX Runtime
  (providers, threads, session options, MMDeploy's custom operators when the graph uses
  them): ``rest-dense export`` (:func:`rest_dense.deploy.backbone_onnx.check_onnx`), ``rest-dense
  export-model`` and its latency benchmark.
* :class:`ParityResult` -- one comparison of an exported / compiled model with eager PyTorch
  on one input: per-output tensor differences for backbones (:func:`compare_outputs`),
  prediction metrics for whole models (:func:`rest_dense.deploy.predictions.compare_predictions`,
  :meth:`rest_dense.deploy.model_onnx.Deployment.check`). :class:`ParityError` carries the
  results that failed.

Importing this module imports neither torch nor onnxruntime.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["make_session", "ParityResult", "ParityError", "compare_outputs", "finish"]

Size = Tuple[int, int]


def make_session(path: Union[str, "os.PathLike[str]"], threads: Optional[int] = None,
                 device: str = "cpu"):
    """An ONNX Runtime session for ``path``.

    Args:
        path: ONNX file.
        threads: intra-op threads (inter-op: 1); default: ONNX Runtime's choice, all cores.
        device: ``'cpu'`` or ``'cuda[:i]'`` (CUDA execution provider, CPU as fallback).

    Returns:
        ``onnxruntime.InferenceSession``. MMDeploy's custom-operator library is registered
        only when the graph uses an operator outside the standard ONNX domains.

    Raises:
        RuntimeError: ONNX Runtime cannot load the file, or it needs MMDeploy's operator
            library and that is missing.
    """
    import onnx
    import onnxruntime as ort

    path = os.fspath(path)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 (protobuf / OSError: not a readable model)
        raise RuntimeError(f"onnxruntime cannot load {path}: {e}") from e
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    if domains:
        from mmdeploy.backend.onnxruntime.init_plugins import get_ops_path

        ops = get_ops_path()
        if not os.path.exists(ops):
            raise RuntimeError(f"{path} uses custom operators ({sorted(domains)}) but MMDeploy's "
                               "ONNX Runtime operator library is missing")
        opts.register_custom_ops_library(ops)
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        providers: List[Any] = [("CUDAExecutionProvider", {"device_id": index}),
                                "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # noqa: BLE001 (onnxruntime raises its own exception types)
        raise RuntimeError(f"onnxruntime cannot load {path}: {e}") from e


@dataclass
class ParityResult:
    """One comparison of an exported / compiled model with eager PyTorch on one input.

    Backbones compare output tensors (``max_abs_diff``, held to ``atol``); whole models
    compare predictions (``metrics``, the tolerances' verdicts in ``problems``) on a named
    ``image``.

    Attributes:
        size: ``(H, W)`` of the network input (whole models: after resize and padding).
        batch: batch size of the input.
        max_abs_diff: per output name, the largest absolute difference (NaN when either side
            has non-finite values).
        atol: tolerance the differences were held to.
        problems: what failed besides ``atol`` (non-finite values, shape mismatches,
            predictions outside the tolerances).
        seconds: time of the run under test (for ``torch.compile``, the first call of a size
            includes compiling).
        metrics: what a prediction comparison measured (``max_box_diff``, ``matched``,
            ``pixel_agreement``, ...).
        image: the image's name (a path, or ``'synthetic HxW'``), for whole models.
        image_size: ``(H, W)`` of that image.
        graph_problems: why the traced graph is not valid at this input
            (:func:`rest_dense.deploy.shapes.graph_problems`); then the check fails whatever
            the outputs.
    """

    size: Size
    batch: int = 1
    max_abs_diff: Dict[str, float] = field(default_factory=dict)
    atol: float = 0.0
    problems: List[str] = field(default_factory=list)
    seconds: float = 0.0
    metrics: Dict[str, Any] = field(default_factory=dict)
    image: Optional[str] = None
    image_size: Optional[Size] = None
    graph_problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problems, and every difference finite and within ``atol``."""
        return not self.problems and not self.graph_problems and all(
            math.isfinite(d) and d <= self.atol for d in self.max_abs_diff.values())

    @property
    def worst(self) -> float:
        """The largest difference over the outputs; NaN if any is NaN."""
        values = list(self.max_abs_diff.values())
        if any(math.isnan(d) for d in values):
            return math.nan
        return max(values, default=math.nan)

    def describe(self) -> str:
        """One line: the input, what was measured, the verdict and the problems."""
        if self.image is None and not self.metrics:  # output tensors
            diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.max_abs_diff.items())
            line = (f"{self.batch}x3x{self.size[0]}x{self.size[1]}: max abs diff {diffs} "
                    f"(atol {self.atol:g}) {'ok' if self.ok else 'FAIL'}")
            return line + (f" -- {'; '.join(self.problems)}" if self.problems else "")
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in self.metrics.items())
        text += " -- " + "; ".join(self.problems) if self.problems else ""
        if self.image is None:  # a bare comparison of predictions
            return text
        ih, iw = self.image_size or self.size
        text = (f"{self.image} ({ih}x{iw}, network input {self.size[0]}x{self.size[1]}): "
                + text + ("  ok" if self.ok else "  FAIL"))
        if self.graph_problems:
            text += " -- graph not valid here: " + "; ".join(self.graph_problems)
        return text


class ParityError(AssertionError):
    """A checked model disagrees with eager PyTorch; ``results`` holds every comparison."""

    def __init__(self, what: str, results: List[ParityResult]):
        self.results = results
        failed = [r.describe() for r in results if not r.ok]
        super().__init__(f"{what} differs from eager PyTorch at {len(failed)} of "
                         f"{len(results)} sizes: " + " | ".join(failed))


def compare_outputs(names: Sequence[str], outs: Sequence, refs: Sequence, size: Size,
                    batch: int, atol: float, seconds: float, what: str) -> ParityResult:
    """Compare output tensors ``outs`` of ``what`` with the eager ``refs``, name by name."""
    import torch

    diffs: Dict[str, float] = {}
    problems: List[str] = []
    if len(outs) != len(refs):
        problems.append(f"{what} gives {len(outs)} outputs, eager {len(refs)}")
    for name, out, ref in zip(names, outs, refs):
        out = torch.as_tensor(out).float()
        ref = ref.float()
        if tuple(out.shape) != tuple(ref.shape):
            problems.append(f"{name}: {what} shape {tuple(out.shape)} != eager {tuple(ref.shape)}")
            diffs[name] = math.nan
            continue
        bad = []
        if not torch.isfinite(ref).all():
            bad.append("eager")
        if not torch.isfinite(out).all():
            bad.append(what)
        if bad:
            problems.append(f"{name}: non-finite values in the {' and '.join(bad)} output")
            diffs[name] = math.nan
            continue
        diffs[name] = float((out - ref).abs().max()) if out.numel() else 0.0
    return ParityResult(size, batch, diffs, atol, problems, seconds)


def finish(what: str, results: List[ParityResult], raise_on_failure: bool) -> List[ParityResult]:
    """``results``, or :class:`ParityError` when some failed and ``raise_on_failure``."""
    if raise_on_failure and not all(r.ok for r in results):
        raise ParityError(what, results)
    return results
