"""A2Mamba backbone (Lou, Fu, Yu: "A2Mamba: Attention-augmented State Space Models for Visual
Recognition", sections 3.2-3.4, Table I). Its segmentation network, SegMAN-V2, is in
:mod:`rsseg.models.segman_v2`; this file registers no model.

Pieces, each named after the paper:
- :class:`A2SSM` (3.3): a selective scan with d_state 1 whose hidden-state map is re-aggregated
  with the attention maps of SLA and DLA before it is multiplied by C and given the D skip;
- :class:`MASS` (3.3, eq. 2): split channels, SLA and DLA (adaptive dilation, eq. 1), concat,
  A2SSM, gate ``Y' * SiLU(Conv1x1(X))``; ``mode="global"`` swaps SLA/DLA for global attention
  (used by the SegMAN-V2 decoder on its 1/32 maps, section 3.5);
- :class:`A2MambaBlock` (3.2): residual 3x3 depthwise conv, MASS, ConvFFN;
- :class:`A2Mamba`: conv stem to 1/4, four stages, strided-conv downsampling; returns the four
  feature maps (1/4, 1/8, 1/16, 1/32).
Choices the paper leaves open are listed in ``docs/models/segman-v2.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import Tensor, nn

from rsseg.models.neighborhood_attention import (
    adaptive_dilation,
    neighbourhood_aggregate,
    neighbourhood_attention,
)
from rsseg.models.ssm import selective_scan_states
from rsseg.models.ssm.mamba_init import a_log_init, d_init, dt_proj_init_


@dataclass(frozen=True)
class A2MambaSize:
    """One row of Table I plus the FFN ratios (not in the paper; the authors' released code)."""

    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int]
    windows: tuple[int, int, int, int] = (11, 9, 7, 7)
    mlp_ratios: tuple[float, float, float, float] = (4, 4, 3, 3)


A2MAMBA_SIZES: dict[str, A2MambaSize] = {
    "nano": A2MambaSize((32, 64, 128, 192), (2, 2, 8, 2), (2, 2, 4, 8)),
    "tiny": A2MambaSize((48, 96, 256, 448), (2, 2, 10, 2), (2, 4, 8, 16)),
    "small": A2MambaSize((64, 128, 320, 512), (2, 4, 12, 4), (2, 4, 10, 16)),
    "base": A2MambaSize((96, 192, 384, 512), (4, 6, 12, 6), (4, 8, 12, 16), mlp_ratios=(4, 4, 3.75, 3.75)),
    "large": A2MambaSize((112, 224, 512, 720), (4, 6, 12, 6), (4, 8, 16, 30), mlp_ratios=(4, 4, 4, 4)),
}


