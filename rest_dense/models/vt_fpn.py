"""VT-FPN: a feature-pyramid neck built from visual-token modules (pure PyTorch).

Visual Transformers (B. Wu et al., "Visual Transformers: Token-based Image Representation
and Processing for Computer Vision", arXiv 2006.03677; ICCV 2021 as "Visual Transformers:
Where Do Transformers Really Belong in Vision Models?") replace the convolutions of a
panoptic-FPN neck by three token operations per level:

* a **tokenizer** summarises a level's map ``X (HW x C)`` into ``L`` visual tokens: each
  token is a weighted average of the pixels, ``A = softmax_HW(X W_A)``, ``T = A^T X``;
* one **token transformer** shared by all levels does self-attention among the tokens of
  every level together;
* a **projector** per level lets every pixel read a convex combination of that level's
  tokens and adds it to the map: ``X_out = X + softmax_L(X K^T) V``.

The 1x1 lateral convs of the FPN are kept; the top-down path and the 3x3 output convs are
gone, which is where the neck's FLOPs went. Shapes below are per image; the modules work
on batches, every softmax is per image.

How this implementation relates to the paper (see ``docs/vt_fpn.md``):

* The published equations are followed, evaluated in a cheaper, algebraically identical
  order: a linear map on pixels commutes with the tokenizer's weighted average (so the
  C -> C_T projection acts on the L tokens, not on the HW pixels), and the projector's
  bilinear form ``(X W_Q)(T W_K)^T`` equals ``X (T W_K W_Q^T)^T``, so a single key map on
  the tokens (``C_T -> C``) covers every ``W_Q, W_K`` at ``L x C`` multiply-adds per pixel.
* From the appendix pseudo-code: multi-head attention (16 heads) with the ``1/sqrt(d)``
  scale in the token transformer (unscaled 1024-channel dot products saturate the
  softmax), and the ``1/sqrt(C)`` scale in the projector and recurrent tokenizer. The
  grouped pixel-wise convs of the pseudo-code are not needed (see the first point).
* The recurrent tokenizer follows the equation ``W_R = T_in W_{T->R}`` (all tokens
  kept), not the appendix's keep-half variant.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import check_channel_list, check_flag, check_input_matches, check_int, check_num_outs
from .fpn import pool_extra_levels
from .functional import tracing
from .layers import NORM_TYPES, reset_norm

__all__ = ["VTFPN", "FilterTokenizer", "RecurrentTokenizer", "TokenTransformer", "Projector",
           "TokenNorm", "NORM_LAYERS", "TOKENIZERS"]

#: spellings of ``norm_layer``: BatchNorm, SyncBatchNorm (the paper's), LayerNorm, none
NORM_LAYERS: Tuple[Optional[str], ...] = ("bn", "syncbn", "ln", None)
#: kinds of tokenizer of :class:`VTFPN`
TOKENIZERS: Tuple[str, ...] = ("filter", "recurrent")


def _check_norm(norm_layer: Optional[str]) -> Optional[str]:
    if isinstance(norm_layer, str) and norm_layer.lower() in ("bn", "syncbn", "ln", "none"):
        return None if norm_layer.lower() == "none" else norm_layer.lower()
    if norm_layer is None:
        return None
    raise ValueError(f"norm_layer must be 'bn', 'syncbn', 'ln' or None, got {norm_layer!r}")


def _softmax(x: Tensor, dim: int) -> Tensor:
    # half-precision logits (autocast) are normalised in fp32: a softmax over tens of
    # thousands of pixels loses too much in bf16
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float().softmax(dim).to(x.dtype)
    return x.softmax(dim)


class TokenNorm(nn.Module):
    """Normalisation of tokens ``(B, L, C)`` over their channels.

    ``'bn'`` wraps an ``nn.BatchNorm1d`` applied to the ``(B, C, L)`` view; statistics are
    taken over images and tokens. ``'syncbn'`` is the same with ``nn.SyncBatchNorm``
    (statistics over the images of every process in distributed training, as the paper
    trains VT-FPN; one process is plain BatchNorm, and the frameworks turn it back into
    ``BatchNorm1d`` where they revert SyncBN). ``'ln'`` is a LayerNorm (batch-independent in
    training too); ``None`` is the identity.

    Args:
        dim (int): channels C.
        kind (str | None): ``'bn'``, ``'syncbn'``, ``'ln'`` or None. Default: ``'bn'``.
    """

    def __init__(self, dim: int, kind: Optional[str] = "bn"):
        super().__init__()
        self.kind = _check_norm(kind)
        if self.kind == "bn":
            self.norm = nn.BatchNorm1d(dim)
        elif self.kind == "syncbn":
            self.norm = nn.SyncBatchNorm(dim)
        elif self.kind == "ln":
            self.norm = nn.LayerNorm(dim)
        else:
            self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.kind in ("bn", "syncbn"):
            if self.training and not tracing() and x.shape[0] * x.shape[1] == 1:
                raise ValueError(f"norm_layer={self.kind!r} needs more than one token per "
                                 "batch in training (batch 1 x 1 token here); use more images "
                                 "or tokens, or norm_layer='ln' / None")
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


def _check_tokens(owner: str, tokens: Tensor, token_channels: int) -> None:
    """``(B, L, token_channels)`` tokens, at least one per image."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError(f"{owner} takes (B, L, C) tokens, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    if tracing():  # sizes are traced values there
        return
    if tokens.shape[2] != token_channels:
        raise ValueError(f"{owner} was built for tokens of {token_channels} channels, got "
                         f"{tokens.shape[2]}")
    if tokens.shape[1] < 1:  # a softmax over no tokens would leave the map as it was
        raise ValueError(f"{owner} got no tokens (L = 0)")


