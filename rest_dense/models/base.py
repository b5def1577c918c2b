"""Behaviour shared by the ResT backbones: arch parsing, input checks, freezing,
norm_eval and gradient checkpointing. Pure PyTorch."""
from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn

ArchType = Union[str, Mapping]

#: output stride of each of the four stages
STAGE_STRIDES: Tuple[int, ...] = (4, 8, 16, 32)


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


def resolve_arch(arch: ArchType, zoo: Mapping[str, Mapping], defaults: Mapping,
                 model_name: str) -> Dict:
    """Turn a variant name or an arch dict into a complete, validated arch dict."""
    if isinstance(arch, str):
        key = arch.lower()
        if key not in zoo:
            raise ValueError(
                f"unknown {model_name} arch {arch!r}; choose one of {sorted(zoo)} or pass a dict "
                f"with {sorted(set(zoo[next(iter(zoo))]))}")
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
        spec[k] = tuple(int(v) for v in spec[k])
        if len(spec[k]) != 4:
            raise ValueError(f"{model_name} arch field {k!r} needs 4 values (one per stage), got {spec[k]}")
    for i, (c, h) in enumerate(zip(spec["embed_dims"], spec["num_heads"])):
        if c % h:
            raise ValueError(f"stage {i + 1}: embed_dims {c} is not divisible by num_heads {h}")
    return spec


class ResTBase(nn.Module):
    """Common machinery of :class:`ResTv2` and :class:`ResTv1`.

    Subclasses build ``self.stem`` and the per-stage modules and implement
    :meth:`stage_modules` (which modules belong to stage ``i``, for freezing).
    """

    num_stages = 4

    def _setup_common(self, spec: Dict, in_channels: int, out_indices: Sequence[int],
                      frozen_stages: int, norm_eval: bool, with_cp: bool) -> None:
        self.arch = spec
        self.embed_dims = spec["embed_dims"]
        self.depths = spec["depths"]
        self.sr_ratios = spec["sr_ratios"]
        self.in_channels = int(in_channels)
        if isinstance(out_indices, int):
            out_indices = (out_indices,)
        out_indices = tuple(out_indices)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
            raise TypeError(f"out_indices must be integers, got {out_indices}")
        bad = [i for i in out_indices if not 0 <= i < self.num_stages]
        if bad or not out_indices:
            raise ValueError(f"out_indices must be a non-empty subset of 0..{self.num_stages - 1}, "
                             f"got {out_indices}")
        if len(set(out_indices)) != len(out_indices):
            raise ValueError(f"out_indices has duplicates: {out_indices}")
        self.out_indices = out_indices
        #: the emitted maps, in output order (what necks and adapters read)
        self.feature_info: Tuple[FeatureInfo, ...] = tuple(
            FeatureInfo(i, f"stage{i + 1}", int(self.embed_dims[i]), STAGE_STRIDES[i])
            for i in out_indices)
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f"frozen_stages must be in -1..{self.num_stages}, got {frozen_stages}")
        self.frozen_stages = int(frozen_stages)
        self.norm_eval = bool(norm_eval)
        self.with_cp = bool(with_cp)

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
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D (N, C, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} was built for {self.in_channels} input channels, "
                             f"got an input with {x.shape[1]} channels (shape {tuple(x.shape)})")

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.with_cp and x.requires_grad and torch.is_grad_enabled():
            return cp.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _freeze_stages(self) -> None:
        for i in range(self.frozen_stages + 1):
            for m in self.stage_modules(i):
                m.eval()
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
        from .checkpoint import load_checkpoint

        return load_checkpoint(self, checkpoint, strict=strict, weights_only=weights_only)


def to_channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2).contiguous()
