"""Behaviour shared by the ResT backbones: arch parsing, input checks, freezing,
norm_eval and gradient checkpointing. Pure PyTorch."""
from __future__ import annotations

import math
import numbers
import operator
import re
import warnings

from dataclasses import dataclass
from typing import AbstractSet, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from . import functional as _fast

ArchType = Union[str, Mapping]

#: output stride of each of the four stages
STAGE_STRIDES: Tuple[int, ...] = (4, 8, 16, 32)


class ConfigWarning(UserWarning):
    """A setting that takes no effect, or another than its user likely meant (a Swin
    ``window_size`` in global mode, ResNet input settings with ResT weights). Its own
    category, so that tools that silence the frameworks' notices keep these."""


@dataclass(frozen=True)
class FeatureInfo:
    """One emitted feature map of a backbone.

    Args:
        stage (int): 0-based stage index (the entry of ``out_indices``).
        name (str): ``'stage1'`` .. ``'stage4'`` (detectron2's feature names).
        channels (int): channels of the map.
        stride (int): input pixels per map pixel (4, 8, 16, 32).
    """

    stage: int
    name: str
    channels: int
    stride: int

_STAGE_ID_RE = re.compile(
    r"^(?:(?P<stem>stem)\.|stage(?P<s1>\d)\.|patch_(?:embed_)?(?P<s2>\d)\.|norm_?(?P<s3>\d)\."
    r"|cwin_convs\.(?P<cwin>\d)\.|(?P<final>norm)\.)")


def _is_bool(value) -> bool:
    """A Python, numpy or 0-d tensor bool (numpy 1 names its type ``bool_``, numpy 2
    ``bool``)."""
    kind = type(value)
    return (isinstance(value, bool)
            or kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")
            or isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def check_int(value, name: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as a Python int, checked where it enters.

    Integers of any kind (``int``, numpy integers, 0-d integer tensors) pass; bools and
    floats raise (``2.5`` is never truncated to ``2``), as do values outside ``low..high``.

    Args:
        value: the argument.
        name: its name, for the message.
        low: smallest allowed value (inclusive), or None.
        high: largest allowed value (inclusive), or None.

    Returns:
        The value as an ``int``.

    Raises:
        TypeError: not an integer (or a bool).
        ValueError: out of range.
    """
    if _is_bool(value):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if (low is not None and v < low) or (high is not None and v > high):
        rng = (f"in {low}..{high}" if low is not None and high is not None
               else f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def check_rate(value, name: str) -> float:
    """A probability-like rate (dropout, stochastic depth) in ``[0, 1)``.

    Raises:
        TypeError: not a real number (bools included).
        ValueError: NaN or outside ``[0, 1)``.
    """
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__})")
    v = float(value)
    if not 0.0 <= v < 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v


#: the default of a deprecated argument: "not given"
UNSET = type("Unset", (), {"__repr__": lambda self: "<unset>"})()


def deprecated_alias(value, old_value, name: str, old_name: str):
    """``value``, or ``old_value`` given under the deprecated name ``old_name`` (with a
    ``DeprecationWarning``); giving both with different values is an error."""
    if old_value is UNSET:
        return value
    warnings.warn(f"{old_name} is deprecated; use {name}", DeprecationWarning, stacklevel=3)
    if value is not True and value != old_value:
        raise ValueError(f"{name}={value!r} and the deprecated {old_name}={old_value!r} disagree; "
                         f"give {name} only")
    return old_value


def check_flag(value, name: str) -> bool:
    """``value`` if it is a bool (numpy bools too); anything else raises TypeError, so that
    ``"False"`` or ``2`` never silently means True."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


#: the memory levels of ``with_cp`` (what is recomputed in backward instead of kept):
#: ``'none'`` keeps what the (memory-lean) blocks save, ``'mlp'`` also recomputes each
#: block's 4C-wide MLP hidden map (one extra ``fc1`` GEMM per block), ``'block'``
#: recomputes whole blocks (gradient checkpointing: only block inputs are kept)
CP_LEVELS: Tuple[str, ...] = ("none", "mlp", "block")


def check_cp_level(value, name: str = "with_cp") -> Tuple[Union[bool, str], str]:
    """Normalise a ``with_cp`` setting.

    Args:
        value: ``False`` / ``'none'``, ``'mlp'``, or ``True`` / ``'block'`` (see
            :data:`CP_LEVELS`).
        name: the argument's name, for the error message.

    Returns:
        ``(with_cp, level)``: ``with_cp`` is ``False``, ``'mlp'`` or ``True`` (the bools
        keep their old meaning) and ``level`` one of :data:`CP_LEVELS`.

    Raises:
        TypeError: neither a bool nor a string.
        ValueError: a string that is not a level.
    """
    if _is_bool(value):
        return (True, "block") if value else (False, "none")
    if not isinstance(value, str):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}); "
                        f"a memory level name {CP_LEVELS} is also accepted")
    level = value.strip().lower()
    if level not in CP_LEVELS:
        raise ValueError(f"{name} must be True, False or one of {CP_LEVELS}, got {value!r}")
    return {"none": False, "mlp": "mlp", "block": True}[level], level


