"""Export a ResT backbone to ONNX and check ONNX / ``torch.compile`` against eager PyTorch.

Dynamic export (batch, height and width free) uses the TorchScript exporter
(``dynamo=False``), which records the model's shape arithmetic on the traced input but fixes
Python branches at trace time. The trace size must therefore take every branch that some input
size can take (:func:`trace_problems` says why a size cannot serve, from
:mod:`rest_dense.deploy.shapes`, the one home of these rules;
:func:`default_trace_shape` picks one; 257x385 for the default windows):

* every stage's map is not a multiple of its ``sr_ratio`` on at least one side, so the crop
  of the upsample branch is traced (a no-op slice at sizes that need none);
* window modes: every windowed stage's map is larger than its window on both sides and not
  a multiple of it on at least one, so window padding, partitioning and the final crop are
  traced.

Limit: in the window modes the eager model shrinks a window to the map when the map is smaller
(then the block equals global attention), which a traced graph cannot do; a dynamic graph is
therefore valid only for inputs whose windowed stages are at least one window large
(:func:`min_valid_side`: H and W >= 253 for the default windows 64/32/16/8); :func:`check_onnx`
rejects smaller sizes, and the graph itself answers them with NaN maps instead of wrong
numbers (:class:`_MinSideGuard`; the limit is also in the file's metadata,
``rest_dense.min_side``). Global mode has no such limit. A static export (``dynamic=False``) is
valid at its one size, whatever it is.

ResTv1's multi-head interaction runs in float64 (fp32 inputs). ONNX Runtime's CPU provider
has no float64 Conv or InstanceNormalization, so while tracing it is written in MatMul,
Softmax and mean/variance ops that it has (``rest_dense.models.restv1.mix_heads_decomposed``,
equal to the eager path to float64 rounding); the graph keeps the wide dtype.

Dynamic shapes with ``torch.compile`` and ``torch.export`` (:func:`compile_model`,
:func:`export_program`). What works:

* global attention: ``torch.compile(dynamic=True)`` compiles symbolic height and width
  (PyTorch may recompile once more when a size crosses a threshold of its CPU convolution
  backend). ``torch.export`` with dynamic height and width is traced, then the program's
  shape guards are probed: where the model's Python code branches on the input size (the
  upsample branch of EMSAv2 is cropped only when the map is not a multiple of ``sr_ratio``),
  the program would refuse ordinary sizes such as multiples of 32, and
  :class:`DynamicShapeError` is raised instead of returning it (a model that crops
  unconditionally exports for every H, W >= :func:`min_program_side`);
* window modes (``win``, ``cwin``, ``hwin`` with windowed blocks): static shapes only, one
  compile per input size. With symbolic sizes PyTorch's shape solver spends tens of seconds
  to minutes on each operator of the window padding and partitioning (a 4-stage 16-channel
  model had not finished its first compile after 8 minutes), so ``dynamic=True`` and a
  dynamic ``torch.export`` are refused up front (:class:`DynamicShapeError`, naming the
  alternatives), and ``compile_model``'s default turns PyTorch's automatic-dynamic recompile
  at the second size (the one that never finishes) into per-size static compiles;
* ONNX (:func:`export_onnx`): dynamic batch, height and width in every mode.

Example::

    from rest_dense.deploy.backbone_onnx import build_model, export_onnx, check_onnx
    model = build_model("restv2_tiny", attn_mode="hwin", checkpoint="restv2_tiny_224.pth")
    export_onnx(model, "restv2_tiny_hwin.onnx")
    for r in check_onnx(model, "restv2_tiny_hwin.onnx", [(320, 480), (257, 391)]):
        print(r.describe())
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..amp import autocast_off
from .runtime import ParityError, ParityResult, compare_outputs, finish, make_session
from .shapes import (default_trace_shape, min_valid_side, trace_problems,
                            trace_side_problems, windowed_stages)
from ..models import canonical_name, create_model, get_model_entry, load_checkpoint, read_state_dict

__all__ = ["DEFAULT_CHECK_SIZES", "DEFAULT_OPSET", "OnnxExport", "ParityResult", "ParityError",
           "DynamicShapeError", "build_model", "export_onnx", "check_onnx", "check_compile",
           "compile_model", "export_program", "check_program", "dynamic_shape_problem",
           "windowed_stages", "trace_problems", "trace_side_problems", "min_valid_side",
           "default_trace_shape", "min_program_side"]

#: sizes :func:`check_onnx` is run at by ``rest-dense export`` unless told otherwise
DEFAULT_CHECK_SIZES: Tuple[Tuple[int, int], ...] = ((320, 480), (257, 391))
DEFAULT_OPSET = 17
#: opsets a backbone exports at: the attention (scaled_dot_product_attention) needs 14
MIN_OPSET = 14

Size = Tuple[int, int]


# ------------------------------------------------------------------ models
def build_model(model: str, attn_mode: str = "global", checkpoint: Optional[str] = None,
                window_size: Union[int, Sequence[int], None] = None,
                weights_only: bool = True) -> nn.Module:
    """A core backbone in eval mode, from a registry name or from a checkpoint file.

    Args:
        model: registry name (``'restv2_tiny'``, ...) or a checkpoint file; for a file the
            variant is inferred from its tensors and its weights are loaded.
        attn_mode: attention mode (ResTv2: ``global``, ``win``, ``cwin``, ``hwin``).
        checkpoint: weights to load into a named model (any released layout). Default:
            random initialisation (or ``model``'s weights when it is a file).
        window_size: window side per stage (int or 4 ints); default: the model's.
        weights_only: ``torch.load(weights_only=...)`` for checkpoint files.

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: ``model`` is neither a registered name nor an existing file, or both a
            checkpoint file and ``checkpoint`` are given.
        CheckpointMismatchError: the weights do not fit the variant.
    """
    kwargs = {} if window_size is None else {"window_size": window_size}
    if attn_mode != "global":
        kwargs["attn_mode"] = attn_mode
    try:
        name = canonical_name(model)
    except ValueError:
        name = None
    if name is None:
        if not os.path.isfile(model):
            raise ValueError(f"{model!r} is neither a registered model nor a checkpoint file; "
                             "see `rest-dense export --help` for the model names")
        if checkpoint is not None:
            raise ValueError(f"{model!r} is a checkpoint file; do not pass another checkpoint")
        from ..convert import infer_model_name

        checkpoint = read_state_dict(model, weights_only=weights_only)
        name = infer_model_name(checkpoint)
    if window_size is not None and get_model_entry(name).attn_modes == ("global",):
        raise ValueError(f"{name} has global attention only; window_size does not apply")
    net = create_model(name, **kwargs)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint, weights_only=weights_only)
    return net.eval()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode, with autocast off: a graph is exported or traced in the
    model's own dtype (under a caller's autocast the trace would mix in casts that the
    exporters cannot type)."""
    was_training = model.training
    model.eval()
    try:
        with autocast_off():
            yield model
    finally:
        model.train(was_training)


def _output_names(model: nn.Module) -> List[str]:
    return [f"stage{i + 1}" for i in model.out_indices]


# ------------------------------------------------------------------ dynamic shapes
class DynamicShapeError(NotImplementedError, ValueError):
    """Dynamic height/width was asked of ``torch.compile`` / ``torch.export`` for a model or
    setting where it does not work in bounded time; the message names what to use instead.

    Raised before any compiling or tracing starts (a ``ValueError`` too, so command-line
    tools report it like other bad input).
    """


def dynamic_shape_problem(model: nn.Module) -> Optional[str]:
    """Why symbolic (dynamic) height and width cannot be compiled or exported for ``model``.

    With windowed stages, PyTorch's symbolic shape solver (used by ``torch.compile(...,
    dynamic=True)``, by the automatic-dynamic recompile ``torch.compile`` makes at the second
    input size, and by ``torch.export`` with ``Dim`` sizes) works for minutes on each
    operator of the window padding / partitioning: a 16-channel 4-stage model in ``win``
    mode had not finished its first compile after 8 minutes, ``restv2_tiny`` not after 10.
    Global attention has no such problem.

    A model class whose window code is written for symbolic sizes declares it with a
    class attribute ``symbolic_window_shapes = True``; this function then returns None.

    Args:
        model: a core backbone.

    Returns:
        The reason, with the alternatives, or None when dynamic sizes work.
    """
    stages = windowed_stages(model)
    if not stages or getattr(model, "symbolic_window_shapes", False) is True:
        return None
    mode = getattr(model, "attn_mode", "?")
    low = min_valid_side(model)
    return (f"dynamic height/width is not supported in attn_mode {mode!r} (stages "
            f"{', '.join(map(str, stages))} run in windows): PyTorch's symbolic shape solver "
            "does not finish on the window padding and partitioning (tens of seconds to "
            "minutes per operator). "
            "Use dynamic=False (static shapes: one compile per input size, seconds to a minute "
            "each; `rest-dense export --compile` without --dynamic), attn_mode='global', or "
            "the ONNX export (export_onnx / `rest-dense export`), whose graph has dynamic "
            f"batch, height and width in every attention mode (H, W >= {low} here)")


def _check_dynamic(model: nn.Module, what: str) -> None:
    problem = dynamic_shape_problem(model)
    if problem is not None:
        raise DynamicShapeError(f"{what}: {problem}")


def _check_backend(backend) -> None:
    if callable(backend):
        return
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"torch.compile backend must be a name or a callable, got {backend!r}")
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"unknown torch.compile backend {backend!r}; available: "
                         f"{', '.join(sorted(known))}")


