"""Latency of an exported model in ONNX Runtime next to PyTorch, on the same inputs and threads.

Both runtimes are timed on the same prepared input (image already resized; the framework's
normalisation, the model and the post-processing included, image decoding excluded), so the
difference is what the graph replaces. Runs alternate between the runtimes after warm-up, and
the median is reported.

Example::

    from rest_dense.deploy import load_deployment, measure_latency
    dep = load_deployment("toy/mask_rcnn_restv2_toy.py", "iter_600.pth")
    for r in measure_latency(dep, "mask_rcnn.onnx", sizes=[(120, 152)], threads=1):
        print(r.describe())
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = ["Latency", "measure_latency", "format_table"]

Size = Tuple[int, int]


@dataclass
class Latency:
    """Median latency of one input in both runtimes.

    Attributes:
        image: the image's name.
        image_size: ``(H, W)`` of the image.
        input_size: backbone input ``(H, W)`` (after resize and padding).
        torch_ms: PyTorch (eager) median, milliseconds.
        onnx_ms: ONNX Runtime median, milliseconds.
        runs: timed runs per runtime.
        threads: CPU threads of both runtimes.
    """

    image: str
    image_size: Size
    input_size: Size
    torch_ms: float
    onnx_ms: float
    runs: int
    threads: int

    @property
    def speedup(self) -> float:
        """PyTorch time / ONNX Runtime time."""
        return self.torch_ms / self.onnx_ms if self.onnx_ms > 0 else float("nan")

    def describe(self) -> str:
        return (f"{self.image} (network input {self.input_size[0]}x{self.input_size[1]}): "
                f"PyTorch {self.torch_ms:.1f} ms, ONNX Runtime {self.onnx_ms:.1f} ms "
                f"(x{self.speedup:.2f}; median of {self.runs}, {self.threads} thread"
                f"{'s' if self.threads != 1 else ''})")


def measure_latency(deployment, onnx_path: str, sizes: Sequence[Size] = (), images: Sequence[str] = (),
              runs: int = 10, warmup: int = 2, threads: int = 1, progress: bool = False) -> List[Latency]:
    """Time PyTorch and ONNX Runtime on synthetic images of ``sizes`` and on ``images``.

    Args:
        deployment: a :class:`~rest_dense.deploy.model_onnx.Deployment`.
        onnx_path: the exported model.
        sizes: ``(H, W)`` of synthetic test pictures.
        images: image files.
        runs: timed runs per runtime and image (median reported).
        warmup: untimed runs first.
        threads: ``torch.set_num_threads`` and ONNX Runtime's intra-op threads.
        progress: show a tqdm bar over the images.

    Returns:
        One :class:`Latency` per image.
    """
    import torch
    from tqdm import tqdm

    from .model_onnx import _check_images

    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        deployment.load_onnx(onnx_path, threads=threads)
        results = []
        items = _check_images(sizes, images)
        for name, image in tqdm(items, desc="benchmark", unit="img", disable=not progress):
            prepared = deployment.prepare(image)
            for _ in range(warmup):
                deployment.run_torch(prepared)
                deployment.run_onnx(prepared)
            t_torch, t_onnx = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                deployment.run_torch(prepared)
                t1 = time.perf_counter()
                deployment.run_onnx(prepared)
                t2 = time.perf_counter()
                t_torch.append(t1 - t0)
                t_onnx.append(t2 - t1)
            results.append(Latency(name, tuple(image.shape[:2]), deployment.input_size(prepared),
                                   1000 * statistics.median(t_torch), 1000 * statistics.median(t_onnx),
                                   runs, int(threads)))
        return results
    finally:
        torch.set_num_threads(old_threads)


def format_table(rows: Sequence[Tuple[str, Latency]], title: Optional[str] = None) -> str:
    """A Markdown table of ``(model label, Latency)`` rows."""
    lines = [] if title is None else [title, ""]
    lines += ["| model | image | network input | PyTorch (ms) | ONNX Runtime (ms) | speed-up |",
              "|---|---|---|---:|---:|---:|"]
    for label, r in rows:
        lines.append(f"| {label} | {r.image_size[0]}x{r.image_size[1]} | "
                     f"{r.input_size[0]}x{r.input_size[1]} | {r.torch_ms:.1f} | {r.onnx_ms:.1f} | "
                     f"x{r.speedup:.2f} |")
    return "\n".join(lines)