def check_per_stage(value, name: str, low: int = 1, n: int = 4) -> Tuple[int, ...]:
    """A sequence of ``n`` integers ``>= low``, one per stage, as a tuple.

    Raises:
        TypeError: not a sequence of integers.
        ValueError: wrong length, or a value below ``low``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Tensor)) \
            and not hasattr(value, "__array__"):
        raise TypeError(f"{name} needs {n} integers (one per stage), got {value!r}")
    values = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(values, (Sequence, range)):  # a 0-d array or tensor
        raise TypeError(f"{name} needs {n} integers (one per stage), got {value!r}")
    values = tuple(values)
    if len(values) != n:
        raise ValueError(f"{name} needs {n} integers (one per stage), got {len(values)}: {values}")
    return tuple(check_int(v, f"{name}[{i}]", low=low) for i, v in enumerate(values))


def check_num_outs(num_outs: Optional[int], levels: int) -> int:
    """A neck's ``num_outs``: None (one output per input level) or an int of at least the
    number of levels (the extra, coarser ones are pooled, see
    :func:`rest_dense.models.fpn.pool_extra_levels`)."""
    if num_outs is None:
        return levels
    num_outs = check_int(num_outs, "num_outs")
    if num_outs < levels:
        raise ValueError(f"num_outs ({num_outs}) must be at least the number of levels, "
                         f"len(in_channels) = {levels}")
    return num_outs


def check_channel_list(in_channels, owner: str) -> Tuple[int, ...]:
    """A neck's ``in_channels``: an ordered sequence of positive ints, one per level.

    Raises:
        TypeError: a string, a non-iterable, or an unordered collection (a set or a dict,
            whose order would silently decide which map goes to which level).
        ValueError: empty, or a value below 1.
    """
    if isinstance(in_channels, (str, bytes)) or not hasattr(in_channels, "__iter__"):
        raise TypeError(f"{owner} in_channels must be a sequence of ints (one per level), "
                        f"got {in_channels!r}")
    if getattr(in_channels, "ndim", 1) == 0:  # a 0-d array or tensor: one number
        raise TypeError(f"{owner} in_channels must be a sequence of ints (one per level), "
                        f"got the single value {in_channels!r}")
    if isinstance(in_channels, (AbstractSet, Mapping)):
        raise TypeError(f"{owner} in_channels must be ordered (a list or tuple, finest level "
                        f"first), got a {type(in_channels).__name__}: {in_channels!r}")
    values = list(in_channels)
    if not values:
        raise ValueError(f"{owner} in_channels is empty: no levels")
    return tuple(check_int(c, f"in_channels[{i}]", 1) for i, c in enumerate(values))


def check_input_matches(owner: str, x: Tensor, weight: Tensor) -> None:
    """Refuse, naming the fix, an input on another device than ``weight`` or of another
    dtype (inside ``torch.autocast`` float16 / bfloat16 / float32 inputs pass, and reduced
    weights must match the autocast dtype).

    Raises:
        ValueError: another device.
        TypeError: another dtype, or reduced weights under the other reduced autocast dtype.
    """
    if x.device != weight.device:
        raise ValueError(f"{owner} has its weights on {weight.device} but the input is on "
                         f"{x.device}; move one of them (x.to({str(weight.device)!r}))")
    autocast = _autocast_enabled(x.device.type)
    if autocast and weight.dtype in (torch.float16, torch.bfloat16):
        try:
            autocast_dtype = torch.get_autocast_dtype(x.device.type)
        except (AttributeError, TypeError, RuntimeError):  # older torch
            autocast_dtype = weight.dtype
        if autocast_dtype != weight.dtype:
            raise TypeError(f"{owner} has {weight.dtype} weights but runs under {autocast_dtype} "
                            f"autocast, which cannot mix them; keep the weights in float32 "
                            f"(model.float()) or use {weight.dtype} autocast")
    if x.dtype != weight.dtype:
        # autocast casts float32 / reduced tensors, never float64 ones (inputs or weights)
        if not (autocast and weight.dtype != torch.float64
                and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
            hint = ("autocast does not cast float64 inputs or weights" if autocast
                    else "or run under torch.autocast for mixed precision")
            raise TypeError(f"{owner} has {weight.dtype} weights but the input is {x.dtype}; "
                            f"cast the input (x.to({weight.dtype})) or the model ({hint})")


def resolve_arch(arch: ArchType, zoo: Mapping[str, Mapping], defaults: Mapping,
                 model_name: str) -> Dict:
    """Turn a variant name or an arch dict into a complete, validated arch dict.

    Args:
        arch: a key of ``zoo`` or a registered model name of the family (``'restv2_tiny'``;
            case-insensitive), or a dict with ``embed_dims``,
            ``num_heads``, ``depths``, ``sr_ratios`` (4 integers each) and optionally the
            keys of ``defaults``.
        zoo: the family's named variants.
        defaults: optional fields and their defaults (floats must be positive numbers,
            bools must be bools).
        model_name: the class name, for messages.

    Returns:
        The arch dict with every field, per-stage fields as tuples of ints.

    Raises:
        TypeError: ``arch`` is neither a name nor a dict, or a field has the wrong type
            (floats or bools where integers are needed are never truncated).
        ValueError: unknown name or field, missing field, a value out of range
            (``depths``, ``num_heads``, ``sr_ratios`` >= 1, ``embed_dims[0]`` >= 2, an
            ``mlp_ratio`` that leaves an MLP without hidden channels), or ``embed_dims``
            not divisible by ``num_heads``.
    """
    if isinstance(arch, str):
        key = arch.strip().lower()
        if key not in zoo:
            from .registry import get_model_entry, list_models

            try:  # a model name of this family ('restv2_tiny', 'rest_small') names its arch
                entry = get_model_entry(key)
            except ValueError:
                entry = None
            names = [n for n in list_models() if get_model_entry(n).cls.ARCHS is zoo]
            if entry is None or getattr(entry.cls, "ARCHS", None) is not zoo:
                raise ValueError(
                    f"unknown {model_name} arch {arch!r}; choose one of {sorted(zoo)} (or a "
                    f"model name: {', '.join(names)}) or pass a dict with "
                    f"{sorted(set(zoo[next(iter(zoo))]))}")
            key = entry.arch
        spec = dict(zoo[key])
    elif isinstance(arch, Mapping):
        spec = dict(arch)
    else:
        raise TypeError(f"{model_name} arch must be a variant name or a dict, got {type(arch).__name__}")

    required = ("embed_dims", "num_heads", "depths", "sr_ratios")
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"{model_name} arch dict is missing {missing}")
    allowed = set(required) | set(defaults)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{model_name} arch dict has unknown fields {unknown}; allowed: {sorted(allowed)}")
    for k, v in defaults.items():
        spec.setdefault(k, v)
    for k in required:
        spec[k] = check_per_stage(spec[k], f"{model_name} arch field {k!r}", low=1)
    if spec["embed_dims"][0] < 2:
        raise ValueError(f"{model_name} arch field 'embed_dims'[0] must be at least 2 (the stem's "
                         f"first conv has embed_dims[0] // 2 channels), got {spec['embed_dims'][0]}")
    for k, default in defaults.items():
        if isinstance(default, bool):
            spec[k] = check_flag(spec[k], f"{model_name} arch field {k!r}")
        elif isinstance(default, numbers.Real):
            v = spec[k]
            if _is_bool(v) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{model_name} arch field {k!r} must be a positive number, got {v!r}")
            spec[k] = float(v) if isinstance(default, float) else v
    for i, (c, h) in enumerate(zip(spec["embed_dims"], spec["num_heads"])):
        if c % h:
            raise ValueError(f"stage {i + 1}: embed_dims {c} is not divisible by num_heads {h}")
    if "mlp_ratio" in spec:
        ratio = spec["mlp_ratio"]
        narrow = [(i, c) for i, c in enumerate(spec["embed_dims"]) if int(c * ratio) < 1]
        if narrow:
            i, c = narrow[0]
            raise ValueError(f"{model_name} arch field 'mlp_ratio' {ratio!r} leaves stage {i + 1}'s "
                             f"MLP (embed_dims {c}) without hidden channels: int({c} * mlp_ratio) "
                             "must be at least 1")
    return spec


class ResTBase(nn.Module):
    """Common machinery of :class:`ResTv2` and :class:`ResTv1`.

    Subclasses build ``self.stem`` and the per-stage modules and implement
    :meth:`stage_modules` (which modules belong to stage ``i``, for freezing).
    """

    num_stages = 4

    def _setup_common(self, spec: Dict, in_channels: int, out_indices: Sequence[int],
                      frozen_stages: int, norm_eval: bool, with_cp: Union[bool, str]) -> None:
        """Check and store the constructor arguments both families share.

        Raises:
            TypeError: ``in_channels``, ``out_indices`` or ``frozen_stages`` are not integers
                (bools and floats included), ``out_indices`` is not a sequence, or
                ``norm_eval`` is not a bool, ``with_cp`` neither a bool nor a level name.
            ValueError: ``in_channels`` < 1; ``out_indices`` empty, outside 0..3 or repeated
                (any order is fine: outputs come in the order asked for); ``frozen_stages``
                outside -1..4; ``with_cp`` a string outside :data:`CP_LEVELS`.
        """
        self.arch = spec
        self.embed_dims = spec["embed_dims"]
        self.depths = spec["depths"]
        self.sr_ratios = spec["sr_ratios"]
        self.in_channels = check_int(in_channels, "in_channels", low=1)
        if not _is_bool(out_indices) and isinstance(out_indices, numbers.Integral):
            out_indices = (out_indices,)
        if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, (Sequence, Tensor)) \
                and not hasattr(out_indices, "__array__"):
            raise TypeError(f"out_indices must be a sequence of stage indices 0..{self.num_stages - 1} "
                            f"(order matters), got {out_indices!r}")
        raw = out_indices.tolist() if hasattr(out_indices, "tolist") else out_indices
        raw = tuple(raw) if isinstance(raw, (Sequence, range)) else (raw,)  # 0-d array/tensor
        out_indices = tuple(check_int(i, f"out_indices[{j}]", 0, self.num_stages - 1)
                            for j, i in enumerate(raw))
        if not out_indices:
            raise ValueError(f"out_indices must be a non-empty subset of 0..{self.num_stages - 1}, "
                             f"got {raw}")
        if len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices has duplicates: {out_indices}")
        self.out_indices = out_indices
        #: the emitted maps, in output order (what necks and adapters read)
        self.feature_info: Tuple[FeatureInfo, ...] = tuple(
            FeatureInfo(i, f"stage{i + 1}", int(self.embed_dims[i]), STAGE_STRIDES[i])
            for i in out_indices)
        self.frozen_stages = check_int(frozen_stages, "frozen_stages", -1, self.num_stages)
        self.norm_eval = check_flag(norm_eval, "norm_eval")
        #: ``False``, ``'mlp'`` or ``True`` (may be changed later); :attr:`cp_level` names it
        self.with_cp = check_cp_level(with_cp, "with_cp")[0]
        #: check every input for NaN/inf in forward (see :meth:`_check_input` for the cost)
        self.check_finite_inputs = True

    def _finish_init(self, pretrained: Optional[str]) -> None:
        """Initialise, optionally load weights, and freeze (before any optimizer exists)."""
        self.reset_parameters()
        if pretrained:
            self.load_pretrained(pretrained)
        self._freeze_stages()

    # ----------------------------------------------------------------- helpers
    def reset_parameters(self) -> None:
        """The released code's random initialisation (called by the constructor)."""
        raise NotImplementedError

    def init_weights(self) -> None:
        """Re-initialise the weights randomly (framework adapters extend this)."""
        self.reset_parameters()

    def stage_modules(self, i: int) -> List[nn.Module]:
        """Modules owned by stage ``i`` (0 = stem, 1..4 = stages); used for freezing."""
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        """Check an input batch where it enters ``forward``; raise a clear error otherwise.

        Accepted: a floating-point ``(N, C, H, W)`` Tensor with ``N >= 1`` (an empty batch
        raises ``ValueError`` rather than returning empty maps), ``C == in_channels`` and
        ``H, W >= 1``, on the device of the weights, of the weights' dtype. Inside
        ``torch.autocast`` for the input's device, float16 / bfloat16 / float32 inputs are all
        accepted (autocast casts them); float64 still must match the weights.

        While ``self.check_finite_inputs`` is True (the default) the input must be free of
        NaN/inf. Cost: one summation over the input. On the CPU the check is made at once
        (``ValueError`` with the counts); on an accelerator it is an asynchronous device-side
        assertion (``torch._assert_async``: no device-to-host synchronisation, the error
        surfaces at the next synchronising call). ``'async'`` forces the device-side form,
        ``False`` skips the check; it is skipped anyway while tracing or compiling
        (``torch.jit.trace``, ``torch.compile``, ``torch.export`` / ONNX export) and inside
        ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``: no data-dependent check can
        run there).

        Raises:
            TypeError: not a Tensor; an integer/bool dtype; a float dtype other than the
                weights' (outside autocast); float16 / bfloat16 weights under autocast to the
                other reduced dtype.
            ValueError: not 4-D, wrong channel count, empty batch or image, another device
                than the weights', NaN/inf values.
        """
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} expects a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        # while tracing, sizes are tensors: comparing them would bake the branch into the trace
        tracing = _fast.tracing()
        if not tracing:
            if x.shape[1] != self.in_channels:
                raise ValueError(f"{name} was built for {self.in_channels} input channels, got an "
                                 f"input with {x.shape[1]} channels (shape {tuple(x.shape)})")
            if x.shape[0] == 0:
                raise ValueError(f"{name} got an empty batch (N=0, shape {tuple(x.shape)}); "
                                 "call it with at least one image")
            if x.shape[2] == 0 or x.shape[3] == 0:
                raise ValueError(f"{name} got an empty image (H x W = {x.shape[2]} x {x.shape[3]})")
        if not x.is_floating_point():
            raise TypeError(f"{name} expects a floating-point input, got {x.dtype}; convert and "
                            "normalise the images first (e.g. (x.float() - mean) / std)")
        weight = next(self.parameters(), None)
        if weight is None:
            return
        check_input_matches(name, x, weight)
        check = getattr(self, "check_finite_inputs", True)
        # under torch.func transforms (vmap, grad, jvp) a data-dependent check cannot run
        if check and not tracing and not _fast._in_functorch_transform(x):
            with torch.no_grad():
                total = x.sum() if x.dtype == torch.float64 else x.sum(dtype=torch.float32)
                if check == "async" or (check is True and x.device.type != "cpu"):
                    # on an accelerator a Python-side check would wait for the device
                    # (a device-to-host synchronisation every step): assert on the device
                    torch._assert_async(torch.isfinite(total),
                                        f"{name} got an input with non-finite values (NaN/inf)")
                    return
                if not bool(torch.isfinite(total)):
                    # the sum overflows only for absurd magnitudes; count to be sure
                    n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
                    if n_nan or n_inf:
                        raise ValueError(
                            f"{name} got an input with non-finite values ({n_nan} NaN, {n_inf} inf "
                            f"of {x.numel()}); set model.check_finite_inputs = False to skip "
                            "this check")

    @property
    def cp_level(self) -> str:
        """The ``with_cp`` memory level: ``'none'``, ``'mlp'`` or ``'block'`` (:data:`CP_LEVELS`)."""
        return check_cp_level(self.with_cp, "with_cp")[1]

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        """Run one transformer block at the model's ``with_cp`` memory level
        (:data:`CP_LEVELS`); recomputation only happens while gradients are recorded."""
        level = self.cp_level
        if level == "none" or not torch.is_grad_enabled():
            return block(x)
        if level == "block":
            # also when only the weights record (a frozen stem before stage 1)
            if x.requires_grad or any(p.requires_grad for p in block.parameters()):
                return cp.checkpoint(_BlockRecompute(block), x, use_reentrant=False)
            return block(x)
        return block(x, recompute=level)

    def _freeze_stages(self) -> None:
        """Freeze the stem and stages ``1..frozen_stages`` (eval mode, no gradients).

        Stages after the last one in ``out_indices`` never run in ``forward``: their
        parameters are taken out of training too (``requires_grad=False``), since they would
        never get a gradient (DDP without ``find_unused_parameters`` stops on such
        parameters). They stay in the model, so checkpoints load and save unchanged.
        """
        for i in range(self.frozen_stages + 1):
            for m in self.stage_modules(i):
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False
        for i in range(max(self.out_indices) + 2, self.num_stages + 1):
            for m in self.stage_modules(i):
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of each emitted map, in output order (from :attr:`feature_info`)."""
        return tuple(f.channels for f in self.feature_info)

    def stage_id(self, param_name: str) -> int:
        """Stage of a parameter for stage-wise lr decay: 0 = stem, 1..4 = stages (with their
        patch embedding and output norms); ``num_stages + 1`` for names outside the backbone.

        ``param_name`` is relative to the backbone (e.g. ``'stage3.0.attn.q.weight'``).
        """
        m = _STAGE_ID_RE.match(param_name)
        if m is None:
            return self.num_stages + 1
        if m.group("stem"):
            return 0
        if m.group("cwin"):
            return int(m.group("cwin")) + 1
        if m.group("final"):
            return self.num_stages
        return int(next(g for g in m.group("s1", "s2", "s3") if g))

    def load_pretrained(self, checkpoint, strict: bool = False, weights_only: bool = True):
        """Load weights with :func:`rest_dense.models.load_checkpoint`; returns its report."""
        if _CHECKPOINT_LOADER[0] is None:  # only when this module is imported on its own
            import importlib

            importlib.import_module(__package__ + ".pretrained")
        return _CHECKPOINT_LOADER[0](self, checkpoint, strict=strict, weights_only=weights_only)

    # ----------------------------------------------------------------- forward
    def patch_embed(self, i: int) -> nn.Module:
        """The patch embedding in front of stage ``i`` (0-based, ``i >= 1``)."""
        raise NotImplementedError

    def _forward_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i``'s blocks (and what the family adds after them) on channels-last tokens."""
        raise NotImplementedError

    def _stage_output(self, i: int, x: Tensor) -> Tensor:
        """The emitted map of stage ``i`` from its tokens (before the NCHW conversion)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Args: x: ``(N, C, H, W)`` images. Returns: tuple of NCHW maps for ``out_indices``."""
        self._check_input(x)
        feats = {}
        x = self.stem(x)  # channels-last tokens (N, H/4, W/4, C) from here on
        for i in range(max(self.out_indices) + 1):
            if i > 0:
                x = self.patch_embed(i)(x.permute(0, 3, 1, 2))
            x = self._forward_stage(i, x)
            if i in self.out_indices:
                feats[i] = to_channels_first(self._stage_output(i, x))
        return tuple(feats[i] for i in self.out_indices)