def compile_model(model: nn.Module, backend: Union[str, Callable] = "inductor",
                  dynamic: Optional[bool] = None, **options) -> Callable:
    """``torch.compile(model)`` with dynamic-shape settings that finish in bounded time.

    ``dynamic`` (as in ``torch.compile``):

    * ``None`` (default): global attention uses PyTorch's default (static first, then one
      recompile with symbolic sizes when a second size comes); in the window modes it
      becomes ``False``, because the symbolic recompile never finishes there.
    * ``True``: symbolic height and width from the first call. Global attention only;
      window modes raise :class:`DynamicShapeError` before anything is compiled.
    * ``False``: one static compile per input size. Works in every mode; after
      ``torch._dynamo.config.recompile_limit`` sizes (8 by default) PyTorch runs new sizes
      eagerly (with a warning).

    Even with symbolic sizes PyTorch may recompile once more for a size on the other side
    of a threshold its kernels choose by (e.g. the CPU convolution backend).

    Args:
        model: a core backbone.
        backend: ``torch.compile`` backend (``'inductor'``, ``'aot_eager'``, ...) or a
            callable backend.
        dynamic: see above.
        **options: other ``torch.compile`` keywords (``mode``, ``fullgraph``, ``options``).

    Returns:
        The compiled model (compiling happens at the first call of each size).

    Raises:
        DynamicShapeError: ``dynamic=True`` for a model with windowed stages.
        ValueError: unknown backend name.
    """
    if not any(dynamic is v for v in (None, True, False)):
        raise ValueError(f"dynamic must be None, True or False, got {dynamic!r}")
    if dynamic is True:
        _check_dynamic(model, "torch.compile(dynamic=True)")
    elif dynamic is None and dynamic_shape_problem(model) is not None:
        dynamic = False
    _check_backend(backend)
    return torch.compile(model, backend=backend, dynamic=dynamic, **options)