class A2SSM(nn.Module):
    """Attention-augmented SSM (section 3.3, Fig. 3b) on a (B, C, H, W) map, row-major scan.

    ``u = SiLU(DWConv(Y))`` is projected to a low-rank Delta, B and C' (d_state 1); the scan gives
    the hidden-state map S (C x HW); ``reaggregate`` (from MASS: the SLA/DLA maps applied to the
    two channel halves of S) turns S into S'; the output is ``S' * C' + D * u``. With
    ``reaggregate=None`` this is exactly a vanilla d_state-1 selective scan.
    """

    def __init__(self, dim: int, d_conv: int = 5, dt_rank: int | None = None) -> None:
        super().__init__()
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.conv = nn.Conv2d(dim, dim, d_conv, padding=d_conv // 2, groups=dim)
        # one projection for (dt low-rank, B, C), as in Mamba; d_state = 1
        self.x_proj = nn.Linear(dim, self.dt_rank + 2, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, dim)
        dt_proj_init_(self.dt_proj.weight, self.dt_proj.bias, self.dt_rank)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        self.A_log = a_log_init(1, dim)
        self.D = d_init(dim)

    def scan_inputs(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(u, delta, A, B, C)`` in mamba-ssm's layout: u, delta (b, d, l); A (d, 1); B, C (b, 1, l)."""
        b, c, h, w = y.shape
        u = F.silu(self.conv(y)).reshape(b, c, h * w)
        x_dbl = torch.einsum("od,bdl->bol", self.x_proj.weight, u)
        dt_low, b_in, c_in = torch.split(x_dbl, [self.dt_rank, 1, 1], dim=1)
        delta = torch.einsum("dr,brl->bdl", self.dt_proj.weight, dt_low)
        return u, delta, -torch.exp(self.A_log.float()), b_in, c_in

    def forward(self, y: Tensor, reaggregate: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        b, c, h, w = y.shape
        u, delta, a, b_in, c_in = self.scan_inputs(y)
        states = selective_scan_states(
            u, delta, a, b_in, delta_bias=self.dt_proj.bias.float(), delta_softplus=True
        )  # (b, c, 1, l)
        states = states.reshape(b, c, h, w)
        if reaggregate is not None:
            states = reaggregate(states)
        out = states.reshape(b, c, h * w) * c_in + u * self.D[:, None]
        return out.reshape(b, c, h, w)


def _heads_last(x: Tensor, heads: int) -> Tensor:
    """(B, heads * hd, H, W) -> (B, heads, H, W, hd)."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h, w).permute(0, 1, 3, 4, 2)


def _heads_first(x: Tensor) -> Tensor:
    """(B, heads, H, W, hd) -> (B, heads * hd, H, W)."""
    b, n, h, w, d = x.shape
    return x.permute(0, 1, 4, 2, 3).reshape(b, n * d, h, w)


def _global_attention(q: Tensor, k: Tensor) -> Tensor:
    """Softmax map (B, heads, HW, HW) of full self-attention; q, k (B, heads, H, W, hd)."""
    b, n, h, w, d = q.shape
    return torch.softmax(q.reshape(b, n, h * w, d) @ k.reshape(b, n, h * w, d).transpose(-1, -2), -1)


def _global_aggregate(attn: Tensor, v: Tensor) -> Tensor:
    b, n, h, w, d = v.shape
    return (attn @ v.reshape(b, n, h * w, d)).reshape(b, n, h, w, d)


class MASS(nn.Module):
    """Multi-scale Attention-augmented State Space token mixer (section 3.3, eq. 2), (B, C, H, W).

    Half the heads run sliding local attention (SLA) on the first half of the channels, the other
    half dilated local attention (DLA, dilation ``(H // K, W // K)``) on the second half. Their
    outputs feed A2SSM, whose hidden states are re-aggregated with the same two maps. The result
    is normalised, gated by ``SiLU(Conv1x1(X))`` and projected.
    ``mode="global"``: both halves use global self-attention (for small maps; no window, no bias).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, mode: str = "local") -> None:
        super().__init__()
        if num_heads % 2 or dim % num_heads:
            raise ValueError(f"MASS needs an even number of heads dividing dim, got {num_heads} for {dim}")
        if mode not in ("local", "global"):
            raise ValueError(f"MASS mode must be 'local' or 'global', got {mode!r}")
        self.dim, self.num_heads, self.kernel_size, self.mode = dim, num_heads, kernel_size, mode
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.gate = nn.Conv2d(dim, dim, 1)
        if mode == "local":
            size = 2 * kernel_size - 1
            self.rpb_sla = nn.Parameter(torch.zeros(num_heads // 2, size, size))
            self.rpb_dla = nn.Parameter(torch.zeros(num_heads // 2, size, size))
        self.ssm = A2SSM(dim)
        self.norm = LayerNorm2d(dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """SLA + DLA (or global) on ``x``: returns Y (B, C, H, W) and the map re-use function."""
        _, _, h, w = x.shape
        half = self.num_heads // 2
        q, k, v = (_heads_last(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=1))
        q = q * self.scale
        (q1, q2), (k1, k2), (v1, v2) = (t.split(half, dim=1) for t in (q, k, v))
        if self.mode == "local":
            kernel = self.kernel_size
            dilation = adaptive_dilation(h, w, kernel)
            y1, a1 = neighbourhood_attention(q1, k1, v1, kernel, (1, 1), self.rpb_sla)
            y2, a2 = neighbourhood_attention(q2, k2, v2, kernel, dilation, self.rpb_dla)

            def reaggregate(states: Tensor) -> Tensor:
                s1, s2 = _heads_last(states, self.num_heads).split(half, dim=1)
                s1 = neighbourhood_aggregate(a1, s1, kernel, (1, 1))
                s2 = neighbourhood_aggregate(a2, s2, kernel, dilation)
                return _heads_first(torch.cat([s1, s2], dim=1))

        else:
            a1, a2 = _global_attention(q1, k1), _global_attention(q2, k2)
            y1, y2 = _global_aggregate(a1, v1), _global_aggregate(a2, v2)

            def reaggregate(states: Tensor) -> Tensor:
                s1, s2 = _heads_last(states, self.num_heads).split(half, dim=1)
                return _heads_first(torch.cat([_global_aggregate(a1, s1), _global_aggregate(a2, s2)], 1))

        return _heads_first(torch.cat([y1, y2], dim=1)), reaggregate

    def forward(self, x: Tensor) -> Tensor:
        y, reaggregate = self.attend(x)
        y = self.ssm(y, reaggregate)
        return self.proj(self.norm(y) * F.silu(self.gate(x)))


class ConvFFN(nn.Module):
    """PVTv2's convolutional FFN: 1x1 up, 3x3 depthwise, GELU, 1x1 down."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x))))


class A2MambaBlock(nn.Module):
    """Residual 3x3 depthwise conv (positions), pre-norm MASS, pre-norm ConvFFN (section 3.2)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        mode: str = "local",
    ) -> None:
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.mixer = MASS(dim, num_heads, kernel_size, mode)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos(x)
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]


class A2Mamba(nn.Module):
    """Four-stage A2Mamba feature extractor: (B, in_channels, H, W) -> 4 maps at 1/4 ... 1/32."""

    def __init__(self, size: A2MambaSize, in_channels: int = 3, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        dims = size.dims
        self.dims = dims
        # overlapping conv stem to 1/4 (two stride-2 3x3 convs)
        self.stem = nn.Sequential(
            *_conv_bn(in_channels, dims[0] // 2, 2), nn.GELU(), *_conv_bn(dims[0] // 2, dims[0], 2)
        )
        total = sum(size.depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]  # linear decay rule
        self.downsamples = nn.ModuleList(
            [nn.Identity()] + [nn.Sequential(*_conv_bn(dims[i - 1], dims[i], 2)) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList()
        first = 0
        for i in range(4):
            blocks = [
                A2MambaBlock(dims[i], size.heads[i], size.windows[i], size.mlp_ratios[i], rates[first + j])
                for j in range(size.depths[i])
            ]
            first += size.depths[i]
            self.stages.append(nn.Sequential(*blocks))
        self.apply(init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        x = self.stem(x)
        for down, stage in zip(self.downsamples, self.stages):
            x = stage(down(x))
            features.append(x)
        return features


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) convs/linears with zero bias, as in the authors' code; the dt
    projection keeps Mamba's initialisation."""
    if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.is_meta:
        if getattr(module.bias, "_no_reinit", False):
            return
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
