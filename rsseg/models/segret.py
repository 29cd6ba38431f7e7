"""SegRet: an RMT (Vision RetNet) backbone with a zero-initialised residual decoder.

Paper: "SegRet: An Efficient Design for Semantic Segmentation with Retentive Network" (review
version, sections 3.1-3.2 and 4.1). Backbone: "RMT: Retentive Networks Meet Vision Transformers"
(Fan et al., CVPR 2024, arXiv:2309.11523); sizes from its published configurations.

Layout of this file, in the order data flows:
- Manhattan retention maths (decay masks, full and decomposed retention) as plain functions, so the
  tests can compare them with a direct evaluation of the paper's equations;
- the RMT backbone: convolutional stem, four stages of retention blocks, patch merging;
- the lightweight residual decoder (section 3.2);
- the SegRet network, a loader for local backbone weights and the registered sizes.

The retention is hand-written: no library we depend on (timm, smp, torchgeo) ships RMT.
See docs/models/segret.md for the equations and every choice the papers left open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, trunc_normal_
from torch import nn

from rsseg.errors import UsageError
from rsseg.models.checkpoints import (
    CheckpointError,
    adapt_stem,
    check_state_fits,
    load_state_strict,
    read_state_dict,
)
from rsseg.models.registry import register_model

DecayMode = Literal["paper", "logit"]
_DECAY_MODES = ("paper", "logit")

# --------------------------------------------------------------------------------------------------
# Manhattan retention (eqs. 7-14). Tensors are laid out (B, heads, H, W, head_dim).


def head_decays(num_heads: int, initial_value: float, heads_range: float) -> torch.Tensor:
    """Per-head decay rates gamma_h = 1 - 2^-(initial_value + heads_range * h / num_heads).

    RMT gives each head its own gamma so that heads see different spatial ranges: with RMT-T's
    stage-1 values (2, 4) the four heads get 0.75, 0.875, 0.9375, 0.96875.
    """
    rates = [1.0 - 2.0 ** -(initial_value + heads_range * h / num_heads) for h in range(num_heads)]
    return torch.tensor(rates, device="cpu")


def axis_distance(length: int, device: torch.device | None = None) -> torch.Tensor:
    """|n - m| between positions along one image axis, float32 (length, length)."""
    index = torch.arange(length, device=device, dtype=torch.float32)
    return (index[:, None] - index[None, :]).abs()


def manhattan_distance(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """|x_n - x_m| + |y_n - y_m| between row-major tokens of an H x W map, float32 (HW, HW)."""
    d_y, d_x = axis_distance(height, device), axis_distance(width, device)
    return (d_y[:, None, :, None] + d_x[None, :, None, :]).reshape(height * width, height * width)


def axis_decay_mask(length: int, gamma: torch.Tensor) -> torch.Tensor:
    """D[h, n, m] = gamma_h ^ |n - m| along one image axis (eq. 13); shape (heads, L, L)."""
    return gamma.float()[:, None, None] ** axis_distance(length, gamma.device)


def manhattan_decay_mask(height: int, width: int, gamma: torch.Tensor) -> torch.Tensor:
    """D2d[h, n, m] = gamma_h ^ (|x_n - x_m| + |y_n - y_m|) over row-major tokens (eq. 8).

    Shape (heads, H*W, H*W).
    """
    return gamma.float()[:, None, None] ** manhattan_distance(height, width, gamma.device)


def _decayed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    distance: torch.Tensor,
    gamma: torch.Tensor,
    mode: DecayMode,
) -> torch.Tensor:
    """Attention over the second-to-last axis of q with decay gamma_h ^ distance (n, n).

    "paper": Softmax(q k^T) * D (the equations of both papers: decay after normalisation).
    "logit": Softmax(q k^T + log D) (the released RMT code: decay inside the softmax), which is
    scaled_dot_product_attention with an additive mask, so large maps use its fused kernels.
    ``q`` is expected already scaled by head_dim^-0.5. The mask is built in float32 (and in log
    space for "logit") so that half precision neither rounds gamma nor underflows gamma^d.
    """
    # The mask broadcasts over every leading axis of q except the head axis (dim 1).
    shape = (1, gamma.shape[0]) + (1,) * (q.dim() - 4) + distance.shape
    gamma = gamma.float()[:, None, None]
    if mode == "logit":
        bias = (distance * gamma.log()).reshape(shape).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    decay = (gamma**distance).reshape(shape).to(q.dtype)
    attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) * decay
    return attn @ v


def full_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    mode: DecayMode = "logit",
) -> torch.Tensor:
    """Manhattan self-attention over all H*W tokens with the 2D decay mask (eqs. 6-8).

    q, k: (B, heads, H, W, dk), q already scaled; v: (B, heads, H, W, dv) -> (B, heads, H, W, dv).
    Memory grows with (H*W)^2: use it where the token count is small (RMT's late stages).
    """
    b, n, h, w, _ = q.shape
    distance = manhattan_distance(h, w, q.device)
    out = _decayed_attention(
        q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3), distance, gamma, mode
    )
    return out.reshape(b, n, h, w, -1)


def decomposed_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    mode: DecayMode = "logit",
) -> torch.Tensor:
    """Retention decomposed along width, then height (eqs. 9-14): Attn_H (Attn_W V).

    Attn_W = Softmax(Q_W K_W^T) * D^W mixes tokens within each row; Attn_H does the same within
    each column on the row-mixed values. Cost O(HW(H+W)) instead of O((HW)^2).
    Shapes as in :func:`full_retention`.
    """
    h, w = q.shape[2], q.shape[3]
    # Along width: rows are the batch-like axis, (B, heads, H, W, d).
    rows = _decayed_attention(q, k, v, axis_distance(w, q.device), gamma, mode)
    # Along height: put columns first, (B, heads, W, H, d).
    q_t, k_t, rows_t = q.transpose(2, 3), k.transpose(2, 3), rows.transpose(2, 3)
    cols = _decayed_attention(q_t, k_t, rows_t, axis_distance(h, q.device), gamma, mode)
    return cols.transpose(2, 3)


def rotary_frequencies(head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """theta_j = 10000^-(j / (head_dim/2 - 1)) for j < head_dim/2, each repeated for its
    (even, odd) channel pair: float32 (head_dim,), the released RMT's ``Relpos.angle``."""
    theta = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2, device=device))
    return theta.repeat_interleave(2)


