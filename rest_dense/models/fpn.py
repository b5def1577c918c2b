"""A plain feature-pyramid neck (Lin et al., "Feature Pyramid Networks for Object
Detection", CVPR 2017) in pure PyTorch.

The same computation as MMDetection's ``FPN`` (``add_extra_convs=False``) and detectron2's
``FPN`` without norm: 1x1 lateral convs, a top-down path of nearest upsampling and
additions, 3x3 output convs, and optional extra levels by stride-2 max pooling. Used as
the baseline neck of :class:`~rest_dense.models.VTFPN` and for counting FLOPs without a
framework.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .base import check_channel_list, check_input_matches, check_int, check_num_outs


def pool_extra_levels(outs: List[Tensor], num_outs: int) -> List[Tensor]:
    """``outs`` followed by coarser levels up to ``num_outs`` maps, each the stride-2 max
    pooling (kernel 1) of the one before, as MMDetection's FPN adds them without extra convs."""
    outs = list(outs)
    while len(outs) < num_outs:
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
    return outs

__all__ = ["FPN"]


class FPN(nn.Module):
    """Feature pyramid: ``out_i = conv3x3(lateral_i + upsample(top-down_{i+1}))``.

    Upsampling goes to the size of the finer map (nearest), so odd sizes work.

    Args:
        in_channels (Sequence[int]): channels of the input maps, finest first.
        out_channels (int): channels of every output. Default: 256.
        num_outs (int | None): number of outputs, at least ``len(in_channels)``; extra ones
            are stride-2 max pools of the last output. Default: ``len(in_channels)``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256,
                 num_outs: Optional[int] = None):
        super().__init__()
        self.in_channels = check_channel_list(in_channels, "FPN")
        self.out_channels = check_int(out_channels, "out_channels", 1)
        self.num_outs = check_num_outs(num_outs, len(self.in_channels))
        c = self.out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(ci, c, 1) for ci in self.in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in self.in_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform conv weights, zero biases (as MMDetection's FPN)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Args:
            feats: one ``(B, in_channels[i], H_i, W_i)`` map per level, finest first.

        Returns:
            ``num_outs`` maps ``(B, out_channels, H_i, W_i)``, then the pooled extra levels.
        """
        if isinstance(feats, Tensor) or len(feats) != len(self.in_channels):
            got = "a tensor" if isinstance(feats, Tensor) else f"{len(feats)} maps"
            raise ValueError(f"FPN expects {len(self.in_channels)} feature maps, got {got}")
        weight = next(self.parameters())
        for i, (x, c) in enumerate(zip(feats, self.in_channels)):
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f"FPN input {i} has shape {tuple(x.shape)}, expected "
                                 f"(B, {c}, H, W)")
            check_input_matches(f"FPN (input {i})", x, weight)
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        return tuple(pool_extra_levels(outs, self.num_outs))