def _check_map_and_tokens(owner: str, x: Tensor, channels: int,
                          tokens: Optional[Tensor] = None, token_channels: int = 0) -> None:
    """A ``(B, C, H, W)`` map with ``channels`` and, if given, ``(B, L, token_channels)``
    tokens of the same images: named errors instead of a broadcast that mixes images."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{owner} takes a (B, C, H, W) map, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if tokens is not None:
        _check_tokens(owner, tokens, token_channels)
    if tracing():
        return
    if x.shape[1] != channels:
        raise ValueError(f"{owner} was built for {channels} map channels, got {x.shape[1]}")
    if tokens is not None and tokens.shape[0] != x.shape[0]:
        raise ValueError(f"{owner} got tokens of {tokens.shape[0]} images for a map of "
                         f"{x.shape[0]}; each image has its own tokens")


class _Tokenizer(nn.Module):
    """What both tokenizers share: ``T = A^T X`` from weights ``A``, the optional position
    encoding, and the projection of the tokens to ``token_channels``."""

    def __init__(self, in_channels: int, token_channels: int, norm_layer: Optional[str],
                 pos_encoding: bool, pos_grid: int, pos_channels: int):
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.token_channels = check_int(token_channels, "token_channels", 1)
        self.pos_encoding = check_flag(pos_encoding, "pos_encoding")
        norm_layer = _check_norm(norm_layer)
        extra = 0
        if self.pos_encoding:
            self.pos_grid = check_int(pos_grid, "pos_grid", 1)
            extra = check_int(pos_channels, "pos_channels", 1)
            self.pos_embed = nn.Parameter(torch.zeros(1, extra, self.pos_grid, self.pos_grid))
        self.proj = nn.Linear(self.in_channels + extra, self.token_channels,
                              bias=norm_layer is None)
        self.norm = TokenNorm(self.token_channels, norm_layer)

    def _tokens(self, x: Tensor, weights: Tensor) -> Tensor:
        """``x (B, C, H, W)``, ``weights (B, L, HW)`` -> tokens ``(B, L, C_T)``."""
        tokens = weights @ x.flatten(2).transpose(1, 2)  # (B, L, C): A^T X
        if self.pos_encoding:
            # the weights "downsampled and projected" to the learned grid: pos = A^T P, with
            # P the grid bilinearly resized to H x W (works at any size, 1x1 included)
            grid = F.interpolate(self.pos_embed.to(x.dtype), size=x.shape[-2:],
                                 mode="bilinear", align_corners=False)
            pos = weights @ grid.flatten(2).transpose(1, 2)  # (B, L, pos_channels)
            tokens = torch.cat([tokens, pos.expand(tokens.shape[0], -1, -1)], dim=2)
        return self.norm(self.proj(tokens))


class FilterTokenizer(_Tokenizer):
    """Filter-based tokenizer (VT, Wu et al. 2020, Sec. 3.1).

    For one image with pixels ``X (HW x C)``: ``A = softmax_HW(X W_A)`` with
    ``W_A (C x L)`` a 1x1 conv, so every token's weights sum to 1 over the pixels of its
    image; ``T = A^T X (L x C)``, then ``T W_T`` maps the tokens to ``C_T`` channels (with
    the position encoding concatenated first when enabled) and a :class:`TokenNorm` follows.

    Args:
        in_channels (int): channels C of the map.
        num_tokens (int): tokens L. Default: 8.
        token_channels (int): channels C_T of the tokens. Default: 1024.
        norm_layer (str | None): norm of the tokens (:class:`TokenNorm`). Default: ``'bn'``.
        pos_encoding (bool): concatenate a position encoding to each token: its weights
            ``A`` read a learned ``pos_grid x pos_grid x pos_channels`` grid resized to
            ``H x W`` (the paper's "downsampled and projected" A-map). Default: False.
        pos_grid (int): side of the position grid. Default: 8.
        pos_channels (int): channels of the position encoding. Default: 32.
    """

    def __init__(self, in_channels: int, num_tokens: int = 8, token_channels: int = 1024,
                 norm_layer: Optional[str] = "bn", pos_encoding: bool = False,
                 pos_grid: int = 8, pos_channels: int = 32):
        super().__init__(in_channels, token_channels, norm_layer, pos_encoding, pos_grid,
                         pos_channels)
        self.num_tokens = check_int(num_tokens, "num_tokens", 1)
        # no bias: a per-token constant cancels in the softmax over pixels
        self.attn = nn.Conv2d(self.in_channels, self.num_tokens, kernel_size=1, bias=False)

    def token_weights(self, x: Tensor) -> Tensor:
        """The weights ``A`` of every token over the pixels.

        Args:
            x: ``(B, C, H, W)`` map.

        Returns:
            ``(B, L, H*W)``; each row sums to 1 over the pixels of its image.
        """
        return _softmax(self.attn(x).flatten(2), dim=-1)

    def forward(self, x: Tensor, return_weights: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Args:
            x: ``(B, C, H, W)`` map.
            return_weights: also return the weights ``A`` ``(B, L, H*W)``.

        Returns:
            Tokens ``(B, L, C_T)`` (and the weights).
        """
        _check_map_and_tokens(type(self).__name__, x, self.in_channels)
        weights = self.token_weights(x)
        tokens = self._tokens(x, weights)
        return (tokens, weights) if return_weights else tokens


class RecurrentTokenizer(_Tokenizer):
    """Recurrent tokenizer (VT, Wu et al. 2020, Sec. 3.1): the token weights come from
    tokens found before.

    With input tokens ``T_in (L x C_in)``: ``W_R = T_in W_{T->R} (L x C)``,
    ``A = softmax_HW(X W_R^T / sqrt(C))``, ``T = A^T X`` mapped to ``C_T`` as in
    :class:`FilterTokenizer`. The number of tokens is that of ``T_in`` (the equation
    form; the paper's appendix variant keeping half of ``T_in`` is not used).

    Args:
        in_channels (int): channels C of the map.
        token_channels (int): channels C_T of the output tokens. Default: 1024.
        in_token_channels (int | None): channels of ``T_in``. Default: ``token_channels``.
        norm_layer (str | None): norm of the tokens (:class:`TokenNorm`). Default: ``'bn'``.
        pos_encoding (bool): as in :class:`FilterTokenizer`. Default: False.
        pos_grid (int): side of the position grid. Default: 8.
        pos_channels (int): channels of the position encoding. Default: 32.
    """

    def __init__(self, in_channels: int, token_channels: int = 1024,
                 in_token_channels: Optional[int] = None, norm_layer: Optional[str] = "bn",
                 pos_encoding: bool = False, pos_grid: int = 8, pos_channels: int = 32):
        super().__init__(in_channels, token_channels, norm_layer, pos_encoding, pos_grid,
                         pos_channels)
        c_in = self.token_channels if in_token_channels is None else in_token_channels
        self.in_token_channels = check_int(c_in, "in_token_channels", 1)
        self.weight_proj = nn.Linear(self.in_token_channels, self.in_channels, bias=False)
        self.scale = self.in_channels ** -0.5

    def token_weights(self, x: Tensor, tokens_in: Tensor) -> Tensor:
        """The weights ``A`` of every token over the pixels.

        Args:
            x: ``(B, C, H, W)`` map.
            tokens_in: ``(B, L, C_in)`` tokens that define the weights.

        Returns:
            ``(B, L, H*W)``; each row sums to 1 over the pixels of its image.
        """
        w_r = self.weight_proj(tokens_in) * self.scale  # (B, L, C): W_R
        return _softmax(w_r @ x.flatten(2), dim=-1)

    def forward(self, x: Tensor, tokens_in: Tensor, return_weights: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Args:
            x: ``(B, C, H, W)`` map.
            tokens_in: ``(B, L, C_in)`` tokens of a previous tokenizer.
            return_weights: also return the weights ``A`` ``(B, L, H*W)``.

        Returns:
            Tokens ``(B, L, C_T)`` (and the weights).
        """
        _check_map_and_tokens(type(self).__name__, x, self.in_channels, tokens_in,
                              self.in_token_channels)
        weights = self.token_weights(x, tokens_in)
        tokens = self._tokens(x, weights)
        return (tokens, weights) if return_weights else tokens


class TokenTransformer(nn.Module):
    """Self-attention among tokens and a feed-forward layer (VT, Wu et al. 2020, Sec. 3.2).

    The paper's equation, ``T' = T + softmax_L((T K)(T Q)^T) T`` and
    ``T_out = T' + relu(T' F_1) F_2``, with the appendix's multi-head form: queries and
    keys (``C_T x C_T`` each, no bias) split into ``num_heads`` heads scaled by
    ``1/sqrt(C_T / num_heads)``; as in the equation the values are the tokens themselves
    (split into the same heads, no value projection). A :class:`TokenNorm` sits between
    ``F_1`` and the ReLU.

    Args:
        dim (int): token channels C_T.
        num_heads (int): attention heads; must divide ``dim``. Default: 16.
        norm_layer (str | None): norm of the feed-forward layer. Default: ``'bn'``.
    """

    def __init__(self, dim: int, num_heads: int = 16, norm_layer: Optional[str] = "bn"):
        super().__init__()
        self.dim = check_int(dim, "token_channels", 1)
        self.num_heads = check_int(num_heads, "num_heads", 1)
        if self.dim % self.num_heads:
            raise ValueError(f"token_channels ({self.dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        norm_layer = _check_norm(norm_layer)
        self.scale = (self.dim // self.num_heads) ** -0.5
        self.q = nn.Linear(self.dim, self.dim, bias=False)
        self.k = nn.Linear(self.dim, self.dim, bias=False)
        self.fc1 = nn.Linear(self.dim, self.dim, bias=norm_layer is None)
        self.norm = TokenNorm(self.dim, norm_layer)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(self.dim, self.dim)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.dim // self.num_heads).transpose(1, 2)

    def attention_weights(self, t: Tensor) -> Tensor:
        """Args:
            t: ``(B, N, C_T)`` tokens.

        Returns:
            ``(B, heads, N, N)`` weights of each query token over the key tokens (last
            axis, summing to 1).
        """
        q = self._heads(self.q(t) * self.scale)
        k = self._heads(self.k(t))
        return _softmax(q @ k.transpose(-2, -1), dim=-1)

    def forward(self, t: Tensor, return_weights: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Args:
            t: ``(B, N, C_T)`` tokens.
            return_weights: also return the attention weights ``(B, heads, N, N)``.

        Returns:
            ``(B, N, C_T)`` tokens (and the weights).
        """
        _check_tokens(type(self).__name__, t, self.dim)
        weights = self.attention_weights(t)
        mixed = (weights @ self._heads(t)).transpose(1, 2).reshape(t.shape)
        t = t + mixed
        t = t + self.fc2(self.act(self.norm(self.fc1(t))))
        return (t, weights) if return_weights else t


class Projector(nn.Module):
    """Writes tokens back into a map (VT, Wu et al. 2020, Sec. 3.3).

    ``X_out = X + softmax_L((X W_Q)(T W_K)^T / sqrt(C)) (T W_V)`` for pixels
    ``X (HW x C)`` and tokens ``T (L x C_T)``: each pixel adds a convex combination of the
    tokens mapped to C channels. ``W_Q W_K^T`` is learnt as one key map on the tokens
    (``C_T -> C``), which expresses every ``W_Q, W_K`` of the equation and costs
    ``L x C`` multiply-adds per pixel instead of ``C x C_T``.

    Args:
        channels (int): channels C of the map.
        token_channels (int): channels C_T of the tokens. Default: 1024.
    """

    def __init__(self, channels: int, token_channels: int = 1024):
        super().__init__()
        self.channels = check_int(channels, "channels", 1)
        self.token_channels = check_int(token_channels, "token_channels", 1)
        self.k = nn.Linear(self.token_channels, self.channels, bias=False)
        self.v = nn.Linear(self.token_channels, self.channels)
        self.scale = self.channels ** -0.5

    def projection_weights(self, x: Tensor, tokens: Tensor) -> Tensor:
        """Args:
            x: ``(B, C, H, W)`` map.
            tokens: ``(B, L, C_T)`` tokens.

        Returns:
            ``(B, L, H*W)`` weights of each pixel over the tokens (axis 1, summing to 1).
        """
        keys = self.k(tokens) * self.scale  # (B, L, C)
        return _softmax(keys @ x.flatten(2), dim=1)

    def forward(self, x: Tensor, tokens: Tensor, return_weights: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Args:
            x: ``(B, C, H, W)`` map.
            tokens: ``(B, L, C_T)`` tokens.
            return_weights: also return the weights ``(B, L, H*W)``.

        Returns:
            ``(B, C, H, W)`` map (and the weights).
        """
        _check_map_and_tokens(type(self).__name__, x, self.channels, tokens, self.token_channels)
        weights = self.projection_weights(x, tokens)
        out = self.v(tokens).transpose(1, 2) @ weights  # (B, C, HW)
        out = x + out.reshape(x.shape)
        return (out, weights) if return_weights else out


class VTFPN(nn.Module):
    """Feature-pyramid neck with visual-token modules instead of the top-down path and
    the 3x3 output convs (VT-FPN of Wu et al., arXiv 2006.03677, Sec. 4.2).

    Per level ``i``: a 1x1 lateral conv ``in_channels[i] -> out_channels``, a tokenizer
    extracting ``num_tokens`` tokens of ``token_channels`` channels, and a projector. The
    tokens of all levels, concatenated (``levels * num_tokens`` of them), go through
    ``transformer_depth`` shared :class:`TokenTransformer` layers; each projector then adds
    its level's tokens to its lateral map. Outputs have the size of their inputs; when
    ``num_outs`` exceeds the number of levels, coarser outputs are made by stride-2 max
    pooling of the last one (MMDetection's FPN with ``add_extra_convs=False``).

    With ``tokenizer='recurrent'`` the coarsest level uses a :class:`FilterTokenizer`
    and every finer level a :class:`RecurrentTokenizer` fed with the tokens of the
    level above it (coarse to fine, like an FPN's top-down path).

    Args:
        in_channels (Sequence[int]): channels of the input maps, finest first.
        out_channels (int): channels of every output. Default: 256.
        num_tokens (int): tokens per level. Default: 8.
        token_channels (int): token channels. Default: 1024.
        num_outs (int | None): number of outputs, at least ``len(in_channels)``.
            Default: ``len(in_channels)``.
        tokenizer (str): ``'filter'`` or ``'recurrent'``. Default: ``'filter'``.
        transformer_depth (int): token transformer layers (0: none). Default: 1.
        num_heads (int): heads of the token transformer; must divide ``token_channels``.
            Default: 16.
        pos_encoding (bool): position encoding in the tokenizers. Default: False.
        norm_layer (str | None): norm of the token path (:class:`TokenNorm`): ``'bn'``
            (BatchNorm), ``'syncbn'`` (SyncBatchNorm, the paper's), ``'ln'`` or None.
            Default: ``'bn'``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256,
                 num_tokens: int = 8, token_channels: int = 1024,
                 num_outs: Optional[int] = None, tokenizer: str = "filter",
                 transformer_depth: int = 1, num_heads: int = 16, pos_encoding: bool = False,
                 norm_layer: Optional[str] = "bn"):
        super().__init__()
        self.in_channels = check_channel_list(in_channels, "VTFPN")
        self.out_channels = check_int(out_channels, "out_channels", 1)
        self.num_tokens = check_int(num_tokens, "num_tokens", 1)
        self.token_channels = check_int(token_channels, "token_channels", 1)
        self.num_heads = check_int(num_heads, "num_heads", 1)
        if self.token_channels % self.num_heads:
            raise ValueError(f"token_channels ({self.token_channels}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        self.transformer_depth = check_int(transformer_depth, "transformer_depth", 0)
        n = len(self.in_channels)
        self.num_outs = check_num_outs(num_outs, n)
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {TOKENIZERS}")
        self.tokenizer = tokenizer
        self.pos_encoding = check_flag(pos_encoding, "pos_encoding")
        self.norm_layer = _check_norm(norm_layer)

        c, ct = self.out_channels, self.token_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(ci, c, kernel_size=1) for ci in self.in_channels)
        tok_kw = dict(norm_layer=self.norm_layer, pos_encoding=self.pos_encoding)
        tokenizers: List[nn.Module] = []
        for i in range(n):
            if tokenizer == "recurrent" and i < n - 1:
                tokenizers.append(RecurrentTokenizer(c, ct, **tok_kw))
            else:
                tokenizers.append(FilterTokenizer(c, self.num_tokens, ct, **tok_kw))
        self.tokenizers = nn.ModuleList(tokenizers)
        self.transformer = nn.ModuleList(
            TokenTransformer(ct, self.num_heads, self.norm_layer)
            for _ in range(self.transformer_depth))
        self.projectors = nn.ModuleList(Projector(c, ct) for _ in range(n))
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform convs and linear layers with zero biases, unit norms (BatchNorm
        statistics those of a new layer), and a truncated-normal (std 0.02) position grid."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, NORM_TYPES):
                reset_norm(m)
            elif isinstance(m, _Tokenizer) and m.pos_encoding:
                nn.init.trunc_normal_(m.pos_embed, std=0.02)

    def _check_inputs(self, feats: Sequence[Tensor]) -> None:
        if isinstance(feats, Tensor) or not isinstance(feats, Sequence):
            raise TypeError(f"VTFPN expects a list or tuple of {len(self.in_channels)} feature "
                            f"maps, got {type(feats).__name__}")
        if len(feats) != len(self.in_channels):
            raise ValueError(f"VTFPN got {len(feats)} feature maps, expected "
                             f"{len(self.in_channels)} (one per in_channels entry)")
        weight = next(self.parameters(), None)
        for i, (x, c) in enumerate(zip(feats, self.in_channels)):
            if not isinstance(x, Tensor):
                raise TypeError(f"VTFPN input {i} is a {type(x).__name__}, not a tensor")
            if x.dim() != 4:
                raise ValueError(f"VTFPN input {i} must be 4-D (B, C, H, W), got shape "
                                 f"{tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"VTFPN input {i} must be floating point, got {x.dtype}")
            if weight is not None:
                check_input_matches(f"VTFPN (input {i})", x, weight)
            if tracing():  # sizes are traced values there: no Python checks on them
                continue
            if x.shape[1] != c:
                raise ValueError(f"VTFPN input {i} has {x.shape[1]} channels, in_channels[{i}] "
                                 f"is {c}")
            if x.shape[2] == 0 or x.shape[3] == 0:
                raise ValueError(f"VTFPN input {i} is an empty map, shape {tuple(x.shape)}")
            if x.shape[0] != feats[0].shape[0]:
                raise ValueError(f"VTFPN input {i} has batch size {x.shape[0]}, input 0 has "
                                 f"{feats[0].shape[0]}")

    def _forward(self, feats: Sequence[Tensor], weights: Optional[Dict[str, list]]
                 ) -> Tuple[Tensor, ...]:
        self._check_inputs(feats)
        keep = weights is not None
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats)]
        n = len(laterals)
        tokens: List[Optional[Tensor]] = [None] * n
        tok_w: List[Optional[Tensor]] = [None] * n
        for i in reversed(range(n)):  # coarse to fine: a recurrent level reads the one above
            tok = self.tokenizers[i]
            if isinstance(tok, RecurrentTokenizer):
                out = tok(laterals[i], tokens[i + 1], return_weights=keep)
            else:
                out = tok(laterals[i], return_weights=keep)
            if keep:
                tokens[i], tok_w[i] = out
            else:
                tokens[i] = out
        t = torch.cat(tokens, dim=1)  # (B, levels * L, C_T)
        for layer in self.transformer:
            if keep:
                t, w = layer(t, return_weights=True)
                weights["transformer"].append(w)
            else:
                t = layer(t)
        outs = []
        for proj, lat, level_tokens in zip(self.projectors, laterals,
                                           t.split(self.num_tokens, dim=1)):
            if keep:
                out, w = proj(lat, level_tokens, return_weights=True)
                weights["projector"].append(w)
            else:
                out = proj(lat, level_tokens)
            outs.append(out)
        outs = pool_extra_levels(outs, self.num_outs)
        if keep:
            weights["tokenizer"].extend(tok_w)
        return tuple(outs)

    def forward(self, feats: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Args:
            feats: one ``(B, in_channels[i], H_i, W_i)`` map per level, finest first.

        Returns:
            ``num_outs`` maps of ``out_channels`` channels: ``(B, out_channels, H_i, W_i)``
            per level, then the extra stride-2 pooled levels.
        """
        return self._forward(feats, None)

    def attention_maps(self, feats: Sequence[Tensor]) -> Tuple[Tuple[Tensor, ...], Dict[str, List[Tensor]]]:
        """The forward pass together with every attention map.

        Args:
            feats: as in :meth:`forward`.

        Returns:
            The outputs of :meth:`forward` and a dict with ``'tokenizer'`` (per level,
            ``(B, L, H_i*W_i)``, softmax over pixels), ``'transformer'`` (per layer,
            ``(B, heads, N, N)`` with ``N = levels * L``, softmax over the last axis) and
            ``'projector'`` (per level, ``(B, L, H_i*W_i)``, softmax over the tokens, axis 1).
        """
        weights: Dict[str, List[Tensor]] = {"tokenizer": [], "transformer": [], "projector": []}
        outs = self._forward(feats, weights)
        return outs, weights

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"num_tokens={self.num_tokens}, token_channels={self.token_channels}, "
                f"num_outs={self.num_outs}, tokenizer={self.tokenizer!r}, "
                f"num_heads={self.num_heads}, norm_layer={self.norm_layer!r}")