def rotary_tables(
    height: int, width: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """sin/cos tables (H, W, head_dim) of the rotation Theta_n = e^{i n theta} (eq. 3).

    As in RMT, n is the row-major token index; frequencies from :func:`rotary_frequencies`.
    """
    theta = rotary_frequencies(head_dim, device)
    index = torch.arange(height * width, device=device, dtype=torch.float32)
    angle = index[:, None] * theta[None, :]
    return angle.sin().reshape(height, width, -1), angle.cos().reshape(height, width, -1)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) channel pair of x (..., H, W, d) by the angle in sin/cos."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((-odd, even), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------
# RMT backbone. Blocks work channels-last (B, H, W, C), like the retention maths.


class DepthwiseConv(nn.Conv2d):
    """Depthwise k x k convolution applied to a channels-last tensor."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ManhattanSelfAttention(nn.Module):
    """Multi-head Manhattan self-attention (MaSA) with a 5x5 depthwise LePE on the values.

    ``decomposed=True`` uses eqs. 9-14 (cost O(HW(H+W))); False the full 2D mask (eq. 8).
    """

    def __init__(self, dim: int, num_heads: int, decomposed: bool, decay_mode: DecayMode) -> None:
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise UsageError(f"SegRet: width {dim} must split into {num_heads} heads of even size")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.decomposed = decomposed
        self.decay_mode = decay_mode
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.lepe = DepthwiseConv(dim, 5)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        return x.reshape(b, h, w, self.num_heads, self.head_dim).permute(0, 3, 1, 2, 4)

    def forward(
        self, x: torch.Tensor, gamma: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        b, h, w, c = x.shape
        sin, cos = rotary
        v = self.v(x)
        q = apply_rotary(self._heads(self.q(x)) * self.head_dim**-0.5, sin, cos)
        k = apply_rotary(self._heads(self.k(x)), sin, cos)
        retention = decomposed_retention if self.decomposed else full_retention
        out = retention(q, k, self._heads(v), gamma, self.decay_mode)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return self.out(out + self.lepe(v))


class ConvFFN(nn.Module):
    """fc1 -> GELU -> (+ 3x3 depthwise conv, residual) -> fc2: RMT's feed-forward network."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden, 3)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class RetentionBlock(nn.Module):
    """x + CPE(x); x + MaSA(LN(x)); x + ConvFFN(LN(x)), with optional layer scale and drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        decomposed: bool,
        decay_mode: DecayMode,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.cpe = DepthwiseConv(dim, 3)  # conditional position encoding
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ManhattanSelfAttention(dim, num_heads, decomposed, decay_mode)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale is not None:
            self.scale1 = nn.Parameter(torch.full((dim,), layer_scale))
            self.scale2 = nn.Parameter(torch.full((dim,), layer_scale))
        else:
            self.scale1 = self.scale2 = None

    def forward(
        self, x: torch.Tensor, gamma: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x = x + self.cpe(x)
        y = self.attn(self.norm1(x), gamma, rotary)
        x = x + self.drop_path(y if self.scale1 is None else self.scale1 * y)
        y = self.ffn(self.norm2(x))
        return x + self.drop_path(y if self.scale2 is None else self.scale2 * y)


class RMTStage(nn.Module):
    """Retention blocks at one resolution, then (but in the last stage) 3x3/2 conv patch merging."""

    def __init__(
        self,
        dim: int,
        out_dim: int | None,
        depth: int,
        num_heads: int,
        gammas: list[float],
        mlp_ratio: float,
        decomposed: bool,
        decay_mode: DecayMode,
        drop_paths: list[float],
        layer_scale: float | None,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        # The decays are fixed by the configuration: plain floats, so that neither the weights
        # file nor a cast of the model to half precision touches them.
        self.gammas = list(gammas)
        self.grad_checkpoint = grad_checkpoint
        self.blocks = nn.ModuleList(
            RetentionBlock(
                dim, num_heads, mlp_ratio, decomposed, decay_mode, drop_paths[i], layer_scale
            )
            for i in range(depth)
        )
        self.downsample = (
            nn.Sequential(nn.Conv2d(dim, out_dim, 3, 2, 1), nn.BatchNorm2d(out_dim))
            if out_dim
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, H, W, C) -> (stage output, merged input of the next stage or None)."""
        _, h, w, _ = x.shape
        rotary = tuple(t.to(x.dtype) for t in rotary_tables(h, w, self.head_dim, x.device))
        gamma = torch.tensor(self.gammas, device=x.device)
        for block in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # Recompute the block in the backward pass instead of keeping its activations.
                x = torch.utils.checkpoint.checkpoint(block, x, gamma, rotary, use_reentrant=False)
            else:
                x = block(x, gamma, rotary)
        if self.downsample is None:
            return x, None
        merged = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x, merged