def min_program_side(model: nn.Module) -> int:
    """Smallest input side a dynamic :func:`export_program` graph accepts: the last
    computed stage's map must be larger than 1 (PyTorch specialises sizes of 1)."""
    return 2 ** (max(model.out_indices) + 2) + 1


def _program_refusals(program, shape: Tuple[int, int, int, int], sides: Sequence[int]
                      ) -> List[Tuple[Size, str]]:
    """Sizes among ``(side, W)`` / ``(H, side)`` that the program's shape guards refuse
    (checked on zero-stride tensors: no forward pass runs)."""
    gm = program.module()
    guards = getattr(gm, "_guards_fn", None)
    if guards is None:  # a PyTorch without a guard function checks the guards at call time
        return []
    n, c, h0, w0 = shape
    refused = []
    sizes = [(s, w0) for s in sides] + [(h0, s) for s in sides]
    for h, w in sizes:
        try:
            guards(torch.empty((), dtype=torch.float32).expand(n, c, h, w))
        except AssertionError as e:
            refused.append(((h, w), str(e)))
    return refused


def export_program(model: nn.Module, shape: Optional[Size] = None, dynamic: bool = True,
                   batch: int = 1):
    """``torch.export.export`` of a backbone (in eval mode), with dynamic height and width.

    Dynamic: traced at :func:`default_trace_shape` (a given ``shape`` must pass
    :func:`trace_side_problems` on each side) with ``H, W >= min_program_side(model)``; the batch size is
    fixed to ``batch``. The program is then checked: if its shape guards refuse sizes such
    as multiples of 32 (a shape-dependent branch of the model was traced),
    :class:`DynamicShapeError` says so rather than returning a program that fails later.

    Args:
        model: a core backbone.
        shape: ``(H, W)`` to trace at; required when not ``dynamic``.
        dynamic: symbolic height and width (global attention only); False exports one
            static size (every mode).
        batch: batch size of the program.

    Returns:
        The ``torch.export.ExportedProgram``; call ``program.module()(x)``.

    Raises:
        DynamicShapeError: ``dynamic`` for a model with windowed stages (before tracing), or
            a traced program whose guards refuse ordinary sizes (after tracing).
        ValueError: no ``shape`` for a static export, a bad trace shape, ``batch < 1``.
    """
    from torch.export import Dim, export

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if dynamic:
        _check_dynamic(model, "torch.export with dynamic height/width")
        if shape is None:
            shape = default_trace_shape(model)
        # torch.export guards each side's branch condition by itself (``h != ... or w != ...``
        # short-circuits), so here every side must take every branch, not just one of them
        bad = [f"H={shape[0]}: {p}" for p in trace_side_problems(model, shape[0])]
        bad += [f"W={shape[1]}: {p}" for p in trace_side_problems(model, shape[1])]
        low = min_program_side(model)
        if min(shape) < low:
            bad.append(f"sides must be at least {low}")
        if bad:
            good = default_trace_shape(model)
            raise ValueError(f"a dynamic program traced at {shape[0]}x{shape[1]} would fix a "
                             f"shape-dependent branch ({'; '.join(bad)}); trace at "
                             f"{good[0]}x{good[1]} instead")
    elif shape is None:
        raise ValueError("a static torch.export program needs a shape (H, W)")
    shape = (int(shape[0]), int(shape[1]))
    x = torch.randn(batch, model.in_channels, *shape)
    with _eval_mode(model), torch.no_grad():
        if not dynamic:
            return export(model, (x,))
        side = Dim.DYNAMIC(min=min_program_side(model))
        # size-oblivious reasoning: no guards on sizes the graph does not depend on (e.g.
        # whether a slice happens to be contiguous); an older PyTorch without it gets more
        # guards, which the probe below reports
        from torch.fx.experimental import _config as fx_config

        oblivious = (fx_config.patch(backed_size_oblivious=True)
                     if hasattr(fx_config, "backed_size_oblivious") else contextlib.nullcontext())
        with oblivious:
            program = export(model, (x,), dynamic_shapes={"x": {2: side, 3: side}})
    low = min_program_side(model)
    sides = sorted({low, low + 1, 64, 256, 800, 1216, shape[0], shape[1]})
    refused = _program_refusals(program, (batch, model.in_channels, *shape), sides)
    if refused:
        (h, w), guard = refused[0]
        raise DynamicShapeError(
            f"torch.export traced a shape-dependent branch of the model: the program's guard "
            f"({guard}) refuses {len(refused)} of {2 * len(sides)} probed sizes, e.g. {h}x{w}. "
            "Use dynamic=False (one program per input size) or the ONNX export "
            "(export_onnx / `rest-dense export`), whose graph has dynamic batch, height and "
            "width")
    return program


