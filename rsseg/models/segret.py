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
    mode: DecayMode = "paper",
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
    mode: DecayMode = "paper",
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


def rotary_tables(
    height: int, width: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """sin/cos tables (H, W, head_dim) of the rotation Theta_n = e^{i n theta} (eq. 3).

    As in RMT, n is the row-major token index and theta_j = 10000^-(j / (head_dim/2 - 1)),
    each frequency used by one (even, odd) channel pair.
    """
    pairs = head_dim // 2
    theta = 1.0 / (10000 ** torch.linspace(0, 1, pairs, device=device))
    theta = theta.repeat_interleave(2)  # one frequency per channel pair
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
        decay_mode: DecayMode = "paper",
        decompose_all: bool = False,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
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
        decay_mode: DecayMode = "paper",
        decompose_all: bool = False,
        dropout: float = 0.1,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if decay_mode not in _DECAY_MODES:
            raise UsageError(
                f"SegRet: decay_mode must be one of {', '.join(_DECAY_MODES)}, got {decay_mode!r}"
            )
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
# Local backbone weights (never downloaded).

# Released RMT checkpoints (classification or segmentation) name modules differently; these rules
# rename their keys to ours. Keys we do not have (classifier head, decay buffers) are dropped.
_RMT_KEY_RULES: list[tuple[str, str]] = [
    (r"^patch_embed\.proj\.", "stem."),
    (r"^layers\.(\d+)\.downsample\.reduction\.", r"stages.\1.downsample.0."),
    (r"^layers\.(\d+)\.downsample\.norm\.", r"stages.\1.downsample.1."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.pos\.conv\.", ".cpe."),
    (r"\.retention_layer_norm\.", ".norm1."),
    (r"\.final_layer_norm\.", ".norm2."),
    (r"\.retention\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.retention\.out_proj\.", ".attn.out."),
    (r"\.retention\.lepe\.conv\.", ".attn.lepe."),
    (r"\.ffn\.dwconv\.conv\.", ".ffn.dwconv."),
    (r"\.gamma_1$", ".scale1"),
    (r"\.gamma_2$", ".scale2"),
    (r"^extra_norms\.", "out_norms."),
]
_STRIP_PREFIXES = ("module.", "backbone.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file, without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors have no common base class
        raise UsageError(
            f"SegRet pretrained file {path} is not a readable weights file ({exc})"
        ) from exc
    for key in ("model", "state_dict"):  # RMT classification / mmseg checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UsageError(f"SegRet pretrained file {path} does not hold a state dict")
    return state


def rmt_key_to_ours(key: str) -> str:
    """Rename one key of a released RMT checkpoint to this file's module names."""
    for prefix in _STRIP_PREFIXES:
        key = key.removeprefix(prefix)
    for pattern, replacement in _RMT_KEY_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def load_backbone_weights(backbone: RMTBackbone, path: str | Path) -> None:
    """Load local RMT weights (ours or the released layout) into ``backbone``.

    The first convolution is adapted to the band count with timm's rule; the output LayerNorms may
    be absent (classification checkpoints). Anything else that does not fit is a UsageError.
    """
    from timm.models import adapt_input_conv

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"SegRet pretrained file not found: {path}")
    own = backbone.state_dict()
    state = {}
    for key, value in _read_state_dict(path).items():
        ours = rmt_key_to_ours(key)
        if ours in own:
            if ours.endswith(("scale1", "scale2")):
                value = value.reshape(-1)  # released layer scales are (1, 1, 1, C)
            state[ours] = value
    if (
        "stem.0.weight" in state
        and state["stem.0.weight"].shape[1] != own["stem.0.weight"].shape[1]
    ):
        state["stem.0.weight"] = adapt_input_conv(
            own["stem.0.weight"].shape[1], state["stem.0.weight"]
        )
    wrong = [k for k in state if state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.startswith("out_norms.")]
    if wrong or missing or not state:
        example = (wrong or missing or ["(no matching keys)"])[0]
        raise UsageError(
            f"SegRet pretrained file {path} does not fit this backbone "
            f"({len(missing)} missing, {len(wrong)} wrong-shaped keys, e.g. {example!r})"
        )
    backbone.load_state_dict(state, strict=False)


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
    decay_mode: DecayMode = "paper",
    decompose_all: bool = False,
    drop_path_rate: float | None = None,
    dropout: float = 0.1,
    grad_checkpoint: bool = False,
) -> SegRet:
    """SegRet of one size. ``pretrained``: local RMT backbone weights (.pth/.pt/.safetensors).

    ``decompose_all`` uses the decomposed retention in every stage (needed for ~1024 px inputs);
    ``decay_mode="logit"`` matches the released RMT code (use it with released RMT weights);
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
]