@dataclass(frozen=True)
class RMTConfig:
    """One RMT size. ``decomposed[i]``: stage i uses eqs. 9-14 instead of the full 2D mask."""

    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    heads_ranges: tuple[float, float, float, float]
    mlp_ratios: tuple[float, float, float, float]
    decomposed: tuple[bool, bool, bool, bool]
    layer_scale: tuple[bool, bool, bool, bool]
    drop_path_rate: float
    initial_value: float = 2.0
    layer_scale_init: float = 1e-6


class RMTBackbone(nn.Module):
    """RMT: stem to 1/4, four retention stages; LayerNorm-ed maps at 1/4, 1/8, 1/16, 1/32."""

    def __init__(
        self,
        cfg: RMTConfig,
        in_channels: int = 3,
        decay_mode: DecayMode = "logit",
        decompose_all: bool = False,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if decay_mode not in _DECAY_MODES:
            raise UsageError(
                f"SegRet: decay_mode must be one of {', '.join(_DECAY_MODES)}, got {decay_mode!r}"
            )
        # Kept so that the weights loader can refuse released weights for the "paper" decay.
        self.decay_mode: DecayMode = decay_mode
        d0 = cfg.dims[0]
        # Overlapping 3x3 convolutions down to 1/4 (RMT's stem); the last has no activation.
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, d0 // 2, 3, 2, 1), nn.BatchNorm2d(d0 // 2), nn.GELU(),
            nn.Conv2d(d0 // 2, d0 // 2, 3, 1, 1), nn.BatchNorm2d(d0 // 2), nn.GELU(),
            nn.Conv2d(d0 // 2, d0, 3, 2, 1), nn.BatchNorm2d(d0), nn.GELU(),
            nn.Conv2d(d0, d0, 3, 1, 1), nn.BatchNorm2d(d0),
        )  # fmt: skip
        # Stochastic depth grows linearly over all blocks, as in RMT.
        total = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        for i in range(4):
            start = sum(cfg.depths[:i])
            self.stages.append(
                RMTStage(
                    dim=cfg.dims[i],
                    out_dim=cfg.dims[i + 1] if i < 3 else None,
                    depth=cfg.depths[i],
                    num_heads=cfg.num_heads[i],
                    gammas=head_decays(
                        cfg.num_heads[i], cfg.initial_value, cfg.heads_ranges[i]
                    ).tolist(),
                    mlp_ratio=cfg.mlp_ratios[i],
                    decomposed=decompose_all or cfg.decomposed[i],
                    decay_mode=decay_mode,
                    drop_paths=rates[start : start + cfg.depths[i]],
                    layer_scale=cfg.layer_scale_init if cfg.layer_scale[i] else None,
                    grad_checkpoint=grad_checkpoint,
                )
            )
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in cfg.dims)
        self.out_channels = list(cfg.dims)
        self.apply(_init_rmt_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x).permute(0, 2, 3, 1)
        features = []
        for stage, norm in zip(self.stages, self.out_norms):
            out, x = stage(x)
            features.append(norm(out).permute(0, 3, 1, 2).contiguous())
        return features


def _init_rmt_weights(module: nn.Module) -> None:
    # RMT's final initialisation: truncated normal (std 0.02) linears with zero bias.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# Lightweight residual decoder (section 3.2, eqs. 15-18).


class ZeroInitResidualDecoder(nn.Module):
    """Per stage: F_i = Linear(f_i) (to C); F'_i = f_i + ZeroConv1x1(F_i) (back to c_i).

    The concatenated map is 4C wide (eq. 17), so each refined F'_i goes through its stage's linear
    map again before the 1/4 upsampling; then 1x1 fuse conv + BN + ReLU, dropout, 1x1 classifier.
    This reading reproduces the paper's decoder sizes (see docs/models/segret.md).
    With ``zero_residual=False`` (Table 4 ablation) F'_i = f_i: a plain SegFormer-style head.
    """

    def __init__(
        self,
        in_channels: list[int],
        channels: int,
        num_classes: int,
        zero_residual: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        # Linear maps on channels are 1x1 convolutions: same parameters, no layout changes.
        self.linear = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.zero_residual = zero_residual
        if zero_residual:
            self.zero_convs = nn.ModuleList(nn.Conv2d(channels, c, 1) for c in in_channels)
            for conv in self.zero_convs:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        else:
            self.zero_convs = None
        self.fuse = nn.Sequential(
            nn.Conv2d(len(in_channels) * channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps (finest first) -> logits at the finest map's size (1/4 of the input)."""
        size = features[0].shape[-2:]
        upsampled = []
        for i, f in enumerate(features):
            if self.zero_convs is not None:
                f = f + self.zero_convs[i](self.linear[i](f))  # eq. 16
            mapped = self.linear[i](f)
            if mapped.shape[-2:] != size:
                mapped = F.interpolate(mapped, size=size, mode="bilinear", align_corners=False)
            upsampled.append(mapped)
        fused = self.fuse(torch.cat(upsampled, dim=1))  # eq. 17
        return self.classifier(self.dropout(fused))  # eq. 18


# --------------------------------------------------------------------------------------------------
# The network.


class SegRet(nn.Module):
    """RMT backbone + zero-initialised residual decoder; logits at input size, any H x W."""

    def __init__(
        self,
        backbone_cfg: RMTConfig,
        num_classes: int,
        in_channels: int = 3,
        decoder_channels: int = 256,
        zero_residual: bool = True,
        decay_mode: DecayMode = "logit",
        decompose_all: bool = False,
        dropout: float = 0.1,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = RMTBackbone(
            backbone_cfg, in_channels, decay_mode, decompose_all, grad_checkpoint
        )
        self.decoder = ZeroInitResidualDecoder(
            self.backbone.out_channels, decoder_channels, num_classes, zero_residual, dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.decoder(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------
# Local backbone weights (never downloaded): our layout, or the released RMT checkpoints.
#
# Released layout (github.com/qhfan/RMT, checked against the class definitions in
# classfication_release/RMT.py and segmentation/mmseg/models/backbones/RMT.py; the key names and
# shapes of T/S/B/L are in tests/fixtures/rmt_official_keys.json). Each rule maps one whole
# released key to ours; a key no rule matches is left as it is, so that the strict check names it.
_B = r"layers\.(\d+)\.blocks\.(\d+)\."  # one retention block
_OURS_B = r"stages.\1.blocks.\2."
_RMT_KEY_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(pattern), replacement)
    for pattern, replacement in [
        # PatchEmbed.proj is the same 11-module Sequential as our stem: indices carry over.
        (r"patch_embed\.proj\.(\d+)\.(\w+)", r"stem.\1.\2"),
        (r"layers\.(\d+)\.downsample\.reduction\.(weight|bias)", r"stages.\1.downsample.0.\2"),
        (r"layers\.(\d+)\.downsample\.norm\.(\w+)", r"stages.\1.downsample.1.\2"),
        (_B + r"pos\.conv\.(weight|bias)", _OURS_B + r"cpe.\3"),
        (_B + r"retention_layer_norm\.(weight|bias)", _OURS_B + r"norm1.\3"),
        (_B + r"final_layer_norm\.(weight|bias)", _OURS_B + r"norm2.\3"),
        (_B + r"retention\.([qkv])_proj\.(weight|bias)", _OURS_B + r"attn.\3.\4"),
        (_B + r"retention\.out_proj\.(weight|bias)", _OURS_B + r"attn.out.\3"),
        (_B + r"retention\.lepe\.conv\.(weight|bias)", _OURS_B + r"attn.lepe.\3"),
        (_B + r"ffn\.(fc1|fc2)\.(weight|bias)", _OURS_B + r"ffn.\3.\4"),
        (_B + r"ffn\.dwconv\.conv\.(weight|bias)", _OURS_B + r"ffn.dwconv.\3"),
        (_B + r"gamma_([12])", _OURS_B + r"scale\3"),
        # Only in the mmseg backbone: the LayerNorms on the four stage outputs.
        (r"extra_norms\.(\d+)\.(weight|bias)", r"out_norms.\1.\2"),
    ]
]
# The released files keep each stage's fixed rotation frequencies and log-decays as buffers
# ("layers.<i>.Relpos.angle" / ".decay"); we compute them from the size, so they are compared
# with ours instead of loaded (a file of another size, or with other decays, is refused).
_RMT_RELPOS_KEY = re.compile(r"layers\.(\d+)\.Relpos\.(angle|decay)")
# The released ImageNet-1K checkpoints' classification head: projection to 1024, its BatchNorm,
# the classifier, and the dense classifier of the token-labelling models (RMT-S*/B*/L*).
# These, and only these, are dropped.
_RMT_CLASSIFIER_KEYS = frozenset(
    [
        "proj.weight", "proj.bias",
        "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
        "norm.num_batches_tracked",
        "head.weight", "head.bias",
        "aux_head.weight", "aux_head.bias",
    ]
)  # fmt: skip
# A whole mmseg segmentor (RMT's segmentation checkpoints): the backbone is everything under
# "backbone."; these other parts of a segmentor are dropped, anything else is refused.
_MMSEG_BACKBONE = "backbone."
_MMSEG_OTHER_PARTS = ("decode_head.", "auxiliary_head.", "neck.")
# Keys that mark a file as the released layout (ours starts "stem." / "stages." / "out_norms.").
_RELEASED_MARKERS = ("patch_embed.", "layers.")


def rmt_key_to_ours(key: str) -> str:
    """Our name for one key of a released RMT backbone (unchanged if no rule matches)."""
    for pattern, replacement in _RMT_KEY_RULES:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return key


def _backbone_part(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a whole mmseg segmentor; any other state unchanged."""
    if not any(key.startswith(_MMSEG_BACKBONE) for key in state):
        return state
    backbone, stray = {}, []
    for key, value in state.items():
        if key.startswith(_MMSEG_BACKBONE):
            backbone[key.removeprefix(_MMSEG_BACKBONE)] = value
        elif not key.startswith(_MMSEG_OTHER_PARTS):
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"{what} mixes an mmseg segmentor with other tensors ({', '.join(sorted(stray)[:3])})"
        )
    return backbone


def _expected_relpos(backbone: RMTBackbone) -> dict[str, torch.Tensor]:
    """The Relpos buffers a released checkpoint of this backbone's size holds, in float32."""
    expected = {}
    for i, stage in enumerate(backbone.stages):
        expected[f"layers.{i}.Relpos.angle"] = rotary_frequencies(stage.head_dim)
        expected[f"layers.{i}.Relpos.decay"] = torch.tensor(stage.gammas).log()
    return expected


def _check_relpos(backbone: RMTBackbone, relpos: dict[str, torch.Tensor], what: str) -> None:
    expected = _expected_relpos(backbone)
    check_state_fits(expected, relpos, what=f"{what} (retention decays and rotation angles)")
    for key, value in expected.items():
        if not torch.allclose(relpos[key].float(), value, rtol=1e-5, atol=1e-6):
            raise CheckpointError(
                f"{what}: {key} = {[round(v, 5) for v in relpos[key].tolist()][:4]} differs from "
                f"this model's {[round(v, 5) for v in value.tolist()][:4]} "
                "(weights of another RMT size or configuration?)"
            )


def _is_channels_last_vector(value: torch.Tensor) -> bool:
    return value.dim() == 4 and tuple(value.shape[:3]) == (1, 1, 1)


def _from_released(
    backbone: RMTBackbone, state: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Released RMT tensors renamed to ours; the head dropped, the decay buffers checked."""
    if backbone.decay_mode != "logit":
        raise CheckpointError(
            f"{what} is a released RMT checkpoint, trained with the decay inside the softmax; "
            f'this model uses decay_mode="{backbone.decay_mode}": build it with '
            'decay_mode="logit" (the default) to load these weights'
        )
    relpos, renamed = {}, {}
    for key, value in state.items():
        if key in _RMT_CLASSIFIER_KEYS:
            continue
        if _RMT_RELPOS_KEY.fullmatch(key):
            relpos[key] = value
            continue
        ours = rmt_key_to_ours(key)
        if ours.endswith((".scale1", ".scale2")) and _is_channels_last_vector(value):
            # Released layer scales broadcast over (B, H, W, C) as (1, 1, 1, C); ours are (C,).
            value = value.reshape(-1)
        renamed[ours] = value
    _check_relpos(backbone, relpos, what)
    return renamed


def load_backbone_weights(backbone: RMTBackbone, path: str | Path) -> None:
    """Load a local weights file into ``backbone``, strictly: every tensor of the file is used.

    Accepted: our own layout (``stem.`` / ``stages.`` / ``out_norms.``), or a released RMT
    checkpoint, i.e. an ImageNet-1K classification file (``{"model": ..., "args": Namespace}``,
    its classification head dropped) or an mmseg segmentation file (``{"state_dict": ...}``, the
    ``backbone.`` part). Released weights need ``decay_mode="logit"``. The stage-output norms a
    classification file lacks keep their initial values; the stem is adapted to the band count.
    Anything else that does not fit raises a one-line :class:`CheckpointError`.
    """
    what = f"RMT weights {path}"
    state = _backbone_part(read_state_dict(path, what="RMT weights"), what)
    if any(key.startswith(_RELEASED_MARKERS) for key in state):
        state = _from_released(backbone, state, what)
    own = backbone.state_dict()
    stem = "stem.0.weight"
    if stem in state and state[stem].dim() == 4 and state[stem].shape[1] != own[stem].shape[1]:
        state[stem] = adapt_stem(state[stem], own[stem].shape[1])
    # Classification checkpoints have no stage-output norms; a file with some of them must have all.
    out_norms = [key for key in own if key.startswith("out_norms.")]
    optional = out_norms if not any(key in state for key in out_norms) else []
    load_state_strict(backbone, state, what=what, optional=optional)


# --------------------------------------------------------------------------------------------------
# Registered sizes. Backbone numbers: RMT's released segmentation configurations (RMT_FPN_{t,s,m,l})
# and model definitions (RMT_T3, RMT_S, RMT_M2, RMT_L6) in github.com/qhfan/RMT; "Base" is RMT's
# "M2"/"m" model. Decoder width C: SegRet section 4.1 (256, 256, 256, 512).

RMT_SIZES: dict[str, RMTConfig] = {
    "t": RMTConfig(
        dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
        heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
        decomposed=(True, True, False, False), layer_scale=(False, False, False, False),
        drop_path_rate=0.1,
    ),
    "s": RMTConfig(
        dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
        heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3),
        decomposed=(True, True, True, False), layer_scale=(False, False, False, False),
        drop_path_rate=0.15,
    ),
    "b": RMTConfig(
        dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
        heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3),
        decomposed=(True, True, True, False), layer_scale=(False, False, True, True),
        drop_path_rate=0.4,
    ),
    "l": RMTConfig(
        dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
        heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3),
        decomposed=(True, True, True, False), layer_scale=(False, False, True, True),
        drop_path_rate=0.5,
    ),
}  # fmt: skip
DECODER_CHANNELS = {"t": 256, "s": 256, "b": 256, "l": 512}
_PAPER = (
    "SegRet: An Efficient Design for Semantic Segmentation with Retentive Network (2025); "
    "backbone RMT (Fan et al., CVPR 2024)"
)
_SIZE_NAMES = {"t": "Tiny", "s": "Small", "b": "Base", "l": "Large"}


def build_segret(
    size: str,
    num_classes: int,
    in_channels: int = 3,
    *,
    pretrained: str | None = None,
    decoder_channels: int | None = None,
    zero_residual: bool = True,
    decay_mode: DecayMode = "logit",
    decompose_all: bool = False,
    drop_path_rate: float | None = None,
    dropout: float = 0.1,
    grad_checkpoint: bool = False,
) -> SegRet:
    """SegRet of one size. ``pretrained``: a local backbone weights file (.pth/.pt/.safetensors),
    ours or a released RMT checkpoint (see :func:`load_backbone_weights`); never a name or a URL.

    ``decompose_all`` uses the decomposed retention in every stage (needed for ~1024 px inputs);
    ``decay_mode``: "logit" (default) is the decay the released RMT code runs and its weights were
    trained with, Softmax(QK^T + log D); "paper" is the papers' Softmax(QK^T) * D;
    ``grad_checkpoint`` recomputes each retention block in the backward pass (less memory).
    """
    cfg = RMT_SIZES[size]
    if drop_path_rate is not None:
        cfg = RMTConfig(**{**cfg.__dict__, "drop_path_rate": drop_path_rate})
    model = SegRet(
        cfg,
        num_classes,
        in_channels,
        decoder_channels=decoder_channels or DECODER_CHANNELS[size],
        zero_residual=zero_residual,
        decay_mode=decay_mode,
        decompose_all=decompose_all,
        dropout=dropout,
        grad_checkpoint=grad_checkpoint,
    )
    if pretrained:
        load_backbone_weights(model.backbone, pretrained)
    return model


def _register(size: str) -> None:
    name = _SIZE_NAMES[size]

    @register_model(
        f"segret-{size}",
        paper=_PAPER,
        description=(
            f"SegRet-{name}: RMT-{size.upper()} backbone, zero-initialised residual decoder "
            f"(C={DECODER_CHANNELS[size]})"
        ),
    )
    def build(num_classes: int, in_channels: int, **cfg: Any) -> nn.Module:
        return build_segret(size, num_classes, in_channels, **cfg)


for _size in RMT_SIZES:
    _register(_size)

__all__ = [
    "RMTBackbone",
    "RMTConfig",
    "RMT_SIZES",
    "SegRet",
    "ZeroInitResidualDecoder",
    "axis_decay_mask",
    "axis_distance",
    "build_segret",
    "decomposed_retention",
    "full_retention",
    "head_decays",
    "load_backbone_weights",
    "manhattan_decay_mask",
    "manhattan_distance",
    "rmt_key_to_ours",
    "rotary_frequencies",
]