def check_program(model: nn.Module, program, sizes: Sequence[Size], batch: int = 1,
                  atol: float = 1e-5, seed: int = 0, raise_on_failure: bool = True,
                  on_result: Optional[Callable[[ParityResult], None]] = None
                  ) -> List[ParityResult]:
    """Compare an :func:`export_program` program with eager PyTorch at each size.

    Args:
        model: the eager model the program was exported from (run in eval mode).
        program: the ``torch.export.ExportedProgram``.
        sizes: ``(H, W)`` input sizes.
        batch: batch size of the inputs (the program's).
        atol: largest accepted absolute difference.
        seed: seed of the random inputs.
        raise_on_failure: raise :class:`ParityError` after all sizes ran if any failed.
        on_result: called with each result as soon as it is known.

    Returns:
        One :class:`ParityResult` per size.

    Raises:
        ValueError: no sizes.
        ParityError: some size failed (with ``raise_on_failure``).
    """
    if not sizes:
        raise ValueError("check_program needs at least one size (H, W)")
    results = _compare_with_eager(model, program.module(), sizes, batch, atol, seed,
                                  "torch.export", on_result)
    return finish("torch.export program", results, raise_on_failure)


def _compare_with_eager(model: nn.Module, run: Callable, sizes: Sequence[Size], batch: int,
                        atol: float, seed: int, label: str,
                        on_result: Optional[Callable[[ParityResult], None]]
                        ) -> List[ParityResult]:
    """``run(x)`` against ``model(x)`` (eval mode, no grad) on seeded random inputs of each
    size; ``seconds`` of each result is ``run``'s call."""
    names = _output_names(model)
    gen = torch.Generator().manual_seed(seed)
    results = []
    with _eval_mode(model):
        for h, w in sizes:
            x = torch.randn(batch, model.in_channels, int(h), int(w), generator=gen)
            with torch.no_grad():
                ref = model(x)
                t0 = time.perf_counter()
                out = run(x)
                dt = time.perf_counter() - t0
            res = compare_outputs(names, out, ref, (int(h), int(w)), batch, atol, dt, label)
            results.append(res)
            if on_result is not None:
                on_result(res)
    return results