#: the weight loader (:func:`rest_dense.models.pretrained.load_checkpoint`); that module
#: registers it when imported, so that this one does not import it (layering: the
#: checkpoint code depends on the models, not the reverse)
_CHECKPOINT_LOADER: list = [None]


def set_checkpoint_loader(loader) -> None:
    """Register the function :meth:`ResTBase.load_pretrained` calls."""
    _CHECKPOINT_LOADER[0] = loader


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 takes no device type
        return bool(torch.is_autocast_enabled()) if device_type == "cuda" else \
            bool(torch.is_autocast_cpu_enabled()) if device_type == "cpu" else False
    except RuntimeError:  # a device without autocast (meta: shape inference)
        return False


class _BlockRecompute:
    """Calls ``block`` with the fast-path switch of :mod:`.functional` as it was when the
    forward ran, so that the recomputation in backward saves the same tensors.

    The block also runs at the ``'mlp'`` level inside: while one block is recomputed in
    backward its 4C-wide hidden map is not kept either, which lowers the peak (the largest
    block's recomputation sets it) for one more ``fc1`` GEMM per block."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.fast = _fast.fast_paths_enabled()
        self.attention = _fast._FORCED_ATTENTION[0]

    def __call__(self, x: Tensor) -> Tensor:
        with _fast.fast_paths(self.fast), _fast.forced_attention(self.attention):
            return self.block(x, recompute="mlp")


def to_channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2).contiguous()