# ------------------------------------------------------------------ export
@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        shape: ``(H, W)`` traced at.
        dynamic: whether batch, height and width are free in the graph.
        opset: ONNX opset version.
        output_names: graph outputs, ``stage<i>`` per emitted stage.
        seconds: time the export took.
    """

    path: str
    shape: Size
    dynamic: bool
    opset: int
    output_names: List[str]
    seconds: float


#: the ONNX metadata key holding a dynamic graph's smallest valid input side
MIN_SIDE_METADATA = "rest_dense.min_side"


class _MinSideGuard(nn.Module):
    """The backbone, with every output multiplied by 1, or by NaN when the input's shorter
    side is below ``min_side``: traced into a dynamic graph, the size test stays in the
    graph (``Shape`` ops), so an input the graph cannot serve gives NaN maps, not silently
    wrong ones (ONNX has no assertion operator)."""

    def __init__(self, model: nn.Module, min_side: int):
        super().__init__()
        self.model, self.min_side = model, int(min_side)

    def forward(self, x: torch.Tensor):
        sides = torch._shape_as_tensor(x)[2:]
        valid = torch.min(sides) >= self.min_side
        factor = torch.where(valid, torch.ones((), dtype=x.dtype),
                             torch.full((), float("nan"), dtype=x.dtype))
        return tuple(out * factor for out in self.model(x))


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], shape: Optional[Size] = None,
                dynamic: bool = True, opset: int = DEFAULT_OPSET, batch: int = 1) -> OnnxExport:
    """Export ``model`` to ONNX (run in eval mode) and validate the file with ``onnx.checker``.

    Args:
        model: a core backbone.
        path: ONNX file to write (missing folders are created).
        shape: ``(H, W)`` to trace at. Default: :func:`default_trace_shape` (dynamic) -- a
            given shape must pass :func:`trace_problems` when ``dynamic``.
        dynamic: free batch, height and width; False fixes them to ``batch`` x ``shape``.
        opset: ONNX opset version.
        batch: batch size of a static graph (the trace input of a dynamic one has batch 1).

    Returns:
        :class:`OnnxExport`.

    Raises:
        ValueError: no ``shape`` for a static export, a dynamic trace at a shape that would
            fix a shape-dependent branch, an opset below :data:`MIN_OPSET`.
        ValueError: also ``path`` is a folder, lies below a file or cannot be written
            (checked before tracing: :func:`rest_dense.utils.check_output_path`; missing
            folders are created).
    """
    import onnx

    path = os.fspath(path)
    if isinstance(opset, bool) or int(opset) != opset or opset < MIN_OPSET:
        raise ValueError(f"opset {opset}: the attention (scaled_dot_product_attention) "
                         f"exports from opset {MIN_OPSET}")
    if shape is None:
        if not dynamic:
            raise ValueError("a static ONNX export needs a shape (H, W)")
        shape = default_trace_shape(model)
    shape = (int(shape[0]), int(shape[1]))
    if dynamic:
        bad = trace_problems(model, shape)
        if bad:
            good = default_trace_shape(model)
            raise ValueError(f"a dynamic export traced at {shape[0]}x{shape[1]} would fix a "
                             f"shape-dependent branch ({'; '.join(bad)}); trace at "
                             f"{good[0]}x{good[1]} instead")
    names = _output_names(model)
    axes = None
    if dynamic:
        axes = {"input": {0: "batch", 2: "height", 3: "width"}}
        axes.update({n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in names})
    x = torch.randn(1 if dynamic else batch, model.in_channels, *shape)
    from ..utils import check_output_path, make_parent_folder

    make_parent_folder(check_output_path(path, "the ONNX file", example="backbone.onnx"))
    t0 = time.perf_counter()
    low = min_valid_side(model) if dynamic else 1
    traced = _MinSideGuard(model, low) if low > 1 else model
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about Python ints are expected: the trace shape covers the branches
        warnings.simplefilter("ignore")
        torch.onnx.export(traced, (x,), path, dynamo=False, input_names=["input"],
                          output_names=names, dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True)
    graph = onnx.load(path)
    if low > 1:
        entry = graph.metadata_props.add()
        entry.key, entry.value = MIN_SIDE_METADATA, str(low)
        onnx.save(graph, path)
    onnx.checker.check_model(graph)
    return OnnxExport(path, shape, dynamic, opset, names, time.perf_counter() - t0)


def _onnx_input_dims(sess) -> List[Union[int, str, None]]:
    return list(sess.get_inputs()[0].shape)


def check_onnx(model: nn.Module, path: Union[str, os.PathLike], sizes: Sequence[Size],
               batch: int = 1, atol: float = 1e-4, seed: int = 0,
               raise_on_failure: bool = True,
               on_result: Optional[Callable[[ParityResult], None]] = None
               ) -> List[ParityResult]:
    """Run the ONNX file with onnxruntime (CPU) and compare each output with eager PyTorch.

    A size fails when an output differs by more than ``atol``, has a different shape, or has
    non-finite values on either side (a NaN difference never passes).

    Args:
        model: the eager model the file was exported from (run in eval mode).
        path: ONNX file.
        sizes: ``(H, W)`` input sizes to compare at.
        batch: batch size of the inputs.
        atol: largest accepted absolute difference.
        seed: seed of the random inputs.
        raise_on_failure: raise :class:`ParityError` after all sizes ran if any failed;
            False returns the results only.
        on_result: called with each result as soon as it is known (progress reporting).

    Returns:
        One :class:`ParityResult` per size, with the max abs difference per output.

    Raises:
        ValueError: no sizes; a size below :func:`min_valid_side` for a dynamic window-mode
            graph; or a size / batch other than the one a static graph was exported at.
        RuntimeError: onnxruntime cannot load the file.
        ParityError: some size failed (with ``raise_on_failure``).
    """
    if not sizes:
        raise ValueError("check_onnx needs at least one size (H, W)")
    sizes = [(int(h), int(w)) for h, w in sizes]
    sess = make_session(path, threads=torch.get_num_threads())
    dims = _onnx_input_dims(sess)
    if all(isinstance(d, int) for d in dims):  # static graph
        wrong = [s for s in sizes if s != tuple(dims[2:])]
        if wrong or batch != dims[0]:
            raise ValueError(f"{os.fspath(path)} is a static graph for input {dims}; cannot check "
                             f"batch {batch} at {', '.join(f'{h}x{w}' for h, w in sizes)}")
    else:
        low = min_valid_side(model)
        small = [s for s in sizes if min(s) < low]
        if small:
            raise ValueError(
                f"sizes {', '.join(f'{h}x{w}' for h, w in small)} are below {low} pixels, the "
                "smallest side at which a dynamic window-mode graph matches eager (windows "
                "larger than the map are shrunk in eager only); export statically for them")
    input_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    gen = torch.Generator().manual_seed(seed)
    results = []
    with _eval_mode(model):
        for size in sizes:
            x = torch.randn(batch, model.in_channels, *size, generator=gen)
            with torch.no_grad():
                ref = model(x)
            t0 = time.perf_counter()
            outs = sess.run(None, {input_name: x.numpy()})
            res = compare_outputs(names, outs, ref, size, batch, atol, time.perf_counter() - t0,
                           "onnxruntime")
            results.append(res)
            if on_result is not None:
                on_result(res)
    return finish(f"ONNX model {os.fspath(path)}", results, raise_on_failure)


def check_compile(model: nn.Module, sizes: Sequence[Size], backend: str = "inductor",
                  dynamic: Optional[bool] = None, batch: int = 1, atol: float = 1e-4,
                  seed: int = 0, raise_on_failure: bool = True,
                  on_result: Optional[Callable[[ParityResult], None]] = None
                  ) -> List[ParityResult]:
    """Compare ``torch.compile(model)`` with eager PyTorch at each size.

    Args:
        model: a core backbone (run in eval mode).
        sizes: ``(H, W)`` input sizes.
        backend: ``torch.compile`` backend (``'inductor'``, ``'aot_eager'``, ...).
        dynamic: as in :func:`compile_model` (None: symbolic sizes after the first size in
            global mode, one static compile per size in the window modes; True: symbolic
            from the start, global mode only; False: one static compile per size).
        batch: batch size of the inputs.
        atol: largest accepted absolute difference.
        seed: seed of the random inputs.
        raise_on_failure: raise :class:`ParityError` after all sizes ran if any failed.
        on_result: called with each result as soon as it is known.

    Returns:
        One :class:`ParityResult` per size; ``seconds`` is the compiled call's time (the first
        call of a size includes compiling).

    Raises:
        ValueError: no sizes; unknown backend.
        DynamicShapeError: ``dynamic=True`` in a window mode (before compiling).
        ParityError: some size failed (with ``raise_on_failure``).
    """
    if not sizes:
        raise ValueError("check_compile needs at least one size (H, W)")
    compiled = compile_model(model, backend=backend, dynamic=dynamic)
    results = _compare_with_eager(model, compiled, sizes, batch, atol, seed,
                                  f"torch.compile({backend})", on_result)
    return finish(f"torch.compile(backend={backend!r})", results, raise_on_failure)
